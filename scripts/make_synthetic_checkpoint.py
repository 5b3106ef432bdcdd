"""Write a Qwen3-Next checkpoint with the real 80B-A3B dimensions and N layers, sharded like the Hub's.

    python scripts/make_synthetic_checkpoint.py -o synth-1 --layers 1     # about 4.6 GB of bf16

Dimensions: hidden 2048, vocab 151936, 512 experts of 512 (top-10) + a shared expert of 512, Gated DeltaNet
16 key / 32 value heads of 128 with conv kernel 4, gated attention 16 query / 2 KV heads of 256 (RoPE on 25%),
layer i full attention when (i+1) % 4 == 0. With --mtp, one MTP layer (`mtp.*`) as on the Hub.
Weights: normal with std 1/sqrt(fan_in) scaled like a trained model (embeddings 0.02), zero-centred norm weights
around 0 with std 0.05, A_log = log(U(1, 16)), dt_bias ~ U(0, 1); each shard from a generator of its own, seeded
by (--seed, shard number), so the files do not depend on --jobs (shards written at once by processes of their own:
about 3 x --shard-gb of memory each). Written shard by shard, with model.safetensors.index.json. No tokenizer is
generated: --tokenizer DIR copies the tokenizer files found in DIR (e.g. one written by scripts/qwen_tokenizer.py, the real Qwen vocabulary).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from nextq.storage import write_safetensors

REAL = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_attention_heads=16, num_key_value_heads=2,
    head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, num_experts=512, num_experts_per_tok=10,
    moe_intermediate_size=512, shared_expert_intermediate_size=512, norm_topk_prob=True, rms_norm_eps=1e-6,
    max_position_embeddings=262144, rope_theta=10000000.0, partial_rotary_factor=0.25, decoder_sparse_step=1,
    mlp_only_layers=[], hidden_act="silu", tie_word_embeddings=False, full_attention_interval=4,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "chat_template.jinja")


def layer_shapes(c: dict, prefix: str, full: bool) -> dict[str, tuple[int, ...]]:
    h = c["hidden_size"]
    out = {f"{prefix}.input_layernorm.weight": (h,), f"{prefix}.post_attention_layernorm.weight": (h,)}
    if full:
        hq, hkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        out.update({
            f"{prefix}.self_attn.q_proj.weight": (2 * hq * d, h), f"{prefix}.self_attn.k_proj.weight": (hkv * d, h),
            f"{prefix}.self_attn.v_proj.weight": (hkv * d, h), f"{prefix}.self_attn.o_proj.weight": (h, hq * d),
            f"{prefix}.self_attn.q_norm.weight": (d,), f"{prefix}.self_attn.k_norm.weight": (d,),
        })
    else:
        hk, hv, dk, dv = (c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                          c["linear_value_head_dim"])
        out.update({
            f"{prefix}.linear_attn.in_proj_qkvz.weight": (2 * hk * dk + 2 * hv * dv, h),
            f"{prefix}.linear_attn.in_proj_ba.weight": (2 * hv, h),
            f"{prefix}.linear_attn.conv1d.weight": (2 * hk * dk + hv * dv, 1, c["linear_conv_kernel_dim"]),
            f"{prefix}.linear_attn.A_log": (hv,), f"{prefix}.linear_attn.dt_bias": (hv,),
            f"{prefix}.linear_attn.norm.weight": (dv,), f"{prefix}.linear_attn.out_proj.weight": (h, hv * dv),
        })
    i, s = c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    out[f"{prefix}.mlp.gate.weight"] = (c["num_experts"], h)
    for e in range(c["num_experts"]):
        out.update({f"{prefix}.mlp.experts.{e}.gate_proj.weight": (i, h), f"{prefix}.mlp.experts.{e}.up_proj.weight": (i, h),
                    f"{prefix}.mlp.experts.{e}.down_proj.weight": (h, i)})
    out.update({f"{prefix}.mlp.shared_expert.gate_proj.weight": (s, h), f"{prefix}.mlp.shared_expert.up_proj.weight": (s, h),
                f"{prefix}.mlp.shared_expert.down_proj.weight": (h, s), f"{prefix}.mlp.shared_expert_gate.weight": (1, h)})
    return out


def all_shapes(c: dict, layers: int, mtp: bool) -> dict[str, tuple[int, ...]]:
    h, v = c["hidden_size"], c["vocab_size"]
    out = {"model.embed_tokens.weight": (v, h)}
    for li in range(layers):
        out.update(layer_shapes(c, f"model.layers.{li}", (li + 1) % c["full_attention_interval"] == 0))
    out.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    if mtp:
        out.update({"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
                    "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,)})
        out.update(layer_shapes(c, "mtp.layers.0", True))
    return out


def make_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("A_log"):
        t = torch.empty(shape).uniform_(1, 16, generator=gen).log()
    elif name.endswith("dt_bias"):
        t = torch.rand(shape, generator=gen)
    elif "norm" in name:
        t = torch.randn(shape, generator=gen) * 0.05
    elif "embed_tokens" in name:
        t = torch.randn(shape, generator=gen) * 0.02
    else:
        t = torch.randn(shape, generator=gen) * (0.5 / math.sqrt(shape[-1]))
    return t.to(torch.bfloat16)


def write_shard(out: Path, fname: str, shapes: dict[str, tuple[int, ...]], seed: int) -> int:
    """Write one shard of the tensors `shapes` from a generator seeded by `seed`; its bytes."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: make_tensor(n, shape, gen) for n, shape in shapes.items()}
    write_safetensors(out / fname, tensors, {"format": "pt"})
    return sum(t.numel() * 2 for t in tensors.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--mtp", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--jobs", type=int, default=1, help="Shards written at once, each in a process of its own.")
    ap.add_argument("--tokenizer", type=Path, help="Copy the tokenizer files of this directory in.")
    args = ap.parse_args()
    c = dict(REAL, num_hidden_layers=args.layers)
    shapes = all_shapes(c, args.layers, args.mtp)
    args.out.mkdir(parents=True, exist_ok=False)
    budget = int(args.shard_gb * (1 << 30))
    groups, cur, size = [], [], 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        if cur and size + n > budget:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    groups.append(cur)
    names = [f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
    weight_map = {n: fname for fname, group in zip(names, groups) for n in group}
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        jobs = [pool.submit(write_shard, args.out, fname, {n: shapes[n] for n in group}, args.seed * 100_003 + k)
                for k, (fname, group) in enumerate(zip(names, groups))]
        total = 0
        for fname, group, job in zip(names, groups, jobs):
            total += job.result()
            print(f"wrote {fname} ({len(group)} tensors)", flush=True)
    (args.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "num_hidden_layers": args.layers,
        "torch_dtype": "bfloat16", **{k: v for k, v in c.items() if k != "num_hidden_layers"},
    }
    if args.mtp:
        config["mtp_num_hidden_layers"] = 1
    (args.out / "config.json").write_text(json.dumps(config, indent=1))
    if args.tokenizer is not None:
        found = [f for f in TOKENIZER_FILES if (args.tokenizer / f).is_file()]
        if "tokenizer.json" not in found:
            raise SystemExit(f"error: {args.tokenizer}: no tokenizer.json")
        for f in found:
            shutil.copyfile(args.tokenizer / f, args.out / f)
    print(f"{args.out}: {args.layers} layers, {total / 1e9:.2f} GB in {len(groups)} shards")


if __name__ == "__main__":
    main()
