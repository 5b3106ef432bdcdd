"""Quantized sources through the main job: `nextq pipeline FP8_CHECKPOINT` with its defaults (the README's seed
checkpoint command) runs end to end, and `nextq quantize` of an IR imported from a pre-quantized checkpoint
re-quantizes from the exact dequantization of its codes (nextq's own quantized IR is refused with what to do).

Fixtures: test_fp8_source's tiny FP8 checkpoint (Qwen's layout: ragged 128x128 tiles, bf16 scales, the official
high-precision list kept bf16) and test_hf_import's compressed-tensors checkpoint (written by compressed-tensors'
own compressor: int4 g32 experts, int8 per-channel dense layers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import nextq
from conftest import build_checkpoint
from nextq.cli import main
from nextq.graph import Graph
from nextq.quant import QuantizedTensor, quantize
from test_fp8_source import make_fp8_checkpoint
from test_hf_import import EXPERTS, INT4_G32, INT8_CHANNEL, SHAPE, write_ct_checkpoint


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def fp8_job(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    from nextq.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pipeline-fp8")
    fp8, _ = make_fp8_checkpoint(root)
    # the defaults (int4 recipe, GGUF and ONNX, calibrated), with fewer calibration tokens and windows for time
    run_pipeline(str(fp8), root / "job", calib_tokens=256, max_windows=2, max_new_tokens=4)
    return root / "job"


def test_pipeline_of_an_fp8_checkpoint_writes_and_validates_every_format(fp8_job: Path):
    summary = json.loads((fp8_job / "summary.json").read_text())
    rows = {r["format"]: r for r in summary["rows"]}
    assert set(rows) == {"original", "ir (int4)", "gguf", "onnx"}
    for fmt in ("ir (int4)", "gguf", "onnx"):  # each validated by its engine against the original
        assert rows[fmt]["kld_mean"] is not None and rows[fmt]["ppl"] is not None, fmt
    gguf_row = rows["gguf"]
    assert "tensors written as Q8_0 (GGUF has no fp8 type)" in gguf_row["note"]
    assert "written as Q8_0" in (fp8_job / "summary.md").read_text()
    step = next(s for s in summary["steps"] if s["name"] == "export gguf")
    assert "fp8_block128" in step["note"] and "Q8_0" in step["note"]


def test_pipeline_gguf_copies_int4_and_writes_fp8_as_q8_0(fp8_job: Path):
    """The experts' int4 blocks are copied (Q4_0, bit for bit); the fp8 tensors the int4 recipe keeps become Q8_0
    of their exact dequantization; every other tensor keeps its type."""
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(fp8_job / "model.gguf").tensors}
    assert types["blk.1.ffn_up_exps.weight"] == "Q4_0" and types["blk.3.attn_q.weight"] == "Q8_0"
    assert types["blk.0.ssm_out.weight"] == "Q8_0" and types["token_embd.weight"] == "BF16"  # bf16 in the source
    ir, back = Graph.load(fp8_job / "quantized"), nextq.read(fp8_job / "model.gguf")  # back: GGUF dequantized
    fp8 = [n for n, t in ir.tensors.items() if getattr(t, "meta", {}).get("scheme", "").startswith("fp8")]
    assert len(fp8) > 20
    for name in fp8:
        # Q8_0 of q * s: one scale per 32 values, error <= half a step (amax / 254); relative RMS measured
        # 9.3e-5 .. 5.6e-3 over the 32 fp8 tensors of this fixture, bound 1e-2
        assert rel_rms(back.get(name), ir.get(name).dequantize()) <= 1e-2, name
    expert = "layers.1.ffn.experts.2.up.weight"
    assert ir.get(expert).scheme == "int4_sym_g32" and torch.equal(back.get(expert), ir.get(expert).dequantize())


@pytest.fixture(scope="module")
def ct_ir(tmp_path_factory) -> Path:
    """A compressed-tensors checkpoint (int4 g32 experts, int8 per-channel elsewhere) converted to an IR."""
    pytest.importorskip("compressed_tensors")
    from nextq.convert.cli import convert

    root = tmp_path_factory.mktemp("imported")
    src = build_checkpoint(root / "f32", "base", **SHAPE)
    ct = write_ct_checkpoint(src, root / "ct", {"experts": ([EXPERTS], INT4_G32), "dense": (["Linear"], INT8_CHANNEL)},
                             [])
    convert(str(ct), root / "ir")
    return root / "ir"


def test_quantize_of_an_imported_checkpoint_starts_from_its_dequantized_codes(ct_ir: Path, tmp_path: Path):
    res = CliRunner().invoke(main, ["quantize", str(ct_ir), "-o", str(tmp_path / "q"), "--recipe", "int8",
                                    "--no-calibrate"])
    assert res.exit_code == 0, res.output
    assert "re-quantizing 104 of the 104 tensors" in res.output and "int4_sym_g32 -> int8_g32" in res.output
    src, q = Graph.load(ct_ir), Graph.load(tmp_path / "q")
    for name in ("layers.1.ffn.experts.2.up.weight", "layers.0.mixer.out.weight"):
        held = src.get(name)
        assert isinstance(held, QuantizedTensor) and held.scheme in ("int4_sym_g32", "int8_channel")
        want = quantize(held.dequantize(), "int8_g32")  # exactly: RTN of v * s
        assert torch.equal(q.get(name).data, want.data) and torch.equal(q.get(name).scales, want.scales), name
    # the int4 recipe asks for the experts' own scheme: copied, code for code
    assert CliRunner().invoke(main, ["quantize", str(ct_ir), "-o", str(tmp_path / "q4"), "--recipe", "int4",
                                     "--no-calibrate"]).exit_code == 0
    name = "layers.1.ffn.experts.2.up.weight"
    assert torch.equal(Graph.load(tmp_path / "q4").get(name).data, src.get(name).data)


def test_quantize_of_nextqs_own_quantized_ir_says_what_to_do(ct_ir: Path, tmp_path: Path):
    assert CliRunner().invoke(main, ["quantize", str(ct_ir), "-o", str(tmp_path / "q"), "--recipe", "int4",
                                     "--no-calibrate"]).exit_code == 0
    res = CliRunner().invoke(main, ["quantize", str(tmp_path / "q"), "-o", str(tmp_path / "qq"), "--recipe", "int8",
                                    "--no-calibrate"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "already quantized" in lines[0] and "quantize the IR or checkpoint it was made from" in lines[0]
    assert not (tmp_path / "qq").exists()
