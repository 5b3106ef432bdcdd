"""`nextq export FORMAT IR -o OUT`: the export group; each writer module contributes its subcommand."""

from __future__ import annotations

import click


@click.group("export")
def export_group():
    """Export an IR directory to another engine's format."""


def _mount() -> None:
    from nextq.targets import export_commands

    for command in export_commands():
        export_group.add_command(command)


_mount()
