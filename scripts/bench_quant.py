"""Quantization drift of nextq's recipes vs llama.cpp's own quantization of the same models, in one run.

    python scripts/bench_quant.py [HF_DIR ...] [--work DIR] [--windows 8] [--seq 256] [--recipes int4,q4_k_m]

HF_DIR defaults to two models: the embedded trained tiny model (128-wide rows: llama.cpp falls back from K-quants)
and a second, differently trained one with 256-wide rows and 24 experts, built once by scripts/train_tiny.py
(`--preset wide`, WIDE_TRAINING below: 320 steps of 16 x 256 tokens, about 30 minutes on 2 idle cores, held-out
perplexity 59.6) into the cache ($NEXTQ_CACHE or ~/.cache/nextq).
Held-out text: HF_DIR/heldout.txt (else the embedded model's), tokenized with the model's tokenizer, the first
`windows` windows of `seq` tokens; every model sees exactly those ids. Calibration text:
`calibrate.default_calibration_text()` (standard-library modules; any module found in the held-out text is
skipped, so calibration never sees evaluation text), `--calib-tokens` tokens in windows of 256; llama.cpp's
`llama-imatrix` (built by scripts/llama_cpp_tools.py) reads the same text in chunks of 256.

nextq, torch runtime (float32) against the unquantized IR: each built-in recipe with round-to-nearest, GPTQ and
awmse (int4 recipes). nextq, GGUF evaluated in llama.cpp against llama.cpp's own F32 file: the K-quant recipe
`q4_k_m` (RTN, awmse = importance-weighted search with per-expert statistics, GPTQ on the K-quant grid) and
`--target-bpw` allocations at the bits per weight of llama.cpp's Q4_K_M and IQ4_XS made with an imatrix.
llama.cpp (llama-cpp-python 0.3.36, its vendored convert_hf_to_gguf.py): HF -> F32 GGUF -> llama_model_quantize to
Q8_0, Q6_K, Q4_K_M, Q4_0, IQ4_XS, and llama-quantize --imatrix to Q4_K_M and IQ4_XS -> llama_cpp.Llama with logits
for every position and an f32 KV cache (type_k = type_v = 0). (Its F32 logits are also compared with nextq's
reference, as a check that both engines run the same model.)

Metrics per candidate vs its engine's reference, over all positions: mean and p99 KL(P_ref || P_cand) in nats,
perplexity ratio (next-token), top-1 agreement, bits per weight over all stored tensors (GGUF: tensor data bytes /
elements; nextq IR: stored bytes of every tensor / parameters), weight bytes, file size, and for nextq the share of
experts calibrated. Results: WORK/<model>/bench_quant.json, WORK/bench_quant.md (every model, side by side) and the
acceptance ratios of issue 20 (nextq q4_k_m-class / llama.cpp Q4_K_M + imatrix, --target-bpw / IQ4_XS + imatrix).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nextq.convert.cli import convert
from nextq.convert.gguf_export import export_gguf
from nextq.graph import Graph
from nextq.pipeline import embedded_model
from nextq.errors import RecipeError
from nextq.quant import allocate, calibrate
from nextq.quant.apply import quantize_graph
from nextq.quant.recipes import RECIPES
from nextq.runtime.model import TorchModel
from nextq.validate.metrics import kl_divergence, perplexity, top1_agreement

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_converter  # noqa: E402  (scripts/llama_cpp_converter.py)
import llama_cpp_tools  # noqa: E402  (scripts/llama_cpp_tools.py: llama-imatrix, llama-quantize)

GGUF_TYPES = {"Q8_0": 7, "Q6_K": 18, "Q4_K_M": 15, "Q4_0": 2, "IQ4_XS": 30}  # llama_ftype values (llama.h)
IMATRIX_TYPES = ("Q4_K_M", "IQ4_XS")  # also made with llama.cpp's own imatrix of the calibration text
KQUANT_RECIPE = "q4_k_m"
# the second model: scripts/train_tiny.py with these arguments (256-wide rows, 24 experts, its own tokenizer)
WIDE_TRAINING = ("--preset", "wide", "--steps", "320", "--seq", "256", "--batch", "16", "--vocab", "4096", "--seed",
                 "1", "--threads", "2")
WIDE_CACHE = "bench-quant-wide-320x16x256"  # its directory in the cache: a new WIDE_TRAINING needs a new name


def cache_root() -> Path:
    return Path(os.environ.get("NEXTQ_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "nextq")


def wide_model() -> Path:
    """The second benchmark model, trained once by scripts/train_tiny.py (WIDE_TRAINING) and cached."""
    out = cache_root() / WIDE_CACHE
    if not (out / "model.safetensors").is_file():
        print(f"training the second model into {out} (scripts/train_tiny.py {' '.join(WIDE_TRAINING)})", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "train_tiny.py"), *WIDE_TRAINING,
                        "-o", str(out)], check=True, preexec_fn=lambda: os.nice(10))
    return out


def windows_of(tokenizer, text: str, n: int, length: int) -> np.ndarray:
    tokenizer.model_max_length = 1 << 62  # one long text, cut into windows: silence the max-length warning
    ids = tokenizer(text)["input_ids"]
    if len(ids) < n * length:
        raise SystemExit(f"held-out text: {len(ids)} tokens, need {n} x {length}")
    return np.asarray(ids[: n * length], dtype=np.int64).reshape(n, length)


def drift(ref: np.ndarray, cand: np.ndarray, ids: np.ndarray) -> dict:
    """ref, cand: logits [B, T, V]; ids [B, T]."""
    kld = kl_divergence(ref, cand).reshape(-1)
    ppl_ref = perplexity(ref[:, :-1], ids[:, 1:])
    ppl = perplexity(cand[:, :-1], ids[:, 1:])
    return {"kld_mean": float(kld.mean()), "kld_p99": float(np.quantile(kld, 0.99)), "ppl": ppl,
            "ppl_ratio": ppl / ppl_ref, "top1": top1_agreement(ref, cand)}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def torch_logits(ir: Path, ids: np.ndarray) -> np.ndarray:
    model = TorchModel(Graph.load(ir), "cpu", torch.float32)
    return np.concatenate([model.forward(torch.from_numpy(w[None])).numpy() for w in ids])


# ---- nextq --------------------------------------------------------------------------------------------------


def calibration(ir: Path, heldout: str, calib_tokens: int) -> tuple[torch.Tensor, str]:
    """Calibration windows [n, 256] and the text they come from (llama-imatrix reads the same text)."""
    from nextq.runtime.backends import load_tokenizer

    tok = load_tokenizer(ir)
    tok.model_max_length = 1 << 62
    text = calibrate.default_calibration_text(exclude=heldout)
    return calibrate.token_windows(tok(text)["input_ids"], max(1, calib_tokens // 256), 256), text


def bench_nextq(graph: Graph, work: Path, ref: np.ndarray, ids: np.ndarray, stats, recipes: list[str], log
                ) -> list[dict]:
    """nextq's recipes in the torch runtime against the unquantized IR (K-quant recipes: see bench_nextq_gguf)."""
    rows = []
    for name in recipes:
        recipe = RECIPES[name]
        if recipe.mix:
            continue
        int4 = "int4" in recipe.experts
        for method in ("rtn", "gptq", "awmse") if int4 else ("rtn",):
            out = work / f"nextq-{name}-{method}"
            t0 = time.perf_counter()
            try:
                report = quantize_graph(graph, recipe, out, force=True, stats=None if method == "rtn" else stats,
                                        method="gptq" if method == "rtn" else method)
            except RecipeError as e:  # e.g. a group size that does not divide this model's widths
                log(f"skipped {name}: {e}")
                break
            q_s = time.perf_counter() - t0
            cand = torch_logits(out, ids)
            cov = report["calibration"]
            row = {"engine": "nextq", "model": f"{name} ({method})", "recipe": name, "method": method,
                   "bits_per_weight": report["bits_per_weight"], "weight_bytes": report["bytes"],
                   "file_bytes": dir_bytes(out),
                   "coverage": cov["coverage"] if cov else None, "quantize_s": q_s, **drift(ref, cand, ids)}
            rows.append(row)
            log(json.dumps(row))
    return rows


