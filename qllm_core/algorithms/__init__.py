"""Algorithms the baseline methods are built from: Hadamard matrices and rotations (QuaRot),
GPTQ, SmoothQuant's migration scales. Methods in :mod:`qllm_core.methods` compose them."""
