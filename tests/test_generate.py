"""Sampling and generation: known answers for each knob, and the CLI's streaming run."""

import numpy as np
import pytest
import torch

import nextq
from nextq.runtime.generate import Sampling, generate, next_tokens

GEN = torch.Generator().manual_seed(0)


def pick(logits, history=((0,),), **kw):
    return next_tokens(np.array(logits, dtype=np.float32), np.array(history), Sampling(**kw), GEN).tolist()


def test_greedy_and_degenerate_sampling_agree():
    logits = [[0.1, 2.0, 1.9, -1.0]]
    assert pick(logits) == [1]
    assert pick(logits, temperature=1.0, top_k=1) == [1]  # only the best survives top-k=1
    assert pick(logits, temperature=1.0, top_p=1e-6) == [1]  # the smallest nucleus is the best token


def test_repetition_and_presence_penalties():
    logits = [[0.0, 2.0, 1.9, -1.0]]
    # CTRL rule: seen token 1 with logit 2.0 becomes 2.0 / 1.1 = 1.82 < 1.9
    assert pick(logits, history=[[1]], repetition_penalty=1.1) == [2]
    # negative logits of seen tokens are multiplied (pushed further down), never lifted
    assert pick([[-0.5, -0.6]], history=[[0]], repetition_penalty=1.5) == [1]
    assert pick(logits, history=[[1]], presence_penalty=0.2) == [2]
    assert pick(logits, history=[[1]], presence_penalty=0.05) == [1]


def test_top_k_top_p_restrict_support():
    g = torch.Generator().manual_seed(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    draws = {int(next_tokens(logits, np.zeros((1, 1), int), Sampling(temperature=1, top_p=0.7), g)[0])
             for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.8: the nucleus is tokens 0 and 1
    draws = {int(next_tokens(logits, np.zeros((1, 1), int), Sampling(temperature=1, top_k=3), g)[0])
             for _ in range(300)}
    assert draws == {0, 1, 2}


def test_seeded_sampling_is_reproducible_and_bad_settings_rejected():
    logits = np.random.default_rng(0).normal(size=(2, 50)).astype(np.float32)
    a = [next_tokens(logits, np.zeros((2, 1), int), Sampling(temperature=1), torch.Generator().manual_seed(5))
         for _ in range(3)]
    b = [next_tokens(logits, np.zeros((2, 1), int), Sampling(temperature=1), torch.Generator().manual_seed(5))
         for _ in range(3)]
    assert all((x == y).all() for x, y in zip(a, b))
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(top_p=0)


class Scripted:
    """A fake model whose next token is always (last + 1) % V: checks the prefill/decode protocol."""

    def __init__(self, v=10):
        self.v, self.calls = v, []

    def _last(self, ids):
        out = np.full((ids.shape[0], self.v), -1.0, dtype=np.float32)
        out[np.arange(ids.shape[0]), (ids[:, -1] + 1) % self.v] = 1.0
        return out

    def prefill(self, ids):
        self.calls.append(("prefill", ids.shape))
        return self._last(ids)

    def decode(self, ids):
        self.calls.append(("decode", ids.shape))
        return self._last(ids)


def test_generate_protocol_and_stop_ids():
    m = Scripted()
    out = generate(m, np.array([[3], [5]]), 4)
    assert out.tolist() == [[4, 5, 6, 7], [6, 7, 8, 9]]
    assert m.calls == [("prefill", (2, 1))] + [("decode", (2, 1))] * 3
    out = generate(Scripted(), np.array([[3]]), 10, stop_ids={6})
    assert out.tolist() == [[4, 5, 6]]


def test_greedy_generation_matches_transformers(ckpt_factory, tmp_path):
    """Greedy decoding through nextq's state equals transformers' own greedy generate (same tokens)."""
    from transformers import Qwen3NextForCausalLM

    src = ckpt_factory("base")
    ids = np.array([[5, 17, 42, 8, 9]])
    ref = Qwen3NextForCausalLM.from_pretrained(src, dtype=torch.float32).generate(
        torch.from_numpy(ids), max_new_tokens=12, do_sample=False)[0, 5:].tolist()
    nextq.read(str(src)).save(tmp_path / "ir")
    assert nextq.load(tmp_path / "ir").generate(ids, 12)[0].tolist() == ref
