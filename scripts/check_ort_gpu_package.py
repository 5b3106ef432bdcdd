"""Run the ONNX parity suite's core check against the *other* ONNX Runtime package: onnxruntime-gpu (CPU EP).

CI runs tests/test_onnx.py with `onnxruntime` (>= 1.32). This script checks the same exports with
onnxruntime-gpu 1.31.1 installed in a separate virtual environment (the two packages cannot share one):

    python scripts/check_ort_gpu_package.py --venv .venv-ort-gpu [--work DIR]

1. In this environment (torch, transformers, nextq): build the tiny random checkpoints, convert, export fp32
   (every tiny config), int4 and fp8 quantized IRs and an MTP head; compute the references (transformers fp32
   for fp32 exports, nextq's torch runtime for quantized IRs and the MTP head) and save them with the ids.
2. In the venv (numpy + onnxruntime-gpu only; created with pip when missing): run each model.onnx on the CPU
   execution provider, whole sequence and prefill + 5 single-token decode steps through the state I/O.
3. Print one line per case: max |Δ| / max |ref| and PASS/FAIL against the test suite's tolerances.

Not a test: it needs a second onnxruntime install and a few minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = "onnxruntime-gpu==1.31.1"
TOL = {"fp32": 1e-4, "int4": 1e-3, "fp8": 1e-3, "mtp": 1e-4}  # the tolerances of tests/test_onnx.py
PREFILL, STEPS = 7, 5


# ---- child: runs inside the onnxruntime-gpu venv (numpy + onnxruntime only) ---------------------------------


def child(work: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    def session(path: Path):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # as runtime/ort.py
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(sess, ids, extra=None, state=None, start=0):
        """One chunk through the graph; zero state when `state` is None. Returns (outputs, next state)."""
        b, t = ids.shape
        past = {i.name: i.shape for i in sess.get_inputs() if i.name.startswith("past.")}
        if state is None:
            state = {n: np.zeros([b if d == "batch" else 0 if isinstance(d, str) else d for d in s], np.float32)
                     for n, s in past.items()}
        pos = np.ascontiguousarray(np.broadcast_to(np.arange(start, start + t, dtype=np.int64), (b, t)))
        names = [o.name for o in sess.get_outputs()]
        outs = dict(zip(names, sess.run(names, {"input_ids": ids, "position_ids": pos, **(extra or {}), **state})))
        return outs, {n: outs["present." + n[len("past."):]] for n in past}

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    results = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "cases": {}}
    for case in sorted(p for p in work.iterdir() if (p / "ref.npz").is_file()):
        r = dict(np.load(case / "ref.npz"))
        try:
            if (case / "mtp.onnx").is_file():
                outs, _ = run(session(case / "mtp.onnx"), r["ids"], {"hidden": r["hidden"]})
                results["cases"][case.name] = {"whole": rel(outs["logits"], r["logits"])}
                continue
            sess = session(case / "model.onnx")
            ids = r["ids"]
            whole, _ = run(sess, ids)
            last, state = run(sess, ids[:, :PREFILL])
            steps = [last["logits"][:, -1]]
            for i in range(PREFILL, PREFILL + STEPS):
                out, state = run(sess, ids[:, i:i + 1], state=state, start=i)
                steps.append(out["logits"][:, -1])
            results["cases"][case.name] = {"whole": rel(whole["logits"], r["logits"]),
                                           "decode": rel(np.stack(steps, 1), r["logits"][:, PREFILL - 1:])}
        except Exception as e:  # report every case, do not stop at the first failure
            results["cases"][case.name] = {"error": str(e).splitlines()[0][:300]}
    print(json.dumps(results))


# ---- parent: builds exports and references in the nextq environment -----------------------------------------


def prepare(work: Path) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import nextq
    from conftest import CONFIGS, build_checkpoint, hf_logits
    from nextq.convert.cli import convert
    from nextq.convert.onnx_export import export_onnx
    from nextq.graph import Graph
    from nextq.quant import quantize

    ids = torch.randint(0, 96, (2, PREFILL + STEPS), generator=torch.Generator().manual_seed(0))

    def is_linear(n, t):
        return t.dim() == 2 and "norm" not in n and "conv" not in n and n != "embed.weight"

    recipes = {
        "int4": lambda n, t: quantize(t, "int4_sym_g32") if is_linear(n, t) and t.shape[1] % 32 == 0 else t,
        "fp8": lambda n, t: (quantize(t, "fp8_channel" if "experts" in n or n == "lm_head.weight" else "fp8_block128")
                             if is_linear(n, t) else t),
    }
    for name in CONFIGS:
        src = build_checkpoint(work / "src" / name, name)
        convert(str(src), work / "src" / name / "ir", force=True)
        export_onnx(work / "src" / name / "ir", work / f"fp32-{name}", force=True)
        np.savez(work / f"fp32-{name}" / "ref.npz", ids=ids.numpy(), logits=hf_logits(src, ids).numpy())
    src = build_checkpoint(work / "src" / "q", "base", mtp=True, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32)
    convert(str(src), work / "src" / "q" / "ir", force=True)
    for recipe, cast in recipes.items():
        qir = Graph.load(work / "src" / "q" / "ir").save(work / "src" / f"ir-{recipe}", force=True, cast=cast)
        export_onnx(qir, work / recipe, force=True)
        (work / recipe / "mtp.onnx").unlink()  # the MTP graph gets its own case below
        np.savez(work / recipe / "ref.npz", ids=ids.numpy(), logits=nextq.load(qir).logits(ids.numpy()))
    export_onnx(work / "src" / "q" / "ir", work / "mtp", force=True)
    tm = nextq.load(work / "src" / "q" / "ir").model
    hidden = tm.hidden(ids, tm.new_state())
    np.savez(work / "mtp" / "ref.npz", ids=ids[:, 1:].numpy(), hidden=hidden[:, :-1].numpy(),
             logits=tm.mtp_logits(hidden[:, :-1], ids[:, 1:]).numpy())


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", PACKAGE, "numpy"], check=True)
    return py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=Path(".venv-ort-gpu"), help="venv with onnxruntime-gpu (created)")
    ap.add_argument("--work", type=Path, default=Path("ort-gpu-check"), help="scratch directory for the exports")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work)
    py = ensure_venv(args.venv)
    proc = subprocess.run([str(py), __file__, "--child", str(args.work)], capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"onnxruntime {res['onnxruntime']} (providers {res['providers']}), CPU execution provider")
    failed = 0
    for case, r in res["cases"].items():
        tol = TOL[case.split("-")[0]]
        if "error" in r:
            failed += 1
            print(f"FAIL {case:18s} error: {r['error']}")
            continue
        ok = all(v <= tol for v in r.values())
        failed += not ok
        errs = "  ".join(f"{k} {v:.2e}" for k, v in r.items())
        print(f"{'PASS' if ok else 'FAIL'} {case:18s} {errs}  (tol {tol:g})")
    print(f"{len(res['cases']) - failed}/{len(res['cases'])} cases pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
