"""`nextq pipeline`: the main job end to end, in memory bounded by one layer (layer-streamed calibration and
validation; only an engine validating its own artifact holds that artifact).

    convert (HF -> IR) -> quantize (recipe, calibrated layer by layer) -> export each format -> validate every
    artifact against the original -> the summary table (format, size, bits/weight, PPL, dPPL, KLD, top-1, tokens/s),
    the step table (wall, wall per layer, peak RSS, peak GPU memory) and a report directory.

Output directory (written atomically: a temporary sibling renamed at the end):
    ir/                the converted original          quantized/     the quantized IR (torch backend)
                       (not with --no-save-original: then SOURCE is quantized straight from its shards)
    model.gguf         GGUF export (llama.cpp)          onnx/          ONNX export (ONNX Runtime)
    reports/<row>.json|.md|-kld.png|-layers.png         summary.json (rows, steps), summary.md (both tables)

Steps of kind "nextq" (convert, quantize, export, validating the quantized IR: both sides layer-streamed) run in
memory bounded by one layer; steps of kind "engine" hold their artifact: the torch backend running the quantized IR
(tokens/s), llama.cpp and ONNX Runtime validating their file. llama.cpp cannot allocate the KV cache of a model
without an attention layer (fewer than 4 layers of Qwen3-Next): the GGUF is then exported but not validated, and
both tables say so; an engine that is not installed is skipped the same way. On a source of more than 1 GiB of
weights (or with --isolate-steps) every step runs in a fresh process of its own (spawned), so that nothing a step
leaves behind (heap the allocator keeps, pages of mapped files, an engine's session) is held during the next; its
peak RSS is then that process's high-water mark plus what the pipeline's own process holds, else this process's
high-water mark reset at each step's start (Linux; blank where unknown); GPU peak is torch's max_memory_allocated.

The reference is the original checkpoint: run by transformers when it fits (see nextq.validate.compare), else by
nextq's layer-streamed executor; its logits are computed once and cached, so every artifact is compared on the
same windows without recomputing it. Per-layer drift of the quantized IR is measured against the converted IR.
Size = the whole artifact on disk; bits/weight = 8 * bytes of its weight files (safetensors, .gguf, .onnx +
external data; a GGUF also holds its tokenizer) / parameters of the float model; tokens/s = greedy generation
(prefill + decode) of `--max-new-tokens` tokens from `--prompt`, after a one-token warm-up (the original's only
where transformers runs it).
The pipeline reports; gating (exit 1 on drift) is `nextq validate`'s job.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np
from rich.table import Table

from .console import Step, StepLog, console, out, progress_iter, rss, run_isolated
from .errors import NextqError
from .graph import GatedAttention, Graph, Layer, atomic_output_dir, expected_tensors
from .targets import EXPORT_TARGETS

T = TypeVar("T")

PROMPT = "def fibonacci(n):\n"


def embedded_model() -> Path:
    """The embedded trained tiny Qwen3-Next (a Hugging Face checkpoint shipped inside the package)."""
    return Path(str(resources.files("nextq") / "assets" / "tiny"))


EXPORTERS = EXPORT_TARGETS  # --formats: every target with a writer (nextq/targets.py)


def parse_formats(text: str) -> list[str]:
    fmts = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in fmts if f not in EXPORTERS]
    if bad:
        raise click.BadParameter(f"unknown format(s) {bad}; supported: {', '.join(EXPORTERS)}")
    return fmts


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".data", ".bin")


def disk_size(path: Path, weights_only: bool = False) -> int:
    """Bytes on disk of a file or a directory's files (only weight files: safetensors, gguf, onnx + data)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if not weights_only or p.name.endswith(WEIGHT_SUFFIXES))


