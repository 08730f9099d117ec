"""QLLM: channel disassembly / assembly / adaptive search, folding, low-rank error correction, resume."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from qllm_core.engine import BlockwiseEngine, call_layer, capture_layer0_inputs
from qllm_core.methods import QuantConfig, make_method
from qllm_core.methods.qllm import SITES, LowRankDelta, attach_low_rank, fold_scale, fuse_low_rank
from qllm_core.methods.base import quant_linears
from qllm_core.quant import fake_quantize
from qllm_core.reassembly import (
    ChannelReassembly, disassembly_counts, disassembly_plan, find_threshold, match_pairs, nearest_partners,
    pair_scores, reassembly_plan, threshold_candidates,
)

W4A4 = QuantConfig(w_bits=4, a_bits=4, w_asym=True, a_asym=True)
SMALL = {"epochs": 2, "max_candidates": 6, "calibrate_bs": 2}


def layer0_batch(model, adapter, n=4, tokens=32, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (n, tokens), generator=torch.Generator().manual_seed(seed))
    return ids, capture_layer0_inputs(model, adapter, ids, torch.device("cpu"))


def test_disassembly_alone_is_exact_in_fp_with_folding(tiny_llama):
    """Disassembly (C -> C + r channels) at all three sites + folding leaves the block output unchanged."""
    model, adapter = tiny_llama(dtype=torch.float64)
    _, stream = layer0_batch(model, adapter)
    layer = adapter.layers[0]
    reference = call_layer(copy.deepcopy(layer), stream.hidden, stream.kwargs)
    method = make_method("qllm", QuantConfig(), reassembly=True)  # 16 bits: quantizers off
    method.prepare_model(model, adapter)
    method.build_layer(0, layer, adapter)
    added = 0
    for site, roles in SITES.items():
        transform = adapter.linear(layer, roles[0]).input_transform
        channels = transform.scale.numel()
        absmax = torch.rand(channels, generator=torch.Generator().manual_seed(len(site))) * 10
        plan = disassembly_plan(disassembly_counts(absmax, theta=4.0))
        assert plan.slot_src.numel() > channels  # really added channels
        added += plan.num_added
        transform.set_plan(plan)
        fold_scale(layer, site, transform, adapter)
        assert torch.equal(transform.scale, torch.ones_like(transform.scale))
    out = call_layer(layer, stream.hidden, stream.kwargs)
    assert added > 0
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)


def test_assembly_error_is_the_merged_pairs_term_and_bounded():
    """Merging (i, j) replaces x_i w_i + x_j w_j by mean(x) * (w_i + w_j): error = (x_i-x_j)(w_i-w_j)/2."""
    g = torch.Generator().manual_seed(0)
    tokens, channels, out_f = 256, 16, 8
    x = torch.randn(tokens, channels, generator=g, dtype=torch.float64)
    x[:, 5] = x[:, 4] + 1e-3 * torch.randn(tokens, generator=g, dtype=torch.float64)  # a near-duplicate pair
    x[:, 0] *= 1.5 * x[:, 1:].abs().max() / x[:, 0].abs().max()  # one outlier channel: T_0 = 2
    w = torch.randn(out_f, channels, generator=g, dtype=torch.float64)
    counts = disassembly_counts(x.abs().amax(0), theta=x[:, 1:].abs().max().item() + 1e-9)
    assert counts[0] > 1 and counts[1:].eq(1).all()
    plan = reassembly_plan(counts, pair_scores(x, w))
    assert plan.slot_src.numel() == channels and plan.num_added == int(counts[0] - 1)
    transform = ChannelReassembly(channels)
    transform.set_plan(plan)
    approx = F.linear(transform(x), transform.transform_weight(w))
    merged = (plan.group != torch.arange(channels)).nonzero().flatten()
    predicted = sum(torch.outer(x[:, i] - x[:, plan.group[i]], w[:, i] - w[:, plan.group[i]]) / 2 for i in merged)
    torch.testing.assert_close(F.linear(x, w) - approx, predicted, rtol=0, atol=1e-10)
    bound = sum((x[:, i] - x[:, plan.group[i]]).norm() * (w[:, i] - w[:, plan.group[i]]).norm() / 2 for i in merged)
    rel = ((F.linear(x, w) - approx).norm() / F.linear(x, w).norm()).item()
    print(f"assembly relative output error: {rel:.3e} ({len(merged)} merged pairs)")
    assert (F.linear(x, w) - approx).norm() <= bound + 1e-12
    assert merged.tolist() == [4] and plan.group[4] == 5  # the planted near-duplicate pair is merged
    assert rel < 1e-3


@pytest.mark.parametrize("seed", range(6))
def test_match_pairs_equals_the_masked_minimum(seed):
    """The shared nearest-partner search gives exactly the pairs of masking every disassembled channel
    out of the full score matrix and taking each row's minimum (ties included: integer scores)."""
    g = torch.Generator().manual_seed(seed)
    channels = 41 + seed  # odd and even channel counts
    scores = torch.randint(0, 6, ((channels + 1) // 2, channels // 2), generator=g).double()
    nearest = nearest_partners(scores)
    for n_split in (0, 1, 3, 8):
        counts = torch.ones(channels, dtype=torch.long)
        counts[torch.randperm(channels, generator=g)[:n_split]] = 2
        split = counts > 1
        masked = scores.masked_fill(split[::2, None], math.inf).masked_fill(split[None, 1::2], math.inf)
        best, partner = masked.min(dim=1)
        for merges in (1, 4, 12):
            order = best.argsort(stable=True)[:merges]
            want = (order * 2, partner[order] * 2 + 1) if torch.isfinite(best[order]).all() else None
            got = match_pairs(scores, counts, merges, nearest)
            assert (got is None) == (want is None)
            if want is not None:
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_threshold_sweep_respects_channel_budget():
    absmax = torch.cat([torch.full((90,), 1.0), torch.tensor([30.0, 12.0, 5.0] + [2.0] * 7)])
    candidates = threshold_candidates(absmax, channel_ratio=0.2)
    added = [int((c - 1).sum()) for _, c in candidates]
    assert added[0] == 0 and added == sorted(set(added)) and max(added) <= 20


def test_adaptive_search_beats_no_reassembly_on_outlier_activations():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g, dtype=torch.float64)
    x[:, [3, 10]] *= 60.0
    w = torch.randn(32, 64, generator=g, dtype=torch.float64) / 8
    reference = F.linear(x, w)
    transform = ChannelReassembly(64)

    def objective(plan):
        transform.set_plan(plan)
        xq = fake_quantize(transform(x), 4, symmetric=False)
        wq = fake_quantize(transform.transform_weight(w), 4, symmetric=False)
        return F.mse_loss(F.linear(xq, wq), reference).item()

    result = find_threshold(x.abs().amax(0), x, w, objective, channel_ratio=0.2)
    assert result.plan.num_added > 0
    assert result.error < 0.9 * result.baseline_error  # merged random channels cost part of the gain


def built_layer0(tiny_llama, reassembly: bool):
    """A float64 tiny model and its layer 0 built (quantized linears, not calibrated) by QLLM."""
    model, adapter = tiny_llama(dtype=torch.float64)
    method = make_method("qllm", W4A4, reassembly=reassembly)
    method.prepare_model(model, adapter)
    method.build_layer(0, adapter.layers[0], adapter)
    return model, adapter, adapter.layers[0]


def test_fused_low_rank_equals_unfused_adapter(tiny_llama):
    model, adapter, layer = built_layer0(tiny_llama, reassembly=True)
    _, stream = layer0_batch(model, adapter)
    g = torch.Generator().manual_seed(3)
    for q in quant_linears(layer).values():
        delta = attach_low_rank(q, rank=4, generator=g)
        with torch.no_grad():
            delta.lora_B.normal_(0, 0.05, generator=g)
    with torch.no_grad():
        unfused = call_layer(layer, stream.hidden, stream.kwargs)
        for q in quant_linears(layer).values():
            fuse_low_rank(q, requantize=False)
        fused = call_layer(layer, stream.hidden, stream.kwargs)
    assert not any("lora" in k for k in layer.state_dict())
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-10)


