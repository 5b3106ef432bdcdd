"""MTP speculative decoding on the embedded model: nextq's torch (CPU) and ort backends for k = 1, 2, 3 over
8 prompts x 256 new tokens (greedy speculative checked token for token against plain greedy; acceptance and
tokens/s), and llama.cpp's `--spec-type draft-mtp` (llama-speculative-simple, built by scripts/llama_cpp_tools.py)
drafting with nextq's MTP GGUF (`nextq export gguf --mtp-only`) on the same prompts, its acceptance beside nextq's.

    python scripts/bench_mtp.py [--prompts 8] [--new-tokens 256] [--backends torch,ort] [--no-llama-cpp] [--json F]
    python scripts/bench_mtp.py --gpu [--layers 4,48] [--steps-only] [--json F]   # runtime/gpu.py (needs CUDA)

`--gpu`: the embedded model on the GPU executor (plain greedy vs speculative greedy, same prompts; fp32 and bf16),
then step costs at Qwen3-Next-80B dimensions with random weights and int4 experts (scripts/bench_gpu.py builds
them, plus one MTP layer): a decode step, a verify step of k + 1 tokens, a draft step, the head's catch-up over
n + 1 pairs and the commit, each a CUDA-graph replay; and from those, the composite speed-up at per-draft acceptance
probability a (accepted drafts per step n: P(n = j) = a^j (1 - a) for j < k, a^k for j = k):
E[n + 1] x decode / E[(k - 1) draft + verify(k + 1) + commit + catch-up(n + 1)]. Composite, not a measured run.

Acceptance = accepted drafts / drafted tokens. llama.cpp's own `accept` line is not that number for qwen3next:
its target cannot drop trailing recurrent state, so on a partial acceptance it restores a checkpoint and replays
the accepted tokens plus the correction as a new "draft", which is then counted as drafted and fully accepted.
The comparable figure is counted from its debug log: each partial acceptance (A of N drafted), each full acceptance
that is not such a replay. The draft head is greedy on both sides (llama.cpp takes the top candidate).
The replay also moves where drafting resumes: llama.cpp's replay verifies the correction too and gets the token after
it from the target, so it never drafts right after a correction, which nextq does. `nextq (llama.cpp's schedule)`
runs nextq's drafter on that schedule (greedy): the figure that should equal llama.cpp's for the same head.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import nextq
from nextq.convert.gguf_export import export_gguf
from nextq.convert.onnx_export import export_onnx
from nextq.graph import Graph
from nextq.pipeline import embedded_model
from nextq.runtime.speculative import SpeculativeStats

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_tools  # noqa: E402  (scripts/llama_cpp_tools.py)

PROMPTS = [
    "def fibonacci(n):\n",
    "import numpy as np\n\nclass Matrix:\n    def",
    "for key, value in sorted(",
    "class Stack:\n    \"\"\"A simple stack.\"\"\"\n\n    def __init__(self):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "def read_config(path):\n    with open(path) as f:\n",
    "    # parse the command line\n    parser = argparse.ArgumentParser(",
    "try:\n    import json\nexcept ImportError:\n",
]
KS = (1, 2, 3)
PARTIAL = re.compile(r"partial acceptance: (\d+) < (\d+)")
FULL = re.compile(r"accepted (\d+)/(\d+) draft tokens")
ACCEPT = re.compile(r"accept\s*=\s*([\d.]+)%")


def bench_nextq(model, prompts: list[str], new_tokens: int) -> dict:
    """Plain greedy, then speculative greedy for each k: same tokens asserted; acceptance and tokens/s."""
    out = {"plain_tokens_per_s": 0.0, "k": {}}
    plain_ids, plain_s, n_tok = [], 0.0, 0
    for p in prompts:
        ids = np.array([model.tokenizer(p)["input_ids"]])
        t = time.perf_counter()
        ref = model.generate(ids, new_tokens)
        plain_s += time.perf_counter() - t
        n_tok += ref.shape[1]
        plain_ids.append((ids, ref))
    out["plain_tokens_per_s"] = n_tok / plain_s
    for k in KS:
        stats, secs, same = SpeculativeStats(k), 0.0, 0
        for ids, ref in plain_ids:
            t = time.perf_counter()
            got = model.generate(ids, new_tokens, speculative="mtp", draft_tokens=k, stats=stats)
            secs += time.perf_counter() - t
            same += int(got.shape == ref.shape and bool((got == ref).all()))
        out["k"][k] = {**stats.as_dict(), "tokens_per_s": n_tok / secs, "same_as_plain": f"{same}/{len(prompts)}"}
    return out


def llama_cpp_schedule(drafter, ids: np.ndarray, new_tokens: int, k: int) -> tuple[np.ndarray, int, int]:
    """Greedy speculative decoding through a backend's Drafter on llama.cpp's qwen3next schedule: after a partial
    acceptance of n drafts, the target also takes [.., d_n, y] plus its own next token b (the replay) and drafting
    resumes after b. Returns the new ids [1, N], drafted and accepted counts (replays not counted)."""
    logits, hidden = drafter.prefill(ids)
    tok = logits.argmax(-1)  # [1]
    out, drafted, accepted, mtp_len = [tok], 0, 0, 0
    pend_h, pend_ids = hidden, np.concatenate([ids[:, 1:], tok[:, None]], axis=1)
    while len(out) < new_tokens:
        kk = min(k, new_tokens - len(out) - 1)
        drafts = []
        if kk:
            mlog, mh = drafter.draft(pend_h, pend_ids, mtp_len)
            mtp_len += pend_ids.shape[1]
            for i in range(kk):
                drafts.append(mlog[:, -1].argmax(-1))
                if i + 1 < kk:
                    mlog, mh = drafter.draft(mh[:, -1:], drafts[-1][:, None], mtp_len + i)
        vlog, vh = drafter.verify(np.concatenate([tok[:, None], *(d[:, None] for d in drafts)], axis=1))
        picks = vlog[0].argmax(-1)  # the target's token after each verified one
        n = next((i for i, d in enumerate(drafts) if d[0] != picks[i]), kk)
        drafted, accepted = drafted + kk, accepted + n
        new, pend_h = [np.array([t]) for t in picks[:n + 1]], vh[:, :n + 1]
        drafter.keep(n + 1)
        if n < kk:  # the replay: the correction y through the target too, its next token b for free
            ylog, yh = drafter.verify(new[-1][:, None])
            drafter.keep(1)
            new.append(ylog[:, -1].argmax(-1))
            pend_h = np.concatenate([np.asarray(pend_h), np.asarray(yh)], axis=1)
        out += new
        tok, pend_ids = out[-1], np.stack(new, axis=1)
    return np.stack(out, axis=1)[:, :new_tokens], drafted, accepted


def bench_llama_cpp_schedule(model, prompts: list[str], new_tokens: int) -> dict:
    out = {}
    for k in KS:
        drafted = accepted = same = 0
        for p in prompts:
            ids = np.array([model.tokenizer(p)["input_ids"]])
            got, d, a = llama_cpp_schedule(model.drafter("mtp"), ids, new_tokens, k)
            drafted, accepted = drafted + d, accepted + a
            same += int(bool((got == model.generate(ids, new_tokens)).all()))
        out[k] = {"acceptance_rate": accepted / drafted, "drafted": drafted, "accepted": accepted,
                  "same_as_plain": f"{same}/{len(prompts)}"}
    return out


def llama_cpp_counts(log: str) -> dict:
    """Drafted / accepted from llama-speculative-simple's debug log, replays after a checkpoint restore left out."""
    drafted = accepted = replays = 0
    replay = False
    for line in log.splitlines():
        if m := PARTIAL.search(line):
            accepted, drafted, replay = accepted + int(m[1]), drafted + int(m[2]), True
        elif m := FULL.search(line):
            if replay:
                replay, replays = False, replays + 1
            else:
                accepted, drafted = accepted + int(m[1]), drafted + int(m[2])
    own = ACCEPT.findall(log)
    return {"drafted": drafted, "accepted": accepted, "replays": replays,
            "reported_accept_pct": float(own[-1]) if own else None}


