"""Quantization drift of nextq's recipes vs llama.cpp's own quantization of the same model, in one run.

    python scripts/bench_quant.py [HF_DIR] [--work DIR] [--windows 8] [--seq 256]

HF_DIR defaults to the embedded trained tiny model. Held-out text: HF_DIR/heldout.txt (else the embedded model's),
tokenized with the model's tokenizer, the first `windows` windows of `seq` tokens; every model sees exactly those
ids. Calibration text: `calibrate.default_calibration_text()` (standard-library modules; any module found in the
held-out text is skipped, so calibration never sees evaluation text), `--calib-tokens` tokens in windows of 256.

nextq: HF -> IR (weights as stored) -> each built-in recipe with round-to-nearest, GPTQ and awmse (int4 recipes) ->
torch runtime in float32. Reference: the unquantized IR in the same runtime.
llama.cpp (llama-cpp-python 0.3.36, its vendored convert_hf_to_gguf.py): HF -> F32 GGUF -> llama_model_quantize to
Q8_0, Q6_K, Q4_K_M, Q4_0 -> llama_cpp.Llama with logits for every position and an f32 KV cache (type_k = type_v =
0). Reference: llama.cpp's own F32 model. (Its F32 logits are also compared with nextq's reference, as a check that
both engines run the same model.)

Metrics per candidate vs its engine's reference, over all positions: mean and p99 KL(P_ref || P_cand) in nats,
perplexity ratio (next-token), top-1 agreement, bits per weight over all stored tensors (GGUF: tensor data bytes /
elements; nextq: stored bytes of every tensor / parameters), weight bytes, file size (all files of the model:
nextq's IR directory also holds graph.json, the tokenizer and the quantization report), and for nextq the share of
int4 experts calibrated. Results: WORK/bench_quant.json and WORK/bench_quant.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nextq.convert.cli import convert
from nextq.graph import Graph
from nextq.pipeline import embedded_model
from nextq.errors import RecipeError
from nextq.quant import calibrate
from nextq.quant.apply import quantize_graph
from nextq.quant.recipes import RECIPES
from nextq.runtime.model import TorchModel
from nextq.validate.metrics import kl_divergence, perplexity, top1_agreement

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_converter  # noqa: E402  (scripts/llama_cpp_converter.py)

GGUF_TYPES = {"Q8_0": 7, "Q6_K": 18, "Q4_K_M": 15, "Q4_0": 2}  # llama_ftype values (llama.h)


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


def bench_nextq(hf: Path, work: Path, ids: np.ndarray, heldout: str, calib_tokens: int, log
                ) -> tuple[list[dict], np.ndarray]:
    from nextq.runtime.backends import load_tokenizer

    ir = work / "ir"
    if not (ir / "graph.json").is_file():
        convert(str(hf), ir, force=True)
    graph = Graph.load(ir)
    ref = torch_logits(ir, ids)
    tok = load_tokenizer(ir)
    tok.model_max_length = 1 << 62
    calib = calibrate.token_windows(tok(calibrate.default_calibration_text(exclude=heldout))["input_ids"],
                                    max(1, calib_tokens // 256), 256)
    t0 = time.perf_counter()
    stats = calibrate.collect_stats(graph, calib)
    log(f"calibration statistics: {calib.numel()} tokens in {time.perf_counter() - t0:.1f}s")
    rows = []
    for name, recipe in RECIPES.items():
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
    return rows, ref


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


def bench_llama_cpp(hf: Path, work: Path, ids: np.ndarray, nextq_ref: np.ndarray, log) -> tuple[list[dict], dict]:
    import llama_cpp

    src = llama_cpp_converter.source_root(work)
    f32 = work / "model-F32.gguf"
    if not f32.is_file():
        subprocess.run(llama_cpp_converter.converter_command(src, hf, "--outtype", "f32", "--outfile", f32),
                       check=True)
    ref = llama_logits(f32, ids)
    check = drift(nextq_ref, ref, ids)
    log(f"llama.cpp F32 vs nextq reference: {json.dumps(check)}")
    bits, nbytes, n = gguf_bits(f32)
    rows = [{"engine": "llama.cpp", "model": "F32", "bits_per_weight": bits, "weight_bytes": nbytes,
             "file_bytes": f32.stat().st_size,
             "coverage": None, **drift(ref, ref, ids)}]
    for name, ftype in GGUF_TYPES.items():
        out = work / f"model-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        t0 = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize {name}: returned {rc}")
        q_s = time.perf_counter() - t0
        bits, nbytes, _ = gguf_bits(out)
        row = {"engine": "llama.cpp", "model": name, "bits_per_weight": bits, "weight_bytes": nbytes,
               "file_bytes": out.stat().st_size,
               "coverage": None, "quantize_s": q_s, **drift(ref, llama_logits(out, ids), ids)}
        rows.append(row)
        log(json.dumps(row))
    return rows, {"f32_vs_nextq_reference": check, "gguf_weights": n}


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("hf", nargs="?", type=Path, default=embedded_model())
    ap.add_argument("--work", type=Path, default=Path("bench-quant"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    heldout = args.hf / "heldout.txt"
    heldout = heldout if heldout.is_file() else embedded_model() / "heldout.txt"
    ids = windows_of(AutoTokenizer.from_pretrained(args.hf), heldout.read_text(), args.windows, args.seq)
    log_path = args.work / "bench_quant.log"

    def log(msg: str):
        print(msg, flush=True)
        with open(log_path, "a") as f:
            f.write(msg + "\n")

    torch.set_num_threads(2)
    rows, ref = bench_nextq(args.hf, args.work, ids, heldout.read_text(), args.calib_tokens, log)
    extra = {}
    if not args.skip_llama_cpp:
        lrows, extra = bench_llama_cpp(args.hf, args.work, ids, ref, log)
        rows += lrows
    result = {"model": str(args.hf), "heldout": str(heldout), "windows": args.windows, "seq": args.seq,
              "calib_tokens": args.calib_tokens, "rows": rows, **extra}
    (args.work / "bench_quant.json").write_text(json.dumps(result, indent=1))
    md = markdown(rows)
    (args.work / "bench_quant.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
