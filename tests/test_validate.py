"""nextq validate (metrics, windows, reference cache, per-layer drift, report schema, plots, the gate's exit code)
and nextq pipeline end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nextq.cli import main
from nextq.graph import Graph
from nextq.pipeline import embedded_model
from nextq.validate import metrics
from nextq.validate.compare import DriftAccumulator, RefBatch, to_topk
from nextq.validate.corpus import CorpusError, hub_reachable, make_windows, read_corpus
from nextq.validate.report import REPORT_SCHEMA, Thresholds, checks, parse_fraction, validate_doc

from conftest import build_checkpoint

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = embedded_model()
HAS_EMBEDDED = (EMBEDDED / "model.safetensors").is_file()
# small and fast: 4 windows of 64 tokens of the built-in held-out text
FAST = ["--window", "64", "--max-windows", "4", "--batch-size", "2"]


# ---- known answers ------------------------------------------------------------------------------------------------


def test_kl_known_answer():
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # by hand: 0.1438410362 nats
    got = metrics.kl_divergence(np.log(p), np.log(q) + 3.0)  # logits are shift-invariant
    assert got == pytest.approx(want, abs=1e-12)  # float64 log-softmax of 2 values: rounding only
    assert metrics.kl_divergence(np.log(p), np.log(p))[()] == 0.0  # identical: exactly 0


def test_perplexity_known_answer():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    # NLL = ln 2 and ln 4 -> ppl = exp(1.5 ln 2) = 2 ** 1.5
    assert metrics.perplexity(logits, np.array([0, 1])) == pytest.approx(2 ** 1.5, rel=1e-12)  # rounding only


def test_topk_kl_known_answer_and_bound():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.4, 0.2])
    b = to_topk(np.log(p)[None, None].repeat(2, 1).astype(np.float32), np.zeros((1, 1), np.int64), k=1)
    lp = b.topk_logits[0, :1] - b.lse[0, :1, None]
    got = metrics.kl_divergence_topk(b.topk_ids[0, :1], lp, np.log(q)[None])[0]
    # token 0 kept, {1, 2} merged: 0.5 ln(0.5/0.4) + 0.5 ln(0.5/0.6), by hand
    assert got == pytest.approx(0.5 * math.log(0.5 / 0.4) + 0.5 * math.log(0.5 / 0.6), abs=1e-6)  # float32 logits
    assert got <= metrics.kl_divergence(np.log(p), np.log(q))  # merging outcomes can only lower KL


def test_topk_accumulator_matches_full_on_peaked_distributions():
    rng = np.random.default_rng(0)
    ref = (rng.normal(size=(2, 9, 50)) * 4).astype(np.float32)
    cand = ref + rng.normal(size=ref.shape).astype(np.float32) * 0.3
    ids = rng.integers(0, 50, size=(2, 9))
    mask = np.ones((2, 8), bool)
    full, top = DriftAccumulator(), DriftAccumulator()
    full.add(RefBatch(logits=ref), cand, ids[:, 1:], mask)
    top.add(to_topk(ref, ids[:, 1:], k=16), cand, ids[:, 1:], mask)
    f, t = full.summary(), top.summary()
    assert f["ppl_reference"] == pytest.approx(t["ppl_reference"], rel=1e-9)  # the target NLL is stored exactly
    assert f["top1"] == t["top1"]
    assert t["kld_mean"] <= f["kld_mean"] + 1e-9
    assert t["kld_mean"] == pytest.approx(f["kld_mean"], rel=0.05)  # std-4 logits: the top 16 of 50 hold ~all mass


def test_windows_score_every_token_once():
    tokens = np.arange(100)
    for window, stride in ((16, 5), (16, 1), (7, 3), (16, 15)):
        w = make_windows(tokens, window, stride)
        scored = np.concatenate([w.targets[i][w.mask[i]] for i in range(len(w.ids))])
        n_whole = window + (len(w.ids) - 1) * stride  # tokens covered by whole windows
        assert sorted(scored.tolist()) == list(range(1, n_whole))  # each token after the first exactly once
        assert w.first_scored[0] == 0 and (w.first_scored[1:] == window - 1 - stride).all()
    disjoint = make_windows(tokens, 16)  # stride = window: each window's first token is context only
    scored = np.concatenate([disjoint.targets[i][disjoint.mask[i]] for i in range(6)])
    assert sorted(scored.tolist()) == [t for t in range(1, 96) if t % 16]
    short = make_windows(np.arange(5), 16)  # shorter than one window: one shorter window
    assert short.ids.shape == (1, 5) and short.scored_tokens == 4
    with pytest.raises(CorpusError, match="stride"):
        make_windows(tokens, 8, 9)


def test_thresholds_and_checks():
    assert parse_fraction("2%") == pytest.approx(0.02) and parse_fraction("0.5") == 0.5
    m = {"ppl_increase": 0.021, "kld_mean": 0.01, "top1": 0.95}
    assert [c["passed"] for c in checks(m, Thresholds())] == [False, True, True]
    with pytest.raises(ValueError, match="min_top1"):
        Thresholds(min_top1=1.5)


def test_corpus_builtin_and_offline_hub():
    c = read_corpus(None)
    assert c.name == "builtin" and c.text == (REPO / "nextq/assets/tiny/heldout.txt").read_text()
    if hub_reachable():
        pytest.skip("the Hub is reachable: the offline message cannot be checked here")
    with pytest.raises(CorpusError, match=r"unreachable \(offline\).*Salesforce/wikitext") as e:
        read_corpus("hf:wikitext-2")
    assert "\n" not in str(e.value)


# ---- models -------------------------------------------------------------------------------------------------------


def _with_tokenizer(path: Path) -> Path:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED / f, path / f)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random checkpoint with the embedded tokenizer's vocabulary, its IR, and a damaged IR:
    layer 2's experts fake-quantized to 2 bits and its expert 1 zeroed."""
    from nextq.convert.cli import convert

    root = tmp_path_factory.mktemp("validate")
    hf = _with_tokenizer(build_checkpoint(root / "hf", "base", vocab_size=2048, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=32))
    convert(str(hf), root / "ir")

    def damage(name: str, t: torch.Tensor) -> torch.Tensor:
        if not name.startswith("layers.2.ffn.experts."):
            return t
        return torch.zeros_like(t) if name.startswith("layers.2.ffn.experts.1.") else int2_like(t)

    Graph.load(root / "ir").save(root / "damaged", cast=damage)
    return {"root": root, "hf": hf, "ir": root / "ir", "damaged": root / "damaged"}


