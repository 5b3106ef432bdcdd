"""The Hugging Face reader and the IR directory: identical IRs from any sharding, exact round trips, clear errors
on bad input with nothing left behind."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import nextq
from nextq.cli import main
from nextq.graph import Graph


def ir_contents(ir: Path) -> dict[str, torch.Tensor]:
    g = Graph.load(ir)
    return {k: g.get(k) for k in g.tensors}


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_sharded_and_single_file_convert_to_identical_irs(ckpt_factory, tmp_path):
    single = ckpt_factory("base", dtype=torch.bfloat16, mtp=True)
    sharded = tmp_path / "sharded"
    # re-shard the same weights the Hub way: several files + model.safetensors.index.json
    weights = load_file(single / "model.safetensors")
    shutil.copytree(single, sharded, ignore=shutil.ignore_patterns("model.safetensors"))
    keys = sorted(weights)
    parts = [keys[i::3] for i in range(3)]
    weight_map = {}
    for n, part in enumerate(parts, 1):
        fname = f"model-{n:05d}-of-00003.safetensors"
        save_file({k: weights[k] for k in part}, sharded / fname)
        weight_map.update({k: fname for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("convert", single, "-o", a).exit_code == 0
    assert run_cli("convert", sharded, "-o", b).exit_code == 0
    ta, tb = ir_contents(a), ir_contents(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == torch.bfloat16 and torch.equal(ta[k], tb[k]), k
    ga = json.loads((a / "graph.json").read_text())
    assert ga["config"]["mtp_num_hidden_layers"] == 1 and "mtp.fc.weight" in ga["tensors"]
    assert ga["tensors"]["layers.0.input_norm.weight"]["norm_offset"] == 1.0
    assert ga["tensors"]["layers.0.mixer.norm.weight"]["norm_offset"] == 0.0
    assert set(ga["provenance"]["shards"]) == {"model.safetensors"}
    assert len(ga["provenance"]["shards"]["model.safetensors"]) == 64  # sha256 hex


def test_canonical_split_is_the_hub_layout_regrouped(ckpt_factory, tmp_path):
    """Flat q/k/v/z/b/a and q/gate reassemble into the grouped HF tensors exactly (no data invented or lost)."""
    src = ckpt_factory("odd")  # Hk=1, Hv=4: the grouped layout is one group of 4 value heads
    g = nextq.read(str(src))
    w = load_file(src / "model.safetensors")
    c = g.config
    hk, r = c.linear_num_key_heads, c.linear_num_value_heads // c.linear_num_key_heads
    parts = [g.get(f"layers.0.mixer.{n}.weight").reshape(hk, -1, c.hidden_size) for n in "qkvz"]
    assert torch.equal(torch.cat(parts, 1).reshape(-1, c.hidden_size), w["model.layers.0.linear_attn.in_proj_qkvz.weight"])
    ba = [g.get(f"layers.0.mixer.{n}.weight").reshape(hk, r, -1) for n in "ba"]
    assert torch.equal(torch.cat(ba, 1).reshape(-1, c.hidden_size), w["model.layers.0.linear_attn.in_proj_ba.weight"])
    attn = max(i for i, t in enumerate(c.layer_types) if t == "full_attention")
    qg = [g.get(f"layers.{attn}.mixer.{n}.weight").reshape(c.num_attention_heads, c.head_dim, -1) for n in ("q", "gate")]
    assert torch.equal(torch.cat(qg, 1).reshape(-1, c.hidden_size), w[f"model.layers.{attn}.self_attn.q_proj.weight"])


def test_ir_save_load_run_is_exact(ckpt_factory, tmp_path):
    src = ckpt_factory("base")
    ir1, ir2 = tmp_path / "ir1", tmp_path / "ir2"
    nextq.read(str(src)).save(ir1)
    Graph.load(ir1).save(ir2)
    t1, t2 = ir_contents(ir1), ir_contents(ir2)
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    ids = np.random.default_rng(0).integers(0, 96, (2, 11))
    assert np.array_equal(nextq.load(ir1).logits(ids), nextq.load(ir2).logits(ids))


def test_dtype_option_casts_floats(ckpt_factory, tmp_path):
    src = ckpt_factory("base")
    out = tmp_path / "bf16"
    assert run_cli("convert", src, "-o", out, "--dtype", "bfloat16").exit_code == 0
    assert {t.dtype for t in ir_contents(out).values()} == {torch.bfloat16}


# ---- bad input: one clear line, non-zero exit, no output left behind -----------------------------------------


def corrupt(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    if how == "truncated":
        f.write_bytes(f.read_bytes()[:-1000])
        return dst
    if how == "unknown_arch":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["architectures"] = ["LlamaForCausalLM"]
        (dst / "config.json").write_text(json.dumps(cfg))
        return dst
    w = load_file(f)
    if how == "missing":
        del w["model.layers.1.linear_attn.A_log"]
    elif how == "extra":
        w["model.layers.0.mlp.bogus.weight"] = torch.zeros(2)
    elif how == "shape":
        w["model.layers.3.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(w, f)
    return dst


@pytest.mark.parametrize("how,expect", [
    ("missing", "missing tensors (1): layers.1.mixer.A_log"),
    ("extra", "unknown tensors in checkpoint (1): model.layers.0.mlp.bogus.weight"),
    ("shape", "layers.3.mixer.k.weight: expected [32, 32], got [8, 32]"),
    ("unknown_arch", "architecture 'LlamaForCausalLM' is not supported; supported: ['Qwen3NextForCausalLM', "),
    ("truncated", "truncated"),
])
def test_bad_checkpoints_fail_cleanly(ckpt_factory, tmp_path, how, expect):
    src = corrupt(ckpt_factory("base"), tmp_path / "src", how)
    out = tmp_path / "out"
    res = run_cli("convert", src, "-o", out)
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], res.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]  # no temp dir either


def test_existing_output_needs_force(ckpt_factory, tmp_path):
    src = ckpt_factory("base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_cli("convert", src, "-o", out)
    assert res.exit_code != 0 and res.output.strip() == f"error: {out}: output exists (pass --force to overwrite)"
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("convert", src, "-o", out, "--force").exit_code == 0
    assert (out / "graph.json").is_file() and not (out / "keep.txt").exists()


def test_missing_source_and_bad_repo_id(tmp_path):
    res = run_cli("convert", tmp_path / "nope", "-o", tmp_path / "o")
    assert res.exit_code != 0 and "no such directory, and not a Hub repo id" in res.output


def test_hub_repo_id_goes_through_huggingface_hub(monkeypatch, ckpt_factory, tmp_path):
    """A repo id is fetched with snapshot_download (only the needed files, the asked revision)."""
    import huggingface_hub

    src = ckpt_factory("base")
    calls = {}

    def fake_snapshot(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        snap = tmp_path / "snapshots" / "0123abcd"
        shutil.copytree(src, snap)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    out = tmp_path / "ir"
    assert run_cli("convert", "Qwen/Qwen3-Next-tiny", "--revision", "v1", "-o", out).exit_code == 0
    assert calls["repo_id"] == "Qwen/Qwen3-Next-tiny" and calls["revision"] == "v1"
    assert "*.safetensors" in calls["allow_patterns"] and "*.bin" not in calls["allow_patterns"]
    prov = json.loads((out / "graph.json").read_text())["provenance"]
    assert prov["source"] == "Qwen/Qwen3-Next-tiny" and prov["revision"] == "0123abcd"
