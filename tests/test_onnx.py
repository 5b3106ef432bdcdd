"""ONNX export run by ONNX Runtime, judged against transformers (fp32) and nextq's torch runtime (quantized IRs).

Tolerances (stated again at each assertion):
- fp32 export vs transformers: max |Δ| / max |logit| <= 1e-4 (same fp32 math, different kernels and order;
  observed 2e-7..7e-6).
- quantized exports vs the torch runtime on the same quantized IR: <= 1e-3 (both dequantize the same codes
  exactly; the remaining difference is fp32 accumulation order, observed ~1e-6).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import nextq
from conftest import CONFIGS, hf_logits
from nextq.convert.cli import convert
from nextq.convert.onnx_export import DATA_FILE, MODEL_FILE, MTP_FILE, export_onnx
from nextq.errors import OutputExistsError, UnsupportedModelError
from nextq.graph import Graph
from nextq.quant import quantize
from nextq.quant.apply import quantize_graph
from nextq.quant.recipes import RECIPES as RECIPES_BUILTIN
from nextq.quant.recipes import Override, Recipe

TOL = 1e-4
QTOL = 1e-3


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def ids_for(batch: int, t: int, seed: int, vocab: int = 96) -> np.ndarray:
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed)).numpy()


def export(src: Path, root: Path) -> tuple[Path, Path]:
    ir = root / "ir"
    convert(str(src), ir)
    return ir, export_onnx(ir, root / "onnx")


@pytest.fixture(scope="module")
def exports(ckpt_factory, tmp_path_factory):
    """name -> (HF checkpoint, IR dir, ONNX dir) for every tiny config."""
    out = {}
    for name in CONFIGS:
        src = ckpt_factory(name)
        out[name] = (src, *export(src, tmp_path_factory.mktemp(f"onnx-{name}")))
    return out


# ---- fp32 parity and decode state ---------------------------------------------------------------------------


# T: decode-sized, odd, past the delta rule's 64-token chunk
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch,T", [(1, 1), (2, 7), (1, 70)])
def test_logits_match_transformers(exports, name, batch, T):
    src, _, onnx_dir = exports[name]
    ids = ids_for(batch, T, T)
    ref = hf_logits(src, torch.from_numpy(ids)).numpy()
    model = nextq.load(onnx_dir)
    assert model.name == "ort"
    got = model.logits(ids)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert rel_err(got, ref) <= TOL  # fp32 both sides; kernels differ only in summation order


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_through_state_matches_whole_sequence(exports, name):
    src, _, onnx_dir = exports[name]
    ids = ids_for(2, 12, 1)
    ref = hf_logits(src, torch.from_numpy(ids)).numpy()
    model = nextq.load(onnx_dir)
    whole = model.logits(ids)
    steps = [model.prefill(ids[:, :7])]
    steps += [model.decode(ids[:, i:i + 1]) for i in range(7, 12)]  # 5 single-token steps through present -> past
    got = np.stack(steps, axis=1)
    assert rel_err(got, whole[:, 6:]) <= TOL  # same engine, chunked vs whole: fp32 order only
    assert rel_err(got, ref[:, 6:]) <= TOL  # and still transformers' whole-sequence logits
    state = model.decoder.state
    for key in (k for k in state if k.endswith(".key")):
        assert state[key].shape[2] == 12  # the KV cache grew by exactly the tokens fed


def test_state_layout_and_dynamic_axes(exports):
    _, ir, onnx_dir = exports["base"]
    c = Graph.load(ir).config
    m = onnx.load(onnx_dir / MODEL_FILE, load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*m.graph.input, *m.graph.output]}
    assert dims["input_ids"] == ["batch", "sequence"] and dims["position_ids"] == ["batch", "sequence"]
    assert dims["logits"] == ["batch", "sequence", c.vocab_size]
    conv_ch = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
    for i, t in enumerate(c.layer_types):
        if t == "full_attention":
            assert dims[f"past.{i}.key"] == ["batch", c.num_key_value_heads, "past_sequence", c.head_dim]
            assert dims[f"present.{i}.value"] == ["batch", c.num_key_value_heads, "total_sequence", c.head_dim]
        else:
            assert dims[f"past.{i}.conv"] == ["batch", c.linear_conv_kernel_dim - 1, conv_ch]
            assert dims[f"present.{i}.recurrent"] == ["batch", c.linear_num_value_heads, c.linear_key_head_dim,
                                                      c.linear_value_head_dim]


def test_checker_and_shape_inference_clean_with_one_external_data_file(exports):
    _, _, onnx_dir = exports["wide"]
    path = onnx_dir / MODEL_FILE
    onnx.checker.check_model(str(path), full_check=True)  # raises on any problem
    onnx.shape_inference.infer_shapes_path(str(path), str(onnx_dir / "inferred.onnx"), check_type=True,
                                           strict_mode=True)
    m = onnx.load(path, load_external_data=False)
    locations = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {DATA_FILE}
    big_inline = [t.name for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                  and len(t.raw_data) > 1024]
    assert not big_inline  # every weight lives in the data file (no 2 GB protobuf limit)


def test_cli_refuses_existing_output_without_force(exports, tmp_path):
    from nextq.cli import main

    _, ir, _ = exports["base"]
    out = tmp_path / "o"
    runner = CliRunner()
    assert runner.invoke(main, ["export", "onnx", str(ir), "-o", str(out)]).exit_code == 0
    r = runner.invoke(main, ["export", "onnx", str(ir), "-o", str(out)])
    assert r.exit_code != 0 and "output exists" in r.output
    assert runner.invoke(main, ["export", "onnx", str(ir), "-o", str(out), "--force"]).exit_code == 0
    with pytest.raises(OutputExistsError):
        export_onnx(ir, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temporary directory left behind


# ---- quantized exports --------------------------------------------------------------------------------------


def is_linear(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and "norm" not in name and "conv" not in name and name != "embed.weight"


RECIPES = {
    # int4 everywhere K allows g32: experts -> QMoE, linears -> MatMulNBits
    "int4": lambda n, t: quantize(t, "int4_sym_g32") if is_linear(n, t) and t.shape[1] % 32 == 0 else t,
    # fp8: experts and lm_head per channel, other linears in Qwen's 128x128 tiles (ragged here: K < 128)
    "fp8": lambda n, t: (quantize(t, "fp8_channel" if "experts" in n or n == "lm_head.weight" else "fp8_block128")
                         if is_linear(n, t) else t),
}
EXPECTED_OPS = {"int4": {"QMoE", "MatMulNBits"}, "fp8": {"MoE", "DequantizeLinear"}}


@pytest.fixture(scope="module")
def quant_exports(ckpt_factory, tmp_path_factory):
    """recipe -> (quantized IR, ONNX dir); expert widths of 32 so that every expert takes int4 g32."""
    src = ckpt_factory("base", moe_intermediate_size=32, shared_expert_intermediate_size=32)
    root = tmp_path_factory.mktemp("onnx-quant")
    convert(str(src), root / "ir")
    out = {}
    for recipe, cast in RECIPES.items():
        qir = Graph.load(root / "ir").save(root / f"ir-{recipe}", cast=cast)
        out[recipe] = (qir, export_onnx(qir, root / f"onnx-{recipe}"))
    return out


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_quantized_export_matches_torch_runtime(quant_exports, recipe):
    qir, onnx_dir = quant_exports[recipe]
    ids = ids_for(2, 9, 3)
    ref = nextq.load(qir).logits(ids)
    model = nextq.load(onnx_dir)
    got = model.logits(ids)
    assert rel_err(got, ref) <= QTOL  # same codes dequantized exactly on both sides; fp32 order only
    steps = [model.prefill(ids[:, :6])] + [model.decode(ids[:, i:i + 1]) for i in range(6, 9)]
    assert rel_err(np.stack(steps, 1), ref[:, 5:]) <= QTOL  # decode through state, quantized ops too


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_quantized_export_uses_the_kernels_and_keeps_activations_float(quant_exports, recipe):
    _, onnx_dir = quant_exports[recipe]
    m = onnx.load(onnx_dir / MODEL_FILE, load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node)
    assert EXPECTED_OPS[recipe] <= set(ops)
    for n in m.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type in ("MatMulNBits", "QMoE"):
            assert attrs["accuracy_level"] == 0  # 4 would quantize activations to int8 (notes: gotcha 2)
            assert "weights_prepacked" not in attrs  # 1 returns garbage on ORT 1.32 (notes: gotcha 1)
    if recipe == "fp8":
        fp8 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
        assert len(fp8) == ops["DequantizeLinear"]  # fp8 codes stay fp8 in the file, experts included
    from nextq.runtime.ort import PRECISION_CONFIG

    assert PRECISION_CONFIG["session.qdq_matmulnbits_accuracy_level"] == "0"  # no DQ+MatMul -> int8 fusion


def test_unsupported_scheme_is_refused_naming_the_tensor(quant_exports, tmp_path):
    qir, _ = quant_exports["int4"]
    g = Graph.load(qir)
    n = g.get("layers.0.mixer.out.weight").shape[0]
    g.tensors["layers.0.mixer.out.weight"] = quantize(torch.randn(n, 40), "int8_channel")  # no power-of-2 block of K
    with pytest.raises(UnsupportedModelError, match=r"layers\.0\.mixer\.out\.weight: scheme 'int8_channel' on K=40"):
        export_onnx(g, tmp_path / "x")
    g = Graph.load(qir)
    g.tensors["layers.1.ffn.experts.0.down.weight"] = g.get("layers.1.ffn.experts.0.down.weight").dequantize()
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.ffn\.experts: one scheme"):
        export_onnx(g, tmp_path / "x")
    assert not any(tmp_path.iterdir())  # nothing half-written


# ---- every built-in recipe, every integer block scheme -------------------------------------------------------


KQ_WIDE = dict(hidden_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2, linear_num_value_heads=4,
               linear_value_head_dim=64, moe_intermediate_size=256, shared_expert_intermediate_size=256)
DOWN = "*.experts.*.down.weight"
# each integer block scheme (quant/affine.py) as embedding, experts (fc1, and a different fc2 through DOWN) and linear
ROTATIONS = [
    Recipe("rot-a", embed="q4_k", experts="q3_k", attention="q6_k", deltanet="q5_k", shared_expert="int8_channel",
           mtp="q5_0", overrides=(Override(DOWN, "q4_k"),)),
    Recipe("rot-b", embed="q6_k", experts="q5_1", attention="int4_asym_g64", deltanet="q3_k", shared_expert="q4_k",
           mtp="int8_g32", overrides=(Override(DOWN, "int4_sym_g32"),)),
    Recipe("rot-c", embed="q5_1", experts="q6_k", attention="q5_0", deltanet="int4_asym_g32", shared_expert="q5_k",
           mtp="int4_asym_g128", overrides=(Override(DOWN, "q5_k"),)),
    Recipe("rot-d", embed="int4_asym_g128", experts="q5_0", attention="int4_sym_g64", deltanet="int8_g32",
           shared_expert="q6_k", mtp="q3_k", overrides=(Override(DOWN, "int8_g32"),)),
    Recipe("rot-e", embed="q3_k", experts="int4_asym_g64", attention="q4_k", deltanet="int4_sym_g128",
           shared_expert="q5_1", mtp="q6_k", overrides=(Override(DOWN, "int4_asym_g64"),)),
]


def check_ort_matches_torch(qir: Path, onnx_dir: Path, mtp: bool = False) -> None:
    """ORT logits (whole sequence and prefill + decode through the state) against nextq's torch runtime on the same
    quantized IR; MatMulNBits / QMoE keep fp32 activations."""
    ids = ids_for(2, 9, 3)
    torch_model, model = nextq.load(qir), nextq.load(onnx_dir)
    ref = torch_model.logits(ids)
    # same codes and float32 scale factors on both sides (DequantizeLinear paths bit-exact, quant/affine.py); the
    # rest is fp32 accumulation order and the offset term's separate sum (observed 6e-7..1e-6)
    assert rel_err(model.logits(ids), ref) <= QTOL
    steps = [model.prefill(ids[:, :6])] + [model.decode(ids[:, i:i + 1]) for i in range(6, 9)]
    assert rel_err(np.stack(steps, 1), ref[:, 5:]) <= QTOL
    if mtp:
        hidden = torch_model.model.hidden(torch.from_numpy(ids), torch_model.model.new_state())
        want = torch_model.model.mtp_logits(hidden[:, :-1], torch.from_numpy(ids[:, 1:])).numpy()
        assert rel_err(model.mtp_logits(hidden.numpy()[:, :-1], ids[:, 1:]), want) <= QTOL  # quantized embed, tied
    m = onnx.load(onnx_dir / MODEL_FILE, load_external_data=False)
    for n in m.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type in ("MatMulNBits", "QMoE"):
            assert attrs["accuracy_level"] == 0 and attrs.get("bits", 4) in (4, 8)


@pytest.fixture(scope="module")
def embedded_ir(tmp_path_factory) -> Path:
    from nextq.pipeline import embedded_model

    src = embedded_model()
    if not (src / "model.safetensors").is_file():
        pytest.skip(f"{src}/model.safetensors not built yet (scripts/ trains it)")
    ir = tmp_path_factory.mktemp("embedded") / "ir"
    convert(str(src), ir)
    return ir


@pytest.mark.parametrize("name", list(RECIPES_BUILTIN))
def test_every_builtin_recipe_of_the_embedded_model_runs_in_ort(embedded_ir, name, tmp_path):
    """Round-to-nearest with each built-in recipe (its 128-wide rows take llama.cpp's fallbacks: Q5_0 / Q5_1 / Q8_0
    beside Q4_K..Q6_K where K = 256), exported and run by ONNX Runtime."""
    quantize_graph(Graph.load(embedded_ir), RECIPES_BUILTIN[name], tmp_path / "q")
    check_ort_matches_torch(tmp_path / "q", export_onnx(tmp_path / "q", tmp_path / "onnx"))


@pytest.fixture(scope="module")
def kquant_ir(ckpt_factory, tmp_path_factory) -> Path:
    """A tiny model whose every matrix has rows of 256 (K-quants apply, no fallback), tied embeddings, an MTP head."""
    src = ckpt_factory("wide", mtp=True, **KQ_WIDE)
    ir = tmp_path_factory.mktemp("kquant") / "ir"
    convert(str(src), ir)
    return ir


@pytest.mark.parametrize("recipe", [RECIPES_BUILTIN[r] for r in ("q4_k_m", "q5_k_m", "q6_k")] + ROTATIONS,
                         ids=lambda r: r.name)
def test_integer_block_schemes_run_in_ort(kquant_ir, recipe, tmp_path):
    """Every integer block scheme as embedding (GatherBlockQuantized, and the tied lm_head as MatMulNBits), linear
    (MatMulNBits bits 4/8 + offset term) and experts (QMoE int4_sym or MoE on DequantizeLinear), fc1 and fc2 apart."""
    quantize_graph(Graph.load(kquant_ir), recipe, tmp_path / "q")
    onnx_dir = export_onnx(tmp_path / "q", tmp_path / "onnx")
    nodes = {n.name: n.op_type for n in onnx.load(onnx_dir / MODEL_FILE, load_external_data=False).graph.node}
    assert nodes["/embed/GatherBlockQuantized"] == "GatherBlockQuantized"
    assert nodes["/embed/MatMulNBits"] == "MatMulNBits"  # the tied lm_head on the embedding's codes
    check_ort_matches_torch(tmp_path / "q", onnx_dir, mtp=True)


# ---- MTP draft graph ----------------------------------------------------------------------------------------


def test_mtp_graph_matches_torch_runtime(ckpt_factory, tmp_path):
    src = ckpt_factory("base", mtp=True)
    ir, onnx_dir = export(src, tmp_path)
    assert (onnx_dir / MTP_FILE).is_file()
    m = onnx.load(onnx_dir / MTP_FILE, load_external_data=False)
    assert {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"} == {DATA_FILE}
    ids = ids_for(2, 10, 4)
    torch_model = nextq.load(ir).model
    hidden = torch_model.hidden(torch.from_numpy(ids), torch_model.new_state())
    ref = torch_model.mtp_logits(hidden[:, :-1], torch.from_numpy(ids[:, 1:])).numpy()
    model = nextq.load(onnx_dir)
    assert rel_err(model.hidden(ids), hidden.numpy()) <= TOL  # the decoder's `hidden` output feeds the draft
    got = model.mtp_logits(hidden.numpy()[:, :-1], ids[:, 1:])
    assert rel_err(got, ref) <= TOL  # fp32 both sides


# ---- the embedded trained model -----------------------------------------------------------------------------


def test_embedded_model_greedy_continuation_matches_torch(tmp_path):
    from nextq.pipeline import PROMPT, embedded_model

    src = embedded_model()
    if not (src / "model.safetensors").is_file():
        pytest.skip(f"{src}/model.safetensors not built yet (scripts/ trains it)")
    ir, onnx_dir = export(src, tmp_path)
    ort_model, torch_model = nextq.load(onnx_dir), nextq.load(ir)
    ids = np.array([torch_model.tokenizer(PROMPT)["input_ids"]], dtype=np.int64)
    want = torch_model.generate(ids, max_new_tokens=32)
    got = ort_model.generate(ids, max_new_tokens=32)
    assert got.tolist() == want.tolist()  # greedy: identical tokens, not just close logits
    assert ort_model.tokenizer is not None  # tokenizer files travel with the export (`nextq run DIR`)
