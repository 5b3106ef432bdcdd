"""Seeded mutation fuzzer for nextq's readers: every mutant must end in a clean nextq error or read fine.

    python scripts/fuzz_readers.py --n 10000 [--readers gguf,ir,ir-quant,hf,report,recipe,onnx] [--seed 0]
                                   [--workers 2] [--budget-s S] [--work DIR] [--json FILE]

Seeds, built locally from the embedded model (no network: the Hub is never asked): its Hugging Face checkpoint
(hf), the converted IR (ir), the IR quantized with `nextq quantize --recipe int4 --no-calibrate` (ir-quant), its
GGUF export (gguf, Q4_0 experts), the float IR's ONNX export (onnx), a validation report and a recipe TOML.
Mutants: byte flips and boundary values (0, 1, 2^31 - 1, 2^32 - 1, 2^63, 2^64 - 1 ...) in the first 64 KiB of the
binary files, truncations; JSON documents (graph.json, config.json, index.json, the report) with keys dropped,
types changed, huge shapes, names pointing outside the directory (absolute, `../`, a symlink); TOML with values
retyped, lines dropped, bytes flipped; the ONNX model's external-data entries (location, offset, length) pointed
outside or past the end, its data file symlinked out or truncated. Each mutant is made and read in a worker: IR and
HF graphs load every tensor (quantized ones are dequantized), GGUF imports whole, an ONNX directory goes through
the check `nextq run` applies before ONNX Runtime sees it (the session itself is ONNX Runtime's, not fuzzed here).

Outcomes: clean (a nextq error), accepted (read fine), raw (any other exception: a bug), escape (the reader opened
or listed a path outside the mutant's directory, seen by an audit hook on open / listdir / scandir / glob /
copyfile, with symlinks resolved), hang (more than --timeout-s of the worker's CPU time, so that a loaded machine
does not count, or 12x that in wall time for a reader blocked without CPU; the worker is killed). A worker may not
allocate more than --max-alloc-gib above its start (RLIMIT_AS): a header claiming 2^40 elements that reached an
allocation would be a MemoryError, a raw outcome. Exit status 1 if any mutant is raw, escape or hang.

Workers run single-threaded (OMP / MKL / OpenBLAS threads = 1, offline Hub flags set), so `--workers` may be the
machine's cores minus one or two; each holds ~0.5 GiB resident (the peak is printed) and at most --max-alloc-gib
more. The closing table gives per reader: mutants, the outcomes, and mutants per second per worker (mutants over
the workers' busy time on that reader).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUTCOMES = ("clean", "accepted", "raw", "escape", "hang")
# a worker is one thread (the parallelism is the workers) and never asks the Hub
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WALL_FACTOR = 12  # a mutant blocked (no CPU used) for this many times --timeout-s of wall time is a hang too
POLL_S = 0.2
PROGRESS_S = 120  # a line of counts so far (clean/accepted/raw/escape/hang per reader) on stderr
HEAD = 1 << 16  # byte mutations land in the first 64 KiB (headers, metadata)
BOUNDARY_INTS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**63,
                 2**64 - 1)
OUTSIDE_NAMES = ("../outside.safetensors", "../../outside.safetensors", "/etc/hostname", "../../../etc/hostname",
                 "sub/../../outside.safetensors", "./../outside.safetensors", "link.safetensors")
ODD_VALUES: tuple[Any, ...] = (None, True, False, 0, -1, 2**64, 1e308, float("nan"), "", "x" * 300, "float32",
                               [], {}, [[[[[]]]]], [2**40, 2**40], {"a": 1})
RECIPE = """name = "fuzz"
base = "int4"
description = "fuzzing seed"

[schemes]
experts = "int4_sym_g32"
lm_head = "int8_g32"
router = "keep"

