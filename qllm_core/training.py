"""The block-wise training loop of every trained method, fast on a GPU.

FlatQuant (transforms, scales, clipping), OmniQuant (learnable weight clipping) and QLLM's error
correction (low-rank adapters) all train a few parameters of one decoder layer, or a group of
layers, for hundreds of small steps: forward a batch of calibration windows, MSE against the FP
target, backward, AdamW, learning-rate schedule. On an H100 such a step of a d = 576 block is about a
millisecond of arithmetic, yet it took ~65 ms (issue 9's profile): kernel launches, Python and
host syncs set the pace. :func:`train_block` runs the same loop with

* no host sync inside an epoch: losses accumulate on the device and are read once per epoch;
* learning rates precomputed from the method's own torch scheduler (:func:`lr_table`: the values
  stepping it would give) and written into the optimizer before each step;
* on CUDA, AdamW with tensor learning rates in its fused form, and fp16 loss scaling by torch's
  ``GradScaler``, which with a fused optimizer finds infs and skips steps on the device;
* on CUDA, the whole step (forward, loss, backward, optimizer, loss scaler) captured once in a
  CUDA graph (``torch.cuda.graphs``) after ``WARMUP_STEPS`` eager steps, which are real steps of
  the run, and replayed for every later step: one launch per step instead of ~1000;
* the quantized input of the linears reading one tensor (q/k/v, gate/up) computed once per step
  (:func:`~qllm_core.quant.qlinear.shared_inputs`), as the official codes apply one transform and
  one activation quantizer per tensor;
* optionally on CUDA, fake quantizers compiled (:func:`~qllm_core.quant.compiled_fake_quant`);
* for blocks that are independent (FlatQuant's layers, each on its own FP inputs), several at once
  (:func:`train_blocks`): their steps issued in lockstep, each block on a CUDA stream of its own.

The numerics are the method's: same loss, optimizer, schedule, epochs and autocast. On the CPU the
loop is the plain eager one (tests compare it with a straightforward reference loop); on CUDA the
graph replays the kernels of the eager step (tests compare the two on a GPU).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .engine import call_layer
from .gpu_monitor import PeakMemory, free_gpu_bytes
from .quant import compiled_fake_quant, shared_inputs

WARMUP_STEPS = 2  # eager steps before the CUDA graph is captured (lazy optimizer/scaler state)
# Free memory a capture asks for, in multiples of the eager step's (_try_capture). A margin chosen, not
# measured: the one failure seen says only that a capture can need more than the eager step did.
CAPTURE_HEADROOM = 1.5
# Autocast dtypes a method may train with on CUDA (methods' ``amp_dtype`` option; CPU trains in float32).
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": None}


def resolve_amp_dtype(method: str, name: str) -> torch.dtype | None:
    """The autocast dtype called ``name`` (None: float32), or a ValueError naming ``method``."""
    if name not in AMP_DTYPES:
        raise ValueError(f"{method}: amp_dtype must be one of {sorted(AMP_DTYPES)}, got {name!r}")
    return AMP_DTYPES[name]

SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


@dataclass
class TrainingStats:
    """What a :func:`train_block` call did: per-epoch mean loss and where its time went."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    wall_seconds: float = 0.0
    graph_steps: int = 0  # steps replayed from the CUDA graph
    graph_error: str | None = None  # why the step could not be captured (then every step ran eagerly)
    capture_seconds: float = 0.0  # wall time of the capture (with the headroom check's cache clean-up, if it ran)