def nextq_gguf_row(graph: Graph, recipe, method: str, stats, work: Path, label: str, ids: np.ndarray,
                   llama_ref: np.ndarray, log) -> dict:
    """Quantize with `recipe`, export GGUF, evaluate it in llama.cpp against llama.cpp's own F32 file."""
    out = work / f"nextq-{label}"
    t0 = time.perf_counter()
    report = quantize_graph(graph, recipe, out, force=True, stats=None if method == "rtn" else stats,
                            method="gptq" if method == "rtn" else method)
    gguf_path = work / f"nextq-{label}.gguf"
    export_gguf(Graph.load(out), gguf_path, force=True)
    q_s = time.perf_counter() - t0
    bits, nbytes, _ = gguf_bits(gguf_path)
    cov = report["calibration"]
    row = {"engine": "nextq", "model": f"{label} -> GGUF", "recipe": recipe.name, "method": method,
           "bits_per_weight": bits, "weight_bytes": nbytes, "file_bytes": gguf_path.stat().st_size,
           "coverage": cov["coverage"] if cov else None, "quantize_s": q_s,
           **drift(llama_ref, llama_logits(gguf_path, ids), ids)}
    log(json.dumps(row))
    return row


def bench_nextq_gguf(graph: Graph, work: Path, ids: np.ndarray, llama_ref: np.ndarray, stats,
                     targets: dict[str, float], log) -> list[dict]:
    """nextq's K-quant recipe (RTN, awmse, GPTQ) and --target-bpw allocations, as GGUF files run by llama.cpp."""
    rows = [nextq_gguf_row(graph, RECIPES[KQUANT_RECIPE], m, stats, work, f"{KQUANT_RECIPE}-{m}", ids, llama_ref,
                           log) for m in ("rtn", "awmse", "gptq")]
    measured = allocate.sensitivity(graph, stats)  # once for every budget
    log(f"--target-bpw sensitivity: {measured[1]} proxy")
    for name, bpw in targets.items():
        target = bpw
        for _ in range(3):  # the IR counts norms and routers as stored (bf16), GGUF writes them F32: correct once
            try:
                recipe, _, summary = allocate.target_recipe(graph, target, stats, measured=measured)
            except RecipeError as e:
                log(f"--target-bpw {target:.3f} ({name}): {e}")
                break
            row = nextq_gguf_row(graph, recipe, "gptq", stats, work, f"target-bpw-{name}", ids, llama_ref, log)
            row["model"] = f"--target-bpw {target:.3f} (= {name}) -> GGUF"
            if row["bits_per_weight"] <= bpw + 1e-6:
                rows.append(row)
                break
            target -= row["bits_per_weight"] - bpw + 1e-3
    return rows


