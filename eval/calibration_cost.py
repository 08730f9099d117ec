"""Calibration cost at LLaMA scale (issue 11): measure a few layers, project the whole model.

    python -m eval.calibration_cost --profile smoke                     # CPU, ~1 min
    python -m eval.calibration_cost --profile paper --device cuda --shapes llama2-70b --methods qllm

Calibration cost depends on the shapes, the token counts and the method's work, not on the weights'
values, so each job builds a LLaMA-shaped random-weight model (:func:`qllm_core.shapes.shaped_llama`,
planted outlier channels, a 1024-token vocabulary: the embedding is no calibration work) with only the
first ``layers_measured`` decoder layers, and calibrates it with the *same* engine and methods as a real
run (:class:`~qllm_core.engine.BlockwiseEngine`, :func:`qllm_core.methods.make_method`). The calibration
input is ``nsamples x seqlen`` token ids drawn uniformly from the model's vocabulary with a fixed seed:
real PTB-train windows would need the real tokenizer and embedding, and through random weights they give
activations no more realistic than random ids do; the work per token is the same.

Methods (the papers' settings): QLLM W4A4 (asymmetric; channel reassembly with its full threshold search
and low-rank error correction over groups of 4 layers, 10 epochs), FlatQuant W4A4KV4 (15 epochs), and for
reference GPTQ W4A16 and QuaRot W4A4KV4 (RTN weights: no calibration data, its cost is the rotation).

Projection (one row per job):

* ``seconds_per_layer``: the median over the measured layer groups *after the first* (the warm-up group:
  CUDA context, cuBLAS handles, first CUDA-graph capture) of a group's wall time divided by its layers.
  With a single group the warm-up group is used, and ``timed_groups`` says so.
* ``fixed_seconds``: engine time outside the layer groups (capture of layer 0's inputs, the final move
  to the host) plus the method's ``prepare_model`` scaled by ``layers_total / layers_measured`` (it
  touches every layer: QuaRot rotates every weight there; ~0 for the others), plus what the warm-up
  group took beyond ``seconds_per_layer`` per layer (paid once: CUDA context, first captures, the
  compilation of ``--compile-quantizers``; rows measured before 2026-11-27 lack this term).
* ``projected_hours = (seconds_per_layer x layers_total + fixed_seconds) / 3600``.
* Epochs: a trained method may be measured with fewer epochs than its paper's (``epochs`` column,
  "measured/paper") to keep the GPU time within budget. Every epoch is the same number of identical steps,
  so each group's training time (``train_block``'s wall time, read from the method after each
  calibrate call) is scaled by ``paper / measured`` and the rest of the group's time is kept. This
  over-counts the per-group CUDA-graph capture (a few steps) ``paper / measured - 1`` times: an upper bound.

``trainer``: how the training steps ran (:func:`qllm_core.training.train_block`): ``graph`` (CUDA graph, the
default on a GPU), ``graph+compile`` (``--compile-quantizers``: each fake quantizer's forward and backward
compiled by inductor, a few fused kernels instead of ~25 on weight- and activation-sized tensors), ``eager``
(CPU; also a GPU row whose capture failed and ran eagerly, as LLaMA-2-70B FlatQuant in stop 20's first
call), ``-`` for the untrained methods. ``matmul_precision``: the engine's float32 matmul precision on the
GPU (:class:`~qllm_core.engine.BlockwiseEngine`): ``highest`` (IEEE float32, as the study's runs) or ``high``
(``--tf32``: TF32 tensor cores for the float32 passes through each layer). Rows differing in either are kept
side by side.

Other columns: ``peak_gpu_mem_gib`` (``torch.cuda.max_memory_allocated`` over the job, "-" on the CPU);
``est_gpu_mem_gib``: :func:`qllm_core.memory_budget.estimate_group_memory` for this job, the number the
fits-one-GPU check used; ``host_mem_gib``: what a full run needs on the host, computed, not measured: all
``layers_total`` layers plus the untied embedding and LM head at the real vocabulary in the engine's dtype,
plus the calibration activations when the engine's rule puts them on the host; ``paper_claim``: the
papers' figure for this shape and method and the issue's target, if any.

Before any model is built, each job's GPU memory is estimated for one layer group and the job refuses to
start (:class:`~qllm_core.memory_budget.DoesNotFitError`) when it cannot fit the GPU (or the
``gpu_memory_gib`` given, to ask about a smaller card).

GPU time per job, measured on an H200 (``paper`` profile, 128 x 2048 windows, float32 models as real runs
use; training steps under the methods' autocast, FlatQuant fp16 and QLLM bf16 as their official codes;
model construction on the host ~10 s per 70B layer):

* FlatQuant on LLaMA-2/3-70B shapes, ``--layers 2 --epochs 5``: 2.0-2.5 min (float32 passes, CUDA graph),
  ~2 min with ``--tf32 --compile-quantizers`` (layer 0 pays the compilation).
* QLLM on LLaMA-2-70B shapes at 1 of 10 epochs: ``--layers 4`` ~4.3 min in float32; ``--layers 8`` (two
  groups, so the warm-up group is left out of ``seconds_per_layer``) ~5 min with ``--tf32``.
* LLaMA-2-7B / LLaMA-3-8B, FlatQuant (3 layers) and QLLM (8 layers): a few minutes per shape.
* GPTQ + QuaRot on LLaMA-2-70B shapes (2 layers each): ~4.7 min (QuaRot's host-side rotation dominates).

On one H100 80GB (stop 21, 16 host cores, no staging needed: torch, transformers and pandas suffice): QLLM on
LLaMA-2-70B ``--layers 8 --tf32 --compile-quantizers`` 7.7 min (activations on the host by the engine's
rule); FlatQuant on LLaMA-3-70B ``--layers 2 --epochs 5 --tf32 --compile-quantizers`` 2.1 min; at 7B/8B,
QLLM ~2.8 min and FlatQuant 2.3-2.6 min per shape.

Split the paper set (``--shapes`` / ``--methods``) into commands of at most ~10 minutes; see the README.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from qllm_core.adapters import ModelAdapter
from qllm_core.engine import BlockwiseEngine, activation_copies, activation_storage
from qllm_core.gpu_monitor import PeakMemory, free_gpu_bytes
from qllm_core.memory_budget import GIB, check_fits_one_gpu, estimate_group_memory, host_merge_bytes, layer_parameters
from qllm_core.methods import QuantConfig, make_method
from qllm_core.methods.flatquant import DEFAULTS as FLATQUANT_DEFAULTS
from qllm_core.methods.qllm import DEFAULT_OPTIONS as QLLM_DEFAULTS
from qllm_core.shapes import SHAPES, shape_config, shaped_llama
from qllm_core.training import trainer_label

from .experiments import device_label
from .reports import upsert_rows

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TABLE = REPO / "reports" / "tables" / "calibration_cost.csv"
VOCAB = 1024  # the measured model's vocabulary: the embedding is no calibration work
SEED = 0

CALIBRATION_COST_COLUMNS = ["shape", "method", "bits", "layers_measured", "layers_total", "seconds_per_layer",
                            "projected_hours", "peak_gpu_mem_gib", "calib_samples", "calib_seqlen", "device",
                            "profile", "fixed_seconds", "host_mem_gib", "est_gpu_mem_gib", "epochs", "trainer",
                            "matmul_precision", "timed_groups", "paper_claim"]
# A row is one measurement: the same job on the same device replaces it; another device's is kept beside.
CALIBRATION_COST_KEYS = ["shape", "method", "bits", "layers_measured", "calib_samples", "calib_seqlen", "epochs",
                         "trainer", "matmul_precision", "profile", "device"]


@dataclass(frozen=True)
class MethodSpec:
    """A method as this report runs it: engine name, bit widths, paper options, paper epochs (None: untrained)."""

    name: str
    quant: QuantConfig
    paper_epochs: int | None = None
    default_layers: int = 2  # one warm-up group + at least one timed group


METHODS: dict[str, MethodSpec] = {
    "qllm": MethodSpec("qllm", QuantConfig(w_bits=4, a_bits=4, w_asym=True, a_asym=True), QLLM_DEFAULTS["epochs"],
                       2 * QLLM_DEFAULTS["num_layer"]),
    "flatquant": MethodSpec("flatquant", QuantConfig(w_bits=4, a_bits=4, kv_bits=4), FLATQUANT_DEFAULTS["epochs"], 3),
    "gptq": MethodSpec("gptq", QuantConfig(w_bits=4)),
    "quarot": MethodSpec("quarot", QuantConfig(w_bits=4, a_bits=4, kv_bits=4)),
}

# The papers' calibration times (shared/docs/paper-tables-full.md) and the issue's targets.
PAPER_CLAIMS: dict[tuple[str, str], str] = {
    ("llama2-7b", "qllm"): "1.05 h, 1x A100-80G (QLLM App. O Table N)",
    ("llama2-13b", "qllm"): "1.79 h, 1x A100-80G (QLLM App. O Table N)",
    ("llama2-70b", "qllm"): "9.05 h, 1x A100-80G (QLLM App. O Table N; abstract: < 10 h); issue target <= 2 h, 1x H100",
    ("llama2-7b", "flatquant"): "1.15 h, one GPU, model not named (FlatQuant Table 5 / F10)",
    ("llama2-13b", "flatquant"): "1.55 h, one GPU, model not named (FlatQuant Table 5 / F10)",
    ("llama2-70b", "flatquant"): "6.15 h, one GPU, model not named (FlatQuant Table 5 / F10)",
    ("llama3-8b", "flatquant"): "0.90 h, one GPU, model not named (FlatQuant Table 5 / F10; text: ~26 GB)",
    ("llama3-70b", "flatquant"): "5.94 h, one GPU, model not named (FlatQuant Table 5 / F10); "
                                 "issue target <= 2 h, 1x H100",
}


@dataclass(frozen=True)
class CostProfile:
    """Which jobs run, on what calibration size, and how many layers / epochs are measured."""

    name: str
    jobs: tuple[tuple[str, str], ...]  # (shape, method)
    nsamples: int
    seqlen: int
    device: str
    batch_size: int = 8  # windows per engine forward pass (the perplexity profiles' paper setting)
    layers: dict = field(default_factory=dict)  # method -> layers measured (default: MethodSpec.default_layers)
    options: dict = field(default_factory=dict)  # method -> options for the measured run (epochs...)


PROFILES = {
    # ~1 min on 2 CPU cores: the SmolLM2-135M shape, 4 x 128 tokens, short training and search.
    "smoke": CostProfile("smoke", tuple(("smollm2-135m", m) for m in METHODS), 4, 128, "cpu", batch_size=4,
                         options={"qllm": {"epochs": 1, "max_candidates": 12}, "flatquant": {"epochs": 2}}),
    # The papers' calibration size. QLLM is measured at 1 of its 10 epochs by default (GPU budget; docstring).
    "paper": CostProfile("paper", tuple((s, m) for s in ("llama2-7b", "llama3-8b", "llama2-70b") for m in METHODS)
                         + (("llama3-70b", "flatquant"),), 128, 2048, "cuda",
                         options={"qllm": {"epochs": 1}}),
}


def get_profile(name: str) -> CostProfile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; available: {sorted(PROFILES)}")
    return PROFILES[name]


def method_spec(method: str) -> MethodSpec:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for the calibration-cost report; available: {sorted(METHODS)}")
    return METHODS[method]


# -- the arithmetic ----------------------------------------------------------------------------------
def group_sizes(layers: int, per_group: int) -> list[int]:
    """Layers in each group the engine walks (the last one may be short)."""
    return [min(per_group, layers - first) for first in range(0, layers, per_group)]


def seconds_per_layer(group_seconds: list[float], sizes: list[int]) -> tuple[float, str]:
    """Median per-layer seconds over the groups after the first (warm-up) one, and how it was chosen.

    With one group only, that group is used and the note says the warm-up is included.
    """
    if not group_seconds or len(group_seconds) != len(sizes):
        raise ValueError(f"need one time per group, got {len(group_seconds)} times for {len(sizes)} groups")
    per_layer = [t / n for t, n in zip(group_seconds, sizes)]
    if len(per_layer) == 1:
        return per_layer[0], "1 (warm-up included: only one group measured)"
    return statistics.median(per_layer[1:]), f"{len(per_layer) - 1} after 1 warm-up"


def warm_up_surcharge(group_seconds: list[float], sizes: list[int], per_layer: float) -> float:
    """What the first (warm-up) group took beyond ``per_layer`` seconds per layer: one-time costs (CUDA context,
    first captures, compilation) a whole run pays once. 0 with a single group, whose time is ``per_layer``."""
    if len(group_seconds) < 2:
        return 0.0
    return max(group_seconds[0] - per_layer * sizes[0], 0.0)


def scale_epochs(group_seconds: list[float], train_seconds: list[float], measured: int | None,
                 paper: int | None) -> list[float]:
    """Group times at the paper's epochs: each group's training time scaled by ``paper / measured``."""
    if not measured or not paper or measured == paper:
        return list(group_seconds)
    return [g + t * (paper / measured - 1) for g, t in zip(group_seconds, train_seconds)]


def projected_hours(per_layer: float, layers_total: int, fixed_seconds: float) -> float:
    """``(seconds_per_layer x layers_total + fixed_seconds) / 3600``."""
    return (per_layer * layers_total + fixed_seconds) / 3600


def host_memory_gib(config, layers_total: int, vocab_size: int, dtype: torch.dtype, method,
                    nsamples: int, seqlen: int, gpu_bytes: int | None) -> float:
    """Host GiB of a full run: every layer + untied embedding/LM head in ``dtype``, plus the calibration
    activations when :func:`~qllm_core.engine.activation_storage` keeps them on the host, plus QLLM's copy
    of one group's unquantized weights for the error-correction merge."""
    item = torch.empty((), dtype=dtype).element_size()
    model = (layers_total * layer_parameters(config) + 2 * vocab_size * config.hidden_size) * item
    need = activation_copies(method) * nsamples * seqlen * config.hidden_size * item
    device = torch.device("cuda") if gpu_bytes is not None else torch.device("cpu")
    on_host = need > 0 and activation_storage(device, need, gpu_bytes).type == "cpu"
    return (model + (need if on_host else 0) + host_merge_bytes(config, method, dtype)) / GIB


