"""`nextq pipeline`: the main job end to end.

    convert (HF -> IR) -> quantize (recipe) -> export each format -> validate every artifact against the original
    -> one summary table (format, size, bits/weight, PPL, dPPL, KLD, top-1, tokens/s) and a report directory.

Output directory (written atomically: a temporary sibling renamed at the end):
    ir/                the converted original          quantized/     the quantized IR (torch backend)
    model.gguf         GGUF export (llama.cpp)          onnx/          ONNX export (ONNX Runtime)
    reports/<row>.json|.md|-kld.png|-layers.png         summary.json, summary.md (the table)

The reference is the original checkpoint run by transformers; its logits are computed once and cached (see
nextq.validate.compare), so every artifact is compared on the same windows without recomputing it. Per-layer
drift of the quantized IR is measured against the converted IR (both torch-runnable). Size = the whole artifact
on disk; bits/weight = 8 * bytes of its weight files (safetensors, .gguf, .onnx + external data; a GGUF also
holds its tokenizer) / parameters of the float model; tokens/s = greedy generation (prefill + decode) of
`--max-new-tokens` tokens from `--prompt`, after a one-token warm-up.
The pipeline reports; gating (exit 1 on drift) is `nextq validate`'s job.
"""

from __future__ import annotations

import json
import math
import time
from importlib import resources
from pathlib import Path

import click
import numpy as np
from rich.table import Table

from .console import console, out
from .graph import Graph, atomic_output_dir, expected_tensors
from .targets import EXPORT_TARGETS

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


def quantize_ir(ir: Path, recipe: str, out: Path) -> dict:
    """The recipe API of nextq.quant: one call; returns its quantization report."""
    from .quant.apply import quantize_graph
    from .quant.recipes import get_recipe

    return quantize_graph(Graph.load(ir), get_recipe(recipe), out)


def generation_speed(model, ids, tokenizer, max_new_tokens: int) -> tuple[float, str]:
    """(tokens/s of greedy generation from ids [1, T], prefill included; the generated text).

    Token ids, not text: a .gguf's backend may have no tokenizer files beside it; the original's tokenizer decodes.
    """
    model.generate(ids, max_new_tokens=1)  # warm-up: first-call setup is not generation speed
    t0 = time.perf_counter()
    new = model.generate(ids, max_new_tokens=max_new_tokens)
    dt = time.perf_counter() - t0
    return new.shape[1] / dt, tokenizer.decode(new[0], skip_special_tokens=True) if tokenizer is not None else ""


def summary_table(rows: list[dict]) -> Table:
    t = Table(title="nextq pipeline")
    for col in ("format", "backend", "size", "bits/weight", "PPL", "ΔPPL", "KLD", "top-1", "tokens/s", "gate"):
        t.add_column(col, justify="left" if col in ("format", "backend", "gate") else "right")
    for r in rows:
        t.add_row(r["format"], r["backend"], f"{r['size_bytes'] / 2**20:.2f} MiB", f"{r['bits_per_weight']:.2f}",
                  f"{r['ppl']:.3f}", _pct(r["ppl_increase"]), _num(r["kld_mean"]), _num(r["top1"], ".3f"),
                  f"{r['tokens_per_s']:.1f}", {None: "reference", True: "pass", False: "[red]FAIL[/]"}[r["passed"]])
    return t


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| format | backend | size | bits/weight | PPL | ΔPPL | KLD | top-1 | tokens/s | gate |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        gate = {None: "reference", True: "pass", False: "FAIL"}[r["passed"]]
        lines.append(f"| {r['format']} | {r['backend']} | {r['size_bytes'] / 2**20:.2f} MiB | "
                     f"{r['bits_per_weight']:.2f} | {r['ppl']:.3f} | {_pct(r['ppl_increase'])} | "
                     f"{_num(r['kld_mean'])} | {_num(r['top1'], '.3f')} | {r['tokens_per_s']:.1f} | {gate} |")
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
@click.option("--corpus", "corpora", multiple=True, help="Validation corpus (default: the built-in held-out text).")
@click.option("--window", default=256, show_default=True, help="Validation window, tokens.")
@click.option("--max-windows", default=16, show_default=True, help="Validation windows (0 = the whole corpus).")
@click.option("--prompt", default=PROMPT, show_default=True, help="Prompt for the generation-speed check.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@click.option("--publish", "publish_id", metavar="REPO_ID",
              help="Last step: publish OUTPUT (quantized IR, exports, reports, model card) to this Hub repo.")
