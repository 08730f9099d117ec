"""FlatQuant (Sun et al., ICML 2025): learnable Kronecker affine transforms, calibrated block-wise.

Placement in a LLaMA decoder layer (methods.md section 2; official code model_tools/llama_utils.py):

1. ``ln``: Kronecker transform (+ per-channel scale) on the q/k/v input (after input RMSNorm);
2. ``o``: o_proj input transform P_heads ⊗ P_v: P_heads (num_heads²) is applied online, the
   per-head P_v (head_dim²) is merged into v_proj's output rows, so the V cache holds v·P_v;
3. ``k``: K-cache transform P_k (head_dim²): K ← K·P_k, Q ← Q·P_k⁻ᵀ after RoPE (QKᵀ unchanged),
   K/V quantized after it (attention hook);
4. ``up``: Kronecker transform (+ scale) on the gate/up input (after post-attention RMSNorm);
5. ``down``: Kronecker transform (+ scale) on the down_proj input.

Weights get P⁻ᵀ (and the scale) merged; activations are transformed online and quantized per token
(learnable clipping: LWC per output channel for weights, LAC one logit per activation quantizer,
also used for the K/V quantizers as in the official code's ``--lac``).

Calibration (``calibrate_layer``; ``calibrate_layers`` trains several at once): each block is trained on the
FP block inputs ``ctx.fp_inputs`` with the FP block outputs as targets, MSE loss normalised as
loss / loss.detach() (methods.md),
AdamW with ``flat_lr`` for transforms and scales and 10x for clipping logits, cosine decay to
``flat_lr``·1e-3 over epochs·(nsamples // batch_size) steps, autocast (fp16 by default, as the paper
does for LLaMA) on CUDA and fp32 on CPU. The per-channel scale is initialised SmoothQuant-style
(α = 0.3) from FP activation maxima and weight column maxima. Afterwards everything is
*materialised*: scales are merged into the RMSNorm weights (qkv, gate/up) and up_proj rows (down),
factors are computed in float64, P_v merged into v_proj/o_proj, and each linear's weight becomes
Q_w(W·P⁻ᵀ) (RTN, or GPTQ with ``weight_quantizer="gptq"``). ``build_layer`` creates exactly that
frozen form (identity placeholders), so a saved run reloads with ``load_state_dict(strict=True)``.

Where this differs from the official code: the official weight side during calibration and
after materialisation both use U·diag(1/σ)·Vᵀ; here materialisation inverts the stored matrices in
float64 (see qllm_core.transforms.kronecker), which is the same matrix up to round-off. v_proj with
a bias (Qwen2) is not supported (the V transform would also have to rotate the bias online during
calibration) and raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import INPUT_GROUPS, ModelAdapter
from ..algorithms.gptq import gptq_quantize_layer
from ..algorithms.smoothing import smoothing_scales, weight_column_absmax
from ..attention import enable_attention_hooks, set_attention_hook
from ..engine import LayerContext
from ..gpu_monitor import timed
from ..quant import OFF_BITS, QuantLinear, Quantizer
from ..transforms.kronecker import KroneckerTransform, factor_sizes, inverse_transpose
from ..training import BlockTraining, resolve_amp_dtype, train_block, train_blocks
from ..transforms.learnable import HeadOutputTransform, LayerFactors, LearnableFactor, LearnableKronecker
from .base import QuantMethod, quant_linears, resolve_options

# Paper / official script defaults (methods.md section 2, "Calibration" and "Script defaults").
DEFAULTS = {
    "epochs": 15,
    "flat_lr": 5e-3,
    "clip_lr_mult": 10.0,
    "batch_size": 4,
    "lwc": True,
    "lac": True,
    "cali_trans": True,
    "add_diag": True,
    "diag_alpha": 0.3,
    "direct_inv": False,
    "amp_dtype": "float16",  # CUDA only; "bfloat16" for non-LLaMA families in the official code
    "weight_quantizer": "rtn",  # or "gptq" (after the transforms are fused)
    "seed": 0,
}
GROUP_SITES = {"qkv": ("q_proj", "k_proj", "v_proj"), "up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


class FlatQuantKVHook(nn.Module):
    """Post-RoPE hook: Q ← Q·P_k⁻ᵀ, K ← Q_kv(K·P_k), V ← Q_kv(V) (V already carries P_v).

    Frozen form: buffers ``key_matrix`` = P_k and ``query_matrix`` = P_k⁻ᵀ (float64-inverted at
    materialisation). During calibration ``learnable`` holds the trainable factor instead.
    """

    def __init__(self, head_dim: int, k_quantizer: Quantizer, v_quantizer: Quantizer):
        super().__init__()
        self.k_quantizer = k_quantizer
        self.v_quantizer = v_quantizer
        self.register_buffer("key_matrix", torch.eye(head_dim))
        self.register_buffer("query_matrix", torch.eye(head_dim))
        self.learnable: LearnableFactor | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if self.learnable is not None:
            key_m, query_m = self.learnable.matrix(), self.learnable.inverse_t()
        else:
            key_m, query_m = self.key_matrix, self.query_matrix
        query = query @ query_m.to(query.dtype)
        key = self.k_quantizer(key @ key_m.to(key.dtype))
        return query, key, self.v_quantizer(value)

    @torch.no_grad()
    def load_matrix(self, key_matrix: torch.Tensor) -> None:
        self.key_matrix.copy_(key_matrix)
        self.query_matrix.copy_(inverse_transpose(self.key_matrix))  # inverse of what is stored


class LayerTransforms(nn.Module):
    """The learnable transforms of one decoder layer (calibration only; never saved)."""

    def __init__(self, adapter: ModelAdapter, scales: dict[str, torch.Tensor | None], with_k: bool,
                 generator: torch.Generator, direct_inv: bool):
        super().__init__()

        def factor(n: int) -> LearnableFactor:
            return LearnableFactor(n, generator, direct_inv)

        def kron(n: int, scale) -> LearnableKronecker:
            n1, n2 = factor_sizes(n)
            return LearnableKronecker(factor(n1), factor(n2), scale)

        self.ln = kron(adapter.hidden_size, scales["qkv"])
        self.up = kron(adapter.hidden_size, scales["up"])
        self.down = kron(adapter.intermediate_size, scales["down"])
        self.v = factor(adapter.head_dim)
        self.o = LearnableKronecker(factor(adapter.num_heads), self.v, None, online_right=False)
        self.k = factor(adapter.head_dim) if with_k else None

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer group: factors and scales."""
        scales = [m.scale for m in (self.ln, self.up, self.down) if m.scale is not None]
        ids = {id(p) for p in scales}
        return {"factors": [p for p in self.parameters() if id(p) not in ids], "scales": scales}


