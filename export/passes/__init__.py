"""Graph passes on the onnx-ir model, one class per transformation (onnx-ir's `call(model) -> PassResult`)."""
