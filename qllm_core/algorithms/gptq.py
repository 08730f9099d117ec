"""GPTQ (Frantar et al., ICLR 2023): second-order weight quantization from calibration inputs.

For a linear layer with calibration inputs X, GPTQ minimises ||W·Xᵀ − Q·Xᵀ||² column by column:
after quantizing column i it spreads the rounding error over the not-yet-quantized columns using
the inverse Hessian H⁻¹ (H = 2·XᵀX/N), through its upper Cholesky factor (paper Algorithm 1).
Implemented here with the paper's options: lazy batch updates (``blocksize`` columns at a time),
dampening ``percdamp``·mean(diag H), and act order (columns by decreasing diag H).

Scales follow a :class:`~qllm_core.quant.Quantizer`'s settings (bits, symmetric, group size, clip
ratio or learned clip). Per-channel scales come from the original weight, as in GPTQ's code.
With groups, a group's scale is computed from the (error-updated) weights when the algorithm
reaches the group's first column (GPTQ's default); with act order and groups we use static groups
(scales from the original weight, GPTQ's ``--static-groups``) so that every group keeps contiguous
columns of the original order.
"""
from __future__ import annotations

import torch
from torch import nn

from ..engine import LayerContext
from ..quant import QuantLinear, Quantizer
from ..quant.quantizer import quant_params


class HessianAccumulator:
    """Running GPTQ Hessians H = 2/N·Σ xᵀx of the inputs of several modules (forward pre-hooks).

    Use as a context manager around forward passes; ``hessians[name]`` is (in, in) float32.
    Names that share one module (q/k/v share their activation quantizer) share one Hessian, and a
    module called several times on the same tensor in a row (once per linear it feeds) counts it once.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._names: dict[int, tuple[nn.Module, list[str]]] = {}
        for name, module in modules.items():
            self._names.setdefault(id(module), (module, []))[1].append(name)
        self._handles: list = []

    def _hook(self, names: list[str]):
        last = [None]  # the tensor seen last; kept referenced so its id cannot be reused

        def hook(_module, args):
            if args[0] is last[0]:
                return
            last[0] = args[0]
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            n_old, n_new = self.counts.get(names[0], 0), x.shape[0]
            total = n_old + n_new
            h = self.hessians.get(names[0])
            update = (2.0 / total) * (x.T @ x)
            h = update if h is None else h * (n_old / total) + update
            for name in names:
                self.hessians[name], self.counts[name] = h, total
        return hook

    def __enter__(self) -> "HessianAccumulator":
        self._handles = [m.register_forward_pre_hook(self._hook(names)) for m, names in self._names.values()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _params(w: torch.Tensor, quantizer: Quantizer):
    """Scale/zero/range of ``w``'s rows (groups along the last dim) under ``quantizer``'s clip."""
    cmax, cmin = quantizer.clip_factors()
    if torch.is_tensor(cmax):
        cmax = cmax.detach().to(w)
        cmin = None if cmin is None else cmin.detach().to(w)
    return quant_params(w, quantizer.bits, quantizer.symmetric, cmax, cmin)


def _round(col: torch.Tensor, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    q = torch.clamp(torch.round(col / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def _quantize_column(w1, hinv1, q1, err1, i: int, scale, zero, qmin: int, qmax: int) -> None:
    """Column ``i`` of a block (paper Algorithm 1, inner loop), in place: its quantized values into ``q1``, its
    error scaled by the inverse Hessian's diagonal into ``err1``, and the error's correction of the block's later
    columns into ``w1``."""
    qcol = _round(w1[:, i:i + 1], scale, zero, qmin, qmax).squeeze(1)
    q1[:, i] = qcol
    err = (w1[:, i] - qcol) / hinv1[i, i]
    w1[:, i:] -= err[:, None] @ hinv1[i:i + 1, i:]
    err1[:, i] = err


def _quantize_columns(w1, hinv1, q1, err1, scale, zero, qmin: int, qmax: int) -> None:
    for i in range(w1.shape[1]):
        _quantize_column(w1, hinv1, q1, err1, i, scale, zero, qmin, qmax)


def _quantize_block_eagerly(w1, hinv1, q1, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """:func:`_quantize_block` without a graph: the column loop launched op by op."""
    err1 = torch.zeros_like(w1)
    _quantize_columns(w1, hinv1, q1, err1, scale, zero, qmin, qmax)
    return err1


# Captured block loops, by (device, rows, block width, dtype, integer range): (graph, static tensors). Every
# decoder layer has the same linear shapes, so a run captures a few graphs at its first layer and replays them.
_BLOCK_GRAPHS: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}


def _quantize_block(w1, hinv1, q1, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """One block of columns with per-channel scales: fills ``q1`` and returns the block's scaled errors.

    On a GPU the block's loop is replayed from a CUDA graph: eagerly it launches ~8 small kernels per column (a
    decoder layer of the embedded model has 5568 input columns over its seven linears), and GPTQ runs were the
    slowest per layer with 8 runs sharing an H200 (19 s, the stop-24 grid's last run). Alone on an H200,
    QuaRot+GPTQ's layers took 1.93 s with the graph against 2.86 s eagerly (stop 19; not a clean A/B:
    reports/bench/gpu_session_H200_stop24.json). The replay runs the same kernels on the same values: the
    result is the eager loop's, bit for bit (tested on the GPU)."""
    if w1.device.type != "cuda":
        return _quantize_block_eagerly(w1, hinv1, q1, scale, zero, qmin, qmax)
    key = (w1.device, *w1.shape, w1.dtype, qmin, qmax)
    if key not in _BLOCK_GRAPHS:
        _BLOCK_GRAPHS[key] = _capture_block(w1, hinv1, scale, zero, qmin, qmax)
    graph, static = _BLOCK_GRAPHS[key]
    for name, value in (("w1", w1), ("hinv1", hinv1), ("scale", scale), ("zero", zero)):
        static[name].copy_(value)
    graph.replay()
    q1.copy_(static["q1"])
    return static["err1"].clone()