def _clip_logits(layer: nn.Module) -> list[nn.Parameter]:
    return [p for m in layer.modules() if isinstance(m, Quantizer)
            for p in (m.clip_max_logit, m.clip_min_logit) if p is not None]


@dataclass
class _LayerCalibration:
    """One layer between :meth:`FlatQuantMethod._begin` and :meth:`FlatQuantMethod._finish`."""

    layer: nn.Module
    ctx: LayerContext
    linears: dict[str, QuantLinear]
    hook: FlatQuantKVHook | None
    trans: LayerTransforms
    frozen: dict[str, nn.Module]
    job: BlockTraining | None


class FlatQuantMethod(QuantMethod):
    """FlatQuant W/A/KV quantization (module docstring). Options: see :data:`DEFAULTS`."""

    name = "flatquant"
    needs_calibration = True
    tracks_quant_inputs = False
    fp_input_roles = tuple(roles[0] for roles in GROUP_SITES.values())  # add_diag's max|X| (_initial_scales)

    def __init__(self, quant, **options):
        self.settings = resolve_options("FlatQuant", DEFAULTS, options)
        super().__init__(quant, **options)
        if self.settings["weight_quantizer"] not in ("rtn", "gptq"):
            raise ValueError(f"weight_quantizer must be 'rtn' or 'gptq', got {self.settings['weight_quantizer']!r}")
        resolve_amp_dtype("FlatQuant", self.settings["amp_dtype"])  # a clear error for an unknown name
        if self.settings["batch_size"] < 1 or self.settings["epochs"] < 0:
            raise ValueError("batch_size must be >= 1 and epochs >= 0")
        # GPTQ wants Hessians of the inputs the quantized model actually sees; without it each block trains on
        # its own FP inputs and targets alone, so layers may calibrate concurrently.
        self.tracks_quant_inputs = self.settings["weight_quantizer"] == "gptq"
        self.independent_layers = not self.tracks_quant_inputs
        self.phase_seconds: dict[str, float] = {}  # where calibrate_layer(s) spent its wall time (_calibrate)

    @property
    def trains(self) -> bool:
        return self.settings["epochs"] > 0

    # -- structure (deterministic; recreated when a run is loaded) --------------------------------
    def prepare_model(self, model: nn.Module, adapter: ModelAdapter) -> None:
        enable_attention_hooks(model)

    def build_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter) -> None:
        """Wrap the linears with QuantLinear + frozen transforms (identity until calibrated)."""
        v_proj = adapter.linear(layer, "v_proj")
        if getattr(v_proj, "bias", None) is not None:
            raise NotImplementedError("FlatQuant here needs v_proj without bias (the V-cache transform is merged "
                                      "into v_proj rows); this model's v_proj has a bias")
        keep = self.settings["add_diag"]
        dtype = v_proj.weight.dtype  # matrices are stored in the model's dtype; inverses come from them
        ln = KroneckerTransform.for_features(adapter.hidden_size, keep_scale=keep)
        up = KroneckerTransform.for_features(adapter.hidden_size, keep_scale=keep)
        down = KroneckerTransform.for_features(adapter.intermediate_size, keep_scale=keep)
        o = KroneckerTransform(adapter.num_heads, adapter.head_dim, online_right=False)
        site_transforms = {"qkv": ln, "o": o, "gate_up": up, "down": down}
        for site, transform in site_transforms.items():
            transform.to(dtype)
            act_quantizer = self.quant.act_quantizer(self.settings["lac"])  # one LAC per transform, as official
            for role in INPUT_GROUPS[site]:
                linear = adapter.linear(layer, role)
                adapter.set_linear(layer, role, QuantLinear(
                    linear, self.quant.weight_quantizer(linear.out_features, self.settings["lwc"]), act_quantizer,
                    transform))
        if self.quant.kv_bits != OFF_BITS:
            clip = () if self.settings["lac"] else None
            kv = [Quantizer(self.quant.kv_bits, not self.quant.kv_asym, learnable_clip_shape=clip) for _ in range(2)]
            set_attention_hook(adapter.attention(layer), FlatQuantKVHook(adapter.head_dim, *kv).to(dtype))

    # -- calibration ---------------------------------------------------------------------------
    def calibrate_layer(self, layer: nn.Module, ctx: LayerContext | None) -> None:
        self._calibrate([(layer, ctx)], lambda jobs, device: [train_block(jobs[0], device, **self.trainer)])

    def calibrate_layers(self, layers: list[tuple[nn.Module, LayerContext]]) -> None:
        """Train the layers' transforms together (:func:`~qllm_core.training.train_blocks`): each block trains on
        its own FP inputs and targets, so the layers are independent (with GPTQ weights they are not:
        ``independent_layers`` is off then)."""
        self._calibrate(layers, lambda jobs, device: train_blocks(jobs, device, **self.trainer))

    def _calibrate(self, layers: list[tuple[nn.Module, LayerContext | None]], train) -> None:
        """Set up, train (``train(jobs, device)`` -> their TrainingStats) and materialise ``layers``, adding each
        part's wall time to ``phase_seconds`` (setup / train, of which capture / finish)."""
        if any(ctx is None for _, ctx in layers):
            raise ValueError("FlatQuant needs calibration data (ctx is None)")
        device = layers[0][1].device
        with timed(self.phase_seconds, "setup", device):
            calibrations = [self._begin(layer, ctx) for layer, ctx in layers]
        jobs = [c.job for c in calibrations if c.job is not None]
        if jobs:
            with timed(self.phase_seconds, "train", device):
                stats = train(jobs, device)
            self.train_stats = stats[-1]
            self.phase_seconds["capture"] = self.phase_seconds.get("capture", 0.0) + sum(
                s.capture_seconds for s in stats)
        with timed(self.phase_seconds, "finish", device):
            for calibration in calibrations:
                self._finish(calibration)

    def _begin(self, layer: nn.Module, ctx: LayerContext) -> _LayerCalibration:
        """Initial scales, learnable transforms swapped in, the training job (None when nothing trains)."""
        adapter, device = ctx.adapter, ctx.device
        linears = {role: adapter.linear(layer, role) for sites in GROUP_SITES.values() for role in sites}
        linears["o_proj"] = adapter.linear(layer, "o_proj")
        hook = getattr(adapter.attention(layer), "qllm_qkv_hook", None)
        for p in layer.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(self.settings["seed"] * 100_003 + ctx.index)
        trans = LayerTransforms(adapter, self._initial_scales(ctx, linears), hook is not None, generator,
                                self.settings["direct_inv"]).to(device)
        frozen = self._attach(layer, linears, hook, trans)
        return _LayerCalibration(layer, ctx, linears, hook, trans, frozen, self._job(layer, ctx, trans))

    def _finish(self, c: _LayerCalibration) -> None:
        """After training: gradients off, transforms materialised into the frozen form, weights quantized."""
        if c.job is not None:
            for group in c.job.param_groups:
                for p in group["params"]:
                    p.requires_grad_(False)
        self._materialise(c.layer, c.ctx.adapter, c.linears, c.hook, c.trans, c.frozen)
        if self.settings["weight_quantizer"] == "gptq":
            gptq_quantize_layer(c.layer, c.ctx)
        for qlinear in quant_linears(c.layer).values():
            qlinear.freeze_weight()

    @torch.no_grad()
    def _initial_scales(self, ctx, linears) -> dict[str, torch.Tensor | None]:
        """add_diag init: s = max|X|^α / max|W|^(1-α) per input channel, FP statistics (α = 0.3).

        max|X| comes from the engine's FP pass (``fp_input_roles``), which runs the same FP layer over the same
        windows: no second pass over the calibration set (the embedded model's paper-settings W4A4KV4 run alone on an
        H100: 91.2 s -> 86.6 s, reports/bench/gpu_session_H100_stop23.json).
        """
        if not self.settings["add_diag"]:
            return dict.fromkeys(GROUP_SITES)
        missing = [role for role in self.fp_input_roles if role not in ctx.fp_input_absmax]
        if missing:
            raise ValueError(f"FlatQuant's add_diag needs the FP input maxima of {missing} (LayerContext."
                             "fp_input_absmax, recorded by the engine's FP pass for fp_input_roles)")
        return {site: smoothing_scales(ctx.fp_input_absmax[roles[0]],
                                       weight_column_absmax([linears[r].weight for r in roles]).cpu(),
                                       self.settings["diag_alpha"]).float().clamp(min=1e-5)
                for site, roles in GROUP_SITES.items()}

    @staticmethod
    def _attach(layer, linears, hook, trans: LayerTransforms) -> dict[str, nn.Module]:
        """Swap the learnable transforms in; return the frozen ones to restore afterwards."""
        frozen = {role: q.input_transform for role, q in linears.items()}
        learnable = {"q_proj": trans.ln, "k_proj": trans.ln, "v_proj": HeadOutputTransform(trans.ln, trans.v),
                     "o_proj": trans.o, "gate_proj": trans.up, "up_proj": trans.up, "down_proj": trans.down}
        for role, module in learnable.items():
            linears[role].input_transform = module
        if hook is not None:
            hook.learnable = trans.k
        return frozen

    def _job(self, layer: nn.Module, ctx: LayerContext, trans: LayerTransforms) -> BlockTraining | None:
        """The layer's training (parameters switched to trainable), or None when nothing is trained."""
        s = self.settings
        bsz = min(s["batch_size"], ctx.fp_inputs.shape[0])
        groups = []
        parts = trans.groups()
        if s["cali_trans"]:
            groups.append({"params": parts["factors"], "lr": s["flat_lr"]})
        if parts["scales"]:
            groups.append({"params": parts["scales"], "lr": s["flat_lr"]})
        clips = _clip_logits(layer)
        if clips:
            groups.append({"params": clips, "lr": s["flat_lr"] * s["clip_lr_mult"]})
        if not groups:
            return None
        trans.requires_grad_(False)  # untrained parts (cali_trans off) need no gradients
        for group in groups:
            for p in group["params"]:
                p.requires_grad_(True)
        return BlockTraining(
            name=f"FlatQuant layer {ctx.index}", module=layer, kwargs=ctx.layer_kwargs, param_groups=groups,
            inputs=ctx.fp_inputs, targets=ctx.fp_outputs, epochs=s["epochs"], batch_size=bsz, drop_last=True,
            scheduler=lambda opt, total: torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=total, eta_min=s["flat_lr"] * 1e-3),
            amp_dtype=resolve_amp_dtype("FlatQuant", s["amp_dtype"]), normalise_loss=True,
            forward_context=LayerFactors(trans).cached)  # each Cayley factor once per step, batched

    @staticmethod
    @torch.no_grad()
    def _materialise(layer, adapter, linears, hook, trans: LayerTransforms, frozen) -> None:
        """Merge scales and P_v in float64, load float64 factors into the frozen transforms."""
        merges = {"qkv": adapter.input_norm(layer), "up": adapter.post_attention_norm(layer),
                  "down": linears["up_proj"]}
        for site, kron in (("qkv", trans.ln), ("up", trans.up), ("down", trans.down)):
            scale = None if kron.scale is None else kron.scale.double()
            if scale is not None:
                _assign(merges[site].weight, _rows_divided(merges[site].weight.double(), scale))
                if getattr(merges[site], "bias", None) is not None:
                    _assign(merges[site].bias, merges[site].bias.double() / scale)
                for role in GROUP_SITES[site]:
                    _assign(linears[role].weight, linears[role].weight.double() * scale)
            frozen[GROUP_SITES[site][0]].load_matrices(kron.left.materialise(), kron.right.materialise(), scale)
        p_v = trans.v.materialise()
        v_w = linears["v_proj"].weight.double()
        heads = v_w.reshape(-1, p_v.shape[0], v_w.shape[-1])
        _assign(linears["v_proj"].weight, (p_v.mT @ heads).reshape(v_w.shape))
        o_w = linears["o_proj"].weight.double()
        o_heads = o_w.reshape(o_w.shape[0], -1, p_v.shape[0])
        _assign(linears["o_proj"].weight, (o_heads @ inverse_transpose(p_v)).reshape(o_w.shape))
        frozen["o_proj"].load_matrices(trans.o.left.materialise())
        for role, module in frozen.items():
            linears[role].input_transform = module
        if hook is not None:
            hook.load_matrix(trans.k.materialise())
            hook.learnable = None


def _rows_divided(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Divide a norm weight (n,) or a linear's output rows (n, in) by ``scale`` (n,)."""
    return weight / (scale if weight.dim() == 1 else scale[:, None])


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))
