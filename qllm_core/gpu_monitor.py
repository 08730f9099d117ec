"""How busy the GPU was during a piece of work: NVML utilization, sampled in the background.

NVML's utilization is the share of the last sample period (1/6 s to 1 s, by GPU) in which one or
more kernels ran, for the whole device (other processes' kernels count too: a run sharing the GPU
reports the sharing). Averaged over a calibration it is the "device time share" issue 9 asks for:
near 1 when the GPU, not Python, sets the pace. Without NVML bindings (``pynvml``) it reports None.
"""
from __future__ import annotations

import threading

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