[[overrides]]
pattern = "layers.0.ffn.experts.*"
scheme = "int8_g32"
"""


# ---- mutators -------------------------------------------------------------------------------------------------


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Byte flips, boundary values or a truncation, in the first 64 KiB."""
    b = bytearray(data)
    head = min(len(b), HEAD)
    kind = rng.choice(("flip", "flip", "boundary", "boundary", "truncate"))
    if kind == "truncate" or not head:
        return bytes(b[:rng.choice((0, 4, 8, 12, 24, rng.randrange(max(1, head)), rng.randrange(max(1, len(b)))))])
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        at = rng.randrange(head)
        if kind == "flip":
            b[at] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        else:
            v = rng.choice(BOUNDARY_INTS)
            width = rng.choice((1, 2, 4, 8))
            at -= at % width if rng.random() < 0.5 else 0
            b[at:at + width] = (v % (1 << 8 * width)).to_bytes(width, "little")
    return bytes(b[:len(data)])


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) inside a JSON document, sampled so that big documents stay cheap."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:8]):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def mutate_json(doc: Any, rng: random.Random, names: tuple[str, ...]) -> Any:
    """One structural mutation: a key dropped, a value retyped, a shape made huge, a name pointed outside."""
    doc = json.loads(json.dumps(doc))
    paths = [p for p in _paths(doc) if p]
    kind = rng.choice(("drop", "retype", "retype", "shape", "outside"))
    if kind == "shape":
        shapes = [p for p in paths if p[-1] == "shape"]
        if shapes:
            p = rng.choice(shapes)
            _get(doc, p[:-1])[p[-1]] = rng.choice(([2**40, 2**40], [2**63], [-1, 4], [0], [], [1] * 9, "big"))
            return doc
    if kind == "outside":
        named = [p for p in paths if p[-1] in names or (len(p) > 1 and p[-2] in names)]
        if named:
            p = rng.choice(named)
            _get(doc, p[:-1])[p[-1]] = rng.choice(OUTSIDE_NAMES)
            return doc
    p = rng.choice(paths)
    parent = _get(doc, p[:-1])
    if kind == "drop":
        del parent[p[-1]]
    else:
        parent[p[-1]] = rng.choice(ODD_VALUES)
    return doc


def mutate_toml(text: str, rng: random.Random) -> bytes:
    lines = text.splitlines()
    kind = rng.choice(("retype", "drop", "bytes"))
    if kind == "bytes":
        return mutate_bytes(text.encode(), rng)
    i = rng.randrange(len(lines))
    if kind == "drop":
        del lines[i]
    elif "=" in lines[i]:
        key = lines[i].split("=", 1)[0]
        lines[i] = key + "= " + rng.choice(('1', 'true', '[1, 2]', '{a = 1}', '"x"', '[[1]]', '2e400', '"int4_sym_g7"',
                                            '"../x"', '[' * 2000, '9' * 5000))
    else:
        lines[i] = rng.choice(("[schemes]", "[[overrides]]", "[overrides]", "x = ", "[[schemes]]"))
    return ("\n".join(lines) + "\n").encode()


# ---- seeds and mutants ----------------------------------------------------------------------------------------


def build_seeds(work: Path) -> dict[str, Path]:
    """The embedded model as hf / ir / ir-quant / gguf seeds, plus a report and a recipe (built once in `work`)."""
    from nextq.cli import main
    from nextq.pipeline import embedded_model

    seeds = work / "seeds"
    out = {"hf": embedded_model(), "ir": seeds / "ir", "ir-quant": seeds / "ir-quant", "gguf": seeds / "model.gguf",
           "onnx": seeds / "onnx", "report": seeds / "report.json", "recipe": seeds / "recipe.toml"}
    steps = [(out["ir"], ["convert", str(out["hf"]), "-o", str(out["ir"])]),
             (out["ir-quant"], ["quantize", str(out["ir"]), "-o", str(out["ir-quant"]), "--recipe", "int4",
                                "--no-calibrate"]),
             (out["gguf"], ["export", "gguf", str(out["ir-quant"]), "-o", str(out["gguf"])]),
             (out["onnx"], ["export", "onnx", str(out["ir"]), "-o", str(out["onnx"])])]
    for target, argv in steps:
        if not target.exists():
            main(argv, standalone_mode=False)
    seeds.mkdir(parents=True, exist_ok=True)
    out["report"].write_text(json.dumps(sample_report(), indent=1))
    out["recipe"].write_text(RECIPE)
    out["bait"] = work / "outside.safetensors"  # a valid shard outside every mutant directory
    shutil.copyfile(next(out["ir"].glob("*.safetensors")), out["bait"])
    return out


