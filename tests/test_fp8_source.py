"""FP8 checkpoints (Qwen's official -FP8 layout) read exactly, run everywhere, judged against transformers on the
exactly dequantized weights and against llama.cpp's own converter.

Fixture: a tiny bf16 Qwen3-Next with dims that are not multiples of 128 (hidden and expert 160, shared expert 144; DeltaNet head
dims 40, attention head dim 48, so in_proj_qkvz's and q_proj's 128-row tiles straddle the canonical q / k / v / z
and q / gate), quantized as Qwen does: real 128x128 tiles with ragged edges, bf16 `weight_scale_inv`, the official
high-precision list (lm_head, embeddings, norms, conv1d, A_log, dt_bias, in_proj_ba, router, shared_expert_gate)
kept bf16. The reference is transformers on a float32 copy whose FP8 weights are q * s per tile: transformers' own
FP8 loading needs accelerate and, in 5.24, dequantizes ragged tiles wrongly (notes/fp8-and-yarn.md).
"""

from __future__ import annotations

import json
import re
import shutil
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
from nextq.graph import Graph
from nextq.quant import quantize
from nextq.quant.apply import quantize_graph
from nextq.quant.fp8 import quantize_fp8_block128
from nextq.quant.recipes import get_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import llama_cpp_converter  # noqa: E402  (scripts/llama_cpp_converter.py: llama.cpp's own converter, pinned)

SHAPE = dict(hidden_size=160, head_dim=48, linear_key_head_dim=40, linear_value_head_dim=40,
             moe_intermediate_size=160, shared_expert_intermediate_size=144)
# the tensors Qwen's FP8 releases store as e4m3 (every other weight stays bf16)
FP8_KEYS = re.compile(r".*\.(self_attn\.[qkvo]_proj|linear_attn\.(in_proj_qkvz|out_proj)|"
                      r"mlp\.experts\.\d+\.(gate|up|down)_proj|mlp\.shared_expert\.(gate|up|down)_proj)\.weight")
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128]}
IDS = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(0))


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def dequant_tiles(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The layout's definition: w[i, j] = float(q[i, j]) * float(s[i // 128, j // 128]) (ragged tiles cropped)."""
    n, k = q.shape
    rows, cols = torch.arange(n) // 128, torch.arange(k) // 128
    return q.float() * s.float()[rows][:, cols]


def make_fp8_checkpoint(root: Path, seed: int = 0, **shape) -> tuple[Path, Path]:
    """(FP8 checkpoint, float32 reference checkpoint with the FP8 weights exactly dequantized) under `root`."""
    from safetensors.torch import load_file, save_file

    src = build_checkpoint(root / "bf16", "base", seed=seed, dtype=torch.bfloat16, **(shape or SHAPE))
    fp8, ref = root / "fp8", root / "ref"
    fp8_sd, ref_sd, kept = {}, {}, set()
    for k, v in load_file(src / "model.safetensors").items():
        if FP8_KEYS.fullmatch(k):
            qt = quantize_fp8_block128(v)  # real 128x128 tiles of the bf16 weight
            scale = qt.scales.to(torch.bfloat16)  # bf16 weight_scale_inv, as Qwen's FP8 releases
            fp8_sd[k], fp8_sd[k + "_scale_inv"] = qt.data, scale
            ref_sd[k] = dequant_tiles(qt.data, scale)
        else:
            fp8_sd[k], ref_sd[k] = v, v.float()
            if k.endswith(".weight") and v.dim() == 2:
                kept.add(k.removesuffix(".weight"))
    conf = json.loads((src / "config.json").read_text())
    for d, sd, qc in ((fp8, fp8_sd, {**QUANT_CONFIG, "modules_to_not_convert": sorted(kept)}), (ref, ref_sd, None)):
        d.mkdir()
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**conf, **({"quantization_config": qc} if qc else {})}))
        write_fixture_tokenizer(d, 96)
    return fp8, ref


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    fp8, ref = make_fp8_checkpoint(root)
    convert(str(fp8), root / "ir")
    convert(str(fp8), root / "ir-f32", dtype="float32")
    return {"fp8": fp8, "ref": ref, "ir": root / "ir", "ir_f32": root / "ir-f32"}


