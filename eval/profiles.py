"""Named settings for reproducing the reports: ``smoke`` (CPU, minutes) and ``paper`` (GPU).

A profile fixes the model, device, evaluation windows, calibration size and the list of
experiments (method x bit widths) each notebook runs. ``smoke`` exists so a fresh clone can
regenerate every report on a 2-core CPU; ``paper`` uses the papers' settings (128 x 2048
calibration windows, full test sets, methods' paper hyper-parameters).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from qllm_core.methods import QuantConfig
from qllm_core.runs import CalibConfig

from .experiments import Experiment

W4A16 = QuantConfig(w_bits=4)
W4A4 = QuantConfig(w_bits=4, a_bits=4)
W4A4KV4 = QuantConfig(w_bits=4, a_bits=4, kv_bits=4)
W6A6 = QuantConfig(w_bits=6, a_bits=6)
# QLLM / OmniQuant quantize weights and activations asymmetrically (methods.md section 1).
QLLM_BITS = [QuantConfig(w_bits=w, a_bits=a, w_asym=True, a_asym=True) for w, a in ((4, 4), (4, 8), (6, 6))]

RTN_GRID = [
    Experiment("fp"),
    Experiment("rtn", QuantConfig(w_bits=8, a_bits=8)),
    Experiment("rtn", W4A16),
    Experiment("rtn", W4A4),
    Experiment("rtn", W4A4KV4),
]


def method_grid(smoke: bool) -> tuple[list[Experiment], list[Experiment]]:
    """The methods of issues 3-5 at the bit widths their reports need: ``(core, extra)``.

    ``core`` (FP/RTN aside: SmoothQuant, QuaRot, FlatQuant, QLLM at one configuration each) fits
    `make reproduce`'s 30 minutes on 2 CPU cores, set-up included; ``extra`` has GPTQ, OmniQuant, the
    papers' other bit widths and the ablations (asymmetric RTN, QLLM reassembly without error
    correction). ``smoke`` shortens training
    (epochs) and QLLM's threshold sweep (12 evenly spread candidates per site) so the grid runs on a
    2-core CPU in minutes;
    otherwise every method runs with its paper defaults (the method classes' default options).
    """
    short = (lambda **kw: kw) if smoke else (lambda **kw: {})
    omni_bits = QuantConfig(w_bits=4, a_bits=4, kv_bits=4, w_asym=True, a_asym=True)
    core = [
        Experiment("smoothquant", W4A4KV4),
        Experiment("quarot", W4A4KV4),
        Experiment("flatquant", W4A4KV4, short(epochs=2)),
        Experiment("qllm", QLLM_BITS[0], short(epochs=1, max_candidates=12)),
    ]
    extra = [  # issue order: FlatQuant, QLLM (+ its asymmetric RTN baseline), then the other baselines
        Experiment("gptq", W4A16),
        Experiment("omniquant", omni_bits, short(epochs=2)),
        Experiment("flatquant", W4A4, short(epochs=2)),
        Experiment("flatquant", W4A16, short(epochs=2)),
        *[Experiment("rtn", bits, label="rtn-asym") for bits in QLLM_BITS],
        *[Experiment("qllm", bits, {"error_correction": False, **short(max_candidates=12)}, label="qllm-reassembly")
          for bits in QLLM_BITS],
        *[Experiment("qllm", bits, short(epochs=1, max_candidates=12)) for bits in QLLM_BITS[1:]],
        Experiment("smoothquant", W4A4),
        Experiment("smoothquant", W6A6),
        Experiment("rtn", QuantConfig(w_bits=6, a_bits=6)),
        Experiment("quarot", W4A4),
        Experiment("omniquant", replace(omni_bits, kv_bits=16), short(epochs=2)),
        Experiment("quarot", W4A4KV4, {"weight_quantizer": "gptq"}, label="quarot-gptq"),
    ]
    if smoke:  # does error correction help once it trains as many epochs as the paper's (10)?
        extra.append(Experiment("qllm", QLLM_BITS[0], short(epochs=10, max_candidates=12), label="qllm-10ep"))
    return core, extra


@dataclass(frozen=True)
class Profile:
    name: str
    model: str = "embedded"
    device: str = "cpu"
    datasets: tuple[str, ...] = ("wikitext2", "ptb")
    max_windows: int | None = 8
    calib: CalibConfig = CalibConfig(nsamples=128, seqlen=2048)
    zeroshot_subset: int | None = None  # documents per zero-shot task (a fixed seeded sample); None: all
    experiments: tuple[Experiment, ...] = ()
    extra_experiments: tuple[Experiment, ...] = ()

    def grid(self, part: str = "core") -> list[Experiment]:
        """The experiments of ``part``: "core" (what `make reproduce` runs), "extra" or "all"."""
        parts = {"core": self.experiments, "extra": self.extra_experiments,
                 "all": self.experiments + self.extra_experiments}
        if part not in parts:
            raise ValueError(f"unknown grid {part!r}; expected one of {sorted(parts)}")
        return list(parts[part])


_SMOKE_CORE, _SMOKE_EXTRA = method_grid(smoke=True)
SMOKE_ZEROSHOT_SUBSET = 10  # per task: the core grid's 9 models x 6 tasks fit make reproduce's 2-core budget
_PAPER_CORE, _PAPER_EXTRA = method_grid(smoke=False)
PROFILES = {
    # smoke: `make reproduce` runs the core grid in < 30 min on a 2-core CPU; the extra bit widths
    # take as long again and run on request (`--param grid='"extra"'`).
    "smoke": Profile("smoke", calib=CalibConfig(nsamples=8, seqlen=512), zeroshot_subset=SMOKE_ZEROSHOT_SUBSET,
                     experiments=tuple(RTN_GRID + _SMOKE_CORE), extra_experiments=tuple(_SMOKE_EXTRA)),
    # paper: batch_size = windows per forward when the engine propagates activations (not a training setting);
    # concurrent_layers: FlatQuant's layers 6 at a time, same results (tests), 147.8 s -> 109.4 s alone on an H100
    # (reports/bench/gpu_concurrent_layers_H100_stop21.json); compile_quantizers: the trained methods' fake
    # quantizers compiled, alone on an H100 FlatQuant W4A4KV4 91.2 s (graph only ~97 s), QLLM W4A4 97.1 s, with
    # perplexities in line with graph-only runs (reports/bench/gpu_trainer_ab_H100_stop22.json,
    # gpu_paper_grid_H100_stop22.json)
    "paper": Profile("paper", device="cuda", max_windows=None,
                     calib=CalibConfig(nsamples=128, seqlen=2048, batch_size=8, concurrent_layers=6,
                                       compile_quantizers=True),
                     experiments=tuple(RTN_GRID + _PAPER_CORE + _PAPER_EXTRA)),
}


def get_profile(name: str, **overrides) -> Profile:
    """The named profile with any non-None overrides applied (notebook parameters)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; available: {sorted(PROFILES)}")
    return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})
