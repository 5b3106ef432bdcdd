"""Run a candidate and a reference on the same token windows and measure the drift between them.

Both sides go through `nextq.load(path)`, so either can be any backend: an HF directory (transformers), an IR
directory (torch), a .gguf file (llama.cpp) or an ONNX directory (ONNX Runtime). Windows are evaluated in
batches and reduced on the fly (per-position KL, NLL and agreement are kept; logits are not).

Reference-logits cache (so that validating several candidates against one reference runs it once):
    <cache_dir>/<key>/meta.json + one file per batch, written to a temporary directory and renamed when complete.
    key = sha256 of {reference path, every file's (relative name, size, mtime_ns), backend, window settings
    (corpus sha256, window, stride, number of windows, sha256 of the token ids), cache mode, format version}.
    Modes:
      full   float32 logits [B, T, V] exactly as the backend returned them (`logits-NNNNN.npy`): exact metrics,
             so a candidate identical to the reference gives KL 0 and perplexity ratio 1 exactly.
      top-k  per position the reference's k most likely token ids (int32) and their raw logits (float32), its
             log-sum-exp and its NLL of the target (float64) (`topk-NNNNN.npz`). KL is then computed over the k
             tokens plus one bucket holding the rest of the mass (a lower bound, tight when the rest is small),
             top-1 uses the reference's argmax, and the logit error covers the k tokens only.
    `auto` picks full logits when they fit in FULL_CACHE_LIMIT bytes, else top-k with k = DEFAULT_TOP_K.

Per-layer drift (only when both sides are IR directories run by nextq's torch executor): the layers are run one
by one on the reference's hidden states, measuring
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

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nextq.console import console, progress_iter
from nextq.errors import BackendError

from . import metrics
from .corpus import Windows

CACHE_VERSION = 1
FULL_CACHE_LIMIT = 1 << 30  # bytes of float32 reference logits above which `auto` caches top-k
DEFAULT_TOP_K = 128
KLD_HIST_BINS = 40
ROWS_PER_CHUNK = 512  # positions per float64 metrics chunk: bounds memory at 512 * V * 8 bytes


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
    """Compress full logits [B, T, V] to the top-k form (targets [B, T-1])."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    ids = np.argsort(-logits, axis=-1, kind="stable")[..., :k].astype(np.int32)
    return RefBatch(topk_ids=ids, topk_logits=np.take_along_axis(logits, ids.astype(np.int64), -1).astype(np.float32),
                    lse=lse, nll=metrics.nll(logits[:, :-1], targets))


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
        c = np.asarray(cand)[:, :-1][mask]  # [n, V]
        t = targets[mask]  # [n]
        if ref.logits is not None:
            r = np.asarray(ref.logits)[:, :-1][mask]
        else:
            r_ids, r_logits = ref.topk_ids[:, :-1][mask], ref.topk_logits[:, :-1][mask]  # [n, k]
            r_lp, r_nll = r_logits - ref.lse[:, :-1][mask][:, None], ref.nll[mask]
        for s in range(0, t.shape[0], ROWS_PER_CHUNK):
            sl = slice(s, s + ROWS_PER_CHUNK)
            self.nll_cand.append(metrics.nll(c[sl], t[sl]))
            if ref.logits is not None:
                self.nll_ref.append(metrics.nll(r[sl], t[sl]))
                self.kld.append(metrics.kl_divergence(r[sl], c[sl]))
                self.agree.append(np.argmax(r[sl], -1) == np.argmax(c[sl], -1))
                err = np.abs(c[sl].astype(np.float64) - r[sl])
            else:
                self.nll_ref.append(r_nll[sl])
                self.kld.append(metrics.kl_divergence_topk(r_ids[sl], r_lp[sl], c[sl]))
                self.agree.append(r_ids[sl][:, 0] == np.argmax(c[sl], -1))
                err = np.abs(np.take_along_axis(c[sl], r_ids[sl].astype(np.int64), -1).astype(np.float64)
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


def compare(candidate: str | Path, reference: str | Path, windows: Windows, *, batch_size: int = 4,
            candidate_backend: str | None = None, reference_backend: str | None = None,
            cache_dir: Path | None = None, cache_top_k: int | None = None, layer_windows: int = 4,
            layer_reference: str | Path | None = None, candidate_model=None, reference_model=None) -> Comparison:
    """Measure candidate vs reference on `windows` (tokenized with the reference's tokenizer).

    cache_dir: None disables the reference-logits cache. cache_top_k: None = auto, 0 = full logits, k = top-k.
    layer_reference: the IR to measure per-layer drift against when the reference itself is not an IR
    (e.g. the converted original while the reference is the Hugging Face checkpoint); 0 layer_windows skips it.
    candidate_model / reference_model: already loaded models (the paths still identify them).
    """
    from nextq import load
    from nextq.runtime.backends import infer_backend

    candidate, reference = Path(candidate), Path(reference)
    ref_backend = reference_backend or infer_backend(reference)
    W, T = windows.ids.shape
    slices = batches(W, batch_size)
    targets, mask = windows.targets, windows.mask

    ref_model = reference_model
    vocab = None
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
    console.print(f"reference logits: {'cached' if hit else 'computing'} ({mode}"
                  f"{', ' + str(cache.dir) if cache else ', no cache'})")

    cand_model = candidate_model or load(candidate, backend=candidate_backend)
    acc = DriftAccumulator()
    t_ref = t_cand = 0.0
    if cache is not None and not hit:
        cache.begin()
    try:
        for i, sl in enumerate(progress_iter(slices, f"validating {candidate.name}")):
            ids = windows.ids[sl]
            if hit:
                ref = cache.get(i)
            else:
                if ref_model is None:
                    ref_model = load(reference, backend=reference_backend)
                t0 = time.perf_counter()
                full = ref_model.logits(ids)
                t_ref += time.perf_counter() - t0
                ref = RefBatch(logits=full) if cache_top_k == 0 else to_topk(full, targets[sl], cache_top_k)
                if cache is not None:
                    cache.put(i, ref)
            t0 = time.perf_counter()
            cand = cand_model.logits(ids)
            t_cand += time.perf_counter() - t0
            ref_v = ref.logits.shape[-1] if ref.logits is not None else None
            if ref_v is not None and cand.shape[-1] != ref_v:
                raise BackendError(f"{candidate}: vocabulary {cand.shape[-1]} logits, expected the reference's {ref_v}")
            vocab = cand.shape[-1]
            acc.add(ref, cand, targets[sl], mask[sl])
        if cache is not None and not hit:
            cache.commit({"reference": str(reference), "backend": ref_backend, "mode": mode, "windows": W,
                          "window": T, "batch_size": batch_size, "seconds": t_ref, "vocab": vocab})
    except BaseException:
        if cache is not None:
            cache.abort()
        raise
    if hit:
        t_ref = float(cache.meta().get("seconds", 0.0))
    summary = acc.summary()

    layers = None
    layer_ref_path = Path(layer_reference) if layer_reference else reference
    if layer_windows and _is_torch_ir(candidate, candidate_backend) and _is_torch_ir(layer_ref_path, None):
        from nextq.runtime.backends import TorchBackend

        lref = ref_model if (ref_model is not None and layer_ref_path == reference
                             and isinstance(ref_model, TorchBackend)) else load(layer_ref_path, backend="torch")
        if isinstance(cand_model, TorchBackend):
            layers = layer_drift(cand_model.model, lref.model, windows.ids[:layer_windows], batch_size)
            layers["reference"] = str(layer_ref_path)
    describe = getattr(cand_model, "describe", lambda: {"path": str(candidate)})
    return Comparison(
        candidate={**describe(), "path": str(candidate)},
        reference={"backend": ref_backend, "path": str(reference)},
        windows=windows,
        metrics=summary,
        kld=acc.kld_values(),
        cache=cache_info,
        timing={"reference_s": t_ref, "candidate_s": t_cand,
                "candidate_tokens_per_s": W * T / t_cand if t_cand else 0.0},
        layers=layers,
    )


def _config_vocab(path: Path) -> int | None:
    for name in ("graph.json", "config.json"):
        f = Path(path) / name
        if f.is_file():
            doc = json.loads(f.read_text())
            return (doc.get("config") or doc).get("vocab_size")
    return None


def _is_torch_ir(path: Path, backend: str | None) -> bool:
    return (backend in (None, "torch")) and (Path(path) / "graph.json").is_file()


# ---- per-layer drift (torch IRs) -------------------------------------------------------------------------------


def _layer_parts(m, x: torch.Tensor, layer, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """One decoder layer split as TorchModel.layer computes it: (x + mixer update, ffn input, ffn update)."""
    from nextq.graph import GatedDeltaNet
    from nextq.runtime.model import LayerState

    h = m.norm(x, f"{layer.prefix}.input_norm.weight")
    if isinstance(layer.mixer, GatedDeltaNet):
        h = m.deltanet(h, layer.mixer.prefix, LayerState())
    else:
        h = m.attention(h, layer.mixer.prefix, LayerState(), positions)
    x = x + h
    f_in = m.norm(x, f"{layer.prefix}.post_norm.weight")
    return x, f_in, m.ffn(f_in, layer)


def _expert_errors(ref, cand, layer, f_in: torch.Tensor) -> tuple[dict[str, np.ndarray], float]:
    """Per-expert squared error of the weighted expert outputs, reference routing and input. f_in: [B, T, H].

    Returns ({"err": [E], "ref": [E], "tokens": [E]} plus the shared expert at index E), router flip rate.
    """
    from nextq.runtime.ops import route, swiglu

    c, p = ref.config, layer.ffn.prefix
    x = f_in.reshape(-1, f_in.shape[-1]).float()  # [N, H]
    w, ids = route(F.linear(x, ref.w[f"{p}.router.weight"].float()), c.num_experts_per_tok, c.norm_topk_prob)
    _, ids_c = route(F.linear(x, cand.w[f"{p}.router.weight"].float()), c.num_experts_per_tok, c.norm_topk_prob)
    flips = float((ids.sort(-1).values != ids_c.sort(-1).values).any(-1).float().mean())
    E = c.num_experts
    err, refsq, tokens = np.zeros(E + 1), np.zeros(E + 1), np.zeros(E + 1)
    for e in range(E):
        rows, slot = (ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        we = w[rows, slot][:, None]
        args = [f"{p}.experts.{part}" for part in ("gate", "up", "down")]
        yr = we * swiglu(x[rows], *(ref.w[a][e].float() for a in args))
        yc = we * swiglu(x[rows], *(cand.w[a][e].float() for a in args))
        err[e], refsq[e], tokens[e] = float((yc - yr).pow(2).sum()), float(yr.pow(2).sum()), rows.numel()

    def shared(m):
        s = [m.w[f"{p}.shared.{part}.weight"].float() for part in ("gate", "up", "down")]
        return torch.sigmoid(F.linear(x, m.w[f"{p}.shared_gate.weight"].float())) * swiglu(x, *s)

    ys_r, ys_c = shared(ref), shared(cand)
    err[E], refsq[E], tokens[E] = float((ys_c - ys_r).pow(2).sum()), float(ys_r.pow(2).sum()), x.shape[0]
    return {"err": err, "ref": refsq, "tokens": tokens}, flips


@torch.no_grad()
def layer_drift(cand, ref, ids: np.ndarray, batch_size: int = 4, top_experts: int = 10) -> dict[str, Any]:
    """Per-layer hidden-state drift of TorchModel `cand` vs TorchModel `ref` on ids [W, T] (see module docstring)."""
    from nextq.graph import SparseMoE

    if ref.config != cand.config:
        raise BackendError("per-layer drift: candidate and reference IRs have different configs")
    L = len(ref.layers)
    sums = {k: np.zeros(L) for k in ("cum_err", "ref_norm", "local_err", "update_norm", "mixer_err", "mixer_norm",
                                     "ffn_err", "ffn_norm", "flips")}
    experts: dict[int, dict[str, np.ndarray]] = {}
    n_batches = 0
    for sl in batches(ids.shape[0], batch_size):
        tok = torch.from_numpy(np.asarray(ids[sl], dtype=np.int64)).to(ref.device)
        positions = torch.arange(tok.shape[1], device=ref.device)
        x_r = F.embedding(tok, ref.w["embed.weight"]).float()
        x_c = F.embedding(tok, cand.w["embed.weight"]).to(cand.dtype)
        n_batches += 1
        for i, (lr, lc) in enumerate(zip(ref.layers, cand.layers)):
            mid_r, f_r, y_r = _layer_parts(ref, x_r.to(ref.dtype), lr, positions)
            mid_l, _, _ = _layer_parts(cand, x_r.to(cand.dtype), lc, positions)  # same input: local error
            y_l = cand.ffn(f_r.to(cand.dtype), lc)  # candidate ffn on the reference's ffn input
            mid_c, _, y_c = _layer_parts(cand, x_c, lc, positions)
            out_r, out_c = (mid_r + y_r).float(), (mid_c + y_c).float()
            out_l = (mid_l.float() - mid_r.float()) + (y_l.float() - y_r.float()) + out_r  # own error only
            sums["cum_err"][i] += float((out_c - out_r).pow(2).sum())
            sums["ref_norm"][i] += float(out_r.pow(2).sum())
            sums["local_err"][i] += float((out_l - out_r).pow(2).sum())
            sums["update_norm"][i] += float((out_r - x_r).pow(2).sum())
            sums["mixer_err"][i] += float((mid_l.float() - mid_r.float()).pow(2).sum())
            sums["mixer_norm"][i] += float((mid_r.float() - x_r).pow(2).sum())
            sums["ffn_err"][i] += float((y_l.float() - y_r.float()).pow(2).sum())
            sums["ffn_norm"][i] += float(y_r.float().pow(2).sum())
            if isinstance(lr.ffn, SparseMoE):
                e, flips = _expert_errors(ref, cand, lr, f_r)
                acc = experts.setdefault(i, {k: np.zeros_like(v) for k, v in e.items()})
                for k in e:
                    acc[k] += e[k]
                sums["flips"][i] += flips
            x_r, x_c = out_r, mid_c + y_c

    def rel(a, b):
        return np.sqrt(a / np.maximum(b, 1e-30))

    per_layer = []
    for i, lr in enumerate(ref.layers):
        per_layer.append({
            "layer": i, "mixer": lr.mixer.kind, "ffn": lr.ffn.kind,
            "cumulative_rel": float(rel(sums["cum_err"][i], sums["ref_norm"][i])),
            "local_rel": float(rel(sums["local_err"][i], sums["update_norm"][i])),
            "mixer_rel": float(rel(sums["mixer_err"][i], sums["mixer_norm"][i])),
            "ffn_rel": float(rel(sums["ffn_err"][i], sums["ffn_norm"][i])),
            "router_flip": float(sums["flips"][i] / n_batches) if i in experts else None,
        })
    worst = max(per_layer, key=lambda r: r["local_rel"])["layer"]
    ranked = []
    E = ref.config.num_experts
    for i, e in experts.items():
        for j in range(E + 1):
            if e["tokens"][j] and e["err"][j] > 0:
                ranked.append({"layer": i, "expert": "shared" if j == E else j, "sq_err": float(e["err"][j]),
                               "rel_err": float(rel(e["err"][j], e["ref"][j])), "tokens": int(e["tokens"][j])})
    ranked.sort(key=lambda r: -r["sq_err"])
    return {"windows": int(ids.shape[0]), "per_layer": per_layer, "worst_layer": worst,
            "top_experts": ranked[:top_experts]}