# GGUF has no fp8 type: the schemes with neither a GGUF type nor a nearest one (the fp8 tiles an FP8 source keeps
# where the recipe says "keep", or the fp8 recipe's blocks) are written as Q8_0, the GGUF type nearest to fp8 in
# size (8.5 bits/weight, as `nextq export gguf --requantize q8_0`); the exporter prints their measured extra error,
# and the GGUF row and step say which type they became. Every other tensor keeps its type.
GGUF_FALLBACK = "q8_0"


def gguf_options(graph: Graph) -> tuple[dict, str]:
    """The GGUF writer's keyword arguments for `graph` in the pipeline, and a note naming what became which type."""
    from collections import Counter

    from .convert.gguf_export import NATIVE, NEAREST, GGUFOptions, describe

    unmapped = Counter(x for what, x in map(describe, graph.tensors.values())
                       if what == "quant" and x not in NATIVE and x not in NEAREST)
    if not unmapped:
        return {}, ""
    held = ", ".join(f"{n} {x}" for x, n in sorted(unmapped.items()))
    return ({"opts": GGUFOptions(fallback=GGUF_FALLBACK)},
            f"{held} tensors written as {GGUF_FALLBACK.upper()} (GGUF has no fp8 type)")


EXPORT_OPTIONS = {"gguf": gguf_options}  # format -> (quantized graph -> its writer's kwargs, a note)


def quantize_ir(graph: Graph, recipe: str, out: Path, *, calib_tokens: int = 8192, device: str = "cpu",
                tokenizer_dir: Path | None = None) -> dict:
    """The recipe API of nextq.quant, calibrated as `nextq quantize` is by default (GPTQ on `calib_tokens` tokens of
    the default calibration text, tokenized with the tokenizer in `tokenizer_dir`; 0 = round to nearest); returns
    its quantization report."""
    from .quant import calibrate
    from .quant.apply import quantize_graph
    from .quant.cli import calibration_windows
    from .quant.recipes import get_recipe, plan_schemes

    rec = get_recipe(recipe)
    plan = plan_schemes(rec, graph.config, {n: tuple(t.shape) for n, t in graph.tensors.items()})
    stats = None
    if calib_tokens and any(calibrate.is_calibratable(e.scheme) for e in plan.values()):
        windows = calibration_windows(tokenizer_dir, None, calib_tokens, 256)
        wanted = [n for n, e in plan.items() if calibrate.is_calibratable(e.scheme)]
        stats = calibrate.collect_stats(graph, windows, wanted, device=device,
                                        on_stage=lambda name, s: console.print(f"  statistics of {name}: {s:.1f} s"))
    return quantize_graph(graph, rec, out, stats=stats, progress=lambda xs: progress_iter(xs, f"quantizing ({recipe})"))


def generation_speed(model, ids: np.ndarray, max_new_tokens: int) -> tuple[float, list[int]]:
    """(tokens/s of greedy generation from ids [1, T], prefill included; the generated token ids).

    Token ids, not text: a .gguf's backend may have no tokenizer files beside it; the original's tokenizer decodes.
    """
    model.generate(ids, max_new_tokens=1)  # warm-up: first-call setup is not generation speed
    t0 = time.perf_counter()
    new = model.generate(ids, max_new_tokens=max_new_tokens)
    dt = time.perf_counter() - t0
    return new.shape[1] / dt, [int(t) for t in new[0]]


# ---- the steps: top-level functions of picklable arguments, so that each can run in a process of its own ----------


def convert_step(original: Path, out: Path) -> None:
    from .convert.cli import convert

    convert(str(original), out)


def quantize_step(source: Path, from_ir: bool, recipe: str, out: Path, calib_tokens: int, device: str,
                  tokenizer_dir: Path) -> dict:
    """Quantize the converted IR `source` (from_ir) or the checkpoint `source` straight from its shards (read
    lazily, their sha256 in the provenance); returns the quantization report."""
    from .convert.hf import read_hf
    from .validate.compare import shard_sha256

    if from_ir:
        graph = Graph.load(source)
    else:
        graph = read_hf(str(source), hash_shards=False)  # lazy
        graph.provenance["shards"] = {n: shard_sha256(source / n) for n in graph.provenance["shards"]}
    return quantize_ir(graph, recipe, out, calib_tokens=calib_tokens, device=device, tokenizer_dir=tokenizer_dir)


