"""Bit allocation: `nextq quantize --target-bpw X` picks a scheme per GGUF tensor from measured sensitivity.

Unit: one GGUF tensor (`quant.llama_mix.gguf_groups`: a layer's stacked experts of one projection, DeltaNet q/k/v as
attn_qkv, ...), because a GGUF tensor has one type and every target keeps it whole. Candidates per unit: a ladder
of schemes that fit its row length, cheapest first (K-quants where K is a multiple of 256, the 32-block types
otherwise, as llama.cpp falls back):

    K % 256 == 0   q3_k (3.44) < q4_k (4.5) < q5_k (5.5) < q6_k (6.56) < int8_g32 = Q8_0 (8.5)
    K % 32 == 0    int4_sym_g32 = Q4_0 (4.5) < q5_0 (5.5) < int8_g32 (8.5)

Sensitivity of a unit under scheme s: the output error its round-to-nearest weights cause on the calibration
tokens, sum over sources of tr(E H E^T) with E = dequant(s(W)) - W and H = sum x x^T over the tokens each source
really sees (an expert: the tokens routed to it), so experts are weighted by their routing frequency; the
embedding (a lookup, no matmul input): its squared row errors times the tokens per vocabulary entry. Units without
statistics stay at their cheapest scheme.

Those errors are in each tensor's own output space (an LM head's logits, a down projection's residual stream), so
they do not compare across tensors. The "kld" proxy (default on models of up to KLD_MAX_PARAMS parameters, whose
float32 copy is held once) puts them on one scale: each unit alone at its cheapest scheme, the model run on
KLD_WINDOWS calibration windows, the mean KL(P_float || P_quantized) of the logits measured; the unit's errors are
rescaled so that its cheapest one equals that KLD (its ladder keeps the output errors' ratios). The MTP head's
units do not reach the main logits (only the draft's acceptance): they take the smallest rescaling measured. Larger models (or statistics without their
windows) keep the "output" proxy as measured. Allocation: start every unit
at its cheapest candidate; while the budget allows, upgrade the unit with the largest error reduction per extra
bit (greedy). The plan is a Recipe (one override per tensor),
so quantization, calibration and every exporter run exactly as for a built-in recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from nextq.errors import RecipeError
from nextq.graph import Graph
from nextq.validate.metrics import kl_divergence

from .llama_mix import gguf_groups
from .recipes import KEEP, Override, Recipe, nominal_bits, plan_schemes
from .schemes import SCHEMES, dequantize, quantize

LADDERS: tuple[tuple[int, tuple[str, ...]], ...] = (  # (row multiple, candidates cheapest first)
    (256, ("q3_k", "q4_k", "q5_k", "q6_k", "int8_g32")),
    (32, ("int4_sym_g32", "q5_0", "int8_g32")),
)


@dataclass
class Unit:
    """One GGUF tensor: its canonical sources, candidate schemes and their (bits, error)."""

    gguf: str
    sources: tuple[str, ...]
    params: int
    candidates: tuple[str, ...]
    errors: list[float]  # per candidate; 0.0 everywhere when unmeasured
    measured: bool
    choice: int = 0

    @property
    def bits(self) -> float:
        return self.params * SCHEMES[self.candidates[self.choice]].bits_per_weight


def ladder(k: int) -> tuple[str, ...]:
    """Candidate schemes for rows of length k, cheapest first; () when none fits (the tensor stays as stored)."""
    return next((c for m, c in LADDERS if k % m == 0), ())


MEASURE_CHUNK = 1 << 24  # elements quantized in one call by rtn_stack (64 MiB of float32 weights)


def stack_chunks(sizes: list[int]) -> Iterator[slice]:
    """Consecutive runs of matrices (by element count) of at most MEASURE_CHUNK elements (one, if larger)."""
    i = 0
    while i < len(sizes):
        j, size = i + 1, sizes[i]
        while j < len(sizes) and size + sizes[j] <= MEASURE_CHUNK:
            size += sizes[j]
            j += 1
        yield slice(i, j)
        i = j


def rtn_stack(ws: list[torch.Tensor], scheme: str) -> Iterator[torch.Tensor]:
    """Round-to-nearest `scheme` of each w_i `[N_i, K]`, dequantized (float32 `[N_i, K]`), in order.

    The matrices are quantized as one `[sum N_i, K]` stack, MEASURE_CHUNK elements at a time: every scheme
    quantizes rows independently, so the codes are those of one call per matrix, but the K-quants' per-call Python
    work (their float32 sums in ggml's order loop over a sub-block's columns, whatever the row count) is paid once
    per chunk instead of once per expert."""
    for sl in stack_chunks([w.numel() for w in ws]):
        w = torch.cat([x.float() for x in ws[sl]])  # [sum N, K]
        yield from dequantize(quantize(w, scheme)).split([x.shape[0] for x in ws[sl]])


def output_errors(ws: list[torch.Tensor], scheme: str, hs: list[torch.Tensor]) -> list[float]:
    """tr(E_i H_i E_i^T) of round-to-nearest `scheme` on each w_i `[N_i, K]` with its H_i `[K, K]`
    (E_i = dequant(scheme(w_i)) - w_i; the matrices quantized as one stack, rtn_stack)."""
    out = []
    for w, q, h in zip(ws, rtn_stack(ws, scheme), hs):
        e = (q - w.float()).double()  # [N, K]
        out.append(float(((e @ h.double()) * e).sum()))
    return out


def measure(graph: Graph, stats, progress: Callable | None = None) -> list[Unit]:
    """Every quantizable GGUF tensor with its candidates and their output errors on the calibration statistics."""
    units = []
    for gname, sources in gguf_groups(graph.config):
        shape = tuple(graph.tensors[sources[0]].shape)
        cands = ladder(shape[1]) if len(shape) == 2 else ()
        params = sum(math.prod(graph.tensors[s].shape) for s in sources)
        units.append(Unit(gname, sources, params, cands, [0.0] * len(cands), False))
    for u in (progress(units) if progress else units):
        found = [(s, stats.hessian(s)) for s in u.sources] if stats is not None else []
        found = [(s, f) for s, f in found if f is not None and f[0] > 0]
        if u.candidates and stats is not None and u.sources == ("embed.weight",):
            found = [("embed.weight", (stats.tokens, None))]  # a lookup: each token adds its row's error once
        if not u.candidates or not found:
            continue
        u.measured = True
        if found[0][1][1] is None:
            w = graph.get("embed.weight").float()
            u.errors = [lookup_error(w, c, stats.tokens) for c in u.candidates]
            continue
        names, hs = [s for s, _ in found], [h for _, (_, h) in found]
        for sl in stack_chunks([math.prod(graph.tensors[s].shape) for s in names]):  # a chunk's weights held
            ws = [graph.get(s).float() for s in names[sl]]
            for i, c in enumerate(u.candidates):
                for e in output_errors(ws, c, hs[sl]):  # summed source by source, in order
                    u.errors[i] += e
    return units


def lookup_error(w: torch.Tensor, scheme: str, tokens: int) -> float:
    """The embedding's share of the output error: sum over calibration tokens of |row error|^2, rows taken as
    equally frequent (tokens / vocab each: the statistics do not count tokens per id)."""
    e = (dequantize(quantize(w, scheme)) - w.float()).double()
    return float((e * e).sum()) * tokens / w.shape[0]


KLD_WINDOWS = 2  # calibration windows the "kld" proxy runs the model on, per unit
KLD_MAX_PARAMS = 1 << 28  # the "kld" proxy holds one float32 copy of the model: up to 1 GiB


def kld_rescale(graph: Graph, units: list[Unit], ids: torch.Tensor,
                progress: Callable | None = None) -> None:
    """The "kld" proxy (module docstring): rescale each measured unit's errors in place so that its cheapest
    candidate's equals the mean KLD of the logits with only that unit quantized (RTN), on `ids` `[n, T]`."""
    from nextq.runtime.model import TorchModel

    model = TorchModel(graph, "cpu", torch.float32)
    ref = model.forward(ids).numpy()
    scale: dict[int, float] = {}
    for i, u in enumerate(progress(units) if progress else units):
        if not u.measured or u.errors[0] <= 0 or u.sources[0].startswith("mtp."):
            continue
        for s, q in zip(u.sources, rtn_stack([graph.get(s) for s in u.sources], u.candidates[0])):
            model.w.put(s, q)
        kld = float(kl_divergence(ref, model.forward(ids).numpy()).mean())
        for s in u.sources:
            model.w.put(s, graph.get(s))
        scale[i] = kld / u.errors[0]
    least = min(scale.values(), default=1.0)
    for i, u in enumerate(units):
        if u.measured:
            f = scale.get(i, least)
            u.errors = [e * f for e in u.errors]


