"""Apply a recipe to a graph and write the quantized IR: one tensor (one expert's matrix) at a time, two workers.

    quantize_graph(Graph.load(ir), get_recipe("int4"), out, stats=collect_stats(...), method="gptq")

Tensors are read, quantized and written in the graph's order through `Graph.save` (atomic, sharded); workers run
ahead by a bounded window, so peak memory is a shard's budget plus a few tensors whatever the model's size.
Next to the tensors the IR carries `quantization.json` (recipe, per-class schemes and sizes, per-tensor method and
calibration tokens, per-layer / per-expert calibration coverage) and `quantization.md` (the coverage table).
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nextq.errors import CheckpointError, NextqError
from nextq.graph import Graph, QuantRef

from . import calibrate
from .recipes import KEEP, PlanEntry, Recipe, plan_schemes
from .schemes import FLOAT_DTYPES, quantize
from .tensor import QuantizedTensor

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


class Prefetcher:
    """Lazy tensors computed by a thread pool at most `window` ahead of the consumer, in consumption order.

    `Graph.save` calls `.load()` on each in order; each load submits the jobs up to `window` further and waits for
    its own. Memory stays bounded by `window` results.
    """

    def __init__(self, names: list[str], job: Callable[[str], Any], workers: int, window: int):
        self.names, self.job, self.window = names, job, window
        self.pos = {n: i for i, n in enumerate(names)}
        self.futures: dict[str, Future] = {}
        self.submitted = 0
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nextq-quant")

    def result(self, name: str) -> Any:
        with self.lock:
            upto = min(len(self.names), self.pos[name] + 1 + self.window)
            while self.submitted < upto:
                n = self.names[self.submitted]
                self.futures[n] = self.pool.submit(self.job, n)
                self.submitted += 1
            fut = self.futures.pop(name)
        return fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class PendingTensor:
    """A graph entry whose value the prefetcher produces (the quantized tensor or the kept/cast dense one)."""

    name: str
    shape: tuple[int, ...]
    prefetcher: Prefetcher

    def load(self) -> Any:
        return self.prefetcher.result(self.name)


def _nbytes(t: torch.Tensor | QuantizedTensor) -> int:
    return t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()


def quantize_tensor(name: str, t: torch.Tensor, entry: PlanEntry, stats: calibrate.CalibrationStats | None,
                    method: str, min_tokens: int) -> tuple[torch.Tensor | QuantizedTensor, str, int]:
    """(stored tensor, method, calibration tokens) for one tensor under its plan entry."""
    if entry.scheme == KEEP:
        return t, "keep", 0
    if entry.scheme in FLOAT_DTYPES:  # plain dense tensors: exporters and the runtime read them directly
        return t.to(FLOAT_DTYPES[entry.scheme]), "cast", 0
    if stats is not None and calibrate.is_calibratable(entry.scheme):
        return calibrate.quantize_calibrated(t, entry.scheme, stats, name, method, min_tokens)
    return quantize(t, entry.scheme), "rtn", 0


def quantize_graph(graph: Graph, recipe: Recipe, out: str | Path, *, force: bool = False,
                   stats: calibrate.CalibrationStats | None = None, method: str = "gptq",
                   min_tokens: int = calibrate.MIN_TOKENS, workers: int = 2,
                   progress: Callable | None = None) -> dict:
    """Quantize `graph` with `recipe` into the IR directory `out`; returns the report (also stored in the IR).

    With `stats` (from `calibrate.collect_stats`), int4 tensors whose input was recorded are quantized with
    `method`; the rest of the int4 tensors, and every tensor with too few tokens, with RTN.
    """
    if method not in calibrate.QUANTIZERS:
        raise NextqError(f"calibration method: unknown {method!r}; supported: {', '.join(calibrate.QUANTIZERS)}")
    already = next((n for n, t in graph.tensors.items() if isinstance(t, (QuantRef, QuantizedTensor))), None)
    if already is not None:
        raise CheckpointError(f"{already}: the input IR is already quantized ({graph.get(already).scheme}); "
                              "quantize from a float IR")
    shapes = {n: tuple(t.shape) for n, t in graph.tensors.items()}
    plan = plan_schemes(recipe, graph.config, shapes)
    records: dict[str, TensorRecord] = {}

    def job(name: str):
        entry = plan[name]
        try:
            t, how, tokens = quantize_tensor(name, graph.get(name), entry, stats, method, min_tokens)
        except (ValueError, RuntimeError) as e:  # say which tensor (which expert) failed
            raise NextqError(f"{name}: quantizing as {entry.scheme} failed: {e}") from e
        n = 1
        for dim in shapes[name]:
            n *= dim
        records[name] = TensorRecord(name, entry.cls, entry.scheme, how, tokens, n, _nbytes(t))
        return t

    names = list(graph.tensors)
    pre = Prefetcher(names, job, workers, window=4 * workers)
    calibrated = {n for n, e in plan.items() if calibrate.is_calibratable(e.scheme)}
    coverage = (calibrate.coverage_report(stats, calibrated, min_tokens, method) if stats is not None else None)
    provenance = {**graph.provenance, "quantization": {"recipe": recipe.to_json(),
                                                        "calibration": _summary(coverage)}}
    with tempfile.TemporaryDirectory() as tmp:
        assets = dict(graph.assets)
        if coverage is not None:
            (Path(tmp) / REPORT_MD).write_text(calibrate.coverage_markdown(coverage))
            assets[REPORT_MD] = Path(tmp) / REPORT_MD
        assets[REPORT_JSON] = Path(tmp) / REPORT_JSON
        lazy = {n: PendingTensor(n, shapes[n], pre) for n in names}
        qgraph = Graph(graph.config, lazy, provenance, assets)
        report: dict = {}

        def write_report(items):  # runs inside save, after the last tensor and before the assets are copied
            yield from items
            report.update(build_report(recipe, records, coverage))
            (Path(tmp) / REPORT_JSON).write_text(json.dumps(report, indent=1))

        try:
            qgraph.save(out, force=force,
                        progress=lambda xs: write_report(progress(xs) if progress else xs))
        finally:
            pre.close()
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
        "classes": {k: {**v, "schemes": sorted(v["schemes"]), "bits_per_weight": 8 * v["bytes"] / max(v["params"], 1)}
                    for k, v in sorted(classes.items())},
        "calibration": coverage,
        "tensors": {n: {"class": r.cls, "scheme": r.scheme, "method": r.method, "tokens": r.tokens}
                    for n, r in records.items()},
    }
