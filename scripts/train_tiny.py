"""Train a tiny model of one family on the Python standard library's sources.

The result is an ordinary Hugging Face checkpoint (config.json, model.safetensors with `mtp.*` tensors,
tokenizer files). The default, the embedded tiny Qwen3-Next, goes to `nextq/assets/tiny`; it is what
`nextq pipeline` runs with no SOURCE and what every quantization-drift figure is measured on (random weights hide
quantization error). The Qwen3.5 families go to `tests/assets/<family>_tiny`: the checkpoints the Qwen3.5
pipeline tests gate on (test fixtures, not shipped in the package).

    python scripts/train_tiny.py            # 1200 steps of 16 x 128 tokens: about 15 minutes on 2 CPU cores
    python scripts/train_tiny.py --preset wide --steps 320 --seq 256 --batch 16 --vocab 4096 --seed 1 --threads 2 -o DIR
                                            # bench_quant's second model (256-wide rows, 24 experts; ~30 min)
    python scripts/train_tiny.py --family qwen3_5_moe --steps 450 --vocab 1024 --threads 1
    python scripts/train_tiny.py --family qwen3_5 --steps 500 --vocab 1024 --threads 1
                                            # the Qwen3.5 test models (9 minutes each on one core)

Corpus: the top-level `*.py` modules of the running interpreter's standard library, sorted by name; every
10th file is held out (`heldout.txt`, the validation default) and never trained on. The tokenizer is a
byte-level BPE with the family's pre-tokenizer split (Qwen2's; Qwen3.5's keeps combining marks with their
letters), trained on the training split only.
The model is transformers' own class of the family (the numerical reference): `Qwen3NextForCausalLM`, or, as the
Hub ships Qwen3.5, `Qwen3_5MoeForConditionalGeneration` / `Qwen3_5ForConditionalGeneration` with a tiny random
vision tower (its language model under `model.language_model.*`, config under `text_config`; only the language
model is trained). Plus an MTP head in the Hub layout (`mtp.fc`, `mtp.pre_fc_norm_{embedding,hidden}`,
`mtp.layers.0.*`, `mtp.norm`, its layer the family's full-attention decoder layer) trained to predict token t+2
from the final-normed hidden state at t and the embedding of token t+1.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def stdlib_corpus() -> tuple[list[str], list[str]]:
    """Return (train, heldout) texts: top-level stdlib modules sorted by name, every 10th held out."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    train = [t for i, t in enumerate(texts) if i % 10 != 5]
    heldout = [t for i, t in enumerate(texts) if i % 10 == 5]
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int, out: Path, split: str):
    """Byte-level BPE with the pre-tokenizer `split` (a regex); saves tokenizer.json + tokenizer_config.json into
    `out`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


# Model shapes per preset. "tiny" is the embedded model; "wide" is the second benchmark model of
# scripts/bench_quant.py: every matrix row (hidden, expert, attention and DeltaNet output widths) 256 wide, so
# llama.cpp's K-quants (256-element super-blocks) apply instead of falling back, and 24 experts top-4.
# "tiny35_moe" / "tiny35" are the Qwen3.5 test models: 4 layers (3 DeltaNet : 1 attention), Hv = 2 Hk (llama.cpp's
# value-head reordering applies), 8 experts top-2 (MoE) or a 256-wide MLP (dense), every width a multiple of 32 (the
# default int4 g32 recipe applies to every expert); about 4 MB (MoE) / 2.5 MB (dense) in bf16.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, linear_key_head_dim=32, linear_value_head_dim=32,
                 linear_num_key_heads=2, linear_num_value_heads=4, num_experts=16, num_experts_per_tok=4,
                 moe_intermediate_size=64, shared_expert_intermediate_size=128),
    "wide": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
                 linear_num_key_heads=2, linear_num_value_heads=4, num_experts=24, num_experts_per_tok=4,
                 moe_intermediate_size=256, shared_expert_intermediate_size=256),
    "tiny35_moe": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=64, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
                       linear_num_value_heads=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=64),
    "tiny35": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, linear_key_head_dim=32, linear_value_head_dim=32,
                   linear_num_key_heads=2, linear_num_value_heads=4),
}
# Qwen3.5's M-RoPE sections for the presets' 8 rotary pairs (head_dim 64 x partial 0.25 / 2), in the proportions
# of the Hub's [11, 11, 10] over 32 pairs; on text positions all three axes agree, so it trains as 1-D RoPE.
TINY_MROPE = {"mrope_section": [3, 3, 2], "mrope_interleaved": True}
# A vision tower as small as transformers builds (its merger's output is the text hidden size); random, not trained:
# nextq drops it, it is there so that the checkpoint has the Hub's vision-language layout.
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                   num_position_embeddings=16)


@dataclass(frozen=True)
class Family:
    """What differs between the families this script trains: transformers' modeling module and classes, the
    pre-tokenizer (llama.cpp's name, see nextq.convert.gguf_export.PRETOKENIZERS), the default preset and output,
    and whether the checkpoint is the vision-language class (config nested under `text_config`)."""

    module: str  # transformers.models.<module>.modeling_<module>
    config: str  # the checkpoint's config class
    model: str  # the checkpoint's model class
    layer: str  # the decoder layer (the MTP head's layer)
    norm: str  # the zero-centred RMSNorm
    pretokenizer: str
    preset: str
    out: Path
    rope: dict = field(default_factory=dict)  # extra rope_parameters
    vision: bool = False

    def classes(self):
        """(config class, model class, modeling module)."""
        import importlib

        import transformers

        return (getattr(transformers, self.config), getattr(transformers, self.model),
                importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}"))


FAMILIES: dict[str, Family] = {
    "qwen3_next": Family("qwen3_next", "Qwen3NextConfig", "Qwen3NextForCausalLM", "Qwen3NextDecoderLayer",
                         "Qwen3NextRMSNorm", "qwen2", "tiny", ROOT / "nextq" / "assets" / "tiny"),
    "qwen3_5_moe": Family("qwen3_5_moe", "Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration",
                          "Qwen3_5MoeDecoderLayer", "Qwen3_5MoeRMSNorm", "qwen35", "tiny35_moe",
                          ROOT / "tests" / "assets" / "qwen3_5_moe_tiny", TINY_MROPE, vision=True),
    "qwen3_5": Family("qwen3_5", "Qwen3_5Config", "Qwen3_5ForConditionalGeneration", "Qwen3_5DecoderLayer",
                      "Qwen3_5RMSNorm", "qwen35", "tiny35", ROOT / "tests" / "assets" / "qwen3_5_tiny", TINY_MROPE,
                      vision=True),
}


def text_config(config):
    """The language model's config (a vision-language config nests it under `text_config`)."""
    return getattr(config, "text_config", config)


def text_model(model):
    """The language model: `model.model` of a causal LM, `model.model.language_model` of a vision-language one."""
    return getattr(model.model, "language_model", model.model)


def tiny_config(family: Family, vocab_size: int, tokenizer, preset: str):
    """The family's config with the preset's shapes; a vision-language family nests them under `text_config`
    beside TINY_VISION."""
    config_cls, _, _ = family.classes()
    text = dict(
        vocab_size=vocab_size,
        **PRESETS[preset],
        linear_conv_kernel_dim=4,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25, **family.rope},
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=False,
        mtp_num_hidden_layers=1,
    )
    if not family.vision:
        return config_cls(**text)
    vision = {**TINY_VISION, "out_hidden_size": text["hidden_size"]}
    return config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False)