def sample_report() -> dict[str, Any]:
    """A valid `nextq validate` report (REPORT_SCHEMA) with per-layer drift."""
    from nextq.validate.report import validate_doc

    metrics = {"ppl_reference": 49.4, "ppl_candidate": 49.56, "ppl_ratio": 1.0033, "ppl_increase": 0.0033,
               "kld_mean": 0.0037, "kld_p99": 0.03, "kld_max": 0.2, "top1": 0.942, "logit_err_max": 1.1,
               "logit_err_mean": 0.1, "positions": 4080}
    layer = {"layer": 0, "mixer": "GatedDeltaNet", "ffn": "SparseMoE", "cumulative_rel": 0.01, "local_rel": 0.01,
             "mixer_rel": 0.002, "ffn_rel": 0.009, "router_flip": 0.01}
    doc = {"format": "nextq-validate-report", "version": 1, "nextq_version": "0.1.0",
           "created": "2026-01-01T00:00:00+00:00", "passed": True,
           "candidate": {"path": "quantized", "backend": "torch"}, "reference": {"path": "tiny", "backend": "torch"},
           "corpus": {"name": "heldout", "sha256": "0" * 64, "tokens": 5000, "window": 256, "stride": 256,
                      "windows": 16, "scored_tokens": 4080},
           "metrics": metrics, "thresholds": {"max_ppl_increase": 0.02, "max_kld": 0.02, "min_top1": 0.9},
           "checks": [{"name": "kld_mean", "value": 0.0037, "op": "<=", "limit": 0.02, "passed": True}],
           "kld_histogram": {"edges": [0.0, 0.1], "counts": [4080]},
           "layers": {"reference": "torch", "windows": 16, "per_layer": [layer], "worst_layer": 0,
                      "top_experts": [{"layer": 0, "expert": 3, "sq_err": 0.1, "rel_err": 0.01, "tokens": 50}]},
           "cache": {"enabled": False, "hit": False, "mode": "none"},
           "timing": {"reference_s": 1.0, "candidate_s": 1.0, "candidate_tokens_per_s": 100.0}, "files": {}}
    assert validate_doc(doc) == [], validate_doc(doc)
    return doc


def _copy_dir(src: Path, dst: Path) -> None:
    """dst as a copy of src's files, hard-linked (mutations replace files, never write through a link)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file():
            try:
                os.link(p, dst / p.name)
            except OSError:
                shutil.copyfile(p, dst / p.name)


def mutate_onnx(model: bytes, rng: random.Random) -> bytes:
    """One external-data entry of one tensor (location, offset or length) pointed outside the directory, past the
    end of its file or retyped, dropped, or the tensor's data_location flipped."""
    import onnx

    m = onnx.load_model_from_string(model)
    t = rng.choice([t for t in m.graph.initializer if t.external_data])
    kind = rng.choice(("value", "value", "value", "drop", "location"))
    if kind == "location":
        t.data_location = onnx.TensorProto.DEFAULT  # the data is then read as inline: empty
    elif kind == "drop":
        del t.external_data[rng.randrange(len(t.external_data))]
    else:
        e = rng.choice(list(t.external_data))
        odd = ("", ".", "-1", "1e3", "0x10", " 1", str(2**63), str(2**64), "9" * 40, "model.onnx", "missing.data")
        e.value = rng.choice(OUTSIDE_NAMES + odd if e.key == "location" else odd + (str(2**24), str(2**31)))
    return m.SerializeToString()


