"""`nextq convert`: a Hugging Face checkpoint (local directory or Hub repo id) -> an IR directory."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from nextq.console import console, progress_iter

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(source: str, output: Path, revision: str | None = None, dtype: str = "auto", force: bool = False):
    """Read `source` lazily and write the IR directory tensor by tensor; returns the graph."""
    from .hf import read_hf

    graph = read_hf(source, revision)
    target = DTYPES[dtype]
    cast = None
    if target is not None:
        def cast(name, t):
            return t.to(target) if t.is_floating_point() else t
    graph.save(output, force=force, cast=cast, progress=lambda xs: progress_iter(xs, "converting"))
    return graph


@click.command("convert")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="IR directory to write.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SOURCE is a repo id.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto", show_default=True,
              help="Store weights in this dtype; auto keeps the checkpoint's.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def convert_cmd(source, output, revision, dtype, force):
    """Convert a Qwen3-Next checkpoint (local directory or Hub repo id) into an IR directory."""
    graph = convert(source, output, revision, dtype, force)
    c = graph.config
    console.print(f"[green]wrote[/] {output}: {c.num_hidden_layers} layers, {c.num_experts} experts, "
                  f"{len(graph.tensors)} tensors")
