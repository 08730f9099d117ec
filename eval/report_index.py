"""``reports/index.html``: one page that puts the papers' numbers beside ours, with links to every report.

    python -m eval.report_index        # also run at the end of every `python -m eval.reproduce`

For each kind of table (perplexity, zero-shot, calibration time, speedups) one section shows the
papers' figures (``paper_reported.csv``, ``paper_claims.csv``) next to the reproduced ones
(``perplexity.csv``, ``zeroshot.csv``, ``calibration.csv``, ``speedup.csv``) as *relative*
measures, the only ones that compare across a 7B-70B LLaMA and the 135M embedded model: perplexity
as a ratio to FP, zero-shot averages as points below FP, speedups as ratios to FP16/bf16. Every
section says what differs (model, calibration data, device, profile). Plots are PNGs under
``reports/figures`` referenced by relative links, so the page works from a checkout.
"""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .zeroshot import AVERAGES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The paper rows compared with ours: LLaMA-2-7B, the model both papers report at W4A4.
PAPER_MODEL = "LLaMA-2-7B"
OUR_METHODS = ["rtn", "smoothquant", "omniquant", "quarot", "quarot-gptq", "gptq", "qllm", "qllm-reassembly",
               "flatquant"]


def _read(tables: Path, name: str) -> pd.DataFrame:
    path = tables / name
    return pd.read_csv(path, keep_default_na=False) if path.is_file() else pd.DataFrame()


def _html_table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, classes="t", na_rep="-", float_format=lambda v: f"{v:.2f}")


def ours_profile(table: pd.DataFrame) -> str:
    """The profile to show: ``paper`` where it has quantized rows, else ``smoke``."""
    paper = table[(table.get("profile") == "paper") & (table.get("method") != "fp")] if len(table) else table
    return "paper" if len(paper) else "smoke"