@dataclass
class BlockTraining:
    """One block-wise training run: what to train, on what, and with which recipe.

    Args:
        name: for messages (e.g. "flatquant layer 3").
        module: the layer (or :class:`~qllm_core.engine.LayerGroup`) whose output is trained.
        kwargs: the keyword arguments the engine passes to every layer (rotary embeddings...).
        param_groups: AdamW groups ``{"params": [...], "lr": float}``.
        inputs, targets: ``(n, tokens, hidden)`` calibration inputs and FP targets (any device).
        epochs, batch_size: passes over the ``n`` windows and windows per step.
        weight_decay: AdamW's (torch's default 0.01 unless the method says otherwise).
        scheduler: ``(optimizer, total_steps) -> LRScheduler`` stepped after every step, or None.
        shuffle: a generator for a fresh permutation of the windows every epoch (QLLM), or None
            for the windows in order.
        drop_last: drop a last partial batch (FlatQuant: ``n // batch_size`` steps per epoch).
        amp_dtype: autocast dtype on CUDA (float16 adds loss scaling), None for float32.
        normalise_loss: backpropagate ``loss / loss.detach()`` (FlatQuant).
        forward_context: entered around every forward pass (FlatQuant: this step's factors).
    """

    name: str
    module: nn.Module
    kwargs: dict
    param_groups: list[dict]
    inputs: torch.Tensor
    targets: torch.Tensor
    epochs: int
    batch_size: int
    weight_decay: float = 1e-2
    scheduler: SchedulerFactory | None = None
    shuffle: torch.Generator | None = None
    drop_last: bool = False
    amp_dtype: torch.dtype | None = None
    normalise_loss: bool = False
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @property
    def steps_per_epoch(self) -> int:
        n = self.inputs.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def lr_table(base_lrs: list[float], scheduler: SchedulerFactory | None, total: int) -> list[list[float]]:
    """Each step's learning rate per group: what ``scheduler`` gives when stepped after every step."""
    if scheduler is None:
        return [list(base_lrs)] * total
    dummy = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in base_lrs])
    sched = scheduler(dummy, total)
    table = []
    for _ in range(total):
        table.append([group["lr"] for group in dummy.param_groups])
        dummy.step()  # no gradients: a no-op that keeps the scheduler's call-order check quiet
        sched.step()
    return table


def _batches(job: BlockTraining, device: torch.device):
    """Per epoch, the list of (start, stop) slices or index tensors of its steps."""
    n, bs = job.inputs.shape[0], job.batch_size
    for _ in range(job.epochs):
        if job.shuffle is None:
            yield [slice(s, s + bs) for s in range(0, job.steps_per_epoch * bs, bs)]
            continue
        order = torch.randperm(n, generator=job.shuffle)
        if bs == 1:  # plain slices: no index tensor to send to the device every step
            yield [slice(i, i + 1) for i in order.tolist()]
        else:
            order = order.to(device if job.inputs.device == device else "cpu")
            yield [order[s : s + bs] for s in range(0, job.steps_per_epoch * bs, bs)]


