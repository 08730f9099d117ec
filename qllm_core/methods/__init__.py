"""Quantization methods, by name.

Each entry maps a method name to ``module:Class`` of a :class:`~qllm_core.methods.base.QuantMethod`
subclass; modules are imported on first use, so one method's dependencies never slow another.
"""
from __future__ import annotations

import importlib

from .base import QuantConfig, QuantMethod

METHODS: dict[str, str] = {
    "rtn": "qllm_core.methods.base:QuantMethod",
    "smoothquant": "qllm_core.methods.smoothquant:SmoothQuantMethod",
    "quarot": "qllm_core.methods.quarot:QuaRotMethod",
    "gptq": "qllm_core.methods.gptq:GPTQMethod",
    "omniquant": "qllm_core.methods.omniquant:OmniQuantLWCMethod",
    "qllm": "qllm_core.methods.qllm:QLLMMethod",
    "flatquant": "qllm_core.methods.flatquant:FlatQuantMethod",
}


def method_class(name: str) -> type[QuantMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_method(name: str, quant: QuantConfig, **options) -> QuantMethod:
    return method_class(name)(quant, **options)


__all__ = ["METHODS", "QuantConfig", "QuantMethod", "make_method", "method_class"]