def int2_like(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Symmetric 2-bit fake quantization per group of `group` input channels: levels (-1.5, -0.5, 0.5, 1.5) * s."""
    g = w.float().reshape(w.shape[0], -1, group)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 1.5
    return ((torch.floor(g / s).clamp(-2, 1) + 0.5) * s).reshape(w.shape).to(w.dtype)


def _validate(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["validate", *args])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def test_identical_models_exact_and_cache_reused(tiny):
    cache, root = tiny["root"] / "cache-same", tiny["root"]
    code, out = _validate([str(tiny["ir"]), "-r", str(tiny["ir"]), *FAST, "--cache-dir", str(cache),
                           "--report", str(root / "same.json")])
    assert code == 0, out
    r = json.loads((root / "same.json").read_text())
    m = r["metrics"]
    assert m["kld_mean"] == 0.0 and m["kld_max"] == 0.0 and m["ppl_ratio"] == 1.0  # exactly: same float32 logits
    assert m["top1"] == 1.0 and m["logit_err_max"] == 0.0
    assert r["cache"]["hit"] is False and r["layers"]["per_layer"][0]["local_rel"] == 0.0
    # a second candidate against the same reference: the reference's logits come from the cache, same numbers
    code, _ = _validate([str(tiny["ir"]), "-r", str(tiny["ir"]), *FAST, "--cache-dir", str(cache),
                         "--report", str(root / "same2.json")])
    r2 = json.loads((root / "same2.json").read_text())
    assert code == 0 and r2["cache"]["hit"] is True and r2["metrics"] == m
    # existing report without --force: refused before any work
    code, out = _validate([str(tiny["ir"]), "-r", str(tiny["ir"]), *FAST, "--report", str(root / "same.json")])
    assert code == 2 and "output exists" in out


def test_ir_against_transformers_passes(tiny):
    """The torch executor vs transformers (the third-party reference) on the same windows."""
    code, out = _validate([str(tiny["ir"]), "-r", str(tiny["hf"]), *FAST, "--no-cache",
                           "--report", str(tiny["root"] / "vs-hf.json")])
    assert code == 0, out
    m = json.loads((tiny["root"] / "vs-hf.json").read_text())["metrics"]
    assert m["kld_mean"] < 1e-8  # fp32 both sides: only summation-order rounding (measured ~2e-13)
    assert m["top1"] == 1.0 and abs(m["ppl_ratio"] - 1) < 1e-5


def test_damaged_candidate_fails_and_names_the_layer(tiny):
    report = tiny["root"] / "damaged.json"
    code, out = _validate([str(tiny["damaged"]), "-r", str(tiny["ir"]), *FAST, "--no-cache",
                           "--report", str(report)])
    assert code == 1, out
    assert "FAIL" in out and "worst layer: 2" in out
    r = json.loads(report.read_text())
    assert r["passed"] is False and not validate_doc(r)
    layers = r["layers"]
    assert layers["worst_layer"] == 2
    local = [p["local_rel"] for p in layers["per_layer"]]
    assert local[0] == local[1] == 0.0 and local[3] == 0.0  # untouched layers: same weights, same input
    assert layers["per_layer"][3]["cumulative_rel"] > 0  # ... but the drift propagates
    assert {e["layer"] for e in layers["top_experts"]} == {2}
    zeroed = next(e for e in layers["top_experts"] if e["expert"] == 1)
    assert zeroed["rel_err"] == pytest.approx(1.0, abs=1e-6)  # a zeroed expert misses all of its output


def test_report_schema_plots_and_markdown(tiny):
    report = tiny["root"] / "damaged.json"
    if not report.exists():
        test_damaged_candidate_fails_and_names_the_layer(tiny)
    r = json.loads(report.read_text())
    assert validate_doc(r) == []
    # the validator catches what it claims to
    bad = json.loads(report.read_text())
    del bad["metrics"]["kld_mean"]
    bad["version"] = 99
    bad["layers"]["per_layer"][0]["mixer"] = "Conv"
    bad["metrics"]["top1"] = 1.5
    errors = "\n".join(validate_doc(bad))
    for needle in ("report.metrics.kld_mean: missing", "report.version: expected 1", "per_layer[0].mixer",
                   "report.metrics.top1: expected <= 1"):
        assert needle in errors
    # every top-level field is documented
    doc = (REPO / "docs" / "report-schema.md").read_text()
    for key in REPORT_SCHEMA["properties"]:
        assert f"`{key}`" in doc, key
    # plots: real, non-blank PNGs
    import matplotlib.image as mpimg

    for name in (r["files"]["kld_plot"], r["files"]["layers_plot"]):
        png = report.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        img = mpimg.imread(png)
        assert img.std() > 0.05  # not a blank canvas
    md = report.with_suffix(".md").read_text()
    assert "FAIL" in md and "worst layer: 2" in md


def test_topk_cache_mode_bounds_and_matches_full(tiny):
    root, runs = tiny["root"], {}
    for k in ("64", "2048", "0"):  # top 64, top k = V (nothing in the rest bucket), full logits
        code, out = _validate([str(tiny["damaged"]), "-r", str(tiny["ir"]), *FAST, "--layer-windows", "0",
                               "--cache-dir", str(root / f"c-top{k}"), "--cache-top-k", k,
                               "--report", str(root / f"top{k}.json")])
        assert code == 1, out
        runs[k] = json.loads((root / f"top{k}.json").read_text())
    t64, tv, full = runs["64"]["metrics"], runs["2048"]["metrics"], runs["0"]["metrics"]
    assert runs["64"]["cache"]["mode"] == "top64" and runs["0"]["cache"]["mode"] == "full"
    assert runs["64"]["layers"] is None
    for m in (t64, tv):
        assert m["ppl_reference"] == pytest.approx(full["ppl_reference"], rel=1e-12)  # the target NLL is stored
        assert m["top1"] == full["top1"]
    assert t64["kld_mean"] <= full["kld_mean"]  # merging the tail is a lower bound (loose here: random weights
    # spread the mass, perplexity ~ vocabulary size)
    assert tv["kld_mean"] == pytest.approx(full["kld_mean"], rel=1e-9)  # k = V: the same sum, float64 rounding


@pytest.mark.skipif(not HAS_EMBEDDED, reason="the embedded trained model (nextq/assets/tiny/model.safetensors) "
                                             "is not built yet")
def test_fp8_embedded_model_passes_default_gate(tmp_path):
    from nextq.convert.cli import convert
    from nextq.quant import quantize

    convert(str(EMBEDDED), tmp_path / "ir")

    def fp8(name: str, t: torch.Tensor):  # every linear weight; embeddings and the conv kernel are not matmuls
        linear = t.dim() == 2 and name != "embed.weight" and not name.endswith("conv.weight")
        return quantize(t, "fp8_channel") if linear else t

    Graph.load(tmp_path / "ir").save(tmp_path / "fp8", cast=fp8)
    code, out = _validate([str(tmp_path / "fp8"), "-r", str(EMBEDDED), "--max-windows", "8", "--no-cache",
                           "--report", str(tmp_path / "fp8.json")])
    assert code == 0, out
    m = json.loads((tmp_path / "fp8.json").read_text())["metrics"]
    assert m["kld_mean"] < 0.02 and m["top1"] > 0.9 and m["ppl_increase"] < 0.02  # the default gate


# ---- pipeline -----------------------------------------------------------------------------------------------------


def _pipeline(args: list[str], tmp: Path):
    return CliRunner().invoke(main, ["pipeline", *args], env={"NEXTQ_CACHE": str(tmp / "cache")})


def test_pipeline_end_to_end(tiny, tmp_path):
    out = tmp_path / "run"
    r = _pipeline([str(tiny["hf"]), "-o", str(out), "--window", "64", "--max-windows", "2",
                   "--max-new-tokens", "4"], tmp_path)
    assert r.exit_code == 0, r.output + repr(r.exception)
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["format"]: row for row in summary["rows"]}
    assert list(rows) == ["original", "ir (int4)", "gguf", "onnx"]
    for name in ("ir (int4)", "gguf", "onnx"):
        row = rows[name]
        assert row["kld_mean"] > 0 and 0 < row["top1"] <= 1 and row["tokens_per_s"] > 0
        assert row["bits_per_weight"] < rows["original"]["bits_per_weight"]  # int4 experts: smaller than fp32
    # the same numbers reach three engines: torch and ORT run the same int4 weights, llama.cpp its Q4_0 copy
    assert rows["onnx"]["kld_mean"] == pytest.approx(rows["ir (int4)"]["kld_mean"], rel=0.05)
    assert rows["gguf"]["kld_mean"] == pytest.approx(rows["ir (int4)"]["kld_mean"], rel=0.2)
    for f in ("ir", "quantized", "model.gguf", "onnx", "reports/ir.json", "reports/ir-layers.png",
              "reports/gguf.json", "reports/onnx-kld.png", "summary.md"):
        assert (out / f).exists(), f
    assert "bits/weight" in r.output and "gguf" in r.output
    # the output exists: refused without --force
    r = _pipeline([str(tiny["hf"]), "-o", str(out), "--formats", ""], tmp_path)
    assert r.exit_code == 2 and "output exists" in r.output


def test_pipeline_missing_exporter_is_an_error(tiny, tmp_path, monkeypatch):
    from nextq import pipeline

    monkeypatch.setitem(pipeline.EXPORTERS, "gguf", dataclasses.replace(pipeline.EXPORTERS["gguf"],
                                                                         writer="nextq.convert.nope:export"))
    r = _pipeline([str(tiny["hf"]), "-o", str(tmp_path / "x"), "--formats", "gguf"], tmp_path)
    assert r.exit_code == 2 and "--formats gguf: its exporter nextq.convert.nope cannot be imported" in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EMBEDDED, reason="the embedded trained model is not built yet")
def test_pipeline_no_arguments_on_embedded_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _pipeline(["--max-windows", "4", "--max-new-tokens", "8"], tmp_path)
    assert r.exit_code == 0, r.output + repr(r.exception)
    rows = json.loads((tmp_path / "nextq-pipeline" / "summary.json").read_text())["rows"]
    assert [row["format"] for row in rows] == ["original", "ir (int4)", "gguf", "onnx"]
