"""Data-aware int4 for experts: input statistics recorded per expert through the reference runtime, then GPTQ
(default) or activation-weighted MSE scale search ("awmse") per expert, with an explicit RTN fallback.

Recording: `RecordingModel` is the torch runtime with its MoE block wrapped: before the block runs, the same
`route()` the op uses picks each token's top-k experts, and each expert accumulates the Gram matrix of the tokens
routed to it: X_e^T X_e `[H, H]` for gate/up, and M_e^T M_e `[I, I]` for down (M_e = silu(X_e G_e^T) * X_e U_e^T,
computed with the unquantized weights). The shared expert sees every token of its layer. The MTP head is run too
(its experts are routed on the main model's hidden states), so its experts get statistics as well. Every other
weight (attention, DeltaNet, dense MLP, lm_head, mtp.fc) gets sum x x^T of its input through a stand-in for
torch.nn.functional that the runtime module uses while recording (`RecordingFunctional`): runtime/ is not edited.
Memory: one [K, K] float64 matrix per weight (per expert: [H, H] + [I, I]); fine for the tiny and mid-size models,
but Qwen3-Next-80B's 512 experts x 48 layers would need ~0.4 TB: such a model needs a layer-by-layer pass (not
implemented; awmse only needs the diagonals).

Methods (quant/gptq.py, on the grid of every calibratable scheme: int4 groups and the K-quants; each returns the
same QuantizedTensor as the RTN scheme, so exporters copy it unchanged, e.g. as Q4_0 or Q4_K blocks):
    gptq   Frantar et al. 2022: columns quantized in order, each one's error pushed onto the not-yet-quantized
           columns through the Cholesky factor of H^-1 (H = X^T X + 1% mean-diagonal damping); each group's scale
           chosen at the group's start by the H-diagonal-weighted MSE search below. Cost O(N K^2) per matrix.
    awmse  per group, the scale (and zero point) minimising sum_k H_kk (w_k - w^_k)^2 among shrunk candidates of
           the RTN scale: outlier input channels get their weights represented exactly at the expense of quiet ones.
An expert whose token count is below `min_tokens` (0 tokens included) is quantized with RTN instead and listed in
the coverage report: its statistics would describe too few inputs (never a division by zero either).
"""

from __future__ import annotations

import re
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nextq.graph import Graph, Layer, SparseMoE
from nextq.runtime import ops
from nextq.runtime.model import TorchModel

from .gptq import QUANTIZERS, quantize_awmse, quantize_gptq, search_group_params  # noqa: F401 (re-exported)
from .schemes import SCHEMES, quantize
from .tensor import QuantizedTensor

MIN_TOKENS = 16


# ---- statistics ---------------------------------------------------------------------------------------------


@dataclass
class FfnStats:
    """Sums over calibration tokens for one MoE block: per-expert token counts and input Gram matrices."""

    tokens: torch.Tensor  # [E] int64
    x: torch.Tensor  # [E, H, H] float64: sum of x x^T over tokens routed to e (gate/up input)
    mid: torch.Tensor  # [E, I, I] float64: the same for down's input
    shared_tokens: int = 0
    shared_x: torch.Tensor | None = None  # [H, H]
    shared_mid: torch.Tensor | None = None  # [Is, Is]


@dataclass
class CalibrationStats:
    """Statistics for every MoE block (keyed by its prefix, e.g. "layers.3.ffn"), for every other weight applied
    through F.linear (keyed by its name: attention, DeltaNet, dense MLP, lm_head, mtp.fc), and the token count."""

    ffn: dict[str, FfnStats] = field(default_factory=dict)
    linear: dict[str, list] = field(default_factory=dict)  # name -> [tokens, H = sum x x^T [K, K] float64]
    tokens: int = 0

    def hessian(self, name: str) -> tuple[int, torch.Tensor] | None:
        """(tokens seen, H = sum x x^T [K, K]) for the input of weight `name`; None when not recorded."""
        if name in self.linear:
            return self.linear[name][0], self.linear[name][1]
        m = re.fullmatch(r"(.*\.ffn)\.(?:experts\.(\d+)|shared)\.(gate|up|down)\.weight", name)
        if m is None or m.group(1) not in self.ffn:
            return None
        s = self.ffn[m.group(1)]
        part = "mid" if m.group(3) == "down" else "x"
        if m.group(2) is None:
            return s.shared_tokens, getattr(s, f"shared_{part}")
        e = int(m.group(2))
        return int(s.tokens[e]), getattr(s, part)[e]


