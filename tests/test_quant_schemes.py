"""Tests for nextq.quant: packing, known-answer vectors, GGUF bit-exactness, error bounds, fp8 saturation,
serialisation round trips and error messages."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from nextq.quant import (
    E4M3_MAX,
    SCHEMES,
    QuantizedTensor,
    cast_e4m3_saturating,
    dequantize,
    pack_int4,
    quantize,
    to_gguf_q4_0_blocks,
    to_gguf_q4_1_blocks,
    to_gguf_q8_0_blocks,
    unpack_int4,
)
from nextq.quant.affine import AFFINE_VIEWS, affine_blocks

GROUPS = (32, 64, 128)
# (N, K): single row, non-power-of-two N, K a multiple of 32 but not of 128, K a multiple of 128 but not a power of 2
SHAPES_32 = [(1, 32), (3, 96), (17, 160), (5, 256)]
SHAPES_128 = [(1, 128), (7, 384), (33, 256)]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, for bit-exact comparisons (distinguishes -0.0, works for float8)."""
    return t.contiguous().view(torch.uint8)


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Normal weights at a real checkpoint's scale with a few large outliers, float32 [N, K]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    idx = torch.randint(0, n * k, (max(1, n * k // 100),), generator=g)
    w.view(-1)[idx] *= 50.0
    return w


def shapes_for(group: int) -> list[tuple[int, int]]:
    return SHAPES_32 if group == 32 else [(n, k) for n, k in SHAPES_32 + SHAPES_128 if k % group == 0]


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("n, k", [(1, 2), (3, 2), (5, 96), (7, 160), (2, 33 * 2)])  # K=2, odd number of groups
def test_pack_unpack_round_trip(n: int, k: int) -> None:
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    packed = pack_int4(q)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)


def test_pack_nibble_order_low_even() -> None:
    # ONNX Runtime MatMulNBits/QMoE: k=0 in the low nibble, k=1 in the high nibble
    assert pack_int4(torch.tensor([[0x1, 0x2, 0xF, 0x0]], dtype=torch.uint8)).tolist() == [[0x21, 0x0F]]


@pytest.mark.parametrize("q", [torch.zeros(1, 3, dtype=torch.uint8), torch.full((1, 2), 16, dtype=torch.uint8)])
def test_pack_rejects_odd_width_and_wide_codes(q: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="pack_int4"):
        pack_int4(q)


# ---------------------------------------------------------------- known-answer vectors


def codes(qt: QuantizedTensor) -> list[int]:
    return unpack_int4(qt.data)[0].tolist()


