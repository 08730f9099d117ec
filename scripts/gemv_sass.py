"""The decode GEMV's main loop as the H100 would run it, without a GPU: instructions per weight code.

    python scripts/gemv_sass.py OUT.json

Why: at batch 1 a GEMV over packed int4 weights should be bound by HBM bytes (a 12288 x 4096 weight is
25 MB: ~8.4 us at 3 TB/s). Whether a kernel can get there is decided by how many instructions it issues
per weight code: an H100 issues ~1.05e12 warp instructions per second (132 SMs x 4 schedulers x
~1.98 GHz), so 50M codes at N instructions each cost ~N x 1.5 us. Triton compiles ahead of time for
sm_90 on a machine without a GPU (``triton.compile`` with a ``GPUTarget``, ptxas and nvdisasm ship with
it), so the main loop of each variant of :mod:`kernels.w4_gemv` is disassembled here and its
instructions counted: total per loop iteration, per weight code, and the kinds that matter (integer
to float conversions, dp4a, shared-memory round trips and barriers of a layout conversion).
Pointers and the row stride are declared 16-byte aligned, as the JIT specializes them at run time.
The GPU timing of the same variants is ``eval.speedup --phases gemv``.
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
from kernels.w4_gemv import CONFIGS, _w4_gemv_kernel  # noqa: E402
from kernels.w4_matmul import A_INT4  # noqa: E402

SIGNATURE = {"a_ptr": "*i32", "a_scale_ptr": "*fp32", "a_zero_ptr": "*fp32", "w_ptr": "*i32", "w_scale_ptr": "*fp32",
             "w_sum_ptr": "*fp32", "c_ptr": "*bf16", "M": "i32", "N": "i32", "KW": "i32", "stride_am": "i32",
             "stride_wn": "i32", "stride_cm": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
             "BLOCK_KW": "constexpr", "A_MODE": "constexpr", "DP4A": "constexpr", "ASM": "constexpr"}
ALIGNED = ("a_ptr", "a_scale_ptr", "a_zero_ptr", "w_ptr", "w_scale_ptr", "w_sum_ptr", "c_ptr", "KW", "stride_am",
           "stride_wn")
KINDS = ("I2FP", "IDP", "LDG", "STS", "LDS", "LDSM", "BAR", "SHFL")


def loop_instructions(dp4a: bool, block_n: int, block_kw: int, warps: int, stages: int) -> list[str]:
    """Opcodes of the K loop of the W4A4 GEMV at one token, compiled for sm_90."""
    names = list(SIGNATURE)
    source = ASTSource(_w4_gemv_kernel, SIGNATURE,
                       constexprs={"BLOCK_M": 1, "BLOCK_N": block_n, "BLOCK_KW": block_kw, "A_MODE": A_INT4.value,
                                   "DP4A": dp4a, "ASM": True},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(nvdisasm), "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    # the loop: the first backward branch, from its target label up to the branch
    start, end = next((sass.index(m.group(1) + ":"), m.end()) for m in re.finditer(r"BRA `\((\.L_x_\d+)\)", sass)
                      if sass.index(m.group(1) + ":") < m.start())
    body = sass[start:end]
    return [m.group(1).split(".")[0] for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", body)]


def main(out: str) -> None:
    rows = []
    for dp4a in (False, True):
        for block_n, block_kw, warps, stages in CONFIGS:
            ops = loop_instructions(dp4a, block_n, block_kw, warps, stages)
            codes = block_n * block_kw * 8 / (warps * 32)  # weight codes per thread per iteration
            counts = collections.Counter(ops)
            rows.append({"products": "dp4a" if dp4a else "fp32", "config": [block_n, block_kw, warps, stages],
                         "loop_instructions": len(ops), "per_weight_code": round(len(ops) / codes, 2),
                         **{kind.lower(): counts.get(kind, 0) for kind in KINDS}})
            print(rows[-1], flush=True)
    Path(out).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90 (H100), compiled without a GPU",
                                     "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
