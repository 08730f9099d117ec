"""QLLM adaptive channel reassembly (QLLM, ICLR 2024, Sec. 3.1-3.2; methods.md section 3).

Engine-independent algorithms on one *site* (the input tensor shared by a group of linear layers):

* **Channel disassembly** (Sec. 3.1, Eq. 2-3): a channel ``c`` whose calibration max ``|x_c| = m_c``
  exceeds the threshold ``theta`` is split into ``T_c = max(1, ceil(m_c / theta))`` sub-channels,
  each carrying ``x_c / T_c``; the following weight column is repeated ``T_c`` times, so the
  product is exact in full precision while the per-token range shrinks.
* **Channel assembly** (Sec. 3.1, Eq. 4-5): to restore the channel count, ``r = sum_c (T_c - 1)``
  pairs of similar channels are merged by bipartite soft matching (channels split into even /
  odd index halves A and B; every A channel draws one edge to its most similar B channel, the
  ``r`` best edges are merged). A merged group's activation is the *mean* of its channels and its
  weight column the *sum* of theirs — exact only when the channels are equal.
  Similarity (official ``assembly/ca_module.py``): with ``d_ij`` the Euclidean distance between
  activation columns ``i`` and ``j`` over the calibration tokens,
  ``score_ij = ((sum_o W_oi + sum_o W_oj) * d_ij)^2`` (signed column sums of the concatenated
  weights of the site's linears); lower is more similar. Disassembled channels never merge.
* **Adaptive reassembly** (Sec. 3.2): sweep ``theta`` from ``max_c m_c`` downward in
  ``max(100, int(m_max / 0.5))`` uniform steps towards ``min_c m_c``, stop once the added channel
  count exceeds ``channel_ratio * C``, and for every distinct count evaluate a caller-supplied
  reconstruction error (QLLM: MSE of the quantized reassembled sub-layer output vs. the FP one);
  keep the best ``theta``. Unlike the official code we also evaluate ``r = 0`` (no reassembly) as
  the baseline, so reassembly is only kept when it lowers the error.

Representation (why it looks the way it does): the reassembled input keeps the channel count, so a
site's whole reassembly is a fixed linear map on activations expressed by three length-``C``
tensors — ``scale`` (``1/T_c`` per original channel), ``group`` (each original channel's merge
target; identity when unmerged) and ``slot_src`` (which group representative each of the ``C``
reassembled channels reads). Online: ``x' = mean_by_group(x * scale)[..., slot_src]``; weights:
``W' = sum_by_group(W)[:, slot_src]``. Fixed shapes let ``build_layer`` create the buffers and
``calibrate_layer`` fill them. (The official code realises the same map as ``repeat_interleave``
followed by ToMe-style ``scatter_reduce``; it orders the disassembled channels differently and, in
its final pass, matches on the disassembled layout — the channel *set* is the same up to order, but
the bipartite halves differ slightly; we use the search's layout for both, see ``find_threshold``.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ReassemblyPlan:
    """One site's reassembly: per-channel ``scale`` (C), merge ``group`` (C), ``slot_src`` (C').

    ``C' == C`` for a complete reassembly; a disassembly-only plan has ``C' = C + r``.
    """

    scale: torch.Tensor
    group: torch.Tensor
    slot_src: torch.Tensor

    @property
    def num_channels(self) -> int:
        return self.scale.numel()

    @property
    def num_added(self) -> int:
        """Sub-channels added by disassembly (== pairs merged by assembly in a complete plan)."""
        counts = torch.bincount(self.slot_src, minlength=self.num_channels)
        return int((counts - 1).clamp(min=0).sum())


def identity_plan(channels: int) -> ReassemblyPlan:
    idx = torch.arange(channels)
    return ReassemblyPlan(torch.ones(channels), idx.clone(), idx.clone())


def disassembly_counts(absmax: torch.Tensor, theta: float) -> torch.Tensor:
    """``T_c = max(1, ceil(m_c / theta))`` sub-channels per channel (QLLM Eq. 2)."""
    if theta <= 0:
        raise ValueError(f"threshold theta must be positive, got {theta}")
    return torch.ceil(absmax.double() / theta).clamp(min=1).long()


def disassembly_plan(counts: torch.Tensor) -> ReassemblyPlan:
    """Disassembly only: channel ``c`` becomes ``T_c`` slots of ``x_c / T_c`` (exact in FP)."""
    channels = counts.numel()
    idx = torch.arange(channels)
    return ReassemblyPlan(1.0 / counts.double(), idx.clone(), idx.repeat_interleave(counts))


def pair_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Bipartite similarity scores ``(|A|, |B|)`` of even (A) vs odd (B) channels; lower = closer.

    ``x``: activations ``(tokens, C)``; ``weight``: the site's concatenated weights ``(out, C)``.
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"activation channels {x.shape[-1]} != weight input channels {weight.shape[-1]}")
    x = x.reshape(-1, x.shape[-1]).double()
    col_sum = weight.double().sum(dim=0)
    dist = torch.cdist(x[:, ::2].T.contiguous(), x[:, 1::2].T.contiguous())
    return ((col_sum[::2, None] + col_sum[None, 1::2]) * dist).pow(2)


def nearest_partners(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A channel's lowest score and its (first) B partner, no channel excluded; computed once per
    site and shared by every threshold candidate (:func:`match_pairs`)."""
    return scores.min(dim=1)