def _replace(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def make_mutant(reader: str, seeds: dict[str, Path], slot: Path, rng: random.Random) -> Path:
    """Write one mutant of `reader`'s seed under `slot` (emptied first); returns the path to read."""
    if slot.exists():
        shutil.rmtree(slot)
    slot.mkdir(parents=True)
    bait = seeds["bait"]
    for where in (slot, slot.parent):  # what `../x` and `../../x` from the mutant directory find
        if not (where / bait.name).exists():
            os.link(bait, where / bait.name)
    if reader == "gguf":
        out = slot / "model.gguf"
        out.write_bytes(mutate_bytes(seeds["gguf"].read_bytes(), rng))
        return out
    if reader == "report":
        out = slot / "report.json"
        doc = json.loads(seeds["report"].read_text())
        out.write_bytes(mutate_bytes(json.dumps(doc).encode(), rng) if rng.random() < 0.3 else
                        json.dumps(mutate_json(doc, rng, ("path",))).encode())
        return out
    if reader == "recipe":
        out = slot / "recipe.toml"
        out.write_bytes(mutate_toml(seeds["recipe"].read_text(), rng))
        return out
    d = slot / "model"
    _copy_dir(seeds[reader], d)
    if reader == "onnx":
        kind = rng.choice(("entry", "entry", "entry", "bytes", "symlink", "truncate"))
        model, data = d / "model.onnx", d / "model.onnx.data"
        if kind == "entry":
            _replace(model, mutate_onnx(model.read_bytes(), rng))
        elif kind == "bytes":
            _replace(model, mutate_bytes(model.read_bytes(), rng))
        elif kind == "symlink":
            link = rng.choice((model, data))
            link.unlink()
            link.symlink_to(rng.choice((bait, Path("/etc/hostname"), Path("../model/model.onnx.data"))))
        else:
            with open(data, "rb") as f:  # a copy, never through the hard link to the seed
                _replace(data, f.read(rng.randrange(data.stat().st_size)))
        return d
    shard = sorted(d.glob("*.safetensors"))[0]
    doc_name = "graph.json" if reader != "hf" else rng.choice(("config.json", "model.safetensors.index.json"))
    kind = rng.choice(("doc", "doc", "shard", "symlink"))
    if kind == "shard":
        _replace(shard, mutate_bytes(shard.read_bytes(), rng))
    elif kind == "symlink":
        shard.unlink()
        shard.symlink_to(rng.choice((bait, Path("/etc/hostname"))))
    else:
        if reader != "hf":  # graph.json may name it; an HF directory would list it (refused, hiding the mutation)
            (d / "link.safetensors").symlink_to(bait)
        if doc_name == "model.safetensors.index.json":
            from nextq.storage import read_header

            doc: Any = {"metadata": {}, "weight_map": {k: shard.name for k in read_header(shard)}}
        else:
            doc = json.loads((d / doc_name).read_text())
        names = ("shard", "assets") if reader != "hf" else ("weight_map",)
        if rng.random() < 0.15:
            data = mutate_bytes(json.dumps(doc).encode(), rng)
        else:
            data = json.dumps(mutate_json(doc, rng, names)).encode()
        _replace(d / doc_name, data)
    return d


# ---- the readers (run in the worker) --------------------------------------------------------------------------


def _read_graph(path: str) -> None:
    import nextq

    g = nextq.read(path)
    for name in g.tensors:
        t = g.get(name)
        if hasattr(t, "dequantize"):
            t.dequantize()


def _read_hf(path: str) -> None:
    from nextq.convert.hf import read_hf

    g = read_hf(path, hash_shards=False)
    for name in g.tensors:
        g.get(name)


def _read_report(path: str) -> None:
    from nextq.validate.report import read_report

    read_report(path)


def _read_recipe(path: str) -> None:
    from nextq.quant.recipes import load_recipe_file

    load_recipe_file(Path(path))


def _read_onnx(path: str) -> None:
    from nextq.runtime.backends import check_onnx_input

    check_onnx_input(Path(path))


def _open_outside(path: str) -> None:
    """The harness's own check: a reader that opens a file outside its directory must be seen as an escape."""
    open(Path(path).parent.parent / "outside.safetensors", "rb").close()


def _raise(path: str) -> None:
    """The harness's own check: a reader that raises something else than a nextq error must be seen as raw."""
    raise KeyError(path)


READERS: dict[str, Callable[[str], None]] = {
    "gguf": _read_graph, "ir": _read_graph, "ir-quant": _read_graph, "hf": _read_hf, "report": _read_report,
    "recipe": _read_recipe, "onnx": _read_onnx,
}
SELF_CHECKS: dict[str, tuple[Callable[[str], None], str]] = {"self-escape": (_open_outside, "escape"),
                                                              "self-raw": (_raise, "raw")}
AUDITED = {"open", "os.listdir", "os.scandir", "glob.glob", "shutil.copyfile", "os.readlink"}


def worker(max_alloc_gib: float, seeds_file: str, warm: list[str]) -> None:
    """Make and read the mutants described on stdin (one JSON line each: reader, mutant kind, rng seed, slot), answer
    one JSON line each on stdout; mutants are made here, so the driver never serialises the workers. Each reader in
    `warm` reads its seed once first, so that lazy imports and first-call costs do not count as a hang."""
    import resource
    import traceback

    from nextq.errors import NextqError

    seeds = {k: Path(v) for k, v in json.loads(Path(seeds_file).read_text()).items()}
    for reader in warm:
        READERS[reader](str(seeds[reader]))
    state: dict[str, Any] = {"root": None, "escapes": []}
    work = os.path.realpath(Path(seeds_file).parent) + os.sep
    # the interpreter's own files (modules imported lazily by a reader, e.g. from a PYTHONPATH entry), unless a
    # directory holds the scratch area itself: then it could hide a mutant's escape
    code = [p for p in sys.path if p and os.path.isdir(p) and not work.startswith(os.path.realpath(p) + os.sep)]
    allowed = tuple(os.path.realpath(p) + os.sep for p in {
        sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.__file__), "/proc", "/sys", "/dev",
        str(Path(__import__("nextq").__file__).resolve().parents[1]), os.environ.get("TMPDIR", "/tmp/none"), *code})

    def audit(event: str, args: tuple) -> None:
        if event not in AUDITED or state["root"] is None or not args or not isinstance(args[0], (str, bytes, Path)):
            return
        p = os.path.realpath(os.fsdecode(args[0]))
        if not (p + os.sep).startswith((state["root"], *allowed)):
            state["escapes"].append(f"{event} {p}")

    vm = int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmSize:"))) * 1024
    limit = vm + int(max_alloc_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.addaudithook(audit)
    print(json.dumps({"ready": True}), flush=True)  # imports done: the driver's clock starts with the first mutant
    for line in sys.stdin:
        job = json.loads(line)
        path = make_mutant(job["mutant"], seeds, Path(job["slot"]), random.Random(job["rng"]))
        root = path if path.is_dir() else path.parent
        state["root"], state["escapes"] = os.path.realpath(root) + os.sep, []
        try:
            (READERS.get(job["reader"]) or SELF_CHECKS[job["reader"]][0])(str(path))
            outcome, detail = "accepted", ""
        except NextqError as e:
            outcome, detail = "clean", str(e)[:300]
        except Exception as e:  # noqa: BLE001  (the point: anything else is a bug, reported with where it came from)
            tb = traceback.extract_tb(e.__traceback__)[-1]
            outcome, detail = "raw", f"{type(e).__name__}: {str(e)[:200]} ({tb.filename}:{tb.lineno})"
        state["root"] = None
        if state["escapes"]:
            outcome, detail = "escape", "; ".join(state["escapes"][:3])
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        print(json.dumps({"outcome": outcome, "detail": detail, "peak_rss": rss}), flush=True)


# ---- the driver -----------------------------------------------------------------------------------------------


class Worker:
    """One worker process with its mutant slot; restarted after a hang."""

    def __init__(self, slot: Path, args: argparse.Namespace, seeds_file: Path, warm: list[str]):
        self.slot, self.args, self.seeds_file, self.warm = slot, args, seeds_file, warm
        self.tmp = slot.parent / f"{slot.name}-tmp"
        self.start()

    def start(self) -> None:
        """Spawn the worker process; `wait_ready` waits for its warm-up (so that many workers warm up at once)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **WORKER_ENV, "TMPDIR": str(self.tmp)}
        cmd = [sys.executable, __file__, "--worker", "--max-alloc-gib", str(self.args.max_alloc_gib),
               "--seeds", str(self.seeds_file), *(f"--warm={r}" for r in self.warm)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.job: dict[str, Any] | None = None

    def wait_ready(self) -> None:
        for attempt in range(3):  # a long run outlives edits to the tree: a worker may start mid-edit, retry
            if self.proc.stdout.readline():
                return
            print(f"fuzz worker failed to start ({self.proc.wait()}), attempt {attempt + 1}", file=sys.stderr)
            time.sleep(30)
            self.start()
        raise RuntimeError("fuzz worker failed to start three times")

    def cpu_s(self) -> float:
        """CPU seconds the worker has used (user + system, /proc/PID/stat)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def overdue(self) -> str | None:
        """Why the current mutant counts as a hang: over the CPU limit, or over the wall limit (blocked)."""
        cpu, wall = self.cpu_s() - self.cpu0, time.monotonic() - self.t0
        if cpu > self.args.timeout_s:
            return f"{cpu:.1f} s of CPU time (limit {self.args.timeout_s} s)"
        if wall > WALL_FACTOR * self.args.timeout_s:
            return f"no answer in {wall:.0f} s of wall time ({cpu:.1f} s CPU): blocked"
        return None

    def submit(self, reader: str, i: int, mutant: str, rng: str) -> None:
        """Have the worker write mutant `mutant` (a reader's kind) of `rng` into its slot and read it as `reader`."""
        self.job, self.t0, self.cpu0 = {"reader": reader, "i": i}, time.monotonic(), self.cpu_s()
        self.proc.stdin.write(json.dumps({"reader": reader, "mutant": mutant, "rng": rng, "slot": str(self.slot)})
                              + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited ({self.proc.wait()}) while reading {self.job}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.start()
        self.wait_ready()


def run(args: argparse.Namespace, n_per_reader: dict[str, int] | None = None) -> dict[str, Counter]:
    """Fuzz `args.readers` with `args.n` mutants each (or `n_per_reader[r]`); print the table; return the counts."""
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seeds = build_seeds(work)
    readers = args.readers.split(",")
    unknown = [r for r in readers if r not in READERS]
    if unknown:
        raise SystemExit(f"--readers: unknown {unknown}; known: {', '.join(READERS)}")
    n_of = n_per_reader or dict.fromkeys(readers, args.n)
    # interleaved: a time budget cuts every reader alike
    jobs = ((i, r) for i in range(max(n_of.values())) for r in readers if i < n_of[r])
    counts: dict[str, Counter] = {r: Counter() for r in readers}
    busy_s: Counter = Counter()  # reader -> worker seconds spent on its mutants (making one + reading it)
    peak_rss = 0
    examples: dict[tuple[str, str], str] = {}
    seeds_file = work / "seeds.json"
    seeds_file.write_text(json.dumps({k: str(v) for k, v in seeds.items()}))
    workers = [Worker(work / "m" / f"w{i}" / "slot", args, seeds_file, readers) for i in range(args.workers)]
    for w in workers:
        w.wait_ready()
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    done = False
    t_start = time.monotonic()

    def feed(w: Worker) -> None:
        nonlocal done
        if done or (deadline and time.monotonic() > deadline):
            done = True
            return
        try:
            i, r = next(jobs)
        except StopIteration:
            done = True
            return
        w.submit(r, i, r, f"{args.seed}:{r}:{i}")

    for name, (_, expect) in SELF_CHECKS.items():  # the detectors work, or nothing below means anything
        workers[0].submit(name, -1, "recipe", "0")
        got = workers[0].result()
        workers[0].job = None
        if got["outcome"] != expect:
            raise SystemExit(f"fuzz harness self-check {name}: expected {expect}, got {got}")
    for w in workers:
        feed(w)
    last = time.monotonic()
    while any(w.job for w in workers):
        if time.monotonic() - last > PROGRESS_S:
            last = time.monotonic()
            print(f"[{last - t_start:.0f} s] " + "  ".join(f"{r} " + "/".join(str(c[o]) for o in OUTCOMES)
                                                         for r, c in counts.items()), file=sys.stderr, flush=True)
        busy = [w for w in workers if w.job]
        ready, _, _ = select.select([w.proc.stdout for w in busy], [], [], POLL_S)
        for w in busy:
            job = w.job
            if w.proc.stdout in ready:
                res = w.result()
            elif why := w.overdue():
                w.kill()
                res = {"outcome": "hang", "detail": why}
            else:
                continue
            r = job["reader"]
            busy_s[r] += time.monotonic() - w.t0
            peak_rss = max(peak_rss, res.get("peak_rss", 0))
            counts[r][res["outcome"]] += 1
            examples.setdefault((r, res["outcome"]), f"#{job['i']}: {res['detail']}")
            if res["outcome"] in ("raw", "escape", "hang"):
                print(f"{r} #{job['i']} {res['outcome']}: {res['detail']}", file=sys.stderr, flush=True)
                keep = work / "findings" / f"{r}-{job['i']}"
                if not keep.exists():
                    shutil.copytree(w.slot, keep, symlinks=True)
            w.job = None
            feed(w)
    for w in workers:
        w.proc.stdin.close()
        w.proc.wait()
    wall = time.monotonic() - t_start
    rates = {r: sum(c.values()) / busy_s[r] if busy_s[r] else 0.0 for r, c in counts.items()}
    print_table(counts, rates)
    print(f"seed {args.seed}, {args.workers} workers, {wall:.0f} s wall, "
          f"worker peak RSS {peak_rss / 2**20:.0f} MiB")
    for (r, o), ex in sorted(examples.items()):
        print(f"  e.g. {r} {o}: {ex[:240]}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "counts": counts, "mutants_per_s_per_worker": rates, "wall_s": wall, "seed": args.seed,
            "workers": args.workers, "worker_peak_rss_bytes": peak_rss,
            "examples": {f"{r} {o}": e for (r, o), e in examples.items()}}, indent=1))
    return counts


