"""Validation and the pipeline at scale: the layer-streamed reference pinned to transformers, the rule that picks
it, window-by-window accumulation, the per-step table, GGUF validation skipped without an attention layer, and
bad input (a source whose shards changed since conversion)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nextq.cli import main
from nextq.errors import CheckpointError, NextqError
from conftest import build_checkpoint
from test_validate import _with_tokenizer

FAST = ["--window", "64", "--max-windows", "4", "--batch-size", "2", "--layer-windows", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random checkpoint with the embedded tokenizer's vocabulary and its IR."""
    from nextq.convert.cli import convert

    root = tmp_path_factory.mktemp("scale")
    hf = _with_tokenizer(build_checkpoint(root / "hf", "base", vocab_size=2048, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=32))
    convert(str(hf), root / "ir")
    return {"root": root, "hf": hf, "ir": root / "ir"}


def _run(args: list[str], env: dict | None = None) -> tuple[int, str]:
    r = CliRunner().invoke(main, args, env=env)
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def test_streamed_reference_matches_transformers(tiny):
    """The reference at scale (nextq's layer-streamed executor on the HF source) against the judge (transformers)."""
    root = tiny["root"]
    code, out = _run(["validate", str(tiny["hf"]), "-r", str(tiny["hf"]), "--backend", "stream", *FAST,
                      "--reference-backend", "transformers", "--no-cache", "--report", str(root / "stream.json")])
    assert code == 0, out
    r = json.loads((root / "stream.json").read_text())
    assert r["candidate"]["backend"] == "stream" and r["reference"]["backend"] == "transformers"
    m = r["metrics"]
    assert m["kld_mean"] < 1e-8  # fp32 both sides: summation order only (the IR-vs-transformers test: ~2e-13)
    assert m["top1"] == 1.0 and abs(m["ppl_ratio"] - 1) < 1e-5
    assert m["logit_err_max"] < 1e-4  # logits of std ~1: fp32 rounding


def test_reference_rule_streams_large_sources(tiny, monkeypatch):
    from nextq.validate import compare

    assert compare.default_backend(tiny["hf"]) == "transformers"  # tiny: fits in TRANSFORMERS_LIMIT as float32
    assert compare.default_backend(tiny["ir"]) == "stream"  # an IR is always streamed
    monkeypatch.setattr(compare, "TRANSFORMERS_LIMIT", 1024)
    assert compare.default_backend(tiny["hf"]) == "stream"


def test_ir_against_itself_streamed_is_exact(tiny):
    code, out = _run(["validate", str(tiny["ir"]), "-r", str(tiny["ir"]), *FAST, "--no-cache",
                      "--report", str(tiny["root"] / "self.json")])
    assert code == 0, out
    m = json.loads((tiny["root"] / "self.json").read_text())["metrics"]
    assert m["kld_mean"] == 0.0 and m["kld_max"] == 0.0 and m["ppl_ratio"] == 1.0  # the same code on the same bytes


def test_stream_passes_and_small_chunks_give_the_same_metrics(tiny, monkeypatch):
    """Several layer-streamed passes (STREAM_TOKENS < the windows) and one-position metric chunks change nothing."""
    from nextq.validate import compare
    from nextq.validate.corpus import windows_for

    windows = windows_for(tiny["ir"], (), 64, None, 5)
    base = compare.compare(tiny["hf"], tiny["ir"], windows, batch_size=2, candidate_backend="stream",
                           layer_windows=0).metrics
    monkeypatch.setattr(compare, "STREAM_TOKENS", 64)  # one window per pass
    monkeypatch.setattr(compare, "CHUNK_ELEMENTS", 1)  # one position per float64 chunk
    small = compare.compare(tiny["hf"], tiny["ir"], windows, batch_size=2, candidate_backend="stream",
                            layer_windows=0).metrics
    # a pass of one window runs other float32 matmul shapes than one of five (measured 7e-10 relative on PPL)
    assert small == pytest.approx(base, rel=1e-6, abs=1e-9)


