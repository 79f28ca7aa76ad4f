"""A progress bar for long loops (rich, on stderr), with running figures such as loss and rate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None):
        self._progress, self._task = progress, task

    def update(self, advance: int = 1, **figures: float) -> None:
        if self._progress is None:
            return
        text = "  ".join(f"{k} {v:,.4g}" if k != "rate" else f"{v:,.0f}/s" for k, v in figures.items())
        self._progress.update(self._task, advance=advance, figures=text)


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[_Bar]:
    """Yield a bar whose `update(advance, **figures)` moves it and shows the figures."""
    if not enabled:
        yield _Bar(None, None)
        return
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[figures]}"),
    )
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, figures="")
        yield _Bar(progress, task)