def _capture_block(w1, hinv1, scale, zero, qmin: int, qmax: int):
    """A CUDA graph of :func:`_quantize_columns` on static copies of the block's tensors (torch.cuda.graphs'
    recipe: one eager run on a side stream first, so cuBLAS has its workspace before the capture)."""
    static = {name: torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)  # buffers of its own, dense
              for name, t in (("w1", w1), ("hinv1", hinv1), ("scale", scale), ("zero", zero))}
    static |= {"q1": torch.zeros_like(static["w1"]), "err1": torch.zeros_like(static["w1"])}
    run = lambda: _quantize_columns(static["w1"], static["hinv1"], static["q1"], static["err1"],  # noqa: E731
                                    static["scale"], static["zero"], qmin, qmax)
    side = torch.cuda.Stream(w1.device)
    side.wait_stream(torch.cuda.current_stream(w1.device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(w1.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph, static


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, quantizer: Quantizer, blocksize: int = 128,
                         percdamp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """The GPTQ fake-quantized version of ``weight`` (out, in), same dtype/device as ``weight``.

    ``hessian`` (in, in) is 2/N·XᵀX of the layer's inputs (:class:`HessianAccumulator`).
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"hessian must be (in, in) = {(weight.shape[1],) * 2} for weight {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if not quantizer.enabled:
        return weight.clone()
    out_f, in_f = weight.shape
    group = quantizer.group_size if quantizer.group_size and quantizer.group_size < in_f else None
    if group is not None and in_f % group:
        raise ValueError(f"in_features {in_f} not divisible by group_size {group}")
    w = weight.detach().float().clone()
    h = hessian.detach().to(w).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    # Per-channel scales, or static group scales (act order), come from the original weight.
    static = None
    if group is None:
        static = _params(w, quantizer)
    elif act_order:
        static = [_params(w[:, g:g + group], quantizer) for g in range(0, in_f, group)]
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(in_f, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    params = static if group is None else None
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        w1, hinv1, q1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2], q[:, i1:i2]
        if group is None:  # per-channel scales: the block's loop in one piece (a CUDA graph on a GPU)
            err1 = _quantize_block(w1, hinv1, q1, *params)
        else:
            err1 = torch.zeros_like(w1)
            for i in range(i2 - i1):
                col = i1 + i
                if act_order:
                    params = static[int(perm[col]) // group]
                elif col % group == 0:
                    params = _params(torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group], quantizer)
                _quantize_column(w1, hinv1, q1, err1, i, *params)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.to(weight.dtype)


def transformed_weight(qlinear: QuantLinear) -> torch.Tensor:
    """The FP weight the GEMM sees: W with the input transform's weight side applied."""
    w = qlinear.weight
    return w if qlinear.input_transform is None else qlinear.input_transform.transform_weight(w)


# GPTQ's "true sequential" order inside a LLaMA block: each group's inputs depend on the groups
# quantized before it.
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("o_proj",),
                                                   ("gate_proj", "up_proj"), ("down_proj",))


@torch.no_grad()
def gptq_quantize_layer(layer: nn.Module, ctx: LayerContext, blocksize: int = 128, percdamp: float = 0.01,
                        act_order: bool = False, true_sequential: bool = True) -> None:
    """GPTQ on every QuantLinear of a decoder layer, Hessians from ``ctx.quant_inputs``.

    The Hessian of each linear is taken on its transformed input T(x) before the activation
    quantizer (a pre-hook on ``act_quantizer``), i.e. what GPTQ under QuaRot sees; inputs come from
    the already-quantized previous layers (falls back to ``ctx.fp_inputs`` if not tracked). With
    ``true_sequential`` the groups of :data:`SEQUENTIAL_GROUPS` are quantized one after the other,
    each seeing inputs produced by the already-GPTQ-quantized groups before it.
    """
    inputs = ctx.quant_inputs if ctx.quant_inputs is not None else ctx.fp_inputs
    linears = {role: ctx.adapter.linear(layer, role) for group in SEQUENTIAL_GROUPS for role in group}
    for role, module in linears.items():
        if not isinstance(module, QuantLinear):
            raise TypeError(f"{role} is {type(module).__name__}, expected QuantLinear (call build_layer first)")
    groups = SEQUENTIAL_GROUPS if true_sequential else (tuple(linears),)
    for group in groups:
        with HessianAccumulator({role: linears[role].act_quantizer for role in group}) as acc:
            for i in range(inputs.shape[0]):
                ctx.forward(layer, inputs[i:i + 1].to(ctx.device))
        for role in group:
            qlinear = linears[role]
            quantized = gptq_quantize_weight(transformed_weight(qlinear), acc.hessians[role],
                                             qlinear.weight_quantizer, blocksize, percdamp, act_order)
            qlinear.set_frozen_weight(quantized.detach().clone())