def perplexity_ratios(ppl: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """WikiText-2 perplexity / FP perplexity per (method, bits): the papers' LLaMA-2-7B vs ours."""
    rows = []
    ref = paper[(paper.model == PAPER_MODEL) & (paper.dataset == "wikitext2") & (paper.metric == "ppl")]
    for (pap, table), group in ref.groupby(["paper", "table"]):
        fp = group[group.method == "fp"].value.astype(float)
        for r in group[group.method != "fp"].itertuples():
            rows.append({"source": f"{pap} {table} ({PAPER_MODEL}, the paper's calibration)",
                         "method": r.method, "bits": _bits(r), "ppl / FP": float(r.value) / fp.iloc[0]})
    if len(ppl):
        profile = ours_profile(ppl)
        ours = ppl[(ppl.profile == profile) & (ppl.dataset == "wikitext2")]
        fp = ours[ours.method == "fp"].ppl.astype(float)
        for r in ours[ours.method != "fp"].itertuples():
            rows.append({"source": f"ours, {profile} profile ({r.model}, {r.calib_data} calibration, {r.device})",
                         "method": r.method, "bits": _bits(r), "ppl / FP": float(r.ppl) / fp.iloc[0]})
    return pd.DataFrame(rows, columns=["source", "method", "bits", "ppl / FP"])


def zero_shot_drops(zeroshot: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """Each paper's zero-shot average, points below FP: the papers' LLaMA-2-7B vs ours."""
    rows = []
    ref = paper[(paper.model == PAPER_MODEL) & paper.dataset.str.startswith("avg_")]
    for (pap, dataset), group in ref.groupby(["paper", "dataset"]):
        fp = float(group[group.method == "fp"].value.iloc[0])
        for r in group[group.method != "fp"].itertuples():
            rows.append({"source": f"{pap} ({PAPER_MODEL})", "average": dataset, "method": r.method, "bits": _bits(r),
                         "points below FP": fp - float(r.value), "documents per task": "all"})
    if len(zeroshot):
        profile = ours_profile(zeroshot)
        rows += our_average_drops(zeroshot[zeroshot.profile == profile], profile)
    return pd.DataFrame(rows, columns=["source", "average", "method", "bits", "points below FP", "documents per task"])


def our_average_drops(table: pd.DataFrame, profile: str) -> list[dict]:
    """Our rows of :func:`zero_shot_drops`, computed from the per-task rows with each paper's metrics
    (:data:`eval.zeroshot.AVERAGES`). Where the FP model lacks a task at this subset size, the average
    runs over the tasks it has, for FP and every method alike, and its name says which task is left out."""
    rows = []
    per_task = table[~table.task.str.startswith("avg_")].astype({"w_bits": int, "a_bits": int, "kv_bits": int})
    config = ["method", "w_bits", "a_bits", "kv_bits"]
    for limit, group in per_task.groupby(per_task["limit"].astype(str)):
        scores = {(tuple(k[:4]), k[4], k[5]): float(v) for *k, v in
                  group[config + ["task", "metric", "value"]].itertuples(index=False)}
        for name, metrics in AVERAGES.items():
            tasks = [t for t, m in metrics.items() if (("fp", 16, 16, 16), t, m) in scores]
            if not tasks:
                continue
            left_out = sorted(set(metrics) - set(tasks))
            label = name + (f" without {', '.join(left_out)} (FP lacks it)" if left_out else "")
            fp = sum(scores[(("fp", 16, 16, 16), t, metrics[t])] for t in tasks) / len(tasks)
            for key, cfg in group[group.method != "fp"].groupby(config):
                if all((tuple(key), t, metrics[t]) in scores for t in tasks):
                    mean = sum(scores[(tuple(key), t, metrics[t])] for t in tasks) / len(tasks)
                    first = cfg.iloc[0]
                    rows.append({"source": f"ours, {profile} profile ({first.model}, {first.device})",
                                 "average": label, "method": key[0], "bits": _bits(first),
                                 "points below FP": 100 * (fp - mean), "documents per task": limit})
    return rows


def _bits(row) -> str:
    kv = f"KV{row.kv_bits}" if int(row.kv_bits) != 16 else ""
    return f"W{row.w_bits}A{row.a_bits}{kv}"


def ratio_plot(frame: pd.DataFrame, out: Path) -> Path | None:
    """Bars of ppl / FP per method at W4A4 or W4A4KV4, the papers' LLaMA-2-7B beside ours (log scale)."""
    w4a4 = frame[frame.bits.isin(["W4A4", "W4A4KV4"]) & frame.method.isin(OUR_METHODS)]
    if w4a4.empty:
        return None
    who = w4a4.source.map(lambda src: "ours (135M)" if src.startswith("ours") else f"{src.split(' ')[0]} paper (7B)")
    pivot = w4a4.assign(who=who).pivot_table(index="method", columns="who", values="ppl / FP", aggfunc="min")
    ax = pivot.reindex([m for m in OUR_METHODS if m in pivot.index]).plot.bar(logy=True, figsize=(8, 3.5), rot=30)
    ax.set_ylabel("WikiText-2 ppl / FP (log)")
    ax.set_title("WikiText-2 ppl / FP at W4A4 or W4A4KV4 (the lower of the two where both exist)")
    ax.axhline(1.0, color="grey", lw=0.8)
    plt.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    plt.savefig(out, dpi=110)
    plt.close()
    return out


def calibration_cost_table(cost: pd.DataFrame) -> str:
    """The calibration-cost rows of one profile (paper where measured, else smoke) as an HTML table."""
    if not len(cost):
        return "<p>no rows yet (python -m eval.calibration_cost)</p>"
    profile = "paper" if (cost.profile == "paper").any() else "smoke"
    columns = ["shape", "method", "bits", "layers_measured", "seconds_per_layer", "projected_hours",
               "peak_gpu_mem_gib", "epochs", "trainer", "matmul_precision", "device", "profile", "paper_claim"]
    return _html_table(cost[cost.profile == profile][[c for c in columns if c in cost.columns]])


def build_index(reports: Path = REPO / "reports") -> Path:
    tables = reports / "tables"
    ppl, zeroshot = _read(tables, "perplexity.csv"), _read(tables, "zeroshot.csv")
    calibration, speedup = _read(tables, "calibration.csv"), _read(tables, "speedup.csv")
    cost = _read(tables, "calibration_cost.csv")
    paper, claims = _read(tables, "paper_reported.csv"), _read(tables, "paper_claims.csv")
    ratios = perplexity_ratios(ppl, paper) if len(paper) else pd.DataFrame()
    plot = ratio_plot(ratios, reports / "figures" / "index_ppl_ratio.png") if len(ratios) else None
    sections = [
        ("Perplexity", "Ratio to the FP model's WikiText-2 perplexity. Papers: LLaMA-2-7B, calibrated on "
         "WikiText-2 (QLLM) or WikiText-2/C4 (FlatQuant), A100/RTX 3090. Ours: the embedded SmolLM2-135M, "
         "calibrated on PTB train (no WikiText-2 train offline); profile and device in each row. QLLM's table "
         "leaves the KV cache in FP16 (W4A4), FlatQuant's quantizes it (W4A4KV4).",
         (f'<img src="{plot.relative_to(reports)}" alt="ppl / FP bars">' if plot else "") + _html_table(
             ratios.sort_values(["method", "bits", "source"], kind="stable")) if len(ratios) else "<p>no rows</p>"),
        ("Zero-shot", "Each paper's average (QLLM: five tasks, acc; FlatQuant: six, acc_norm where lm-eval has it), "
         "in points below the FP model. Ours via lm-eval's own task definitions over the offline data; "
         "'documents per task' says whether a seeded subset (smoke: a few documents, stderr of several "
         "points) or the full set was used.",
         _html_table(zero_shot_drops(zeroshot, paper)) if len(paper) else "<p>no rows</p>"),
        ("Calibration time", "The papers' claims (one A100-80G, LLaMA-2-70B) beside ours: wall time of a whole "
         "calibration of the embedded 135M model (30 layers) with the papers' settings (128 x 2048 windows), "
         "median seconds per layer, GPU utilisation and runs sharing the GPU. LLaMA-shaped projections: the "
         "next section.",
         _html_table(claims[claims.claim.str.contains("calibration")]) + _html_table(
             calibration[calibration.profile == "paper"]) if len(claims) else ""),
        ("Calibration cost at LLaMA scale", "Projected hours of a whole calibration on one GPU from a few measured "
         "layers of LLaMA-shaped random-weight models (eval/calibration_cost.py): (seconds per layer x layers + "
         "fixed costs) / 3600, beside the papers' figures (QLLM: LLaMA-2-70B 9.05 h on one A100-80G; FlatQuant: "
         "LLaMA-2-70B 6.15 h, LLaMA-3-70B 5.94 h on one GPU) and the issue's 2 h target on one H100. The paper "
         "profile's rows where measured, else the smoke profile's (SmolLM2-135M shape on the CPU). A shape and "
         "method may have several rows: CUDA-graph or compiled-quantizer steps (trainer), IEEE float32 or TF32 "
         "engine passes (matmul_precision).",
         calibration_cost_table(cost)),
        ("Speedups", "FlatQuant's claims (RTX 3090, which has INT4 tensor cores) beside ours (H100 or H200, as "
         "each row says; LLaMA-2-7B shapes, ratios to bf16 cuBLAS measured in the same run; "
         "reports/kernels_notes.md says where the time goes).",
         _html_table(claims[claims.claim.str.contains("speedup|overhead")]) + _html_table(
             speedup[speedup.phase.isin(["prefill", "decode"])][["shape", "phase", "batch", "kv_len", "variant",
                                                                  "speedup", "device"]]) if len(claims) else ""),
    ]
    links = sorted(p.name for p in reports.glob("*.html") if p.name != "index.html")
    body = ["<h1>qllm-study: the papers beside this reproduction</h1>",
            "<p>Reports: " + " · ".join(f'<a href="{html.escape(n)}">{html.escape(n)}</a>' for n in links) + "</p>",
            "<p>Tables: " + " · ".join(f'<a href="tables/{p.name}">{p.name}</a>'
                                       for p in sorted(tables.glob("*.csv"))) + "</p>"]
    for title, what, content in sections:
        body += [f"<h2>{title}</h2>", f"<p>{html.escape(what)}</p>", content]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto} table.t{border-collapse:collapse;"
             "font-size:13px;margin:8px 0} .t td,.t th{padding:2px 8px;border-bottom:1px solid #ddd}")
    out = reports / "index.html"
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>qllm-study reports</title>"
                   f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    print(build_index())
