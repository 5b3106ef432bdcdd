"""`nextq inspect`: what a model is made of, as a table (layers, kinds, experts, parameters, storage, bytes)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import click
from rich.table import Table

from .console import out
from .graph import Graph, QuantRef
from .storage import read_header


def tensor_storage(graph: Graph) -> dict[str, tuple[str, int]]:
    """name -> (dtype or quant scheme, stored bytes), without loading tensor data."""
    headers: dict[str, dict] = {}
    info = {}
    for name, t in graph.tensors.items():
        if isinstance(t, QuantRef):
            hdr = headers.setdefault(t.path, read_header(t.path))
            nbytes = sum(s.end - s.begin for k, s in hdr.items() if k.startswith(name + "."))
            info[name] = (t.meta["scheme"], nbytes)
        else:
            info[name] = (str(t.dtype).removeprefix("torch."), math.prod(t.shape) * t.dtype.itemsize)
    return info


def summary_rows(graph: Graph) -> list[dict]:
    """One row per block: name, kind, parameters, storage kinds, bytes."""
    storage = tensor_storage(graph)
    rows = []
    for block in graph.blocks:
        names = list(block.tensor_specs(graph.config))
        if not names:
            continue
        kinds: dict[str, int] = defaultdict(int)
        for n in names:
            kinds[storage[n][0]] += math.prod(graph.tensors[n].shape)
        params = sum(math.prod(graph.tensors[n].shape) for n in names)
        nbytes = sum(storage[n][1] for n in names)
        if block.kind == "Layer":
            mixer = block.mixer.kind
            ffn = (f"MoE {graph.config.num_experts}x top-{graph.config.num_experts_per_tok} + shared"
                   if block.ffn.kind == "SparseMoE" else "dense MLP")
        else:
            mixer, ffn = block.kind, ""
        rows.append({"block": block.prefix, "mixer": mixer, "ffn": ffn, "params": params,
                     "storage": ", ".join(k for k, _ in sorted(kinds.items(), key=lambda kv: -kv[1])),
                     "bytes": nbytes, "bits_per_weight": 8 * nbytes / max(params, 1)})
    return rows


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


@click.command("inspect")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
def inspect_cmd(model: Path):
    """Show a model's blocks (IR directory or Hugging Face directory): kinds, parameters, storage, bytes."""
    from . import read
    from .runtime.rope import describe_rope

    graph = read(str(model))
    c = graph.config
    rows = summary_rows(graph)
    table = Table(title=f"{model} — {c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}")
    for col in ("block", "mixer", "ffn", "params", "storage", "bytes", "bits/w"):
        table.add_column(col, justify="right" if col in ("params", "bytes", "bits/w") else "left")
    for r in rows:
        table.add_row(r["block"], r["mixer"], r["ffn"], human(r["params"]), r["storage"], human(r["bytes"]) + "B",
                      f"{r['bits_per_weight']:.2f}")
    params = sum(r["params"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    table.add_row("total", "", "", human(params), "", human(nbytes) + "B", f"{8 * nbytes / params:.2f}", style="bold")
    out.print(table)
    out.print(describe_rope(c))
    if graph.provenance:
        p = graph.provenance
        out.print(f"source: {p.get('source')}  revision: {p.get('revision')}  tool: {p.get('tool')}")