def allocate(units: list[Unit], budget_bits: float, fixed_bits: float) -> float:
    """Choose each unit's candidate so that fixed_bits + sum(unit bits) <= budget_bits with small total error.

    Greedy: repeatedly the upgrade (of any unit, to any costlier candidate) with the largest error reduction per
    extra bit that still fits; returns the bits used.
    The caller checks that the cheapest choice fits (target_recipe says by how much it does not).
    """
    for u in units:
        u.choice = 0
    used = fixed_bits + sum(u.bits for u in units if u.candidates)
    assert used <= budget_bits * (1 + 1e-9), (used, budget_bits)
    while True:
        best = None
        for u in units:
            if not u.measured or u.choice + 1 >= len(u.candidates):
                continue
            cur_b, cur_e = u.bits, u.errors[u.choice]
            for j in range(u.choice + 1, len(u.candidates)):  # best slope among the upgrades of this unit
                extra = u.params * SCHEMES[u.candidates[j]].bits_per_weight - cur_b
                gain = cur_e - u.errors[j]
                if extra > 0 and gain > 0 and used + extra <= budget_bits:
                    if best is None or gain / extra > best[0]:
                        best = (gain / extra, u, j, extra)
        if best is None:
            return used
        _, u, j, extra = best
        u.choice = j
        used += extra


