"""QLLM (ICLR 2024): adaptive channel reassembly + efficient low-rank error correction.

Per decoder layer (methods.md section 3; official ModelTC/QLLM ``quantize/qllm.py``):

1. **Reassembly** (Sec. 3.1-3.2, algorithms in :mod:`qllm_core.reassembly`) at three sites: the
   q/k/v input (input RMSNorm output), the gate/up input (post-attention RMSNorm output) and the
   down_proj input. Statistics come from the FP layer on the FP calibration inputs: per-channel
   max |x| over all tokens, activations of the first ``calibrate_bs`` windows for pair scores and
   the search. The search objective is the paper's: MSE between the quantized (act + weight)
   reassembled sub-layer output and the FP one — attention output before o_proj for the qkv site,
   ``act(gate(x)) * up(x)`` for gate/up, down_proj's output for down.
2. **Folding / inference cost.** The disassembly factors ``1/T_c`` are folded offline into the
   preceding RMSNorm weight (qkv, gate/up sites) or into up_proj's output rows (down site; exact,
   since ``act(g) * (u / T) = (act(g) * u) / T`` and per-row weight quantization is scale
   invariant). What stays online is index work only: the duplication of disassembled channels and
   the averaging of merged pairs (a gather of C elements plus r adds per token, fusable into the
   norm / the act-quant kernel; no extra GEMM, no extra weights). The official code applies the
   whole map online (``CRModule``: ``repeat_interleave`` + ``scatter_reduce``) and folds nothing.
3. **Efficient error correction** (Sec. 3.3): rank-``rank`` LoRA adapters on every quantized linear
   of the layer, trained with the official forward ``Q_a(x) @ (Q_w(W) + B A / rank)ᵀ``
   (``quantize/int_linear_lora.py``: lora_alpha = 1, A Kaiming-uniform, B zero) on the frozen
   quantized base — that forward bit for bit, with A's and B's gradients taken through the rank-r
   factors instead of the weight-sized weight gradient (:class:`_LowRankLinear`); AdamW (weight decay 0), linear LR decay, batch 1; input = the quantized
   model's layer inputs, target = the FP layer outputs (official: student on ``quant_inps``,
   teacher on ``fp_inps``). Afterwards ``B A / rank`` is merged into the *unquantized* weight and
   the sum is quantized, ``Q_w(W + B A / rank)``, as the official ``train_utils.lora_merge`` does
   (it adds the update to ``module.weight``, the FP weight its forward quantizes), so inference
   pays nothing. Re-quantizing ``Q_w(W) + B A / rank`` instead (this repo until 2026-11-27) rounds
   the sub-step update back onto ``Q_w(W)``'s grid and loses the correction
   (``reports/bench/qllm_ec_probe.json``).

Error correction trains groups of ``num_layer`` (paper: 4) consecutive layers jointly: the engine
reassembles each layer of a group (``calibrate_layer``), then hands the group to
``calibrate_group`` with the group's quantized inputs and the FP outputs of its last layer.

Deviations, stated: (a) OmniQuant-style learnable weight clipping (LWC) is not trained —
weights are plain asymmetric per-channel min/max RTN, activations asymmetric per-token
(``QuantConfig(w_asym=True, a_asym=True)``). (b) Error correction trains under bf16 autocast on
CUDA, as the official code (``torch.cuda.amp.autocast(dtype=torch.bfloat16)``); float32 on the CPU. (c) The official final layer norm tuning (``tune_last_ln``) lies outside the decoder layers
and is not done. (d) The search also evaluates "no reassembly" (see :mod:`qllm_core.reassembly`).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..adapters import ModelAdapter, get_path
from ..calib_stats import capture_inputs, input_channel_absmax
from ..engine import LayerContext, LayerGroup
from ..quant import QuantLinear, quantizers_off
from ..reassembly import ChannelReassembly, ReassemblyPlan, find_threshold
from ..training import BlockTraining, resolve_amp_dtype, train_block
from .base import QuantMethod, quant_linears, resolve_options

# Reassembly sites: the linears reading one input tensor (adapters.INPUT_GROUPS), o_proj excluded.
SITES: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}

DEFAULT_OPTIONS = {
    "reassembly": True,
    "error_correction": True,
    "channel_ratio": 0.2,  # scripts: --channel_ratio 0.2
    "rank": 4,  # paper Sec. 4: r = 4
    "lr": 5e-4,  # paper: 5e-4 (7B/13B), 1e-4 (70B); official llama-2-7b w4a4 script uses 1e-4
    "epochs": 10,
    "num_layer": 4,  # paper / scripts: 4 consecutive layers per error-correction group
    "batch_size": 1,
    "calibrate_bs": 1,  # windows whose activations feed pair scores and the theta search
    "max_candidates": None,  # None: every distinct count (paper); an int thins the sweep (smoke)
    "requantize": True,  # re-quantize the merged weights (False only for the fusion test)
    "amp_dtype": "bfloat16",  # error-correction autocast on CUDA (official); "float32" turns it off
    "seed": 0,
}


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


class LowRankDelta(nn.Module):
    """LoRA on a frozen quantized weight: the linear computes ``x · (W + B A · scaling)ᵀ + b``.

    ``fp_weight``: the unquantized weight the update is merged into at the end, kept on the host
    (one layer group's weights, not on the GPU during training).
    """

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator, like: torch.Tensor,
                 fp_weight: torch.Tensor):
        super().__init__()
        self.fp_weight = fp_weight
        a = torch.empty(rank, in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) bound, as nn.Linear/LoRA
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(like))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=like.dtype, device=like.device))
        self.scaling = 1.0 / rank  # lora_alpha = 1

    def update(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            return _LowRankLinear.apply(x, weight, self.lora_A, self.lora_B, self.scaling, bias, dtype)


class _LowRankLinear(torch.autograd.Function):
    """``x · (W + s·B A)ᵀ + b`` for a frozen ``W`` and ``b``, computed in ``dtype`` (the autocast dtype).

    Forward: the official adapter's (``quantize/int_linear_lora.py``), the operations autocast runs for
    ``F.linear(x, W + B @ A * s)``: ``B @ A`` in ``dtype``, added to the weight in its precision, the sum
    cast to ``dtype``, one GEMM. Backward: ``dx = dy · W'`` with the merged weight, and the adapters'
    gradients through their rank-r factors, ``dB = s·dyᵀ (x Aᵀ)`` and ``dA = s·(dy B)ᵀ x`` (in float32 at least),
    instead of autograd's route through the (out x in) weight gradient ``dyᵀ x`` reduced by A and B:
    equal in exact arithmetic, with a third fewer GEMM FLOPs per step and no weight-sized gradient
    tensors (LLaMA-2-70B: ~14 TFLOP and ~40 GB of float32 traffic per step of a 4-layer group, issue 11).
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, bias, dtype):
        update = lora_b.to(dtype) @ lora_a.to(dtype)  # in the autocast dtype, as autocast runs B @ A
        merged = torch.add(weight, update, alpha=scaling).to(dtype)
        ctx.x_dtype, x = x.dtype, x.to(dtype)
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(x, merged, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, merged, lora_a, lora_b = ctx.saved_tensors
        needs_x, needs_w, needs_a, needs_b, _, needs_bias, _ = ctx.needs_input_grad
        if needs_w or needs_bias:
            raise RuntimeError("the low-rank adapter trains A and B on a frozen weight and bias")
        grad_x = (grad_out @ merged).to(ctx.x_dtype) if needs_x else None
        acc = torch.promote_types(lora_a.dtype, torch.float32)  # float32, or the model's float64 in tests
        dy = grad_out.reshape(-1, grad_out.shape[-1]).to(acc)
        xs = x.reshape(-1, x.shape[-1]).to(acc)
        grad_b = (dy.t() @ (xs @ lora_a.to(acc).t())).mul_(ctx.scaling).to(lora_b.dtype) if needs_b else None
        grad_a = ((dy @ lora_b.to(acc)).t() @ xs).mul_(ctx.scaling).to(lora_a.dtype) if needs_a else None
        return grad_x, None, grad_a, grad_b, None, None, None


def attach_low_rank(qlinear: QuantLinear, rank: int, generator: torch.Generator) -> LowRankDelta:
    """Freeze ``qlinear``'s quantized weight and train a rank-``rank`` update on top of it."""
    fp_weight = qlinear.transformed_weight().detach().to("cpu", copy=True)
    qlinear.freeze_weight()
    qlinear.low_rank = LowRankDelta(qlinear.out_features, qlinear.in_features, rank, generator, qlinear.weight,
                                    fp_weight)
    return qlinear.low_rank


@torch.no_grad()
def fuse_low_rank(qlinear: QuantLinear, requantize: bool = True) -> None:
    """Merge the adapter into the weight: ``Q_w(W + B A / r)`` (official), or with ``requantize=False``
    the trained forward's ``Q_w(W) + B A / r`` (off the 4-bit grid: for the fusion test and the probe)."""
    delta, qlinear.low_rank = qlinear.low_rank, None
    if requantize:
        merged = delta.fp_weight.to(qlinear.weight.device, qlinear.weight.dtype) + delta.update()
        qlinear.weight.copy_(qlinear.weight_quantizer(merged))
    else:
        qlinear.weight.add_(delta.update())


class QLLMMethod(QuantMethod):
    """QLLM: channel reassembly (optional) + low-rank error correction (optional); see module doc."""

    name = "qllm"
    needs_calibration = True
    tracks_quant_inputs = True  # error correction trains a group on the quantized stream into it
    # the reassembly search works on FP statistics: no quantized stream through a group's earlier layers
    # (for a 4-layer group that is 3 whole-calibration-set layer passes saved)
    layer_reads_quant_inputs = False

    def __init__(self, quant, **options):
        merged = resolve_options("QLLM", DEFAULT_OPTIONS, options)
        for key in ("rank", "epochs", "batch_size", "calibrate_bs", "num_layer"):
            if not isinstance(merged[key], int) or merged[key] < (0 if key == "epochs" else 1):
                raise ValueError(f"QLLM option {key} must be a positive integer, got {merged[key]!r}")
        resolve_amp_dtype("QLLM", merged["amp_dtype"])  # a clear error for an unknown name
        super().__init__(quant, **merged)
        self.opt = merged
        self.layers_per_group = merged["num_layer"]

    @property
    def trains(self) -> bool:
        return self.opt["error_correction"] and self.opt["epochs"] > 0

    # -- structure -----------------------------------------------------------------------------
    def build_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter) -> None:
        super().build_layer(index, layer, adapter)
        if not self.opt["reassembly"]:
            return
        for roles in SITES.values():
            first = adapter.linear(layer, roles[0])
            transform = ChannelReassembly(first.in_features, first.weight.dtype)
            for role in roles:
                adapter.linear(layer, role).input_transform = transform

    # -- calibration ---------------------------------------------------------------------------
    def calibrate_layer(self, layer: nn.Module, ctx: LayerContext | None) -> None:
        """Per layer: the reassembly search (error correction waits for the layer's group)."""
        if ctx is None:
            raise ValueError("QLLM needs calibration data (a LayerContext)")
        self.search_log: dict[str, dict] = {}
        if self.opt["reassembly"]:
            self.reassemble(layer, ctx)

    def calibrate_group(self, group: LayerGroup, ctx: LayerContext | None) -> None:
        """Per group of ``num_layer`` reassembled layers: joint error correction, then frozen weights."""
        if self.trains:
            self.correct_errors(group, ctx)
        for qlinear in quant_linears(group).values():
            qlinear.freeze_weight()

    @torch.no_grad()
    def reassemble(self, layer: nn.Module, ctx: LayerContext) -> None:
        """Search, set and fold the reassembly of every site (statistics from the FP layer)."""
        adapter = ctx.adapter
        firsts = {site: adapter.linear(layer, roles[0]) for site, roles in SITES.items()}
        with quantizers_off(layer):
            absmax = input_channel_absmax(layer, ctx, firsts)
            features = capture_inputs(layer, ctx, firsts, ctx.fp_inputs[: self.opt["calibrate_bs"]])
        for site, roles in SITES.items():
            linears = [adapter.linear(layer, role) for role in roles]
            transform: ChannelReassembly = linears[0].input_transform
            x = features[site]
            with quantizers_off(layer):
                reference = site_output(layer, site, x, ctx)

            def objective(plan: ReassemblyPlan) -> torch.Tensor:  # left on the device: no sync per candidate
                transform.set_plan(plan)
                return F.mse_loss(site_output(layer, site, x, ctx), reference)

            weight = torch.cat([lin.weight for lin in linears]).detach()
            result = find_threshold(absmax[site], x, weight, objective, self.opt["channel_ratio"],
                                    self.opt["max_candidates"])
            transform.set_plan(result.plan)
            fold_scale(layer, site, transform, adapter)
            self.search_log[site] = {"theta": result.theta, "added": result.plan.num_added, "error": result.error,
                                     "baseline_error": result.baseline_error, "evaluated": result.evaluated}

    def correct_errors(self, layer: nn.Module, ctx: LayerContext) -> None:
        """Train LoRA adapters on the frozen quantized layer (group) against the FP outputs, then fuse them."""
        generator = torch.Generator().manual_seed(self.opt["seed"] * 100003 + ctx.index)
        qlinears = list(quant_linears(layer).values())
        grad_flags = {p: p.requires_grad for p in layer.parameters()}
        layer.requires_grad_(False)
        deltas = [attach_low_rank(q, self.opt["rank"], generator) for q in qlinears]
        params = [p for d in deltas for p in d.parameters()]
        inputs = ctx.quant_inputs if ctx.quant_inputs is not None else ctx.fp_inputs
        job = BlockTraining(
            name=f"QLLM error correction, layers from {ctx.index}", module=layer, kwargs=ctx.layer_kwargs,
            param_groups=[{"params": params, "lr": self.opt["lr"]}], inputs=inputs, targets=ctx.fp_outputs,
            epochs=self.opt["epochs"], batch_size=self.opt["batch_size"], weight_decay=0.0, shuffle=generator,
            scheduler=lambda opt, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total)),
            amp_dtype=resolve_amp_dtype("QLLM", self.opt["amp_dtype"]))
        self.train_stats = train_block(job, ctx.device, **self.trainer)
        self.train_log = self.train_stats.epoch_losses
        for q in qlinears:
            fuse_low_rank(q, self.opt["requantize"])
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)


