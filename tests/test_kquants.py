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

GGML_TYPES = {"q3_k": 11, "q4_k": 12, "q5_k": 13, "q6_k": 14, "q5_0": 6, "q5_1": 7}


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


@pytest.mark.parametrize("scheme", ["q3_k", "q4_k", "q5_k", "q6_k"])
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


@pytest.mark.parametrize("scheme", ["q3_k", "q4_k", "q5_k", "q6_k", "q5_0", "q5_1"])
def test_dequantize_equals_gguf_py(scheme):
    w = awkward("outliers", 7, 512)
    qt = quantize(w, scheme)
    want = gguf.quants.dequantize(qt.data.numpy(), gguf.GGMLQuantizationType[scheme.upper()])
    assert np.array_equal(dequantize(qt).numpy(), want.reshape(7, 512))  # bit for bit
    err = (dequantize(qt) - w).abs().max() / w.abs().max()
    assert err < {"q3_k": 0.2, "q4_k": 0.1, "q5_k": 0.05, "q6_k": 0.02, "q5_0": 0.05, "q5_1": 0.05}[scheme]


@pytest.mark.parametrize("scheme", ["q3_k", "q4_k", "q5_k", "q6_k"])
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


# ---------------------------------------------------------------- whole files: recipes q4_k_m / q5_k_m / q6_k


QUANTIZE_SCRIPT = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3])
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""
LLAMA_FTYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


@pytest.fixture(scope="module")
def wide_ir(tmp_path_factory):
    """A random 2-layer Qwen3-Next + MTP whose rows are 256 wide except attention's output (K = 128: llama.cpp
    falls back from K-quants there), as an IR and as nextq's F32 GGUF."""
    import sys

    from nextq.convert.cli import convert
    from nextq.convert.gguf_export import export_gguf
    from nextq.graph import Graph

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_checkpoint, write_fixture_tokenizer

    root = tmp_path_factory.mktemp("kq-wide")
    ck = build_checkpoint(root / "hf", "base", mtp=True, hidden_size=256, intermediate_size=256,
                          moe_intermediate_size=256, shared_expert_intermediate_size=256, head_dim=32,
                          linear_key_head_dim=64, linear_value_head_dim=64, num_hidden_layers=2,
                          layer_types=["linear_attention", "full_attention"])
    write_fixture_tokenizer(ck, 96)
    convert(str(ck), root / "ir", force=True)
    export_gguf(Graph.load(root / "ir"), root / "f32.gguf")
    return root


@pytest.mark.parametrize("mix", ["q4_k_m", "q6_k"])
def test_recipe_gguf_equals_llama_quantize(wide_ir, mix, tmp_path):
    """nextq's q4_k_m / q6_k (round to nearest) written as GGUF = llama_model_quantize of the same F32 model:
    every tensor's type (llama.cpp's own per-tensor rules, the 256 fallback included) and every byte."""
    import subprocess
    import sys

    from gguf import GGUFReader

    from nextq.convert.gguf_export import export_gguf
    from nextq.graph import Graph
    from nextq.quant.apply import quantize_graph
    from nextq.quant.recipes import RECIPES

    theirs = tmp_path / "llama.gguf"
    r = subprocess.run([sys.executable, "-c", QUANTIZE_SCRIPT, str(wide_ir / "f32.gguf"), str(theirs),
                        str(LLAMA_FTYPES[mix])], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    report = quantize_graph(Graph.load(wide_ir / "ir"), RECIPES[mix], tmp_path / "ir")
    # the fallback is stated, never silent: attention's output projection (K = 128) in the report and per tensor
    fell = {n: t["fallback"] for n, t in report["tensors"].items() if "fallback" in t}
    want = {"q4_k_m": "q4_k -> q5_0 (K=128 is not a multiple of 256)",
            "q6_k": "q6_k -> int8_g32 (K=128 is not a multiple of 256)"}[mix]
    assert report["fallbacks"] == {want: 2}, report["fallbacks"]
    assert sorted(fell) == ["layers.1.mixer.o.weight", "mtp.layers.0.mixer.o.weight"]
    assert sum(report["fallbacks"].values()) == sum(map(len, fell.values()))
    from nextq.convert.cli import convert_direct  # the direct path states the same fallbacks

    direct = convert_direct(str(wide_ir / "hf"), tmp_path / "direct.gguf", mix, "gguf", progress=False)
    assert direct["fallbacks"] == report["fallbacks"]
    ours = tmp_path / "nextq.gguf"
    export_gguf(Graph.load(tmp_path / "ir"), ours)
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)
    types = {n: (a[n].tensor_type.name, b[n].tensor_type.name) for n in a}
    assert {n: t for n, t in types.items() if t[0] != t[1]} == {}  # same type for every tensor
    assert "Q6_K" in {t for t, _ in types.values()} and (mix != "q4_k_m" or "Q5_0" in {t for t, _ in types.values()})
    # tensor data byte for byte (flattened: llama-quantize writes the shared-expert gate [256] where nextq writes
    # [256, 1], the same values)
    differ = [n for n in a if not np.array_equal(np.asarray(a[n].data).ravel(), np.asarray(b[n].data).ravel())]
    assert differ == []