def print_table(counts: dict[str, Counter], rates: dict[str, float]) -> None:
    """reader | mutants | clean | accepted | raw | escape | hang | mutants/s per worker, as a Markdown table."""
    head = ("reader", "mutants", *OUTCOMES, "mutants/s/worker")
    rows = [(r, sum(c.values()), *(c[o] for o in OUTCOMES), f"{rates[r]:.2f}") for r, c in counts.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in (head, ["-" * w for w in widths], *rows):
        print("| " + " | ".join(f"{x!s:<{w}}" if i == 0 else f"{x!s:>{w}}" for i, (x, w) in
                                enumerate(zip(row, widths))) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="mutants per reader")
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=5.0, help="a mutant using more CPU seconds is a hang")
    ap.add_argument("--max-alloc-gib", type=float, default=2.0, help="address space a worker may add (RLIMIT_AS)")
    ap.add_argument("--budget-s", type=float, default=0, help="stop feeding new mutants after this many seconds")
    ap.add_argument("--work", default="fuzz-work", help="scratch directory (seeds, mutants, findings)")
    ap.add_argument("--json", help="write the counts and examples here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--seeds", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.max_alloc_gib, args.seeds, args.warm)
        return 0
    counts = run(args)
    bad = sum(c[o] for c in counts.values() for o in ("raw", "escape", "hang"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