class MTPHead(torch.nn.Module):
    """The family's multi-token-prediction head in the Hub layout (keys under `mtp.`); `config` is the language
    model's."""

    def __init__(self, family: Family, config):
        super().__init__()
        _, _, modeling = family.classes()
        layer_cls, norm_cls = getattr(modeling, family.layer), getattr(modeling, family.norm)

        layer_cfg = type(config)(**{**config.to_dict(), "layer_types": ["full_attention"], "num_hidden_layers": 1})
        layer_cfg._attn_implementation = config._attn_implementation or "sdpa"
        layer_cfg._experts_implementation = getattr(config, "_experts_implementation", None) or "grouped_mm"
        h = config.hidden_size
        self.fc = torch.nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = norm_cls(h, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = norm_cls(h, eps=config.rms_norm_eps)
        self.layers = torch.nn.ModuleList([layer_cls(layer_cfg, 0)])
        self.norm = norm_cls(h, eps=config.rms_norm_eps)
        std = config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=std)
            elif "norm" in name:
                torch.nn.init.zeros_(p)

    def forward(self, embeds, hidden, position_embeddings, mask):
        """embeds: embedding of token t+1 [B, T, H]; hidden: final-normed hidden at t [B, T, H]."""
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        for layer in self.layers:
            x = layer(x, position_embeddings=position_embeddings, attention_mask=mask)
        return self.norm(x)


def use_nextq_delta_rule(family: Family):
    """Train through nextq's chunked delta rule (one triangular solve per chunk) instead of transformers'
    pure-torch fallback, whose 63-step Python loop per chunk dominates a CPU training step. Same math: the
    parity tests hold the two implementations to 1e-4 of each other."""
    from nextq.runtime.ops import gated_delta_rule_chunked

    _, _, hf = family.classes()

    def chunked(query, key, value, g, beta, initial_state=None, output_final_state=False, **_):
        b, _, _, dk = key.shape
        state = initial_state if initial_state is not None else key.new_zeros(b, value.shape[2], dk, value.shape[3])
        out, final = gated_delta_rule_chunked(query, key, value, g, beta, state.float())
        return out, (final if output_final_state else None)

    hf.torch_chunk_gated_delta_rule = chunked


