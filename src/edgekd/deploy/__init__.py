"""Deployment: self-describing ONNX export with its parity gates, inference sessions (onnxruntime,
OpenVINO) and the `predict` command."""