def export_step(fmt: str, quantized: Path, out: Path) -> str:
    """Export the quantized IR as `fmt`; returns the note naming what became which type."""
    qgraph = Graph.load(quantized)
    kwargs, note = EXPORT_OPTIONS.get(fmt, lambda g: ({}, ""))(qgraph)
    EXPORTERS[fmt].load(fmt)(qgraph, out, **kwargs)
    return note


def validate_step(candidate: Path, original: Path, validation: dict, layer_reference: Path | None) -> dict:
    """The quantized IR against the original, both layer-streamed (bounded memory)."""
    from .validate.cli import validate

    return validate(candidate, original, layer_reference=layer_reference, **validation)


def speed_step(path: Path, backend: str | None, device: str, ids: np.ndarray, max_new_tokens: int
               ) -> tuple[float, list[int]]:
    """Generation speed of `path` in `backend` (the whole model in memory)."""
    from nextq import load

    return generation_speed(load(path, backend=backend, device=device), ids, max_new_tokens)


def engine_step(path: Path, backend: str, original: Path, validation: dict, ids: np.ndarray, max_new_tokens: int
                ) -> tuple[dict, str, float, list[int]] | str:
    """An artifact validated inside its own engine, then its generation speed: (report, backend name, tokens/s,
    generated ids), or the name of the module its engine needs when that is not installed."""
    from .validate.cli import validate
    from .validate.compare import EngineLogits

    try:
        engine = EngineLogits(path, backend)
    except ModuleNotFoundError as e:
        return str(e.name)
    doc = validate(path, original, candidate_source=engine, **validation)
    return (doc, engine.model.name, *generation_speed(engine.model, ids, max_new_tokens))


ISOLATE_BYTES = 1 << 30  # sources with more weight bytes than this run each step in a process of its own


def call_step(step: Step, isolate: bool, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) for `step`: here, or (isolate) in a fresh process whose peak RSS and GPU memory become the
    step's (plus what this process holds): nothing an earlier step left in this process's heap, mapped files or
    CUDA context counts against the next, and a step's own garbage goes with its process."""
    if not isolate:
        return fn(*args)
    value, peak, gpu = run_isolated(fn, *args)
    own = rss()
    step.peak_rss = None if peak is None else peak + (own or 0)
    step.gpu_peak = gpu
    return value


def summary_table(rows: list[dict]) -> Table:
    t = Table(title="nextq pipeline")
    for col in ("format", "backend", "size", "bits/weight", "PPL", "ΔPPL", "KLD", "top-1", "tokens/s", "gate"):
        t.add_column(col, justify="left" if col in ("format", "backend", "gate") else "right")
    for r in rows:
        t.add_row(r["format"], r["backend"], f"{r['size_bytes'] / 2**20:.2f} MiB", f"{r['bits_per_weight']:.2f}",
                  f"{_num(r['ppl'], '.3f')}", _pct(r["ppl_increase"]), _num(r["kld_mean"]), _num(r["top1"], ".3f"),
                  _num(r["tokens_per_s"], ".1f"), _gate(r))
    return t


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| format | backend | size | bits/weight | PPL | ΔPPL | KLD | top-1 | tokens/s | gate |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        gate = _gate(r).replace("[red]FAIL[/]", "FAIL")
        lines.append(f"| {r['format']} | {r['backend']} | {r['size_bytes'] / 2**20:.2f} MiB | "
                     f"{r['bits_per_weight']:.2f} | {_num(r['ppl'], '.3f')} | {_pct(r['ppl_increase'])} | "
                     f"{_num(r['kld_mean'])} | {_num(r['top1'], '.3f')} | {_num(r['tokens_per_s'], '.1f')} | {gate} |")
    return "\n".join(lines) + "\n"