def sensitivity(graph: Graph, stats, progress: Callable | None = None) -> tuple[list[Unit], str]:
    """Every unit with its candidates' errors (`measure`), on the logits' KLD scale where the "kld" proxy applies
    (module docstring); returns (units, the proxy used)."""
    units = measure(graph, stats, progress)
    total = sum(math.prod(t.shape) for t in graph.tensors.values())
    if getattr(stats, "ids", None) is None or total > KLD_MAX_PARAMS:
        return units, "output"
    kld_rescale(graph, units, stats.ids[:KLD_WINDOWS].cpu(), progress)
    return units, "kld"


def target_recipe(graph: Graph, target_bpw: float, stats, keep_bits: float = 16.0,
                  progress: Callable | None = None, measured: tuple[list[Unit], str] | None = None
                  ) -> tuple[Recipe, list[Unit], dict]:
    """The recipe meeting `target_bpw` (bits per weight over every tensor, scales included) with the least measured
    error, the units behind it, and a summary (target, reached, smallest and largest reachable, proxy).
    `measured`: `sensitivity(graph, stats)` when the caller already has it (several budgets on one model)."""
    check_budget(graph, target_bpw, keep_bits)  # an impossible budget fails before any measuring
    units, proxy = measured or sensitivity(graph, stats, progress)
    fixed, total = _sizes(graph, units, keep_bits)
    lo, hi = _reachable(units, fixed, total)
    used = allocate(units, target_bpw * total, fixed)
    overrides = tuple(Override(s, u.candidates[u.choice]) for u in units if u.candidates for s in u.sources)
    recipe = Recipe(name=f"target-{target_bpw:g}bpw", overrides=overrides,
                    description=f"measured allocation for {target_bpw:g} bits per weight (nextq quantize --target-bpw)")
    plan_schemes(recipe, graph.config, {n: tuple(t.shape) for n, t in graph.tensors.items()})  # valid everywhere
    return recipe, units, {"target_bpw": target_bpw, "bpw": used / total, "min_bpw": lo, "max_bpw": hi,
                           "proxy": proxy}