# -- one job -------------------------------------------------------------------------------------------
class _Tally:
    """The method as the engine sees it (every call delegated), noting ``prepare_model``'s wall time and
    each layer group's training time (``method.train_stats`` after each calibrate call)."""

    def __init__(self, method):
        self.__dict__.update(_method=method, prepare_seconds=0.0, train_seconds=[], _group=0.0)

    def __getattr__(self, name):
        return getattr(self._method, name)

    def prepare_model(self, model, adapter):
        start = time.perf_counter()
        self._method.prepare_model(model, adapter)
        self.prepare_seconds = time.perf_counter() - start

    def _trained(self, call, *args):
        before = getattr(self._method, "train_stats", None)
        call(*args)
        after = getattr(self._method, "train_stats", None)
        if after is not None and after is not before:
            self._group += after.wall_seconds

    def calibrate_layer(self, layer, ctx):
        self._trained(self._method.calibrate_layer, layer, ctx)

    def calibrate_group(self, group, ctx):
        self._trained(self._method.calibrate_group, group, ctx)
        self.train_seconds.append(self._group)
        self._group = 0.0


def measure(shape: str, method: str, layers: int | None = None, nsamples: int = 128, seqlen: int = 2048,
            device: str = "cpu", profile: str = "paper", options: dict | None = None, batch_size: int = 8,
            gpu_memory_gib: float | None = None, dtype: torch.dtype = torch.float32,
            compile_quantizers: bool = False, matmul_precision: str = "highest") -> dict:
    """Calibrate the first ``layers`` layers of ``shape`` with ``method`` and return its report row.

    ``options`` override the method's paper options for the measured run (e.g. ``epochs``);
    ``gpu_memory_gib``: check the fits-one-GPU estimate against this capacity instead of the GPU's free
    memory (on the CPU the check runs only when it is given). ``compile_quantizers``: see ``trainer``
    in the module docstring (needs CUDA).
    """
    spec = method_spec(method)
    options = dict(options or {})
    qmethod = make_method(spec.name, spec.quant, **options)
    on_gpu = torch.device(device).type == "cuda"
    if compile_quantizers and not on_gpu:
        raise ValueError("--compile-quantizers needs a CUDA device")
    qmethod.trainer = {"compile_quantizers": True} if compile_quantizers else {}
    config = shape_config(shape)
    total = config.num_hidden_layers
    layers = layers or spec.default_layers
    if not 1 <= layers <= total:
        raise ValueError(f"{shape} has {total} decoder layers; cannot measure {layers}")
    gpu_bytes = (int(gpu_memory_gib * GIB) if gpu_memory_gib is not None
                 else free_gpu_bytes(device) if on_gpu else None)
    estimate = estimate_group_memory(config, qmethod, nsamples, seqlen, dtype, gpu_bytes or 80 * GIB, batch_size)
    if gpu_bytes is not None:  # before anything is built
        check_fits_one_gpu(f"{shape} / {method} {spec.quant.label}", estimate, gpu_bytes)

    model = shaped_llama(shape, layers=layers, seed=SEED, vocab_size=VOCAB, dtype=dtype)
    ids = torch.randint(0, VOCAB, (nsamples, seqlen), generator=torch.Generator().manual_seed(SEED))
    tally = _Tally(qmethod)
    engine = BlockwiseEngine(model, ModelAdapter(model), device, None, batch_size, matmul_precision)
    if on_gpu:
        torch.cuda.synchronize(device)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        engine.run(tally, ids if qmethod.needs_calibration else None)
        if on_gpu:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start

    sizes = group_sizes(layers, qmethod.layers_per_group)
    measured_epochs = options.get("epochs", spec.paper_epochs) if spec.paper_epochs else None
    train = tally.train_seconds if len(tally.train_seconds) == len(sizes) else [0.0] * len(sizes)
    groups = scale_epochs(engine.group_seconds, train, measured_epochs, spec.paper_epochs)
    per_layer, timed = seconds_per_layer(groups, sizes)
    outside = max(wall - sum(engine.group_seconds) - tally.prepare_seconds, 0.0)
    fixed = outside + tally.prepare_seconds * total / layers + warm_up_surcharge(groups, sizes, per_layer)
    return {
        "shape": shape, "method": method, "bits": spec.quant.label, "layers_measured": layers, "layers_total": total,
        "seconds_per_layer": round(per_layer, 3), "projected_hours": round(projected_hours(per_layer, total, fixed), 3),
        "peak_gpu_mem_gib": round(peak.peak / GIB, 2) if on_gpu else "-",
        "calib_samples": nsamples if qmethod.needs_calibration else 0,
        "calib_seqlen": seqlen if qmethod.needs_calibration else 0,
        "device": device_label(device), "profile": profile, "fixed_seconds": round(fixed, 2),
        "host_mem_gib": round(host_memory_gib(config, total, SHAPES[shape]["vocab_size"], dtype, qmethod, nsamples,
                                              seqlen, gpu_bytes if on_gpu else None), 1),
        "est_gpu_mem_gib": round(estimate.total / GIB, 1),
        "epochs": f"{measured_epochs}/{spec.paper_epochs}" if spec.paper_epochs else "-",
        "trainer": trainer_label(bool(spec.paper_epochs), on_gpu, compile_quantizers),
        "matmul_precision": matmul_precision if on_gpu else "-",
        "timed_groups": timed, "paper_claim": PAPER_CLAIMS.get((shape, method), "-"),
    }