def _gate(r: dict) -> str:
    if r["format"] == "original":
        return "reference"
    if r["passed"] is None:
        return "not validated"
    return "pass" if r["passed"] else "[red]FAIL[/]"


def steps_markdown(log: StepLog) -> str:
    """The per-step table (wall, wall per layer, peak RSS, peak GPU memory) as markdown."""
    lines = [f"| step ({log.layers} layers) | kind | wall s | s / layer | peak RSS GiB | GPU peak GiB | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for s in log.steps:
        gib = ["" if b is None else f"{b / 2**30:.2f}" for b in (s.peak_rss, s.gpu_peak)]
        lines.append(f"| {s.name} | {s.kind} | {s.wall_s:.1f} | {s.wall_s / log.layers:.1f} | {gib[0]} | {gib[1]} | "
                     f"{s.note} |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.2f}%"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "" if x is None else format(x, fmt)


@click.command("pipeline")
@click.argument("source", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("nextq-pipeline"), show_default=True,
              help="Directory for every artifact, the reports and the summary.")
@click.option("--recipe", default="int4", show_default=True,
              help="Quantization recipe: a built-in name or a TOML file.")
@click.option("--formats", default="gguf,onnx", show_default=True, callback=lambda c, p, v: parse_formats(v),
              help=f"Comma-separated export formats ({', '.join(EXPORTERS)}); empty for none.")
@click.option("--revision", help="Hub revision when SOURCE is a repo id.")
@click.option("--calib-tokens", default=8192, show_default=True, help="Calibration tokens (windows of 256).")
@click.option("--device", default="cpu", show_default=True,
              help="Where calibration and validation run (cuda: layers streamed host -> GPU).")
@click.option("--save-original/--no-save-original", default=True, show_default=True,
              help="Write the converted original as ir/ (else quantize straight from SOURCE: no float copy on disk).")
@click.option("--corpus", "corpora", multiple=True, help="Validation corpus (default: the built-in held-out text).")
@click.option("--window", default=256, show_default=True, help="Validation window, tokens.")
@click.option("--max-windows", default=16, show_default=True, help="Validation windows (0 = the whole corpus).")
@click.option("--prompt", default=PROMPT, show_default=True, help="Prompt for the generation-speed check.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--isolate-steps/--in-process", "isolate", default=None,
              help="Run each step in a process of its own (default: when SOURCE holds over 1 GiB of weights), so "
                   "that no step's memory outlives it.")
@click.option("--publish", "publish_id", metavar="REPO_ID",
              help="Last step: publish OUTPUT (quantized IR, exports, reports, model card) to this Hub repo.")
def pipeline_cmd(source, output, recipe, formats, revision, calib_tokens, device, save_original, corpora, window,
                 max_windows, prompt, max_new_tokens, force, isolate, publish_id):
    """Run the whole job on SOURCE (default: the embedded tiny trained model)."""
    rows = run_pipeline(source, output, recipe=recipe, formats=formats, revision=revision, calib_tokens=calib_tokens,
                        device=device, save_original=save_original, corpora=corpora, window=window,
                        max_windows=max_windows or None, prompt=prompt, max_new_tokens=max_new_tokens, force=force,
                        isolate=isolate)
    out.print(summary_table(rows))
    for r in rows:
        if r.get("note"):
            out.print(f"{r['format']}: {r['note']}", soft_wrap=True)
    if publish_id:
        from .publish import publish

        publish(output, publish_id)


def has_attention(graph: Graph) -> bool:
    """Whether any layer is full attention (llama.cpp cannot allocate the KV cache of a model without one)."""
    return any(isinstance(b.mixer, GatedAttention) for b in graph.blocks if isinstance(b, Layer))


def run_pipeline(source: str | None, output: Path, *, recipe: str = "int4", formats: list[str] = ("gguf", "onnx"),
                 revision: str | None = None, calib_tokens: int = 8192, device: str = "cpu",
                 save_original: bool = True, corpora=(), window: int = 256, max_windows: int | None = 16,
                 prompt: str = PROMPT, max_new_tokens: int = 32, force: bool = False,
                 isolate: bool | None = None) -> list[dict]:
    """The library form of `nextq pipeline`; returns the summary rows (also in OUTPUT/summary.json, with the
    per-step table under "steps"). `isolate`: run each step in a process of its own (None: when the source holds
    more than ISOLATE_BYTES of weights)."""
    from .convert.hf import read_hf, resolve_source
    from .quant.recipes import get_recipe
    from .runtime.backends import load_tokenizer
    from .validate.compare import default_backend
    from .validate.report import Thresholds, write_report

    source = source or str(embedded_model())
    get_recipe(recipe)  # fail on a bad recipe before any work
    for fmt in formats:  # ... and on a missing exporter
        EXPORTERS[fmt].load(fmt)
    original, _ = resolve_source(source, revision)  # the local checkpoint directory (a Hub repo id: downloaded)
    if isolate is None:
        isolate = disk_size(original, weights_only=True) > ISOLATE_BYTES
    console.rule(f"nextq pipeline: {source} (recipe {recipe}, formats {', '.join(formats) or 'none'}, {device}"
                 f"{', each step in its own process' if isolate else ''})")
    config = read_hf(str(original), hash_shards=False).config  # lazy: the header of each shard
    log = StepLog(layers=config.num_hidden_layers)
    with atomic_output_dir(output, force) as tmp:
        if save_original:
            with log.step("convert") as step:
                call_step(step, isolate, convert_step, original, tmp / "ir")
        params = sum(math.prod(s.shape) for s in expected_tensors(config).values())
        validation = dict(corpora=corpora, window=window, max_windows=max_windows, thresholds=Thresholds(),
                          device=device)

        with log.step("quantize") as step:
            qreport = call_step(step, isolate, quantize_step, tmp / "ir" if save_original else original,
                                save_original, recipe, tmp / "quantized", calib_tokens, device, original)
            step.note = f"recipe {recipe}, " + (f"{qreport['calibration']['calibration_tokens']} calibration tokens"
                                                if qreport.get("calibration") else "round to nearest")
        export_notes: dict[str, str] = {}
        for fmt in formats:
            with log.step(f"export {fmt}") as step:
                step.note = call_step(step, isolate, export_step, fmt, tmp / "quantized",
                                      tmp / EXPORTERS[fmt].artifact)
                export_notes[fmt] = step.note
        attention = has_attention(Graph.load(tmp / "quantized"))

        (tmp / "reports").mkdir()
        tok = load_tokenizer(original)
        if tok is None:
            raise NextqError(f"{original}: no tokenizer files (tokenizer.json or vocab.json); the pipeline's "
                             "generation check needs one")
        ids = np.array([tok(prompt)["input_ids"]], dtype=np.int64)
        rows = [{"format": "original", "backend": default_backend(original), "path": str(source),
                 "size_bytes": disk_size(original), "weight_bytes": disk_size(original, True), "ppl": None,
                 "ppl_increase": None, "kld_mean": None, "top1": None, "tokens_per_s": None, "passed": None,
                 "text": ""}]

        def add_row(fmt: str, path: Path, doc: dict | None, backend: str = "",
                    speed: tuple[float, list[int]] | None = None, note: str = "") -> None:
            m = (doc or {}).get("metrics") or {}
            rows.append({"format": fmt if fmt != "ir" else f"ir ({recipe})", "backend": backend,
                         "path": str(output / path.relative_to(tmp)), "size_bytes": disk_size(path),
                         "weight_bytes": disk_size(path, True), "ppl": m.get("ppl_candidate"),
                         "ppl_increase": m.get("ppl_increase"), "kld_mean": m.get("kld_mean"),
                         "top1": m.get("top1"), "tokens_per_s": speed[0] if speed else None,
                         "passed": doc["passed"] if doc else None,
                         "text": tok.decode(speed[1], skip_special_tokens=True) if speed else "",
                         "worst_layer": ((doc or {}).get("layers") or {}).get("worst_layer"),
                         "note": "; ".join(x for x in (export_notes.get(fmt), note) if x)})

        def report(fmt: str, doc: dict, path: Path) -> dict:
            doc["candidate"]["path"] = str(output / path.relative_to(tmp))
            write_report(doc, tmp / "reports" / f"{fmt}.json")
            rows[0]["ppl"] = doc["metrics"]["ppl_reference"]
            return doc

        with log.step("validate ir", "nextq") as step:  # layer-streamed: bounded memory
            doc = report("ir", call_step(step, isolate, validate_step, tmp / "quantized", original, validation,
                                         tmp / "ir" if save_original else None), tmp / "quantized")
            step.note = f"streamed, reference {doc['reference']['backend']}"
        with log.step("run ir (torch)", "engine") as step:  # the torch backend holds the IR (packed)
            add_row("ir", tmp / "quantized", doc, "torch",
                    call_step(step, isolate, speed_step, tmp / "quantized", "torch", device, ids, max_new_tokens))
        for fmt in formats:
            path = tmp / EXPORTERS[fmt].artifact
            if EXPORTERS[fmt].backend == "llama.cpp" and not attention:
                reason = "llama.cpp cannot allocate the KV cache of a model without an attention layer"
                log.skip(f"validate {fmt}", "engine", reason)
                add_row(fmt, path, None, note=f"not validated: {reason}")
                continue
            with log.step(f"validate {fmt}", "engine") as step:  # the engine holds the artifact
                got = call_step(step, isolate, engine_step, path, EXPORTERS[fmt].backend, original, validation,
                                ids, max_new_tokens)
                if isinstance(got, str):
                    step.note = f"skipped: its engine needs {got!r}, which is not installed"
                    add_row(fmt, path, None, note=f"not validated: {step.note[9:]}")
                    continue
                doc, backend, *speed = got
                add_row(fmt, path, report(fmt, doc, path), backend, tuple(speed))
        if rows[0]["backend"] == "transformers" and not attention:
            log.skip("run original (transformers)", "engine", "transformers' cache cannot decode a model without an "
                                                              "attention layer")
        elif rows[0]["backend"] == "transformers":  # the original's speed, where it fits in memory
            with log.step("run original (transformers)", "engine") as step:
                rows[0]["tokens_per_s"], new = call_step(step, isolate, speed_step, original, None, device, ids,
                                                         max_new_tokens)
                rows[0]["text"] = tok.decode(new, skip_special_tokens=True)
        for r in rows:
            r["bits_per_weight"] = 8 * r["weight_bytes"] / params
        summary = {"source": source, "recipe": recipe, "formats": list(formats), "params": params,
                   "device": device, "isolated_steps": isolate,
                   "quantization": {k: qreport.get(k) for k in ("bits_per_weight", "bytes", "params")},
                   "steps": log.to_json(), "layers": log.layers, "prompt": prompt, "rows": rows}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        notes = "".join(f"\n{r['format']}: {r['note']}\n" for r in rows if r.get("note"))
        (tmp / "summary.md").write_text(summary_markdown(rows) + notes + "\n" + steps_markdown(log))
    out.print(log.table(f"steps ({log.layers} layers, {device})"))
    console.print(f"[green]done[/]: {output}/ ({'ir/, ' if save_original else ''}quantized/, "
                  f"{''.join(EXPORTERS[f].artifact + ', ' for f in formats)}reports/, summary.md)")
    return rows
