"""Quantizer edge cases: zeros, constant rows, outliers, odd sizes, every bit width, STE."""
import pytest
import torch

from qllm_core.quant import OFF_BITS, Quantizer, check_bits, fake_quantize, quantize_to_codes
from qllm_core.quant.quantizer import quant_params

BITS = [2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_rows_stay_zero(bits, symmetric):
    x = torch.zeros(3, 10)
    x[1] = torch.randn(10)
    out = fake_quantize(x, bits, symmetric)
    assert torch.equal(out[0], torch.zeros(10)) and torch.equal(out[2], torch.zeros(10))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("value", [3.7, -0.25, 1e-3])
def test_constant_rows_are_exact(bits, symmetric, value):
    x = torch.full((4, 9), value)
    torch.testing.assert_close(fake_quantize(x, bits, symmetric), x, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,group", [((5, 13), None), ((3, 7, 11), None), ((6, 24), 8), ((2, 3, 30), 5)])
def test_error_within_half_step_and_level_count(bits, symmetric, shape, group):
    torch.manual_seed(bits)
    x = torch.randn(shape)
    x.view(-1)[::17] *= 50.0  # outliers
    out = fake_quantize(x, bits, symmetric, group)
    g = x if group is None else x.reshape(*shape[:-1], shape[-1] // group, group)
    scale, _, _, _ = quant_params(g, bits, symmetric)
    err = (out.reshape(g.shape) - g).abs()
    assert (err <= scale / 2 + 1e-6 * g.abs().amax(-1, keepdim=True)).all()
    levels = [torch.unique(row).numel() for row in out.reshape(g.shape).reshape(-1, g.shape[-1])]
    assert max(levels) <= 2**bits


def test_outlier_dominates_per_token_scale():
    x = torch.ones(1, 64) * 0.01
    x[0, 0] = 100.0
    out = fake_quantize(x, 4, symmetric=True)
    assert out[0, 0] == pytest.approx(100.0)
    assert torch.equal(out[0, 1:], torch.zeros(63))  # small channels collapse: the outlier problem


def test_bits_off_is_identity_object():
    x = torch.randn(4, 4)
    assert fake_quantize(x, OFF_BITS) is x
    assert Quantizer(OFF_BITS)(x) is x


@pytest.mark.parametrize("bad", [0, 1, 9, 12, 32, 4.0, True, "4"])
def test_invalid_bits_rejected(bad):
    with pytest.raises(ValueError, match="2..8"):
        check_bits(bad)
    with pytest.raises(ValueError):
        Quantizer(bad)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="not divisible"):
        fake_quantize(torch.randn(2, 10), 4, group_size=3)


@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_match_fake_quant(symmetric):
    x = torch.randn(7, 32)
    codes, scale, zero = quantize_to_codes(x, 4, symmetric, group_size=16)
    deq = ((codes.float().reshape(7, 2, 16) - zero) * scale).reshape(7, 32)
    torch.testing.assert_close(deq, fake_quantize(x, 4, symmetric, 16), rtol=0, atol=1e-6)
    lo, hi = (-8, 7) if symmetric else (0, 15)
    assert codes.min() >= lo and codes.max() <= hi


def test_ste_passes_gradient_and_clip_is_learnable():
    x = torch.randn(4, 16, requires_grad=True)
    fake_quantize(x, 4).sum().backward()
    # STE: d out / d x = 1 everywhere except the row max, which also moves the scale.
    not_max = torch.ones_like(x, dtype=torch.bool).scatter(1, x.detach().abs().argmax(1, keepdim=True), False)
    torch.testing.assert_close(x.grad[not_max], torch.ones(int(not_max.sum())))
    q = Quantizer(4, symmetric=False, learnable_clip_shape=(4, 1))
    assert torch.sigmoid(q.clip_max_logit).min().item() == pytest.approx(0.982, abs=1e-3)
    ((q(x.detach()) - x.detach()) ** 2).sum().backward()
    assert q.clip_max_logit.grad is not None and q.clip_max_logit.grad.abs().sum() > 0
    assert q.clip_min_logit.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_rows_stay_zero_in_half_precision(dtype, symmetric):
    """1e-8 rounds to 0 in float16: the scale floor must not, or 0 / 0 gives NaN (autocast training)."""
    x = torch.zeros(2, 16, dtype=dtype)
    x[1] = torch.linspace(-1, 1, 16, dtype=dtype)
    out = Quantizer(4, symmetric)(x)
    assert torch.equal(out[0], torch.zeros(16, dtype=dtype)) and torch.isfinite(out).all()