@pytest.mark.parametrize("autocast", [False, True])
def test_low_rank_adapter_matches_the_merged_weight_under_autograd(autocast):
    """LowRankDelta's linear (merged forward, factored backward) against the official form, autograd through
    ``F.linear(x, W + B A / r)``: forward bit for bit (float32, and under bf16 autocast where both run the
    same casts and GEMM); gradients of x, A and B to float32 round-off (1e-5 relative), or within bf16's
    resolution under autocast (the factored route skips the bf16 rounding of the weight gradient)."""
    torch.manual_seed(0)
    weight = torch.randn(48, 40)
    delta = LowRankDelta(48, 40, 4, torch.Generator().manual_seed(1), weight, weight.clone())
    with torch.no_grad():
        delta.lora_B.normal_(0, 0.1)
    a, b = (p.detach().clone().requires_grad_() for p in (delta.lora_A, delta.lora_B))
    x = torch.randn(2, 9, 40)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(2, 9, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = delta(x1, weight, None)
        official = F.linear(x2, weight + (b @ a) * delta.scaling)
    assert ours.dtype == official.dtype
    torch.testing.assert_close(ours, official, rtol=0, atol=0)
    for out in (ours, official):
        F.mse_loss(out.float(), target).backward()
    tol = dict(rtol=2e-2, atol=2e-4) if autocast else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)  # both dy · W' with the same merged weight
    torch.testing.assert_close(delta.lora_A.grad, a.grad, **tol)
    torch.testing.assert_close(delta.lora_B.grad, b.grad, **tol)


def test_low_rank_adapter_refuses_a_trainable_base():
    """The factored backward gives the frozen weight no gradient: a weight that asks for one is an error."""
    weight = torch.randn(8, 6, requires_grad=True)
    delta = LowRankDelta(8, 6, 2, torch.Generator().manual_seed(0), weight.detach(), weight.detach())
    out = delta(torch.randn(3, 6), weight, None)
    with pytest.raises(RuntimeError, match="frozen weight"):
        out.sum().backward()


