"""Data-aware quantization (GPTQ / awmse per expert), its calibration statistics gathered layer by layer through
the runtime's own layer functions, and the coverage report.

Statistics (`CalibrationStats`, from `collect_stats`): calibration windows `[N, T]` run through the model one
layer at a time (runtime/stream.py `LayerStream`: only that layer's tensors held, the windows' hidden states kept
between layers), and an Observer of the runtime (`GramObserver`) sums H = X^T X `[K, K]` (float32, on the stream's
device) of the input of every weight the recipe calibrates: attention, DeltaNet, dense MLP, shared expert, lm_head,
mtp.fc, and each routed expert on exactly the tokens routed to it (X_e for gate/up, M_e = silu(X_e G_e^T) * X_e U_e^T
for down). Statistics are computed when the quantizer first asks for a weight of a layer (`hessian(name)`), and the
stream only moves forward: one layer's statistics are held at a time, and a layer's experts are done in chunks of
about `chunk_bytes` of Gram matrices (the layer's MoE input tokens and routing are kept, each chunk re-runs its
experts on them; with GPTQ each input's factor of H^-1 is kept beside its H, computed once for gate and up), so at
Qwen3-Next-80B's dimensions (512 experts, [2048, 2048] per expert) the statistics stay ~1 GiB instead of 16 GiB per
layer. The MTP head runs on the main model's final hidden states, so its experts get statistics too. The embedding
is a lookup and is never calibrated (tied or not).

Modes (`mode=`): "original" (default) -- statistics from the unquantized model's outputs; "sequential" -- layer
i+1's statistics from the outputs of layer i *as quantized* (its stored tensors handed back through `record`), the
scheme GPTQModel and llm-compressor use. Measured on the embedded model (scripts/bench_quant.py, int4 recipe,
held-out mean KLD, one session): GPTQ 0.00303 original vs 0.00308 sequential (RTN 0.00368), awmse 0.00305
sequential: original is the better one on this model, hence the default. Within a layer the statistics come from the layer's unquantized weights; the
embedding, final norm and MTP head's own inputs come from the unquantized model.

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

import dataclasses
import re
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from nextq.console import trim_heap
from nextq.errors import CalibrationError
from nextq.graph import Graph, expected_tensors
from nextq.runtime.model import LayerMath, Observer, Weights
from nextq.runtime.stream import LayerStream

from .gptq import (QUANTIZERS, gptq_factor, quantize_awmse, quantize_gptq, quantize_gptq_batch,  # noqa: F401
                   search_group_params)
from .schemes import SCHEMES, quantize
from .tensor import QUANT_FIELDS, QuantizedTensor, as_float32_matrix

MIN_TOKENS = 16
MODES = ("original", "sequential")
CHUNK_BYTES = {"cpu": 512 << 20, "cuda": 4 << 30}  # float32 Gram matrices + GPTQ factors of one chunk of experts
# (two chunks are kept: workers straddle)
GPTQ_BATCH = {"cpu": 4, "cuda": None}  # experts per GPTQ batch (None: a whole chunk). On a GPU a batch is what keeps
# the column loop from being launch-bound; on a CPU batching buys nothing beyond ~4 and costs working memory
EXPERT = re.compile(r"(.*\.ffn)\.experts\.(\d+)\.(gate|up|down)\.weight")


# ---- statistics ---------------------------------------------------------------------------------------------


class GramObserver(Observer):
    """Sums H = x^T x `[K, K]` (float32) and token counts of the inputs of the weights in `wanted`; with
    `capture_moe`, keeps every MoE block's input tokens [N, H] and routing ids [N, K] (its experts' statistics are
    computed afterwards, a chunk at a time). Weights fed the very same input (q, k, v, z, b, a; gate and up) share
    one accumulator."""

    def __init__(self, wanted: Callable[[str], bool], capture_moe: bool = False):
        self.wanted, self.capture_moe = wanted, capture_moe
        self.grams: dict[str, list] = {}  # name -> [tokens, H [K, K]] (+ lock, GPTQ factor [K, K] once asked)
        self.moe: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.tokens = 0  # tokens that entered the observed layer functions (its first linear's input)
        self._last: tuple | None = None  # (input key, name, pinned input): detects a shared input

    def on_linear(self, name: str, x: torch.Tensor) -> None:
        if not self.wanted(name):
            return
        key = (x.data_ptr(), tuple(x.shape), x.stride())
        if self._last is not None and self._last[0] == key:
            first = self.grams[self._last[1]]
            if self.grams.setdefault(name, first) is first:  # the same input as the previous weight: shared
                return
        xf = x.float()
        entry = self.grams.setdefault(name, [0, torch.zeros(x.shape[1], x.shape[1], device=x.device)])
        entry[0] += x.shape[0]
        entry[1].addmm_(xf.T, xf)
        self._last = (key, name, x)

    def on_route(self, prefix: str, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        if self.capture_moe:
            self.moe.setdefault(prefix, []).append((x.float(), ids))


class CalibrationStats:
    """Calibration statistics computed layer by layer on demand (see the module docstring).

    `hessian(name)` -> (tokens seen, H [K, K]) for the input of weight `name`, or None when it has none; asking for
    a later layer moves the stream on (in "sequential" mode once every tensor of the current layer has been handed
    back through `record`; outside a run -- `begin` .. `end`, which `quant.apply.quantized_view` calls -- any order,
    from the unquantized model). `expert_tokens[prefix]`: tokens per routed expert of each MoE block reached so
    far. Thread-safe: the quantizer's workers ask concurrently, in the stream's layer order (`order()`).
    """

    def __init__(self, graph: Graph, windows: torch.Tensor, wanted: Iterable[str] | None = None, *,
                 mode: str = "original", device: str | torch.device = "cpu", batch: int = 4,
                 chunk_bytes: int | None = None, on_stage: Callable[[str, float], None] | None = None):
        if mode not in MODES:
            raise CalibrationError(f"calibration mode: unknown {mode!r}; supported: {', '.join(MODES)}")
        if windows.dim() != 2 or windows.numel() == 0:
            raise CalibrationError(f"calibration windows: expected [N, T] token ids with N, T >= 1, "
                                   f"got shape {tuple(windows.shape)}")
        c = graph.config
        self.graph, self.config, self.mode, self.on_stage = graph, c, mode, on_stage
        self.stream = LayerStream(graph, device, torch.float32, batch=batch)
        self.ids = windows.to(self.stream.device)
        self.tokens = windows.numel()
        linear = {n for n, s in expected_tensors(c).items() if len(s.shape) == 2 and n != "embed.weight"}
        self.wanted = linear if wanted is None else linear & set(wanted)
        head = self.stream.math.head_name
        # stages: each decoder layer, then the final norm + LM head, then the MTP head
        self.stages: list[tuple[str, list[str]]] = [(ly.prefix, self.stream.names(ly)) for ly in self.stream.layers]
        self.stages.append(("head", ["norm.weight"] + ([head] if head != "embed.weight" else [])))
        if self.stream.mtp is not None:
            self.stages.append(("mtp", self.stream.names(self.stream.mtp)))
        self.stage_of = {n: i for i, (_, names) in enumerate(self.stages) for n in names}
        h, i_dim = c.hidden_size, c.moe_intermediate_size
        chunk_bytes = CHUNK_BYTES[self.stream.device.type] if chunk_bytes is None else chunk_bytes
        self.gptq_batch = GPTQ_BATCH.get(self.stream.device.type, 1)  # experts per GPTQ batch, a chunk's divisor
        self.chunk = max(1, chunk_bytes // (8 * (h * h + i_dim * i_dim)))  # experts per chunk: H + GPTQ factor
        self.gptq_batch = self.chunk if self.gptq_batch is None else min(self.gptq_batch, self.chunk)
        self.chunk = self.chunk // self.gptq_batch * self.gptq_batch
        self.expert_tokens: dict[str, torch.Tensor] = {}
        self.recorded: dict[str, torch.Tensor | QuantizedTensor] = {}
        self.cond = threading.Condition(threading.RLock())
        self.running = False  # inside a quantization run (begin .. end): sequential mode waits for `record`
        self.users: dict[int, int] = {}  # thread id -> how many `using` blocks it is in (all of stage `pos`)
        self._restart()

    # -- the stream ---------------------------------------------------------------------------------------------

    def _restart(self) -> None:
        self.pos = -1  # the stage whose statistics are held
        self.x: torch.Tensor | None = None  # input hidden states of stage `pos` (after it ran: of the next stage)
        self.final: torch.Tensor | None = None  # final-normed hidden states (the MTP head's input)
        self.obs: GramObserver | None = None
        self.x_out: torch.Tensor | None = None
        self.chunks: dict[tuple[str, int], dict[str, list]] = {}
        self.batches: dict[tuple[str, int, str, str], dict] = {}  # (block, chunk, part, scheme) -> GPTQ batch

    def _complete(self, stage: int) -> bool:
        return all(n in self.recorded for n in self.stages[stage][1] if n in self.graph.tensors)

    @property
    def sequential(self) -> bool:
        return self.mode == "sequential" and self.running

    def begin(self) -> None:
        """Start a quantization run: the stream restarts from the embedding; in sequential mode each layer then
        waits for its tensors to be handed back (`record`) before the next layer's statistics."""
        with self.cond:
            self.running = True
            self.recorded.clear()
            self._restart()

    def end(self) -> None:
        """End the run (also when it failed: threads waiting for a layer's tensors stop waiting)."""
        with self.cond:
            self.running = False
            self.recorded.clear()
            self._restart()
            self.cond.notify_all()

    def _advance_to(self, target: int) -> None:
        if target != self.pos:  # the held statistics go: wait until no other thread computes with them
            me = threading.get_ident()
            self.cond.wait_for(lambda: not any(n for t, n in self.users.items() if t != me))
        if target < self.pos:
            if self.sequential:
                raise CalibrationError(f"sequential calibration: {self.stages[target][0]} asked after "
                                       f"{self.stages[self.pos][0]}; tensors must be quantized in layer order")
            self._restart()  # outside a sequential run: the unquantized model's statistics, any order
        while self.pos < target:
            stage = self.pos
            if self.sequential and 0 <= stage < len(self.stream.layers):
                self.cond.wait_for(lambda: not self.sequential or self.pos != stage or self._complete(stage))
                if not self.running:
                    raise CalibrationError("calibration: the quantization run ended while a layer was pending")
                if self.pos != stage:
                    continue
            self._step()

    def _step(self) -> None:
        """Finish stage `pos` (its output becomes the next stage's input) and compute the next one's statistics."""
        t0 = time.perf_counter()
        s, layers = self.pos, self.stream.layers
        if s == -1:
            self.x = self.stream.embed(self.ids)
        elif s < len(layers):
            if self.sequential:  # rerun the layer as it was quantized
                names = self.stages[s][1]
                values = {n: self.recorded.pop(n) for n in names if n in self.recorded}
                self.stream.observer = None
                with self.stream.holding(names, values):
                    self.x = self.stream.run_layer(layers[s], self.x)
            else:
                self.x = self.x_out
        self.obs, self.chunks, self.batches, self.x_out = None, {}, {}, None
        trim_heap()  # before the next layer is loaded: what the previous one's statistics and workers freed
        self.pos = s = s + 1
        name, names = self.stages[s]
        obs = GramObserver(lambda n: n in self.wanted and EXPERT.fullmatch(n) is None, capture_moe=True)
        self.stream.observer = obs
        if s < len(layers):
            with self.stream.holding(names):
                self.x_out = self.stream.run_layer(layers[s], self.x)
            tokens = self.ids.numel()
        elif name == "head":
            self.final = self.stream.final_norm(self.x)
            obs.on_linear(self.stream.math.head_name, self.final.reshape(-1, self.final.shape[-1]))  # the head's input
            tokens = self.ids.numel()
        else:  # the MTP head, on the main model's final hidden states
            self.stream.mtp_hidden(self.final, self.ids)
            tokens = self.ids.shape[0] * (self.ids.shape[1] - 1)
        self.stream.observer = None
        if tokens == 0:
            raise CalibrationError(f"{name}: 0 calibration tokens reached it (windows {tuple(self.ids.shape)}); "
                                   "use windows of at least 2 tokens")
        for p, parts in obs.moe.items():
            ids = torch.cat([i for _, i in parts])
            self.expert_tokens[p] = torch.bincount(ids.reshape(-1), minlength=self.config.num_experts).cpu()
        self.obs = obs
        if self.on_stage is not None:
            self.on_stage(name, time.perf_counter() - t0)

    def _expert_chunk(self, p: str, chunk: int) -> dict[str, list]:
        """Gram matrices of the routed experts chunk * self.chunk .. of MoE block `p`, from the block's captured
        input tokens: each expert's gate/up input (its tokens) and down input (their SwiGLU midpoint, computed by
        the runtime's `mlp` with the expert's unquantized weights). The last two chunks are kept."""
        if (p, chunk) not in self.chunks:
            x = torch.cat([x for x, _ in self.obs.moe[p]])  # [N, H]
            ids = torch.cat([i for _, i in self.obs.moe[p]])  # [N, K]
            obs = GramObserver(lambda n: True)
            math = LayerMath(self.config, Weights(self.config, self.stream.device, torch.float32), obs)
            for e in range(chunk * self.chunk, min((chunk + 1) * self.chunk, self.config.num_experts)):
                rows = (ids == e).any(-1)
                if not bool(rows.any()):
                    continue
                for part in ("gate", "up", "down"):
                    math.w.put(f"{p}.experts.{e}.{part}.weight", self.graph.get(f"{p}.experts.{e}.{part}.weight"))
                math.mlp(x[rows], f"{p}.experts.{e}")
                math.w.clear()
            while len(self.chunks) >= 2:
                gone = self.chunks.pop(next(iter(self.chunks)))
                self.batches = {k: b for k, b in self.batches.items() if b["grams"] is not gone}
            trim_heap()  # the dropped chunk and what the workers freed since the last one
            self.chunks[(p, chunk)] = obs.grams
        return self.chunks[(p, chunk)]

    # -- what the quantizer asks -----------------------------------------------------------------------------

    def _entry(self, name: str) -> list | None:
        """The [tokens, H, ...] accumulator of weight `name`'s input (shared by weights of one input)."""
        stage = self.stage_of.get(name)
        if stage is None or name not in self.wanted:
            return None
        with self.cond:
            self._advance_to(stage)
            m = EXPERT.fullmatch(name)
            grams = self._expert_chunk(m.group(1), int(m.group(2)) // self.chunk) if m else self.obs.grams
            return grams.get(name, [0, None])

    @contextmanager
    def using(self, name: str) -> Iterator[None]:
        """Keep the statistics of weight `name`'s stage while inside (the quantizer computes with them): the stream
        moves on, freeing them, only once every other thread has left its `using` block. Without it a worker that
        asks for the next layer would load that layer while the last chunks of experts of this one are still
        being quantized: both layers' working sets at once."""
        me = threading.get_ident()
        with self.cond:
            if self.stage_of.get(name) is not None and name in self.wanted:
                self._advance_to(self.stage_of[name])
            self.users[me] = self.users.get(me, 0) + 1
        try:
            yield
        finally:
            with self.cond:
                self.users[me] -= 1
                if not self.users[me]:
                    del self.users[me]
                self.cond.notify_all()

    def hessian(self, name: str) -> tuple[int, torch.Tensor] | None:
        """(tokens seen, H = sum x x^T [K, K] float32) for the input of weight `name`; None when not calibrated."""
        entry = self._entry(name)
        return None if entry is None else (int(entry[0]), entry[1])

    def gptq_factor(self, name: str) -> torch.Tensor:
        """quant/gptq.py `gptq_factor` of weight `name`'s Hessian, computed once per input: an expert's gate and up
        share it (the worker that asks second waits for the first's)."""
        entry = self._entry(name)
        with self.cond:
            if len(entry) == 2:
                entry.append(threading.Lock())
            lock = entry[2]
        with lock:
            if len(entry) == 3:
                entry.append(gptq_factor(entry[1]))
            return entry[3]

    def gptq(self, name: str, w: torch.Tensor, scheme: str, min_tokens: int = MIN_TOKENS) -> QuantizedTensor:
        """GPTQ of weight `name` (`w` `[N, K]`: its float value) on its statistics, on the stream's device. A routed
        expert's is computed in one batch with the other experts of its chunk and part seen by >= `min_tokens`
        tokens (quant/gptq.py `quantize_gptq_batch`, each on its own Hessian), then handed out one by one; one
        asked again (a prefetched job that ran twice) is computed on its own."""
        m = EXPERT.fullmatch(name)
        entry = self._entry(name)
        if m is not None:
            p, e, part = m.group(1), int(m.group(2)), m.group(3)
            key = (p, e // self.gptq_batch, part, scheme)
            with self.cond:
                batch = self.batches.setdefault(key, {"lock": threading.Lock(), "out": None,
                                                      "grams": self._expert_chunk(p, e // self.chunk)})
            with batch["lock"]:
                if batch["out"] is None:
                    first = e // self.gptq_batch * self.gptq_batch
                    batch["out"] = self._gptq_batch(batch["grams"], range(first, first + self.gptq_batch), part, scheme,
                                                    min_tokens, name, w)
                qt = batch["out"].pop(name, None)
            if qt is not None:
                return qt
        return quantize_gptq(w.to(entry[1].device), entry[1], scheme, factor=self.gptq_factor(name))

    def _gptq_batch(self, grams: dict[str, list], experts: range, part: str, scheme: str, min_tokens: int,
                    name: str, w: torch.Tensor) -> dict[str, QuantizedTensor]:
        """GPTQ of the calibrated weights `part` of `experts` (in the chunk whose statistics are `grams`) as one
        batch (`w`: the value of `name`, which the caller already read; the others are read here)."""
        block = EXPERT.fullmatch(name).group(1)
        names = [n for n in (f"{block}.experts.{e}.{part}.weight" for e in experts)
                 if n in grams and n in self.wanted and grams[n][0] >= min_tokens]
        ws = torch.empty(len(names), *w.shape, device=grams[name][1].device)
        for i, n in enumerate(names):
            t = w if n == name else self.graph.get(n)
            ws[i] = as_float32_matrix(t.dequantize() if isinstance(t, QuantizedTensor) else t)
        return dict(zip(names, quantize_gptq_batch(ws, [grams[n][1] for n in names], scheme,
                                                   [self.gptq_factor(n) for n in names])))

    def whole(self, name: str) -> bool:
        """Whether tensor `name` must be quantized whole (not in row blocks): the stream runs it."""
        return name in self.stage_of

    def record(self, name: str, t: torch.Tensor | QuantizedTensor) -> None:
        """Hand back tensor `name` as it will be stored (sequential mode reruns its layer with it)."""
        if self.sequential and self.stage_of.get(name, len(self.stream.layers)) < len(self.stream.layers):
            with self.cond:
                self.recorded[name] = t
                self.cond.notify_all()

    def order(self) -> list[str]:
        """The graph's tensors in stream order (embedding, each layer, final norm and head, MTP)."""
        return [n for n in expected_tensors(self.config) if n in self.graph.tensors]


def collect_stats(graph: Graph, windows: torch.Tensor, wanted: Iterable[str] | None = None, *,
                  mode: str = "original", device: str | torch.device = "cpu", batch: int = 4,
                  on_stage: Callable[[str, float], None] | None = None) -> CalibrationStats:
    """Statistics of calibration windows `[N, T]` int64 for the weights `wanted` (default: every matrix but the
    embedding), computed layer by layer as the quantizer asks for them."""
    return CalibrationStats(graph, windows, wanted, mode=mode, device=device, batch=batch, on_stage=on_stage)


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
        raise CalibrationError(f"calibration text: {len(ids)} tokens, need at least one window of {length}")
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
    if found is None or found[1] is None or tokens < min_tokens:
        return quantize(w, scheme), "rtn", tokens
    h = found[1]
    if method == "gptq":  # routed experts: a chunk of them at once, each with its own statistics
        qt = stats.gptq(name, w, scheme, min_tokens)
    else:
        qt = QUANTIZERS[method](w.to(h.device), h, scheme)  # on the statistics' (the stream's) device
    return _on_cpu(qt), method, tokens


def _on_cpu(qt: QuantizedTensor) -> QuantizedTensor:
    return dataclasses.replace(qt, **{f: getattr(qt, f).cpu() for f in QUANT_FIELDS if getattr(qt, f) is not None})


# ---- coverage report ----------------------------------------------------------------------------------------


def coverage_report(stats: CalibrationStats, calibrated: set[str], min_tokens: int, method: str) -> dict:
    """Per MoE block: experts whose int4 weights will be calibrated vs fall back to RTN, with token counts.

    `calibrated`: the tensor names the recipe quantizes with a calibratable scheme.
    """
    layers = []
    for p, tokens in stats.expert_tokens.items():
        experts = sorted({int(m.group(1)) for n in calibrated
                          if (m := re.fullmatch(re.escape(p) + r"\.experts\.(\d+)\..*", n))})
        if not experts:
            continue
        counts = [int(tokens[e]) for e in experts]
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
