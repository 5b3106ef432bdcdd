"""`nextq validate CANDIDATE --reference REF`: the CI gate on drift (exit 0 when every threshold holds, else 1)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from nextq.console import console, out
from nextq.errors import OutputExistsError

from .report import Thresholds, parse_fraction

DEFAULTS = Thresholds()


def _fraction(ctx, param, value):
    try:
        return parse_fraction(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _top_k(ctx, param, value):
    if value == "auto":
        return None
    try:
        k = int(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or a number of tokens (0 = full logits), got {value!r}") from None
    if k < 0:
        raise click.BadParameter(f"expected >= 0, got {k}")
    return k


def print_summary(report: dict) -> None:
    """The checks and the metrics as tables on stdout, then PASS/FAIL."""
    t = Table(title=f"{report['candidate']['path']} vs {report['reference']['path']}")
    for col in ("check", "value", "limit", "result"):
        t.add_column(col, justify="right" if col in ("value", "limit") else "left")
    for c in report["checks"]:
        t.add_row(c["name"], f"{c['value']:.5g}", f"{c['op']} {c['limit']:.5g}",
                  "[green]pass[/]" if c["passed"] else "[red]FAIL[/]")
    out.print(t)
    m = report["metrics"]
    t = Table(show_header=True)
    for col in ("PPL ref", "PPL cand", "ratio", "KLD mean", "KLD p99", "top-1", "logit err max", "logit err mean"):
        t.add_column(col, justify="right")
    t.add_row(*(f"{m[k]:.5g}" for k in ("ppl_reference", "ppl_candidate", "ppl_ratio", "kld_mean", "kld_p99", "top1",
                                        "logit_err_max", "logit_err_mean")))
    out.print(t)
    if report["layers"]:
        L = report["layers"]
        worst = L["per_layer"][L["worst_layer"]]
        top = L["top_experts"][0] if L["top_experts"] else None
        out.print(f"worst layer: {L['worst_layer']} ({worst['mixer']}, local rel. error {worst['local_rel']:.4g})"
                  + (f"; top expert: layer {top['layer']} expert {top['expert']}" if top else ""))
    out.print("[bold green]PASS[/]" if report["passed"] else "[bold red]FAIL[/]")


@click.command("validate")
@click.argument("candidate", type=click.Path(exists=True, path_type=Path))
@click.option("--reference", "-r", type=click.Path(exists=True, path_type=Path), required=True,
              help="The model to compare against (HF dir, IR dir, .gguf, ONNX dir).")
@click.option("--corpus", "corpora", multiple=True,
              help="builtin (default), a text file or directory of *.txt, or hf:REPO[:CONFIG[:SPLIT]] "
                   "(hf:wikitext-2); repeatable.")
@click.option("--window", default=256, show_default=True, help="Tokens per window.")
@click.option("--stride", type=int, help="Tokens between window starts (default: the window; smaller overlaps "
                                         "windows and scores only each window's last STRIDE tokens).")
@click.option("--max-windows", default=64, show_default=True, help="Evaluate at most this many windows (0 = all).")
@click.option("--batch-size", type=int, help="Windows per forward (default: up to 4, as many as keep one batch's "
                                             "float32 logits within 256 MiB).")
@click.option("--max-ppl-increase", default="2%", show_default=True, callback=_fraction,
              help="Allowed perplexity increase (a percentage or a fraction).")
@click.option("--max-kld", default=str(DEFAULTS.max_kld), show_default=True, callback=_fraction,
              help="Allowed mean KL divergence, nats.")
@click.option("--min-top1", default=str(DEFAULTS.min_top1), show_default=True, callback=_fraction,
              help="Minimum top-1 agreement.")
@click.option("--report", type=click.Path(path_type=Path), help="Write the JSON report here (plus .md and plots).")
@click.option("--backend", help="Candidate: 'stream' (nextq's layer-streamed executor) or an engine (torch, "
                                "transformers, llama.cpp, ort); default: an IR is streamed, others run in their engine.")
@click.option("--reference-backend", help="Reference: 'stream' or an engine; default: an HF directory runs in "
                                          "transformers when its weights fit in 4 GiB as float32, else it is streamed "
                                          "(like an IR).")
@click.option("--device", default="cpu", show_default=True,
              help="Where nextq's executors run (cuda: layers streamed host -> GPU).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Reference-logits cache (default: "
                                                                   "$NEXTQ_CACHE/validate or ~/.cache/nextq/validate).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the reference-logits cache.")
@click.option("--cache-top-k", default="auto", show_default=True, callback=_top_k,
              help="Cache the reference's top-k logits plus the rest mass; 0 = full logits; auto = full when "
                   "they fit in 1 GiB.")
@click.option("--layer-windows", default=4, show_default=True,
              help="Windows for per-layer drift when both sides are IR directories (0 = skip).")
@click.option("--force", is_flag=True, help="Overwrite an existing report.")
def validate_cmd(candidate, reference, corpora, window, stride, max_windows, batch_size, max_ppl_increase, max_kld,
                 min_top1, report, backend, reference_backend, device, cache_dir, no_cache, cache_top_k, layer_windows,
                 force):
    """Measure CANDIDATE's drift from REFERENCE and exit 1 when a threshold is exceeded."""
    doc = validate(candidate, reference, corpora, window=window, stride=stride, max_windows=max_windows or None,
                   batch_size=batch_size, thresholds=Thresholds(max_ppl_increase, max_kld, min_top1),
                   report=report, candidate_backend=backend, reference_backend=reference_backend, device=device,
                   cache_dir=None if no_cache else (cache_dir or "default"), cache_top_k=cache_top_k,
                   layer_windows=layer_windows, force=force)
    print_summary(doc)
    if report:
        console.print(f"[green]wrote[/] {report} (+ {Path(report).with_suffix('.md').name} and plots)")
    sys.exit(0 if doc["passed"] else 1)


def validate(candidate, reference, corpora=(), *, window: int = 256, stride: int | None = None,
             max_windows: int | None = 64, batch_size: int | None = None, thresholds: Thresholds = DEFAULTS,
             report: Path | None = None, candidate_backend: str | None = None, reference_backend: str | None = None,
             device: str = "cpu", cache_dir: str | Path | None = "default", cache_top_k: int | None = None,
             layer_windows: int = 4, layer_reference: Path | None = None, force: bool = False,
             candidate_source=None, reference_source=None) -> dict:
    """The library form of the command: compare, build the report dict, write it when `report` is given.

    candidate_source / reference_source: already opened `nextq.validate.compare.LogitSource`s."""
    from .compare import compare, default_cache_dir
    from .corpus import windows_for
    from .report import build_report, write_report

    if report and Path(report).exists() and not force:
        raise OutputExistsError(f"{report}: output exists (pass --force to overwrite)")
    windows = windows_for(reference, corpora, window, stride, max_windows)
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    comparison = compare(candidate, reference, windows, batch_size=batch_size, candidate_backend=candidate_backend,
                         reference_backend=reference_backend, device=device, cache_dir=cache,
                         cache_top_k=cache_top_k, layer_windows=layer_windows, layer_reference=layer_reference,
                         candidate_source=candidate_source, reference_source=reference_source)
    doc = build_report(comparison, thresholds)
    if report:
        write_report(doc, report, force=force)
    return doc