def save_row(table: str | Path, row: dict) -> pd.DataFrame:
    """Merge one row into the calibration-cost table (CSV + Markdown), replacing the same measurement."""
    return upsert_rows(table, [row], CALIBRATION_COST_COLUMNS, keys=CALIBRATION_COST_KEYS)


def run_profile(profile: str, shapes: list[str] | None = None, methods: list[str] | None = None,
                layers: int | None = None, device: str | None = None, table: str | Path = DEFAULT_TABLE,
                epochs: int | None = None, gpu_memory_gib: float | None = None,
                compile_quantizers: bool = False, matmul_precision: str = "highest") -> list[dict]:
    """Run the profile's jobs (or ``shapes`` x ``methods``), saving each row as it finishes."""
    settings = get_profile(profile)
    for s in shapes or []:
        shape_config(s)  # an unknown shape fails here, before any job runs
    for m in methods or []:
        method_spec(m)
    jobs = [(s, m) for s, m in settings.jobs if (not shapes or s in shapes) and (not methods or m in methods)]
    if shapes and methods:  # an explicit request runs every pair
        jobs = [(s, m) for s in shapes for m in methods]
    rows = []
    for shape, method in tqdm(jobs, desc="calibration-cost jobs"):
        options = dict(settings.options.get(method, {}))
        if epochs is not None and METHODS[method].paper_epochs:
            options["epochs"] = epochs
        row = measure(shape, method, layers or settings.layers.get(method), settings.nsamples, settings.seqlen,
                      device or settings.device, settings.name, options, settings.batch_size, gpu_memory_gib,
                      compile_quantizers=compile_quantizers, matmul_precision=matmul_precision)
        save_row(table, row)
        rows.append(row)
        tqdm.write(f"{shape} {method}: {row['seconds_per_layer']} s/layer -> {row['projected_hours']} h "
                   f"(peak GPU {row['peak_gpu_mem_gib']} GiB, estimate {row['est_gpu_mem_gib']} GiB)")
    return rows


