"""Will one layer group of a calibration fit on one GPU? An estimate from shapes alone, checked up front.

:class:`~qllm_core.engine.BlockwiseEngine` keeps only the layer group being calibrated on the GPU
(plus the calibration activations when :func:`~qllm_core.engine.activation_storage` puts them there),
so what a run needs on the GPU is what one group needs. :func:`estimate_group_memory` adds up, in
bytes, from the model config, the method, the engine's dtype and the calibration size:

* ``weights``: the group's ``layers_per_group`` decoder layers in the engine's dtype;
* ``activations``: the engine's own rule — :func:`~qllm_core.engine.activation_copies` copies of the
  ``nsamples x seqlen x hidden`` calibration activations, on the GPU only where
  :func:`~qllm_core.engine.activation_storage` would put them for this GPU's memory, plus one transient
  copy (``run_layer_batched`` concatenates its batches into a new tensor);
* ``method_state``: GPTQ's float32 Hessians (q/k/v share one, o, gate/up share one, down) and its working
  copies of the largest weight (GPTQ, QuaRot/FlatQuant with ``weight_quantizer="gptq"``);
* ``step``: the larger of the engine's forward pass over ``batch_size`` windows and, for a method that
  trains (QLLM error correction, FlatQuant, OmniQuant), one training step: the activations autograd keeps
  for the group (per token about ``16 hidden + 8 intermediate`` values: norms, transformed and
  fake-quantized linear inputs, q/k/v, attention and MLP outputs — an estimate, SDPA's memory-efficient
  kernels keep no ``seqlen^2`` scores), the weight-sized tensors the step keeps (QLLM: ``W + BA/r`` of
  every linear; FlatQuant: ``W P^-T``, its fake-quantized copy and their gradients in the autocast
  dtype) and one weight-sized gradient of the largest linear;
* attention scores where SDPA has no fused kernel: grouped-query attention (``num_key_value_heads <
  num_attention_heads``, LLaMA-2-70B, LLaMA-3) with float32 inputs goes to the math kernel (flash needs
  fp16/bf16, and transformers asks for ``enable_gqa``), which materialises ``windows x heads x seqlen^2``
  scores: counted as 3 such tensors in a forward pass, 2 per layer kept for backward in training.

The trainable parameters themselves (LoRA rank 4, Kronecker factors, clipping logits) and their AdamW
states are a fraction of a percent of the weights and are left out. This is an estimate, meant to refuse a
job that cannot fit *before* minutes of model construction and calibration are spent; the real peak
(``torch.cuda.max_memory_allocated``) is recorded next to it by ``eval.calibration_cost``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import LayerMethod, activation_copies, activation_storage

GIB = 2**30
CUDA_RESERVE_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, allocator fragmentation: not in the estimate
SAVED_PER_TOKEN = (16, 8)  # (x hidden, x intermediate) activation values autograd keeps per token and layer
FORWARD_PER_TOKEN = (6, 3)  # the same, live at once in a no-grad forward of one layer


class DoesNotFitError(RuntimeError):
    """A layer group's estimated GPU memory exceeds the GPU's."""


@dataclass(frozen=True)
class GroupMemory:
    """Estimated GPU bytes of one layer group (module docstring), by part."""

    weights: int
    activations: int
    method_state: int
    step: int
    activations_on_gpu: bool
    layers_per_group: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.method_state + self.step

    def describe(self) -> str:
        where = "on the GPU" if self.activations_on_gpu else "on the host (the engine's rule)"
        return (f"weights {self.weights / GIB:.1f} GiB, calibration activations {self.activations / GIB:.1f} GiB "
                f"({where}), method state {self.method_state / GIB:.1f} GiB, forward/training step "
                f"{self.step / GIB:.1f} GiB")


def layer_parameters(config) -> int:
    """Parameters of one LLaMA decoder layer (q, k, v, o, gate, up, down, two RMSNorms)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    q_out = config.num_attention_heads * head_dim
    return hidden * q_out * 2 + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden


def _settings(method: LayerMethod) -> dict:
    """The method's options with its defaults filled in (FlatQuant: ``settings``, QLLM: ``opt``)."""
    for name in ("settings", "opt", "options"):
        value = getattr(method, name, None)
        if isinstance(value, dict) and value:
            return value
    return {}


def _uses_gptq(method: LayerMethod) -> bool:
    options = _settings(method)
    return method.name == "gptq" or options.get("weight_quantizer") == "gptq"


