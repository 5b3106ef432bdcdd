"""Conversion at 80B scale: nextq's direct path vs llama.cpp's own convert + quantize, on the same checkpoint.

    python scripts/bench_convert.py --layers 1,2,4 --work WORKDIR --json bench_convert.json

For each N: a synthetic checkpoint with the real Qwen3-Next-80B dimensions and N layers (scripts/
make_synthetic_checkpoint.py, with the real Qwen tokenizer from scripts/qwen_tokenizer.py), then, each step a
subprocess under /usr/bin/time -v (wall time and peak RSS):
    nextq      nextq convert SRC --recipe int4 --to gguf            (experts Q4_0, the rest as stored: bf16)
    llama.cpp  convert_hf_to_gguf.py SRC --outtype bf16, then llama_model_quantize -> Q4_0 and -> Q4_K_M
               (llama-cpp-python 0.3.36's vendored converter and quantizer, 2 threads)
and the KL divergence of every output's next-token distribution vs llama.cpp's bf16 GGUF on 64 tokens (logits of
llama.cpp itself, f32 KV cache). llama.cpp's path time for a type = convert + quantize to it; its peak RSS = the max
over the two steps. For the smallest N, nextq's step-by-step path too (nextq convert, nextq quantize --no-calibrate,
nextq export gguf) for int4-compact, and whether its file is byte-identical to the direct one. Disk bound = bytes
read / read bandwidth + bytes written / write bandwidth, the bandwidths measured here on WORKDIR's disk with a 1 GiB
file (written with fsync; read after posix_fadvise DONTNEED, which drops it from the page cache when the kernel
honours it). The source checkpoint was just written, so part of it
may be served from the page cache: the bound is then pessimistic for everyone alike.
Each N's files are removed before the next N.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import llama_cpp_converter  # noqa: E402
import qwen_tokenizer  # noqa: E402

THREADS = 2
N_TOKENS = 64
TEXT = ("The quick brown fox jumps over the lazy dog. In 1859 Charles Darwin published On the Origin of Species, "
        "arguing that populations evolve over generations through natural selection; def f(x): return x * 2 + 1")
RUN_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(rc)
"""
RUN_LOGITS = """
import sys, numpy as np, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_batch=256, logits_all=True, n_threads=int(sys.argv[4]),
                      type_k=0, type_v=0, verbose=False)  # type 0 = GGML_TYPE_F32 KV cache
ids = llm.tokenize(open(sys.argv[2]).read().encode(), add_bos=False)
ids = (ids * (1 + int(sys.argv[5]) // max(1, len(ids))))[:int(sys.argv[5])]
llm.eval(ids)
np.save(sys.argv[3], np.asarray(llm.scores[:len(ids)], np.float32))
"""
QTYPES = {"q4_0": 2, "q4_k_m": 15}  # llama_ftype
# int4: experts Q4_0, the rest bf16; int4-compact: every matrix Q4_0 but lm_head Q8_0 (Q4_0's size)
NEXTQ_RECIPES = ("int4", "int4-compact")


