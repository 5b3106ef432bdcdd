"""`nextq pipeline`: the main job end to end. Now: convert -> inspect -> a short generation, compared with the
original checkpoint run by transformers."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import click
import numpy as np

from .console import console, out
from .graph import atomic_output_dir

PROMPT = "def fibonacci(n):\n"


def embedded_model() -> Path:
    """The embedded trained tiny Qwen3-Next (a Hugging Face checkpoint shipped inside the package)."""
    return Path(str(resources.files("nextq") / "assets" / "tiny"))


@click.command("pipeline")
@click.argument("source", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("nextq-pipeline"), show_default=True,
              help="Directory for every artifact and the summary.")
@click.option("--revision", help="Hub revision when SOURCE is a repo id.")
@click.option("--prompt", default=PROMPT, show_default=True, help="Prompt for the generation check.")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def pipeline_cmd(source, output, revision, prompt, max_new_tokens, force):
    """Run the whole job on SOURCE (default: the embedded tiny trained model)."""
    from nextq import load

    from .convert.cli import convert
    from .inspect import inspect_cmd

    source = source or str(embedded_model())
    console.rule(f"nextq pipeline: {source}")
    with atomic_output_dir(output, force) as tmp:
        t0 = time.perf_counter()
        convert(source, tmp / "ir", revision)
        convert_s = time.perf_counter() - t0
        inspect_cmd.callback(tmp / "ir")
        ids = None
        results = {}
        for label, path in (("nextq (torch)", tmp / "ir"), ("original (transformers)", Path(source))):
            if not Path(path).is_dir():
                continue  # a Hub source is compared through its converted IR only
            model = load(path)
            ids = np.array([model.tokenizer(prompt)["input_ids"]]) if ids is None else ids
            t1 = time.perf_counter()
            new = model.generate(ids, max_new_tokens=max_new_tokens)
            dt = time.perf_counter() - t1
            results[label] = {"tokens": new[0].tolist(), "tokens_per_s": new.shape[1] / dt,
                              "text": model.tokenizer.decode(new[0], skip_special_tokens=True)}
        first = next(iter(results.values()))
        out.print(f"[bold]prompt[/] {prompt!r}")
        for label, r in results.items():
            same = "same as nextq" if r["tokens"] == first["tokens"] else "DIFFERS from nextq"
            out.print(f"[bold]{label}[/] ({r['tokens_per_s']:.1f} tokens/s, {same}): {r['text']!r}")
        summary = {"source": source, "convert_seconds": convert_s, "prompt": prompt, "generation": results}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[green]done[/]: {output}/ (ir/, summary.json)")