def test_fused_low_rank_requantizes_the_fp_weight_plus_update(tiny_llama):
    """The official merge (ModelTC/QLLM train_utils.lora_merge): the update goes into the unquantized
    weight, then the sum is quantized: ``Q_w(W + B A / r)``, not ``Q_w(Q_w(W) + B A / r)`` (which rounds
    a sub-step update back onto Q_w(W) and loses it)."""
    _, _, layer = built_layer0(tiny_llama, reassembly=False)
    g = torch.Generator().manual_seed(5)
    for q in quant_linears(layer).values():
        fp = q.transformed_weight().detach().clone()
        delta = attach_low_rank(q, rank=4, generator=g)
        with torch.no_grad():
            delta.lora_B.normal_(0, 0.05, generator=g)
            update = delta.update().clone()
            frozen = q.weight_quantizer(fp)
        fuse_low_rank(q, requantize=True)
        torch.testing.assert_close(q.weight, q.weight_quantizer(fp + update), rtol=0, atol=0)
        assert not torch.equal(q.weight, q.weight_quantizer(frozen + update))  # the old, lossy merge differs
        with pytest.raises(RuntimeError, match="frozen"):
            q.transformed_weight()


def run_engine(model, adapter, ids, layer_dir, **options):
    method = make_method("qllm", W4A4, **{**SMALL, **options})
    BlockwiseEngine(model, adapter, "cpu", layer_dir).run(method, ids)
    return method


@pytest.mark.parametrize("num_layer", [1, 2])
def test_error_correction_lowers_block_loss_and_resume_matches(tiny_llama, tmp_path, num_layer):
    """Error correction over groups of ``num_layer`` layers; a run interrupted in the last group resumes."""
    model, adapter = tiny_llama(layers=4)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    method = run_engine(model, adapter, ids, tmp_path / "full", epochs=4, lr=5e-3, num_layer=num_layer)
    assert method.train_log[-1] < method.train_log[0]
    assert set(method.search_log) == set(SITES)
    full = {i: {k: v.clone() for k, v in layer.state_dict().items()} for i, layer in enumerate(adapter.layers)}
    (tmp_path / "full" / "003.safetensors").unlink()  # interrupted while saving the last group
    resumed_model, resumed_adapter = tiny_llama(layers=4)
    run_engine(resumed_model, resumed_adapter, ids, tmp_path / "full", epochs=4, lr=5e-3, num_layer=num_layer)
    for i, layer in enumerate(resumed_adapter.layers):
        state = layer.state_dict()
        assert state.keys() == full[i].keys()
        for k in state:
            torch.testing.assert_close(state[k], full[i][k], rtol=0, atol=1e-6, msg=f"layer {i} {k}")


def test_qllm_layers_beat_rtn_on_calibration_error(tiny_llama):
    """Each component lowers the quantized model's output error vs FP below RTN (tiny model, W4A4)."""
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    fp_model, _ = tiny_llama()
    with torch.no_grad():
        fp_logits = fp_model(ids).logits

    def error(method_name, **options):
        model, adapter = tiny_llama()
        method = make_method(method_name, W4A4, **options)
        BlockwiseEngine(model, adapter, "cpu").run(method, ids if method.needs_calibration else None)
        with torch.no_grad():
            return F.mse_loss(model(ids).logits, fp_logits).item()

    rtn = error("rtn")
    # the paper's lr (5e-4); EC alone (no reassembly) must survive the merge into 4-bit weights
    corrected = error("qllm", **{**SMALL, "reassembly": False, "epochs": 4})
    assert corrected < 0.95 * rtn


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown QLLM option"):
        make_method("qllm", W4A4, ranks=4)
    with pytest.raises(ValueError, match="num_layer"):
        make_method("qllm", W4A4, num_layer=0)


def test_no_quantized_stream_through_a_groups_earlier_layers(tiny_llama, monkeypatch):
    """QLLM's layers never read the quantized stream, only their group's error correction does: the engine
    skips the stream's pass through a group's earlier layers, and the result is bit-identical to making it."""
    from qllm_core.methods.qllm import QLLMMethod

    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))

    def run(layer_reads_quant_inputs: bool):
        monkeypatch.setattr(QLLMMethod, "layer_reads_quant_inputs", layer_reads_quant_inputs)
        torch.manual_seed(0)
        model, adapter = tiny_llama(layers=4)
        tokens = []
        for layer in adapter.layers:
            layer.register_forward_pre_hook(lambda mod, args, kw: tokens.append(
                (args[0] if args else kw["hidden_states"]).shape[:2].numel()), with_kwargs=True)
        run_engine(model, adapter, ids, None, epochs=2, num_layer=4)
        return model.state_dict(), sum(tokens)

    (made, tokens_made), (skipped, tokens_skipped) = run(True), run(False)
    assert made.keys() == skipped.keys() and all(torch.equal(made[k], skipped[k]) for k in made)
    assert tokens_made - tokens_skipped == 3 * ids.numel()  # layers 0-2 of the group: one pass each fewer
