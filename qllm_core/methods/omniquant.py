"""OmniQuant's learnable weight clipping (LWC; Shao et al., ICLR 2024, section 3.2), block-wise.

Each weight quantizer learns per-output-channel clipping logits γ, β (effective range
σ(γ)·max W, σ(β)·min W for asymmetric weights; σ(γ)·max|W| for symmetric), initialised at 4.0
(OmniQuant's ``init_value``). Per decoder layer the logits are trained with AdamW to minimise the
MSE between the quantized layer's output on the inputs produced by the already-quantized layers
(``ctx.quant_inputs``, OmniQuant's ``quant_inps``) and the FP layer's output on the FP inputs
(``ctx.fp_outputs``), with activation and KV quantizers active; then the weights are frozen.

Defaults follow OmniQuant's code/scripts: ``lwc_lr`` 1e-2, weight decay 0, 20 epochs (its W4A4
LLaMA scripts; W4A16 uses 20 as well), batch size 1, fp16 autocast with loss scaling on CUDA
(its ``torch.cuda.amp.autocast()`` + ``NativeScalerWithGradNormCount``; float32 on the CPU). Only LWC is implemented; OmniQuant's
learnable equivalent transformation (LET) is not, so at W4A4 this baseline is weaker than the
full OmniQuant numbers in the papers' tables (they use LWC+LET).
"""
from __future__ import annotations

from torch import nn

from ..adapters import LINEAR_ROLES, ModelAdapter
from ..engine import LayerContext
from ..quant import QuantLinear
from ..training import BlockTraining, resolve_amp_dtype, train_block
from .base import QuantConfig, QuantMethod, quant_linears


def clip_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The learnable clipping logits of every weight quantizer in ``layer``."""
    return [p for q in quant_linears(layer).values() for p in q.weight_quantizer.parameters()]


class OmniQuantLWCMethod(QuantMethod):
    """Options: ``epochs`` (20), ``lr`` (1e-2), ``weight_decay`` (0.0), ``batch_size`` (1), ``amp_dtype``
    ("float16"; "float32" turns autocast off)."""

    name = "omniquant"
    needs_calibration = True
    tracks_quant_inputs = True

    def __init__(self, quant: QuantConfig, epochs: int = 20, lr: float = 1e-2, weight_decay: float = 0.0,
                 batch_size: int = 1, amp_dtype: str = "float16"):
        if epochs < 0 or batch_size < 1 or lr <= 0:
            raise ValueError(f"OmniQuant needs epochs >= 0, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
        resolve_amp_dtype("OmniQuant", amp_dtype)  # a clear error for an unknown name
        super().__init__(quant, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                         amp_dtype=amp_dtype)

    @property
    def trains(self) -> bool:
        return self.options["epochs"] > 0

    def build_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter) -> None:
        super().build_layer(index, layer, adapter)
        for role in LINEAR_ROLES:
            qlinear: QuantLinear = adapter.linear(layer, role)
            qlinear.weight_quantizer = self.quant.weight_quantizer(qlinear.out_features, learnable_clip=True)

    def calibrate_layer(self, layer: nn.Module, ctx: LayerContext | None) -> None:
        params = clip_parameters(layer)
        if params and self.options["epochs"] > 0:
            self._train(layer, ctx, params)
        super().calibrate_layer(layer, ctx)

    def _train(self, layer: nn.Module, ctx: LayerContext, params: list[nn.Parameter]) -> None:
        trainable = {id(p) for p in params}
        saved = {name: p.requires_grad for name, p in layer.named_parameters()}
        for p in layer.parameters():
            p.requires_grad_(id(p) in trainable)
        job = BlockTraining(
            name=f"OmniQuant layer {ctx.index}", module=layer, kwargs=ctx.layer_kwargs,
            param_groups=[{"params": params, "lr": self.options["lr"]}], inputs=ctx.quant_inputs,
            targets=ctx.fp_outputs, epochs=self.options["epochs"], batch_size=self.options["batch_size"],
            weight_decay=self.options["weight_decay"],
            amp_dtype=resolve_amp_dtype("OmniQuant", self.options["amp_dtype"]))
        try:
            self.train_stats = train_block(job, ctx.device, **self.trainer)
        finally:
            for name, p in layer.named_parameters():
                p.requires_grad_(saved[name])
