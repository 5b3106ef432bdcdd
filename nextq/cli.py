"""The `nextq` command: mounts each area's commands and turns nextq errors into one clear line."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import NextqError


class Group(click.Group):
    """Bad input never ends in a traceback: a nextq error, or an OS error on a file the user named (unreadable,
    a directory where a file was expected), is one `error:` line and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NextqError as e:
            _fail(str(e), e.exit_code)
        except OSError as e:
            _fail(f"{e.filename}: {e.strerror}" if e.filename else str(e), 2)


def _fail(message: str, code: int) -> None:
    click.echo("error: " + " ".join(message.split("\n")), err=True)
    sys.exit(code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nextq")
def main():
    """Convert, quantize, export, run, validate and publish Qwen3-Next checkpoints."""


def _mount():
    from .convert.cli import convert_cmd
    from .convert.export_cli import export_group
    from .inspect import inspect_cmd
    from .pipeline import pipeline_cmd
    from .publish import publish_cmd
    from .quant.cli import quantize_cmd, recipes_cmd
    from .runtime.cli import run_cmd
    from .validate.cli import validate_cmd

    for cmd in (convert_cmd, export_group, run_cmd, inspect_cmd, pipeline_cmd, validate_cmd, quantize_cmd, recipes_cmd,
                publish_cmd):
        main.add_command(cmd)


_mount()
