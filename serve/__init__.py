"""Serving: runners that share one interface (torch, onnxruntime; TensorRT to come) and the service."""
