"""Model loading, torch → ONNX export, graph passes, and the build conductor (`python -m export.build`)."""
