"""K-quants (Q4_K, Q5_K, Q6_K) and the Q5_0 / Q5_1 fallbacks against llama.cpp itself.

The judge is llama.cpp's quantizer as llama-cpp-python ships it: `ggml_quantize_chunk` in its libggml-base (the
function `llama_model_quantize` calls for every tensor), with and without an importance matrix. Dequantization is
compared with gguf-py's `gguf.quants.dequantize`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from nextq.quant import dequantize, get_scheme, quantize
from nextq.quant.kquants import KQUANTS

llama_cpp = pytest.importorskip("llama_cpp")

GGML_TYPES = {"q4_k": 12, "q5_k": 13, "q6_k": 14, "q5_0": 6, "q5_1": 7}


@pytest.fixture(scope="module")
def ggml():
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def reference(lib, scheme: str, w: torch.Tensor, imatrix: torch.Tensor | None = None) -> np.ndarray:
    """llama.cpp's blocks for w `[N, K]` (imatrix `[K]` per column, as llama_model_quantize passes it)."""
    x = np.ascontiguousarray(w.numpy(), np.float32)
    n, k = x.shape
    out = np.zeros(get_scheme(scheme).data_shape(n, k), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), np.float32)
    lib.ggml_quantize_chunk(GGML_TYPES[scheme], x.ctypes.data, out.ctypes.data, 0, n, k,
                            None if im is None else im.ctypes.data)
    return out


def awkward(case: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Weights that exercise the corner cases of ggml's searches, float32 [N, K]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    if case == "ties":  # a coarse grid: many values exactly halfway between codes, equal maxima
        w = (w * 64).round() / 64
    elif case == "zeros":  # all-zero rows, sub-blocks and super-blocks next to outliers
        w[:, :40] = 0
        w[1] = 0
        w[2, 256:] = 0
        w[3, 7] = 3.0
    elif case == "outliers":
        idx = torch.randint(0, n * k, (n * k // 50,), generator=g)
        w.view(-1)[idx] *= 60.0
    elif case == "positive":  # min > 0 in every sub-block (ggml clamps the min to 0)
        w = w.abs() + 0.01
    elif case == "negative":
        w = -w.abs()
    elif case == "constant":
        w = torch.full((n, k), 0.125)
    return w


CASES = ("normal", "ties", "zeros", "outliers", "positive", "negative", "constant")


@pytest.mark.parametrize("scheme", ["q4_k", "q5_k", "q6_k"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("weighted", [False, True], ids=["rtn", "imatrix"])
def test_kquant_blocks_byte_identical_to_llama_cpp(ggml, scheme, case, weighted):
    n, k = 9, 512 if case != "normal" else 768  # rows of 256 * k: 2 and 3 super-blocks
    w = awkward(case, n, k)
    imatrix = None
    if weighted:
        imatrix = torch.rand(k, generator=torch.Generator().manual_seed(1)) * 2
        imatrix[:5] = 0  # columns never seen
    got = KQUANTS[scheme].quantize(w, imatrix).data.numpy()
    want = reference(ggml, scheme, w, imatrix)
    rows = np.nonzero((got != want).any(-1))[0]
    assert rows.size == 0, f"{scheme} {case}: rows {rows.tolist()} differ from llama.cpp"  # exact, every byte


@pytest.mark.parametrize("scheme", ["q5_0", "q5_1"])
@pytest.mark.parametrize("case", ["normal", "ties", "zeros", "outliers"])
def test_q5_fallback_blocks_byte_identical_to_llama_cpp(ggml, scheme, case):
    w = awkward(case, 5, 160)  # K a multiple of 32, not of 256: where llama.cpp falls back to these
    assert np.array_equal(quantize(w, scheme).data.numpy(), reference(ggml, scheme, w))


@pytest.mark.parametrize("scheme", ["q4_k", "q5_k", "q6_k", "q5_0", "q5_1"])
def test_dequantize_equals_gguf_py(scheme):
    w = awkward("outliers", 7, 512)
    qt = quantize(w, scheme)
    want = gguf.quants.dequantize(qt.data.numpy(), gguf.GGMLQuantizationType[scheme.upper()])
    assert np.array_equal(dequantize(qt).numpy(), want.reshape(7, 512))  # bit for bit
    err = (dequantize(qt) - w).abs().max() / w.abs().max()
    assert err < {"q4_k": 0.1, "q5_k": 0.05, "q6_k": 0.02, "q5_0": 0.05, "q5_1": 0.05}[scheme]


@pytest.mark.parametrize("scheme", ["q4_k", "q5_k", "q6_k"])
def test_encode_decode_round_trip(scheme):
    kq = KQUANTS[scheme]
    w = awkward("normal", 3, 512)
    qt = kq.quantize(w)
    q, p = kq.decode(qt)
    assert torch.equal(kq.encode(q, p).data, qt.data)


@pytest.mark.parametrize("scheme", ["q4_k", "q6_k"])
def test_kquant_refuses_rows_not_multiple_of_256(scheme):
    with pytest.raises(ValueError, match="not a multiple of group_size=256"):
        quantize(torch.randn(2, 384), scheme)