class _Step:
    """One training step on static tensors: what is run eagerly and what the CUDA graph captures."""

    def __init__(self, job: BlockTraining, device: torch.device):
        self.job = job
        self.device = device
        cuda = device.type == "cuda"
        self.autocast = cuda and job.amp_dtype is not None
        groups = [{**g, "lr": torch.tensor(g["lr"], device=device) if cuda else g["lr"]} for g in job.param_groups]
        # fused (CUDA): one kernel for all parameters, and GradScaler's inf check stays on the device;
        # capturable: the step may be recorded in a CUDA graph.
        self.optimizer = torch.optim.AdamW(groups, weight_decay=job.weight_decay, fused=True if cuda else None,
                                           capturable=cuda)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast and job.amp_dtype == torch.float16)
        self.loss_sum = torch.zeros((), device=device)

    def set_lr(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The forward pass under the method's autocast and context, and its MSE against ``target``."""
        job = self.job
        with torch.autocast(self.device.type, dtype=job.amp_dtype or torch.float32, enabled=self.autocast,
                            cache_enabled=False), job.forward_context(), shared_inputs():
            out = call_layer(job.module, x, job.kwargs)
        return F.mse_loss(out.float(), target.float())

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> None:
        loss = self.loss(x, target)
        objective = loss / loss.detach().clamp(min=1e-30) if self.job.normalise_loss else loss
        self.scaler.scale(objective).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.loss_sum += loss.detach()


def trainer_label(trains: bool, on_gpu: bool, compile_quantizers: bool) -> str:
    """How a trained method's steps run, as the tables' ``trainer`` column says it: "eager" (CPU), "graph"
    (CUDA-graph steps), "graph+compile" (and compiled fake quantizers); "-" for a method that trains nothing."""
    if not trains:
        return "-"
    return "eager" if not on_gpu else "graph+compile" if compile_quantizers else "graph"


def train_block(job: BlockTraining, device: torch.device, graph: bool | None = None,
                compile_quantizers: bool = False) -> TrainingStats:
    """Train ``job.param_groups`` (module docstring); parameters are updated in place.

    ``graph``: None means "on CUDA". ``compile_quantizers`` is opt-in (its first steps pay for the
    compilation). Both need CUDA. A non-finite epoch loss raises FloatingPointError naming ``job.name``.
    """
    return train_blocks([job], device, graph, compile_quantizers)[0]


def train_blocks(jobs: list[BlockTraining], device: torch.device, graph: bool | None = None,
                 compile_quantizers: bool = False) -> list[TrainingStats]:
    """Train several independent blocks at once, in lockstep: each job as :func:`train_block` would.

    Blocks that train on their own FP inputs (FlatQuant, methods.md section 2; issue 9: "calibrating several
    layers at once is allowed and welcome") share nothing, so step ``s`` of every job is issued before step
    ``s + 1`` of any, each job on its own CUDA stream: the small kernels of a small model's steps (a d = 576
    step is ~1600 kernels of a few microseconds) run side by side instead of one after the other. Each job's
    numerics are untouched: its own optimizer, scaler, learning rates and CUDA graph (captured after the
    ``WARMUP_STEPS`` eager steps of all jobs, which decide the captures' memory headroom together). On the
    CPU the jobs' steps simply alternate (same results as one job after the other; tested).

    The jobs must have the same epochs and steps per epoch. Every returned ``wall_seconds`` is the wall
    time of the whole call (shared by the jobs).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    graph = cuda if graph is None else graph
    if (graph or compile_quantizers) and not cuda:
        raise ValueError("CUDA graphs and compiled quantizers need a CUDA device")
    if len({(job.epochs, job.steps_per_epoch) for job in jobs}) > 1:
        raise ValueError("blocks trained together need the same epochs and steps per epoch, got "
                         + ", ".join(f"{j.name}: {j.epochs} x {j.steps_per_epoch}" for j in jobs))
    if not jobs or jobs[0].epochs * jobs[0].steps_per_epoch == 0:
        return [TrainingStats() for _ in jobs]
    start = time.perf_counter()
    # CUDA: every job's steps run on a side stream of its own, as graph capture wants its warm-up steps to.
    lanes = [_Lane(job, device, _side_stream(device, slot) if cuda else None, graph) for slot, job in enumerate(jobs)]
    # the eager warm-up steps' peak memory (all jobs'), which decides whether a capture can fit (_try_capture)
    warmup = PeakMemory(device) if graph else contextlib.nullcontext()
    steps = 0
    with warmup, torch.enable_grad(), compiled_fake_quant(compile_quantizers):
        for _ in range(jobs[0].epochs):
            epoch = [lane.next_epoch() for lane in lanes]  # one list of batches per job
            for position in range(len(epoch[0])):
                for lane, batches in zip(lanes, epoch):
                    lane.run(batches[position])
                steps += 1
                if graph and steps == WARMUP_STEPS:
                    step_bytes = warmup.stop() - warmup.base
                    for lane in lanes:
                        lane.capture(step_bytes)
            for lane, batches in zip(lanes, epoch):
                lane.end_epoch(len(batches))
    for lane in lanes:
        lane.finish()
    wall = time.perf_counter() - start
    for lane in lanes:
        lane.stats.wall_seconds = wall
    return [lane.stats for lane in lanes]


class _Lane:
    """One job of :func:`train_blocks`: its step, learning rates, stream and CUDA graph."""

    def __init__(self, job: BlockTraining, device: torch.device, stream: torch.cuda.Stream | None, graph: bool):
        self.job, self.device, self.stream, self.graph = job, device, stream, graph
        self.step = _Step(job, device)
        self.lrs = lr_table([g["lr"] for g in job.param_groups], job.scheduler, job.epochs * job.steps_per_epoch)
        self.stats = TrainingStats()
        self.cuda_graph: torch.cuda.CUDAGraph | None = None
        self.static_x = self.static_t = None
        self.epochs = _batches(job, device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))

    def next_epoch(self) -> list:
        """The next epoch's batches (made on the job's stream: a shuffled order's index tensor is used there)."""
        with torch.cuda.stream(self.stream):
            return next(self.epochs)

    def run(self, index) -> None:
        """One step on the windows ``index``: the graph's replay once captured, else the eager step."""
        with torch.cuda.stream(self.stream):
            self.step.set_lr(self.lrs[self.stats.steps])
            x, target = self.job.inputs[index], self.job.targets[index]
            if self.cuda_graph is not None and x.shape == self.static_x.shape:
                self.static_x.copy_(x, non_blocking=True)
                self.static_t.copy_(target, non_blocking=True)
                self.cuda_graph.replay()
                self.stats.graph_steps += 1
            else:
                self.step.optimizer.zero_grad(set_to_none=True)
                self.step(x.to(self.device), target.to(self.device))
            if self.graph and self.stats.steps == WARMUP_STEPS - 1:  # the static tensors the capture will use
                self.static_x, self.static_t = x.to(self.device, copy=True), target.to(self.device, copy=True)
            self.stats.steps += 1

    def capture(self, step_bytes: int) -> None:
        """Capture the step (after the warm-up steps); on failure the job goes on eagerly."""
        start = time.perf_counter()
        with torch.cuda.stream(self.stream):
            self.cuda_graph, self.stats.graph_error = _try_capture(self.step, self.static_x, self.static_t,
                                                                   step_bytes)
        self.stats.capture_seconds = time.perf_counter() - start
        if self.stats.graph_error:  # a capture records, runs nothing: go on eagerly
            self.graph = False
            warnings.warn(f"{self.job.name}: the training step was not captured in a CUDA graph "
                          f"({self.stats.graph_error}); the remaining steps run eagerly")

    def end_epoch(self, steps: int) -> None:
        """Read the epoch's mean loss (the one host sync of an epoch) and check it is finite."""
        with torch.cuda.stream(self.stream):
            epoch_loss = self.step.loss_sum.item() / steps
            self.step.loss_sum.zero_()
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(f"{self.job.name}: non-finite loss in epoch {len(self.stats.epoch_losses)}")
        self.stats.epoch_losses.append(epoch_loss)

    def finish(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)


_SIDE_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}