def bench_llama_cpp(bin_dir: Path, gguf: Path, mtp: Path, prompts: list[str], new_tokens: int) -> dict:
    out = {}
    for k in KS:
        tot = {"drafted": 0, "accepted": 0, "replays": 0, "reported": []}
        for p in prompts:
            cmd = [str(bin_dir / "llama-speculative-simple"), "-m", str(gguf), "-md", str(mtp),
                   "--spec-type", "draft-mtp", "--spec-draft-n-max", str(k), "-p", p, "-n", str(new_tokens),
                   "--temp", "0", "-c", "2048", "-t", "2", "-v"]
            r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
            if r.returncode:
                raise RuntimeError(f"llama-speculative-simple failed ({r.returncode}): {r.stderr[-1500:]}")
            c = llama_cpp_counts(r.stdout + r.stderr)
            for f in ("drafted", "accepted", "replays"):
                tot[f] += c[f]
            tot["reported"].append(c["reported_accept_pct"])
        out[k] = {"acceptance_rate": tot["accepted"] / max(tot["drafted"], 1), "drafted": tot["drafted"],
                  "accepted": tot["accepted"], "replays": tot["replays"],
                  "reported_accept_pct": [x for x in tot["reported"] if x is not None]}  # when its log has them
    return out


def bench_gpu_embedded(ir: Path, prompts: list[str], new_tokens: int) -> dict:
    """Plain greedy (generate_greedy) vs speculative greedy on the GPU executor, fp32 and bf16."""
    import torch

    from nextq.runtime.backends import load_tokenizer
    from nextq.runtime.gpu import GpuModel

    tok = load_tokenizer(ir)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        try:
            out[name] = bench_gpu_model(GpuModel.from_graph(Graph.load(ir), dtype=dtype, max_batch=1, max_seq=2048),
                                        tok, prompts, new_tokens)
        except Exception as e:  # noqa: BLE001  (report a dtype the kernels refuse, measure the other)
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        torch.cuda.empty_cache()
    return out


