"""A hook point inside attention, after RoPE and the cache update, before the softmax.

KV-cache quantization (methods.md section 1: K and V quantized after RoPE) and the FlatQuant /
QuaRot transforms of Q and K both need the post-RoPE states, which transformers does not expose.
We register an attention implementation ``qllm_sdpa`` that calls an optional
``module.qllm_qkv_hook(query, key, value) -> (query, key, value)`` and then PyTorch SDPA exactly as
transformers' ``sdpa`` implementation does, so with no hook attached outputs are unchanged.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .quant.quantizer import Quantizer

ATTN_IMPL = "qllm_sdpa"
HOOK_ATTR = "qllm_qkv_hook"


def _hooked_sdpa(module: nn.Module, query, key, value, attention_mask, **kwargs):
    hook = getattr(module, HOOK_ATTR, None)
    if hook is not None:
        query, key, value = hook(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def enable_attention_hooks(model: nn.Module) -> None:
    """Route the model's attention through ``qllm_sdpa`` (idempotent)."""
    AttentionInterface.register(ATTN_IMPL, _hooked_sdpa)
    AttentionMaskInterface.register(ATTN_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = ATTN_IMPL


def set_attention_hook(attention: nn.Module, hook: nn.Module) -> None:
    """Attach ``hook`` to one attention module (it becomes a submodule, so it is saved)."""
    setattr(attention, HOOK_ATTR, hook)


class KVQuantHook(nn.Module):
    """Fake-quantize K (after RoPE) and V per token and head, as they enter the KV cache.

    States arrive as ``(batch, kv_heads, tokens, head_dim)``, so the quantizer's last-dim groups
    are exactly one head of one token (methods.md: asymmetric, group = head).
    """

    def __init__(self, k_quantizer: Quantizer, v_quantizer: Quantizer):
        super().__init__()
        self.k_quantizer = k_quantizer
        self.v_quantizer = v_quantizer

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        return query, self.k_quantizer(key), self.v_quantizer(value)
