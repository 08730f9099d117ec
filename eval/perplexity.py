"""Perplexity on WikiText-2 / PTB / C4 with the GPTQ protocol (methods.md section 0).

Each window of ``seqlen`` tokens is scored independently; the loss of a window is the mean NLL of
its ``seqlen - 1`` predicted tokens, and perplexity is ``exp`` of the mean window loss (exactly
what GPTQ, QLLM and FlatQuant compute: ``exp(sum(loss_i * seqlen) / (n * seqlen))``).
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from tqdm import tqdm

from qllm_core.data import eval_windows


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int = 1, device: str | torch.device = "cpu",
                  progress: bool = True) -> torch.Tensor:
    """Mean next-token NLL of each window (float64, on CPU)."""
    model.to(device)
    losses = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        losses.append(nll.view(batch.shape[0], -1).mean(dim=1).double().cpu())
    return torch.cat(losses)


def perplexity(model, tokenizer, dataset: str, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, device="cpu", data_dir=None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``dataset``; returns ``{"ppl", "windows", "seqlen", "dataset"}``."""
    windows = eval_windows(tokenizer, dataset, seqlen, data_dir, max_windows)
    losses = window_losses(model, windows, batch_size, device, progress)
    return {"dataset": dataset, "ppl": math.exp(losses.mean().item()), "windows": int(windows.shape[0]), "seqlen": seqlen}