def pipeline_cmd(source, output, recipe, formats, revision, corpora, window, max_windows, prompt, max_new_tokens,
                 force, publish_id):
    """Run the whole job on SOURCE (default: the embedded tiny trained model)."""
    rows = run_pipeline(source, output, recipe=recipe, formats=formats, revision=revision, corpora=corpora,
                        window=window, max_windows=max_windows or None, prompt=prompt,
                        max_new_tokens=max_new_tokens, force=force)
    out.print(summary_table(rows))
    if publish_id:
        from .publish import publish

        publish(output, publish_id)


def run_pipeline(source: str | None, output: Path, *, recipe: str = "int4", formats: list[str] = ("gguf", "onnx"),
                 revision: str | None = None, corpora=(), window: int = 256, max_windows: int | None = 16,
                 prompt: str = PROMPT, max_new_tokens: int = 32, force: bool = False) -> list[dict]:
    """The library form of `nextq pipeline`; returns the summary rows (also in OUTPUT/summary.json)."""
    from nextq import load

    from .convert.cli import convert
    from .quant.recipes import get_recipe
    from .validate.cli import validate
    from .validate.report import Thresholds, write_report

    source = source or str(embedded_model())
    get_recipe(recipe)  # fail on a bad recipe before any work
    exporters = {fmt: EXPORTERS[fmt].load(fmt) for fmt in formats}  # ... and on a missing exporter
    console.rule(f"nextq pipeline: {source} (recipe {recipe}, formats {', '.join(formats) or 'none'})")
    with atomic_output_dir(output, force) as tmp:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        graph = convert(source, tmp / "ir", revision)
        timings["convert_s"] = time.perf_counter() - t0
        params = sum(math.prod(s.shape) for s in expected_tensors(graph.config).values())
        original = Path(source) if Path(source).is_dir() else tmp / "ir"  # a Hub source: the converted IR

        t0 = time.perf_counter()
        qreport = quantize_ir(tmp / "ir", recipe, tmp / "quantized")
        timings["quantize_s"] = time.perf_counter() - t0
        artifacts = [("ir", "torch", tmp / "quantized")]
        qgraph = Graph.load(tmp / "quantized")
        for fmt, export in exporters.items():
            t0 = time.perf_counter()
            console.print(f"exporting {fmt}")
            export(qgraph, tmp / EXPORTERS[fmt].artifact)
            timings[f"export_{fmt}_s"] = time.perf_counter() - t0
            artifacts.append((fmt, None, tmp / EXPORTERS[fmt].artifact))

        (tmp / "reports").mkdir()
        rows = []
        ref_model = load(original)
        tok = ref_model.tokenizer
        ids = np.array([tok(prompt)["input_ids"]], dtype=np.int64)
        speed, text = generation_speed(ref_model, ids, tok, max_new_tokens)
        rows.append({"format": "original", "backend": ref_model.name, "path": str(source),
                     "size_bytes": disk_size(original), "weight_bytes": disk_size(original, True), "ppl": None,
                     "ppl_increase": None, "kld_mean": None, "top1": None, "tokens_per_s": speed, "passed": None,
                     "text": text})
        ref_ppl = None
        for fmt, backend, path in artifacts:
            console.print(f"validating {fmt}")
            model = load(path, backend=backend)
            doc = validate(path, original, corpora, window=window, max_windows=max_windows,
                           thresholds=Thresholds(), layer_reference=tmp / "ir", candidate_model=model,
                           reference_model=ref_model)
            doc["candidate"]["path"] = str(output / path.relative_to(tmp))
            write_report(doc, tmp / "reports" / f"{fmt}.json")
            speed, text = generation_speed(model, ids, tok, max_new_tokens)
            m = doc["metrics"]
            ref_ppl = m["ppl_reference"]
            rows.append({"format": fmt if fmt != "ir" else f"ir ({recipe})", "backend": model.name,
                         "path": str(output / path.relative_to(tmp)), "size_bytes": disk_size(path),
                         "weight_bytes": disk_size(path, True),
                         "ppl": m["ppl_candidate"], "ppl_increase": m["ppl_increase"], "kld_mean": m["kld_mean"],
                         "top1": m["top1"], "tokens_per_s": speed, "passed": doc["passed"], "text": text,
                         "worst_layer": (doc["layers"] or {}).get("worst_layer")})
        rows[0]["ppl"] = ref_ppl
        for r in rows:
            r["bits_per_weight"] = 8 * r["weight_bytes"] / params
        summary = {"source": source, "recipe": recipe, "formats": list(formats), "params": params,
                   "quantization": {k: qreport.get(k) for k in ("bits_per_weight", "bytes", "params")},
                   "timings": timings, "prompt": prompt, "rows": rows}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        (tmp / "summary.md").write_text(summary_markdown(rows))
    console.print(f"[green]done[/]: {output}/ (ir/, quantized/, "
                  f"{''.join(EXPORTERS[f].artifact + ', ' for f in formats)}reports/, summary.md)")
    return rows