# ---------------------------------------------------------------- --target-bpw


class FakeStats:
    """Calibration statistics stand-in: H = I (x 1000 for `hot` weights) for the weights in `seen`, none for the
    rest (they stay at their cheapest scheme, unmeasured: keeps the test short)."""

    tokens = 64

    def __init__(self, k: dict[str, int], seen: set[str], hot: set[str]):
        self.k, self.seen, self.hot = k, seen, hot

    def hessian(self, name: str):
        if name not in self.seen:
            return None
        return 64, torch.eye(self.k[name], dtype=torch.float64) * (1000.0 if name in self.hot else 1.0)


def test_target_bpw_meets_the_budget_and_spends_it_where_it_matters(wide_ir):
    from nextq.errors import RecipeError
    from nextq.graph import Graph
    from nextq.quant import allocate
    from nextq.quant.recipes import plan_schemes

    graph = Graph.load(wide_ir / "ir")
    hot = {"layers.1.ffn.experts.0.down.weight"}
    seen = {f"layers.1.ffn.experts.{e}.down.weight" for e in range(2)} | {"layers.0.mixer.z.weight"}
    stats = FakeStats({n: t.shape[-1] for n, t in graph.tensors.items() if len(t.shape) == 2}, seen, hot)
    with pytest.raises(RecipeError, match="below the smallest reachable"):  # raised before anything is measured
        allocate.target_recipe(graph, 2.0, stats)
    recipe, units, summary = allocate.target_recipe(graph, 4.0, stats)
    assert summary["min_bpw"] <= summary["bpw"] <= summary["target_bpw"]
    plan = plan_schemes(recipe, graph.config)
    hot_unit = next(u for u in units if hot & set(u.sources))
    assert hot_unit.choice > 0 and plan[next(iter(hot))].scheme == hot_unit.candidates[hot_unit.choice]
    assert plan["layers.1.mixer.o.weight"].scheme == "int4_sym_g32"  # K = 128: the 32-block ladder
    assert "| GGUF tensor |" in allocate.plan_markdown(units, summary)


@pytest.mark.parametrize("chunk", [1 << 24, 3 * 256 * 7])  # every matrix in one call; chunks of 1-2 matrices
def test_target_bpw_measures_a_stack_as_each_matrix_alone(monkeypatch, chunk):
    """allocate.output_errors quantizes a unit's matrices (a layer's experts) as one stack of rows: the errors
    equal those of each matrix quantized on its own with its own H, exactly (every scheme is row by row)."""
    from nextq.quant import allocate

    monkeypatch.setattr(allocate, "MEASURE_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(n, 256, generator=g) * (1 + 10 * (torch.rand(n, 256, generator=g) > 0.99))  # outliers
          for n in (5, 7, 1, 12)]  # ragged row counts
    ws[2].zero_()  # an all-zero matrix
    hs = []
    for w in ws:
        x = torch.randn(40, 256, generator=g, dtype=torch.float64)
        hs.append(x.T @ x)
    for scheme in {c for _, ladder in allocate.LADDERS for c in ladder}:
        got = allocate.output_errors(ws, scheme, hs)
        want = []
        for w, h in zip(ws, hs):
            e = (dequantize(quantize(w, scheme)) - w).double()
            want.append(float(((e @ h) * e).sum()))
        assert got == want, scheme  # bit-identical, not merely close


def test_target_bpw_kld_proxy_puts_every_tensor_on_the_logits_scale(wide_ir):
    """With real statistics (their windows), each unit's errors are rescaled to the KLD of the logits with only
    that unit quantized at its cheapest scheme; the MTP head's (it does not reach the logits) to the smallest
    rescaling; the budget still holds."""
    import numpy as np

    from nextq.graph import Graph
    from nextq.quant import allocate, calibrate, dequantize, quantize
    from nextq.runtime.model import TorchModel
    from nextq.validate.metrics import kl_divergence

    graph = Graph.load(wide_ir / "ir")
    windows = torch.randint(0, graph.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    stats = calibrate.collect_stats(graph, windows)
    recipe, units, summary = allocate.target_recipe(graph, 5.0, stats)
    assert summary["proxy"] == "kld" and summary["min_bpw"] <= summary["bpw"] <= 5.0
    unit = next(u for u in units if u.measured and u.gguf == "blk.1.ffn_down_exps.weight")
    g = Graph.load(wide_ir / "ir")
    ref = TorchModel(g).forward(windows).numpy()
    for s in unit.sources:
        g.tensors[s] = dequantize(quantize(g.get(s), unit.candidates[0]))
    kld = kl_divergence(ref, TorchModel(g).forward(windows).numpy()).mean()
    np.testing.assert_allclose(unit.errors[0], kld, rtol=1e-6)  # the definition, recomputed by hand (same math)
    assert any(u.measured and u.sources[0].startswith("mtp.") and u.errors[0] > 0 for u in units)
