"""Quantizers (fake-quant with STE), the quantized linear layer and int4 packing."""
from .packing import pack_int4, pack_uint4, unpack_int4, unpack_uint4
from .qlinear import QuantLinear, shared_inputs
from .quantizer import (
    OFF_BITS, VALID_BITS, Quantizer, check_bits, compiled_fake_quant, fake_quantize, quantize_to_codes, quantizers_off,
    round_ste,
)

__all__ = [
    "OFF_BITS", "VALID_BITS", "Quantizer", "QuantLinear", "check_bits", "compiled_fake_quant", "fake_quantize",
    "quantize_to_codes", "quantizers_off", "shared_inputs", "round_ste", "pack_int4", "unpack_int4", "pack_uint4", "unpack_uint4",
]
