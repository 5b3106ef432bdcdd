"""Apply a recipe to a graph and write the quantized IR: one tensor (one expert's matrix) at a time, two workers.

    quantize_graph(Graph.load(ir), get_recipe("int4"), out, stats=collect_stats(...), method="gptq")

Tensors are read, quantized and written in the graph's order through `Graph.save` (atomic, sharded); workers run
ahead by a bounded window, so peak memory is a shard's budget plus a few tensors whatever the model's size. Large
weights read from a checkpoint are computed in row blocks, one job each, so both workers share them.
Next to the tensors the IR carries `quantization.json` (recipe, per-class schemes and sizes, per-tensor method and
calibration tokens, per-layer / per-expert calibration coverage) and `quantization.md` (the coverage table).
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextq.console import console
from nextq.errors import CheckpointError, NextqError
from nextq.graph import Graph, QuantRef, SourceTensor

from . import calibrate
from .fp8 import SOURCE_SCHEMES, keeps_source
from .recipes import KEEP, PlanEntry, Recipe, fallback_counts, plan_schemes
from .schemes import FLOAT_DTYPES, quantize, row_block
from .tensor import QuantizedTensor, join_rows

REPORT_JSON = "quantization.json"
REPORT_MD = "quantization.md"


@dataclass(frozen=True)
class TensorRecord:
    """What was done to one tensor."""

    name: str
    cls: str
    scheme: str
    method: str  # "keep", "cast", "rtn", "gptq", "awmse"
    tokens: int  # calibration tokens its input saw (0 when not calibrated)
    params: int
    nbytes: int
    fallback: tuple[str, ...] = ()  # the plan's fallbacks for its row length (PlanEntry.fallback)


class Prefetcher:
    """Lazy tensors computed by a thread pool ahead of the consumer, in a declared consumption order.

    Each `result(name)` returns the job's value for `name` and tops up the jobs that follow it in `names`: at
    most `window` of them and at most `budget` bytes in flight (`sizes[name]`, the bytes a job holds); a tensor
    larger than the budget is never run ahead, it is computed when asked for. A request out of the declared order
    is computed on demand (so is a repeated one) and prefetched jobs behind it are dropped: memory stays bounded
    by `budget` plus the tensor being consumed, whatever order the consumer really uses.
    """

    def __init__(self, names: list[str], job: Callable[[str], Any], workers: int, window: int,
                 sizes: dict[str, int] | None = None, budget: int = 1 << 62):
        self.names, self.job, self.window = names, job, window
        self.sizes, self.budget = sizes or {}, budget
        self.pos = {n: i for i, n in enumerate(names)}
        self.futures: dict[str, Future] = {}
        self.consumed: set[str] = set()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nextq-quant")

    def _top_up(self, i: int) -> None:
        """Drop jobs before position i (skipped by the consumer); submit the next ones within window and budget."""
        for n in [n for n in self.futures if self.pos[n] < i]:
            self.futures.pop(n).cancel()
        held = sum(self.sizes.get(n, 0) for n in self.futures)
        for n in self.names[i + 1:i + 1 + self.window]:
            if n in self.futures or n in self.consumed:
                continue
            size = self.sizes.get(n, 0)
            if held + size > self.budget:
                break
            self.futures[n] = self.pool.submit(self.job, n)
            held += size

    def result(self, name: str) -> Any:
        with self.lock:
            fut = self.futures.pop(name, None)
            self.consumed.add(name)
            self._top_up(self.pos[name])
        return fut.result() if fut is not None else self.job(name)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class PendingTensor:
    """A graph entry whose value the prefetcher produces (the quantized tensor or the kept/cast dense one).

    `scheme` is the planned quantization scheme (None when the tensor stays dense) and `dtype` the planned dense
    dtype (None when quantized), so exporters can choose output types without loading it. A large weight is
    computed in row blocks, one prefetcher job each (`parts`, in row order): `row_blocks()` hands them over one
    by one (a streaming writer holds one block, not the weight), `load()` joins them.
    """

    name: str
    shape: tuple[int, ...]
    prefetcher: Prefetcher
    scheme: str | None = None
    dtype: torch.dtype | None = None
    parts: tuple[str, ...] = ()  # prefetcher keys of its row blocks; () = one job under `name`

    def row_blocks(self) -> Iterator[torch.Tensor | QuantizedTensor]:
        """Its value as row blocks `[r, ...]`, in order (one block when it is computed whole)."""
        for key in self.parts or (self.name,):
            yield self.prefetcher.result(key)

    def load(self) -> Any:
        return join_rows(self.row_blocks(), self.shape[0]) if self.parts else self.prefetcher.result(self.name)


PREFETCH_BYTES = 256 << 20  # source bytes run ahead of the consumer (a few hundred experts, or one big matrix)


def _source_bytes(t: Any, rows: int | None = None) -> int:
    """Bytes of a source tensor (of its first `rows` rows)."""
    shape = tuple(t.shape) if rows is None else (rows, *t.shape[1:])
    dtype = getattr(t, "dtype", None)
    return math.prod(shape) * (dtype.itemsize if isinstance(dtype, torch.dtype) else 4)


def _row_ranges(name: str, t: Any, entry: PlanEntry, stats: calibrate.CalibrationStats | None
                ) -> list[tuple[int, int]]:
    """Row blocks [start, stop) to compute a large weight in, read block by block; [] to compute it whole.

    Every scheme is row-local in blocks of `row_block` rows (quant.schemes.quantize relies on it too); calibrated
    quantization is not split (its statistics are per tensor), nor is any tensor the calibration stream runs.
    """
    rows = row_block(tuple(t.shape))
    if rows is None or not isinstance(t, SourceTensor) or t.read_rows is None:
        return []
    if stats is not None and (calibrate.is_calibratable(entry.scheme) or stats.whole(name)):
        return []
    n = t.shape[0]
    return [(i, min(i + rows, n)) for i in range(0, n, rows)]


@contextmanager
def quantized_view(graph: Graph, recipe: Recipe, *, stats: calibrate.CalibrationStats | None = None,
                   method: str = "gptq", min_tokens: int = calibrate.MIN_TOKENS, workers: int = 2,
                   order: list[str] | None = None, records: dict[str, TensorRecord] | None = None,
                   on_done: Callable[[str, int], None] | None = None) -> Iterator[Graph]:
    """`graph` quantized with `recipe`, lazily: a Graph of PendingTensors computed by `workers` threads.

    Consume it (Graph.save, export_gguf, export_onnx) inside the `with`; jobs run ahead in `order` (default: the
    graph's), so pass the order the consumer reads in (e.g. `gguf_export.consumption_order`). Each finished tensor
    is recorded in `records` and reported to `on_done(name, source bytes)` (progress). With `stats` (layer-streamed
    calibration) the view's tensors come in the stream's layer order, and each is handed back to `stats.record`.
    """
    if method not in calibrate.QUANTIZERS:
        raise NextqError(f"calibration method: unknown {method!r}; supported: {', '.join(calibrate.QUANTIZERS)}")
    shapes = {n: tuple(t.shape) for n, t in graph.tensors.items()}
    plan = plan_schemes(recipe, graph.config, shapes)
    check_quantized_input(graph, plan)
    names = stats.order() if stats is not None else list(graph.tensors)
    order = list(order) if order is not None else names
    if sorted(order) != sorted(names):
        raise NextqError(f"quantized_view: order lists {len(order)} tensors, the graph has {len(names)}")
    # prefetcher jobs, in order: key -> (tensor, rows); one per tensor, or one per row block of a large weight
    jobs: dict[str, tuple[str, tuple[int, int] | None]] = {}
    parts: dict[str, tuple[str, ...]] = {}
    for n in order:
        ranges = _row_ranges(n, graph.tensors[n], plan[n], stats)
        parts[n] = tuple(f"{n}[{a}:{b}]" for a, b in ranges)
        jobs |= dict(zip(parts[n], ((n, ab) for ab in ranges))) if ranges else {n: (n, None)}
    sizes = {k: _source_bytes(graph.tensors[n], None if ab is None else ab[1] - ab[0]) for k, (n, ab) in jobs.items()}
    records = {} if records is None else records
    done: dict[str, tuple[int, int]] = {}  # job key -> (params, stored bytes)
    lock = threading.Lock()

    def job(key: str):
        name, ab = jobs[key]
        entry = plan[name]
        try:
            t = graph.get(name) if ab is None else graph.tensors[name].load_rows(*ab)
            t, how, tokens = quantize_tensor(name, t, entry, stats, method, min_tokens)
        except (ValueError, RuntimeError) as e:  # say which tensor (which expert, which rows) failed
            raise NextqError(f"{key}: quantizing as {entry.scheme} failed: {e}") from e
        if stats is not None and ab is None:
            stats.record(name, t)
        with lock:  # a large weight's row blocks add up to one record (a block computed twice counts once)
            done[key] = (math.prod(shapes[name] if ab is None else (ab[1] - ab[0], *shapes[name][1:])), _nbytes(t))
            got = [done[k] for k in parts[name] or (name,) if k in done]
            records[name] = TensorRecord(name, entry.cls, entry.scheme, how, tokens, sum(p for p, _ in got),
                                         sum(b for _, b in got), entry.fallback)
        if on_done is not None:
            on_done(name, sizes[key])
        return t

    pre = Prefetcher(list(jobs), job, workers, window=4 * workers, sizes=sizes, budget=PREFETCH_BYTES)

    def planned(n: str) -> tuple[str | None, torch.dtype | None]:
        s, held = plan[n].scheme, held_scheme(graph.tensors[n])
        if held is not None and (s == KEEP or keeps_source(held, s)):
            return held, None
        if s == KEEP:
            return None, graph.tensors[n].dtype
        return (None, FLOAT_DTYPES[s]) if s in FLOAT_DTYPES else (s, None)

    lazy = {n: PendingTensor(n, shapes[n], pre, *planned(n), parts=parts[n]) for n in names}
    if stats is not None:
        stats.begin()
    try:
        yield Graph(graph.config, lazy, dict(graph.provenance), dict(graph.assets))
    finally:
        if stats is not None:
            stats.end()
        pre.close()


def check_quantized_input(graph: Graph, plan: dict[str, PlanEntry]) -> None:
    """What a recipe does to tensors the input already holds quantized. An FP8 checkpoint's are a source (kept or
    quantized from their exact dequantization). nextq's own quantized IR is refused: its float IR is the better
    input. A graph read from a pre-quantized checkpoint (compressed-tensors, GPTQ), whose float weights may exist
    nowhere, is quantized from the exact dequantization of its codes (v * s in float32) where the recipe asks for
    another scheme, with a warning that the errors add up; tensors the recipe keeps are copied as stored."""
    held = {n: s for n, s in ((n, held_scheme(t)) for n, t in graph.tensors.items())
            if s not in (None, *SOURCE_SCHEMES)}
    if not held:
        return
    first = next(iter(held))
    if "quantization" in graph.provenance:
        raise CheckpointError(
            f"{first}: the input IR is already quantized ({held[first]}, by nextq quantize); quantize the IR or "
            f"checkpoint it was made from (source: {str(graph.provenance.get('source', '?'))[:200]}) instead, or "
            "export this one as it is")
    redo = defaultdict(int)
    for n, s in held.items():
        if not (plan[n].scheme == KEEP or keeps_source(s, plan[n].scheme)):
            redo[f"{s} -> {plan[n].scheme}"] += 1
    if redo:
        console.print(f"[yellow]warning:[/] re-quantizing {sum(redo.values())} of the {len(held)} tensors "
                      f"{str(graph.provenance.get('source', 'the input'))[:200]} holds quantized, from the exact "
                      f"dequantization of their codes ({', '.join(f'{n} {k}' for k, n in sorted(redo.items()))}): "
                      "their error adds to the checkpoint's; quantize from the float checkpoint where there is one",
                      soft_wrap=True)


def held_scheme(t: Any) -> str | None:
    """The scheme a graph tensor is already quantized with (IR reference, loaded, or an FP8 source), else None."""
    if isinstance(t, QuantRef):
        return t.meta["scheme"]
    return getattr(t, "scheme", None) if not isinstance(t, torch.Tensor) else None


def _nbytes(t: torch.Tensor | QuantizedTensor) -> int:
    return t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()


def quantize_tensor(name: str, t: torch.Tensor, entry: PlanEntry, stats: calibrate.CalibrationStats | None,
                    method: str, min_tokens: int) -> tuple[torch.Tensor | QuantizedTensor, str, int]:
    """(stored tensor, method, calibration tokens) for one tensor under its plan entry. An FP8 checkpoint's tensor
    (`t` quantized) is copied when the plan keeps its scheme, else quantized from its exact dequantization."""
    if isinstance(t, QuantizedTensor):
        if entry.scheme == KEEP or keeps_source(t.scheme, entry.scheme):
            return t, "copy", 0
        t = t.dequantize()
    if entry.scheme == KEEP:
        return t, "keep", 0
    if entry.scheme in FLOAT_DTYPES:  # plain dense tensors: exporters and the runtime read them directly
        return t.to(FLOAT_DTYPES[entry.scheme]), "cast", 0
    if stats is not None and calibrate.is_calibratable(entry.scheme):
        with stats.using(name):
            return calibrate.quantize_calibrated(t, entry.scheme, stats, name, method, min_tokens)
    return quantize(t, entry.scheme), "rtn", 0


def quantize_graph(graph: Graph, recipe: Recipe, out: str | Path, *, force: bool = False,
                   stats: calibrate.CalibrationStats | None = None, method: str = "gptq",
                   min_tokens: int = calibrate.MIN_TOKENS, workers: int = 2,
                   progress: Callable | None = None, on_done: Callable[[str, int], None] | None = None) -> dict:
    """Quantize `graph` with `recipe` into the IR directory `out`; returns the report (also stored in the IR).

    With `stats` (from `calibrate.collect_stats`, computed layer by layer as the tensors come up), tensors of a
    calibratable scheme are quantized with `method`; those whose input saw too few tokens with RTN.
    """
    records: dict[str, TensorRecord] = {}
    with quantized_view(graph, recipe, stats=stats, method=method, min_tokens=min_tokens, workers=workers,
                        records=records, on_done=on_done) as qgraph, tempfile.TemporaryDirectory() as tmp:
        plan = plan_schemes(recipe, graph.config, {n: tuple(t.shape) for n, t in graph.tensors.items()})
        calibrated = {n for n, e in plan.items() if calibrate.is_calibratable(e.scheme)}
        if stats is not None:
            qgraph.assets[REPORT_MD] = Path(tmp) / REPORT_MD
        qgraph.assets[REPORT_JSON] = Path(tmp) / REPORT_JSON
        report: dict = {}

        def write_report(items):  # runs inside save, after the last tensor and before graph.json and the assets
            yield from items
            # layer-streamed statistics: every layer's expert token counts are known once its tensors are done
            coverage = calibrate.coverage_report(stats, calibrated, min_tokens, method) if stats is not None else None
            qgraph.provenance = {**graph.provenance, "quantization": {"recipe": recipe.to_json(),
                                                                       "calibration": _summary(coverage)}}
            if coverage is not None:
                (Path(tmp) / REPORT_MD).write_text(calibrate.coverage_markdown(coverage))
            report.update(build_report(recipe, records, coverage))
            (Path(tmp) / REPORT_JSON).write_text(json.dumps(report, indent=1))

        qgraph.save(out, force=force, progress=lambda xs: write_report(progress(xs) if progress else xs))
    return report


def _summary(coverage: dict | None) -> dict | None:
    if coverage is None:
        return None
    return {k: coverage[k] for k in ("method", "min_tokens", "calibration_tokens", "experts", "experts_calibrated",
                                     "coverage")}


def build_report(recipe: Recipe, records: dict[str, TensorRecord], coverage: dict | None) -> dict:
    """Per-class and overall sizes, per-tensor method and calibration tokens, and the coverage report."""
    classes: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0, "schemes": set()})
    for r in records.values():
        c = classes[r.cls]
        c["tensors"] += 1
        c["params"] += r.params
        c["bytes"] += r.nbytes
        c["schemes"].add(r.scheme)
    params = sum(r.params for r in records.values())
    nbytes = sum(r.nbytes for r in records.values())
    methods: dict[str, int] = defaultdict(int)
    for r in records.values():
        methods[r.method] += 1
    return {
        "recipe": recipe.to_json(),
        "params": params,
        "bytes": nbytes,
        "bits_per_weight": 8 * nbytes / max(params, 1),
        "methods": dict(methods),
        "fallbacks": fallback_counts(r.fallback for r in records.values()),
        "classes": {k: {**v, "schemes": sorted(v["schemes"]), "bits_per_weight": 8 * v["bytes"] / max(v["params"], 1)}
                    for k, v in sorted(classes.items())},
        "calibration": coverage,
        "tensors": {n: {"class": r.cls, "scheme": r.scheme, "method": r.method, "tokens": r.tokens,
                        **({"fallback": list(r.fallback)} if r.fallback else {})} for n, r in records.items()},
    }
