"""Benchmark nextq's GPU runtime against transformers (+ flash-linear-attention) at Qwen3-Next-80B layer dimensions.

    python scripts/bench_gpu.py --layers 4 [--full] [--json out.json]

Builds the model with `--layers` layers (3 DeltaNet : 1 attention) and random weights generated on the device,
in three variants measured in the same run: transformers' Qwen3NextForCausalLM in bf16 (FLA kernels when
installed), nextq with int4_sym_g32 routed experts, nextq with fp8_block128 routed experts (everything else bf16
in all three). transformers' decode is timed two ways, a loop over forward() with its cache and generate(), and
the faster counts. Measures prefill latency at T = 512, 4096, 32768 (batch 1, last-position logits) and greedy decode
tokens/s at batch 1 and 8 (after a 512-token prompt), plus the decode roofline at batch 1: bytes a token must read
from HBM (all weights it touches, the top-k experts, recurrent state read + write, KV cache) over the measured
device-to-device copy bandwidth. `--full` then builds the 48-layer model with int4 experts alone and reports its
decode tokens/s and memory. Prints one table with ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time

import torch

from nextq.graph import ModelConfig, expected_tensors

PREFILL_T = (512, 4096, 32768)
DECODE_B = (1, 8)
PROMPT = 512
DECODE_STEPS = 128


def qwen3_next_80b(layers: int) -> ModelConfig:
    """Qwen3-Next-80B-A3B dimensions with `layers` layers (every 4th full attention)."""
    types = tuple("full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers))
    return ModelConfig(vocab_size=151936, hidden_size=2048, num_hidden_layers=layers, layer_types=types,
                       num_attention_heads=16, num_key_value_heads=2, head_dim=256, rope_theta=10_000_000.0,
                       partial_rotary_factor=0.25, max_position_embeddings=262144, linear_num_key_heads=16,
                       linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                       linear_conv_kernel_dim=4, intermediate_size=5120, num_experts=512, num_experts_per_tok=10,
                       moe_intermediate_size=512, shared_expert_intermediate_size=512, norm_topk_prob=True,
                       rms_norm_eps=1e-6)


def gib(n: float) -> float:
    return n / 2 ** 30


# ---- measurement helpers ---------------------------------------------------------------------------------------


def time_cuda(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over reps runs (CUDA events), after warmup runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (4 GiB buffers)."""
    n = 2 ** 31
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), reps=10, warmup=3)
    del src, dst
    return 2 * n / (ms / 1e3)