def match_pairs(scores: torch.Tensor, counts: torch.Tensor, num_merges: int,
                nearest: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``num_merges`` best (source in A, destination in B) edges as original channel indices.

    Disassembled channels (``T_c > 1``) are excluded on both sides. Returns None when fewer than
    ``num_merges`` mergeable A channels exist (the channel count could not be restored).

    ``nearest``: :func:`nearest_partners` of ``scores``. Only the A rows whose nearest partner is a
    disassembled B channel are searched again without those columns, so a candidate costs O(C) plus
    those rows instead of a masked copy of the whole ``C/2 x C/2`` matrix (LLaMA-2-70B's down_proj
    site: 1.6 GB of float64, ~1.5 s per candidate on 2 CPU cores, ~50 candidates per layer). The
    result equals the masked minimum's: ``min`` returns the first minimal index, and a row whose
    first minimum is not excluded keeps it once the excluded columns are gone.
    """
    split = counts > 1
    best, partner = nearest_partners(scores) if nearest is None else nearest
    best, partner = best.clone(), partner.clone()
    split_b = split[1::2]
    redo = split_b[partner].nonzero().flatten()
    if redo.numel():
        rows = scores.index_select(0, redo).masked_fill(split_b[None, :], math.inf)
        best[redo], partner[redo] = rows.min(dim=1)
    best.masked_fill_(split[::2], math.inf)
    order = best.argsort(stable=True)[:num_merges]
    if num_merges > order.numel() or not torch.isfinite(best[order]).all():
        return None
    return order * 2, partner[order] * 2 + 1


def reassembly_plan(counts: torch.Tensor, scores: torch.Tensor,
                    nearest: tuple[torch.Tensor, torch.Tensor] | None = None) -> ReassemblyPlan | None:
    """Disassemble by ``counts`` and merge as many similar pairs, keeping C channels (None: impossible).
    ``nearest``: :func:`nearest_partners` of ``scores``, when many plans share the scores."""
    channels = counts.numel()
    num_added = int((counts - 1).sum())
    group = torch.arange(channels)
    kept = torch.ones(channels, dtype=torch.bool)
    if num_added:
        pairs = match_pairs(scores, counts, num_added, nearest)
        if pairs is None:
            return None
        src, dst = pairs
        group[src] = dst
        kept[src] = False
    slot_src = torch.arange(channels)[kept].repeat_interleave(counts[kept])
    return ReassemblyPlan(1.0 / counts.double(), group, slot_src)


def threshold_candidates(absmax: torch.Tensor, channel_ratio: float) -> list[tuple[float, torch.Tensor]]:
    """``(theta, T)`` for each distinct added-channel count of QLLM's threshold sweep (Sec. 3.2).

    Starts at ``theta = max m`` (no disassembly, r = 0) and stops before the count exceeds
    ``channel_ratio * C``.
    """
    if not 0.0 <= channel_ratio <= 1.0:
        raise ValueError(f"channel_ratio must lie in [0, 1], got {channel_ratio}")
    m_max, m_min = absmax.max().item(), absmax.min().item()
    steps = max(100, int(m_max / 0.5))
    step = (m_max - m_min) / steps
    budget = int(absmax.numel() * channel_ratio)
    candidates, seen, theta = [], set(), m_max
    for _ in range(steps):
        if theta < m_min or theta <= 0:
            break
        counts = disassembly_counts(absmax, theta)
        added = int((counts - 1).sum())
        if added > budget:
            break
        if added not in seen:
            seen.add(added)
            candidates.append((theta, counts))
        theta -= step
    return candidates


def thin_candidates(candidates: list, limit: int | None) -> list:
    """Keep at most ``limit`` candidates, evenly spread, always including the first and last."""
    if limit is None or len(candidates) <= limit:
        return candidates
    if limit < 2:
        raise ValueError(f"max_candidates must be at least 2, got {limit}")
    picks = torch.linspace(0, len(candidates) - 1, limit).round().long().unique().tolist()
    return [candidates[i] for i in picks]


@dataclass(frozen=True)
class SearchResult:
    plan: ReassemblyPlan
    theta: float
    error: float
    baseline_error: float  # error without reassembly (r = 0)
    evaluated: int


def find_threshold(
    absmax: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    objective: Callable[[ReassemblyPlan], torch.Tensor | float],
    channel_ratio: float = 0.2, max_candidates: int | None = None,
) -> SearchResult:
    """Adaptive reassembly: the plan whose ``objective`` (reconstruction error) is lowest.

    ``absmax``: per-channel calibration max |x| (all tokens); ``x``: site activations used for
    pair scores (official: the first ``calibrate_bs`` samples); ``weight``: the site's weights.
    Pair scores are computed where ``x`` lives, plans on the CPU. The objective may return a
    device tensor: every candidate is queued before the errors are read back, once.
    """
    scores = pair_scores(x, weight).cpu()
    nearest = nearest_partners(scores)
    evaluated = []
    for theta, counts in thin_candidates(threshold_candidates(absmax, channel_ratio), max_candidates):
        plan = reassembly_plan(counts, scores, nearest)
        if plan is not None:
            evaluated.append((plan, theta, objective(plan)))
    if not evaluated:
        raise RuntimeError("no reassembly candidate could be evaluated (empty calibration statistics?)")
    errors = torch.stack([torch.as_tensor(e, dtype=torch.float64) for *_, e in evaluated]).tolist()
    best = min(range(len(errors)), key=errors.__getitem__)  # first of equal errors, as a running min
    plan, theta, _ = evaluated[best]
    return SearchResult(plan, theta, errors[best], errors[0], len(evaluated))


class ChannelReassembly(nn.Module):
    """A site's reassembly as a QuantLinear input transform (``forward`` + ``transform_weight``).

    Buffers of fixed length ``C`` (identity at construction, filled by :meth:`set_plan`), so a saved
    layer reloads with ``load_state_dict(strict=True)``. In FP,
    ``F.linear(self(x), self.transform_weight(W)) == F.linear(x, W)`` for disassembly-only plans and
    approximately so once channels are merged.
    """

    def __init__(self, channels: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        plan = identity_plan(channels)
        self.register_buffer("scale", plan.scale.to(dtype))
        self.register_buffer("group", plan.group)
        self.register_buffer("slot_src", plan.slot_src)

    def set_plan(self, plan: ReassemblyPlan) -> None:
        """Load ``plan`` (its slot count may differ from C only for unsaved, test-only plans)."""
        if plan.num_channels != self.scale.numel():
            raise ValueError(f"plan has {plan.num_channels} channels, transform has {self.scale.numel()}")
        # non_blocking: the threshold search loads one plan per candidate without a host sync each
        self.scale = plan.scale.to(self.scale, non_blocking=True)
        self.group = plan.group.to(self.group.device, non_blocking=True)
        self.slot_src = plan.slot_src.to(self.slot_src.device, non_blocking=True)

    def _sum_by_group(self, t: torch.Tensor) -> torch.Tensor:
        return t.new_zeros(t.shape).index_add(-1, self.group, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale.to(x.dtype)
        # channels per merge group (bincount would read its size back from the device: a host sync)
        group_size = x.new_zeros(self.group.numel()).index_add_(0, self.group, x.new_ones(self.group.numel()))
        return (self._sum_by_group(x) / group_size.clamp(min=1)).index_select(-1, self.slot_src)

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._sum_by_group(weight).index_select(-1, self.slot_src)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"
