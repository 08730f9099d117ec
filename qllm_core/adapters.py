"""Model-family adapters: where the decoder layers, norms and projections live.

The algorithms never hard-code attribute paths; they ask a :class:`ModelAdapter`. A family is
described by a :class:`FamilySpec` (dotted attribute paths). LLaMA-1/2/3 (GQA included),
Mistral and Qwen2 share the same module layout in transformers 5.x; Qwen2 adds biases on
q/k/v, which every method here handles because it works on ``nn.Linear`` modules.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedModelError(ValueError):
    """Raised for a model family without an adapter."""


@dataclass(frozen=True)
class FamilySpec:
    """Dotted attribute paths of one model family (relative to the CausalLM / a decoder layer)."""

    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"


LLAMA_LAYOUT = FamilySpec()
FAMILIES: dict[str, FamilySpec] = {"llama": LLAMA_LAYOUT, "mistral": LLAMA_LAYOUT, "qwen2": LLAMA_LAYOUT}

LINEAR_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Linear layers that read the same input tensor (methods place one transform per group).
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


def get_path(root: nn.Module, dotted: str) -> nn.Module:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, dotted: str, value: nn.Module) -> None:
    parent_path, _, leaf = dotted.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, leaf, value)


class ModelAdapter:
    """Uniform access to a supported causal LM's decoder structure."""

    def __init__(self, model: nn.Module):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in FAMILIES:
            raise UnsupportedModelError(
                f"unsupported model family {model_type!r}; supported: {sorted(FAMILIES)}. "
                "Add a FamilySpec to qllm_core.adapters.FAMILIES if its layout matches LLaMA's."
            )
        self.model = model
        self.family = model_type
        self.spec = FAMILIES[model_type]
        cfg = model.config
        self.hidden_size: int = cfg.hidden_size
        self.intermediate_size: int = cfg.intermediate_size
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    # -- model level -------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return get_path(self.model, self.spec.layers)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return get_path(self.model, self.spec.embed)

    @property
    def final_norm(self) -> nn.Module:
        return get_path(self.model, self.spec.final_norm)

    @property
    def lm_head(self) -> nn.Linear:
        return get_path(self.model, self.spec.lm_head)

    @property
    def rotary_emb(self) -> nn.Module:
        return get_path(self.model, self.spec.rotary)

    # -- layer level -------------------------------------------------------------------------
    def linear(self, layer: nn.Module, role: str) -> nn.Module:
        """The projection ``role`` (one of LINEAR_ROLES) of a decoder layer."""
        return get_path(layer, self._role_path(role))

    def set_linear(self, layer: nn.Module, role: str, module: nn.Module) -> None:
        set_path(layer, self._role_path(role), module)

    def linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {role: self.linear(layer, role) for role in LINEAR_ROLES}

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return get_path(layer, self.spec.input_norm)

    def post_attention_norm(self, layer: nn.Module) -> nn.Module:
        return get_path(layer, self.spec.post_attention_norm)

    def attention(self, layer: nn.Module) -> nn.Module:
        return get_path(layer, self.spec.attention)

    def _role_path(self, role: str) -> str:
        if role not in LINEAR_ROLES:
            raise KeyError(f"unknown linear role {role!r}; expected one of {LINEAR_ROLES}")
        return getattr(self.spec, role)