def site_output(layer: nn.Module, site: str, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """The sub-layer output QLLM's threshold search compares (official ``CRModule.compute_output``)."""
    adapter = ctx.adapter
    if site == "qkv":
        return attention_core(layer, x, ctx)
    if site == "gate_up":
        mlp = get_path(layer, adapter.spec.gate_proj.rpartition(".")[0])  # the module holding act_fn
        return mlp.act_fn(adapter.linear(layer, "gate_proj")(x)) * adapter.linear(layer, "up_proj")(x)
    if site == "down":
        return adapter.linear(layer, "down_proj")(x)
    raise KeyError(f"unknown reassembly site {site!r}; expected one of {sorted(SITES)}")


def attention_core(layer: nn.Module, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """softmax(QKᵀ)V of the layer's attention for normed input ``x`` — the o_proj input."""
    attention = ctx.adapter.attention(layer)
    o_proj = ctx.adapter.linear(layer, "o_proj")
    kwargs = {k: v for k, v in ctx.layer_kwargs.items() if k in ("position_embeddings", "attention_mask", "position_ids")}
    outs = []

    def grab(_module, args):
        outs.append(args[0])
        raise _Stop

    handle = o_proj.register_forward_pre_hook(grab)
    try:
        for i in range(x.shape[0]):
            try:
                attention(hidden_states=x[i : i + 1], **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(outs)


@torch.no_grad()
def fold_scale(layer: nn.Module, site: str, transform: ChannelReassembly, adapter: ModelAdapter) -> None:
    """Fold the ``1/T_c`` factors into the preceding RMSNorm (qkv, gate_up) or up_proj rows (down)."""
    scale = transform.scale
    if site == "qkv":
        norm = adapter.input_norm(layer)
        norm.weight.mul_(scale.to(norm.weight))
    elif site == "gate_up":
        norm = adapter.post_attention_norm(layer)
        norm.weight.mul_(scale.to(norm.weight))
    else:
        up = adapter.linear(layer, "up_proj")
        up.weight.mul_(scale.to(up.weight)[:, None])
        if up.bias is not None:
            up.bias.mul_(scale.to(up.bias))
    transform.scale.fill_(1.0)
