"""Speed benchmarks of the int4 kernels against bf16 on one GPU (issue 6, item 5).

Every ratio compares against a baseline measured in the same process, same run, on the named
device. Prefill-size work is timed with ``triton.testing.do_bench`` (median, L2 flushed before
each call); decode-size work runs inside a CUDA graph (``do_bench_cudagraph``) so that launch
gaps do not dominate, and single GEMV/linear timings cycle through enough weight copies to
exceed the L2 cache. Layer shapes only: weights are random, values do not change cost.

Phases (rows of reports/tables/speedup.csv, long format):
  kernel1  fused transform+quantize vs plain PyTorch (two bf16 matmuls + quantize + pack)
  gemm     W4A4 GEMM (FP8 / int8 tensor cores) vs bf16 cuBLAS; FP8 and int8 cuBLAS for reference
  gemv     decode GEMV (W4A4, W4A16, and W4A4 with its transform+quantize launch) vs bf16; at 1-4 tokens also
           the CUDA-core GEMV of kernels/w4_gemv.py (w4a4_core, w4a4_core_dp4a, w4a16_core); PyTorch's int4 kernel for
           reference (tinygemm_g128: torch._weight_int4pack_mm, group 128, timing only)
  linear   one W4A4 linear with FlatQuant's online transform vs bf16 cuBLAS
  layers   rows of phase prefill / decode: one decoder layer, variants of kernels.llama_layer vs bf16
           (incl. w4a4-fp8 / flatquant-fp8: prefill GEMMs on cuBLAS FP8, kernels/fp8_linear.py;
           decode rows also for KV4_VARIANTS and DP4A_VARIANTS: a 4-bit KV cache read by
           kernels/kv4_attention.py, and/or the linears decoding through the dp4a GEMV of kernels/w4_gemv.py)
  model    rows of phase prefill / decode with shape "llama2-7b-model": a stack of 32 LLaMA-2-7B
           decoder layers (no embedding / LM head), quantized variants vs bf16 with the same bf16
           SDPA attention; prefill batch x 2048 tokens, decode = one step (ms per token) at a
           pre-filled KV cache of kv_len tokens. Columns mem_gb / baseline_mem_gb: peak GPU memory
           (torch.cuda.max_memory_allocated) of one untimed forward: weights + input + KV cache +
           activations; the weights alone go to tables/speedup_model_memory.csv. Not in the default
           phases (~45 GB of GPU memory at batch 16, KV 4096): ``--phases model``.

CLI: ``python -m eval.speedup --out reports [--quick] [--shapes llama2-7b ...] [--phases ...] [--merge] [--sweep]``.
``--merge`` keeps the rows of earlier runs in tables/speedup.csv and replaces only those this run
measured again (same shape, phase, batch, seqlen, kv_len, variant, baseline).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

COLUMNS = ["shape", "phase", "batch", "seqlen", "kv_len", "variant", "baseline", "baseline_ms", "ms", "speedup",
           "device", "tflops", "gbps", "mem_gb", "baseline_mem_gb"]
MEM_COLUMNS = ["mem_gb", "baseline_mem_gb"]  # appended later: rows without a measurement hold "-" in the csv
KEY_COLUMNS = ["shape", "phase", "batch", "seqlen", "kv_len", "variant", "baseline"]
PREFILL_SEQ = 2048
MODEL_LAYERS = 32  # LLaMA-2-7B
L2_BYTES = 50 * 2**20


def _cuda():
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("eval.speedup needs a CUDA GPU: no timings are produced on this machine "
                         "(the committed reports/tables/speedup.csv holds the measured ones).")
    return torch


def _bench(fn, graph: bool = False) -> float:
    """Median milliseconds of fn()."""
    import triton.testing as tt
    fn()  # compile / autotune outside the timed region
    if graph:
        return tt.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return tt.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _rotating(make, nbytes: int):
    """A closure running `make()`-built callables over enough copies to exceed L2; returns (fn, copies)."""
    copies = max(1, math.ceil(3 * L2_BYTES / max(nbytes, 1)))
    fns = [make() for _ in range(copies)]
    return (lambda: [f() for f in fns]), copies


class _Rows:
    def __init__(self, device: str):
        self.rows, self.device = [], device
        self.model_weights = []  # weights-only GB per whole-model variant (bench_model)

    def add(self, shape, phase, variant, baseline, baseline_ms, ms, batch=1, seqlen=0, kv_len=0, flop=None, nbytes=None,
            mem_gb=None, baseline_mem_gb=None):
        row = dict(shape=shape, phase=phase, batch=batch, seqlen=seqlen, kv_len=kv_len, variant=variant,
                   baseline=baseline, baseline_ms=round(baseline_ms, 5), ms=round(ms, 5),
                   speedup=round(baseline_ms / ms, 3), device=self.device,
                   tflops=round(flop / ms / 1e9, 1) if flop else float("nan"),
                   gbps=round(nbytes / ms / 1e6, 1) if nbytes else float("nan"),
                   mem_gb=round(mem_gb, 3) if mem_gb is not None else float("nan"),
                   baseline_mem_gb=round(baseline_mem_gb, 3) if baseline_mem_gb is not None else float("nan"))
        self.rows.append(row)
        if os.environ.get("QLLM_BENCH_JSONL"):  # rows survive a run that is cut short
            with open(os.environ["QLLM_BENCH_JSONL"], "a") as fh:
                fh.write(json.dumps(row) + "\n")
        print(f"{shape:11s} {phase:8s} b={batch:<3d} s={seqlen:<5d} kv={kv_len:<5d} {variant:22s} "
              f"{ms:9.4f} ms  vs {baseline} {baseline_ms:9.4f} ms  x{row['speedup']:.2f}"
              + (f"  {row['tflops']:.0f} TFLOP/s" if flop else "") + (f"  {row['gbps']:.0f} GB/s" if nbytes else "")
              + (f"  peak {mem_gb:.2f} GB vs {baseline_mem_gb:.2f} GB" if mem_gb is not None else ""), flush=True)


def _linears(shape):
    """(name, out_features, in_features) of the four (fused) linears of a decoder layer."""
    return [("qkv", shape.qkv_out, shape.hidden), ("o", shape.hidden, shape.heads * shape.head_dim),
            ("gate_up", 2 * shape.inter, shape.hidden), ("down", shape.hidden, shape.inter)]


def torch_transform_quant(x, p1, p2):
    """Plain PyTorch baseline of kernel 1: two bf16 matmuls, per-token symmetric int4, pack."""
    import torch
    n1, n2 = p1.shape[0], p2.shape[0]
    y = (p1.transpose(0, 1) @ x.view(-1, n1, n2) @ p2).view(x.shape).float()
    scale = (y.abs().amax(-1, keepdim=True) / 7.0).clamp_min(1e-8)
    q = torch.clamp(torch.round(y / scale), -8, 7).to(torch.int8)
    return ((q[..., 0::2] & 15) | (q[..., 1::2] << 4)).view(torch.uint8), scale


def _orth(n, torch, device):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q.to(device, torch.bfloat16)


def bench_kernel1(rows, shapes, ms_tokens):
    torch = _cuda()
    from kernels.kronecker import kronecker_factors
    from kernels.transform_quant import transform_quant
    sizes = sorted({n for s in shapes for n in (s.hidden, s.inter)})
    for n in sizes:
        n1, n2 = kronecker_factors(n)
        p1, p2 = _orth(n1, torch, "cuda"), _orth(n2, torch, "cuda")
        for m in ms_tokens:
            x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            nbytes = m * n * 2 + m * n // 2 + m * 4
            t_torch = _bench(lambda: torch_transform_quant(x, p1, p2))
            t_fused = _bench(lambda: transform_quant(x, p1, p2))
            t_unfused = _bench(lambda: transform_quant(transform_quant(x, p1, p2, quantize=False)))
            t_quant = _bench(lambda: transform_quant(x))
            tag = f"n{n}({n1}x{n2})"
            for variant, t in [("fused_triton", t_fused), ("unfused_triton", t_unfused), ("quant_only_triton", t_quant)]:
                rows.add(tag, "kernel1", variant, "torch_matmuls_quant", t_torch, t, seqlen=m, nbytes=nbytes)
            del x


def bench_gemm(rows, shapes, ms_tokens):
    torch = _cuda()
    from kernels.w4_matmul import w4a4_matmul
    for s in shapes:
        for name, n, k in _linears(s):
            wq = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
            sw = torch.rand(n, device="cuda")
            wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            w8 = wb.to(torch.float8_e4m3fn)
            wi8 = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8)
            one = torch.ones((), device="cuda")
            for m in ms_tokens:
                a = torch.randint(0, 256, (m, k // 2), device="cuda", dtype=torch.uint8)
                sa = torch.rand(m, device="cuda")
                xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                x8, xi8 = xb.to(torch.float8_e4m3fn), torch.randint(-8, 8, (m, k), device="cuda", dtype=torch.int8)
                flop = 2.0 * m * n * k
                t_bf16 = _bench(lambda: torch.nn.functional.linear(xb, wb))
                cases = {
                    "w4a4_fp8": lambda: w4a4_matmul(a, sa, wq, sw, dot="fp8"),
                    "w4a4_int8": lambda: w4a4_matmul(a, sa, wq, sw, dot="int8"),
                    "w4a4_fp16": lambda: w4a4_matmul(a, sa, wq, sw, dot="fp16"),
                    "fp8_cublas_fastacc": lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                                  out_dtype=torch.bfloat16, use_fast_accum=True),
                    "fp8_cublas": lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                          out_dtype=torch.bfloat16),
                    "int8_cublas": lambda: torch._int_mm(xi8, wi8.t()),
                }
                rows.add(f"{s.name}:{name}", "gemm", "bf16_cublas", "bf16_cublas", t_bf16, t_bf16, seqlen=m, flop=flop)
                for variant, fn in cases.items():
                    try:
                        rows.add(f"{s.name}:{name}", "gemm", variant, "bf16_cublas", t_bf16, _bench(fn), seqlen=m, flop=flop)
                    except Exception as e:  # noqa: BLE001 - report the failing variant, keep measuring
                        print(f"  {variant} failed: {type(e).__name__}: {e}", flush=True)
            del wq, wb, w8, wi8


def bench_gemv(rows, shapes, batches):
    torch = _cuda()
    from kernels.kronecker import kronecker_factors
    from kernels.qlinear import W4A4Linear
    from kernels.w4_gemv import CORE_MAX_M, w4a4_gemv, w4a16_gemv
    from kernels.w4_matmul import w4a4_matmul, w4a16_matmul
    for s in shapes:
        for name, n, k in _linears(s):
            n1, n2 = kronecker_factors(k)
            p1, p2 = _orth(n1, torch, "cuda"), _orth(n2, torch, "cuda")
            for b in batches:
                x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
                a = torch.randint(0, 256, (b, k // 2), device="cuda", dtype=torch.uint8)
                sa = torch.rand(b, device="cuda")

                def bf16():
                    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                    return lambda: torch.nn.functional.linear(x, w)

                def packed(kind):
                    def make():
                        w, sw = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8), torch.rand(n, device="cuda")
                        if kind == "w4a16":
                            return lambda: w4a16_matmul(x, w, sw)
                        if kind == "w4a4_linear_kron":
                            lin = W4A4Linear(w, sw, p1, p2)
                            return lambda: lin(x)
                        if kind == "w4a16_core":
                            return lambda: w4a16_gemv(x, w, sw)
                        if kind in ("w4a4_core", "w4a4_core_dp4a"):
                            products = "dp4a" if kind.endswith("dp4a") else "fp32"
                            return lambda: w4a4_gemv(a, sa, w, sw, products=products)
                        if kind == "tinygemm_g128":  # PyTorch's int4 weight-only kernel, the bar
                            tiles = torch._convert_weight_to_int4pack(w, 8)
                            zs = torch.rand(k // 128, n, 2, device="cuda", dtype=torch.bfloat16)
                            return lambda: torch._weight_int4pack_mm(x, tiles, 128, zs)
                        return lambda: w4a4_matmul(a, sa, w, sw, dot=kind.split("_")[1])
                    return make

                fn, c = _rotating(bf16, n * k * 2)
                t_bf16 = _bench(fn, graph=True) / c
                core = ("w4a4_core", "w4a4_core_dp4a", "w4a16_core") if b <= CORE_MAX_M else ()  # kernels/w4_gemv.py
                for variant in ("w4a4_fp8", "w4a4_int8", "w4a4_fp16", "w4a16", "w4a4_linear_kron", *core,
                                "tinygemm_g128"):
                    try:
                        fn, c = _rotating(packed(variant), n * k // 2)
                        rows.add(f"{s.name}:{name}", "gemv", variant, "bf16_cublas", t_bf16,
                                 _bench(fn, graph=True) / c, batch=b, seqlen=1, nbytes=n * k // 2)
                    except Exception as e:  # noqa: BLE001 - report the failing variant, keep measuring
                        print(f"  {variant} failed: {type(e).__name__}: {e}", flush=True)
                torch.cuda.empty_cache()


def bench_linear(rows, shapes, ms_tokens):
    torch = _cuda()
    from kernels.kronecker import kronecker_factors
    from kernels.qlinear import W4A4Linear
    for s in shapes:
        for name, n, k in _linears(s):
            factors = (s.heads, s.head_dim) if name == "o" else kronecker_factors(k)
            p1, p2 = _orth(factors[0], torch, "cuda"), _orth(factors[1], torch, "cuda")
            w, sw = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8), torch.rand(n, device="cuda")
            wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            flat, plain = W4A4Linear(w, sw, p1, p2), W4A4Linear(w, sw)
            for m in ms_tokens:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                t_bf16 = _bench(lambda: torch.nn.functional.linear(x, wb))
                flop = 2.0 * m * n * k
                rows.add(f"{s.name}:{name}", "linear", "w4a4_kron_transform", "bf16_cublas", t_bf16, _bench(lambda: flat(x)),
                         seqlen=m, flop=flop)
                rows.add(f"{s.name}:{name}", "linear", "w4a4_no_transform", "bf16_cublas", t_bf16, _bench(lambda: plain(x)),
                         seqlen=m, flop=flop)
            del wb, w


def bench_layers(rows, shapes, prefill_batches, decode_batches, kv_lens):
    torch = _cuda()
    from kernels.llama_layer import DP4A_VARIANTS, KV4_SUFFIX, KV4_VARIANTS, VARIANTS, build_layer, new_kv4_cache
    quant_variants = [v for v in VARIANTS if v != "bf16"]
    with torch.no_grad():
        for s in shapes:
            decode_only = KV4_VARIANTS + DP4A_VARIANTS
            layers = {v: build_layer(s, v, "cuda") for v in VARIANTS + decode_only}
            for b in prefill_batches:
                x = torch.randn(b, PREFILL_SEQ, s.hidden, device="cuda", dtype=torch.bfloat16)
                t = {v: _bench(lambda v=v: layers[v](x)) for v in VARIANTS}
                for v in quant_variants:
                    rows.add(s.name, "prefill", v, "bf16", t["bf16"], t[v], batch=b, seqlen=PREFILL_SEQ)
                del x
                torch.cuda.empty_cache()
            for b in decode_batches:
                for kv in kv_lens:
                    x = torch.randn(b, 1, s.hidden, device="cuda", dtype=torch.bfloat16)
                    kc = torch.randn(b, s.kv_heads, kv + 1, s.head_dim, device="cuda", dtype=torch.bfloat16)
                    vc = torch.randn_like(kc)
                    t = {v: _bench(lambda v=v: layers[v](x, (kc, vc), kv_len=kv), graph=True) for v in VARIANTS}
                    for v in quant_variants:
                        rows.add(s.name, "decode", v, "bf16", t["bf16"], t[v], batch=b, seqlen=1, kv_len=kv)
                    # issue 12: the same decode step over a 4-bit KV cache and/or through the dp4a GEMV (decode rows
                    # only; prefill is the base variant's)
                    kv4_cache = new_kv4_cache(s, b, kv + 1, "cuda")
                    kv4_cache.write(0, kc[:, :, :kv], vc[:, :, :kv])
                    for v in decode_only:
                        cache = kv4_cache if v.endswith(KV4_SUFFIX) else (kc, vc)
                        try:
                            ms = _bench(lambda v=v, cache=cache: layers[v](x, cache, kv_len=kv), graph=True)
                        except Exception as e:  # noqa: BLE001 - keep the other rows, say what broke
                            print(f"  {v} failed: {type(e).__name__}: {e}", flush=True)
                            continue
                        rows.add(s.name, "decode", v, "bf16", t["bf16"], ms, batch=b, seqlen=1, kv_len=kv)
                    del kc, vc, kv4_cache
                    torch.cuda.empty_cache()
            del layers
            torch.cuda.empty_cache()


def _peak_gb(fn) -> float:
    """Peak GPU memory (GB) while fn() runs once, counting everything allocated (weights included).
    fn() runs once before, so that compilation and autotuning (whose timing runs allocate) are done."""
    import torch
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def _allocated_gb() -> float:
    import torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 1e9


def bench_model(rows, prefill_batches, decode_batches, kv_lens, variants=("flatquant-fp8", "w4a4-fp8"),
                n_layers: int = MODEL_LAYERS, shape=None, device: str = "cuda"):
    """A whole LLaMA-2-7B-shaped decoder stack per variant, built one at a time (so each peak-memory
    reading is that model's alone), bf16 first; ratios vs the bf16 stack of the same process.
    Decode: one step with every layer's KV cache pre-filled to kv_len, in a CUDA graph (ms per
    generated token; 128 tokens of decode cost ~128x that, the attention growing slightly).
    shape: a kernels.llama_layer.LlamaShape (default LLaMA-2-7B); rows are tagged "<name>-model"."""
    torch = _cuda()
    from kernels.llama_layer import LLAMA_SHAPES
    s = shape or LLAMA_SHAPES["llama2-7b"]
    tag = f"{s.name}-model"
    timed = {}
    order = ["bf16"] + [v for v in variants if v != "bf16"]
    with torch.no_grad():
        for v in order:
            try:
                _model_cases(torch, timed, s, v, n_layers, prefill_batches, decode_batches, kv_lens, device, rows, tag)
            except Exception as e:  # noqa: BLE001 - keep the other variants' numbers, say what broke
                if v == "bf16":
                    raise
                print(f"{tag} {v} failed: {type(e).__name__}: {e}", flush=True)
                torch.cuda.empty_cache()
                continue
            if v == "bf16":
                continue
            for (var, phase, b, kv), (ms, peak) in timed.items():  # rows as soon as a variant is done
                if var == v:
                    base_ms, base_peak = timed[("bf16", phase, b, kv)]
                    rows.add(tag, phase, v, "bf16", base_ms, ms, batch=b,
                             seqlen=PREFILL_SEQ if phase == "prefill" else 1, kv_len=kv, mem_gb=peak,
                             baseline_mem_gb=base_peak)


def _model_cases(torch, timed, s, v, n_layers, prefill_batches, decode_batches, kv_lens, device, rows, tag):
    """Build one variant's stack, time its prefill and decode cases into timed[(v, phase, batch, kv)]."""
    from kernels.llama_layer import build_stack
    before = _allocated_gb()
    model = build_stack(s, v, device, n_layers)
    gb = _allocated_gb() - before
    rows.model_weights.append(dict(shape=tag, layers=n_layers, variant=v, weights_gb=round(gb, 3), device=rows.device))
    print(f"{tag} {v}: {n_layers} layers, {gb:.2f} GB of weights", flush=True)
    for b in prefill_batches:
        x = torch.randn(b, PREFILL_SEQ, s.hidden, device=device, dtype=torch.bfloat16)
        fn = lambda: model(x)  # noqa: E731
        peak = _peak_gb(fn)
        timed[(v, "prefill", b, 0)] = (_bench(fn), peak)
        del x, fn
        torch.cuda.empty_cache()
    for b in decode_batches:
        for kv in kv_lens:
            x = torch.randn(b, 1, s.hidden, device=device, dtype=torch.bfloat16)
            caches = [tuple(torch.randn(b, s.kv_heads, kv + 1, s.head_dim, device=device, dtype=torch.bfloat16)
                            for _ in range(2)) for _ in range(n_layers)]
            fn = lambda: model(x, caches, kv_len=kv)  # noqa: E731
            peak = _peak_gb(fn)
            timed[(v, "decode", b, kv)] = (_bench(fn, graph=True), peak)
            del x, caches, fn
            torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()