@pytest.mark.parametrize("group", GROUPS)
def test_int4_sym_known_answer(group: int) -> None:
    # x = -16..15: max |x| is x[0] = -16, so d = -16 / -8 = 2, id = 0.5, q = min(15, trunc(x/2 + 8.5))
    row = torch.arange(32, dtype=torch.float32) - 16
    expected = [0] + [c for c in range(1, 16) for _ in (0, 1)] + [15]  # 15.5 + 8.5 = 16 clips to 15
    qt = quantize(row.repeat(group // 32).unsqueeze(0), f"int4_sym_g{group}")  # each group = copies of the row
    assert codes(qt) == expected * (group // 32)
    assert qt.scales.tolist() == [[2.0]] and qt.scales.dtype == torch.float16
    assert qt.zero_points is None and qt.nibble_order == "low_even" and qt.block_size == group


def test_int4_sym_keeps_sign_of_max_and_clips_opposite_end() -> None:
    # max |x| = 8 is positive -> d = 8 / -8 = -1 (negative scale, as ggml); -4 -> trunc(4 + 8.5) = 12
    row = torch.zeros(1, 32)
    row[0, 0], row[0, 1] = 8.0, -4.0
    qt = quantize(row, "int4_sym_g32")
    assert qt.scales.tolist() == [[-1.0]]
    assert codes(qt)[:3] == [0, 12, 8]
    assert dequantize(qt)[0, :3].tolist() == [8.0, -4.0, 0.0]
    # the other end: codes span [-8d, 7d], so +8 next to a leading -8 clips to q=15 -> 7 (error = one step)
    row[0, 0], row[0, 1] = -8.0, 8.0
    qt = quantize(row, "int4_sym_g32")
    assert codes(qt)[:2] == [0, 15] and dequantize(qt)[0, :2].tolist() == [-8.0, 7.0]


def test_int4_asym_known_answer() -> None:
    # min 0, max 15 -> d = 1, m = 0; q = trunc(x + 0.5): 2.5 -> 3 (half up), 2.49 -> 2, 7.5 -> 8
    row = torch.zeros(1, 32)
    row[0, :5] = torch.tensor([0.0, 15.0, 2.5, 2.49, 7.5])
    qt = quantize(row, "int4_asym_g32")
    assert codes(qt)[:6] == [0, 15, 3, 2, 8, 0]
    assert qt.scales.tolist() == [[1.0]] and qt.zero_points.tolist() == [[0.0]]
    # offset ramp: x = 1 + 0.5 * (i % 16) -> d = 7.5 / 15 = 0.5, m = 1, codes i % 16, exact dequant
    ramp = 1.0 + 0.5 * (torch.arange(64, dtype=torch.float32) % 16)
    qt = quantize(ramp.unsqueeze(0), "int4_asym_g64")
    assert codes(qt) == [i % 16 for i in range(64)]
    assert qt.scales.tolist() == [[0.5]] and qt.zero_points.tolist() == [[1.0]]
    assert torch.equal(dequantize(qt), ramp.unsqueeze(0))


def test_int8_known_answers() -> None:
    # amax 127 -> scale 1 in both; ties show the rounding rule of each scheme
    row = torch.zeros(1, 32)
    row[0, :6] = torch.tensor([127.0, 0.5, -0.5, 1.5, 2.5, -2.5])
    q8_0 = quantize(row, "int8_g32")  # ggml roundf: half away from zero
    assert q8_0.data[0, :7].tolist() == [127, 1, -1, 2, 3, -3, 0]
    assert q8_0.scales.tolist() == [[1.0]] and q8_0.scales.dtype == torch.float16
    # ggml multiplies by id = 1/d (float32), it does not divide: with amax 1, x = 0.03543307 gives
    # x * id = 4.4999995 -> 4, where x / d would be exactly 4.5 -> 5
    near_tie = torch.zeros(1, 32)
    near_tie[0, :2] = torch.tensor([1.0, 0.03543307])
    assert quantize(near_tie, "int8_g32").data[0, :2].tolist() == [127, 4]
    assert gguf.quants.quantize(near_tie.numpy(), gguf.GGMLQuantizationType.Q8_0)[0, 3] == 4  # bytes 0-1 are d
    channel = quantize(row, "int8_channel")  # torch.round: half to even
    assert channel.data[0, :7].tolist() == [127, 0, 0, 2, 2, -2, 0]
    assert channel.scales.tolist() == [[1.0]] and channel.scales.dtype == torch.float32


def test_fp8_channel_known_answer() -> None:
    # row 0: amax 448 -> scale 1; e4m3 grid near 0.3 is 0.28125 / 0.3125; smallest subnormal 2^-9 = 0.001953125
    w = torch.zeros(2, 8)
    w[0, :6] = torch.tensor([448.0, 1.0, -2.0, 0.3, 1e-3, 5e-4])
    qt = quantize(w, "fp8_channel")
    assert qt.scales.tolist() == [[1.0], [1.0]]  # row 1 is all zero -> scale 1, not 0
    assert qt.data.to(torch.float32)[0, :6].tolist() == [448.0, 1.0, -2.0, 0.3125, 0.001953125, 0.0]
    assert dequantize(qt)[1].tolist() == [0.0] * 8


def test_fp8_block128_known_answer() -> None:
    # 130 x 129 -> 2 x 2 tiles, the right/bottom ones ragged; scale = tile amax / 448, 1 for empty tiles
    w = torch.zeros(130, 129)
    w[0, 0] = 896.0
    w[129, 128] = -224.0
    qt = quantize(w, "fp8_block128")
    assert qt.scales.tolist() == [[2.0, 1.0], [1.0, 0.5]]
    assert qt.block_size == (128, 128)
    assert torch.equal(dequantize(qt), w)


# ---------------------------------------------------------------- GGUF bit-exactness


def gguf_rows(n: int, k: int, seed: int) -> torch.Tensor:
    w = weights(n, k, seed)
    w[0, :32] = 0.0  # an all-zero block: d = 0, id = 0 (ggml's `d ? 1/d : 0`)
    return w


@pytest.mark.parametrize("n, k", [(1, 32), (3, 64), (17, 96), (5, 160), (2, 256)])
@pytest.mark.parametrize(
    "scheme, qtype, repack",
    [
        ("int4_sym_g32", "Q4_0", to_gguf_q4_0_blocks),
        ("int4_asym_g32", "Q4_1", to_gguf_q4_1_blocks),
        ("int8_g32", "Q8_0", to_gguf_q8_0_blocks),
    ],
)
def test_gguf_bit_exact(n: int, k: int, scheme: str, qtype: str, repack) -> None:
    w = gguf_rows(n, k, seed=n * k)
    gtype = gguf.GGMLQuantizationType[qtype]
    qt = quantize(w, scheme)
    ref = gguf.quants.quantize(w.numpy(), gtype)
    ours = repack(qt)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)  # exact bytes: an exporter may copy blocks
    ref_deq = gguf.quants.dequantize(ref, gtype)
    np.testing.assert_array_equal(dequantize(qt).numpy().view(np.uint32), ref_deq.view(np.uint32))  # exact bits


@pytest.mark.parametrize(
    "scheme, qtype, repack",
    [("int4_sym_g32", "Q4_0", to_gguf_q4_0_blocks), ("int8_g32", "Q8_0", to_gguf_q8_0_blocks)],
)
def test_gguf_bit_exact_on_a_coarse_grid(scheme: str, qtype: str, repack) -> None:
    """Quarter-steps in [-2, 2] (as on bf16 grids, but denser): most blocks hold both +max and -max, and many x / d
    land on ties; still the same bytes as gguf-py."""
    g = torch.Generator().manual_seed(7)
    w = torch.randint(-8, 9, (64, 256), generator=g).float() * 0.25  # no all-zero block: 32 draws of 17 values
    ours = repack(quantize(w, scheme))
    np.testing.assert_array_equal(ours, gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype]))


