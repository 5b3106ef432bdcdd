"""The embedded trained model: it converts, runs like transformers, keeps its recorded quality, and its MTP head
has learnt something (the drift figures elsewhere are measured on it)."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import nextq
from nextq.cli import main
from nextq.pipeline import embedded_model
from nextq.runtime.model import TorchModel
from nextq.validate.metrics import nll, top1_agreement

TINY = embedded_model()


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "ir"
    nextq.read(str(TINY)).save(out)
    return out


@pytest.fixture(scope="module")
def heldout_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    ids = tok((TINY / "heldout.txt").read_text())["input_ids"]
    windows = np.array(ids[: len(ids) // 256 * 256]).reshape(-1, 256)
    return windows[np.linspace(0, len(windows) - 1, 16).astype(int)]  # spread over the whole held-out text


def test_embedded_model_is_a_small_trained_qwen3_next():
    cfg = json.loads((TINY / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3NextForCausalLM"] and cfg["num_hidden_layers"] == 8
    assert cfg["layer_types"].count("full_attention") == 2 and cfg["num_experts"] == 16
    assert sum(p.stat().st_size for p in TINY.iterdir()) < 20e6  # a few MB, shipped in the package
    g = nextq.read(str(TINY))
    assert g.config.mtp_num_hidden_layers == 1 and "mtp.layers.0.ffn.experts.3.up.weight" in g.tensors


def test_torch_runtime_matches_transformers_and_recorded_perplexity(ir, heldout_ids):
    ref = nextq.load(TINY).logits(heldout_ids[:2])
    got = nextq.load(ir).logits(heldout_ids[:2])
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4  # fp32 on both sides, see test_parity
    # the training script's measurement, repeated: every held-out token, non-overlapping windows of 512
    model = nextq.load(ir)
    ids = model.tokenizer((TINY / "heldout.txt").read_text())["input_ids"]
    windows = [np.array([ids[s:s + 513]]) for s in range(0, len(ids) - 1, 512)]
    ppl = math.exp(np.concatenate([nll(model.logits(w[:, :-1])[0], w[0, 1:]) for w in windows]).mean())
    recorded = json.loads((TINY / "training.json").read_text())["heldout_ppl_fp32"]
    # recorded with the fp32 weights before the bf16 save: bf16 rounding of the weights moves it by ~1-3 %
    assert abs(ppl / recorded - 1) < 0.05
    assert ppl < 60  # far below the vocabulary's 2048: the model has learnt Python


def test_bf16_runtime_close_to_fp32(ir, heldout_ids):
    """bf16 weights and activations over 8 layers: top-1 agreement stays high on a trained model."""
    ref = nextq.load(ir).logits(heldout_ids)
    got = nextq.load(ir, dtype="bfloat16").logits(heldout_ids)
    assert top1_agreement(ref, got) >= 0.95  # bf16 keeps 8 mantissa bits; only near-ties flip


def test_mtp_head_predicts_two_ahead(ir, heldout_ids):
    """The MTP head (trained on t+2) beats a bigram-free baseline: its t+2 accuracy is far above chance and its
    NLL for t+2 is lower than the main head's prediction of t+1 reused for t+2."""
    g = nextq.read(str(ir))
    m = TorchModel(g)
    ids = torch.from_numpy(heldout_ids)
    hidden = m.hidden(ids, m.new_state())
    mtp = m.mtp_logits(hidden[:, :-1], ids[:, 1:]).numpy()  # predicts ids[:, 2:]
    target = heldout_ids[:, 2:]
    mtp_nll = nll(mtp[:, :-1], target).mean()
    main = m.head(hidden).numpy()
    main_nll = nll(main[:, :-2], target).mean()  # the next-token head asked for t+2
    acc = (mtp[:, :-1].argmax(-1) == target).mean()
    assert acc > 0.2 and mtp_nll < main_nll


def test_pipeline_runs_on_the_embedded_model(tmp_path):
    res = CliRunner().invoke(main, ["pipeline", "-o", str(tmp_path / "out"), "--formats", "gguf,onnx,hf"],
                             env={"NEXTQ_CACHE": str(tmp_path / "c")})
    assert res.exit_code == 0, res.output
    rows = {r["format"]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())["rows"]}
    # the README's table: int4 experts on the trained model pass the default gate in every format; the hf
    # artifact (compressed-tensors) is validated through transformers
    assert all(rows[f]["kld_mean"] < 0.02 and rows[f]["top1"] > 0.9 for f in ("ir (int4)", "gguf", "onnx", "hf"))
    assert rows["hf"]["backend"] == "transformers"
