"""The whole job at the real 80B dimensions: every nextq step's peak memory and wall time per layer, for N layers.

    python scripts/bench_scale.py --layers 1,2,4 --work WORKDIR --json bench_scale.json [--device cuda]

For each N: a synthetic checkpoint with the real Qwen3-Next-80B-A3B dimensions and N layers (scripts/
make_synthetic_checkpoint.py, with the real Qwen tokenizer from scripts/qwen_tokenizer.py), then each step as a
subprocess whose whole process tree is polled for resident memory (the sum of VmRSS over the tree, every 0.1 s):

    convert       nextq convert SRC -o IR
    quantize      nextq quantize IR -o Q --recipe int4 --calib-tokens 8192      (the default recipe and calibration:
                  GPTQ on the experts, layer by layer)
    export_gguf   nextq export gguf Q -o model.gguf
    export_onnx   nextq export onnx Q -o onnx
    validate      nextq validate Q --reference SRC --window 512 --max-windows 8  (both sides layer-streamed: the
                  reference is nextq's executor on the bf16 source)
  and, each engine holding its artifact in memory (the reference's logits come from the cache the step above
  wrote, so the engine is all that runs):
    engine_torch  nextq run Q (the torch backend, weights kept packed), 8 new tokens
    engine_gguf   nextq validate model.gguf --reference SRC ... (llama.cpp; N >= 4 only: llama.cpp cannot allocate
                  the KV cache of a model without an attention layer, and layer 3 is the first one)
    engine_onnx   nextq validate onnx --reference SRC ... (ONNX Runtime)
  then the step outputs are removed and the same job runs as one command:
    pipeline      nextq pipeline SRC -o P --window 512 --max-windows 8         (its own per-step table is kept)

Targets (issue 13): every nextq step <= 6 GiB and flat in N (max / min over N <= 1.1); each engine <= its artifact's
size + 1.5 GiB; the torch backend on the N = 4 int4 IR <= 1.3 x the IR's size on disk + 1 GiB; the same for each
step of the pipeline (its own step table; on a source over 1 GiB each step is a process of its own). A drift gate that
fails (exit 1 of `nextq validate`) is not an error here: random weights are not a trained model. Each N's files are
removed before the next N; the disk must hold the source, the step outputs (about the source again) at once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import qwen_tokenizer  # noqa: E402

THREADS = 2
GIB = 1 << 30
STEP_LIMIT = 6 * GIB  # every nextq step
FLAT = 1.10  # max / min peak over N
ENGINE_MARGIN = 1.5 * GIB  # engine peak <= artifact size + this
TORCH_FACTOR, TORCH_MARGIN = 1.3, GIB  # torch backend: <= 1.3 x IR size + 1 GiB
VALIDATION = ["--window", "512", "--max-windows", "8", "--batch-size", "1"]
NEXTQ_STEPS = ("convert", "quantize", "export_gguf", "export_onnx", "validate")


def tree_rss(pid: int) -> int:
    """Resident bytes of process `pid` and all its descendants (Linux /proc); 0 once it is gone."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def timed(args: list[str], log: Path, ok_codes: tuple[int, ...] = (0,), env: dict | None = None) -> dict:
    """Run `args`, polling its process tree: {"wall_s", "peak_rss_gib", "exit"}; raise with the log's tail on a
    failing exit code."""
    peak = 0
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": str(THREADS), **(env or {})})
        done = threading.Event()

        def poll():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(proc.pid))
                done.wait(0.1)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        code = proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        thread.join()
    if code not in ok_codes:
        raise SystemExit(f"error: {' '.join(map(str, args[:4]))}... failed (exit {code}):\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
    return {"wall_s": wall, "peak_rss_gib": peak / GIB, "exit": code}


def size(path: Path) -> int:
    """Bytes on disk of a file or a directory's files."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def has_attention(n: int) -> bool:
    """make_synthetic_checkpoint.py makes layer i full attention when (i + 1) % 4 == 0."""
    return n >= 4


def bench_one(n: int, work: Path, tok: Path, device: str, pipeline: bool, steps_too: bool = True) -> dict:
    d = work / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    src, ir, q, gguf, onnx = d / "hf", d / "ir", d / "q", d / "model.gguf", d / "onnx"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "make_synthetic_checkpoint.py"), "-o", str(src), "--layers", str(n),
                    "--tokenizer", str(tok)], check=True, capture_output=True)
    print(f"[N={n}] synthetic checkpoint in {time.perf_counter() - t0:.0f}s, disk free "
          f"{shutil.disk_usage(work).free / 1e9:.0f} GB", flush=True)
    nextq = shutil.which("nextq") or "nextq"
    dev = ["--device", device]
    cache = ["--cache-dir", str(d / "cache")]
    res: dict = {"layers": n, "source_bytes": size(src), "steps": {}}
    steps = res["steps"]
    plan = {
        "convert": ([nextq, "convert", str(src), "-o", str(ir)], (0,), ir),
        "quantize": ([nextq, "quantize", str(ir), "-o", str(q), "--recipe", "int4", "--calib-tokens", "8192", *dev],
                     (0,), q),
        "export_gguf": ([nextq, "export", "gguf", str(q), "-o", str(gguf)], (0,), gguf),
        "export_onnx": ([nextq, "export", "onnx", str(q), "-o", str(onnx)], (0,), onnx),
        "validate": ([nextq, "validate", str(q), "--reference", str(src), *VALIDATION, *cache, *dev,
                      "--report", str(d / "validate.json")], (0, 1), None),
        "engine_torch": ([nextq, "run", str(q), "--prompt", "def fibonacci(n):", "--max-new-tokens", "8"], (0,), q),
        "engine_gguf": ([nextq, "validate", str(gguf), "--reference", str(src), *VALIDATION, *cache,
                         "--report", str(d / "gguf.json")], (0, 1), gguf),
        "engine_onnx": ([nextq, "validate", str(onnx), "--reference", str(src), *VALIDATION, *cache,
                         "--report", str(d / "onnx.json")], (0, 1), onnx),
    }
    for name, (args, codes, artifact) in plan.items() if steps_too else ():
        if name == "engine_gguf" and not has_attention(n):
            steps[name] = {"skipped": "llama.cpp cannot allocate the KV cache of a model without an attention layer"}
        else:
            steps[name] = timed(args, d / f"{name}.log", codes)
            if artifact is not None:
                steps[name]["artifact_bytes"] = size(artifact)
        if name == "validate":
            steps[name]["metrics"] = json.loads((d / "validate.json").read_text())["metrics"]
        print(f"[N={n}] {name}: {steps[name]}", flush=True)
    for p in (ir, q, gguf, onnx, d / "cache"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if pipeline:
        out = d / "pipeline"
        steps["pipeline"] = timed([nextq, "pipeline", str(src), "-o", str(out), "--window", "512", "--max-windows",
                                   "8", *dev], d / "pipeline.log", env={"NEXTQ_CACHE": str(d / "pipeline-cache")})
        summary = json.loads((out / "summary.json").read_text())
        res["pipeline"] = {"steps": summary.get("steps"), "rows": summary["rows"]}
        print(f"[N={n}] pipeline: {steps['pipeline']}", flush=True)
        print((d / "pipeline.log").read_text(errors="replace")[-4000:], flush=True)
    shutil.rmtree(d)
    return res


def checks(results: list[dict]) -> list[dict]:
    """The issue's targets, each {"target", "value", "limit", "ok"}."""
    rows = []
    for r in results:
        for name, s in r["steps"].items():
            if "peak_rss_gib" not in s:
                continue
            peak = s["peak_rss_gib"] * GIB
            if name == "pipeline":  # its steps are checked one by one below
                continue
            if name in NEXTQ_STEPS:
                limit, what = STEP_LIMIT, f"N={r['layers']} {name} peak <= 6 GiB"
            elif name == "engine_torch":
                limit = TORCH_FACTOR * s["artifact_bytes"] + TORCH_MARGIN
                what = f"N={r['layers']} torch backend peak <= 1.3 x IR ({s['artifact_bytes'] / GIB:.2f} GiB) + 1 GiB"
            else:
                limit = s["artifact_bytes"] + ENGINE_MARGIN
                what = f"N={r['layers']} {name} peak <= artifact ({s['artifact_bytes'] / GIB:.2f} GiB) + 1.5 GiB"
            rows.append({"target": what, "value": peak / GIB, "limit": limit / GIB, "ok": peak <= limit})
        rows.extend(pipeline_checks(r))
    if len(results) > 1:  # the pipeline's own nextq steps too (its whole peak holds the engines' artifacts)
        def pipeline_peaks(r: dict) -> dict[str, float]:
            return {f"pipeline {s['name']}": s["peak_rss"] / GIB for s in (r.get("pipeline") or {}).get("steps") or []
                    if s["kind"] == "nextq" and s.get("peak_rss")}

        for name in (*NEXTQ_STEPS, *(f"pipeline {s}" for s in PIPELINE_NEXTQ_STEPS)):
            peaks = [r["steps"][name]["peak_rss_gib"] for r in results if "peak_rss_gib" in r["steps"].get(name, {})]
            peaks += [p[name] for p in map(pipeline_peaks, results) if name in p]
            if len(peaks) > 1:
                ratio = max(peaks) / min(peaks)
                rows.append({"target": f"{name} flat in N (max / min peak <= {FLAT})", "value": ratio,
                             "limit": FLAT, "ok": ratio <= FLAT})
    return rows


PIPELINE_NEXTQ_STEPS = ("convert", "quantize", "export gguf", "export onnx", "validate ir")
PIPELINE_ENGINES = {"run ir (torch)": "ir", "validate gguf": "gguf", "validate onnx": "onnx"}  # step -> its row


def pipeline_checks(r: dict) -> list[dict]:
    """The same targets for the steps of `nextq pipeline` (its own step table: each step's peak RSS), each engine
    step against the artifact it holds (the summary's row of that format)."""
    if "pipeline" not in r:
        return []
    sizes = {row["format"].split(" ")[0]: row["size_bytes"] for row in r["pipeline"]["rows"]}
    rows = []
    for s in r["pipeline"]["steps"] or []:
        if s.get("peak_rss") is None:
            continue
        what = f"N={r['layers']} pipeline {s['name']}"
        fmt = PIPELINE_ENGINES.get(s["name"])
        if s["kind"] == "nextq":
            limit, what = STEP_LIMIT, what + " peak <= 6 GiB"
        elif fmt == "ir":
            limit = TORCH_FACTOR * sizes["ir"] + TORCH_MARGIN
            what += f" peak <= 1.3 x IR ({sizes['ir'] / GIB:.2f} GiB) + 1 GiB"
        elif fmt in sizes:
            limit = sizes[fmt] + ENGINE_MARGIN
            what += f" peak <= artifact ({sizes[fmt] / GIB:.2f} GiB) + 1.5 GiB"
        else:  # the original run by transformers: not one of nextq's steps
            continue
        rows.append({"target": what, "value": s["peak_rss"] / GIB, "limit": limit / GIB,
                     "ok": s["peak_rss"] <= limit})
    return rows


def table(results: list[dict]) -> str:
    head = f"{'N':>2} {'step':<13} {'wall s':>8} {'s / layer':>9} {'peak RSS GiB':>12} {'artifact GiB':>12} {'note'}"
    lines = [head, "-" * len(head)]
    for r in results:
        n = r["layers"]
        for name, s in r["steps"].items():
            if "skipped" in s:
                lines.append(f"{n:>2} {name:<13} {'':>8} {'':>9} {'':>12} {'':>12} skipped: {s['skipped']}")
                continue
            art = f"{s['artifact_bytes'] / GIB:.2f}" if "artifact_bytes" in s else ""
            note = ""
            if "metrics" in s:
                m = s["metrics"]
                note = f"KLD {m['kld_mean']:.4f}, top-1 {m['top1']:.3f}, PPL ratio {m['ppl_ratio']:.4f}"
            lines.append(f"{n:>2} {name:<13} {s['wall_s']:>8.1f} {s['wall_s'] / n:>9.1f} {s['peak_rss_gib']:>12.2f} "
                         f"{art:>12} {note}")
        for s in (r.get("pipeline") or {}).get("steps") or []:
            if s.get("note", "").startswith("skipped"):
                lines.append(f"{n:>2}   {s['name']:<24} skipped: {s['note'][9:]}")
                continue
            peak = "" if s.get("peak_rss") is None else f"{s['peak_rss'] / GIB:.2f}"
            lines.append(f"{n:>2}   {s['name']:<24} {s['wall_s']:>8.1f} {s['wall_s'] / n:>9.1f} {peak:>12}")
    if results and results[-1]["layers"] > results[0]["layers"]:  # the slope from the smallest to the largest N
        lo, hi = results[0], results[-1]
        dn = hi["layers"] - lo["layers"]
        parts = [f"{k} {(hi['steps'][k]['wall_s'] - lo['steps'][k]['wall_s']) / dn:.1f}"
                 for k in hi["steps"] if "wall_s" in hi["steps"][k] and "wall_s" in lo["steps"].get(k, {})]
        lines.append(f"marginal s per layer (N={lo['layers']} -> {hi['layers']}): {', '.join(parts)}")
    lines.append("")
    for c in checks(results):
        lines.append(f"{'ok  ' if c['ok'] else 'MISS'} {c['target']}: {c['value']:.2f} (limit {c['limit']:.2f})")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,2,4", help="Comma-separated layer counts.")
    ap.add_argument("--pipeline-layers", help="Layer counts that also run `nextq pipeline` (default: all).")
    ap.add_argument("--step-layers", help="Layer counts that run the steps as separate commands (default: all).")
    ap.add_argument("--device", default="cpu", help="--device of quantize, validate and pipeline.")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "nextq-bench-scale")
    ap.add_argument("--json", type=Path, default=Path("bench_scale.json"))
    ap.add_argument("--render", nargs="+", type=Path, metavar="JSON",
                    help="Only print the table and checks of saved runs (their results in order of N).")
    args = ap.parse_args()
    if args.render:
        results = [r for f in args.render for r in json.loads(f.read_text())["results"]]
        print(table(sorted(results, key=lambda r: r["layers"])))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    tok = args.work / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        qwen_tokenizer.build(tok)
    layers = [int(x) for x in args.layers.split(",")]
    with_pipeline, with_steps = ({*layers} if v is None else {int(x) for x in v.split(",") if x}
                                 for v in (args.pipeline_layers, args.step_layers))
    doc = {"threads": THREADS, "device": device_name(args.device), "results": []}
    for n in layers:
        doc["results"].append(bench_one(n, args.work, tok, args.device, n in with_pipeline, n in with_steps))
        doc["checks"] = checks(doc["results"])
        args.json.write_text(json.dumps(doc, indent=1))
        print(table(doc["results"]), flush=True)


def device_name(device: str) -> str:
    """What the steps ran on: the CPU model and core count, plus the GPU's name for cuda."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    name = f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GIB:.0f} GiB"
    if device.startswith("cuda"):
        import torch

        name += f"; {torch.cuda.get_device_name()}"
    return name


if __name__ == "__main__":
    main()
