"""`nextq export hf`: the IR back in the Hugging Face layout, judged by transformers (with compressed-tensors for the
int4 / int8 exports, its own FP8 loader for the FP8 one) and by the source checkpoint itself (round trips)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import nextq
from nextq.cli import main
from nextq.convert.hf_export import export_hf
from nextq.pipeline import embedded_model

from conftest import build_checkpoint
from test_fp8_source import make_fp8_checkpoint

IDS = np.random.default_rng(0).integers(0, 96, size=(2, 37))


def stored(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:8]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def transformers_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name,kw", [("base", dict(mtp=True, dtype=torch.bfloat16)), ("odd", {}),
                                     ("wide", dict(dtype=torch.float16))])
def test_round_trip_is_bit_exact(tmp_path, name, kw):
    """HF -> IR -> HF gives the source's tensors back: names, dtypes and bytes (grouped in_proj_qkvz / in_proj_ba,
    interleaved q_proj, conv [C, 1, K], dense-MLP layers, tied embeddings, MTP); the config keeps every field."""
    src = build_checkpoint(tmp_path / "src", name, **kw)
    assert run("convert", src, "-o", tmp_path / "ir").exit_code == 0
    assert run("export", "hf", tmp_path / "ir", "-o", tmp_path / "out").exit_code == 0
    assert_same_tensors(stored(src), stored(tmp_path / "out"))
    a, b = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "out"))
    assert {k: v for k, v in a.items() if k != "transformers_version"} == \
        {k: v for k, v in b.items() if k != "transformers_version"}


def test_embedded_model_round_trip(tmp_path):
    """The embedded model: every main-model tensor bit-exact; its MTP experts, stored fused there, come back one by
    one (the Hub's layout) with the same values; tokenizer and chat template carried."""
    src = embedded_model()
    export_hf(nextq.read(str(src)), tmp_path / "out", progress=False)
    a, b = stored(src), stored(tmp_path / "out")
    fused = {k for k in a if k.startswith("mtp.layers.0.mlp.experts.")}
    assert fused and all(k in b for k in set(a) - fused)
    assert_same_tensors({k: a[k] for k in set(a) - fused}, {k: b[k] for k in set(a) - fused})
    gate_up, down = a["mtp.layers.0.mlp.experts.gate_up_proj"], a["mtp.layers.0.mlp.experts.down_proj"]
    i = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        assert torch.equal(b[f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight"], gate_up[e, :i])
        assert torch.equal(b[f"mtp.layers.0.mlp.experts.{e}.up_proj.weight"], gate_up[e, i:])
        assert torch.equal(b[f"mtp.layers.0.mlp.experts.{e}.down_proj.weight"], down[e])
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / f).read_bytes() == (src / f).read_bytes()


@pytest.fixture(scope="module")
def embedded_ir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf-export")
    assert run("convert", embedded_model(), "-o", root / "ir").exit_code == 0
    return root / "ir"


@pytest.mark.parametrize("recipe,groups", [("int4", {4}), ("int4-int8", {4, 8})])
def test_compressed_tensors_export_runs_in_transformers(embedded_ir, tmp_path, recipe, groups):
    """int4 experts (and int8 for everything else) as compressed-tensors pack-quantized: transformers decompresses
    them on CPU to exactly nextq's weights; logits vs nextq's torch runtime on the same IR <= 1e-4 relative
    (measured ~7e-7: fp32 summation order only)."""
    q = tmp_path / "q"
    assert run("quantize", embedded_ir, "-o", q, "--recipe", recipe, "--no-calibrate").exit_code == 0
    assert run("export", "hf", q, "-o", tmp_path / "hf").exit_code == 0
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert {g["weights"]["num_bits"] for g in qc["config_groups"].values()} == groups
    main_group = next(g for g in qc["config_groups"].values() if g["targets"][0] == "Linear")
    assert main_group["weights"]["num_bits"] == 4  # the routed experts' scheme targets Linear (vLLM's MoE path)
    assert {"model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"} <= set(qc["ignore"])
    sd = stored(tmp_path / "hf")
    packed = sd["model.layers.0.mlp.experts.3.down_proj.weight_packed"]
    assert packed.dtype == torch.int32 and sd["model.layers.0.mlp.experts.3.down_proj.weight_shape"].tolist() == \
        list(nextq.read(str(q)).tensors["layers.0.ffn.experts.3.down.weight"].shape)
    ids = IDS % 2048
    assert rel(transformers_logits(tmp_path / "hf", ids), nextq.load(q).logits(ids)) <= 1e-4


ALIGNED = dict(hidden_size=128, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=128,
               linear_value_head_dim=128, head_dim=128, num_attention_heads=2, num_key_value_heads=1,
               moe_intermediate_size=128, shared_expert_intermediate_size=128, intermediate_size=128)


@pytest.mark.parametrize("shape", ["aligned", "ragged"])
def test_fp8_source_round_trip(tmp_path, shape):
    """Qwen's FP8 layout: FP8 checkpoint -> IR -> HF gives back the same e4m3 codes and scale tiles, also where the
    tiles straddle canonical tensors (ragged head dims: per-row scales in the IR, tiles again on export)."""
    fp8, _ = make_fp8_checkpoint(tmp_path, **(ALIGNED if shape == "aligned" else {}))
    assert run("convert", fp8, "-o", tmp_path / "ir").exit_code == 0
    assert run("export", "hf", tmp_path / "ir", "-o", tmp_path / "out").exit_code == 0
    a, b = stored(fp8), stored(tmp_path / "out")
    a = {k: v.to(torch.float32) if k.endswith("_scale_inv") else v for k, v in a.items()}  # bf16 scales, exactly
    assert_same_tensors(a, b)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    src = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert qc == src


def test_fp8_recipe_export_runs_in_transformers(tmp_path):
    """The fp8 recipe as Qwen's FP8 layout, loaded by transformers' own FP8 integration on CPU (which dequantizes;
    with 128-multiple shapes, where its ragged-tile bug does not apply): logits vs nextq <= 1e-4 relative."""
    pytest.importorskip("accelerate")  # transformers' FP8 loader requires it
    src = build_checkpoint(tmp_path / "src", "base", dtype=torch.bfloat16, **ALIGNED)
    assert run("convert", src, "-o", tmp_path / "ir").exit_code == 0
    assert run("quantize", tmp_path / "ir", "-o", tmp_path / "q", "--recipe", "fp8", "--no-calibrate").exit_code == 0
    assert run("export", "hf", tmp_path / "q", "-o", tmp_path / "hf").exit_code == 0
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert "model.layers.0.linear_attn.in_proj_ba" in qc["modules_to_not_convert"]
    assert rel(transformers_logits(tmp_path / "hf", IDS), nextq.load(tmp_path / "q").logits(IDS)) <= 1e-4


def test_tensor_parallel_keeps_in_proj_ba_unquantized(embedded_ir, tmp_path):
    """--tensor-parallel 2: a quantized in_proj_ba is written dequantized (exact values) and listed in ignore."""
    recipe = tmp_path / "ba.toml"
    recipe.write_text('base = "int4"\n[[overrides]]\npattern = "layers.*.mixer.[ba].weight"\nscheme = "int8_g32"\n')
    q = tmp_path / "q"
    assert run("quantize", embedded_ir, "-o", q, "--recipe", recipe, "--no-calibrate").exit_code == 0
    for tp, quantized in ((1, True), (2, False)):
        out = tmp_path / f"tp{tp}"
        assert run("export", "hf", q, "-o", out, "--tensor-parallel", tp).exit_code == 0
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        sd = stored(out)
        assert ("model.layers.0.linear_attn.in_proj_ba.weight_packed" in sd) == quantized
        assert ("model.layers.0.linear_attn.in_proj_ba.weight" in sd) != quantized
        assert ("model.layers.0.linear_attn.in_proj_ba" in qc["ignore"]) != quantized


@pytest.mark.parametrize("recipe,message", [("int4-asym", "int4_asym_g32"), ("q4_k_m", "q4_k")])
def test_schemes_without_a_form_are_refused(embedded_ir, tmp_path, recipe, message):
    q = tmp_path / "q"
    assert run("quantize", embedded_ir, "-o", q, "--recipe", recipe, "--no-calibrate").exit_code == 0
    result = CliRunner().invoke(main, ["export", "hf", str(q), "-o", str(tmp_path / "hf")])
    assert result.exit_code != 0 and message in result.output and "error:" in result.output
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