def guarded(fn):
    """Run fn(); an out-of-memory error becomes the string 'OOM' (reported, not fatal)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return "OOM"


# ---- nextq -----------------------------------------------------------------------------------------------------


def random_source(config: ModelConfig, experts: str, seed: int = 0):
    """A TensorSource for GpuModel: random bf16 weights (std 1/sqrt(fan_in)) made on the device, experts stacked and
    stored as random int4_sym_g32 codes + fp16 scales, or fp8 e4m3 codes + fp32 128x128 tile scales."""
    from nextq.runtime.triton.moe_fp8 import float_experts
    from nextq.runtime.triton.moe_int4 import int4_experts

    specs = expected_tensors(config)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size

    def stacked(n: int, k: int):
        if experts == "int4":
            codes = torch.randint(0, 256, (e, n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
            scales = torch.full((e, n, k // 32), 2.0 / 8 / math.sqrt(k), device="cuda", dtype=torch.float16)
            return int4_experts(codes, scales)
        codes = torch.randn(e, n, k, generator=gen, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        scales = torch.full((e, -(-n // 128), -(-k // 128)), 1 / math.sqrt(k), device="cuda")
        return float_experts(codes, scales)

    def get(name: str):
        if ".experts." in name:
            part = name.rsplit(".", 1)[1]
            return stacked(h, i) if part == "down" else stacked(i, h)
        spec = specs[name]
        if spec.norm_offset is not None:
            return torch.randn(spec.shape, generator=gen, device="cuda") * 0.05 + (1 - spec.norm_offset)
        if name.endswith("A_log"):
            return torch.rand(spec.shape, generator=gen, device="cuda") * 2
        if name.endswith("dt_bias"):
            return torch.randn(spec.shape, generator=gen, device="cuda") * 0.5
        fan_in = spec.shape[-1]
        return torch.randn(spec.shape, generator=gen, device="cuda", dtype=torch.bfloat16) / math.sqrt(fan_in)

    return get


def decode_bytes(model, context: int) -> int:
    """HBM bytes one batch-1 decode token must move: every non-expert weight, top-k experts per MoE layer,
    recurrent + conv state read and written, the KV cache read (and one row written), one embedding row."""
    c = model.config
    total = model.lm_head.numel() * model.lm_head.element_size() + c.hidden_size * model.embed.element_size()
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    for lw, st in zip(model.layers, model.cache):
        total += sum(nb(t) for t in (lw.input_norm, lw.post_norm, lw.w_in, lw.out, *lw.mixer.values()))
        for name, w in lw.ffn.items():
            if name in ("gate", "up", "down"):
                total += w.nbytes * c.num_experts_per_tok // c.num_experts
            else:
                total += w.nbytes if name == "shared" else nb(w)  # SharedExpert: its two matrices
        if lw.kind == "deltanet":
            total += 2 * (nb(st["rec"][:1]) + nb(st["conv"][:1]))
        else:
            total += 2 * c.num_key_value_heads * c.head_dim * st["k"].element_size() * (context + 1)
    return total


def profile(model, path: str) -> None:
    """Kernel time per name (torch.profiler) for 5 eager decode steps at batch 1 and one 4096-token prefill."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    ids = torch.randint(0, model.config.vocab_size, (1, 4096), device="cuda")
    model.prefill(ids[:, :PROMPT])
    with open(path, "a") as f:
        for what, fn in (("decode x5 (eager)", lambda: [model._step(1, 1024, True) for _ in range(5)]),
                         ("prefill 4096", lambda: model.prefill(ids))):
            fn()
            torch.cuda.synchronize()
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                fn()
                torch.cuda.synchronize()
            f.write(f"== {what}\n{p.key_averages().table(sort_by='cuda_time_total', row_limit=30)}\n")


def bench_nextq(config: ModelConfig, experts: str, prefill_t, decode_b, max_seq: int, profile_path=None) -> dict:
    from nextq.runtime.gpu import GpuModel

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = GpuModel(config, random_source(config, experts), max_batch=max(decode_b), max_seq=max_seq)
    torch.cuda.synchronize()
    res: dict = {"build_s": time.time() - t0, "weights_gib": gib(torch.cuda.memory_allocated())}
    gen = torch.Generator(device="cuda").manual_seed(1)
    for t in prefill_t:
        ids = torch.randint(0, config.vocab_size, (1, t), generator=gen, device="cuda")
        res[f"prefill_{t}_ms"] = guarded(lambda: time_cuda(lambda: model.prefill(ids), reps=3 if t > 4096 else 5))
    for b in decode_b:
        ids = torch.randint(0, config.vocab_size, (b, PROMPT), generator=gen, device="cuda")

        def run():
            first = model.prefill(ids).argmax(-1, keepdim=True)
            model.generate_greedy(8, first=first)  # captures the graphs of this span (warm-up)
            torch.cuda.synchronize()
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            toks = model.generate_greedy(DECODE_STEPS)
            e.record()
            e.synchronize()
            assert toks.shape == (b, DECODE_STEPS)
            return a.elapsed_time(e)

        ms = guarded(run)
        res[f"decode_b{b}_tok_s"] = ms if isinstance(ms, str) else b * DECODE_STEPS / (ms / 1e3)
        if b == 1 and not isinstance(ms, str):
            res["decode_b1_ms_per_token"] = ms / DECODE_STEPS
            res["decode_bytes_per_token"] = decode_bytes(model, PROMPT + DECODE_STEPS // 2)
    res["peak_gib"] = gib(torch.cuda.max_memory_allocated())
    if profile_path:
        profile(model, profile_path)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


# ---- transformers + FLA ------------------------------------------------------------------------------------------


def hf_config(config: ModelConfig):
    from transformers import Qwen3NextConfig

    c = config
    return Qwen3NextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        layer_types=list(c.layer_types), num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta,
                         "partial_rotary_factor": c.partial_rotary_factor},
        linear_num_key_heads=c.linear_num_key_heads, linear_num_value_heads=c.linear_num_value_heads,
        linear_key_head_dim=c.linear_key_head_dim, linear_value_head_dim=c.linear_value_head_dim,
        linear_conv_kernel_dim=c.linear_conv_kernel_dim, intermediate_size=c.intermediate_size,
        num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_intermediate_size, shared_expert_intermediate_size=c.shared_expert_intermediate_size,
        norm_topk_prob=c.norm_topk_prob, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
    )


