"""`nextq quantize` (apply a recipe to an IR, optionally calibrated) and `nextq recipes` (list the built-ins)."""

from __future__ import annotations

import json
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
@click.option("--recipe", help=f"Built-in ({', '.join(RECIPES)}) or a TOML recipe file.")
@click.option("--target-bpw", type=float,
              help="Instead of a recipe: choose a scheme per GGUF tensor (K-quants, Q4_0/Q5_0 where rows are not a "
                   "multiple of 256, Q8_0) from its measured output error on the calibration text (on models up to "
                   "2^28 parameters rescaled to the logits' KLD of quantizing that tensor alone) to meet this many "
                   "bits per weight; the plan is printed and written next to the IR (allocation.md / .json).")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Data-aware int4 (needs the model to run on calibration text); --no-calibrate = round to nearest.")
@click.option("--calib-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Calibration text file (default: a slice of the Python standard library's sources).")
@click.option("--calib-tokens", default=8192, show_default=True, help="Calibration tokens (windows of 256).")
@click.option("--method", type=click.Choice(list(calibrate.QUANTIZERS)), default="gptq", show_default=True,
              help="Data-aware method for int4 tensors.")
@click.option("--min-tokens", default=calibrate.MIN_TOKENS, show_default=True,
              help="Experts seeing fewer calibration tokens fall back to round-to-nearest (reported).")
@click.option("--calib-mode", type=click.Choice(list(calibrate.MODES)), default="original", show_default=True,
              help="Statistics of layer i+1 from the outputs of layer i as quantized (sequential) or unquantized.")
@click.option("--device", default="cpu", show_default=True,
              help="Where calibration runs, layer by layer (cuda: each layer streamed host -> GPU, GPTQ there too).")
@click.option("--workers", default=2, show_default=True, help="Quantization threads.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def quantize_cmd(ir, output, recipe, target_bpw, calibrate, calib_text, calib_tokens, method, min_tokens, calib_mode,
                 device, workers, force):
    """Quantize the IR directory IR with a recipe (or to --target-bpw) into OUTPUT (another IR directory)."""
    from nextq.errors import RecipeError
    from nextq.graph import Graph

    from . import allocate
    from . import calibrate as cal
    from .apply import REPORT_MD, quantize_graph
    from .recipes import fallback_lines, plan_schemes

    if (recipe is None) == (target_bpw is None):
        raise RecipeError("quantize: give exactly one of --recipe NAME|FILE and --target-bpw X")
    if target_bpw is not None and not calibrate:
        raise RecipeError("--target-bpw measures each tensor's error on calibration text: drop --no-calibrate")
    graph = Graph.load(ir)
    rec = get_recipe(recipe) if recipe is not None else None
    if target_bpw is not None:
        allocate.check_budget(graph, target_bpw)  # before the calibration pass
    if rec is not None:
        plan = plan_schemes(rec, graph.config, {n: tuple(t.shape) for n, t in graph.tensors.items()})  # fail fast
    stats = None
    if calibrate and (rec is None or any(cal.is_calibratable(e.scheme) for e in plan.values())):
        windows = calibration_windows(ir, calib_text, calib_tokens, 256)
        console.print(f"calibrating ({method}) on {windows.numel()} tokens "
                      f"from {calib_text or 'the standard library sources'}")
        wanted = None if rec is None else [n for n, e in plan.items() if cal.is_calibratable(e.scheme)]
        stats = cal.collect_stats(graph, windows, wanted, mode=calib_mode, device=device,
                                  on_stage=lambda name, s: console.print(f"  statistics of {name}: {s:.1f} s"))
    allocation = None
    if rec is None:
        rec, units, summary = allocate.target_recipe(
            graph, target_bpw, stats, progress=lambda xs: progress_iter(xs, "measuring sensitivity"))
        allocation = (allocate.plan_markdown(units, summary), allocate.plan_json(units, summary))
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
    for line in fallback_lines(report["fallbacks"]):
        out.print(line)
    if report["calibration"] is not None:
        out.print((output / REPORT_MD).read_text())
    if allocation is not None:
        (output / "allocation.md").write_text(allocation[0])
        (output / "allocation.json").write_text(json.dumps(allocation[1], indent=1))
        out.print(allocation[0])
    methods = ", ".join(f"{k} {v}" for k, v in sorted(report["methods"].items()))
    console.print(f"[green]wrote[/] {output} ({methods})")


@click.command("recipes")
@click.option("--model", type=click.Path(exists=True, path_type=Path),
              help="Estimate bits per weight on this model (IR or Hugging Face directory) instead of Qwen3-Next-80B.")
@click.option("--targets", is_flag=True,
              help="Print the recipe x target matrix instead: whether each recipe exports to GGUF and ONNX and runs "
                   "on the GPU backend, or why not.")