class RecordingFunctional:
    """Stands in for torch.nn.functional inside nextq.runtime.model while recording: `linear(x, w)` also adds
    x^T x to the statistics of w when w is one of the named weights (matched by identity)."""

    def __init__(self, names: dict[int, str], stats: CalibrationStats):
        self.names, self.stats = names, stats

    def __getattr__(self, attr: str):
        return getattr(F, attr)

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        name = self.names.get(id(w))
        if name is not None:
            x2 = x.reshape(-1, x.shape[-1]).float()  # [N, K]
            entry = self.stats.linear.setdefault(name, [0, torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64)])
            entry[0] += x2.shape[0]
            entry[1] += (x2.T @ x2).double()
        return F.linear(x, w, b)


class RecordingModel(TorchModel):
    """The float32 torch runtime, recording each MoE block's routing and per-expert input statistics."""

    def __init__(self, graph: Graph):
        super().__init__(graph, "cpu", torch.float32)
        self.stats = CalibrationStats()

    def ffn(self, x: torch.Tensor, layer: Layer) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if isinstance(layer.ffn, SparseMoE):
            self.record(x2, layer.ffn.prefix)
        else:  # dense MLP: ops.swiglu does not go through the recording F.linear
            p, w = layer.ffn.prefix, self.w
            mid = F.silu(x2 @ w[f"{p}.gate.weight"].T) * (x2 @ w[f"{p}.up.weight"].T)  # [N, I]
            rec = RecordingFunctional({id(w[f"{p}.{n}.weight"]): f"{p}.{n}.weight" for n in ("gate", "up", "down")},
                                      self.stats)
            rec.linear(x2, w[f"{p}.gate.weight"]), rec.linear(x2, w[f"{p}.up.weight"])
            rec.linear(mid, w[f"{p}.down.weight"])
        return super().ffn(x, layer)

    def record(self, x: torch.Tensor, p: str) -> None:
        """x: [N, H] tokens entering MoE block `p`; routes them exactly as nextq::moe does."""
        c, w = self.config, self.w
        _, ids = ops.route(F.linear(x, w[f"{p}.router.weight"]), c.num_experts_per_tok, c.norm_topk_prob)  # [N, K]
        gate, up = w[f"{p}.experts.gate"], w[f"{p}.experts.up"]  # [E, I, H]
        e_count, i_dim, h_dim = gate.shape
        s = self.stats.ffn.get(p)
        if s is None:
            f64 = dict(dtype=torch.float64)
            s = self.stats.ffn[p] = FfnStats(torch.zeros(e_count, dtype=torch.int64),
                                             torch.zeros(e_count, h_dim, h_dim, **f64),
                                             torch.zeros(e_count, i_dim, i_dim, **f64))
        for e in torch.unique(ids).tolist():
            xe = x[(ids == e).any(-1)]  # [n_e, H]
            mid = F.silu(xe @ gate[e].T) * (xe @ up[e].T)  # [n_e, I]
            s.tokens[e] += xe.shape[0]
            s.x[e] += (xe.T @ xe).double()
            s.mid[e] += (mid.T @ mid).double()
        mid = F.silu(x @ w[f"{p}.shared.gate.weight"].T) * (x @ w[f"{p}.shared.up.weight"].T)  # [N, Is]
        s.shared_tokens += x.shape[0]
        xx, mm = (x.T @ x).double(), (mid.T @ mid).double()
        s.shared_x = xx if s.shared_x is None else s.shared_x + xx
        s.shared_mid = mm if s.shared_mid is None else s.shared_mid + mm


def collect_stats(graph: Graph, windows: torch.Tensor, batch: int = 4,
                  progress: Callable | None = None) -> CalibrationStats:
    """Run calibration windows `[B, T]` int64 through the model (and its MTP head) and record statistics."""
    from nextq.runtime import model as runtime_model

    model = RecordingModel(graph)
    # every 2-D weight the runtime applies with F.linear, except the embedding (a lookup, even when tied)
    # (lm_head is recorded on the main model's hidden states only, not on the MTP head's)
    names = {id(t): n for n, t in model.w.items()
             if t.dim() == 2 and n in graph.tensors and n not in ("embed.weight", "lm_head.weight")}
    head = {} if graph.config.tie_word_embeddings else {id(model.lm_head): "lm_head.weight"}
    chunks = list(windows.split(batch))
    saved = runtime_model.F
    runtime_model.F = RecordingFunctional(names, model.stats)
    try:
        for ids in (progress(chunks) if progress else chunks):
            h = model.hidden(ids, model.new_state())  # [b, T, H]
            RecordingFunctional(head, model.stats).linear(h, model.lm_head)
            if model.mtp is not None:
                model.mtp_logits(h[:, :-1], ids[:, 1:])
            model.stats.tokens += ids.numel()
    finally:
        runtime_model.F = saved
    return model.stats


