"""How busy the GPU was during a piece of work (NVML utilization, sampled in the background), its peak
memory (:class:`PeakMemory`), the memory still free for it (:func:`free_gpu_bytes`, within a cap set by
:func:`cap_gpu_memory`) and where its wall time went (:func:`timed`).

NVML's utilization is the share of the last sample period (1/6 s to 1 s, by GPU) in which one or
more kernels ran, for the whole device (other processes' kernels count too: a run sharing the GPU
reports the sharing). Averaged over a calibration it is the "device time share" issue 9 asks for:
near 1 when the GPU, not Python, sets the pace. Without NVML bindings (``pynvml``) it reports None.
"""
from __future__ import annotations

import contextlib
import gc
import threading
import time

import torch


class UtilizationSampler:
    """Context manager: ``mean`` = average NVML utilization (0-1) over the block, or None."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.2):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(torch.cuda.utilization(self.device))

    def __enter__(self) -> "UtilizationSampler":
        if self.device.type == "cuda":
            try:
                torch.cuda.utilization(self.device)
            except (ModuleNotFoundError, ImportError, RuntimeError):  # no NVML bindings / driver access
                return self
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / (100.0 * len(self.samples)) if self.samples else None


class PeakMemory:
    """Peak allocated GPU memory (bytes, ``peak``) between :meth:`start` and :meth:`stop`, and the peak the
    caching allocator reserved from the driver (``peak_reserved``: what the process actually holds beyond its
    CUDA context — freed blocks kept for reuse and CUDA-graph pools included; it decides how many runs fit one
    GPU); also a context manager. On a device that is not a GPU it measures nothing (both stay 0).

    torch keeps one set of peak counters per device, and a measurement resets them: an inner measurement (the
    training loop's warm-up steps) would erase the peaks an outer one (a whole calibration's
    ``peak_gpu_mem_gib``) is collecting. So every measurement running when another starts or stops is
    handed the peaks seen so far, and nesting gives each its true peaks.
    """

    _running: list["PeakMemory"] = []

    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.base = self.peak = self.peak_reserved = 0

    def _counters(self) -> tuple[int, int]:
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)

    def _hand_over(self, peak: int, peak_reserved: int) -> None:
        for measurement in PeakMemory._running:
            if measurement.device == self.device:
                measurement.peak = max(measurement.peak, peak)
                measurement.peak_reserved = max(measurement.peak_reserved, peak_reserved)

    def start(self) -> "PeakMemory":
        if self.device.type != "cuda":
            return self
        self._hand_over(*self._counters())
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = self.peak = torch.cuda.memory_allocated(self.device)  # base: allocated at the start
        self.peak_reserved = torch.cuda.memory_reserved(self.device)
        PeakMemory._running.append(self)
        return self

    def stop(self) -> int:
        if self in PeakMemory._running:
            PeakMemory._running.remove(self)
            peak, peak_reserved = self._counters()
            self.peak, self.peak_reserved = max(self.peak, peak), max(self.peak_reserved, peak_reserved)
            self._hand_over(self.peak, self.peak_reserved)
        return self.peak

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# Per-process caps set by cap_gpu_memory, in bytes by device index: what this process may hold at most.
_CAPS: dict[int, int] = {}


def cap_gpu_memory(device: torch.device | str, share: float) -> None:
    """Cap what this process's caching allocator may hold on ``device`` at ``share`` of its memory.

    Runs sharing one GPU each keep the blocks they freed cached for themselves; only a process that runs out
    hands its cache back, so the others fail: in the stop-23 grid (8 runs on an 80 GB H100,
    reports/bench/gpu_session_H100_stop23.json) runs whose peak allocation was 5-8 GiB held up to 22.4 GiB
    and nine runs died out of memory. Under a cap the allocator hands its own cache back and retries when
    an allocation would pass it, so a run holds little more than it uses."""
    if not 0 < share <= 1:
        raise ValueError(f"GPU memory share must be in (0, 1], got {share}")
    index = _index(torch.device(device))
    torch.cuda.set_per_process_memory_fraction(share, index)
    _CAPS[index] = int(share * torch.cuda.get_device_properties(index).total_memory)


def _index(device: torch.device) -> int:
    """The CUDA device index ``device`` names ("cuda" alone: the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _room(device: torch.device) -> int:
    """Bytes this process can still take from the driver: its free memory, within this process's cap."""
    free = torch.cuda.mem_get_info(device)[0]
    if _index(device) in _CAPS:
        free = min(free, _CAPS[_index(device)] - torch.cuda.memory_reserved(device))
    return free


def free_gpu_bytes(device: torch.device | str, enough: int | None = None) -> int:
    """Bytes the driver can still give this process on ``device`` (within its :func:`cap_gpu_memory` cap),
    after handing back what this process holds cached but no longer uses (unreachable Python objects, the
    caching allocator's free blocks). ``mem_get_info`` alone counts those as used: one calibration-cost job
    refused to start because the jobs before it in the same process had left ~90 GiB cached
    (reports/bench/gpu_session_4xH200.json). The cap matters before a CUDA-graph capture: its private pool
    takes new blocks, and the allocator cannot hand its cache back during a capture.

    With ``enough``, the clean-up runs only when less than ``enough`` is free without it: a
    ``gc.collect`` takes ~0.2 s in a process that has imported torch, transformers and lm-eval (this repo's
    2-core CPU host: reports/bench/quantizer_tie_flip_cpu.json), and handing the cache back makes the next allocations ask the driver again; a
    calibration asked before every one of its CUDA-graph captures (issue 9)."""
    device = torch.device(device)
    if enough is not None:
        torch.cuda.synchronize(device)
        free = _room(device)
        if free >= enough:
            return free
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return _room(device)


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str, device: torch.device | str):
    """Add the block's wall time to ``seconds[name]``; on a GPU after a synchronisation, so the block's
    asynchronous work is counted in it, not in whatever synchronises next."""
    device = torch.device(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
