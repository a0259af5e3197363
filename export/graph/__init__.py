"""The graph toolkit: every onnx-ir pass (one class per transformation, `call(model) -> PassResult`) and what
the stages share below them: finding layers, sample data and activation statistics. It imports runtime/ and
itself only, so every stage package (export, calibration, engines) can import it without importing another."""