def default_calibration_text(max_chars: int = 400_000, exclude: str = "") -> str:
    """Python standard-library sources, modules sorted by name taking every 10th from the 4th (i % 10 == 3):
    disjoint from the embedded model's held-out split (i % 10 == 5, see scripts/train_tiny.py) on the interpreter
    it was trained with. Modules whose opening 500 characters occur in `exclude` (evaluation text) are skipped."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = ""
    for i, f in enumerate(files):
        if i % 10 == 3:
            src = f.read_text(encoding="utf-8", errors="replace")
            if src[:500] in exclude:
                continue
            text += src
            if len(text) >= max_chars:
                break
    return text[:max_chars]


def token_windows(ids: list[int], n: int, length: int) -> torch.Tensor:
    """The first n consecutive windows of `length` tokens, `[n', length]` int64 (n' <= n if the text is short)."""
    n = min(n, len(ids) // length)
    if n == 0:
        raise ValueError(f"calibration text: {len(ids)} tokens, need at least one window of {length}")
    return torch.tensor(ids[: n * length], dtype=torch.int64).reshape(n, length)


# ---- data-aware quantization (the grids and quantizers live in quant/gptq.py) ------------------------------------


def is_calibratable(scheme: str) -> bool:
    """Whether a data-aware quantizer can produce `scheme` (int4 groups, K-quants: quant/gptq.py GRIDS)."""
    return scheme in SCHEMES and SCHEMES[scheme].calibratable


def quantize_calibrated(w: torch.Tensor, scheme: str, stats: CalibrationStats | None, name: str, method: str,
                        min_tokens: int = MIN_TOKENS) -> tuple[QuantizedTensor, str, int]:
    """(quantized weight, method used, tokens seen) for weight `name`: `method` when its input was seen by at least
    `min_tokens` calibration tokens, RTN otherwise (explicitly: the method string says "rtn")."""
    found = stats.hessian(name) if stats is not None and is_calibratable(scheme) else None
    tokens = found[0] if found else 0
    if found is None or tokens < min_tokens:
        return quantize(w, scheme), "rtn", tokens
    return QUANTIZERS[method](w, found[1], scheme), method, tokens


# ---- coverage report ----------------------------------------------------------------------------------------


def coverage_report(stats: CalibrationStats, calibrated: set[str], min_tokens: int, method: str) -> dict:
    """Per MoE block: experts whose int4 weights will be calibrated vs fall back to RTN, with token counts.

    `calibrated`: the tensor names the recipe quantizes with a calibratable scheme.
    """
    layers = []
    for p, s in stats.ffn.items():
        experts = sorted({int(m.group(1)) for n in calibrated
                          if (m := re.fullmatch(re.escape(p) + r"\.experts\.(\d+)\..*", n))})
        if not experts:
            continue
        counts = [int(s.tokens[e]) for e in experts]
        fallback = [e for e, c in zip(experts, counts) if c < min_tokens]
        layers.append({
            "ffn": p, "experts": len(experts), "calibrated": len(experts) - len(fallback),
            "coverage": (len(experts) - len(fallback)) / len(experts),
            "tokens_min": min(counts), "tokens_median": sorted(counts)[len(counts) // 2], "tokens_max": max(counts),
            "fallback_rtn": fallback, "tokens": counts,
        })
    total = sum(row["experts"] for row in layers)
    done = sum(row["calibrated"] for row in layers)
    return {"method": method, "min_tokens": min_tokens, "calibration_tokens": stats.tokens,
            "experts": total, "experts_calibrated": done, "coverage": done / total if total else 0.0,
            "layers": layers}


def coverage_markdown(report: dict) -> str:
    """The coverage report as a markdown table."""
    lines = [f"calibration: {report['method']}, {report['calibration_tokens']} tokens, "
             f"experts with < {report['min_tokens']} tokens fall back to RTN", "",
             "| ffn | experts | calibrated | coverage | tokens min / median / max | RTN fallback |",
             "|---|---:|---:|---:|---|---|"]
    for r in report["layers"]:
        lines.append(f"| {r['ffn']} | {r['experts']} | {r['calibrated']} | {r['coverage']:.0%} | "
                     f"{r['tokens_min']} / {r['tokens_median']} / {r['tokens_max']} | "
                     f"{', '.join(map(str, r['fallback_rtn'])) or '-'} |")
    lines.append(f"| total | {report['experts']} | {report['experts_calibrated']} | {report['coverage']:.0%} | | |")
    return "\n".join(lines) + "\n"