def _reachable(units: list[Unit], fixed: float, total: int) -> tuple[float, float]:
    """(smallest, largest) bits per weight: every unit at its cheapest / costliest candidate."""
    lo = fixed + sum(u.params * SCHEMES[u.candidates[0]].bits_per_weight for u in units if u.candidates)
    hi = fixed + sum(u.params * SCHEMES[u.candidates[-1]].bits_per_weight for u in units if u.candidates)
    return lo / total, hi / total


def check_budget(graph: Graph, target_bpw: float, keep_bits: float = 16.0) -> None:
    """Refuse (RecipeError) a target that is not a positive number or is below the smallest reachable size."""
    if not math.isfinite(target_bpw) or target_bpw <= 0:
        raise RecipeError(f"--target-bpw: expected a positive number of bits per weight, got {target_bpw}")
    units = measure(graph, None)
    lo, _ = _reachable(units, *_sizes(graph, units, keep_bits))
    if target_bpw < lo - 1e-9:
        raise RecipeError(f"--target-bpw {target_bpw:g}: below the smallest reachable {lo:.3f} bits per weight on "
                          f"this model (every quantizable tensor at its cheapest scheme: q3_k, or int4_sym_g32 where "
                          f"rows are not a multiple of 256; the tensors without a ladder as stored)")


def _sizes(graph: Graph, units: list[Unit], keep_bits: float) -> tuple[float, int]:
    """(bits of the tensors no unit covers, as stored; parameters of the whole model)."""
    shapes = {n: tuple(t.shape) for n, t in graph.tensors.items()}
    covered = {s for u in units if u.candidates for s in u.sources}
    fixed = sum(math.prod(shapes[n]) * _stored_bits(graph, n, keep_bits) for n in shapes if n not in covered)
    return fixed, sum(math.prod(s) for s in shapes.values())


def _stored_bits(graph: Graph, name: str, keep_bits: float) -> float:
    """Bits per element of a tensor left as stored (its dtype's width; `keep_bits` when unknown)."""
    dtype = getattr(graph.tensors[name], "dtype", None)
    return 8.0 * dtype.itemsize if isinstance(dtype, torch.dtype) else nominal_bits(KEEP, keep_bits)


def plan_markdown(units: list[Unit], summary: Mapping) -> str:
    """The allocation as a markdown table: one row per GGUF tensor."""
    lines = [f"bit allocation: target {summary['target_bpw']:g} bits/weight, reached {summary['bpw']:.3f} "
             f"(reachable {summary['min_bpw']:.3f} .. {summary['max_bpw']:.3f}; errors: {summary['proxy']} proxy)",
             "",
             "| GGUF tensor | sources | params | scheme | bits/w | error (chosen / cheapest) |",
             "|---|---:|---:|---|---:|---|"]
    for u in units:
        if not u.candidates:
            continue
        s = u.candidates[u.choice]
        err = f"{u.errors[u.choice]:.3e} / {u.errors[0]:.3e}" if u.measured else "no statistics: cheapest"
        lines.append(f"| {u.gguf} | {len(u.sources)} | {u.params} | {s} | {SCHEMES[s].bits_per_weight:.2f} | {err} |")
    return "\n".join(lines) + "\n"


def plan_json(units: list[Unit], summary: Mapping) -> dict:
    return {**summary, "units": [{"gguf": u.gguf, "sources": list(u.sources), "params": u.params,
                                  "candidates": list(u.candidates), "errors": u.errors, "measured": u.measured,
                                  "scheme": u.candidates[u.choice] if u.candidates else KEEP} for u in units]}
