"""Block-wise (layer-by-layer) calibration engine.

The standard recipe of GPTQ, OmniQuant, QLLM and FlatQuant: capture the inputs of decoder layer 0
for N calibration windows, then walk the layers one at a time. Only the layer being processed is
on the accelerator; the rest of the model stays on the CPU, which is what lets a 70B model
calibrate on one GPU; the activations join the layer on the accelerator when they fit
(:func:`activation_storage`). Each layer gets its full-precision inputs and outputs (and,
for methods that want them, the inputs produced by the already-quantized layers before it), the
method mutates the layer in place, and the result is saved to ``<run_dir>/layers/NNN.safetensors``
before moving on. Methods that train several consecutive layers jointly (QLLM's error correction
over ``num_layer`` = 4 layers) declare ``layers_per_group``: the engine calibrates each layer of a
group, then hands the whole group (a :class:`LayerGroup`) to ``calibrate_group`` with the group's
FP inputs and the FP outputs of its last layer, and saves the group's layers only after that step.
An interrupted run resumes: saved layers are rebuilt and reloaded, and only the
(cheap) forward passes needed to regenerate the next layer's inputs are repeated.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from .adapters import ModelAdapter
from .calib_stats import ChannelAbsmax, observing
from .gpu_monitor import free_gpu_bytes, timed


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer, ``(n, seqlen, hidden)`` on the storage device,
    and the keyword arguments the model passes to every layer (rotary embeddings, mask...)."""

    hidden: torch.Tensor
    kwargs: dict = field(default_factory=dict)


