"""Shared pieces of every method: the bit-width configuration and the default layer surgery.

:class:`QuantConfig` names the W/A/KV quantizers (methods.md section 1). :class:`QuantMethod` is
the engine's method protocol with the behaviour RTN needs: wrap each decoder linear in a
:class:`~qllm_core.quant.QuantLinear`, attach the KV-cache quantizer, and quantize the weights
by rounding to nearest. Other methods override ``prepare_model`` / ``build_layer`` /
``calibrate_layer``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from torch import nn

from ..adapters import INPUT_GROUPS, ModelAdapter
from ..attention import KVQuantHook, enable_attention_hooks, set_attention_hook
from ..engine import LayerContext, LayerGroup
from ..quant import OFF_BITS, QuantLinear, Quantizer, check_bits


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths and quantizer options. 16 bits means 'not quantized'.

    Defaults follow FlatQuant's scripts: symmetric per-channel weights, symmetric per-token
    activations, asymmetric per-head K/V. QLLM/OmniQuant use asymmetric weights and activations.
    """

    w_bits: int = OFF_BITS
    a_bits: int = OFF_BITS
    kv_bits: int = OFF_BITS
    w_asym: bool = False
    a_asym: bool = False
    kv_asym: bool = True
    w_group_size: int | None = None
    w_clip_ratio: float = 1.0
    a_clip_ratio: float = 1.0

    def __post_init__(self):
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        check_bits(self.kv_bits, "kv_bits")

    @property
    def label(self) -> str:
        """Paper-style label: W4A4KV4, W4A16, W8A8..."""
        kv = f"KV{self.kv_bits}" if self.kv_bits != OFF_BITS else ""
        return f"W{self.w_bits}A{self.a_bits}{kv}"

    def weight_quantizer(self, out_features: int, learnable_clip: bool = False) -> Quantizer:
        """Per-output-channel (or per-group) weight quantizer; learnable clipping is per channel."""
        if learnable_clip and self.w_group_size is not None:
            raise ValueError("learnable weight clipping is implemented per output channel, not per group")
        shape = (out_features, 1) if learnable_clip else None
        return Quantizer(self.w_bits, not self.w_asym, self.w_group_size, self.w_clip_ratio, shape)

    def act_quantizer(self, learnable_clip: bool = False) -> Quantizer:
        return Quantizer(self.a_bits, not self.a_asym, None, self.a_clip_ratio, () if learnable_clip else None)

    def kv_quantizer(self) -> Quantizer:
        return Quantizer(self.kv_bits, not self.kv_asym)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_options(method: str, defaults: dict, options: dict) -> dict:
    """``defaults`` updated by ``options``; an unknown name raises, so a typo never runs the default."""
    unknown = set(options) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {method} option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **options}


def quant_linears(layer: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, QuantLinear)}


class QuantMethod:
    """Round-to-nearest on every decoder linear + per-token activations + KV cache (the RTN method).

    Subclasses set ``name`` and override the hooks they need; ``options`` holds method-specific
    settings that are saved in the run's JSON.
    """

    name: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False
    tracks_quant_inputs: ClassVar[bool] = False
    layer_reads_quant_inputs: ClassVar[bool] = True  # see qllm_core.engine.LayerMethod
    layers_per_group: int = 1  # see calibrate_group
    # roles of linears whose per-channel FP input max |x| the engine records in its FP pass (ctx.fp_input_absmax)
    fp_input_roles: ClassVar[tuple[str, ...]] = ()
    # calibrate_layer reads nothing but the layer and its FP inputs/outputs: several layers may be calibrated at
    # once (calibrate_layers; the engine's concurrent_layers)
    independent_layers: bool = False

    def __init__(self, quant: QuantConfig, **options):
        self.quant = quant
        self.options = options
        # Keyword arguments for qllm_core.training.train_block (graph=..., compile_quantizers=...):
        # how a trained method's steps are executed, not what they compute; so not saved in the run.
        self.trainer: dict = {}

    @property
    def trains(self) -> bool:
        """Whether calibration trains parameters with qllm_core.training (what ``trainer`` applies to)."""
        return False

    def config(self) -> dict:
        return {"method": self.name, "quant": self.quant.to_dict(), "options": dict(self.options)}

    def prepare_model(self, model: nn.Module, adapter: ModelAdapter) -> None:
        enable_attention_hooks(model)

    def build_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter) -> None:
        """Replace the layer's linears by QuantLinear (one activation quantizer per input tensor) and
        attach the KV quantizer."""
        for roles in INPUT_GROUPS.values():
            act_quantizer = self.quant.act_quantizer()
            for role in roles:
                linear = adapter.linear(layer, role)
                adapter.set_linear(layer, role, QuantLinear(
                    linear, self.quant.weight_quantizer(linear.out_features), act_quantizer))
        if self.quant.kv_bits != OFF_BITS:
            set_attention_hook(adapter.attention(layer),
                               KVQuantHook(self.quant.kv_quantizer(), self.quant.kv_quantizer()))

    def calibrate_layer(self, layer: nn.Module, ctx: LayerContext | None) -> None:
        for qlinear in quant_linears(layer).values():
            qlinear.freeze_weight()

    def calibrate_layers(self, layers: list[tuple[nn.Module, LayerContext]]) -> None:
        """Calibrate several independent layers (``independent_layers``); one after the other here."""
        for layer, ctx in layers:
            self.calibrate_layer(layer, ctx)

    def calibrate_group(self, group: LayerGroup, ctx: LayerContext | None) -> None:
        """Joint step over ``layers_per_group`` calibrated layers (QLLM's error correction); none here."""