def test_int4_sym_first_of_plus_and_minus_max_wins() -> None:
    # ggml keeps the first element of strictly largest |x|: -8 before +8 gives d = 1, +8 before -8 gives d = -1
    for a, d in ((-8.0, 1.0), (8.0, -1.0)):
        row = torch.zeros(1, 32)
        row[0, 3], row[0, 20] = a, -a
        assert quantize(row, "int4_sym_g32").scales.tolist() == [[d]]


def test_q4_0_zero_block_scale_follows_ggml_c() -> None:
    # ggml's C loop starts from max = 0.0f, so any all-zero block gets d = 0.0f / -8 = -0.0 (0x8000).
    # gguf-py takes the sign of the block's first zero instead: a block of -0.0 gives +0.0 there.
    qt = quantize(-torch.zeros(1, 32), "int4_sym_g32")
    assert bits(qt.scales).tolist() == [[0x00, 0x80]]
    assert codes(qt) == [8] * 32


def test_q4_1_zero_min_takes_first_zero_like_ggml_c() -> None:
    # ggml's strict `v < min` keeps the first of equal minima, so the sign of a zero m is the first zero's
    for first, m_high_byte in ((-0.0, 0x80), (0.0, 0x00)):
        row = torch.ones(1, 32)
        row[0, 0], row[0, 1] = first, -first
        qt = quantize(row, "int4_asym_g32")
        assert bits(qt.zero_points).tolist() == [[0x00, m_high_byte]]
        assert codes(qt)[:3] == [0, 0, 15]


# ---------------------------------------------------------------- error bounds


@pytest.mark.parametrize("group", GROUPS)
def test_int4_sym_error_at_most_half_step(group: int) -> None:
    for n, k in shapes_for(group):
        w = weights(n, k, seed=k)
        qt = quantize(w, f"int4_sym_g{group}")
        d = qt.scales.to(torch.float32).abs().repeat_interleave(group, dim=1)  # [N, K]
        err = (dequantize(qt) - w).abs()
        # half a step; + 8 codes x fp16 rounding of d (2^-11 relative) = 2^-8 step, doubled for float32 math
        tol = d * (0.5 + 2**-7) + 1e-7
        clipped = unpack_int4(qt.data) == 15  # Q4_0's range is [-8d, 7d]: values near -8d's opposite clip
        assert bool((err[~clipped] <= tol[~clipped]).all()), float((err - tol)[~clipped].max())
        assert bool((err[clipped] <= (d * (1 + 2**-7) + 1e-7)[clipped]).all())  # at most one full step


@pytest.mark.parametrize("group", GROUPS)
def test_int4_asym_error_at_most_half_step(group: int) -> None:
    for n, k in shapes_for(group):
        w = weights(n, k, seed=k + 1)
        qt = quantize(w, f"int4_asym_g{group}")
        d = qt.scales.to(torch.float32).repeat_interleave(group, dim=1)
        m = qt.zero_points.to(torch.float32).abs().repeat_interleave(group, dim=1)
        err = (dequantize(qt) - w).abs()
        # half a step; + 15 codes x fp16 rounding of d (< 2^-7 step) + fp16 rounding of m (2^-11 |m|), float32 slack
        tol = d * (0.5 + 2**-7) + m * 2**-10 + 1e-7
        assert bool((err <= tol).all()), float((err - tol).max())