def _side_stream(device: torch.device, slot: int = 0) -> torch.cuda.Stream:
    """The device's stream number ``slot`` for training steps, kept for the process: cuBLAS keeps a workspace
    per stream it has run on (for good), so a new stream per trained block would add one per block."""
    key = (_cuda_index(device), slot)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(torch.device("cuda", key[0]))
    return _SIDE_STREAMS[key]


def _cuda_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` ("cuda" without one: the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _try_capture(step: _Step, static_x: torch.Tensor, static_t: torch.Tensor,
                 step_bytes: int) -> tuple[torch.cuda.CUDAGraph | None, str | None]:
    """``(graph, None)``, or ``(None, why)`` when the step is not captured (the caller goes on eagerly).

    A capture allocates the whole step again, in a private pool; a capture that runs out of memory fails
    as "operation failed due to a previous error during capture" (pytorch/pytorch#187795), and undoing a
    failed capture relies on :func:`_abandon_pool`'s work-around of torch bugs. So the step is only
    captured when the free memory is ``CAPTURE_HEADROOM`` times what the eager warm-up step took
    (``step_bytes``). Seen on an H200 with LLaMA-3-70B FlatQuant: layer 0's capture failed, 29.9 GiB
    stayed in its pool, and layer 1's eager steps ran out of memory.
    """
    free = free_gpu_bytes(static_x.device, enough=int(CAPTURE_HEADROOM * step_bytes))
    if free < CAPTURE_HEADROOM * step_bytes:
        return None, (f"{free / 2**30:.1f} GiB free, the eager step took {step_bytes / 2**30:.1f} GiB: "
                      f"a capture needs {CAPTURE_HEADROOM}x that")
    try:
        return _capture(step, static_x, static_t), None
    except RuntimeError as err:
        why = describe_error(err)
    _release_failed_capture(step, static_x.device)  # out of the except block: its traceback no longer holds the graph
    return None, why


def _capture(step: _Step, static_x: torch.Tensor, static_t: torch.Tensor) -> torch.cuda.CUDAGraph:
    """Capture one training step on the static tensors.

    The gradients are set to None first, so the captured backward allocates them in the graph's
    memory and every replay writes them afresh (torch.cuda.graphs' whole-network recipe).
    With torch's own choice of LU first; if that fails on a host sync (MAGMA's batched LU for large
    factors: "operation not permitted when stream is capturing", LLaMA-70B-sized FlatQuant factors on
    the H200) or in cuSOLVER, again with cuSOLVER's LU, which runs on the stream (same factorisation,
    partial pivoting), after :func:`_create_solver_handles`. Not cuSOLVER always: for the small batched
    factors of the embedded model, FlatQuant W4A4KV4 alone on an H200 took 7.0 s per layer with cuSOLVER
    forced (stop 18) and 4.5 s with torch's choice (stop 19; the host was shared differently, so not a
    clean A/B).
    """
    try:
        return _record(step, static_x, static_t)
    except RuntimeError as err:
        why = describe_error(err)
        if "stream is capturing" not in why and "cusolver" not in why.lower():
            raise
    previous = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("cusolver")
    try:
        _create_solver_handles(step, static_x, static_t)
        return _record(step, static_x, static_t)
    finally:
        torch.backends.cuda.preferred_linalg_library(previous)


def _create_solver_handles(step: _Step, static_x: torch.Tensor, static_t: torch.Tensor) -> None:
    """Run the step's forward and backward once, eagerly, without an optimizer step, so that torch creates
    the cuSOLVER handles the capture will use: it creates one lazily per thread at the thread's first
    cuSOLVER call, and ``cusolverDnCreate`` inside a capture fails (``CUSOLVER_STATUS_INTERNAL_ERROR``;
    LLaMA-70B-shaped FlatQuant on an H200, whose eager warm-up steps had used MAGMA's LU). The step's own
    solves, not stand-ins: warming with a 2x2 solve and its backward still left the capture failing there
    (stop 20, first call); with this warm-up the LLaMA-3-70B step was captured (stop 20, second call). The
    gradients it leaves are dropped (the capture starts from None)."""
    step.loss(static_x, static_t).backward()
    step.optimizer.zero_grad(set_to_none=True)


def _record(step: _Step, static_x: torch.Tensor, static_t: torch.Tensor) -> torch.cuda.CUDAGraph:
    """Record the step in a CUDA graph with a private memory pool, on the steps' own stream, whose cuBLAS
    workspace the eager warm-up steps made (captured on torch's capture stream instead, the process's first
    capture allocated that stream's workspace in its pool, where it stays for good: 64 MiB on an H200).

    ``capture_begin``/``capture_end`` directly rather than the ``torch.cuda.graph`` context, which first hands
    the whole allocator cache back to the driver (``empty_cache``) so that the private pool can have it: then
    every layer's eager steps allocate again from the driver. :func:`_try_capture` has already checked that the
    driver has the capture's memory free, emptying the cache only when it had not.
    """
    step.optimizer.zero_grad(set_to_none=True)
    cuda_graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()  # its id is needed after a failed capture, when CUDAGraph.pool() raises
    torch.cuda.synchronize(static_x.device)
    try:
        cuda_graph.capture_begin(pool=pool)
        try:
            step(static_x, static_t)
        finally:  # as torch.cuda.graph's exit: end the capture also when the step raised
            cuda_graph.capture_end()
    except RuntimeError:
        _abandon_pool(pool, static_x.device)
        raise
    return cuda_graph


def _abandon_pool(pool: tuple[int, int], device: torch.device) -> None:
    """Give back the memory pool of a capture that failed at its end.

    When ending the capture fails (``cudaStreamEndCapture`` reports the capture invalidated), torch 2.11
    raises before it stops routing the stream's allocations into the graph's private pool
    (pytorch/pytorch#180395, fixed later) and never releases that pool (pytorch/pytorch#190348): every
    later allocation of the step's stream lands in a pool that cannot shrink, and the allocator, which
    thinks a capture is under way, no longer frees cached blocks on an out-of-memory. (Seen on the H200:
    after layer 0's failed capture, layer 1's eager step ran out of memory with 29.9 GiB in private pools
    and 61.7 GiB reserved but unallocated.) So the routing is ended here and the pool released, each step
    on its own, a step torch already took (it raises then) skipped. ``pool`` is the id the capture was
    given: after a failed capture ``CUDAGraph.pool()`` raises ("without a preceding successful capture"),
    which is why the stop-18 version, which asked the graph, gave back nothing (H200, stop 19).
    """
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    release = getattr(torch._C, "_cuda_releasePool", None)
    if end is None or release is None:
        return
    index = _cuda_index(device)
    for undo in (end, release):  # each on its own: a torch that already ended the routing still holds the pool
        try:
            undo(index, pool)
        except RuntimeError:  # done by torch already
            pass


def describe_error(err: BaseException, limit: int = 600) -> str:
    """``Type: message`` of ``err`` and of the errors it was raised from or while handling, outermost first.
    A capture's first error (an out-of-memory, a host sync) surfaces as the context of the error that
    ending the capture raises; the outer message alone does not say what went wrong."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        err = err.__cause__ or err.__context__
    return " <- ".join(parts)[:limit]


def _release_failed_capture(step: _Step, device: torch.device) -> None:
    """Free what a failed capture left behind before the eager steps need the memory: the gradients its
    backward allocated in the graph's pool (:func:`_abandon_pool` released the pool) and the cached blocks."""
    step.optimizer.zero_grad(set_to_none=True)
    free_gpu_bytes(device)
