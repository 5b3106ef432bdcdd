"""A/B of decode / verify attention on the GPU executor: unfused (torch ops), version 5's serial kernel, the
split-K kernel (runtime/triton/attn_decode.py). Needs CUDA.

    python scripts/ab_attn.py kernel [--json F]                 # the attention alone, per call
    python scripts/ab_attn.py model --layers 4 48 [--rounds 2]   # decode and verify steps at 80B dimensions

`kernel`: q / caches / gate at the real head shape (16 query heads on 2 KV heads of 256), bf16, for decode and
verify shapes (B, T, visible rows, span); each variant captured as a CUDA graph of 16 calls (the launch gaps of a
decode graph included) and replayed 20 times, median per call in us. Unfused is gpu.cache_attention plus the
transpose and the gate, as GpuModel.attention runs it; split-K also at fixed slice counts.

`model`: GpuModel with random weights and int4 experts (scripts/bench_mtp.py's step model, one MTP layer) after a
512-token prompt: decode ms per token (64 graph replays) and verify of 1..4 tokens (graph replays) with fused
attention off (ATTN_FUSED_MAX_SPAN = 0), the serial kernel and the split-K kernel, `--rounds` times in turn on one
model (graphs recaptured for each variant), so the spread between rounds is visible.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = [  # (B, T, rows the last token sees, span = the runtime's bucket)
    (1, 1, 640, 768), (1, 2, 640, 768), (1, 4, 640, 768), (8, 1, 640, 768), (8, 4, 640, 768),
    (1, 1, 128, 256), (1, 1, 2000, 2048), (1, 4, 2000, 2048), (8, 1, 2000, 2048)]
SPLITS = (4, 8, 16, 32, 64)


def graph_us(fn, calls: int = 16, reps: int = 20) -> float:
    """Median us per call of fn() captured `calls` times in one CUDA graph, replayed `reps` times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compiles
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(a.elapsed_time(e) * 1e3 / calls)
    return statistics.median(times)


def bench_kernel() -> list[dict]:
    from nextq.runtime.gpu import cache_attention
    from nextq.runtime.triton import attn_decode as ad

    hq, hkv, d, dt = 16, 2, 256, torch.bfloat16
    rows = []
    for b, t, vis, span in CASES:
        g = torch.Generator(device="cuda").manual_seed(b * 1000 + t * 10 + vis)
        q = torch.randn(b, hq, t, d, device="cuda", dtype=dt, generator=g)
        kc, vc = (torch.randn(b, hkv, span + 64, d, device="cuda", dtype=dt, generator=g) for _ in range(2))
        gate = torch.randn(b, t, hq * d, device="cuda", dtype=dt, generator=g)
        pos = torch.arange(vis - t, vis, device="cuda")
        out = torch.empty(b, t, hq * d, device="cuda", dtype=dt)

        def unfused():  # GpuModel.attention's unfused path up to the out projection's input
            o = cache_attention(q, kc, vc, pos, span)
            return o.transpose(1, 2).reshape(b, t, hq * d) * torch.sigmoid(gate)

        row = {"B": b, "T": t, "visible": vis, "span": span,
               "splits_default": ad.num_splits(b * hkv, span),
               "unfused_us": graph_us(unfused),
               "serial_us": graph_us(lambda: ad.attn_decode_serial_into(q, kc, vc, pos, span, gate, out)),
               "split_us": graph_us(lambda: ad.attn_decode_into(q, kc, vc, pos, span, gate, out))}
        ref = unfused().float()
        row["split_vs_unfused_rel"] = float((out.float() - ref).norm() / ref.norm())
        for n in SPLITS:
            if n <= -(-span // ad.BLOCK_S):
                row[f"split{n}_us"] = graph_us(lambda: ad.attn_decode_into(q, kc, vc, pos, span, gate, out, splits=n))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| B | T | visible | span | unfused | serial (v5) | split-K (default slices) | best fixed slices |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fixed = {k: v for k, v in r.items() if k.startswith("split") and k[5:-3].isdigit()}
        best = min(fixed, key=fixed.get) if fixed else None
        best_s = f"{fixed[best]:.1f} us ({best[5:-3]})" if best else ""
        print(f"| {r['B']} | {r['T']} | {r['visible']} | {r['span']} | {r['unfused_us']:.1f} us | "
              f"{r['serial_us']:.1f} us | {r['split_us']:.1f} us ({r['splits_default']}) | {best_s} |")
    return rows


VARIANTS = {"unfused": (0, "split"), "serial": (2048, "serial"), "split": (2048, "split")}


def bench_model(layers: list[int], rounds: int) -> dict:
    import bench_mtp  # noqa: E402  (scripts/bench_mtp.py: the step model and its step costs)

    from nextq.runtime import gpu

    out: dict = {}
    for n in layers:
        model = bench_mtp.step_model(n)
        res: dict = {v: [] for v in VARIANTS}
        for _ in range(rounds):
            for v, (max_span, kernel) in VARIANTS.items():
                gpu.ATTN_FUSED_MAX_SPAN, gpu.ATTN_DECODE_KERNEL = max_span, kernel
                model.graphs, model.pool = {}, None  # recaptured in a fresh pool (the old one dies with them)
                r = bench_mtp.step_costs(model, draft=False)
                res[v].append(r)
                print(f"{n} layers, {v}: decode {r['decode_ms']:.3f} ms; verify " + ", ".join(
                    f"T={t} {x:.3f} ms ({r['verify_over_decode'][t]:.2f}x)" for t, x in r["verify_ms"].items()),
                    flush=True)
        gpu.ATTN_FUSED_MAX_SPAN, gpu.ATTN_DECODE_KERNEL = 2048, "split"
        out[n] = res
        del model
        torch.cuda.empty_cache()
    print("\n| layers | attention | decode ms (rounds) | tok/s | verify 1 / 2 / 3 / 4 over decode (last round) |")
    print("|---:|---|---:|---:|---|")
    for n, res in out.items():
        for v, rs in res.items():
            dec = [r["decode_ms"] for r in rs]
            ratios = " / ".join(f"{x:.2f}" for x in rs[-1]["verify_over_decode"].values())
            print(f"| {n} | {v} | {statistics.mean(dec):.3f} ({', '.join(f'{x:.3f}' for x in dec)}) | "
                  f"{1e3 / statistics.mean(dec):.0f} | {ratios} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["kernel", "model"])
    ap.add_argument("--layers", type=int, nargs="*", default=[4])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: ab_attn needs a CUDA device")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with torch.no_grad():
        res = bench_kernel() if args.what == "kernel" else bench_model(args.layers, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
