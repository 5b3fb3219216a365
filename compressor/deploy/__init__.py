"""Deployment: ONNX export, parity checks against PyTorch, TensorRT engines and their checks, the latency bench
(interleaved dense vs compressed, any runtime; runs without torch for ONNX and engines), ONNX Runtime profiles and
the hardware facts the planner needs. It imports nothing from prune, train or app."""
