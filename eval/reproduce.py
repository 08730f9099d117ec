"""Execute every notebook headlessly with papermill for a profile, export HTML reports.

    python -m eval.reproduce --profile smoke            # all notebooks, CPU, minutes
    python -m eval.reproduce --profile paper --device cuda --notebooks perplexity

Each notebook gets the profile name plus any overrides as papermill parameters; it writes its
own long-format tables under ``reports/tables``. The executed notebook is exported to
``reports/<notebook>.<profile>.html`` with code cells hidden (the executed .ipynb stays in
``reports/_executed``, which git ignores); at the end ``reports/index.html`` is rebuilt.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nbformat
import papermill
from nbconvert import HTMLExporter

from .report_index import build_index

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"


def list_notebooks(names: list[str] | None = None) -> list[Path]:
    available = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if not names:
        return available
    by_stem = {p.stem: p for p in available}
    unknown = [n for n in names if n not in by_stem]
    if unknown:
        raise SystemExit(f"unknown notebook(s) {unknown}; available: {sorted(by_stem)}")
    return [by_stem[n] for n in names]


def export_html(executed: Path, target: Path) -> None:
    body, _ = HTMLExporter(exclude_input=True, exclude_input_prompt=True,
                           exclude_output_prompt=True).from_notebook_node(nbformat.read(executed, as_version=4))
    target.write_text(body, encoding="utf-8")


def run_notebook(notebook: Path, parameters: dict, reports_dir: Path) -> Path:
    executed_dir = reports_dir / "_executed"
    executed_dir.mkdir(parents=True, exist_ok=True)
    executed = executed_dir / notebook.name
    papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, cwd=str(REPO),
                               kernel_name="python3", progress_bar=False, log_output=True)
    html = reports_dir / f"{notebook.stem}.{parameters.get('profile', 'smoke')}.html"
    export_html(executed, html)
    return html


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke", choices=["smoke", "paper"])
    parser.add_argument("--notebooks", nargs="*", help="notebook names (default: all in notebooks/)")
    parser.add_argument("--model", help="override the profile's model (hub id, path, 'embedded')")
    parser.add_argument("--device", help="override the profile's device (cpu, cuda)")
    parser.add_argument("--reports-dir", default=str(REPO / "reports"))
    parser.add_argument("--param", action="append", default=[], metavar="KEY=JSON",
                        help='extra notebook parameter, e.g. --param \'only_methods=["fp","flatquant"]\'')
    args = parser.parse_args(argv)
    parameters = {"profile": args.profile, "reports_dir": args.reports_dir}
    parameters.update({k: v for k, v in (("model", args.model), ("device", args.device)) if v})
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param expects KEY=JSON, got {item!r}")
        parameters[key] = json.loads(value)
    for notebook in list_notebooks(args.notebooks):
        start = time.time()
        html = run_notebook(notebook, parameters, Path(args.reports_dir))
        print(f"{notebook.name}: {time.time() - start:.0f} s -> {html}", flush=True)
    print(f"index: {build_index(Path(args.reports_dir))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
