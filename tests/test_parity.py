"""Parity with transformers' Qwen3NextForCausalLM in fp32 (the numerical reference).

Tolerance: max |Δ| / max |logit| <= 1e-4. The two sides compute the same fp32 math in a different order
(chunked vs token-by-token delta rule, SDPA vs eager attention); observed errors are 1e-6..3e-5.
"""

import numpy as np
import pytest
import torch

import nextq
from conftest import CONFIGS, hf_logits

TOL = 1e-4


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def irs(ckpt_factory, tmp_path_factory):
    from nextq.convert.cli import convert

    out = {}
    for name in CONFIGS:
        src = ckpt_factory(name)
        ir = tmp_path_factory.mktemp(f"ir-{name}") / "ir"
        convert(str(src), ir)
        out[name] = (src, ir)
    return out


# T: decode, odd, ragged around the chunk (64), spilling past two chunks
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("batch,T", [(1, 1), (2, 7), (2, 64), (1, 131)])
def test_whole_sequence_logits_match_transformers(irs, name, batch, T):
    src, ir = irs[name]
    ids = torch.randint(0, 96, (batch, T), generator=torch.Generator().manual_seed(T))
    ref = hf_logits(src, ids).numpy()
    got = nextq.load(ir).logits(ids.numpy())
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert rel_err(got, ref) <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_matches_whole_sequence(irs, name):
    src, ir = irs[name]
    ids = torch.randint(0, 96, (2, 70), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(src, ids).numpy()
    model = nextq.load(ir)
    steps = [model.prefill(ids[:, :3].numpy())]
    steps += [model.decode(ids[:, i:i + 1].numpy()) for i in range(3, 70)]
    # each step returns the last position's logits: compare with positions 2..69 of the whole sequence
    assert rel_err(np.stack(steps, axis=1), ref[:, 2:]) <= TOL


def test_multi_token_decode_chunks(irs):
    """Decode may feed several tokens at once (chunked prefill): same logits as one whole pass."""
    src, ir = irs["base"]
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(2)).numpy()
    model = nextq.load(ir)
    full = model.logits(ids)
    model.prefill(ids[:, :11])
    last = model.decode(ids[:, 11:40])
    assert rel_err(last, full[:, -1]) <= TOL


def test_transformers_backend_is_the_reference(irs):
    """nextq.load on a Hugging Face directory gives transformers' own logits (used by validation)."""
    src, _ = irs["base"]
    ids = np.random.default_rng(0).integers(0, 96, (1, 9))
    ref = hf_logits(src, torch.from_numpy(ids)).numpy()
    got = nextq.load(src).logits(ids)
    assert np.array_equal(got, ref)  # same engine, same path: bit-identical
