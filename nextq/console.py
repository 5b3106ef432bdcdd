"""Console output: one rich console on stderr for progress and messages, tables on stdout."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
out = Console(width=None if Console().is_terminal else 120)
T = TypeVar("T")


def progress_iter(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (count, elapsed, ETA) on stderr; silent when stderr is not a terminal."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)