def bench_gpu_model(model, tok, prompts: list[str], new_tokens: int) -> dict:
    """Timed runs after an untimed run of each prompt and kind: those capture the graphs of the spans the prompts
    reach and compile the Triton kernels for each prompt length (prefill is not graph-captured)."""
    import torch

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        return r, time.perf_counter() - t

    def plain(ids):
        first = model.prefill(ids).argmax(-1, keepdim=True)
        return torch.cat([first, model.generate_greedy(new_tokens - 1, first=first)], dim=1)

    all_ids = [torch.tensor([tok(p)["input_ids"]], device="cuda") for p in prompts]
    for ids in all_ids:
        plain(ids)
    runs = [(ids, *timed(lambda: plain(ids))) for ids in all_ids]
    res: dict = {"plain_tokens_per_s": len(prompts) * new_tokens / sum(s for _, _, s in runs), "k": {}}
    for k in KS:
        for ids in all_ids:
            model.generate_speculative_greedy(ids, new_tokens, k)
        counts, secs, same = {"drafted": 0, "accepted": 0, "verify_steps": 0}, 0.0, 0
        for ids, ref, _ in runs:
            (got, c), s = timed(lambda: model.generate_speculative_greedy(ids, new_tokens, k))
            secs += s
            same += int(bool((got == ref).all()))
            for f in counts:
                counts[f] += c[f]
        res["k"][k] = {**counts, "acceptance_rate": counts["accepted"] / counts["drafted"],
                       "tokens_per_s": len(prompts) * new_tokens / secs, "same_as_plain": f"{same}/{len(prompts)}"}
    return res


