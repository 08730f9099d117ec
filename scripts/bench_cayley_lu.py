"""FlatQuant's Cayley solves per training step: torch's own LU choice vs cuSOLVER, in a CUDA graph.

    python scripts/bench_cayley_lu.py OUT.json

Why: FlatQuant W4A4KV4 on the embedded model took 4.2 s per layer alone on an H200 before commit c8d14b3
forced cuSOLVER's LU for every captured solve, and 7.0 s after it, with the GPU ~99 % busy. One step of
a FlatQuant layer of the embedded model solves five batches of small Cayley systems (shapes below,
read from a CPU step); this times exactly that work — forward solves and their backward — replayed from
one CUDA graph per backend, so the two can be compared on one GPU in seconds.
"""
from __future__ import annotations

import json
import sys

import torch

# (batch, n) of the five batched solves of one FlatQuant training step of SmolLM2-135M (d = 576 = 24 x 24,
# intermediate 1536 = 32 x 48, 9 heads, head_dim 64)
STEP_SOLVES = [(8, 24), (2, 32), (2, 48), (4, 64), (2, 9)]
REPLAYS = 200


def cayley_step(params: list[torch.Tensor]) -> None:
    """Forward + backward of the Cayley factors P = (I - S)^-1 (I + S), S = A - Aᵀ, for every batch."""
    loss = 0.0
    for a in params:
        skew = a - a.mT
        eye = torch.eye(a.shape[-1], device=a.device).expand_as(a)
        loss = loss + torch.linalg.solve(eye - skew, eye + skew).square().sum()
    loss.backward()


def measure(backend: str) -> dict:
    torch.backends.cuda.preferred_linalg_library(backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [(0.1 * torch.randn(b, n, n, device="cuda", generator=gen)).requires_grad_() for b, n in STEP_SOLVES]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            cayley_step(params)
    torch.cuda.current_stream().wait_stream(stream)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            cayley_step(params)
    except RuntimeError as err:
        return {"backend": backend, "error": f"{type(err).__name__}: {err}"[:300]}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return {"backend": backend, "ms_per_step": round(start.elapsed_time(end) / REPLAYS, 4)}


def main(out: str) -> None:
    rows = [measure(backend) for backend in ("default", "cusolver", "magma")]
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "solves_per_step": STEP_SOLVES,
              "replays": REPLAYS, "rows": rows}
    print(json.dumps(record, indent=1))
    with open(out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