def recipes_cmd(model, targets):
    """List the built-in quantization recipes: the scheme of each tensor class and bits per weight."""
    from nextq.graph import expected_tensors

    from .recipes import fallback_lines, plan_schemes

    if model is not None:
        from nextq import read

        config, label = read(str(model)).config, model.name
    else:
        config, label = qwen3_next_80b(), "Qwen3-Next-80B-A3B"
    shapes = {k: v.shape for k, v in expected_tensors(config).items()}
    plans = {name: plan_schemes(r, config, shapes) for name, r in RECIPES.items()}
    if targets:
        table = Table(title=f"recipe x target on {label}: yes, or the schemes (tensor classes) that cannot go")
        for col in ("recipe", *TARGETS):
            table.add_column(col)
        reasons: dict[str, str] = {}
        for name, plan in plans.items():
            table.add_row(name, *[target_cell(plan, t, reasons) for t in TARGETS])
        out.print(table)
        keys: dict[str, list[str]] = {}  # one line per reason, naming every scheme it applies to
        for key, why in sorted(reasons.items()):
            keys.setdefault(why, []).append(key)
        for why, ks in keys.items():
            target = ks[0].split(" ")[0]
            out.print(f"[bold]{target} {', '.join(k.removeprefix(target + ' ') for k in ks)}[/]: {why}")
        return
    table = Table(title="built-in recipes (schemes per tensor class, nominal bits per weight; keep = as stored)")
    table.add_column("tensor class")
    for name in RECIPES:
        table.add_column(name)
    for cls in TENSOR_CLASSES:
        cells = []
        for plan in plans.values():
            used = sorted({e.scheme for e in plan.values() if e.cls == cls})
            cells.append(", ".join(f"{s} ({nominal_bits(s, 16):.2f})" if s != "keep" else "keep" for s in used))
        table.add_row(cls, *cells)
    table.add_row(f"bits/w on {label} (keep = 16)",
                  *[f"{estimate_bits_per_weight(r, config, 16.0, shapes):.2f}" for r in RECIPES.values()],
                  style="bold")
    out.print(table)
    for r in RECIPES.values():
        out.print(f"[bold]{r.name}[/]: {r.description}")


TARGETS = ("gguf", "onnx", "gpu")


def target_problem(cls: str, scheme: str, target: str) -> str | None:
    """Why a tensor of class `cls` stored as `scheme` cannot go to `target` (None when it can, bit for bit)."""
    from nextq.convert import onnx_export

    from .schemes import FLOAT_DTYPES, SCHEMES

    if scheme == "keep" or scheme in FLOAT_DTYPES:
        return None
    s = SCHEMES[scheme]
    if target == "gguf":
        if s.gguf:
            return None
        return f"re-quantized to {s.gguf_nearest} (measured, printed)" if s.gguf_nearest else s.why_not("gguf")
    if target == "onnx":
        formats = {"embed": onnx_export.EMBED_FORMATS, "experts": onnx_export.EXPERT_FORMATS}.get(
            cls, onnx_export.LINEAR_FORMATS)
        if scheme in formats:
            return None
        if cls == "embed":
            return f"not emitted: the ONNX embedding takes a float or integer block table, not {scheme}"
        return s.why_not("onnx")
    if cls == "experts":  # gpu: routed experts run packed in the MoE kernels; other weights are dequantized at load
        return None if s.gpu else s.why_not("gpu")
    return None


def target_note(cls: str, scheme: str, target: str) -> str | None:
    """How a tensor that can go to `target` goes when it is not as stored (GPU experts dequantized at load), or None."""
    from .schemes import GPU_NOTES, SCHEMES

    if target != "gpu" or cls != "experts" or scheme not in SCHEMES:
        return None
    return GPU_NOTES.get(SCHEMES[scheme].gpu)


def target_cell(plan: dict, target: str, reasons: dict[str, str]) -> str:
    """One cell of the recipe x target matrix: "yes" (with the schemes that go another way than as stored, e.g.
    "yes; dequantized at load: q4_k (experts)"), or each scheme that cannot go with its tensor classes; the reasons
    and notes are collected in `reasons` ("target scheme" -> why)."""
    bad: dict[str, set[str]] = {}
    noted: dict[str, set[str]] = {}
    for cls, scheme in sorted({(e.cls, e.scheme) for e in plan.values()}):
        why = target_problem(cls, scheme, target)
        if why is not None:
            key = f"{target} {scheme}" + (" (embed)" if cls == "embed" and target == "onnx" else "")
            reasons[key] = why
            bad.setdefault(key.removeprefix(f"{target} "), set()).add(cls)
        elif (note := target_note(cls, scheme, target)) is not None:
            reasons[f"{target} {scheme}"] = note
            noted.setdefault(scheme, set()).add(cls)
    if bad:
        return "; ".join(f"{k}: {', '.join(sorted(c))}" for k, c in sorted(bad.items()))
    return "yes" + ("; dequantized at load: " + ", ".join(f"{k} ({', '.join(sorted(c))})"
                                                         for k, c in sorted(noted.items())) if noted else "")
