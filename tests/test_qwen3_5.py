"""Qwen3.5 (MoE and dense) by the family reader alone, judged by transformers' Qwen3.5 classes, llama.cpp's own
converter and runtime, and ONNX Runtime.

Fixtures: tiny random `Qwen3_5MoeForConditionalGeneration` (with a small vision tower) and
`Qwen3_5ForConditionalGeneration` checkpoints saved by transformers (experts one by one, as save_pretrained writes
them), plus an MTP head (`mtp.*`, a copy of the last full-attention layer) and the Hub's fused-expert layout made
from the same weights. Hv = 2 Hk, so llama.cpp's value-head reordering is exercised; mrope_section [2, 1, 1] over
4 rotary pairs, so M-RoPE's three axes all take part. The reference for logits is the vision-language class, which
runs transformers' M-RoPE code path: equality with nextq's 1-D partial RoPE is the M-RoPE-on-text check.
The pipeline's gate is judged on trained checkpoints instead (tests/assets/qwen3_5_moe_tiny, qwen3_5_tiny).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import redraw_weights, write_fixture_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import llama_cpp_converter  # noqa: E402  (scripts/llama_cpp_converter.py: llama.cpp's own converter, pinned)

TEXT = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [2, 1, 1], "mrope_interleaved": True},
)
# expert widths are multiples of 32 so that the pipeline's int4 g32 recipe applies to every expert
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
DENSE = dict(intermediate_size=64)
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=4,
              num_position_embeddings=16)
IDS = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(0))  # batch > 1, odd T


def _classes(kind: str):
    import transformers as tf

    return ((tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeForConditionalGeneration) if kind == "moe"
            else (tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration))


def fuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hub's layout: per-expert weights -> `mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]."""
    out, groups = {}, {}
    for k, v in sd.items():
        head, sep, tail = k.partition(".mlp.experts.")
        if not sep:
            out[k] = v
            continue
        e, proj, _ = tail.split(".")
        groups.setdefault(head, {}).setdefault(proj, {})[int(e)] = v
    for head, g in groups.items():
        n = len(g["gate_proj"])
        out[f"{head}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([g["gate_proj"][e], g["up_proj"][e]]) for e in range(n)])
        out[f"{head}.mlp.experts.down_proj"] = torch.stack([g["down_proj"][e] for e in range(n)])
    return out


def build(out: Path, kind: str, *, fused: bool = False, seed: int = 0, **text) -> Path:
    """A tiny random Qwen3.5 checkpoint (see the module docstring) with the fixture tokenizer; `text` overrides
    text_config fields."""
    from safetensors.torch import load_file, save_file

    config_cls, model_cls = _classes(kind)
    torch.manual_seed(seed)
    cfg = config_cls(text_config={**TEXT, **(MOE if kind == "moe" else DENSE), **text}, vision_config=VISION)
    model = model_cls(cfg)
    redraw_weights(model)
    model.save_pretrained(out)
    sd = load_file(out / "model.safetensors")
    h, lm = TEXT["hidden_size"], "model.language_model.layers"
    g = torch.Generator().manual_seed(seed + 1)
    sd.update({f"mtp.{k}": torch.randn(*shape, generator=g) * 0.1 for k, shape in (
        ("fc.weight", (h, 2 * h)), ("pre_fc_norm_embedding.weight", (h,)), ("pre_fc_norm_hidden.weight", (h,)),
        ("norm.weight", (h,)))})
    src = max(i for i, t in enumerate(cfg.text_config.layer_types) if t == "full_attention")
    sd.update({"mtp.layers.0." + k[len(f"{lm}.{src}."):]: v.clone() for k, v in list(sd.items())
               if k.startswith(f"{lm}.{src}.")})
    save_file(fuse_experts(sd) if fused else sd, out / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((out / "config.json").read_text())
    conf["text_config"]["mtp_num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    write_fixture_tokenizer(out, TEXT["vocab_size"])
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (HF checkpoint, IR) for moe (per-expert layout) and dense, built once."""
    from nextq.convert.cli import convert

    root = tmp_path_factory.mktemp("qwen3_5")
    out = {}
    for kind in ("moe", "dense"):
        ck = build(root / f"hf-{kind}", kind)
        convert(str(ck), root / f"ir-{kind}")
        out[kind] = (ck, root / f"ir-{kind}")
    return out


def reference(ck: Path, kind: str) -> tuple[np.ndarray, torch.nn.Module]:
    """transformers' whole-sequence fp32 logits from the vision-language class (M-RoPE path) and the model."""
    _, model_cls = _classes(kind)
    model = model_cls.from_pretrained(ck, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits.numpy(), model


def stepwise(model, row: np.ndarray) -> np.ndarray:
    """Token-by-token logits [T, V] through prefill + decode."""
    out = [model.prefill(row[None, :1])]
    out += [model.decode(row[None, t:t + 1]) for t in range(1, len(row))]
    return np.concatenate(out)


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_matches_transformers(models, kind):
    import nextq
    from nextq.graph import Graph

    ck, ir = models[kind]
    g = Graph.load(ir)
    assert g.config.family == ("qwen3_5_moe" if kind == "moe" else "qwen3_5")
    assert g.config.mrope_section == (2, 1, 1) and g.config.mtp_num_hidden_layers == 1  # MTP kept
    assert g.config.norm_topk_prob and (g.config.num_experts > 0) == (kind == "moe")
    why = next(iter(g.provenance["dropped"]))
    assert why.startswith("vision tower (model.visual.*)") and g.provenance["dropped"][why] > 0
    ref, _ = reference(ck, kind)
    scale = np.abs(ref).max()
    m = nextq.load(ir)
    # whole sequence: float32 summation order only
    assert np.abs(m.logits(IDS.numpy()) - ref).max() / scale <= 1e-5
    # prefill + decode (recurrent delta rule, caches) vs the whole-sequence reference
    assert np.abs(stepwise(m, IDS[0].numpy()) - ref[0]).max() / scale <= 1e-4


def test_yarn_with_mrope_matches_transformers(tmp_path):
    """YaRN (read by the shared rope reader) on top of M-RoPE: transformers scales the recomposed frequencies the
    same way, so positions past the original context agree too."""
    import nextq
    from nextq.convert.cli import convert

    rope = {**TEXT["rope_parameters"], "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    ck = build(tmp_path / "hf", "dense", rope_parameters=rope)
    g = convert(str(ck), tmp_path / "ir")
    assert g.config.rope_scaling is not None and g.config.mrope_section == (2, 1, 1)
    ref, _ = reference(ck, "dense")
    # IDS has 23 positions, past the original 8: float32 summation order only
    assert np.abs(nextq.load(tmp_path / "ir").logits(IDS.numpy()) - ref).max() / np.abs(ref).max() <= 1e-5


def _tensors(ir: Path) -> dict[str, torch.Tensor]:
    from nextq.graph import Graph

    g = Graph.load(ir)
    return {k: g.get(k) for k in g.tensors}


def test_expert_layouts_give_identical_irs(models, tmp_path):
    from nextq.convert.cli import convert

    ck, ir = models["moe"]
    fused = build(tmp_path / "fused", "moe", fused=True)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in json.loads(
        (fused / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
            (fused / "model.safetensors").read_bytes()[:8], "little")]))
    convert(str(fused), tmp_path / "ir")
    a, b = _tensors(ir), _tensors(tmp_path / "ir")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    doc = [json.loads((p / "graph.json").read_text()) for p in (ir, tmp_path / "ir")]
    assert doc[0]["config"] == doc[1]["config"] and doc[0]["blocks"] == doc[1]["blocks"]


def test_text_only_class_reads_too(models, tmp_path):
    """Qwen3_5MoeForCausalLM's own save_pretrained (text config at the top level) gives the same IR."""
    from transformers import Qwen3_5MoeForCausalLM

    from nextq.convert.cli import convert

    ck, ir = models["moe"]
    text = Qwen3_5MoeForCausalLM.from_pretrained(ck, dtype=torch.float32)
    text.save_pretrained(tmp_path / "text")
    write_fixture_tokenizer(tmp_path / "text", TEXT["vocab_size"])
    g = convert(str(tmp_path / "text"), tmp_path / "ir")
    a, b = _tensors(ir), _tensors(tmp_path / "ir")
    assert g.config.family == "qwen3_5_moe" and g.provenance["architecture"] == "Qwen3_5MoeForCausalLM"
    assert set(b) == {k for k in a if not k.startswith("mtp.")}  # transformers drops mtp.* on load
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("attn_output_gate", False)])
def test_unimplemented_config_field_is_one_clear_error(models, tmp_path, field, value):
    import shutil

    from click.testing import CliRunner

    from nextq.cli import main

    ck, _ = models["dense"]
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    conf = json.loads((bad / "config.json").read_text())
    conf["text_config"][field] = value
    (bad / "config.json").write_text(json.dumps(conf))
    res = CliRunner().invoke(main, ["convert", str(bad), "-o", str(tmp_path / "out")])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1, res.output
    assert lines[0] == f"error: config (text_config): {field}={value!r} is not implemented by nextq"
    assert not (tmp_path / "out").exists()


# ---- GGUF: llama.cpp's converter and runtime ------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_converter(tmp_path_factory):
    """convert_hf_to_gguf.py from the llama-cpp-python sdist (pip download into pytest's cache dir)."""
    try:
        return llama_cpp_converter.source_root(Path(tmp_path_factory.getbasetemp()).parent / "nextq-llama-sdist")
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory):
    pytest.importorskip("gguf")
    from nextq.convert.gguf_export import export_gguf
    from nextq.graph import Graph

    root = tmp_path_factory.mktemp("qwen3_5-gguf")
    out = {}
    for kind, (_, ir) in models.items():
        export_gguf(Graph.load(ir), root / f"{kind}.gguf")
        out[kind] = root / f"{kind}.gguf"
    return out


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_same_file_as_llama_cpp_converter(models, ggufs, llama_converter, tmp_path, kind):
    import gguf

    from nextq.convert.gguf_import import read_gguf

    ck, _ = models[kind]
    ref = tmp_path / "ref.gguf"
    r = subprocess.run(llama_cpp_converter.converter_command(llama_converter, ck, "--outtype", "f32", "--outfile",
                                                             ref), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = gguf.GGUFReader(ggufs[kind]), gguf.GGUFReader(ref)
    fa, fb = ({k: f.contents() for k, f in x.fields.items() if not k.startswith("GGUF.")} for x in (a, b))
    arch = "qwen35moe" if kind == "moe" else "qwen35"
    assert fa["general.architecture"] == arch and fa[f"{arch}.rope.dimension_sections"] == [2, 1, 1, 0]
    diff = {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}
    assert diff <= {"general.name", "general.size_label"}, {k: (fa.get(k), fb.get(k)) for k in diff}
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb) and "blk.4.nextn.eh_proj.weight" in ta
    for name, t in ta.items():
        u = tb[name]
        assert t.tensor_type == u.tensor_type and list(t.shape) == list(u.shape), name
        # bit for bit but ssm_a = -exp(A_log), within float32 rounding of exp (<= 1e-6)
        assert np.abs(np.asarray(t.data, np.float32) - np.asarray(u.data, np.float32)).max() <= (
            1e-6 if name.endswith("ssm_a") else 0.0), name
    # the reordering is undone on import: llama.cpp's file reads back into the same IR tensors
    g, ours = read_gguf(ref), _tensors(models[kind][1])
    assert g.config.family == ("qwen3_5_moe" if kind == "moe" else "qwen3_5")
    for k, v in g.tensors.items():
        # 6e-8: norms come back as fl(1 + w) - 1; A_log as log(-fl(-exp(A_log))) (gguf_import's docstring)
        assert torch.allclose(v, ours[k].float(), rtol=1e-6, atol=1e-7), k


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_llama_cpp_matches_transformers_f32(models, ggufs, kind):
    pytest.importorskip("llama_cpp")
    import nextq

    ref, _ = reference(models[kind][0], kind)
    scale = np.abs(ref).max()
    m = nextq.load(ggufs[kind])
    assert m.name == "llama.cpp"
    # F32 weights + f32 KV cache: float32 summation order only
    assert np.abs(m.logits(IDS.numpy()) - ref).max() / scale <= 1e-5


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_onnx_runtime_matches_transformers(models, tmp_path, kind):
    pytest.importorskip("onnxruntime")
    import nextq
    from nextq.convert.onnx_export import export_onnx
    from nextq.graph import Graph

    ck, ir = models[kind]
    export_onnx(Graph.load(ir), tmp_path / "onnx")
    ref, _ = reference(ck, kind)
    m = nextq.load(tmp_path / "onnx")
    assert np.abs(m.logits(IDS.numpy()) - ref).max() / np.abs(ref).max() <= 1e-4  # ORT contrib ops, fp32


