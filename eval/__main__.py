"""Command line: ``python -m eval {ppl,quantize} ...`` (see README.md, "Command line").

    python -m eval ppl --model embedded --dataset wikitext2 --max-windows 8 --json
    python -m eval quantize --model embedded --method rtn --w-bits 4 --a-bits 4 --kv-bits 4 --out runs/rtn-w4a4kv4
    python -m eval ppl --model runs/rtn-w4a4kv4 --dataset ptb --json

``--model`` takes a hub id, a local model directory or ``.gguf`` file, ``embedded``, or a
quantized run directory. With ``--json`` the last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys

from qllm_core.data import CALIB_DATASETS, EVAL_DATASETS
from qllm_core.engine import MATMUL_PRECISIONS
from qllm_core.methods import METHODS, QuantConfig
from qllm_core.models import load_model
from qllm_core.runs import CalibConfig, is_run_dir, load_run, quantize_to_run

from .perplexity import perplexity


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="hub id, local path, .gguf file, 'embedded', or a run dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None, help="local data directory (default: $QLLM_DATA_DIR)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ppl = sub.add_parser("ppl", help="perplexity of a model or a quantized run")
    _add_common(ppl)
    ppl.add_argument("--dataset", choices=EVAL_DATASETS, default="wikitext2")
    ppl.add_argument("--seqlen", type=int, default=2048)
    ppl.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows (smoke)")
    ppl.add_argument("--batch-size", type=int, default=1)
    ppl.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ppl.add_argument("--kernels", action="store_true",
                     help="run a quantized run's linears on the Triton kernels (qllm_core.deploy); needs triton")

    q = sub.add_parser("quantize", help="quantize a model into a run directory (resumes a partial run)")
    _add_common(q)
    q.add_argument("--method", choices=sorted(METHODS), required=True)
    q.add_argument("--out", required=True, help="run directory")
    for name in ("w", "a", "kv"):
        q.add_argument(f"--{name}-bits", type=int, default=16, help=f"{name} bit width, 2-8 or 16 (off)")
    q.add_argument("--w-asym", action="store_true")
    q.add_argument("--a-asym", action="store_true")
    q.add_argument("--w-group-size", type=int, default=None)
    q.add_argument("--calib-dataset", choices=CALIB_DATASETS, default=None)
    q.add_argument("--nsamples", type=int, default=128)
    q.add_argument("--calib-seqlen", type=int, default=2048)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest",
                   help="float32 matmuls of the engine's passes on a GPU: highest (IEEE) or high (TF32); in run.json")
    q.add_argument("--concurrent-layers", type=int, default=1,
                   help="layers calibrated at once where the method allows (FlatQuant with RTN weights): same results")
    q.add_argument("--compile-quantizers", action="store_true",
                   help="on a GPU, compile trained methods' fake quantizers (run.json stats: trainer)")
    q.add_argument("--option", action="append", default=[], metavar="KEY=JSON",
                   help="method option, e.g. --option epochs=15 (value parsed as JSON)")
    return parser


def _parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "ppl":
        if is_run_dir(args.model):
            loaded, record = load_run(args.model)
            source = {"run": args.model, "method": record["method"], "quant": record["quant"]}
            if args.kernels:
                from qllm_core.deploy import to_kernels  # imports triton

                to_kernels(loaded.model.to(args.device), loaded.adapter)
                source["kernels"] = True
        elif args.kernels:
            raise SystemExit("--kernels needs a quantized run directory as --model")
        else:
            loaded, source = load_model(args.model), {"method": "fp"}
        result = perplexity(loaded.model, loaded.tokenizer, args.dataset, args.seqlen, args.max_windows,
                            args.batch_size, args.device, args.data_dir, progress=not args.json)
        result.update(model=loaded.name, **source)
        print(json.dumps(result) if args.json else f"{loaded.name} {args.dataset}: ppl {result['ppl']:.4f} "
              f"over {result['windows']} windows")
        return 0
    try:
        quant = QuantConfig(args.w_bits, args.a_bits, args.kv_bits, args.w_asym, args.a_asym,
                            w_group_size=args.w_group_size)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    calib = CalibConfig(args.calib_dataset, args.nsamples, args.calib_seqlen, args.seed,
                        matmul_precision=args.matmul_precision, concurrent_layers=args.concurrent_layers,
                        compile_quantizers=args.compile_quantizers)
    quantize_to_run(args.model, args.method, quant, args.out, calib, args.device, args.data_dir,
                    _parse_options(args.option))
    print(f"quantized run written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
