"""Run a candidate and a reference on the same token windows and measure the drift between them.

Each side is a logit source (`open_source`):
    stream        nextq's layer-streamed executor (nextq.runtime.stream.LayerStream) on a lazy graph: an IR
                  directory, or a Hugging Face directory read through nextq's reader. One layer's weights are in
                  memory at a time; the windows' hidden states [W, T, H] are held between layers (at most
                  STREAM_TOKENS tokens per pass), then the LM head runs batch by batch.
    an engine     any backend of `nextq.load(path)`: transformers (an HF directory), torch (an IR, the whole model
                  in memory), llama.cpp (a .gguf file), ort (an ONNX directory).
Default (`backend=None`): an IR is streamed; an HF directory runs in transformers (the judge) when its weights in
float32 fit in TRANSFORMERS_LIMIT bytes, else it is streamed (nextq's executor on the unquantized source, which
tests/test_validate.py pins to transformers); a .gguf / ONNX directory runs in its engine. `--backend` /
`--reference-backend` override it (`stream` or any engine name).

Metrics are accumulated batch by batch (per-position KL, NLL and agreement are kept; logits are not): at most one
batch of logits [B, T, V] per side is in memory, reduced in float64 chunks of CHUNK_ELEMENTS // V positions.

Reference-logits cache (so that validating several candidates against one reference runs it once):
    <cache_dir>/<key>/meta.json + one file per batch, written to a temporary directory and renamed when complete.
    key = sha256 of {reference path, every file's (relative name, size, mtime_ns), backend, window settings
    (corpus sha256, window, stride, number of windows, sha256 of the token ids), cache mode, format version}.
    Modes:
      full   float32 logits [B, T, V] exactly as the source returned them (`logits-NNNNN.npy`): exact metrics,
             so a candidate identical to the reference gives KL 0 and perplexity ratio 1 exactly.
      top-k  per position the reference's k most likely token ids (int32) and their raw logits (float32), its
             log-sum-exp and its NLL of the target (float64) (`topk-NNNNN.npz`). KL is then computed over the k
             tokens plus one bucket holding the rest of the mass (a lower bound, tight when the rest is small),
             top-1 uses the reference's argmax, and the logit error covers the k tokens only.
    `auto` picks full logits when they fit in FULL_CACHE_LIMIT bytes, else top-k with k = DEFAULT_TOP_K (at the
    real model's vocabulary, 8 windows of 512 would be 8 * 512 * 151936 * 4 B = 2.5 GB of full logits).

Source check: when the candidate is an IR converted from the reference directory, the sha256 of every source shard
recorded in its provenance must match the file now (CheckpointError otherwise: the two sides would not describe the
same weights); a streamed source whose files change (size or mtime) while it is read is an error too.

Per-layer drift (when both sides are graphs nextq runs): both are streamed layer by layer (one layer of each held,
through the runtime's own layer functions, routing seen by an Observer) on the reference's hidden states, measuring
    cumulative_rel  ||h_cand - h_ref|| / ||h_ref|| after layer i, the candidate running on its own states;
    local_rel       the layer's own error: ||d_mixer + d_ffn|| / ||update_ref||, where d_mixer is the candidate's
                    minus the reference's mixer update and d_ffn the same for the feed-forward, each computed on
                    the reference's own input to it, and update_ref = layer_ref(h) - h; names the worst layer;
    mixer_rel / ffn_rel   ||d_mixer|| / ||mixer update_ref||, ||d_ffn|| / ||ffn update_ref||;
    router_flip     fraction of tokens whose top-k expert set differs;
and for every routed expert (reference routing, reference input) the squared error of its weighted output, so
that the experts contributing most are named.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nextq.console import console, progress_iter
from nextq.errors import BackendError, CheckpointError
from nextq.runtime.model import Observer
from nextq.storage import sha256_file

from . import metrics
from .corpus import Windows

CACHE_VERSION = 1
FULL_CACHE_LIMIT = 1 << 30  # bytes of float32 reference logits above which `auto` caches top-k
BATCH_LOGITS_BYTES = 256 << 20  # default batch: as many windows (at most 4) as keep one batch's float32 logits below
DEFAULT_TOP_K = 128
KLD_HIST_BINS = 40
CHUNK_ELEMENTS = 1 << 22  # logits per float64 metrics chunk (32 MiB): CHUNK_ELEMENTS // V positions at a time
TRANSFORMERS_LIMIT = 4 << 30  # float32 bytes of an HF reference's weights above which it is streamed
STREAM_TOKENS = 1 << 15  # tokens per layer-streamed pass: bounds the hidden states held at STREAM_TOKENS * H * 4 B


def chunk_rows(vocab: int) -> int:
    """Positions per float64 metrics chunk for a vocabulary of `vocab` tokens."""
    return max(1, CHUNK_ELEMENTS // vocab)


def default_cache_dir() -> Path:
    """$NEXTQ_CACHE/validate, else $XDG_CACHE_HOME/nextq/validate, else ~/.cache/nextq/validate."""
    if os.environ.get("NEXTQ_CACHE"):
        return Path(os.environ["NEXTQ_CACHE"]) / "validate"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nextq" / "validate"


def fingerprint(path: Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of every file of a model path: cheap, and changes when it is rewritten."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path.parent if path.is_file() else path)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in files]


def cache_key(reference: Path, backend: str, windows: Windows, mode: str) -> str:
    doc = {"version": CACHE_VERSION, "reference": str(Path(reference).resolve()), "files": fingerprint(reference),
           "backend": backend, "windows": windows.settings(), "mode": mode}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


# ---- reference batches: computed (and stored) or read back from the cache ------------------------------------


@dataclass
class RefBatch:
    """The reference on one batch: full logits [B, T, V], or top-k (ids, logits [B, T, k], lse [B, T],
    nll [B, T-1])."""

    logits: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logits: np.ndarray | None = None
    lse: np.ndarray | None = None
    nll: np.ndarray | None = None


def to_topk(logits: np.ndarray, targets: np.ndarray, k: int) -> RefBatch:
    """Compress full logits [B, T, V] to the top-k form (targets [B, T-1]), CHUNK_ELEMENTS logits at a time.

    The k ids are sorted by logit, ties by id (the same order a stable argsort gives); which of several tokens
    tied at the k-th logit is kept is argpartition's choice.
    """
    b, t, v = logits.shape
    k = min(k, v)
    flat = logits.reshape(b * t, v)
    ids, lse = np.empty((b * t, k), np.int32), np.empty(b * t)
    rows = chunk_rows(v)
    for s in range(0, b * t, rows):
        x = flat[s:s + rows]
        top = np.argpartition(-x, k - 1, axis=-1)[:, :k] if k < v else np.broadcast_to(np.arange(v), x.shape)
        vals = np.take_along_axis(x, top, -1)
        order = np.lexsort((top, -vals), axis=-1)  # by logit descending, then by id
        ids[s:s + rows] = np.take_along_axis(top, order, -1)
        x64 = x.astype(np.float64)
        m = x64.max(-1, keepdims=True)
        lse[s:s + rows] = (m + np.log(np.exp(x64 - m).sum(-1, keepdims=True)))[:, 0]
    ids = ids.reshape(b, t, k)
    pred, tgt = logits[:, :-1].reshape(-1, v), np.asarray(targets).reshape(-1)  # [B * (T-1), V], [B * (T-1)]
    nll = np.concatenate([metrics.nll(pred[s:s + rows], tgt[s:s + rows]) for s in range(0, tgt.shape[0], rows)] or [np.zeros(0)])
    return RefBatch(topk_ids=ids, topk_logits=np.take_along_axis(logits, ids.astype(np.int64), -1).astype(np.float32),
                    lse=lse.reshape(b, t), nll=nll.reshape(b, t - 1))


class ReferenceCache:
    """One cache entry directory (see the module docstring). `top_k = 0` means full logits."""

    def __init__(self, root: Path, key: str, top_k: int):
        self.dir = Path(root) / key
        self.top_k = top_k
        self.tmp: Path | None = None

    @property
    def complete(self) -> bool:
        return (self.dir / "meta.json").is_file()

    def begin(self) -> None:
        self.tmp = self.dir.parent / f".{self.dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    def put(self, i: int, b: RefBatch) -> None:
        if self.top_k:
            np.savez(self.tmp / f"topk-{i:05d}.npz", ids=b.topk_ids, logits=b.topk_logits, lse=b.lse, nll=b.nll)
        else:
            np.save(self.tmp / f"logits-{i:05d}.npy", b.logits)

    def commit(self, meta: dict[str, Any]) -> None:
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if self.dir.exists():
            shutil.rmtree(self.dir)
        os.replace(self.tmp, self.dir)
        self.tmp = None

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def get(self, i: int) -> RefBatch:
        if self.top_k:
            z = np.load(self.dir / f"topk-{i:05d}.npz")
            return RefBatch(topk_ids=z["ids"], topk_logits=z["logits"], lse=z["lse"], nll=z["nll"])
        return RefBatch(logits=np.load(self.dir / f"logits-{i:05d}.npy", mmap_mode="r"))

    def meta(self) -> dict[str, Any]:
        return json.loads((self.dir / "meta.json").read_text())


# ---- streaming metrics -----------------------------------------------------------------------------------------


@dataclass
class DriftAccumulator:
    """Per-position metrics gathered batch by batch."""

    nll_ref: list[np.ndarray] = field(default_factory=list)
    nll_cand: list[np.ndarray] = field(default_factory=list)
    kld: list[np.ndarray] = field(default_factory=list)
    agree: list[np.ndarray] = field(default_factory=list)
    err_max: float = 0.0
    err_sum: float = 0.0
    err_count: int = 0

    def add(self, ref: RefBatch, cand: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> None:
        """ref: one batch; cand: logits [B, T, V]; targets, mask: [B, T-1]."""
        bi, ti = np.nonzero(mask)  # the n positions scored; logits rows are gathered one chunk at a time
        c = np.asarray(cand)  # [B, T, V]
        t = targets[mask]  # [n]
        if ref.logits is not None:
            r = np.asarray(ref.logits)
        else:
            r_ids, r_logits = ref.topk_ids[:, :-1][mask], ref.topk_logits[:, :-1][mask]  # [n, k]
            r_lp, r_nll = r_logits - ref.lse[:, :-1][mask][:, None], ref.nll[mask]
        rows = chunk_rows(c.shape[-1])
        for s in range(0, t.shape[0], rows):
            sl = slice(s, s + rows)
            cs = c[bi[sl], ti[sl]]  # [rows, V]
            self.nll_cand.append(metrics.nll(cs, t[sl]))
            if ref.logits is not None:
                rs = r[bi[sl], ti[sl]]
                self.nll_ref.append(metrics.nll(rs, t[sl]))
                self.kld.append(metrics.kl_divergence(rs, cs))
                self.agree.append(np.argmax(rs, -1) == np.argmax(cs, -1))
                err = np.abs(cs.astype(np.float64) - rs)
            else:
                self.nll_ref.append(r_nll[sl])
                self.kld.append(metrics.kl_divergence_topk(r_ids[sl], r_lp[sl], cs))
                self.agree.append(r_ids[sl][:, 0] == np.argmax(cs, -1))
                err = np.abs(np.take_along_axis(cs, r_ids[sl].astype(np.int64), -1).astype(np.float64)
                             - r_logits[sl])
            if err.size:
                self.err_max = max(self.err_max, float(err.max()))
                self.err_sum += float(err.sum())
                self.err_count += err.size

    def kld_values(self) -> np.ndarray:
        return np.concatenate(self.kld) if self.kld else np.zeros(0)

    def summary(self) -> dict[str, float]:
        nr, nc, kld = np.concatenate(self.nll_ref), np.concatenate(self.nll_cand), self.kld_values()
        ppl_ref, ppl_cand = float(np.exp(nr.mean())), float(np.exp(nc.mean()))
        return {
            "ppl_reference": ppl_ref,
            "ppl_candidate": ppl_cand,
            "ppl_ratio": ppl_cand / ppl_ref,
            "ppl_increase": ppl_cand / ppl_ref - 1.0,
            "kld_mean": float(kld.mean()),
            "kld_p99": metrics.percentile(kld, 99),
            "kld_max": float(kld.max()),
            "top1": float(np.concatenate(self.agree).mean()),
            "logit_err_max": self.err_max,
            "logit_err_mean": self.err_sum / max(self.err_count, 1),
            "positions": int(kld.size),
        }


def kld_histogram(kld: np.ndarray, bins: int = KLD_HIST_BINS) -> dict[str, list]:
    """Histogram over log10-spaced bins from 1e-6 nats to the max (zeros land in the first bin)."""
    hi = max(float(kld.max()) if kld.size else 1e-6, 1e-5)
    edges = np.concatenate([[0.0], np.logspace(-6, np.log10(hi) + 1e-9, bins)])
    counts, _ = np.histogram(np.clip(kld, 0, hi), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


# ---- logit sources: nextq's layer-streamed executor, or an engine holding the whole model ----------------------


class LogitSource(ABC):
    """Logits of token windows, one batch of windows at a time."""

    backend = "?"

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path, self.device = Path(path), device

    @abstractmethod
    def logits(self, ids: np.ndarray, rows: slice) -> np.ndarray:
        """float32 logits [n, T, V] of the windows ids[rows] (ids: [W, T] int64, the same array on every call)."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "path": str(self.path), "device": self.device}


