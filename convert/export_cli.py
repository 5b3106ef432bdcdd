"""`nextq export FORMAT IR -o OUT`: the export group; each writer module contributes its subcommand."""

from __future__ import annotations

import click


@click.group("export")
def export_group():
    """Export an IR directory to another engine's format."""


def _mount() -> None:
    from .gguf_export import gguf_cmd

    export_group.add_command(gguf_cmd)
    from .onnx_export import onnx_cmd

    export_group.add_command(onnx_cmd)
    from .hf_export import hf_cmd

    export_group.add_command(hf_cmd)


_mount()