def test_ir_holds_the_checkpoints_codes_and_scales(ckpts):
    from safetensors.torch import load_file

    g = Graph.load(ckpts["ir"])
    schemes = {n: g.tensors[n].meta["scheme"] for n in g.tensors if hasattr(g.tensors[n], "meta")}
    assert schemes["layers.0.mixer.q.weight"] == "fp8_g128"  # tiles straddle q / k / v / z
    assert schemes["layers.3.mixer.gate.weight"] == "fp8_g128"  # and q / gate
    assert schemes["layers.3.mixer.o.weight"] == schemes["layers.0.ffn.experts.5.down.weight"] == "fp8_block128"
    assert "layers.0.mixer.b.weight" not in schemes and "lm_head.weight" not in schemes  # kept bf16
    assert g.tensors["layers.0.mixer.b.weight"].dtype == torch.bfloat16
    src = load_file(ckpts["fp8"] / "model.safetensors")
    w = g.get("layers.0.ffn.experts.5.down.weight")  # unsplit: the stored bytes and scales as they are
    assert torch.equal(w.data.view(torch.uint8), src["model.layers.0.mlp.experts.5.down_proj.weight"].view(torch.uint8))
    assert torch.equal(w.scales, src["model.layers.0.mlp.experts.5.down_proj.weight_scale_inv"].float())
    ref = load_file(ckpts["ref"] / "model.safetensors")
    f32 = Graph.load(ckpts["ir_f32"])  # --dtype float32: the exact dequantization
    for name in ("layers.0.mixer.q.weight", "layers.0.mixer.z.weight", "layers.3.mixer.gate.weight"):
        assert torch.equal(g.get(name).dequantize(), f32.get(name))
    assert torch.equal(f32.get("layers.3.mixer.o.weight"), ref["model.layers.3.self_attn.o_proj.weight"])


def test_logits_match_transformers_on_dequantized_weights(ckpts):
    ref = hf_logits(ckpts["ref"], IDS).numpy()
    got = nextq.load(ckpts["ir"]).logits(IDS.numpy())
    assert rel_err(got, ref) <= 1e-5  # fp32 runtime on the exact fp8 values; observed ~1e-6


def test_fp8_recipe_is_an_exact_copy(ckpts, tmp_path):
    out = tmp_path / "fp8-recipe"
    report = quantize_graph(Graph.load(ckpts["ir"]), get_recipe("fp8"), out)
    a, b = Graph.load(ckpts["ir"]), Graph.load(out)
    for name, t in a.tensors.items():
        x, y = a.get(name), b.get(name)
        if hasattr(t, "meta"):
            assert y.scheme == x.scheme and torch.equal(y.data.view(torch.uint8), x.data.view(torch.uint8))
            assert torch.equal(y.scales, x.scales), name
        else:
            assert torch.equal(x, y), name
    assert report["methods"].get("copy", 0) > 0 and "rtn" not in report["methods"]
    ids = IDS.numpy()
    assert np.array_equal(nextq.load(out).logits(ids), nextq.load(ckpts["ir"]).logits(ids))  # max |Δ| = 0


def test_other_recipes_quantize_the_exact_dequantization(ckpts, tmp_path):
    quantize_graph(Graph.load(ckpts["ir"]), get_recipe("int4"), tmp_path / "a")
    quantize_graph(Graph.load(ckpts["ir_f32"]), get_recipe("int4"), tmp_path / "b")
    a, b = Graph.load(tmp_path / "a"), Graph.load(tmp_path / "b")
    name = "layers.1.ffn.experts.2.up.weight"
    assert a.get(name).scheme == "int4_sym_g32" and torch.equal(a.get(name).data, b.get(name).data)
    assert a.get("layers.1.mixer.q.weight").scheme == "fp8_g128"  # classes the recipe keeps stay as read


def test_onnx_runtime_runs_the_fp8_ir(ckpts, tmp_path):
    pytest.importorskip("onnxruntime")
    from nextq.convert.onnx_export import export_onnx

    out = export_onnx(ckpts["ir"], tmp_path / "onnx")
    ref = nextq.load(ckpts["ir"]).logits(IDS.numpy())
    assert rel_err(nextq.load(out).logits(IDS.numpy()), ref) <= 1e-4  # DequantizeLinear(e4m3) + MatMul, fp32


