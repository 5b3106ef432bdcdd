"""YaRN long context through every target, judged by transformers (the reference), llama.cpp, ONNX Runtime and
llama.cpp's own converter (GGUF metadata).

Tiny config: original context 32, factor 4 (the model card's recipe shape: factor, original length, nothing else),
rotary dims 16 of head_dim 32; sequences of 150 tokens, so positions reach past 4x the original context. A second
config sets every optional key (betas, explicit attention factor, truncate false): exact in torch and ORT, and
named in the GGUF export's warning because llama.cpp's qwen3next drops them.

Tolerances (max |Δ| / max |logit|, fp32): torch <= 1e-5; ONNX Runtime <= 1e-4; llama.cpp (f32 KV) <= 1e-5;
prefill + token-by-token decode vs the whole sequence <= 1e-4 (the bound of tests/test_parity.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import nextq
from conftest import build_checkpoint, hf_logits, write_fixture_tokenizer
from nextq.cli import main
from nextq.convert.cli import convert
from nextq.errors import UnsupportedModelError
from nextq.graph import Graph, RopeScaling

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import llama_cpp_converter  # noqa: E402  (scripts/llama_cpp_converter.py: llama.cpp's own converter, pinned)

RECIPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
CUSTOM = {**RECIPE, "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.25, "truncate": False}
SHAPE = dict(head_dim=32, partial_rotary_factor=0.5)  # 16 rotary dims: 8 frequencies, both ramp ends visible
T = 150  # > 4 x 32
IDS = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(7))


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def with_rope(ckpt: Path, rope: dict) -> Path:
    """Put `rope` into the checkpoint's rope_parameters (transformers 5 spelling), keeping theta and partial."""
    conf = json.loads((ckpt / "config.json").read_text())
    conf["rope_parameters"] = {**conf["rope_parameters"], **rope}
    (ckpt / "config.json").write_text(json.dumps(conf, indent=2))
    return ckpt


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF checkpoint, IR) for plain, recipe and custom YaRN (same weights)."""
    out = {}
    for name, rope in (("plain", None), ("recipe", RECIPE), ("custom", CUSTOM)):
        root = tmp_path_factory.mktemp(f"yarn-{name}")
        ck = build_checkpoint(root / "hf", "base", **SHAPE)
        write_fixture_tokenizer(ck, 96)
        if rope:
            with_rope(ck, rope)
        convert(str(ck), root / "ir")
        out[name] = (ck, root / "ir")
    return out


@pytest.fixture(scope="module")
def reference(models):
    return {name: hf_logits(ck, IDS).numpy() for name, (ck, _) in models.items()}


def test_config_carries_yarn(models):
    c = Graph.load(models["custom"][1]).config
    assert c.rope_scaling == RopeScaling("yarn", 4.0, 32, beta_fast=16.0, beta_slow=2.0, attention_factor=1.25,
                                         truncate=False)
    assert Graph.load(models["plain"][1]).config.rope_scaling is None


@pytest.mark.parametrize("name", ["recipe", "custom"])
def test_torch_matches_transformers_past_original_context(models, reference, name):
    got = nextq.load(models[name][1]).logits(IDS.numpy())
    assert rel_err(got, reference[name]) <= 1e-5  # fp32, same math; observed ~1e-6
    assert rel_err(reference["plain"], reference[name]) > 1e-2  # YaRN visibly changes these logits


def test_decode_past_original_context_matches_whole_sequence(models, reference):
    model = nextq.load(models["recipe"][1])
    steps = [model.prefill(IDS[:, :100].numpy())]
    steps += [model.decode(IDS[:, i:i + 1].numpy()) for i in range(100, T)]
    assert rel_err(np.stack(steps, axis=1), reference["recipe"][:, 99:]) <= 1e-4  # test_parity's bound


@pytest.mark.parametrize("name", ["recipe", "custom"])
def test_onnx_runtime_matches_transformers(models, reference, tmp_path, name):
    pytest.importorskip("onnxruntime")
    from nextq.convert.onnx_export import export_onnx

    out = export_onnx(models[name][1], tmp_path / "onnx")
    model = nextq.load(out)
    assert rel_err(model.logits(IDS.numpy()), reference[name]) <= 1e-4  # ORT kernels, fp32
    steps = [model.prefill(IDS[:, :140].numpy())] + [model.decode(IDS[:, i:i + 1].numpy()) for i in range(140, T)]
    assert rel_err(np.stack(steps, axis=1), reference[name][:, 139:]) <= 1e-4


def test_llama_cpp_matches_transformers(models, reference, tmp_path):
    pytest.importorskip("llama_cpp")
    from nextq.convert.gguf_export import export_gguf

    gg = tmp_path / "recipe.gguf"
    export_gguf(Graph.load(models["recipe"][1]), gg)
    model = nextq.load(gg)
    got, ref = model.logits(IDS.numpy()), reference["recipe"]
    past = slice(4 * RECIPE["original_max_position_embeddings"], T)
    # f32 weights and KV cache: <= 1e-5 past 4x the original context (observed 2.2e-6). Over all positions
    # llama.cpp's summation order alone reaches 1.5e-5 on this model with plain RoPE too (position 73, observed
    # 1.48e-5 plain vs 1.35e-5 YaRN), so the whole sequence gets test_gguf's noise bound doubled.
    assert np.abs(got - ref)[:, past].max() / np.abs(ref).max() <= 1e-5
    assert rel_err(got, ref) <= 2e-5
    # token by token past the original context (llama.cpp's recurrent delta rule, its KV cache): the same bounds
    steps = [model.prefill(IDS[:1, :100].numpy())] + [model.decode(IDS[:1, i:i + 1].numpy()) for i in range(100, T)]
    step_err = np.abs(np.concatenate(steps) - ref[0, 99:]) / np.abs(ref).max()
    assert step_err[past.start - 99:].max() <= 1e-5 and step_err.max() <= 2e-5


def test_gguf_metadata_equals_llama_cpp_converter_and_imports_back(models, llama_converter, tmp_path, capsys):
    """Every optional YaRN key set: nextq writes what llama.cpp's converter writes, warns about what llama.cpp's
    qwen3next drops, and reads the setting back from the GGUF."""
    gguf = pytest.importorskip("gguf")
    from nextq.convert.gguf_export import export_gguf
    from nextq.convert.gguf_import import read_gguf

    ck, ir = models["custom"]
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    export_gguf(Graph.load(ir), ours)
    captured = capsys.readouterr()
    warning = " ".join((captured.out + captured.err).split())  # the console wraps long lines
    assert "beta_fast=16.0" in warning and "beta_slow=2.0" in warning and "attention factor 1.25" in warning
    assert "truncate=false" in warning
    r = subprocess.run(llama_cpp_converter.converter_command(llama_converter, ck, "--outtype", "f32", "--outfile",
                                                             ref, "--no-mtp"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    def fields(path):
        return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}

    fa, fb = fields(ours), fields(ref)
    diff = {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}
    assert diff <= {"general.name", "general.size_label"}, {k: (fa.get(k), fb.get(k)) for k in diff}
    assert fa["qwen3next.rope.scaling.type"] == "yarn" and fa["qwen3next.rope.scaling.yarn_beta_fast"] == 16.0
    back = read_gguf(ours).config.rope_scaling  # truncate is not in GGUF: llama.cpp always truncates
    assert back == RopeScaling("yarn", 4.0, 32, beta_fast=16.0, beta_slow=2.0, attention_factor=1.25)


# ---- the command line -------------------------------------------------------------------------------------------


def test_convert_rope_scaling_flag_and_inspect(models, reference, tmp_path):
    ck, _ = models["plain"]
    runner = CliRunner()
    for value in ("yarn:4:32", json.dumps(RECIPE)):
        out = tmp_path / f"ir-{len(value)}"
        r = runner.invoke(main, ["convert", str(ck), "-o", str(out), "--rope-scaling", value])
        assert r.exit_code == 0, r.output
        assert Graph.load(out).config.rope_scaling == RopeScaling("yarn", 4.0, 32)
        # same model as the checkpoint whose config.json carries the recipe
        assert rel_err(nextq.load(out).logits(IDS.numpy()), reference["recipe"]) <= 1e-5
    r = runner.invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "rope: yarn factor 4 over original 32 (context 128), attention factor 1.138629" in r.output
    r = runner.invoke(main, ["convert", str(ck), "-o", str(tmp_path / "ir-4"), "--rope-scaling", "yarn:4"])
    assert r.exit_code == 0, r.output  # ORIGINAL defaults to the checkpoint's max_position_embeddings
    assert Graph.load(tmp_path / "ir-4").config.rope_scaling == RopeScaling("yarn", 4.0, 512)


@pytest.mark.parametrize("value,message", [
    ("yarn", "expected yarn:FACTOR[:ORIGINAL]"),
    ("yarn:x", "FACTOR must be a number"),
    ("linear:2", "rope_type='linear', supported: ['default', 'yarn']"),
    ("yarn:0.5", "factor=0.5, expected >= 1"),
    ("{bad", "not valid JSON"),
])
def test_bad_rope_scaling_flag(models, tmp_path, value, message):
    out = tmp_path / "ir"
    r = CliRunner().invoke(main, ["convert", str(models["plain"][0]), "-o", str(out), "--rope-scaling", value])
    assert r.exit_code != 0 and message in r.output and not out.exists()


def test_disagreeing_rope_spellings_are_refused(models):
    from nextq.convert.hf_rope import read_rope

    conf = json.loads((models["plain"][0] / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match="rope_parameters .* and rope_scaling .* disagree"):
        read_rope({**conf, "rope_scaling": RECIPE})
    # the model card's spelling on a config without rope_parameters (transformers 4 configs on the Hub)
    legacy = {k: v for k, v in conf.items() if k != "rope_parameters"}
    assert read_rope({**legacy, "rope_theta": 1e7, "rope_scaling": RECIPE})[::2] == (1e7, RopeScaling("yarn", 4.0, 32))
