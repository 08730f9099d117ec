"""qllm_core.deploy: quantized runs -> kernel layers (W4A4Linear), same function as the fake-quant model."""
import pytest
import torch

from qllm_core.adapters import LINEAR_ROLES
from qllm_core.deploy import to_kernels, weight_codes
from qllm_core.engine import BlockwiseEngine
from qllm_core.methods import QuantConfig, make_method
from qllm_core.quant import Quantizer

pytest.importorskip("kernels.qlinear")


def test_weight_codes_recover_clipped_and_unclipped_grids_exactly():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=gen)
    w[1] = -w[1].abs()  # row extreme negative: code -7 (no clip)
    w[2] = 0.0  # all-zero row
    lwc = Quantizer(4, symmetric=True, learnable_clip_shape=(6, 1))
    with torch.no_grad():
        lwc.clip_max_logit[3:] = -1.0  # clip ratio 0.27: extremes clamp to +7 / -8
    frozen = lwc(w).detach()
    codes, scale = weight_codes(frozen)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert (codes[3:] == -8).any() or (codes[3:] == 7).any()
    torch.testing.assert_close(codes.float() * scale[:, None], frozen, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not on a symmetric per-channel int4 grid"):
        weight_codes(torch.randn(2, 16, generator=gen))


def _quantized(tiny_llama, method, quant, **options):
    model, adapter = tiny_llama(hidden=64, intermediate=96, heads=4, kv_heads=2)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    qmethod = make_method(method, quant, **options)
    BlockwiseEngine(model, adapter).run(qmethod, ids if qmethod.needs_calibration else None)
    return model, adapter, ids


@pytest.mark.parametrize("method,quant,options", [
    ("rtn", QuantConfig(w_bits=4, a_bits=4), {}),
    ("rtn", QuantConfig(w_bits=4), {}),  # W4A16: the weight-only path
    ("rtn", QuantConfig(w_bits=4, a_bits=4, a_asym=True), {}),
    ("quarot", QuantConfig(w_bits=4, a_bits=4), {}),  # online Hadamard factors at down_proj
    ("flatquant", QuantConfig(w_bits=4, a_bits=4, kv_bits=4), {"epochs": 1}),  # learned Kronecker + LAC + LWC
])
def test_kernel_model_matches_fake_quant_model(tiny_llama, device, method, quant, options):
    """Logits of the converted model vs the fake-quant model it came from: equal up to rounding flips.

    Tolerance: the kernels transform and quantize in fp32 here (the fake-quant path too), so the
    only differences are summation order and the rare activation landing on a rounding boundary.
    """
    model, adapter, ids = _quantized(tiny_llama, method, quant, **options)
    with torch.no_grad():
        reference = model(ids).logits
        to_kernels(model.to(device), adapter)
        kernel = model(ids.to(device)).logits.cpu()
    decode_paths = {adapter.linear(layer, role).decode_gemv for layer in adapter.layers for role in LINEAR_ROLES}
    assert decode_paths == {"dp4a" if quant.a_bits == 4 else None}  # W4A4 decodes through the dp4a GEMV
    rel = ((kernel - reference).norm() / reference.norm()).item()
    print(f"{method} {quant.label}: relative logit difference kernels vs fake-quant {rel:.2e}")
    assert rel < (1e-3 if quant.a_bits == 16 else 1e-4)  # W4A16 rounds activations to fp16


def test_kernel_model_decodes_like_the_fake_quant_model(tiny_llama, device):
    """Prefill + token-by-token decode (KV cache, one token per step through the dp4a GEMV) gives the same
    greedy tokens."""
    model, adapter, ids = _quantized(tiny_llama, "flatquant", QuantConfig(w_bits=4, a_bits=4, kv_bits=4), epochs=1)
    model.config.use_cache = True
    prompt = ids[:1, :8]
    with torch.no_grad():
        reference = model.generate(prompt, max_new_tokens=6, do_sample=False)
        to_kernels(model.to(device), adapter)
        tokens = model.generate(prompt.to(device), max_new_tokens=6, do_sample=False).cpu()
    assert tokens.shape == (1, 14)
    assert torch.equal(tokens, reference)


def test_unsupported_runs_are_refused_with_the_reason(tiny_llama):
    model, adapter, _ = _quantized(tiny_llama, "rtn", QuantConfig(w_bits=4, a_bits=4, w_asym=True))
    with pytest.raises(NotImplementedError, match="layer 0 q_proj: the W4A4 GEMM takes symmetric"):
        to_kernels(model, adapter)
    model, adapter, _ = _quantized(tiny_llama, "rtn", QuantConfig(w_bits=4, a_bits=8))
    with pytest.raises(NotImplementedError, match="4 bits"):
        to_kernels(model, adapter)


def test_cli_evaluates_a_run_on_the_kernels(tiny_model_dir, data_dir, tmp_path, device):
    """`python -m eval ppl --kernels` on an RTN W4A4 run: same perplexity as the fake-quant model.

    On the fixture's device: compiled Triton kernels need CUDA tensors (without ``--device cuda`` the
    CLI evaluated on the CPU and the kernels failed on the H200); on a CPU the interpreter runs them."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "QLLM_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "eval"]
    made = subprocess.run(run + ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--w-bits", "4",
                                 "--a-bits", "4", "--out", str(tmp_path / "run")], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    ppl = [run + ["ppl", "--model", str(tmp_path / "run"), "--max-windows", "1", "--seqlen", "256", "--json",
                  "--device", device] + extra for extra in ([], ["--kernels"])]
    fake, kernel = (json.loads(subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                              check=True).stdout.splitlines()[-1]) for cmd in ppl)
    assert kernel.get("kernels") is True and "kernels" not in fake
    assert kernel["ppl"] == pytest.approx(fake["ppl"], rel=1e-4)
