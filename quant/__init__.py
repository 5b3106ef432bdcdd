"""Weight quantization for nextq: pure functions per scheme family, one registry, one tensor type."""

from .fp8 import E4M3_MAX, cast_e4m3_saturating
from .int4 import pack_int4, to_gguf_q4_0_blocks, to_gguf_q4_1_blocks, unpack_int4
from .int8 import round_half_away, to_gguf_q8_0_blocks
from .schemes import SCHEMES, Scheme, dequantize, get_scheme, quantize
from .tensor import QuantizedTensor

__all__ = [
    "E4M3_MAX",
    "SCHEMES",
    "QuantizedTensor",
    "Scheme",
    "cast_e4m3_saturating",
    "dequantize",
    "get_scheme",
    "pack_int4",
    "quantize",
    "round_half_away",
    "to_gguf_q4_0_blocks",
    "to_gguf_q4_1_blocks",
    "to_gguf_q8_0_blocks",
    "unpack_int4",
]