def bench_transformers(config: ModelConfig, prefill_t, decode_b, profile_path=None) -> dict:
    import transformers
    from transformers import Qwen3NextForCausalLM
    from transformers.utils.import_utils import is_flash_linear_attention_available

    res: dict = {"transformers": transformers.__version__, "fla": bool(is_flash_linear_attention_available())}
    try:
        import fla

        res["fla_version"] = getattr(fla, "__version__", "?")
    except ImportError:
        pass
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    t0 = time.time()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen3NextForCausalLM(hf_config(config)).eval()
    finally:
        torch.set_default_dtype(old)
    # what from_pretrained would pick (grouped_mm where torch supports it); a bare constructor leaves None (eager loop)
    model.config._experts_implementation = model.get_correct_experts_implementation(None)
    res["experts_implementation"] = model.config._experts_implementation
    torch.cuda.synchronize()
    res["build_s"] = time.time() - t0
    res["params_b"] = sum(p.numel() for p in model.parameters()) / 1e9
    mixer = model.model.layers[0].linear_attn
    res["gdr_kernel"] = getattr(getattr(mixer, "chunk_gated_delta_rule", None), "__module__", "?")
    gen = torch.Generator(device="cuda").manual_seed(1)

    @torch.no_grad()
    def forward(ids, cache=None):
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

    for t in prefill_t:
        ids = torch.randint(0, config.vocab_size, (1, t), generator=gen, device="cuda")
        res[f"prefill_{t}_ms"] = guarded(lambda: time_cuda(lambda: forward(ids), reps=3 if t > 4096 else 5))
    steps, warm = 64, 16  # warm-up: the first steps after a prefill run several times slower (seen on an H100)
    for b in decode_b:
        ids = torch.randint(0, config.vocab_size, (b, PROMPT), generator=gen, device="cuda")

        def run():  # our own loop over forward() with the DynamicCache
            out = forward(ids)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(warm):
                out = forward(nxt, cache)
                nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(steps):
                out = forward(nxt, cache)
                nxt = out.logits[:, -1:].argmax(-1)
            e.record()
            e.synchronize()
            return a.elapsed_time(e)

        def generate(n: int) -> float:  # what users call: wall ms of generate() with n new tokens
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e3

        def generate_steps() -> float:  # ms of `steps` decode steps: 1 + steps new tokens minus 1 (the prefill)
            generate(1 + warm)  # warm-up
            return generate(1 + steps) - generate(1)

        ms = guarded(run)
        res[f"decode_b{b}_loop_tok_s"] = ms if isinstance(ms, str) else b * steps / (ms / 1e3)
        gms = guarded(generate_steps)
        res[f"decode_b{b}_generate_tok_s"] = gms if isinstance(gms, str) else b * steps / (gms / 1e3)
        rates = [r for r in (res[f"decode_b{b}_loop_tok_s"], res[f"decode_b{b}_generate_tok_s"])
                 if not isinstance(r, str)]
        res[f"decode_b{b}_tok_s"] = max(rates) if rates else "OOM"  # the anchor: the faster of the two
    res["peak_gib"] = gib(torch.cuda.max_memory_allocated())
    if profile_path:  # where a decode step's time goes (host and device)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        out = forward(ids[:1])
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        forward(nxt, cache)
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                nxt = forward(nxt, cache).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        with open(profile_path, "w") as f:
            for key in ("self_cpu_time_total", "cuda_time_total"):
                f.write(f"== decode x3 by {key}\n{p.key_averages().table(sort_by=key, row_limit=25)}\n")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


# ---- report -------------------------------------------------------------------------------------------------------


def fmt(v, unit: str = "") -> str:
    if isinstance(v, str) or v is None:
        return v or "-"
    return f"{v:,.1f}{unit}"


def ratio(ours, theirs, lower_is_better: bool) -> str:
    if not isinstance(ours, float) or not isinstance(theirs, float):
        return "-"
    return f"{(theirs / ours if lower_is_better else ours / theirs):.2f}x"