def _training(method: LayerMethod) -> tuple[int, int, float] | None:
    """``(windows per step, activation bytes per value, kept weight-sized bytes per parameter)`` of the
    method's training step, or None if it does not train."""
    options = _settings(method)
    if options.get("epochs", 1) == 0:
        return None
    if method.name == "qllm" and options.get("error_correction", True):
        return options.get("batch_size", 1), 4, 4.0  # FP32 training; W + BA kept for backward
    if method.name == "flatquant":
        return options.get("batch_size", 4), 2, 8.0  # fp16/bf16 autocast; 2 copies + 2 gradients
    if method.name == "omniquant":
        return options.get("batch_size", 1), 4, 8.0  # fake-quantized weight + its gradient
    return None


def host_merge_bytes(config, method: LayerMethod, dtype: torch.dtype) -> int:
    """Host bytes QLLM's error correction keeps during a group's training: the group's unquantized weights,
    into which the low-rank update is merged at the end (:func:`qllm_core.methods.qllm.fuse_low_rank`)."""
    if method.name != "qllm" or _training(method) is None:  # reassembly alone, or no epochs: no merge
        return 0
    return method.layers_per_group * layer_parameters(config) * torch.empty((), dtype=dtype).element_size()


def _math_attention(config, windows: int, seqlen: int, item: int, tensors: int) -> int:
    """Bytes of ``tensors`` score tensors where SDPA falls back to its math kernel (module docstring)."""
    gqa = config.num_key_value_heads < config.num_attention_heads
    return windows * config.num_attention_heads * seqlen * seqlen * item * tensors if gqa and item == 4 else 0


def estimate_group_memory(config, method: LayerMethod, nsamples: int, seqlen: int, dtype: torch.dtype,
                          gpu_bytes: int, batch_size: int = 1) -> GroupMemory:
    """GPU bytes one layer group of ``method`` needs on a GPU with ``gpu_bytes`` free (module docstring).

    ``config``: the model's (LLaMA) config; ``dtype``: the engine's (the model's parameters');
    ``batch_size``: windows per forward pass of the engine.
    """
    item = torch.empty((), dtype=dtype).element_size()
    hidden, inter = config.hidden_size, config.intermediate_size
    group = method.layers_per_group
    weights = group * layer_parameters(config) * item
    copy = nsamples * seqlen * hidden * item
    copies = activation_copies(method)
    on_gpu = copies > 0 and activation_storage(torch.device("cuda"), copies * copy, gpu_bytes).type == "cuda"
    activations = (copies + 1) * copy if on_gpu else 0
    largest = hidden * inter
    state = 4 * (3 * hidden * hidden + inter * inter) + 3 * 4 * largest if _uses_gptq(method) else 0
    forward = batch_size * seqlen * (FORWARD_PER_TOKEN[0] * hidden + FORWARD_PER_TOKEN[1] * inter) * item
    forward += _math_attention(config, batch_size, seqlen, item, 3)
    step = forward
    training = _training(method)
    if training is not None:
        windows, act_bytes, weight_bytes = training
        saved = group * windows * seqlen * (SAVED_PER_TOKEN[0] * hidden + SAVED_PER_TOKEN[1] * inter) * act_bytes
        saved += group * _math_attention(config, windows, seqlen, act_bytes, 2)
        step = max(forward, saved + int(weight_bytes * group * layer_parameters(config)) + largest * item)
    return GroupMemory(weights, activations, state, step, on_gpu, group)


def check_fits_one_gpu(label: str, estimate: GroupMemory, gpu_bytes: int) -> None:
    """Raise :class:`DoesNotFitError` naming ``label`` (shape / method), the need and the GPU's memory
    when the estimate plus :data:`CUDA_RESERVE_BYTES` exceeds ``gpu_bytes``."""
    need = estimate.total + CUDA_RESERVE_BYTES
    if need > gpu_bytes:
        layers = f"{estimate.layers_per_group} layer{'s' if estimate.layers_per_group > 1 else ''}"
        raise DoesNotFitError(
            f"{label}: one layer group ({layers}) needs about {need / GIB:.1f} GiB of GPU memory "
            f"({estimate.describe()}, + {CUDA_RESERVE_BYTES / GIB:.0f} GiB reserve) but the GPU has "
            f"{gpu_bytes / GIB:.1f} GiB; not started. Use a GPU with more memory or fewer calibration windows.")