@pytest.mark.parametrize("n, k", SHAPES_32)
def test_int8_error_at_most_half_step(n: int, k: int) -> None:
    w = weights(n, k, seed=3)
    channel = quantize(w, "int8_channel")
    # per-row scale in float32: half a step plus float32 rounding of w / scale
    assert bool(((dequantize(channel) - w).abs() <= channel.scales * (0.5 + 1e-5)).all())
    q8 = quantize(w, "int8_g32")
    d = q8.scales.to(torch.float32).repeat_interleave(32, dim=1)
    # half a step + 127 codes x fp16 rounding of d (2^-11 relative) < 0.07 step
    assert bool(((dequantize(q8) - w).abs() <= d * (0.5 + 0.07) + 1e-7).all())


def assert_e4m3_close(w: torch.Tensor, deq: torch.Tensor, scale: torch.Tensor) -> None:
    """e4m3 has 3 mantissa bits: rounding error <= 2^-4 relative for normals, <= 2^-10 * scale in the
    subnormal range (step 2^-9); 1e-6 relative covers the float32 division and multiplication."""
    tol = w.abs() * (2**-4 + 1e-6) + scale * 2**-10
    assert bool(((deq - w).abs() <= tol).all()), float(((deq - w).abs() - tol).max())


@pytest.mark.parametrize("n, k", [(200, 300), (128, 128), (1, 5), (129, 257)])  # ragged, aligned, tiny, spilling
def test_fp8_block128_within_e4m3_precision(n: int, k: int) -> None:
    w = weights(n, k, seed=n + k)
    qt = quantize(w, "fp8_block128")
    assert qt.scales.shape == (-(-n // 128), -(-k // 128)) and qt.scales.dtype == torch.float32
    assert qt.data.dtype == torch.float8_e4m3fn
    scale = qt.scales.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    assert_e4m3_close(w, dequantize(qt), scale)
    # each tile's own amax maps to 448: the ragged tiles are not diluted by padding
    assert float(qt.data.to(torch.float32).abs().amax()) == E4M3_MAX


@pytest.mark.parametrize("n, k", SHAPES_32)
def test_fp8_channel_within_e4m3_precision(n: int, k: int) -> None:
    w = weights(n, k, seed=7)
    qt = quantize(w, "fp8_channel")
    assert_e4m3_close(w, dequantize(qt), qt.scales)


# ---------------------------------------------------------------- fp8 saturation


def test_cast_e4m3_saturates() -> None:
    x = torch.tensor([1e6, -1e6, 464.0, 449.0, 3.0e38, 448.0, 0.0, -0.0])
    y = cast_e4m3_saturating(x)
    assert y.dtype == torch.float8_e4m3fn
    assert y.to(torch.float32).tolist() == [448.0, -448.0, 448.0, 448.0, 448.0, 448.0, 0.0, 0.0]
    assert not bool(torch.isnan(y.to(torch.float32)).any())


def test_fp8_no_nan_from_finite_extremes() -> None:
    w = torch.tensor([[1e30, -1e30, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [3.0e38, -3.0e38, 1e-30, 0.0]])
    for scheme in ("fp8_channel", "fp8_block128"):
        deq = dequantize(quantize(w, scheme))
        assert bool(torch.isfinite(deq).all()), scheme
        assert deq[2, 0].item() == pytest.approx(3.0e38, rel=2**-4) and deq[1].tolist() == [0.0] * 4
    # per row, 1e30 keeps its own scale (in one 128x128 tile it underflows next to 3e38, as it should)
    assert dequantize(quantize(w, "fp8_channel"))[0, 0].item() == pytest.approx(1e30, rel=2**-4)


# ---------------------------------------------------------------- serialisation


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_to_from_tensors_bit_exact(scheme: str) -> None:
    k = 384 if SCHEMES[scheme].k_multiple <= 128 else 768  # K = 3 x 128 (3 x 256 for the K-quants)
    qt = quantize(weights(7, k, seed=11).to(torch.bfloat16), scheme)  # bf16 input
    tensors = load(save(qt.to_tensors("blk.0.w")))  # through real safetensors bytes
    meta = json.loads(json.dumps(qt.meta()))  # the header is JSON
    back = QuantizedTensor.from_tensors("blk.0.w", tensors, meta)
    assert (back.scheme, back.shape, back.block_size, back.nibble_order) == (
        qt.scheme, qt.shape, qt.block_size, qt.nibble_order
    )
    for a, b in [(qt.data, back.data), (qt.scales, back.scales), (qt.zero_points, back.zero_points)]:
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(bits(a), bits(b))
    assert torch.equal(bits(back.dequantize()), bits(qt.dequantize()))
    assert back.nbytes == qt.nbytes


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_bits_per_weight_matches_registry(scheme: str) -> None:
    qt = quantize(weights(3, 256), scheme)
    nominal = SCHEMES[scheme].bits_per_weight
    per_row = scheme in ("int8_channel", "fp8_channel")
    # per-row schemes add one float32 scale per row (32/K bits); fp8_block128 a partially filled tile's scale
    expected = nominal + 32 / 256 if per_row else nominal
    if scheme == "fp8_block128":
        expected = 8 + 2 * 32 / (3 * 256)
    assert qt.bits_per_weight == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_dtype_in_is_computed_in_float32(dtype: torch.dtype) -> None:
    w = weights(3, 64).to(dtype)
    for scheme in ("int4_sym_g32", "int8_g32", "fp8_channel"):
        assert torch.equal(bits(quantize(w, scheme).data), bits(quantize(w.to(torch.float32), scheme).data))


# ---------------------------------------------------------------- errors


def test_unknown_scheme_lists_supported() -> None:
    with pytest.raises(ValueError, match=r"scheme: unknown 'int3'.*int4_sym_g32.*fp8_block128"):
        quantize(torch.zeros(1, 32), "int3")


@pytest.mark.parametrize("scheme, k", [("int4_sym_g128", 200), ("int4_asym_g64", 96), ("int8_g32", 48)])
def test_ragged_group_refused(scheme: str, k: int) -> None:
    group = int(scheme.rsplit("g", 1)[1])
    with pytest.raises(ValueError, match=rf"K={k} is not a multiple of group_size={group}"):
        quantize(torch.zeros(2, k), scheme)


@pytest.mark.parametrize(
    "w, match",
    [
        (torch.zeros(32), r"weight: expected 2-D"),
        (torch.zeros(1, 32, dtype=torch.int32), r"weight: expected a float dtype"),
        (torch.full((1, 32), float("nan")), r"weight: expected finite"),
    ],
)
def test_bad_weight_refused(w: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize(w, "int4_sym_g32")


def test_f16_overflow_refused() -> None:
    with pytest.raises(ValueError, match=r"f16: weight max \|w\| = 100000.0 overflows"):
        quantize(torch.tensor([[1e5, 0.0]]), "f16")


def test_gguf_repack_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match=r"scheme expected 'int4_sym_g32', got 'int4_sym_g64'"):
        to_gguf_q4_0_blocks(quantize(torch.zeros(1, 64), "int4_sym_g64"))


def test_from_tensors_checks_data_shape() -> None:
    qt = quantize(torch.zeros(2, 64), "int4_sym_g32")
    meta = qt.meta() | {"shape": [2, 32]}
    with pytest.raises(ValueError, match=r"data shape expected \(2, 16\), got \(2, 32\)"):
        QuantizedTensor.from_tensors("w", qt.to_tensors("w"), meta)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_row_blocked_quantization_equals_one_pass(scheme, monkeypatch):
    """Large weights are quantized in 128-row blocks (bounded memory): bit-identical to one pass, ragged end too."""
    from nextq.quant import schemes

    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(0))
    whole = schemes.get_scheme(scheme).quantize(w)
    monkeypatch.setattr(schemes, "CHUNK_ELEMENTS", 128 * 256)  # force blocks of 128 rows: 128 + 128 + 44
    blocked = schemes.quantize(w, scheme)
    assert blocked.shape == whole.shape and blocked.meta() == whole.meta()
    for a, b in ((blocked.data, whole.data), (blocked.scales, whole.scales), (blocked.zero_points, whole.zero_points)):
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


@pytest.mark.parametrize("scheme", sorted(AFFINE_VIEWS))
def test_affine_block_view_dequantizes_bit_exactly(scheme: str) -> None:
    """The integer block form the ONNX exporter emits ((q - zero) * scale + offset, quant/affine.py) gives the
    scheme's own float32 dequantization bit for bit, on awkward values (zero blocks, an outlier, tiny blocks)."""
    w = torch.randn(6, 512, generator=torch.Generator().manual_seed(5)) * 0.05
    w[0, :40], w[1, 3], w[2, 256:300] = 0.0, 2.0, -0.01
    qt = quantize(w, scheme)
    view = affine_blocks(qt)
    assert view.codes.dtype == torch.uint8 and int(view.codes.max()) < 1 << view.bits
    assert torch.equal(view.dequantize(), qt.dequantize())  # exact: same codes, same float32 factors, same ops
    assert torch.equal(view.reblock(16).dequantize(), qt.dequantize())  # finer blocks: scales repeated, exact