def table(results: dict, bandwidth: float, prefill_t, decode_b) -> str:
    hf = results.get("transformers+fla", {})
    variants = [k for k in ("nextq-int4", "nextq-fp8") if k in results]
    head = ["metric", "transformers+FLA bf16"] + [x for v in variants for x in (v, "ratio")]
    rows = []
    for t in prefill_t:
        key = f"prefill_{t}_ms"
        rows.append([f"prefill T={t} (ms)", fmt(hf.get(key))]
                    + [x for v in variants for x in (fmt(results[v].get(key)), ratio(results[v].get(key), hf.get(key), True))])
    for b in decode_b:
        key = f"decode_b{b}_tok_s"
        rows.append([f"decode B={b} (tok/s)", fmt(hf.get(key))]
                    + [x for v in variants for x in (fmt(results[v].get(key)), ratio(results[v].get(key), hf.get(key), False))])
    roof = ["HBM roofline B=1 (tok/s)", "-"]
    frac = ["  achieved / roofline", "-"]
    for v in variants:
        r = results[v]
        if "decode_bytes_per_token" in r:
            rt = bandwidth / r["decode_bytes_per_token"]
            r["roofline_tok_s"] = rt
            r["roofline_fraction"] = r["decode_b1_tok_s"] / rt
            roof += [f"{rt:,.0f} ({r['decode_bytes_per_token'] / 1e6:,.0f} MB/tok)", ""]
            frac += [f"{100 * r['roofline_fraction']:.0f}%", ""]
        else:
            roof += ["-", ""]
            frac += ["-", ""]
    rows += [roof, frac]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prefill", type=int, nargs="*", default=list(PREFILL_T))
    ap.add_argument("--decode-batch", type=int, nargs="*", default=list(DECODE_B))
    ap.add_argument("--variants", nargs="*", default=["transformers+fla", "nextq-int4", "nextq-fp8"])
    ap.add_argument("--full", action="store_true", help="also the 48-layer model with int4 experts (decode only)")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--profile", help="append per-kernel times of nextq's decode and prefill here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_gpu needs a CUDA device")
    dev = torch.cuda.get_device_properties(0)
    config = qwen3_next_80b(args.layers)
    max_seq = max([*args.prefill, PROMPT + 16 + DECODE_STEPS]) + 64
    bandwidth = copy_bandwidth()
    results: dict = {"device": dev.name, "memory_gib": gib(dev.total_memory), "torch": torch.__version__,
                     "layers": args.layers, "copy_bandwidth_tb_s": bandwidth / 1e12}
    print(f"device {dev.name}, {gib(dev.total_memory):.0f} GiB; copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"(read + write); {args.layers} layers", flush=True)
    for v in args.variants:
        t0 = time.time()
        if v == "transformers+fla":
            results[v] = bench_transformers(config, args.prefill, args.decode_batch,
                                            f"{args.profile}.hf" if args.profile else None)
        else:
            results[v] = bench_nextq(config, v.split("-")[1], args.prefill, args.decode_batch, max_seq,
                                     f"{args.profile}.{v}" if args.profile else None)
        print(f"{v}: {json.dumps(results[v], default=str)} ({time.time() - t0:.0f} s)", flush=True)
    if args.full:
        full = qwen3_next_80b(48)
        t0 = time.time()
        r = bench_nextq(full, "int4", [], [1], PROMPT + 16 + DECODE_STEPS + 64)
        r["roofline_tok_s"] = bandwidth / r["decode_bytes_per_token"]
        results["nextq-int4-48-layers"] = r
        print(f"48 layers int4: {json.dumps(r, default=str)} ({time.time() - t0:.0f} s)", flush=True)
    print()
    print(table(results, bandwidth, args.prefill, args.decode_batch))
    if args.full:
        r = results["nextq-int4-48-layers"]
        print(f"48 layers, int4 experts: weights {r['weights_gib']:.1f} GiB, peak {r['peak_gib']:.1f} GiB, decode B=1 "
              f"{fmt(r.get('decode_b1_tok_s'))} tok/s (roofline {r['roofline_tok_s']:,.0f}, "
              f"{r['decode_bytes_per_token'] / 1e9:.2f} GB/token)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
