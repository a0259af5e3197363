"""Model loading, torch → ONNX export, pruning and distillation, the graph toolkit (`export.graph`), and the build
conductor (`python -m export.build`)."""