def test_gguf_equals_llama_cpp_converter_on_the_fp8_checkpoint(ckpts, llama_converter, tmp_path):
    """llama.cpp's converter dequantizes FP8 (q * s in fp32); nextq's --requantize f32 export of the FP8 IR and
    its F32 export of the --dtype float32 IR must be the same file but for the name and size label."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from nextq.convert.gguf_export import GGUFOptions, export_gguf

    ref = tmp_path / "ref.gguf"
    r = subprocess.run(llama_cpp_converter.converter_command(llama_converter, ckpts["fp8"], "--outtype", "f32",
                                                             "--outfile", ref, "--no-mtp"), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = {"requantized": tmp_path / "a.gguf", "dequantized": tmp_path / "b.gguf"}
    export_gguf(Graph.load(ckpts["ir"]), ours["requantized"], GGUFOptions(type="f32", requantize="f32"))
    export_gguf(Graph.load(ckpts["ir_f32"]), ours["dequantized"])
    b = gguf.GGUFReader(ref)
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.")}
    tb = {t.name: t for t in b.tensors}
    for path in ours.values():
        a = gguf.GGUFReader(path)
        fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.")}
        diff = {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}
        assert diff <= {"general.name", "general.size_label"}, {k: (fa.get(k), fb.get(k)) for k in diff}
        ta = {t.name: t for t in a.tensors}
        assert set(ta) == set(tb)
        for name, t in ta.items():
            u = tb[name]
            assert t.tensor_type == u.tensor_type and list(t.shape) == list(u.shape), name
            # identical data; only ssm_a = -exp(A_log) may differ by float32 rounding of exp (test_gguf's bound)
            assert np.abs(np.asarray(t.data, np.float32) - np.asarray(u.data, np.float32)).max() <= 1e-6, name
    got = nextq.load(ours["requantized"]).logits(IDS.numpy())
    assert rel_err(got, hf_logits(ckpts["ref"], IDS).numpy()) <= 1e-5  # llama.cpp, f32 KV


def test_fp8_ir_refuses_gguf_without_requantize(ckpts, tmp_path):
    r = CliRunner().invoke(main, ["export", "gguf", str(ckpts["ir"]), "-o", str(tmp_path / "m.gguf")])
    assert r.exit_code != 0 and "--fallback" in r.output and not (tmp_path / "m.gguf").exists()


# ---- bad checkpoints: one error line, non-zero exit, nothing written ------------------------------------------


def _edit_checkpoint(src: Path, dst: Path, config=None, tensors=None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config is not None:
        conf = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(conf)))
    if tensors is not None:
        save_file(tensors(load_file(dst / "model.safetensors")), dst / "model.safetensors")
    return dst


SCALE = "model.layers.0.linear_attn.out_proj.weight_scale_inv"


@pytest.mark.parametrize("case,edit,message", [
    ("missing-scale", {"tensors": lambda sd: {k: v for k, v in sd.items() if k != SCALE}},
     "model.layers.0.linear_attn.out_proj.weight: F8_E4M3 weight without"),
    ("scale-shape", {"tensors": lambda sd: {**sd, SCALE: torch.ones(1, 1)}},
     f"{SCALE}: shape [1, 1], expected [2, 2]"),
    ("fmt", {"config": lambda c: {**c, "quantization_config": {**c["quantization_config"], "fmt": "e5m2"}}},
     "quantization_config.fmt='e5m2', supported: ['e4m3']"),
    ("block", {"config": lambda c: {**c, "quantization_config": {**c["quantization_config"],
                                                                 "weight_block_size": [64, 64]}}},
     "quantization_config.weight_block_size=[64, 64], supported: [[128, 128]]"),
    ("activation", {"config": lambda c: {**c, "quantization_config": {**c["quantization_config"],
                                                                      "activation_scheme": "static"}}},
     "quantization_config.activation_scheme='static', supported: ['dynamic']"),
    ("undeclared", {"config": lambda c: {k: v for k, v in c.items() if k != "quantization_config"}},
     "declares no quantization_config with quant_method fp8"),
])
def test_bad_fp8_checkpoints_are_refused(ckpts, tmp_path, case, edit, message):
    bad = _edit_checkpoint(ckpts["fp8"], tmp_path / case, **edit)
    out = tmp_path / "ir"
    r = CliRunner().invoke(main, ["convert", str(bad), "-o", str(out)])
    assert r.exit_code != 0, r.output
    assert "error:" in r.output and message in " ".join(r.output.split()), r.output
    assert not out.exists() and not list(tmp_path.glob(".ir*"))


def test_transformers_backend_runs_an_fp8_checkpoint_on_its_dequantization(ckpts):
    """nextq.load(FP8 checkpoint) — validate's reference — is transformers on the exact dequantization."""
    model = nextq.load(ckpts["fp8"])
    assert model.name == "transformers"
    # the same weights bit for bit; float32 summation order still follows the memory alignment of the loaded
    # weights (measured: 9.5e-7 as loaded, 0 once the parameters are copied), hence not array_equal
    assert rel_err(model.logits(IDS.numpy()), hf_logits(ckpts["ref"], IDS).numpy()) <= 1e-6