class EngineLogits(LogitSource):
    """A backend of `nextq.load` (transformers, torch, llama.cpp, ort): the whole model in memory."""

    def __init__(self, path: str | Path, backend: str | None = None, device: str = "cpu", model=None):
        super().__init__(path, device)
        from nextq import load

        self.model = model if model is not None else load(self.path, backend=backend, device=device)
        self.backend = self.model.name

    def logits(self, ids: np.ndarray, rows: slice) -> np.ndarray:
        return self.model.logits(ids[rows])

    def describe(self) -> dict[str, Any]:
        return {**self.model.describe(), "path": str(self.path)}


class StreamLogits(LogitSource):
    """nextq's layer-streamed executor on an IR or a Hugging Face directory (see the module docstring).

    The hidden states of up to STREAM_TOKENS tokens of windows are computed in one pass over the layers and kept;
    `logits` then runs the LM head on the requested rows, starting a new pass when they are not held.
    """

    backend = "stream"

    def __init__(self, path: str | Path, device: str = "cpu", graph=None):
        super().__init__(path, device)
        from nextq.runtime.stream import LayerStream

        self.graph = graph if graph is not None else read_graph(self.path)
        self.stream = LayerStream(self.graph, device=device)
        self.files = fingerprint(self.path)
        self.held = range(0)  # the windows whose hidden states are in self.hidden
        self.hidden: torch.Tensor | None = None

    def logits(self, ids: np.ndarray, rows: slice) -> np.ndarray:
        if not (rows.start in self.held and rows.stop - 1 in self.held):
            self.hidden = None  # free the last pass before the next one
            per_pass = max(rows.stop - rows.start, STREAM_TOKENS // ids.shape[1])
            self.held = range(rows.start, min(rows.start + per_pass, ids.shape[0]))
            tok = torch.from_numpy(np.ascontiguousarray(ids[self.held.start:self.held.stop], dtype=np.int64))
            self.hidden = self.stream.hidden(tok, progress=lambda layers: progress_iter(
                layers, f"{self.path.name}: windows {self.held.start}-{self.held.stop - 1}, layer"))  # [n, T, H]
            if fingerprint(self.path) != self.files:
                raise CheckpointError(f"{self.path}: its files changed (size or mtime) while they were being read")
        part = slice(rows.start - self.held.start, rows.stop - self.held.start)
        return self.stream.logits(self.hidden, part).float().cpu().numpy()


def read_graph(path: Path):
    """The lazy graph of an IR, a .gguf file or a Hugging Face directory (its shards hashed by `check_source`)."""
    import nextq

    if (path / "config.json").is_file() and not (path / "graph.json").is_file():
        from nextq.convert.hf import read_hf

        return read_hf(str(path), hash_shards=False)
    return nextq.read(path)


def fp32_weight_bytes(path: Path) -> int:
    """4 bytes per stored weight element of a Hugging Face directory's shards (headers only)."""
    from nextq.storage import DTYPES, read_header

    total = 0
    for shard in sorted(path.glob("*.safetensors")):
        for st in read_header(shard).values():
            total += (st.end - st.begin) // DTYPES[st.dtype].itemsize * 4
    return total


def default_backend(path: Path) -> str:
    """The logit source a path implies (module docstring): `stream` for an IR and for an HF directory too large for
    transformers, else the engine nextq.load infers."""
    from nextq.runtime.backends import infer_backend

    backend = infer_backend(path)
    if backend == "torch" or (backend == "transformers" and fp32_weight_bytes(path) > TRANSFORMERS_LIMIT):
        return "stream"
    return backend


def open_source(path: str | Path, backend: str | None = None, device: str = "cpu") -> LogitSource:
    """The logit source for `path`: `backend` (`stream` or an engine name) or the default for the path."""
    path = Path(path)
    backend = backend or default_backend(path)
    if backend == StreamLogits.backend:
        return StreamLogits(path, device)
    return EngineLogits(path, backend, device)


def shard_sha256(path: Path) -> str:
    """sha256 of a file, remembered for as long as its size and mtime stay the same (one read per process)."""
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def check_source(candidate: Path, reference: Path) -> None:
    """CheckpointError when IR `candidate` was converted from directory `reference` and a shard's sha256 recorded
    in its provenance differs from the file now (or the shard is gone). Anything else is not checked."""
    if not (candidate / "graph.json").is_file() or not reference.is_dir():
        return
    prov = json.loads((candidate / "graph.json").read_text()).get("provenance") or {}
    src = Path(str(prov.get("source", "")))
    if not prov.get("shards") or not src.is_dir() or src.resolve() != reference.resolve():
        return
    for name, want in prov["shards"].items():
        f = reference / name
        if want is None:
            continue
        if not f.is_file():
            raise CheckpointError(f"{f}: source shard missing (listed in the provenance of {candidate})")
        now = shard_sha256(f)
        if now != want:
            raise CheckpointError(f"{f}: source shard changed since {candidate} was converted from it "
                                  f"(sha256 {want[:12]}... in its provenance, {now[:12]}... now)")


# ---- the comparison ----------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Everything a report needs."""

    candidate: dict[str, Any]
    reference: dict[str, Any]
    windows: Windows
    metrics: dict[str, float]
    kld: np.ndarray  # [positions] per-position KL, nats
    cache: dict[str, Any]
    timing: dict[str, float]
    layers: dict[str, Any] | None = None


def batches(n: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def default_batch_size(window: int, vocab: int | None) -> int:
    """Windows per forward when none is asked for: up to 4, fewer where one batch's float32 logits [B, T, V] would
    pass BATCH_LOGITS_BYTES (Qwen3-Next's 151,936 logits x 512 positions: 311 MB a window, so 1)."""
    return 4 if not vocab else max(1, min(4, BATCH_LOGITS_BYTES // (window * vocab * 4)))


def compare(candidate: str | Path, reference: str | Path, windows: Windows, *, batch_size: int | None = None,
            candidate_backend: str | None = None, reference_backend: str | None = None, device: str = "cpu",
            cache_dir: Path | None = None, cache_top_k: int | None = None, layer_windows: int = 4,
            layer_reference: str | Path | None = None, candidate_source: LogitSource | None = None,
            reference_source: LogitSource | None = None) -> Comparison:
    """Measure candidate vs reference on `windows` (tokenized with the reference's tokenizer).

    batch_size: windows per forward (None: `default_batch_size`).
    backends: `stream`, an engine name, or None for the path's default (module docstring); device: where nextq's
    own executors run (engines other than torch / transformers choose their own).
    cache_dir: None disables the reference-logits cache. cache_top_k: None = auto, 0 = full logits, k = top-k.
    layer_reference: the IR to measure per-layer drift against when the reference itself is not an IR
    (e.g. the converted original while the reference is the Hugging Face checkpoint); 0 layer_windows skips it.
    candidate_source / reference_source: already opened sources (the paths still identify them); a reference
    source is only used when its logits are not cached.
    """
    candidate, reference = Path(candidate), Path(reference)
    check_source(candidate, reference)
    ref_backend = reference_source.backend if reference_source else (reference_backend or default_backend(reference))
    W, T = windows.ids.shape
    batch_size = batch_size or default_batch_size(T, _config_vocab(reference))
    slices = batches(W, batch_size)
    targets, mask = windows.targets, windows.mask

    if cache_top_k is None:
        # the vocabulary is only known after a forward; assume a typical one when deciding (the check is cheap)
        cache_top_k = 0
        ref_vocab = _config_vocab(reference)
        if ref_vocab and W * T * ref_vocab * 4 > FULL_CACHE_LIMIT:
            cache_top_k = DEFAULT_TOP_K
    mode = "full" if cache_top_k == 0 else f"top{cache_top_k}"
    cache = None
    if cache_dir is not None:
        cache = ReferenceCache(cache_dir, cache_key(reference, ref_backend, windows, mode), cache_top_k)
    hit = cache is not None and cache.complete
    cache_info = {"enabled": cache is not None, "hit": hit, "mode": mode, "key": cache.dir.name if cache else None}
    console.print(f"reference logits ({ref_backend}): {'cached' if hit else 'computing'} ({mode}"
                  f"{', ' + str(cache.dir) if cache else ', no cache'})")

    # the reference on every batch first, then the candidate: one model in memory at a time
    kept: list[RefBatch] | None = None  # the reference's batches when there is no cache
    t_ref = t_cand = 0.0
    if not hit:
        source = reference_source or open_source(reference, ref_backend, device)
        kept, t_ref, vocab = reference_pass(source, windows, slices, cache_top_k, cache)
        if cache is not None:
            cache.commit({"reference": str(reference), "backend": ref_backend, "mode": mode, "windows": W,
                          "window": T, "batch_size": batch_size, "seconds": t_ref, "vocab": vocab})
        del source
    cand = candidate_source or open_source(candidate, candidate_backend, device)
    acc = DriftAccumulator()
    for i, sl in enumerate(progress_iter(slices, f"validating {candidate.name}")):
        ref = kept[i] if kept is not None else cache.get(i)
        t0 = time.perf_counter()
        logits = cand.logits(windows.ids, sl)
        t_cand += time.perf_counter() - t0
        ref_v = ref.logits.shape[-1] if ref.logits is not None else None
        if ref_v is not None and logits.shape[-1] != ref_v:
            raise BackendError(f"{candidate}: vocabulary {logits.shape[-1]} logits, expected the reference's {ref_v}")
        acc.add(ref, logits, targets[sl], mask[sl])
        del logits, ref
    if hit:
        t_ref = float(cache.meta().get("seconds", 0.0))
    summary = acc.summary()

    layers = None
    layer_ref_path = Path(layer_reference) if layer_reference else reference
    if layer_windows and isinstance(cand, StreamLogits) and (layer_ref_path / "graph.json").is_file():
        layers = graph_drift(cand.graph, read_graph(layer_ref_path), windows.ids[:layer_windows], batch_size, device)
        layers["reference"] = str(layer_ref_path)
    return Comparison(
        candidate={**cand.describe(), "path": str(candidate)},
        reference={"backend": ref_backend, "path": str(reference)},
        windows=windows,
        metrics=summary,
        kld=acc.kld_values(),
        cache=cache_info,
        timing={"reference_s": t_ref, "candidate_s": t_cand,
                "candidate_tokens_per_s": W * T / t_cand if t_cand else 0.0},
        layers=layers,
    )


def reference_pass(source: LogitSource, windows: Windows, slices: list[slice], top_k: int,
                   cache: ReferenceCache | None) -> tuple[list[RefBatch] | None, float, int]:
    """The reference's logits on every batch, stored in `cache` (None: kept and returned, in the cache's form).

    Returns (kept batches or None, seconds, vocabulary). A failure leaves no partial cache entry behind."""
    kept: list[RefBatch] | None = None if cache is not None else []
    seconds, vocab = 0.0, 0
    if cache is not None:
        cache.begin()
    try:
        for i, sl in enumerate(progress_iter(slices, f"reference {source.path.name}")):
            t0 = time.perf_counter()
            full = source.logits(windows.ids, sl)  # [b, T, V]
            seconds += time.perf_counter() - t0
            vocab = full.shape[-1]
            ref = RefBatch(logits=full) if top_k == 0 else to_topk(full, windows.targets[sl], top_k)
            del full
            if cache is not None:
                cache.put(i, ref)
            else:
                kept.append(ref)
    except BaseException:
        if cache is not None:
            cache.abort()
        raise
    return kept, seconds, vocab


def _config_vocab(path: Path) -> int | None:
    for name in ("graph.json", "config.json"):
        f = Path(path) / name
        if f.is_file():
            doc = json.loads(f.read_text())
            return (doc.get("config") or doc).get("vocab_size")
    return None


# ---- per-layer drift (layer-streamed, through the runtime's layer functions) ---------------------------------


def graph_drift(cand, ref, ids: np.ndarray, batch_size: int, device: str, top_experts: int = 10) -> dict[str, Any]:
    """Per-layer hidden-state drift of graph `cand` vs graph `ref` on ids [W, T] (see the module docstring).

    Both run layer-streamed (nextq.runtime.stream): one layer of each side is held at a time, on `device`; the
    layers are the runtime's own functions (`LayerMath.layer_parts`, `.mlp`, `.shared_expert`) and the routing
    comes from an Observer of their MoE blocks.
    """
    from nextq.graph import SparseMoE
    from nextq.runtime.model import LayerState
    from nextq.runtime.stream import LayerStream

    if ref.config != cand.config:
        raise BackendError("per-layer drift: candidate and reference IRs have different configs")
    routes_r, routes_c = _Routes(), _Routes()
    sr, sc = LayerStream(ref, device, observer=routes_r), LayerStream(cand, device, observer=routes_c)
    mr, mc = sr.math, sc.math
    L, E = len(sr.layers), ref.config.num_experts
    sums = {k: np.zeros(L) for k in ("cum_err", "ref_norm", "local_err", "update_norm", "mixer_err", "mixer_norm",
                                     "ffn_err", "ffn_norm", "flips")}
    experts: dict[int, dict[str, np.ndarray]] = {}
    tok = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    xs_r, xs_c = sr.embed(tok), sc.embed(tok)  # [W, T, H], the whole windows' hidden states of each side
    positions = torch.arange(tok.shape[1], device=mr.device)
    slices = batches(ids.shape[0], batch_size)
    for i, (lr, lc) in enumerate(zip(sr.layers, sc.layers)):
        with sr.holding(sr.names(lr)), sc.holding(sc.names(lc)):
            for sl in slices:
                x_r, x_c = xs_r[sl], xs_c[sl]
                mid_r, f_r, y_r = mr.layer_parts(x_r, lr, LayerState(), positions)
                route_r = routes_r.last
                mid_l, _, _ = mc.layer_parts(x_r, lc, LayerState(), positions)  # same input: local error
                y_l = mc.ffn(f_r, lc)  # the candidate's feed-forward on the reference's input to it
                route_c = routes_c.last
                mid_c, _, y_c = mc.layer_parts(x_c, lc, LayerState(), positions)
                out_r, out_c = mid_r + y_r, mid_c + y_c
                out_l = (mid_l - mid_r) + (y_l - y_r) + out_r  # own error only
                sums["cum_err"][i] += float((out_c - out_r).pow(2).sum())
                sums["ref_norm"][i] += float(out_r.pow(2).sum())
                sums["local_err"][i] += float((out_l - out_r).pow(2).sum())
                sums["update_norm"][i] += float((out_r - x_r).pow(2).sum())
                sums["mixer_err"][i] += float((mid_l - mid_r).pow(2).sum())
                sums["mixer_norm"][i] += float((mid_r - x_r).pow(2).sum())
                sums["ffn_err"][i] += float((y_l - y_r).pow(2).sum())
                sums["ffn_norm"][i] += float(y_r.pow(2).sum())
                if isinstance(lr.ffn, SparseMoE):
                    e = _expert_errors(mr, mc, lr.ffn.prefix, route_r, E)
                    acc = experts.setdefault(i, {k: np.zeros_like(v) for k, v in e.items()})
                    for k in e:
                        acc[k] += e[k]
                    ids_r, ids_c = route_r[1], route_c[1]
                    sums["flips"][i] += float((ids_r.sort(-1).values != ids_c.sort(-1).values).any(-1).float().mean())
                xs_r[sl], xs_c[sl] = out_r, out_c

    def rel(a, b):
        return np.sqrt(a / np.maximum(b, 1e-30))

    per_layer = []
    for i, lr in enumerate(sr.layers):
        per_layer.append({
            "layer": i, "mixer": lr.mixer.kind, "ffn": lr.ffn.kind,
            "cumulative_rel": float(rel(sums["cum_err"][i], sums["ref_norm"][i])),
            "local_rel": float(rel(sums["local_err"][i], sums["update_norm"][i])),
            "mixer_rel": float(rel(sums["mixer_err"][i], sums["mixer_norm"][i])),
            "ffn_rel": float(rel(sums["ffn_err"][i], sums["ffn_norm"][i])),
            "router_flip": float(sums["flips"][i] / len(slices)) if i in experts else None,
        })
    worst = max(per_layer, key=lambda r: r["local_rel"])["layer"]
    ranked = []
    for i, e in experts.items():
        for j in range(E + 1):
            if e["tokens"][j] and e["err"][j] > 0:
                ranked.append({"layer": i, "expert": "shared" if j == E else j, "sq_err": float(e["err"][j]),
                               "rel_err": float(rel(e["err"][j], e["ref"][j])), "tokens": int(e["tokens"][j])})
    ranked.sort(key=lambda r: -r["sq_err"])
    return {"windows": int(ids.shape[0]), "per_layer": per_layer, "worst_layer": worst,
            "top_experts": ranked[:top_experts]}


class _Routes(Observer):
    """Keeps the last MoE routing it saw: (tokens x [N, H], ids [N, K], weights [N, K])."""

    last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def on_route(self, prefix: str, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.last = (x, ids, weights)


def _expert_errors(ref, cand, p: str, route: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_experts: int
                   ) -> dict[str, np.ndarray]:
    """Per-expert squared error of the weighted expert outputs of MoE block `p`, on the reference's routing and
    input `route` (x [N, H], ids, weights [N, K]): {"err", "ref", "tokens"} [E + 1], the shared expert at index E.
    `ref`, `cand`: the two sides' LayerMath holding the layer."""
    from nextq.runtime.ops import expert_groups

    x, ids, w = route
    err, refsq, tokens = np.zeros(num_experts + 1), np.zeros(num_experts + 1), np.zeros(num_experts + 1)
    for e, rows, slots in expert_groups(ids, num_experts):
        we = w[rows, slots][:, None].to(x.dtype)
        yr, yc = (we * m.mlp(x[rows], f"{p}.experts.{e}") for m in (ref, cand))
        err[e], refsq[e], tokens[e] = float((yc - yr).pow(2).sum()), float(yr.pow(2).sum()), rows.numel()
    ys_r, ys_c = ref.shared_expert(x, p), cand.shared_expert(x, p)
    err[-1], refsq[-1], tokens[-1] = float((ys_c - ys_r).pow(2).sum()), float(ys_r.pow(2).sum()), x.shape[0]
    return {"err": err, "ref": refsq, "tokens": tokens}