def composite(decode: float, draft: float, verify: dict, catchup: dict, commit: dict, k: int, a: float) -> float:
    """Speed-up over plain decode from step costs (ms) at per-draft acceptance probability a (module docstring)."""
    p = [a ** j * (1 - a) for j in range(k)] + [a ** k]
    tokens = sum(pj * (j + 1) for j, pj in enumerate(p))
    cost = (k - 1) * draft + verify[k + 1] + sum(pj * (commit[j + 1] + catchup[j + 1]) for j, pj in enumerate(p))
    return tokens * decode / cost


def step_model(layers: int):
    """GpuModel at 80B dimensions with `layers` layers and one MTP layer, random weights, int4 experts."""
    import dataclasses

    import bench_gpu  # noqa: E402  (scripts/bench_gpu.py: the 80B-dimension builder and timer)
    from nextq.runtime.gpu import GpuModel

    cfg = dataclasses.replace(bench_gpu.qwen3_next_80b(layers), mtp_num_hidden_layers=1)
    return GpuModel(cfg, bench_gpu.random_source(cfg, "int4"), max_batch=1, max_seq=2048)


def bench_gpu_steps(layers: int) -> dict:
    """Step costs (ms, CUDA-graph replays) at 80B dimensions with `layers` layers and one MTP layer."""
    import torch

    model = step_model(layers)
    res = step_costs(model)
    del model
    torch.cuda.empty_cache()
    return res


