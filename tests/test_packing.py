"""Real int4 storage: pack/unpack round trips and input validation."""
import pytest
import torch

from qllm_core.quant import pack_int4, pack_uint4, quantize_to_codes, unpack_int4, unpack_uint4


@pytest.mark.parametrize("shape", [(2,), (3, 8), (5, 7, 6), (1, 4096)])
def test_int4_round_trip(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(packed), q)


def test_int4_nibble_layout():
    packed = pack_int4(torch.tensor([1, -1, -8, 7], dtype=torch.int8))
    assert packed.tolist() == [0xF1, 0x78]  # element 2j low nibble, 2j+1 high nibble


@pytest.mark.parametrize("shape", [(6,), (3, 10)])
def test_uint4_round_trip(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    assert torch.equal(unpack_uint4(pack_uint4(q)), q)
    assert torch.equal(pack_uint4(q, check_range=False), pack_uint4(q))  # the unchecked path packs alike


def test_quantized_weights_survive_packing():
    codes, _, _ = quantize_to_codes(torch.randn(16, 32), 4, symmetric=True)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_packing_errors():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8, 0], dtype=torch.int16))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_uint4(torch.tensor([16, 0]))
