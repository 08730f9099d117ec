"""The decode kernels' main loops as the H100 would run them, without a GPU: instructions per code.

    python scripts/decode_sass.py OUT.json

Why: at decode the GEMV over packed int4 weights and the attention over a 4-bit KV cache should be bound
by HBM bytes (a 12288 x 4096 int4 weight is 25 MB: ~8.4 us at 3 TB/s). Whether a kernel can get there is
decided by how many instructions it issues per 4-bit code: an H100 issues ~1.05e12 warp instructions per
second (132 SMs x 4 schedulers x ~1.98 GHz), which leaves ~5.6 thread instructions per code of a stream
read at 3 TB/s. Triton compiles ahead of time for sm_90 on a machine without a GPU (``triton.compile``
with a ``GPUTarget``; ptxas and nvdisasm ship with it), so each loop is disassembled here and its
instructions counted: per iteration, per code, and the kinds that matter (integer-to-float conversions,
dp4a, loads by width, shared-memory round trips and barriers of a layout conversion). Pointers and row
strides are declared 16-byte aligned and unit strides as 1, as the JIT specializes them at run time.
GPU timings of the same kernels: ``eval.speedup --phases gemv layers``.
"""
from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.kv4_attention import _kv4_split_kernel  # noqa: E402
from kernels.w4_gemv import CONFIGS, _w4_gemv_kernel  # noqa: E402
from kernels.w4_matmul import A_INT4  # noqa: E402

KINDS = ("I2FP", "I2F", "IDP", "LDG", "LDGSTS", "STS", "LDS", "BAR", "SHFL")

GEMV_SIGNATURE = {"a_ptr": "*i32", "a_scale_ptr": "*fp32", "a_zero_ptr": "*fp32", "w_ptr": "*i32",
                  "w_scale_ptr": "*fp32", "w_sum_ptr": "*fp32", "c_ptr": "*bf16", "M": "i32", "N": "i32",
                  "KW": "i32", "stride_am": "i32", "stride_wn": "i32", "stride_cm": "i32"}
GEMV_ALIGNED = ("a_ptr", "a_scale_ptr", "a_zero_ptr", "w_ptr", "w_scale_ptr", "w_sum_ptr", "c_ptr", "KW", "stride_am",
                "stride_wn")
KV4_SIGNATURE = {"Q": "*bf16", "KP": "*i32", "KS": "*bf16", "KZ": "*u8", "VP": "*i32", "VS": "*bf16", "VZ": "*u8",
                 "OP": "*fp32", "LSE": "*fp32", "kv_len": "i32", "chunk": "i32", "qk_scale_log2": "fp32",
                 "n_splits": "i32", **{f"stride_{n}": "i32" for n in ("qb", "qh", "qd", "kb", "kh", "kn", "kd", "ksb",
                                                                     "ksh", "ksn", "vb", "vh", "vn", "vd", "vsb",
                                                                     "vsh", "vsn")}}
KV4_ALIGNED = ("Q", "KP", "KS", "KZ", "VP", "VS", "VZ", "OP", "LSE", "stride_qh", "stride_kh", "stride_kn", "stride_vh",
               "stride_vn")


def loop_instructions(kernel, signature: dict, aligned: tuple, constexprs: dict, warps: int, stages: int = 3):
    """Opcodes (and load widths) of the first loop of ``kernel`` compiled for sm_90 with these constexprs."""
    sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    names = list(sig)
    source = ASTSource(kernel, sig, constexprs=constexprs,
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                                   "num_stages": stages})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(nvdisasm), "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    # the loop: the first backward branch, from its target label up to the branch
    start, end = next((sass.index(m.group(1) + ":"), m.end()) for m in re.finditer(r"BRA `\((\.L_x_\d+)\)", sass)
                      if sass.index(m.group(1) + ":") < m.start())
    body = sass[start:end]
    ops = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", body)]
    return [op.split(".")[0] for op in ops], collections.Counter(op for op in ops if op.startswith("LDG"))


def gemv_loop(dp4a: bool, block_n: int, block_kw: int, warps: int, stages: int) -> list[str]:
    """Opcodes of the W4A4 GEMV's K loop at one token (kernels/w4_gemv.py)."""
    consts = {"BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_KW": block_kw, "A_MODE": A_INT4.value, "DP4A": dp4a,
              "ASM": True}
    return loop_instructions(_w4_gemv_kernel, GEMV_SIGNATURE, GEMV_ALIGNED, consts, warps, stages)[0]


def _row(kernel: str, variant: str, config, ops: list[str], codes: float, loads=None) -> dict:
    counts = collections.Counter(ops)
    row = {"kernel": kernel, "variant": variant, "config": config, "loop_instructions": len(ops),
           "per_code": round(len(ops) / codes, 2), **{kind.lower(): counts.get(kind, 0) for kind in KINDS}}
    if loads is not None:
        row["loads"] = dict(loads)
    print(row, flush=True)
    return row


def main(out: str) -> None:
    rows = []
    for dp4a in (False, True):
        for block_n, block_kw, warps, stages in CONFIGS:
            codes = block_n * block_kw * 8 / (warps * 32)  # weight codes per thread per iteration
            rows.append(_row("w4_gemv", "dp4a" if dp4a else "fp32", [block_n, block_kw, warps, stages],
                             gemv_loop(dp4a, block_n, block_kw, warps, stages), codes))
    # LLaMA-2-7B decode attention: 32 heads = 32 KV heads (GROUP 1, padded to 16 rows for tl.dot), head_dim 128,
    # 64 keys per step; K and V codes per thread per iteration
    for words in (False, True):
        consts = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_ksn": 1, "stride_vsn": 1, "KV_HEADS": 32,
                  "GROUP": 1, "G_PAD": 16, "HALF": 64, "HALF_PAD": 64, "BLOCK_N": 64, "SYMMETRIC": False,
                  "DT": triton.language.bfloat16, "PRECISION": "tf32", "WORDS": words}
        signature = {**KV4_SIGNATURE, **({} if words else {"KP": "*u8", "VP": "*u8"})}
        ops, loads = loop_instructions(_kv4_split_kernel, signature, KV4_ALIGNED, consts, warps=4)
        rows.append(_row("kv4_attention", "words" if words else "bytes", [64, 4], ops, 2 * 64 * 128 / 128, loads))
    Path(out).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90 (H100), compiled without a GPU",
                                     "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