def timed(args: list[str], log: Path) -> dict:
    """Run under /usr/bin/time -v: {"wall_s", "peak_rss_gb"}; raise with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(["/usr/bin/time", "-v", *args], stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(args[:4])}... failed (exit {r.returncode}):\n{text[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1])
    return {"wall_s": wall, "peak_rss_gb": rss_kb / 2**20}


def disk_bandwidth(work: Path, size: int = 1 << 30) -> dict:
    """Sequential write (with fsync) and read (after dropping the file from the page cache) in bytes/s."""
    path = work / "ddtest.bin"
    block = os.urandom(16 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for _ in range(size // len(block)):
        os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
    write = size / (time.perf_counter() - t0)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0 = time.perf_counter()
    while os.read(fd, 16 << 20):
        pass
    read = size / (time.perf_counter() - t0)
    os.close(fd)
    path.unlink()
    return {"write_bps": write, "read_bps": read}


def logits(gguf: Path, text: Path, out: Path, log: Path):
    import numpy as np

    timed([sys.executable, "-c", RUN_LOGITS, str(gguf), str(text), str(out), str(THREADS), str(N_TOKENS)], log)
    return np.load(out)


def kl(ref, got) -> float:
    """Mean over positions of KL(ref || got) of the softmax distributions (nats)."""
    from nextq.validate.metrics import kl_divergence

    return float(kl_divergence(ref, got).mean())


def stepwise(src: Path, d: Path, recipe: str, direct: Path) -> dict:
    """nextq convert -> quantize (round to nearest) -> export gguf: summed wall, max RSS, identical to `direct`."""
    nextq = shutil.which("nextq") or "nextq"
    ir, qir, out = d / "ir", d / f"ir-{recipe}", d / f"stepwise-{recipe}.gguf"
    runs = [timed([nextq, "convert", str(src), "-o", str(ir)], d / "step-convert.log"),
            timed([nextq, "quantize", str(ir), "--recipe", recipe, "--no-calibrate", "-o", str(qir)],
                  d / "step-quantize.log"),
            timed([nextq, "export", "gguf", str(qir), "-o", str(out)], d / "step-export.log")]
    same = filecmp.cmp(out, direct, shallow=False)
    shutil.rmtree(ir)
    shutil.rmtree(qir)
    return {"recipe": recipe, "wall_s": sum(r["wall_s"] for r in runs),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs), "identical": same}


def bench_one(n: int, work: Path, tok: Path, bw: dict, llama_root: Path, with_stepwise: bool) -> dict:
    d = work / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    src = d / "hf"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "make_synthetic_checkpoint.py"), "-o", str(src), "--layers", str(n),
                    "--tokenizer", str(tok)], check=True, capture_output=True)
    print(f"[N={n}] synthetic checkpoint in {time.perf_counter() - t0:.0f}s", flush=True)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    nextq = shutil.which("nextq") or "nextq"
    res: dict = {"layers": n, "source_bytes": src_bytes, "steps": {}}
    steps = res["steps"]
    for recipe in NEXTQ_RECIPES:
        steps[f"nextq_{recipe}"] = timed([nextq, "convert", str(src), "--recipe", recipe, "--to", "gguf",
                                          "-o", str(d / f"nextq-{recipe}.gguf"), "--workers", str(THREADS)],
                                         d / f"nextq-{recipe}.log")
        print(f"[N={n}] nextq {recipe}: {steps[f'nextq_{recipe}']}", flush=True)
    if with_stepwise:
        res["stepwise"] = stepwise(src, d, "int4-compact", d / "nextq-int4-compact.gguf")
        print(f"[N={n}] nextq step by step: {res['stepwise']}", flush=True)
    steps["llama_bf16"] = timed(llama_cpp_converter.converter_command(llama_root, src, "--outtype", "bf16", "--outfile",
                                                                   d / "bf16.gguf", "--no-mtp"), d / "convert.log")
    print(f"[N={n}] llama.cpp convert bf16: {steps['llama_bf16']}", flush=True)
    for q, ftype in QTYPES.items():
        steps[f"llama_{q}"] = timed([sys.executable, "-c", RUN_QUANTIZE, str(d / "bf16.gguf"), str(d / f"{q}.gguf"),
                                     str(ftype), str(THREADS)], d / f"quantize-{q}.log")
        print(f"[N={n}] llama.cpp quantize {q}: {steps[f'llama_{q}']}", flush=True)
    files = {**{f"nextq_{r}": f"nextq-{r}.gguf" for r in NEXTQ_RECIPES}, "llama_bf16": "bf16.gguf",
             **{f"llama_{q}": f"{q}.gguf" for q in QTYPES}}
    for k, f in files.items():
        steps[k]["output_bytes"] = (d / f).stat().st_size
    text = d / "sample.txt"
    text.write_text(TEXT)
    if n >= 4:  # layer 3 is the first full-attention layer
        ref = logits(d / "bf16.gguf", text, d / "bf16.npy", d / "logits-bf16.log")
        for k, f in files.items():
            if k != "llama_bf16":
                steps[k]["kld_vs_bf16"] = kl(ref, logits(d / f, text, d / f"{k}.npy", d / f"logits-{k}.log"))
        steps["llama_bf16"]["kld_vs_bf16"] = 0.0
    else:  # llama.cpp aborts (GGML_ASSERT(buffer)) allocating an empty KV cache for a model without attention
        for k in files:
            steps[k]["kld_vs_bf16"] = float("nan")
    # pipelines: nextq one step; llama.cpp convert + quantize (time summed, RSS max, bytes through the disk)
    bf16 = steps["llama_bf16"]
    pipes = {f"nextq {r}": {**steps[f"nextq_{r}"], "read": src_bytes, "written": steps[f"nextq_{r}"]["output_bytes"]}
             for r in NEXTQ_RECIPES}
    for q in QTYPES:
        s = steps[f"llama_{q}"]
        pipes[f"llama.cpp bf16 -> {q.upper()}"] = {
            "wall_s": bf16["wall_s"] + s["wall_s"], "peak_rss_gb": max(bf16["peak_rss_gb"], s["peak_rss_gb"]),
            "output_bytes": s["output_bytes"], "kld_vs_bf16": s["kld_vs_bf16"],
            "read": src_bytes + bf16["output_bytes"], "written": bf16["output_bytes"] + s["output_bytes"]}
    for p in pipes.values():
        p["disk_bound_s"] = p["read"] / bw["read_bps"] + p["written"] / bw["write_bps"]
    res["pipelines"] = pipes
    shutil.rmtree(d)
    return res


def table(results: list[dict]) -> str:
    head = (f"{'N':>2} {'pipeline':<26} {'wall s':>8} {'x llama Q4_0':>12} {'peak RSS GiB':>12} {'out GB':>7} "
            f"{'KLD vs bf16':>11} {'disk bound s':>12} {'wall/bound':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        base = r["pipelines"]["llama.cpp bf16 -> Q4_0"]["wall_s"]
        for name, p in r["pipelines"].items():
            lines.append(f"{r['layers']:>2} {name:<26} {p['wall_s']:>8.1f} {p['wall_s'] / base:>12.2f} "
                         f"{p['peak_rss_gb']:>12.2f} {p['output_bytes'] / 1e9:>7.2f} {p['kld_vs_bf16']:>11.5f} "
                         f"{p['disk_bound_s']:>12.1f} {p['wall_s'] / p['disk_bound_s']:>10.2f}")
    for r in results:
        if "stepwise" in r:
            st = r["stepwise"]
            lines.append(f"N={r['layers']}: nextq convert -> quantize -> export ({st['recipe']}): "
                         f"{st['wall_s']:.1f} s, peak RSS {st['peak_rss_gb']:.2f} GiB, "
                         f"file byte-identical to the direct path: {st['identical']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,2,4", help="Comma-separated layer counts.")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "nextq-bench-convert")
    ap.add_argument("--json", type=Path, default=Path("bench_convert.json"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tok = args.work / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        qwen_tokenizer.build(tok)
    llama_root = llama_cpp_converter.source_root(Path(tempfile.gettempdir()) / "nextq-llama-sdist")
    bw = disk_bandwidth(args.work)
    print(f"disk: write {bw['write_bps'] / 1e6:.0f} MB/s, read {bw['read_bps'] / 1e6:.0f} MB/s", flush=True)
    doc = {"threads": THREADS, "tokens": N_TOKENS, "disk": bw, "results": []}
    layers = [int(x) for x in args.layers.split(",")]
    for n in layers:
        doc["results"].append(bench_one(n, args.work, tok, bw, llama_root, with_stepwise=(n == min(layers))))
        args.json.write_text(json.dumps(doc, indent=1))
        print(table(doc["results"]), flush=True)


if __name__ == "__main__":
    main()
