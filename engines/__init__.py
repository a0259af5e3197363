"""Engine builders (ONNX Runtime, TensorRT) and accuracy verification; imports runtime/."""