def batches(ids: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        yield torch.stack([ids[s : s + seq + 1] for s in starts.tolist()])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=list(FAMILIES), default="qwen3_next",
                    help="the model family: qwen3_next = the embedded model; qwen3_5_moe / qwen3_5 = the Qwen3.5 "
                         "test models (vision-language classes, as on the Hub)")
    ap.add_argument("-o", "--out", help="output directory (default: the family's, see the module docstring)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mtp-weight", type=float, default=0.3)
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="model shapes (default: the family's): tiny = the embedded model, wide = bench_quant's "
                         "256-wide second model, tiny35_moe / tiny35 = the Qwen3.5 test models")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    args = ap.parse_args()

    from transformers.masking_utils import create_causal_mask

    from nextq.convert.gguf_export import PRETOKENIZERS

    family = FAMILIES[args.family]
    preset = args.preset or family.preset
    use_nextq_delta_rule(family)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else family.out
    out.mkdir(parents=True, exist_ok=True)
    train_texts, heldout_texts = stdlib_corpus()
    tokenizer = train_tokenizer(train_texts, args.vocab, out, PRETOKENIZERS[family.pretokenizer])
    (out / "heldout.txt").write_text("\n".join(heldout_texts)[:200_000], encoding="utf-8")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = []
    for t in train_texts:
        ids.extend(tokenizer(t)["input_ids"] + [eos])
    ids = torch.tensor(ids)
    held = torch.tensor(tokenizer("\n".join(heldout_texts)[:200_000])["input_ids"])
    print(f"train tokens {len(ids)}, heldout tokens {len(held)}", flush=True)

    config = tiny_config(family, args.vocab, tokenizer, preset)
    model = family.classes()[1](config)
    lm, text_cfg = text_model(model), text_config(config)
    mtp = MTPHead(family, text_cfg)
    # the language model, its head and the MTP head (a vision tower stays as initialised)
    params = list(lm.parameters()) + list(model.lm_head.parameters()) + list(mtp.parameters())
    print(f"parameters: {sum(p.numel() for p in params) / 1e6:.2f} M", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(ids, args.seq, args.batch, gen)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        x = next(data)
        inp, tgt = x[:, :-1], x[:, 1:]
        outputs = lm(input_ids=inp)
        hidden = outputs.last_hidden_state  # final-normed [B, T, H]
        logits = model.lm_head(hidden)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        # MTP: from hidden at t and embedding of token t+1, predict token t+2.
        emb = lm.embed_tokens(inp[:, 1:])
        pos = torch.arange(emb.shape[1])[None].expand(emb.shape[0], -1)
        pe = lm.rotary_emb(emb, pos)
        mask = create_causal_mask(
            config=text_cfg, inputs_embeds=emb, attention_mask=None, past_key_values=None, position_ids=pos
        )
        mtp_hidden = mtp(emb, hidden[:, :-1], pe, mask)
        mtp_logits = model.lm_head(mtp_hidden)
        mtp_loss = F.cross_entropy(mtp_logits.reshape(-1, mtp_logits.shape[-1]), tgt[:, 1:].reshape(-1))
        total = loss + args.mtp_weight * mtp_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t0
            print(
                f"step {step:5d}  loss {loss.item():.3f}  mtp {mtp_loss.item():.3f}  "
                f"{el:.0f}s elapsed, eta {el / (step + 1) * (args.steps - step - 1):.0f}s",
                flush=True,
            )

    model.eval()
    with torch.no_grad():
        nll, n = 0.0, 0
        for s in range(0, len(held) - 1, 512):
            chunk = held[s : s + 513][None]
            if chunk.shape[1] < 2:
                break
            lg = model(input_ids=chunk[:, :-1]).logits
            nll += F.cross_entropy(lg[0], chunk[0, 1:], reduction="sum").item()
            n += chunk.shape[1] - 1
    ppl = math.exp(nll / n)
    print(f"held-out perplexity {ppl:.3f} over {n} tokens (non-overlapping windows of 512)", flush=True)

    model.config.dtype = "bfloat16"
    model.to(torch.bfloat16).save_pretrained(out)
    weights = load_file(out / "model.safetensors")
    for k, v in mtp.state_dict().items():
        weights[f"mtp.{k}"] = v.to(torch.bfloat16).contiguous()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "training.json").write_text(
        json.dumps(
            {
                "command": "python scripts/train_tiny.py " + " ".join(sys.argv[1:]),
                "family": args.family,
                "architecture": family.model,
                "corpus": "top-level *.py of the Python standard library, every 10th file held out",
                "steps": args.steps,
                "seq": args.seq,
                "batch": args.batch,
                "lr": args.lr,
                "seed": args.seed,
                "preset": preset,
                "heldout_ppl_fp32": ppl,
                "heldout_tokens": n,
                "final_train_loss": loss.item(),
                "final_mtp_loss": mtp_loss.item(),
                "seconds": time.time() - t0,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
