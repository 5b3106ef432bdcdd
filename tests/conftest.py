"""Fixtures: tiny random Qwen3-Next checkpoints built with transformers (the numerical reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# The tiny configurations parity is checked on. Each exercises something the real model has or may have.
CONFIGS: dict[str, dict] = {
    # 3:1 DeltaNet:attention, Hv = 2 Hk, MoE everywhere
    "base": dict(),
    # Hv = 4 Hk, head dims not powers of two, a dense-MLP layer through mlp_only_layers
    "odd": dict(linear_num_key_heads=1, linear_num_value_heads=4, linear_key_head_dim=12, linear_value_head_dim=20,
                head_dim=24, hidden_size=48, mlp_only_layers=[1]),
    # dense MLPs on every other layer through decoder_sparse_step, top-1 routing without renormalisation
    "sparse_step": dict(decoder_sparse_step=2, num_experts_per_tok=1, norm_topk_prob=False, num_hidden_layers=4),
    # Hv = Hk, full rotary, attention-heavy pattern, tied embeddings
    "wide": dict(linear_num_key_heads=2, linear_num_value_heads=2, partial_rotary_factor=1.0,
                 layer_types=["linear_attention", "full_attention", "full_attention", "linear_attention"],
                 num_hidden_layers=4, tie_word_embeddings=True, num_attention_heads=6, num_key_value_heads=3),
}

BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_conv_kernel_dim=4, num_experts=6, num_experts_per_tok=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=24, max_position_embeddings=512,
)


def hf_config(**overrides):
    from transformers import Qwen3NextConfig

    kw = {**BASE, **overrides}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": kw.pop("partial_rotary_factor", 0.25)}
    return Qwen3NextConfig(rope_parameters=rope, **kw)


def redraw_weights(model: torch.nn.Module) -> None:
    """Norms ~ N(0, 0.1), matrices ~ N(0, (1.2 / sqrt(K))^2), A_log / dt_bias kept: every path of a tiny random
    model contributes visibly to the logits (transformers' default std 0.02 makes it nearly linear)."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.normal_(0, 0.1)
            elif p.dim() >= 2:
                p.normal_(0, 0.3 / max(1, p.shape[-1]) ** 0.5 * 4)


def build_checkpoint(out: Path, name: str = "base", *, seed: int = 0, dtype=torch.float32, mtp: bool = False,
                     max_shard_size: str | None = None, **overrides) -> Path:
    """Save a random-weight Qwen3NextForCausalLM (transformers' own save_pretrained) into `out`.

    Weights are re-drawn with std 0.3 (norms around 0, A_log, dt_bias kept) so that every path contributes
    visibly to the logits: transformers' default init (std 0.02) makes a tiny model nearly linear.
    """
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3NextForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(**{**CONFIGS[name], **overrides})
    model = Qwen3NextForCausalLM(cfg)
    redraw_weights(model)
    model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    if mtp:
        h = cfg.hidden_size
        g = torch.Generator().manual_seed(seed + 1)
        extra = {
            "mtp.fc.weight": torch.randn(h, 2 * h, generator=g) * 0.1,
            "mtp.pre_fc_norm_embedding.weight": torch.randn(h, generator=g) * 0.1,
            "mtp.pre_fc_norm_hidden.weight": torch.randn(h, generator=g) * 0.1,
            "mtp.norm.weight": torch.randn(h, generator=g) * 0.1,
        }
        # the MTP layer is a full-attention layer with MoE: copy the last full-attention layer's weights
        src = max(i for i, t in enumerate(cfg.layer_types) if t == "full_attention")
        sd = {k: v for k, v in load_file(out / "model.safetensors").items()}
        for k, v in list(sd.items()):
            if k.startswith(f"model.layers.{src}."):
                extra["mtp.layers.0." + k[len(f"model.layers.{src}."):]] = v.clone()
        sd.update({k: v.to(dtype) for k, v in extra.items()})
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        conf = json.loads((out / "config.json").read_text())
        conf["mtp_num_hidden_layers"] = 1
        (out / "config.json").write_text(json.dumps(conf, indent=2))
    return out


def write_fixture_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json with exactly `vocab_size` ids, Qwen2 pre-tokenizer, chat template."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from nextq.pipeline import embedded_model

    tiny = embedded_model()
    tj = json.loads((tiny / "tokenizer.json").read_text())  # Qwen2-style skeleton of the embedded tokenizer
    b2u = bytes_to_unicode()
    chars = [b2u[b] for b in b"\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"()-_=+*/<>[]{}#|&%$@\\"]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    n_plain = vocab_size - len(specials)
    vocab = {c: i for i, c in enumerate(chars[: n_plain - len(merges)])}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tj["model"]["vocab"], tj["model"]["merges"] = vocab, [list(m) for m in merges]
    tj["added_tokens"] = [{"id": n_plain + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                           "normalized": False, "special": True} for i, s in enumerate(specials)]
    (out / "tokenizer.json").write_text(json.dumps(tj))
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        (out / f).write_text((tiny / f).read_text())


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' whole-sequence fp32 logits (the reference path: no cache, eager attention)."""
    from transformers import Qwen3NextForCausalLM

    model = Qwen3NextForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    cache: dict = {}

    def make(name: str = "base", **kw) -> Path:
        key = (name, tuple(sorted(kw.items(), key=lambda x: x[0])))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf-{name}")
            cache[key] = build_checkpoint(out, name, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_converter(tmp_path_factory):
    """llama.cpp's own convert_hf_to_gguf.py from the pinned llama-cpp-python sdist (scripts/llama_cpp_converter.py,
    pip download into pytest's cache dir), the anchor GGUF tests compare nextq's files with."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import llama_cpp_converter

    try:
        return llama_cpp_converter.source_root(Path(tmp_path_factory.getbasetemp()).parent / "nextq-llama-sdist")
    except RuntimeError as e:
        pytest.skip(str(e))
