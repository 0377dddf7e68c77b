"""Progress for long work: a live bar on a terminal, a few plain lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """Yields ``advance(done, total)``. Line output reports every 10 % so logs stay short."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda done, total_: bar.update(task, completed=done, total=total_)
        return
    start, last_decile = time.monotonic(), -1

    def advance(done: int, total_: int) -> None:
        nonlocal last_decile
        decile = int(10 * done / max(total_, 1))
        if decile > last_decile:
            last_decile = decile
            print(f"{description}: {done}/{total_} ({time.monotonic() - start:.1f} s)", file=sys.stderr, flush=True)

    yield advance
