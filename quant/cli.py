"""`nextq quantize` (apply a recipe to an IR, optionally calibrated) and `nextq recipes` (list the built-ins)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from nextq.console import console, out, progress_iter

from . import calibrate
from .recipes import RECIPES, TENSOR_CLASSES, estimate_bits_per_weight, get_recipe, nominal_bits, qwen3_next_80b


def calibration_windows(ir: Path, text_file: Path | None, tokens: int, length: int):
    """Token windows `[n, length]` of the calibration text, tokenized with the IR's own tokenizer."""
    from nextq.runtime.backends import load_tokenizer

    tok = load_tokenizer(ir)
    if tok is None:
        raise click.UsageError(f"{ir}: no tokenizer files to tokenize calibration text (use --no-calibrate)")
    text = text_file.read_text(encoding="utf-8", errors="replace") if text_file else calibrate.default_calibration_text()
    tok.model_max_length = 1 << 62  # one long text, cut into windows below: not a model input
    return calibrate.token_windows(tok(text)["input_ids"], max(1, tokens // length), length)


@click.command("quantize")
@click.argument("ir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Quantized IR directory to write.")
@click.option("--recipe", required=True, help=f"Built-in ({', '.join(RECIPES)}) or a TOML recipe file.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Data-aware int4 (needs the model to run on calibration text); --no-calibrate = round to nearest.")
@click.option("--calib-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration text file (default: a slice of the Python standard library's sources).")
@click.option("--calib-tokens", default=8192, show_default=True, help="Calibration tokens (windows of 256).")
@click.option("--method", type=click.Choice(list(calibrate.QUANTIZERS)), default="gptq", show_default=True,
              help="Data-aware method for int4 tensors.")
@click.option("--min-tokens", default=calibrate.MIN_TOKENS, show_default=True,
              help="Experts seeing fewer calibration tokens fall back to round-to-nearest (reported).")
@click.option("--workers", default=2, show_default=True, help="Quantization threads.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def quantize_cmd(ir, output, recipe, calibrate, calib_text, calib_tokens, method, min_tokens, workers, force):
    """Quantize the IR directory IR with a recipe into OUTPUT (another IR directory)."""
    from nextq.graph import Graph

    from . import calibrate as cal
    from .apply import REPORT_MD, quantize_graph
    from .recipes import plan_schemes

    rec = get_recipe(recipe)
    graph = Graph.load(ir)
    plan = plan_schemes(rec, graph.config, {n: tuple(t.shape) for n, t in graph.tensors.items()})  # fail fast
    stats = None
    if calibrate and any(cal.is_calibratable(e.scheme) for e in plan.values()):
        windows = calibration_windows(ir, calib_text, calib_tokens, 256)
        console.print(f"calibrating ({method}) on {windows.numel()} tokens "
                      f"from {calib_text or 'the standard library sources'}")
        stats = cal.collect_stats(graph, windows, progress=lambda xs: progress_iter(xs, "calibration forward"))
    report = quantize_graph(graph, rec, output, force=force, stats=stats, method=method, min_tokens=min_tokens,
                            workers=workers, progress=lambda xs: progress_iter(xs, f"quantizing ({rec.name})"))
    table = Table(title=f"{output} — recipe {rec.name}")
    for col in ("class", "tensors", "scheme", "bits/w"):
        table.add_column(col, justify="right" if col in ("tensors", "bits/w") else "left")
    for cls, c in report["classes"].items():
        table.add_row(cls, str(c["tensors"]), ", ".join(c["schemes"]), f"{c['bits_per_weight']:.2f}")
    table.add_row("total", str(sum(c["tensors"] for c in report["classes"].values())), "",
                  f"{report['bits_per_weight']:.2f}", style="bold")
    out.print(table)
    if report["calibration"] is not None:
        out.print((output / REPORT_MD).read_text())
    methods = ", ".join(f"{k} {v}" for k, v in sorted(report["methods"].items()))
    console.print(f"[green]wrote[/] {output} ({methods})")


@click.command("recipes")
@click.option("--model", type=click.Path(exists=True, path_type=Path),
              help="Estimate bits per weight on this model (IR or Hugging Face directory) instead of Qwen3-Next-80B.")
def recipes_cmd(model):
    """List the built-in quantization recipes: the scheme of each tensor class and bits per weight."""
    from nextq.graph import expected_tensors

    if model is not None:
        from nextq import read

        config, label = read(str(model)).config, model.name
    else:
        config, label = qwen3_next_80b(), "Qwen3-Next-80B-A3B"
    shapes = {k: v.shape for k, v in expected_tensors(config).items()}
    table = Table(title="built-in recipes (scheme, nominal bits per weight; keep = as stored)")
    table.add_column("tensor class")
    for name in RECIPES:
        table.add_column(name)
    for cls in TENSOR_CLASSES:
        cells = []
        for r in RECIPES.values():
            s = getattr(r, cls)
            cells.append(f"{s} ({nominal_bits(s, 16):.2f})" if s != "keep" else "keep")
        table.add_row(cls, *cells)
    table.add_row(f"bits/w on {label} (keep = 16)",
                  *[f"{estimate_bits_per_weight(r, config, 16.0, shapes):.2f}" for r in RECIPES.values()],
                  style="bold")
    out.print(table)
    for r in RECIPES.values():
        out.print(f"[bold]{r.name}[/]: {r.description}")
