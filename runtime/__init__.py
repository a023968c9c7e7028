"""Running a model: one runner interface over PyTorch, onnxruntime, the ONNX reference evaluator and
TensorRT engines (``infer(dict[str, ndarray]) -> dict[str, ndarray]``), the engine's metadata, and the
fuse step that prepares a model for inference in fp32, fp16 or bf16.

Export's verification, the service, the Triton model and the benchmarks all stand on this layer.
onnxruntime and TensorRT are imported when a runner is made, never here.
"""
