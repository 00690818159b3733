"""Checks and measurements of what was written: verify, caches and lineage, evaluate
(PyTorch and ONNX Runtime)."""