def step_costs(model, draft: bool = True) -> dict:
    """Decode, verify of 1 .. max(KS) + 1 tokens and (draft) the head's steps of `model` after a 512-token prompt,
    each a CUDA-graph replay (ms), with the ratios and composites; draft=False: decode and verify alone."""
    import torch

    import bench_gpu  # noqa: E402

    cfg, layers = model.config, model.config.num_hidden_layers
    ids = torch.randint(0, cfg.vocab_size, (1, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    model.generate_speculative_greedy(ids, 16, max(KS))  # allocates the slots, captures what a run meets
    first = model.prefill(ids).argmax(-1, keepdim=True)
    model.generate_greedy(8, first=first)
    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    model.generate_greedy(64)
    e.record()
    e.synchronize()
    res = {"layers": layers, "decode_ms": a.elapsed_time(e) / 64}
    model.generate_speculative_greedy(ids, 4, max(KS))  # positions back near 512 for the step graphs
    span = model._span(model.length + max(KS) + 1)
    res["verify_ms"] = {t: bench_gpu.time_cuda(model._spec_graph("verify", 1, t, span).replay, reps=20)
                        for t in range(1, max(KS) + 2)}
    d = res["decode_ms"]
    res["verify_over_decode"] = {t: v / d for t, v in res["verify_ms"].items()}
    if not draft:
        return res
    mspan = model._span(int(model.mtp_pos) + 160)  # the replays below move the head's position by < 160
    res["draft_ms"] = bench_gpu.time_cuda(model._spec_graph("mtp", 1, 1, mspan, 2).replay, reps=20)
    res["catchup_ms"] = {t: bench_gpu.time_cuda(model._spec_graph("mtp", 1, t, mspan, 1).replay, reps=10)
                         for t in range(1, max(KS) + 2)}
    res["commit_ms"] = {n: bench_gpu.time_cuda(model._spec_graph("commit", 1, n).replay, reps=10)
                        for n in range(1, max(KS) + 2)}
    res["draft_over_decode"] = res["draft_ms"] / d
    res["composite_speedup"] = {
        f"a={a_}": {k: composite(d, res["draft_ms"], res["verify_ms"], res["catchup_ms"], res["commit_ms"], k, a_)
                    for k in KS} for a_ in (0.5, 0.7, 0.8)}
    return res


def main_gpu(args, ir: Path, prompts: list[str]) -> dict:
    result = {"embedded": {} if args.steps_only else bench_gpu_embedded(ir, prompts, args.new_tokens), "steps": {}}
    for name, r in result["embedded"].items():
        print(f"gpu embedded {name}: plain {r['plain_tokens_per_s']:.0f} tok/s")
        for k, v in r["k"].items():
            print(f"  k={k}: acceptance {v['acceptance_rate']:.3f}, {v['tokens_per_s']:.0f} tok/s, "
                  f"same tokens as plain greedy: {v['same_as_plain']}")
    for layers in (int(n) for n in args.layers.split(",") if n):
        result["steps"][layers] = r = bench_gpu_steps(layers)
        print(f"80B dims, {layers} layers: decode {r['decode_ms']:.3f} ms; draft {r['draft_ms']:.3f} ms "
              f"({r['draft_over_decode']:.3f}x); verify " + ", ".join(
                  f"T={t} {v:.3f} ms ({r['verify_over_decode'][t]:.2f}x)" for t, v in r["verify_ms"].items()))
        print("  catch-up " + ", ".join(f"t={t} {v:.3f}" for t, v in r["catchup_ms"].items()) + " ms; commit "
              + ", ".join(f"n={n} {v:.3f}" for n, v in r["commit_ms"].items()) + " ms")
        for a_, by_k in r["composite_speedup"].items():
            print(f"  composite speed-up at {a_}: " + ", ".join(f"k={k} {v:.2f}x" for k, v in by_k.items()))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--backends", default="torch,ort")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--gpu", action="store_true", help="the GPU executor instead (see the module docstring)")
    ap.add_argument("--layers", default="4,48", help="with --gpu: layer counts at 80B dimensions")
    ap.add_argument("--steps-only", action="store_true", help="with --gpu: the 80B-dimension step costs alone")
    args = ap.parse_args()
    prompts = PROMPTS[: args.prompts]
    work = Path(tempfile.mkdtemp(prefix="nextq-bench-mtp-"))
    ir = work / "ir"
    nextq.read(str(embedded_model())).save(ir)
    if args.gpu:
        result = main_gpu(args, ir, prompts)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    paths = {"torch": ir}
    result: dict = {"prompts": len(prompts), "new_tokens": args.new_tokens, "nextq": {}}
    for backend in args.backends.split(","):
        if backend == "ort":
            paths["ort"] = export_onnx(ir, work / "onnx")
        result["nextq"][backend] = r = bench_nextq(nextq.load(paths[backend]), prompts, args.new_tokens)
        print(f"nextq {backend}: plain {r['plain_tokens_per_s']:.1f} tok/s")
        for k, v in r["k"].items():
            print(f"  k={k}: acceptance {v['acceptance_rate']:.3f} ({v['accepted']}/{v['drafted']}), "
                  f"{v['mean_accepted']:.2f} per verify, {v['tokens_per_s']:.1f} tok/s, "
                  f"same tokens as plain greedy: {v['same_as_plain']}")
    if not args.no_llama_cpp:
        graph = Graph.load(ir)
        gguf, mtp = work / "model.gguf", work / "mtp-model.gguf"
        export_gguf(graph, gguf)
        export_gguf(graph, mtp, mtp_only=True)
        bin_dir = llama_cpp_tools.build_tools(["llama-speculative-simple"])
        result["llama.cpp"] = lc = bench_llama_cpp(bin_dir, gguf, mtp, prompts, args.new_tokens)
        result["nextq_llama_cpp_schedule"] = sched = bench_llama_cpp_schedule(
            nextq.load(paths.get("ort") or paths["torch"]), prompts, args.new_tokens)
        ref = next(iter(result["nextq"].values()), None)
        for k, v in lc.items():
            ours = f", nextq {ref['k'][k]['acceptance_rate']:.3f}" if ref else ""
            ours += (f", nextq on llama.cpp's schedule {sched[k]['acceptance_rate']:.3f} "
                     f"(same tokens as plain greedy: {sched[k]['same_as_plain']})")
            print(f"llama.cpp draft-mtp k={k}: acceptance {v['acceptance_rate']:.3f} ({v['accepted']}/{v['drafted']}, "
                  f"{v['replays']} replays left out){ours}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