PLANS = {
    "quick": dict(k1_tokens=[2048], gemm_tokens=[2048], gemv_batches=[1, 16], linear_tokens=[2048],
                  prefill_batches=[1], decode_batches=[1, 16], kv_lens=[1024],
                  model_prefill_batches=[1, 4, 16], model_decode_batches=[1, 16], model_kv_lens=[512, 4096],
                  model_variants=["flatquant-fp8", "w4a4-fp8", "flatquant-fp8-dp4a"]),
    "full": dict(k1_tokens=[2048, 16 * 2048], gemm_tokens=[2048, 8192], gemv_batches=[1, 16], linear_tokens=[2048],
                 prefill_batches=[1, 4, 16], decode_batches=[1, 16, 64], kv_lens=[512, 4096],
                 model_prefill_batches=[1, 4, 16], model_decode_batches=[1, 16], model_kv_lens=[512, 4096],
                 model_variants=["flatquant-fp8", "w4a4-fp8", "flatquant-fp8-dp4a"]),
}


def run_benchmarks(shapes=None, quick: bool = False, phases=("kernel1", "gemm", "gemv", "linear", "layers"),
                   **plan_overrides) -> pd.DataFrame:
    """Measure the phases on the current GPU; returns the long-format DataFrame (COLUMNS).

    plan_overrides replace entries of PLANS (e.g. prefill_batches=[1, 16], kv_lens=[4096])."""
    torch = _cuda()
    from kernels.llama_layer import LLAMA_SHAPES
    names = shapes or (["llama2-7b"] if quick else list(LLAMA_SHAPES))
    sel = [LLAMA_SHAPES[n] for n in names]
    plan = {**PLANS["quick" if quick else "full"], **{k: v for k, v in plan_overrides.items() if v}}
    rows = _Rows(torch.cuda.get_device_name())
    seven = [LLAMA_SHAPES["llama2-7b"]]
    steps = {
        "kernel1": lambda: bench_kernel1(rows, sel, plan["k1_tokens"]),
        "gemm": lambda: bench_gemm(rows, seven, plan["gemm_tokens"]),
        "gemv": lambda: bench_gemv(rows, sel, plan["gemv_batches"]),
        "linear": lambda: bench_linear(rows, sel, plan["linear_tokens"]),
        "layers": lambda: bench_layers(rows, sel, plan["prefill_batches"], plan["decode_batches"], plan["kv_lens"]),
        "model": lambda: bench_model(rows, plan["model_prefill_batches"], plan["model_decode_batches"],
                                     plan["model_kv_lens"], plan["model_variants"]),
    }
    for p in phases:
        try:
            steps[p]()
        except Exception as e:  # noqa: BLE001 - keep the other phases' numbers, say what broke
            print(f"phase {p} failed: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    df = pd.DataFrame(rows.rows, columns=COLUMNS)
    df.attrs["model_weights"] = rows.model_weights  # weights-only GB per model (phase "model")
    return df


def sweep_configs(m_prefill: int = 2048) -> pd.DataFrame:
    """Time every GEMM tile in kernels.w4_matmul.CONFIGS at the LLaMA-2-7B q/k/v shape (both dot
    kinds; prefill tiles also with fp8 promotion every BLOCK_K/2) and kernel-1 launch shapes."""
    torch = _cuda()
    from kernels.transform_quant import transform_quant
    from kernels.w4_matmul import CONFIGS, w4a4_matmul
    out = []
    for n, k in [(12288, 4096)]:
        wq, sw = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8), torch.rand(n, device="cuda")
        for fam, m in [("large", m_prefill), ("gemv", 1), ("gemv", 16), ("small", 64)]:
            a, sa = torch.randint(0, 256, (m, k // 2), device="cuda", dtype=torch.uint8), torch.rand(m, device="cuda")
            for cfg in CONFIGS[fam]:
                dots = [("fp8", None), ("int8", None), ("fp16", None)] + ([("fp8", cfg[2] // 2)] if fam == "large" else [])
                for dot, imp in dots:
                    try:
                        t = _bench(lambda: w4a4_matmul(a, sa, wq, sw, dot=dot, config=cfg, imprecise_k=imp), graph=m <= 64)
                    except Exception as e:  # noqa: BLE001
                        print(f"config {cfg} {dot} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    out.append(dict(kind="gemm", n=n, k=k, m=m, config=str(cfg), dot=dot, imprecise_k=imp, ms=t,
                                    tflops=2.0 * m * n * k / t / 1e9, gbps=n * k / 2 / t / 1e6))
                    print(out[-1], flush=True)
    for n, (n1, n2) in [(4096, (64, 64)), (28672, (128, 224))]:
        p1, p2 = _orth(n1, torch, "cuda"), _orth(n2, torch, "cuda")
        x = torch.randn(16384, n, device="cuda", dtype=torch.bfloat16)
        for rows_pp in (1, 4, 16):
            for warps in (4, 8):
                try:
                    t = _bench(lambda: transform_quant(x, p1, p2, rows_per_prog=rows_pp, num_warps=warps))
                except Exception as e:  # noqa: BLE001
                    print(f"kernel1 {n} {rows_pp} {warps} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                out.append(dict(kind="kernel1", n=n, k=0, m=16384, config=f"rows={rows_pp},warps={warps}", dot="",
                                imprecise_k=None, ms=t, tflops=float("nan"), gbps=16384 * n * 2.5 / t / 1e6))
                print(out[-1], flush=True)
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- report

def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if (isinstance(v, float) and math.isnan(v)) else str(v) for v in row) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines)


OVERHEAD_PAIRS = [("flatquant", "w4a4"), ("quarot", "w4a4"), ("flatquant-fp8", "w4a4-fp8")]


def overhead_table(df: pd.DataFrame) -> pd.DataFrame:
    """Online-transform overhead per layer (or model) run: ms(variant) / ms(same path without transform) − 1."""
    layer = df[df.phase.isin(["prefill", "decode"])]
    keys = ["shape", "phase", "batch", "seqlen", "kv_len"]
    out = []
    for v, plain in OVERHEAD_PAIRS:
        sub = layer[layer.variant == v].set_index(keys)["ms"]
        base = layer[layer.variant == plain].set_index(keys)["ms"]
        joined = (sub / base - 1).dropna().round(3).rename(f"{v}_overhead")
        if len(joined):
            out.append(joined)
    return pd.concat(out, axis=1).reset_index() if out else pd.DataFrame()


def _numeric_mem(df: pd.DataFrame) -> pd.DataFrame:
    """The memory columns as numbers ("-" and missing columns, e.g. rows of older csv files, become NaN)."""
    df = df.copy()
    for c in MEM_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce") if c in df else float("nan")
    return df[COLUMNS]


def merge_rows(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Earlier rows, except those measured again in `new` (same KEY_COLUMNS), followed by `new`."""
    old, new = _numeric_mem(old), _numeric_mem(new)
    if not len(old):
        return new
    if not len(new):
        return old
    key = lambda d: d[KEY_COLUMNS].astype(str).agg("|".join, axis=1)  # noqa: E731
    return pd.concat([old[~key(old).isin(set(key(new)))], new], ignore_index=True)


def write_speedup_tables(df: pd.DataFrame, reports_dir: str | Path, note: str = "", merge: bool = False) -> None:
    """Write tables/speedup.csv (+ .md) and figures/speedup_*.png under reports_dir; with merge, the
    rows already in tables/speedup.csv stay unless df measures the same key again. Memory
    columns without a measurement are written as "-". Whole-model weight memory
    (df.attrs["model_weights"]) goes to tables/speedup_model_memory.csv."""
    reports = Path(reports_dir)
    (reports / "tables").mkdir(parents=True, exist_ok=True)
    (reports / "figures").mkdir(parents=True, exist_ok=True)
    weights = df.attrs.get("model_weights") or []
    csv = reports / "tables" / "speedup.csv"
    df = merge_rows(pd.read_csv(csv), df) if merge and csv.exists() else _numeric_mem(df)
    out = df.copy()
    for c in MEM_COLUMNS:
        out[c] = out[c].astype(object).where(out[c].notna(), "-")
    out.to_csv(csv, index=False)
    mem_csv = reports / "tables" / "speedup_model_memory.csv"
    if weights:
        w = pd.DataFrame(weights)
        if merge and mem_csv.exists():
            old = pd.read_csv(mem_csv)
            w = pd.concat([old[~old.set_index(["shape", "variant"]).index.isin(w.set_index(["shape", "variant"]).index)],
                           w], ignore_index=True)
        w.to_csv(mem_csv, index=False)
    weights = pd.read_csv(mem_csv) if mem_csv.exists() else pd.DataFrame()
    device = ", ".join(sorted(df.device.unique())) if len(df) else "no device"
    parts = [f"# Speed of the int4 kernels vs bf16 ({device})", "", note, "",
             "Long-format data: `speedup.csv` (columns " + ", ".join(COLUMNS) + "); speedup = baseline_ms / ms, "
             "both measured in the same run. Layer variants: see kernels/llama_layer.py; attention, norms and "
             "the KV cache stay bf16 in every variant except the '-kv4' decode rows (4-bit KV cache).", ""]
    model = df["shape"].astype(str).str.endswith("-model")
    for phase, title, rows in [
            ("prefill", "Decoder layer, prefill (seqlen 2048)", ~model), ("decode", "Decoder layer, decode step", ~model),
            ("prefill", "Whole model (32 decoder layers), prefill (seqlen 2048); mem = peak GB of one forward", model),
            ("decode", "Whole model (32 decoder layers), one decode step at a pre-filled KV cache (ms per token); "
                       "mem = peak GB of one step", model),
            ("kernel1", "Kernel 1: fused transform + quantize vs PyTorch", ~model),
            ("gemm", "GEMM at LLaMA-2-7B shapes (seqlen column = M tokens)", ~model),
            ("gemv", "Decode GEMV (weights rotated past L2)", ~model), ("linear", "One linear layer, W4A4 vs bf16", ~model)]:
        sub = df[(df.phase == phase) & rows]
        if len(sub):
            show = [c for c in COLUMNS if c not in ("phase", "device") and not sub[c].isna().all()]
            parts += [f"## {title}", "", _md_table(sub[show]), ""]
    if len(weights):
        parts += ["## Whole-model weight memory (GB allocated by building the stack)", "", _md_table(weights), ""]
    ov = overhead_table(df)
    if len(ov):
        parts += ["## Online transform overhead (ms / ms of the same layer without online transform − 1)", "",
                  _md_table(ov), ""]
    (reports / "tables" / "speedup.md").write_text("\n".join(parts))
    _plots(df, reports / "figures")


def _plots(df: pd.DataFrame, figdir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for phase, xcols in [("prefill", ["batch"]), ("decode", ["batch", "kv_len"])]:
        sub = df[df.phase == phase]
        if not len(sub):
            continue
        shapes = list(dict.fromkeys(sub["shape"]))
        fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.4), squeeze=False, sharey=True)
        for ax, shape in zip(axes[0], shapes):
            s = sub[sub["shape"] == shape]
            piv = s.pivot_table(index=xcols, columns="variant", values="speedup")
            piv.index = [("b%d" % i) if not isinstance(i, tuple) else f"b{i[0]}/kv{i[1]}" for i in piv.index]
            piv.plot.bar(ax=ax, rot=45)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title(shape)
            ax.set_ylabel("speedup vs bf16")
        fig.suptitle(f"{phase}: one decoder layer; *-model: a {MODEL_LAYERS}-layer stack ({sub.device.iloc[0]})")
        fig.tight_layout()
        fig.savefig(figdir / f"speedup_{phase}.png", dpi=110)
        plt.close(fig)
    sub = df[df.phase == "gemm"]
    if len(sub):
        piv = sub.pivot_table(index=["shape", "seqlen"], columns="variant", values="tflops")
        ax = piv.plot.bar(figsize=(10, 4), rot=60)
        ax.set_ylabel("TFLOP/s (TOP/s for int)")
        ax.set_title(f"GEMM at LLaMA-2-7B shapes ({sub.device.iloc[0]})")
        ax.figure.tight_layout()
        ax.figure.savefig(figdir / "speedup_gemm.png", dpi=110)
        plt.close(ax.figure)


def _commit() -> str:
    env = os.environ.get("QLLM_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports", help="reports directory (tables/ and figures/ are written inside)")
    ap.add_argument("--quick", action="store_true", help="LLaMA-2-7B only, fewer batch sizes")
    ap.add_argument("--shapes", nargs="*", help="subset of kernels.llama_layer.LLAMA_SHAPES")
    ap.add_argument("--phases", nargs="*", default=["kernel1", "gemm", "gemv", "linear", "layers"],
                    choices=["kernel1", "gemm", "gemv", "linear", "layers", "model"],
                    help="'model' (whole 32-layer LLaMA-2-7B stack) is not in the default set")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in tables/speedup.csv, replacing only those measured again")
    for key in ("k1_tokens", "prefill_batches", "decode_batches", "kv_lens", "model_prefill_batches",
                "model_decode_batches", "model_kv_lens"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, nargs="*", help=f"override the plan's {key}")
    ap.add_argument("--model-variants", nargs="*", help="override the plan's model_variants (vs bf16)")
    ap.add_argument("--sweep", action="store_true", help="only time the tile configurations (writes bench/sweep.csv)")
    args = ap.parse_args(argv)
    torch = _cuda()
    out = Path(args.out)
    stamp = f"measured on {torch.cuda.get_device_name()} at commit {_commit()}, " \
            f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, " \
            f"triton {__import__('triton').__version__}"
    if args.sweep:
        (out / "bench").mkdir(parents=True, exist_ok=True)
        sweep_configs().to_csv(out / "bench" / "sweep.csv", index=False)
        return
    df = run_benchmarks(args.shapes, quick=args.quick, phases=args.phases, k1_tokens=args.k1_tokens,
                        prefill_batches=args.prefill_batches, decode_batches=args.decode_batches, kv_lens=args.kv_lens,
                        model_prefill_batches=args.model_prefill_batches,
                        model_decode_batches=args.model_decode_batches, model_kv_lens=args.model_kv_lens,
                        model_variants=args.model_variants)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    meta_path = out / "bench" / "speedup_meta.json"
    meta = {"stamp": stamp, "argv": sys.argv[1:]}
    note = f"{'Quick run' if args.quick else 'Full run'}, {stamp}."
    if args.merge and meta_path.exists():  # the earlier runs' stamps stay with their rows
        old = json.loads(meta_path.read_text())
        meta = {"stamp": f"{old.get('stamp', '?')}; phases {','.join(args.phases)}: {stamp}",
                "runs": {**old.get("runs", {}), ",".join(args.phases): "python -m eval.speedup " + " ".join(sys.argv[1:])}}
        note = f"Merged tables: {meta['stamp']}."
    write_speedup_tables(df, out, note=note, merge=args.merge)
    meta_path.write_text(json.dumps(meta, indent=1))
    print(_md_table(df[["shape", "phase", "batch", "seqlen", "kv_len", "variant", "ms", "speedup"]]))


if __name__ == "__main__":
    main()