def test_qwen35_pretokenizer_is_named_for_llama_cpp(tmp_path):
    """A tokenizer with Qwen3.5's split regex is written as llama.cpp's `qwen35`, and llama.cpp then tokenizes
    like transformers (combining marks stay with their letters)."""
    pytest.importorskip("llama_cpp")
    import gguf
    from llama_cpp import Llama
    from transformers import PreTrainedTokenizerFast

    from nextq.convert.gguf_export import QWEN2_PRETOKENIZER, QWEN35_PRETOKENIZER, export_gguf
    from nextq.convert.qwen3_5 import QWEN3_5
    from nextq.graph import Graph

    write_fixture_tokenizer(tmp_path, TEXT["vocab_size"])
    tj = (tmp_path / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(tj.replace(json.dumps(QWEN2_PRETOKENIZER)[1:-1],
                                                        json.dumps(QWEN35_PRETOKENIZER)[1:-1]))
    assets = {f: tmp_path / f for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")}
    config = QWEN3_5.config({"text_config": {**TEXT, **DENSE}})
    export_gguf(Graph(config, {}, assets=assets), tmp_path / "v.gguf", vocab_only=True)
    assert gguf.GGUFReader(tmp_path / "v.gguf").fields["tokenizer.ggml.pre"].contents() == "qwen35"
    llm = Llama(str(tmp_path / "v.gguf"), vocab_only=True, verbose=False)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in ("cafe\u0301 nai\u0308ve", "hello world! 3 33", "e\u0301\u0301 x"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text)["input_ids"], text


# ---- pipeline and publish --------------------------------------------------------------------------------------

# trained by scripts/train_tiny.py --family qwen3_5_moe / qwen3_5 (their training.json): random weights have no
# redundancy to absorb int4 error (KLD ~0.06 on the random fixtures above), a trained model does
TRAINED = {"moe": Path(__file__).parent / "assets" / "qwen3_5_moe_tiny",
           "dense": Path(__file__).parent / "assets" / "qwen3_5_tiny"}


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_pipeline_passes_the_gate_on_a_trained_model(tmp_path, kind):
    """`nextq pipeline` end to end on the trained tiny Qwen3.5 (the Hub's vision-language layout) with the default
    recipe (int4 routed experts; the dense model has none, so it stays as stored) and the default gate: every
    artifact, judged by its own engine (torch, llama.cpp, ONNX Runtime) on the embedded held-out text, passes; the
    MTP head is kept in each of them."""
    import gguf
    from click.testing import CliRunner

    from nextq.cli import main
    from nextq.graph import Graph

    out = tmp_path / "run"
    # 8 windows of 128 tokens and 2048 calibration tokens keep it within ~20 s on 2 cores
    r = CliRunner().invoke(main, ["pipeline", str(TRAINED[kind]), "-o", str(out), "--window", "128",
                                  "--max-windows", "8", "--calib-tokens", "2048", "--max-new-tokens", "4"],
                           env={"NEXTQ_CACHE": str(tmp_path / "cache")})
    assert r.exit_code == 0, r.output + repr(r.exception)
    rows = {row["format"]: row for row in json.loads((out / "summary.json").read_text())["rows"]}
    assert list(rows) == ["original", "ir (int4)", "gguf", "onnx"]
    for name in ("ir (int4)", "gguf", "onnx"):
        # the default gate (validate.report.Thresholds): PPL +2 %, mean KLD 0.02 nats, top-1 0.90
        assert rows[name]["passed"], rows[name]
    # torch and ORT run the same int4 weights, llama.cpp its Q4_0 copy
    assert rows["onnx"]["kld_mean"] == pytest.approx(rows["ir (int4)"]["kld_mean"], rel=0.05, abs=1e-6)
    assert rows["gguf"]["kld_mean"] == pytest.approx(rows["ir (int4)"]["kld_mean"], rel=0.2, abs=1e-5)
    # MTP kept: the quantized IR, the GGUF's nextn layer, the ONNX export's mtp.onnx
    assert Graph.load(out / "quantized").config.mtp_num_hidden_layers == 1
    arch = "qwen35moe" if kind == "moe" else "qwen35"
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields[f"{arch}.nextn_predict_layers"].contents() == 1
    assert "blk.4.nextn.eh_proj.weight" in {t.name for t in reader.tensors}
    assert (out / "onnx" / "mtp.onnx").exists()


def test_card_tags_name_the_family(models):
    """The card's tags carry the IR's family (the Hub's model_type), not Qwen3-Next's."""
    import yaml

    from nextq.publish import make_plan

    for kind, family in (("moe", "qwen3_5_moe"), ("dense", "qwen3_5")):
        card = make_plan(models[kind][1], "someone/tiny", allow_unvalidated=True).card
        tags = yaml.safe_load(card.split("---")[1])["tags"]
        assert family in tags and "qwen3_next" not in tags, tags