# -- for the notebook ------------------------------------------------------------------------------------
def read_table(table: str | Path = DEFAULT_TABLE, profile: str | None = None) -> pd.DataFrame:
    path = Path(table)
    if not path.is_file():
        return pd.DataFrame(columns=CALIBRATION_COST_COLUMNS)
    frame = pd.read_csv(path, keep_default_na=False)
    return frame[frame.profile == profile] if profile else frame


def claims_table() -> pd.DataFrame:
    """The papers' calibration times and the issue's targets, one row per (shape, method)."""
    return pd.DataFrame([{"shape": s, "method": m, "paper_claim": c} for (s, m), c in PAPER_CLAIMS.items()])


def plot_projection(frame: pd.DataFrame, ax=None):
    """Bars of projected hours per shape and method (log scale; the fastest of a shape and method's rows, which
    may differ in ``trainer`` / ``matmul_precision``), with the issue's 2 h target."""
    import matplotlib.pyplot as plt

    pivot = frame.assign(projected_hours=frame.projected_hours.astype(float)).pivot_table(
        index="shape", columns="method", values="projected_hours", aggfunc="min")
    ax = pivot.plot.bar(logy=True, rot=0, figsize=(8, 3.5), ax=ax)
    ax.axhline(2.0, color="grey", lw=0.8, ls="--", label="issue target (2 h, 70B)")
    ax.set_ylabel("projected calibration hours (log)")
    ax.legend(fontsize=8)
    plt.tight_layout()
    return ax


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.calibration_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke", choices=sorted(PROFILES))
    parser.add_argument("--shapes", nargs="*", help=f"default: the profile's; from {sorted(SHAPES)}")
    parser.add_argument("--methods", nargs="*", help=f"default: the profile's; from {sorted(METHODS)}")
    parser.add_argument("--layers", type=int, help="layers measured (default per method: qllm 8, flatquant 3, else 2)")
    parser.add_argument("--epochs", type=int, help="epochs of the trained methods for the measured run "
                                                   "(projected to the paper's; default: the profile's)")
    parser.add_argument("--device", help="cpu / cuda (default: the profile's)")
    parser.add_argument("--gpu-memory-gib", type=float, help="check the fits-one-GPU estimate against this capacity")
    parser.add_argument("--compile-quantizers", action="store_true",
                        help="train with compiled fake quantizers (CUDA; the trainer column says graph+compile)")
    parser.add_argument("--tf32", action="store_true",
                        help="the engine's float32 matmuls on TF32 tensor cores (matmul_precision high)")
    parser.add_argument("--table", default=str(DEFAULT_TABLE))
    args = parser.parse_args(argv)
    run_profile(args.profile, args.shapes, args.methods, args.layers, args.device, args.table, args.epochs,
                args.gpu_memory_gib, args.compile_quantizers, "high" if args.tf32 else "highest")
    print(read_table(args.table, args.profile).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
