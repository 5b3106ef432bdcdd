"""`nextq convert`: a Hugging Face checkpoint (local directory or Hub repo id) -> an IR directory, or, with
`--recipe` / `--to`, straight to a quantized IR, GGUF file or ONNX directory without an intermediate on disk.

The direct path reads the checkpoint lazily, quantizes one tensor (one expert's matrix) at a time on `--workers`
threads that run a bounded window ahead of the writer, in the writer's own order (`quant.apply.quantized_view`
+ `gguf_export.consumption_order`), and hands that lazy quantized graph to the exporter. Weights of more than 2^20
elements stored as they are used (embeddings, LM head, output projections) are read, quantized and written in row
blocks of ~2^20 elements shared between the threads: GGUF memory is bounded by the prefetch budget plus a few
blocks, whatever the model's size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import torch

from nextq.console import console, progress_iter

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = ("ir", "gguf", "onnx")


def read_source(source: str, revision: str | None = None, rope_scaling: str | None = None, **kw):
    """`read_hf`, with the config's RoPE scaling replaced by a `--rope-scaling` value when given."""
    from .hf import read_hf
    from .hf_rope import parse_rope_override

    graph = read_hf(source, revision, **kw)
    if rope_scaling is not None:
        c = graph.config
        graph.config = dataclasses.replace(c, rope_scaling=parse_rope_override(rope_scaling, c.max_position_embeddings))
    return graph


def convert(source: str, output: Path, revision: str | None = None, dtype: str = "auto", force: bool = False,
            rope_scaling: str | None = None):
    """Read `source` lazily and write the IR directory tensor by tensor; returns the graph."""
    from .quant_source import dequantized_view

    graph = read_source(source, revision, rope_scaling)
    target = DTYPES[dtype]
    cast = None
    if target is not None:  # an FP8 checkpoint's weights: exactly dequantized (float32), then cast
        graph.tensors = dequantized_view(graph.tensors)

        def cast(name, t):
            return t.to(target) if t.is_floating_point() else t
    graph.save(output, force=force, cast=cast, progress=lambda xs: progress_iter(xs, "converting"))
    return graph


@contextmanager
def byte_progress(total: int, description: str, show: bool = True) -> Iterator[Callable[[str, int], None]]:
    """A progress bar over source bytes (throughput and ETA) on stderr; yields `advance(name, nbytes)`."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    if not show:
        yield lambda name, n: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda name, n: bar.advance(task, n)


def convert_direct(source: str, output: Path, recipe: str, to: str = "gguf", revision: str | None = None,
                   force: bool = False, workers: int = 2, progress: bool = True,
                   rope_scaling: str | None = None) -> dict:
    """Checkpoint -> quantized `to` (ir | gguf | onnx) in one pass, RTN (no calibration); returns a summary.

    Summary: {"tensors": per-output-type counts (gguf) or the quantization report's methods (ir), "source_bytes": n,
    "fallbacks": llama.cpp's row-length fallbacks the plan takes -> tensors}.
    """
    from nextq.quant.apply import _source_bytes, quantize_graph, quantized_view
    from nextq.quant.recipes import fallback_counts, get_recipe, plan_schemes

    if to not in TARGETS:
        raise click.UsageError(f"--to {to!r}: supported: {', '.join(TARGETS)}")
    rec = get_recipe(recipe)
    graph = read_source(source, revision, rope_scaling, hash_shards=(to == "ir"))  # hashes: only an IR keeps them
    total = sum(_source_bytes(t) for t in graph.tensors.values())
    plan = plan_schemes(rec, graph.config, {n: tuple(t.shape) for n, t in graph.tensors.items()})
    fallbacks = fallback_counts(e.fallback for e in plan.values())
    label = f"{rec.name} -> {to}"
    with byte_progress(total, label, progress) as advance:
        if to == "ir":
            report = quantize_graph(graph, rec, output, force=force, workers=workers, on_done=advance)
            return {"tensors": report["methods"], "source_bytes": total, "fallbacks": fallbacks}
        if to == "gguf":
            from .gguf_export import GGUFOptions, consumption_order, export_gguf

            with quantized_view(graph, rec, workers=workers, order=consumption_order(graph),
                                on_done=advance) as view:
                counts = export_gguf(view, output, GGUFOptions(), force=force)
            return {"tensors": counts, "source_bytes": total, "fallbacks": fallbacks}
        from .onnx_export import export_onnx

        with quantized_view(graph, rec, workers=workers, on_done=advance) as view:
            export_onnx(view, output, force=force)
        return {"tensors": {}, "source_bytes": total, "fallbacks": fallbacks}


@click.command("convert")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="IR directory, .gguf file or ONNX directory to write (see --to).")
@click.option("--to", "to", type=click.Choice(TARGETS), default="ir", show_default=True,
              help="Output format. gguf and onnx need --recipe.")
@click.option("--recipe", help="Quantize on the way (built-in name or TOML file): round to nearest, NO "
                               "calibration; for calibrated int4, convert to an IR and run `nextq quantize`.")
@click.option("--workers", default=2, show_default=True, help="Quantization threads (direct path).")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SOURCE is a repo id.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto", show_default=True,
              help="Store weights in this dtype; auto keeps the checkpoint's, FP8 weights included (plain --to ir "
                   "only; an FP8 checkpoint is dequantized exactly, then cast).")
@click.option("--rope-scaling", "rope_scaling", metavar="yarn:FACTOR[:ORIGINAL]|JSON|default",
              help="Replace the config's RoPE scaling: YaRN with FACTOR over ORIGINAL positions (default: the "
                   "config's max_position_embeddings), a JSON rope dict as in config.json, or default (plain RoPE).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def convert_cmd(source, output, to, recipe, workers, revision, dtype, rope_scaling, force):
    """Convert a Qwen3-Next checkpoint (local directory or Hub repo id) into an IR directory, or with --recipe
    straight into a quantized IR, GGUF file or ONNX directory, streaming one tensor at a time (no full-precision
    intermediate on disk; progress shows throughput and ETA)."""
    if recipe is None:
        if to != "ir":
            raise click.UsageError(f"--to {to} needs --recipe (or convert to an IR and use `nextq export`)")
        graph = convert(source, output, revision, dtype, force, rope_scaling)
        c = graph.config
        console.print(f"[green]wrote[/] {output}: {c.num_hidden_layers} layers, {c.num_experts} experts, "
                      f"{len(graph.tensors)} tensors")
        return
    if dtype != "auto":
        raise click.UsageError("--dtype applies to a plain conversion; with --recipe the recipe decides dtypes")
    summary = convert_direct(source, output, recipe, to, revision, force, workers, rope_scaling=rope_scaling)
    counts = ", ".join(f"{n} {t}" for t, n in sorted(summary["tensors"].items()))
    size = (output.stat().st_size if output.is_file()
            else sum(p.stat().st_size for p in output.rglob("*") if p.is_file()))
    from nextq.quant.recipes import fallback_lines

    for line in fallback_lines(summary["fallbacks"]):
        console.print(line)
    console.print(f"[green]wrote[/] {output} ({counts or to}), {size / 2**20:.1f} MiB "
                  f"from {summary['source_bytes'] / 2**20:.1f} MiB of source tensors")
