"""qllm_core: models, data, quantizers, the block-wise engine and the quantization methods."""
