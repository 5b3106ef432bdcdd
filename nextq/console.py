"""Console output: one rich console on stderr for progress and messages, tables on stdout; timed steps (wall,
peak RSS, peak GPU memory) for runs of several steps."""

from __future__ import annotations

import ctypes
import gc
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
out = Console(width=None if Console().is_terminal else 120)
T = TypeVar("T")


def progress_iter(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (count, elapsed, ETA) on stderr; silent when stderr is not a terminal."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)


_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None


def trim_heap() -> None:
    """Hand memory the allocator holds but no longer uses back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    glibc keeps freed blocks below its mmap threshold (which grows to 32 MiB) in its per-thread arenas: after one
    layer at Qwen3-Next-80B's dimensions (512 experts of 2 MiB each, read and freed) a process kept ~3.8 GiB of RSS
    it no longer used. The stream calls this after each layer it frees, calibration after each chunk of experts, the
    pipeline before each step."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def peak_rss_reset() -> bool:
    """Reset this process's peak resident set size to its current one (Linux: /proc/self/clear_refs); False where
    that is not possible (then the peak of a step is not known)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """This process's peak resident set size in bytes since the last reset (VmHWM), None where unknown."""
    return _status_bytes("VmHWM:")


def rss() -> int | None:
    """This process's resident set size in bytes now (VmRSS), None where unknown."""
    return _status_bytes("VmRSS:")


def _status_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_isolated(fn: Callable[..., T], *args: Any) -> tuple[T, int | None, int | None]:
    """(fn(*args), the process's peak RSS, its peak GPU memory: bytes, None where unknown), fn run in a fresh
    process (spawned: it inherits none of this one's heap, mapped files or CUDA context). fn and args must be
    picklable (a top-level function, paths, plain data); its exception is raised here (one that cannot be pickled
    as a NextqError with its text), and a process that dies without a result (killed, e.g. out of memory) is a
    NextqError naming its exit code."""
    import multiprocessing

    from .errors import NextqError

    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_main, args=(send, fn, args), name=f"nextq {fn.__name__}")
    proc.start()
    send.close()
    try:
        try:
            ok, value, peak, gpu = recv.recv()
        except EOFError:
            proc.join()
            raise NextqError(f"{fn.__name__}: its process exited with code {proc.exitcode} and no result (killed? "
                             "a negative code is the signal)") from None
        proc.join()
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if not ok:
        raise value
    return value, peak, gpu


def _isolated_main(conn, fn: Callable[..., Any], args: tuple) -> None:
    """The body of `run_isolated`'s process: run, send (ok, value or exception, peak RSS, peak GPU memory)."""
    import pickle
    import traceback

    import torch

    from .errors import NextqError

    try:
        ok, value = True, fn(*args)
    except BaseException as e:  # handed to the parent, which raises it
        ok, value = False, e
        if not isinstance(e, NextqError):
            console.print(traceback.format_exc(), markup=False, highlight=False)
        try:
            pickle.dumps(e)
        except Exception:
            value = NextqError(f"{type(e).__name__}: {e}")
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
    conn.send((ok, value, peak_rss(), gpu))
    conn.close()


@dataclass
class Step:
    """One timed step: wall seconds, peak RSS and peak GPU memory (bytes, None where unknown), a note."""

    name: str
    kind: str  # "nextq" (bounded memory) or "engine" (holds its artifact)
    wall_s: float = 0.0
    peak_rss: int | None = None
    gpu_peak: int | None = None
    note: str = ""


@dataclass
class StepLog:
    """Times the steps of one run in this process (`with log.step(name): ...`) and prints them as a table."""

    layers: int = 1
    steps: list[Step] = field(default_factory=list)

    @contextmanager
    def step(self, name: str, kind: str = "nextq") -> Iterator[Step]:
        import torch

        s = Step(name, kind)
        gc.collect()  # what earlier steps left (a model, an engine session) is not counted against this one
        trim_heap()
        known = peak_rss_reset()
        if torch.cuda.is_initialized():  # else the step starts CUDA itself: its peak counts from zero
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            yield s
        finally:
            s.wall_s = time.perf_counter() - t0
            if s.peak_rss is None:  # else the step ran in a process of its own, which measured it
                s.peak_rss = peak_rss() if known else None
                s.gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
            self.steps.append(s)
            console.print(f"step {name}: {s.wall_s:.1f} s ({s.wall_s / self.layers:.1f} s / layer), peak RSS "
                          f"{_gib(s.peak_rss) or '?'} GiB" + (f", GPU peak {_gib(s.gpu_peak)} GiB" if s.gpu_peak else ""))

    def skip(self, name: str, kind: str, reason: str) -> None:
        self.steps.append(Step(name, kind, note=f"skipped: {reason}"))

    def table(self, title: str = "steps") -> Table:
        t = Table(title=title)
        for col in ("step", "kind", "wall s", "s / layer", "peak RSS GiB", "GPU peak GiB", "note"):
            t.add_column(col, justify="left" if col in ("step", "kind", "note") else "right")
        for s in self.steps:
            timed = not s.note.startswith("skipped")
            t.add_row(s.name, s.kind, f"{s.wall_s:.1f}" if timed else "", f"{s.wall_s / self.layers:.1f}" if timed
                      else "", _gib(s.peak_rss), _gib(s.gpu_peak), s.note)
        total = sum(s.wall_s for s in self.steps)
        t.add_row("total", "", f"{total:.1f}", f"{total / self.layers:.1f}", "", "", "", style="bold")
        return t

    def to_json(self) -> list[dict]:
        return [asdict(s) for s in self.steps]


def _gib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"