@dataclass
class LayerContext:
    """What a method sees when it calibrates one layer."""

    index: int
    fp_inputs: torch.Tensor  # FP model's inputs to this layer (storage device)
    fp_outputs: torch.Tensor  # FP layer's outputs for fp_inputs (the usual target)
    quant_inputs: torch.Tensor | None  # inputs from the already-quantized layers, if tracked
    layer_kwargs: dict  # on `device`
    device: torch.device
    adapter: ModelAdapter
    # per-channel max |x| (float32, CPU) of the FP inputs of the linears named by the method's fp_input_roles
    fp_input_absmax: dict[str, torch.Tensor] = field(default_factory=dict)

    def forward(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``layer`` on a batch already on ``device``."""
        return call_layer(layer, hidden, self.layer_kwargs)


class LayerMethod(Protocol):
    """A quantization method as the engine drives it (see qllm_core.methods)."""

    name: str
    needs_calibration: bool  # False: no data needed (e.g. RTN)
    tracks_quant_inputs: bool  # True: also propagate inputs through the quantized layers
    # with tracks_quant_inputs: whether calibrate_layer reads ctx.quant_inputs (False: only calibrate_group
    # does, and the stream skips the layer-by-layer pass through a group's earlier layers)
    layer_reads_quant_inputs: bool
    layers_per_group: int  # consecutive layers that calibrate_group trains jointly (1: per layer)
    # linears (by role) whose input's per-channel max |x| over the FP inputs the engine records while it computes
    # the FP outputs (LayerContext.fp_input_absmax): a statistic the method would otherwise rerun the layer for
    fp_input_roles: tuple[str, ...]

    def prepare_model(self, model: nn.Module, adapter: ModelAdapter) -> None: ...
    def build_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter) -> None: ...
    def calibrate_layer(self, layer: nn.Module, ctx: LayerContext | None) -> None: ...
    def calibrate_group(self, group: LayerGroup, ctx: LayerContext | None) -> None: ...


class LayerGroup(nn.Module):
    """Consecutive decoder layers run as one block (same call signature as a single layer)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
        for layer in self.layers:
            hidden = call_layer(layer, hidden, kwargs)
        return hidden


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _move(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer0_inputs(
    model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, device: torch.device,
    batch_size: int = 1, storage_device: str | torch.device = "cpu",
) -> LayerInputs:
    """Run the embedding and stop at decoder layer 0, collecting its inputs and kwargs."""
    layers = adapter.layers
    hidden, kwargs_box = [], {}

    def grab(_module, args, kwargs):
        hidden.append(args[0].to(storage_device) if args else kwargs.pop("hidden_states").to(storage_device))
        kwargs_box.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    small_parts = [adapter.embed_tokens, adapter.rotary_emb]
    originals = [next(m.parameters(), next(m.buffers(), torch.empty(0))).device for m in small_parts]
    for m in small_parts:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for m, dev in zip(small_parts, originals):
            m.to(dev)
    kwargs_box["past_key_values"] = None
    kwargs_box["use_cache"] = False
    return LayerInputs(torch.cat(hidden), _move(kwargs_box, "cpu"))


@torch.no_grad()
def run_layer_batched(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device, batch_size: int) -> torch.Tensor:
    """Forward ``hidden`` (storage device) through ``layer`` (on ``device``) in batches."""
    outs = [call_layer(layer, hidden[i : i + batch_size].to(device), kwargs).to(hidden.device)
            for i in range(0, hidden.shape[0], batch_size)]
    return torch.cat(outs)


def fp_pass(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, device, batch_size: int,
            linears: dict[str, nn.Module]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The FP layer's outputs for ``hidden`` and the per-channel max |x| of the inputs of ``linears`` (by role)
    in the same forwards, so a method needs no second pass over the calibration set for them."""
    absmax = ChannelAbsmax()
    with observing(linears, absmax):
        outputs = run_layer_batched(layer, hidden, kwargs, device, batch_size)
    return outputs, absmax.result()


def activation_storage(device: torch.device, need_bytes: int, free_bytes: int | None) -> torch.device:
    """Where the calibration activations live while the engine walks the layers.

    On the accelerator when they take under half of its free memory (no host round trip per batch;
    the official QLLM/OmniQuant/FlatQuant code keeps them on the GPU too), otherwise on the CPU,
    which is what lets a 70B model calibrate on one GPU.
    """
    if device.type == "cpu" or free_bytes is None or need_bytes >= free_bytes // 2:
        return torch.device("cpu")
    return device


def activation_copies(method: LayerMethod, concurrent_layers: int = 1) -> int:
    """Activation tensors of the whole calibration set the engine keeps while walking the layers.

    FP inputs and outputs (+ the quantized inputs when the method tracks them); a group of several
    layers also keeps its own inputs until its joint step; ``concurrent_layers`` layers calibrated at once
    keep the first one's FP inputs and every one's FP outputs. 0 for a method without calibration data.
    """
    if not method.needs_calibration:
        return 0
    if concurrent_layers > 1:
        return concurrent_layers + 1
    return (3 if method.tracks_quant_inputs else 2) * (2 if method.layers_per_group > 1 else 1)


def concurrent_window(method: LayerMethod, concurrent_layers: int) -> int:
    """How many layers the engine calibrates at once: ``concurrent_layers`` (>= 1, checked by the engine) for a
    method whose layers are independent (``independent_layers``, one layer per group), else 1."""
    independent = getattr(method, "independent_layers", False) and method.layers_per_group == 1
    return concurrent_layers if independent else 1


MATMUL_PRECISIONS = ("highest", "high")


@contextlib.contextmanager
def float32_matmul_precision(precision: str | None):
    """``torch.set_float32_matmul_precision(precision)`` within the block (None: unchanged), restored after."""
    previous = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class BlockwiseEngine:
    """Walk a model's decoder layers one at a time, applying a :class:`LayerMethod`.

    Args:
        model, adapter: the (CPU-resident) model and its adapter.
        device: where each layer is processed ("cuda", "cpu").
        layer_dir: directory for per-layer checkpoints (``NNN.safetensors``); None disables resume.
        batch_size: windows per forward pass when propagating activations.
        matmul_precision: torch's float32 matmul precision on a CUDA device while the engine runs
            (:data:`MATMUL_PRECISIONS`): "highest" (IEEE float32, the default) or "high" (TF32 tensor cores
            for float32 matmuls: the float32 passes of a float32 model through each layer — FP targets,
            calibration statistics, QLLM's threshold search — ~8x faster GEMMs at a 10-bit mantissa; the
            official codes run these passes in float16). Autocast training steps are unaffected but for
            their float32 matmuls.
        concurrent_layers: layers calibrated at once by a method whose layers are independent
            (``independent_layers``: FlatQuant with RTN weights trains each block on its own FP inputs), through
            its ``calibrate_layers``; the same results as one at a time (tested), more GPU work in flight for a
            small model. Other methods walk one layer (group) at a time whatever this says. Each layer is
            saved, and resumes, on its own.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, device: str | torch.device = "cpu",
                 layer_dir: str | Path | None = None, batch_size: int = 1, matmul_precision: str = "highest",
                 concurrent_layers: int = 1):
        if matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {matmul_precision!r}")
        if concurrent_layers < 1:
            raise ValueError(f"concurrent_layers must be >= 1, got {concurrent_layers}")
        self.matmul_precision = matmul_precision
        self.concurrent_layers = concurrent_layers
        self.model = model
        self.adapter = adapter
        self.device = torch.device(device)
        self.layer_dir = Path(layer_dir) if layer_dir is not None else None
        self.batch_size = batch_size
        self.group_seconds: list[float] = []  # wall time of each layer group (a layer, unless grouped or concurrent)
        # where the run's wall time went, summed over the layers: layer0_inputs, to_device, fp_outputs (the FP
        # pass), build, resume (checkpoint loads), calibrate (calibrate_layer / calibrate_layers), calibrate_group,
        # quant_inputs, save, to_host; on a GPU each phase ends with a synchronisation, so its asynchronous work
        # is counted in it
        self.phase_seconds: dict[str, float] = {}
        self.resumed_layers = 0  # layers reloaded from checkpoints instead of calibrated by this run
        self.layers_at_once = 1  # layers the last run calibrated at once (concurrent_window)

    def checkpoint_path(self, index: int) -> Path | None:
        return None if self.layer_dir is None else self.layer_dir / f"{index:03d}.safetensors"

    def _saved(self, index: int) -> bool:
        path = self.checkpoint_path(index)
        return path is not None and path.is_file()

    def _context(self, index, fp_inputs, fp_outputs, quant_inputs, kwargs,
                 fp_input_absmax: dict | None = None) -> LayerContext | None:
        if fp_inputs is None:  # a method without calibration data
            return None
        return LayerContext(index, fp_inputs, fp_outputs, quant_inputs, kwargs, self.device, self.adapter,
                            fp_input_absmax or {})

    def _phase(self, name: str):
        """Count the block's wall time in ``phase_seconds[name]``."""
        return timed(self.phase_seconds, name, self.device)

    def _storage_for(self, calibration_ids: torch.Tensor, copies: int) -> torch.device:
        """:func:`activation_storage` for ``copies`` activation tensors of these calibration windows."""
        itemsize = next(self.model.parameters()).dtype.itemsize
        need = copies * calibration_ids.numel() * self.adapter.hidden_size * itemsize
        free = free_gpu_bytes(self.device) if self.device.type == "cuda" else None
        return activation_storage(self.device, need, free)

    def run(self, method: LayerMethod, calibration_ids: torch.Tensor | None = None) -> None:
        """Quantize every decoder layer with ``method`` (in place)."""
        with float32_matmul_precision(self.matmul_precision if self.device.type == "cuda" else None):
            self._run(method, calibration_ids)

    def _run(self, method: LayerMethod, calibration_ids: torch.Tensor | None) -> None:
        method.prepare_model(self.model, self.adapter)
        if method.needs_calibration and calibration_ids is None:
            raise ValueError(f"method {method.name!r} needs calibration data")
        size = method.layers_per_group
        if size < 1:
            raise ValueError(f"layers_per_group must be >= 1, got {size}")
        window = self.layers_at_once = concurrent_window(method, self.concurrent_layers)
        stream = None
        if method.needs_calibration:
            storage = self._storage_for(calibration_ids, activation_copies(method, window))
            with self._phase("layer0_inputs"):
                stream = capture_layer0_inputs(self.model, self.adapter, calibration_ids, self.device,
                                               self.batch_size, storage)
        fp_inputs = stream.hidden if stream else None
        quant_inputs = fp_inputs if (stream and method.tracks_quant_inputs) else None
        kwargs = _move(stream.kwargs, self.device) if stream else {}
        layers = list(self.adapter.layers)
        progress = tqdm(total=len(layers), desc=f"{method.name} layers")
        span = window if window > 1 else size  # layers walked together: concurrent, or a group
        for first in range(0, len(layers), span):
            indices = range(first, min(first + span, len(layers)))
            # A group resumes only as a whole: its layers are saved after the joint step. Layers calibrated
            # concurrently are independent: each resumes on its own.
            saved = [self._saved(i) for i in indices]
            if window == 1:
                saved = [all(saved)] * len(saved)
            started = time.perf_counter()
            group_fp_inputs, group_quant_inputs = fp_inputs, quant_inputs
            layer_quant_inputs = quant_inputs is not None and method.layer_reads_quant_inputs
            pending = []  # (layer, context) of the concurrent layers still to calibrate
            for index, resume in zip(indices, saved):
                layer = layers[index]
                with self._phase("to_device"):
                    layer.to(self.device)
                fp_outputs, fp_absmax = None, {}
                if stream:
                    with self._phase("fp_outputs"):
                        observed = {} if resume else {role: self.adapter.linear(layer, role)
                                                      for role in getattr(method, "fp_input_roles", ())}
                        fp_outputs, fp_absmax = fp_pass(layer, fp_inputs, kwargs, self.device, self.batch_size,
                                                        observed)
                with self._phase("build"):
                    method.build_layer(index, layer, self.adapter)
                    layer.to(self.device)  # modules created by build_layer start on the CPU
                ctx = self._context(index, fp_inputs, fp_outputs, quant_inputs if layer_quant_inputs else None, kwargs,
                                    fp_absmax)
                if resume:
                    with self._phase("resume"):
                        load_layer_state(layer, self.checkpoint_path(index))
                elif window > 1:
                    pending.append((layer, ctx))
                else:
                    with self._phase("calibrate"):
                        method.calibrate_layer(layer, ctx)
                if layer_quant_inputs and not resume and index != indices[-1]:  # next layer of the group
                    with self._phase("quant_inputs"):
                        quant_inputs = run_layer_batched(layer, quant_inputs, kwargs, self.device, self.batch_size)
                fp_inputs = fp_outputs
                progress.update()
            if pending:
                with self._phase("calibrate"):
                    method.calibrate_layers(pending)
            group = LayerGroup([layers[i] for i in indices])
            calibrated = [i for i, resume in zip(indices, saved) if not resume]
            if calibrated and window == 1:
                with self._phase("calibrate_group"):
                    method.calibrate_group(group, self._context(first, group_fp_inputs, fp_inputs, group_quant_inputs,
                                                                kwargs))
            with self._phase("save"):
                for index in calibrated:
                    if self.checkpoint_path(index) is not None:
                        save_layer_state(layers[index], self.checkpoint_path(index))
            if quant_inputs is not None:  # through the group's final layers
                with self._phase("quant_inputs"):
                    quant_inputs = run_layer_batched(group, group_quant_inputs, kwargs, self.device, self.batch_size)
            with self._phase("to_host"):
                group.to("cpu")  # a copy to the host: the group's GPU work is done when the clock stops
            self.resumed_layers += len(indices) - len(calibrated)
            if calibrated:
                self.group_seconds.append(time.perf_counter() - started)
        progress.close()
        self.model.to("cpu")


def save_layer_state(layer: nn.Module, path: Path) -> None:
    """Write a layer's full state dict atomically (a killed run never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: methods may share one tensor between modules (a transform used by q, k and v),
    # which safetensors refuses to store twice; loading copies it back into every owner.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in layer.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def load_layer_state(layer: nn.Module, path: Path) -> None:
    device = next(layer.parameters()).device
    layer.load_state_dict(load_file(str(path), device=str(device)), strict=True)
