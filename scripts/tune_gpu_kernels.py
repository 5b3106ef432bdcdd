"""Choose tile sizes for the GPU kernels at Qwen3-Next-80B shapes: times each candidate, checks it against the
first (relative L2 <= 1e-2, bf16), prints one table per kernel and the fastest configuration.

    python scripts/tune_gpu_kernels.py [--json out.json] [--only moe_gemm moe_gemv chunk]

moe_gemm   experts_forward at T = 4096 tokens (40960 routed pairs over 512 experts): up then down configs
moe_gemv   experts_forward at batch 1 and 8 with the shared expert (decode), as decode runs it: captured in a CUDA
           graph (no launch overhead), 16 calls per replay on 16 routings so that calls do not find their experts
           in L2; the time is per call
chunk      gdr_chunk_into at T = 4096, 32 value heads of 128 (the prep kernel's warps, the state kernel's Dv block)
The winners are written into runtime/triton/moe_grouped.py (GEMM_UP, GEMM_DOWN, GEMV_UP, GEMV_DOWN) and
runtime/triton/gdr_chunk.py (PREP_WARPS, STATE_BV) by hand.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton.testing

E, H, I, TOPK = 512, 2048, 512, 10
GEMM = [dict(BM=bm, BN=bn, BK=bk, WARPS=w, STAGES=s) for bm, bn, bk, w, s in (
    (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 128, 4, 3), (128, 64, 64, 4, 4), (128, 64, 128, 4, 3),
    (128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 64, 8, 3),
    (64, 128, 64, 4, 3), (128, 32, 64, 4, 3))]
GEMV = [dict(BN=bn, BK=bk, WARPS=w, STAGES=s) for bn, bk, w, s in (
    (8, 512, 4, 2), (8, 256, 4, 3), (16, 256, 4, 3), (16, 512, 8, 2), (4, 512, 4, 2), (4, 1024, 4, 2),
    (32, 256, 8, 3), (8, 1024, 8, 2), (16, 128, 4, 4), (8, 128, 4, 4))]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def experts(fmt: str, gen: torch.Generator):
    from nextq.runtime.triton.moe_fp8 import float_experts
    from nextq.runtime.triton.moe_int4 import int4_experts

    def one(n, k):
        if fmt == "int4":
            codes = torch.randint(0, 256, (E, n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
            return int4_experts(codes, torch.full((E, n, k // 32), 2.0 / 8 / math.sqrt(k), device="cuda",
                                                  dtype=torch.float16))
        codes = torch.randn(E, n, k, generator=gen, device="cuda", dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        return float_experts(codes, torch.full((E, n // 128, k // 128), 1 / math.sqrt(k), device="cuda"))

    return one(I, H), one(I, H), one(H, I)


def routing(n: int, gen: torch.Generator):
    ids = torch.rand(n, E, generator=gen, device="cuda").topk(TOPK, -1).indices.to(torch.int32)
    w = torch.rand(n, TOPK, generator=gen, device="cuda")
    return w / w.sum(-1, keepdim=True), ids


def sweep(name: str, candidates: list[dict], apply, run, check=None, graph: int = 0) -> dict:
    """apply(cfg) each candidate, time run() (median ms; graph = n: replayed as a CUDA graph, per 1/n of it),
    compare check() (default run) with the first candidate's; print the table and return {"rows", "best"}.
    The caller restores its defaults."""
    check = check or run
    rows, ref = [], None
    for cfg in candidates:
        apply(cfg)
        try:
            out = check()
            ref = out if ref is None else ref
            err = rel(out, ref)
            if graph:
                ms = triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median") / graph
            else:
                ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
        except Exception as e:  # a tile the compiler refuses (shared memory, registers) is reported, not fatal
            rows.append({**cfg, "ms": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"})
            continue
        rows.append({**cfg, "ms": ms, "rel": err, "ok": err <= 1e-2})
    ok = [r for r in rows if r.get("ok")]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    print(f"\n== {name}")
    for r in rows:
        mark = " <- best" if r is best else ""
        res = f"{r['ms']:.4f} ms  rel {r['rel']:.1e}" if r["ms"] is not None else r["error"]
        print("  " + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("ms", "rel", "ok", "error")) + "  " + res
              + mark, flush=True)
    return {"rows": rows, "best": best}


def setter(target: dict):
    """apply() for a module-level config dict: replace its contents."""
    def apply(cfg: dict) -> None:
        target.clear()
        target.update(cfg)
    return apply


def tune_moe(gemv: bool, formats: list[str]) -> dict:
    from nextq.runtime.triton import moe_grouped as mg

    gen = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for fmt in formats:
        g, u, d = experts(fmt, gen)
        if not gemv:
            n = 4096
            x = torch.randn(n, H, generator=gen, device="cuda", dtype=torch.bfloat16)
            w, ids = routing(n, gen)

            def run():
                return mg.experts_forward(x, w, ids, g, u, d)

            flops = 2 * n * TOPK * 3 * H * I
            for part, target in (("up", mg.GEMM_UP), ("down", mg.GEMM_DOWN)):
                saved = dict(target)
                res = sweep(f"moe grouped GEMM {part} ({fmt}, T={n}; {flops / 1e9:.0f} GFLOP per call)",
                            GEMM, setter(target), run)
                setter(target)({k: res["best"][k] for k in saved} if res["best"] else saved)  # tune down on it
                out[f"gemm_{part}_{fmt}"] = res
            continue
        shared = mg.SharedExpert.from_dense(*(torch.randn(*s, generator=gen, device="cuda", dtype=torch.bfloat16)
                                              / math.sqrt(s[1]) for s in ((I, H), (I, H), (H, I))))
        for n in (1, 8):
            x = torch.randn(n, H, generator=gen, device="cuda", dtype=torch.bfloat16)
            draws = [routing(n, gen) for _ in range(16)]
            sg = torch.rand(n, generator=gen, device="cuda")

            def run():
                for w, ids in draws:
                    mg.experts_forward(x, w, ids, g, u, d, shared=shared, shared_gate=sg)

            def fixed():
                return mg.experts_forward(x, *draws[0], g, u, d, shared=shared, shared_gate=sg)

            wbytes = (g.nbytes + u.nbytes + d.nbytes) * TOPK * n // E + sum(m.nbytes for m in (shared.gate_up, shared.down))
            for part, target in (("up", mg.GEMV_UP), ("down", mg.GEMV_DOWN)):
                saved = dict(target)
                res = sweep(f"moe GEMV {part} ({fmt}, B={n}; ~{wbytes / 1e6:.1f} MB of weights per call)", GEMV,
                            setter(target), run, check=fixed, graph=len(draws))
                setter(target)({k: res["best"][k] for k in saved} if res["best"] else saved)
                out[f"gemv_{part}_{fmt}_b{n}"] = res
    return out


def tune_chunk() -> dict:
    from nextq.runtime.triton import gdr_chunk

    gen = torch.Generator(device="cuda").manual_seed(1)
    t, hk, hv, dk = 4096, 16, 32, 128
    q, k = (torch.randn(1, t, hk, dk, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, t, hv, dk, generator=gen, device="cuda", dtype=torch.bfloat16)
    g = -torch.rand(1, t, hv, generator=gen, device="cuda") * 2
    beta = torch.rand(1, t, hv, generator=gen, device="cuda", dtype=torch.bfloat16)
    s0 = torch.zeros(1, hv, dk, dk, device="cuda")
    out, s1 = torch.empty_like(v), torch.empty_like(s0)

    def run():
        gdr_chunk.gdr_chunk_into(q, k, v, g, beta, s0, out, s1)
        return out

    saved = {"PREP_WARPS": gdr_chunk.PREP_WARPS, "STATE_BV": gdr_chunk.STATE_BV}

    def apply(cfg: dict) -> None:
        for key, val in cfg.items():
            setattr(gdr_chunk, key, val)

    cands = [dict(PREP_WARPS=w, STATE_BV=bv) for w in (4, 8) for bv in (16, 32, 64)]
    res = sweep(f"chunked delta rule (T={t}, Hv={hv})", cands, apply, run)
    apply(saved)
    return {"chunk": res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=["moe_gemm", "moe_gemv", "chunk"])
    ap.add_argument("--formats", nargs="*", default=["int4", "fp8"], help="expert formats for the MoE sweeps")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}", flush=True)
    results = {}
    if "moe_gemm" in args.only:
        results.update(tune_moe(gemv=False, formats=args.formats))
    if "moe_gemv" in args.only:
        results.update(tune_moe(gemv=True, formats=args.formats))
    if "chunk" in args.only:
        results.update(tune_chunk())
    print("\nbest:")
    for key, r in results.items():
        b = r["best"]
        print(f"  {key}: " + (", ".join(f"{k}={v}" for k, v in b.items() if k not in ("rel", "ok")) if b else "none"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
