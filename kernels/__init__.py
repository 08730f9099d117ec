"""Triton kernels for low-bit inference on Hopper (issue 6), each beside its PyTorch reference.

- kronecker: `kronecker_factors(n)` (the project's one definition) and the reference transform.
- transform_quant: kernel 1, fused Kronecker transform + per-token int4 quantization.
- w4_matmul: kernels 2-3, W4A4 GEMM (FP8 or int8 tensor cores) and the decode GEMV tiles, W4A16.
- w4_gemv: decode GEMV for 1-4 tokens on the CUDA cores, weights read as 32-bit words (issue 12; not yet timed).
- qlinear: `W4A4Linear`, the quantized linear layer used for inference.
- fp8_linear: `FP8W4A4Linear`, the same layer with its prefill GEMM on cuBLAS FP8 (`torch._scaled_mm`
  on int4 codes stored as e4m3, exact) and its decode on the packed-int4 GEMV (issue 12).
- llama_layer: a LLaMA decoder layer (bf16 / W4A4 / FlatQuant / QuaRot-style, and their -fp8 prefill
  variants) and a stack of them for benchmarks.
Importing the Triton modules needs `triton`; `kronecker` alone does not.
"""
from .kronecker import check_factors, kron_transform_ref, kronecker_factors

__all__ = ["check_factors", "kron_transform_ref", "kronecker_factors"]