def test_topk_compression_matches_argsort():
    from nextq.validate.compare import to_topk

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=(2, 6))
    b = to_topk(logits, targets, 8)
    want = np.argsort(-logits, axis=-1, kind="stable")[..., :8]
    assert (b.topk_ids == want).all()  # no ties in random floats: the same ids in the same order
    x = logits.astype(np.float64)
    np.testing.assert_allclose(b.lse, np.log(np.exp(x).sum(-1)), rtol=1e-12)  # float64 rounding


def test_source_changed_since_conversion_is_an_error(tiny, tmp_path):
    """The IR's provenance holds the sha256 of every source shard; a different file now is one clear error."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny["hf"], hf)
    from nextq.convert.cli import convert

    convert(str(hf), tmp_path / "ir")
    shard = next(hf.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    shard.write_bytes(bytes(data))
    code, out = _run(["validate", str(tmp_path / "ir"), "-r", str(hf), *FAST, "--no-cache"])
    assert code == 2, out
    assert f"error: {shard}: source shard changed since {tmp_path / 'ir'} was converted from it" in out
    assert "sha256" in out and len(out.strip().splitlines()) == 1


def test_pipeline_without_attention_skips_gguf_validation(tmp_path):
    """llama.cpp cannot allocate a model without an attention layer: the GGUF is exported, its validation is
    skipped with the reason in both tables, and the step table has every step. Each step in a process of its own
    (as on a large source): each measured there."""
    hf = _with_tokenizer(build_checkpoint(tmp_path / "hf", "base", vocab_size=2048, num_hidden_layers=2,
                                          layer_types=["linear_attention"] * 2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=32))
    out = tmp_path / "run"
    code, text = _run(["pipeline", str(hf), "-o", str(out), "--window", "64", "--max-windows", "2",
                       "--max-new-tokens", "2", "--calib-tokens", "512", "--isolate-steps"],
                      env={"NEXTQ_CACHE": str(tmp_path / "c")})
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["format"]: r for r in summary["rows"]}
    assert rows["gguf"]["passed"] is None and "without an attention layer" in rows["gguf"]["note"]
    assert rows["onnx"]["kld_mean"] > 0 and rows["ir (int4)"]["kld_mean"] > 0
    assert (out / "model.gguf").is_file() and not (out / "reports" / "gguf.json").exists()
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["convert", "quantize", "export gguf", "export onnx", "validate ir", "run ir (torch)",
                           "validate gguf", "validate onnx", "run original (transformers)"]
    assert steps["validate gguf"]["note"].startswith("skipped: llama.cpp cannot allocate")
    assert steps["run original (transformers)"]["note"].startswith("skipped: transformers' cache")
    ran = [s for s in steps.values() if not s["note"].startswith("skipped")]
    assert len(ran) == 7 and all(s["wall_s"] > 0 for s in ran) and summary["isolated_steps"]
    if Path("/proc/self/clear_refs").exists():
        assert all(s["peak_rss"] > 0 for s in ran)
    reason = "llama.cpp cannot allocate the KV cache of a model without an attention layer"
    assert f"gguf: not validated: {reason}" in text and "s / layer" in text
    md = (out / "summary.md").read_text()
    assert "| validate gguf | engine |" in md and f"skipped: {reason}" in md


def _fails(kind: str) -> None:
    if kind == "error":
        raise CheckpointError("model.safetensors: field 'x': expected 1, got 2")
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would


def test_isolated_steps_report_errors_and_deaths():
    """A step's error in its own process is raised here as it was; a process that dies is one clear error."""
    from nextq.console import run_isolated

    value, peak, gpu = run_isolated(math.prod, (2, 3, 7))
    assert value == 42 and (peak is None or peak > 0) and gpu is None
    with pytest.raises(CheckpointError, match="expected 1, got 2"):
        run_isolated(_fails, "error")
    with pytest.raises(NextqError, match="_fails: its process exited with code -9 and no result"):
        run_isolated(_fails, "kill")


def test_default_batch_keeps_a_batchs_logits_bounded():
    """At Qwen3-Next's vocabulary a window of 512 is 311 MB of float32 logits: one window per forward; small
    vocabularies keep 4 (the memory the pipeline's validation steps were measured with at 80B dimensions)."""
    from nextq.validate.compare import default_batch_size

    assert default_batch_size(512, 151936) == 1 and default_batch_size(256, 151936) == 1
    assert default_batch_size(256, 2048) == 4 and default_batch_size(512, None) == 4