# ---- llama.cpp ----------------------------------------------------------------------------------------------


def gguf_bits(path: Path) -> tuple[float, int, int]:
    """(bits per weight over all tensors, tensor data bytes, number of weights) of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    n = sum(int(t.n_elements) for t in r.tensors)
    return 8 * nbytes / n, nbytes, n


def llama_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ids.shape[1], n_batch=ids.shape[1], n_ubatch=ids.shape[1],
                          logits_all=True, type_k=0, type_v=0, n_threads=2, verbose=False)
    out = []
    for w in ids:
        llm.reset()  # clears the KV cache and the recurrent state
        llm.eval(w.tolist())
        out.append(np.array(llm.scores[: len(w)], dtype=np.float32))
    llm.close()
    return np.stack(out)


def bench_llama_cpp(hf: Path, work: Path, ids: np.ndarray, nextq_ref: np.ndarray, calib_text: str, chunks: int,
                    llama_types: list[str], log) -> tuple[list[dict], np.ndarray, dict]:
    """llama.cpp's types from its own F32 file, with and without its imatrix of the calibration text."""
    import llama_cpp

    src = llama_cpp_converter.source_root(work.parent)
    f32 = work / "model-F32.gguf"
    if not f32.is_file():
        subprocess.run(llama_cpp_converter.converter_command(src, hf, "--outtype", "f32", "--outfile", f32),
                       check=True)
    ref = llama_logits(f32, ids)
    check = drift(nextq_ref, ref, ids)
    log(f"llama.cpp F32 vs nextq reference: {json.dumps(check)}")
    bits, nbytes, n = gguf_bits(f32)
    rows = [{"engine": "llama.cpp", "model": "F32", "bits_per_weight": bits, "weight_bytes": nbytes,
             "file_bytes": f32.stat().st_size, "coverage": None, **drift(ref, ref, ids)}]

    def row(name: str, out: Path, q_s: float) -> dict:
        bits, nbytes, _ = gguf_bits(out)
        r = {"engine": "llama.cpp", "model": name, "bits_per_weight": bits, "weight_bytes": nbytes,
             "file_bytes": out.stat().st_size, "coverage": None, "quantize_s": q_s,
             **drift(ref, llama_logits(out, ids), ids)}
        log(json.dumps(r))
        return r

    for name in llama_types:
        ftype = GGUF_TYPES[name]
        out = work / f"model-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        t0 = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize {name}: returned {rc}")
        rows.append(row(name, out, time.perf_counter() - t0))
    bin_dir = llama_cpp_tools.cache_dir() / "build" / "bin"
    if not all((bin_dir / t).is_file() for t in ("llama-imatrix", "llama-quantize")):
        bin_dir = llama_cpp_tools.build_tools(["llama-imatrix", "llama-quantize"])
    text = work / "calibration.txt"
    text.write_text(calib_text, encoding="utf-8")
    imatrix = work / "imatrix.gguf"
    t0 = time.perf_counter()
    done = subprocess.run([str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(imatrix),
                           "-c", "256", "-b", "256", "--chunks", str(chunks), "-t", "2", "--no-ppl"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"llama-imatrix failed ({done.returncode}):\n{done.stderr[-3000:]}")
    partial = [ln.strip() for ln in done.stderr.splitlines() if "partial data" in ln]
    log(f"llama-imatrix: {chunks} chunks of 256 in {time.perf_counter() - t0:.1f}s; "
        f"{len(partial)} tensors with partial data (experts without tokens)")
    for name in IMATRIX_TYPES:
        out = work / f"model-{name}-imatrix.gguf"
        t0 = time.perf_counter()
        subprocess.run([str(bin_dir / "llama-quantize"), "--imatrix", str(imatrix), str(f32), str(out), name, "2"],
                       check=True, capture_output=True)
        rows.append(row(f"{name} + imatrix", out, time.perf_counter() - t0))
    return rows, ref, {"f32_vs_nextq_reference": check, "gguf_weights": n, "imatrix_partial": partial}


def acceptance(rows: list[dict]) -> dict:
    """Issue 20's ratios: the best nextq q4_k_m-class GGUF at <= Q4_K_M + imatrix's bits per weight over that
    file's mean KLD (target <= 0.8), and --target-bpw at IQ4_XS + imatrix's bits over IQ4_XS's (target <= 0.85)."""
    by = {r["model"]: r for r in rows if r["engine"] == "llama.cpp"}
    out = {}
    for ref_name, pattern, goal in (("Q4_K_M + imatrix", "", 0.8), ("IQ4_XS + imatrix", "IQ4_XS", 0.85)):
        ref = by.get(ref_name)
        if ref is None:
            continue
        cands = [r for r in rows if r["engine"] == "nextq" and r["model"].endswith("-> GGUF")
                 and r["bits_per_weight"] <= ref["bits_per_weight"] + 1e-6
                 and (pattern in r["model"] if pattern else True)]
        if not cands:
            out[ref_name] = {"goal": goal, "ratio": None, "why": "no nextq GGUF at or below its bits per weight"}
            continue
        best = min(cands, key=lambda r: r["kld_mean"])
        out[ref_name] = {"goal": goal, "ratio": best["kld_mean"] / ref["kld_mean"], "nextq": best["model"],
                         "nextq_bpw": best["bits_per_weight"], "llama_bpw": ref["bits_per_weight"],
                         "nextq_kld": best["kld_mean"], "llama_kld": ref["kld_mean"]}
    return out


# ---- report -------------------------------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    lines = ["| engine | model | bits/weight | weights | files | mean KLD | p99 KLD | PPL ratio | top-1 | "
             "experts calibrated |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cov = f"{r['coverage']:.0%}" if r.get("coverage") is not None else "-"
        lines.append(f"| {r['engine']} | {r['model']} | {r['bits_per_weight']:.2f} | {r['weight_bytes'] / 1e6:.2f} MB | "
                     f"{r['file_bytes'] / 1e6:.2f} MB | "
                     f"{r['kld_mean']:.5f} | {r['kld_p99']:.4f} | {r['ppl_ratio']:.4f} | {r['top1']:.2%} | {cov} |")
    return "\n".join(lines) + "\n"


def bench_model(hf: Path, work: Path, args, log) -> dict:
    """Every row for one model (llama.cpp first: its imatrix files' sizes are the --target-bpw budgets)."""
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    heldout = hf / "heldout.txt"
    heldout = heldout if heldout.is_file() else embedded_model() / "heldout.txt"
    held = heldout.read_text()
    ids = windows_of(AutoTokenizer.from_pretrained(hf), held, args.windows, args.seq)
    ir = work / "ir"
    if not (ir / "graph.json").is_file():
        convert(str(hf), ir, force=True)
    graph = Graph.load(ir)
    ref = torch_logits(ir, ids)
    calib, calib_text = calibration(ir, held, args.calib_tokens)
    t0 = time.perf_counter()
    stats = calibrate.collect_stats(graph, calib)
    log(f"{hf.name}: calibration statistics, {calib.numel()} tokens in {time.perf_counter() - t0:.1f}s")
    rows = bench_nextq(graph, work, ref, ids, stats, args.recipes, log)
    extra: dict = {}
    if not args.skip_llama_cpp:
        lrows, llama_ref, extra = bench_llama_cpp(hf, work, ids, ref, calib_text, calib.shape[0], args.llama_types,
                                                  log)
        targets = {name: r["bits_per_weight"] for r in lrows for name in IMATRIX_TYPES
                   if r["model"] == f"{name} + imatrix"}
        rows += bench_nextq_gguf(graph, work, ids, llama_ref, stats, targets, log) + lrows
    return {"model": str(hf), "heldout": str(heldout), "windows": args.windows, "seq": args.seq,
            "calib_tokens": calib.numel(), "rows": rows, "acceptance": acceptance(rows), **extra}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("hf", nargs="*", type=Path, help="HF model directories (default: the embedded model and the "
                                                      "second, 256-wide one)")
    ap.add_argument("--work", type=Path, default=Path("bench-quant"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--recipes", type=lambda v: [r for r in v.split(",") if r],
                    default=[n for n, r in RECIPES.items() if not r.mix],
                    help="comma-separated recipes run in the torch runtime (default: every non-K-quant built-in)")
    ap.add_argument("--llama-types", type=lambda v: v.split(","), default=list(GGUF_TYPES),
                    help="llama.cpp types made without an imatrix (default: %(default)s)")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    args = ap.parse_args()
    models = args.hf or [embedded_model(), wide_model()]
    args.work.mkdir(parents=True, exist_ok=True)
    log_path = args.work / "bench_quant.log"

    def log(msg: str):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    torch.set_num_threads(2)
    md = []
    for hf in models:
        result = bench_model(hf, args.work / hf.name, args, log)
        (args.work / hf.name / "bench_quant.json").write_text(json.dumps(result, indent=1))
        md.append(f"### {hf.name}\n\n{markdown(result['rows'])}\nacceptance: {json.dumps(result['acceptance'])}\n")
    (args.work / "bench_quant.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
