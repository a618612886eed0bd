"""Progress reporting on stderr with rich; a disabled instance does nothing (tests, --quiet)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress

console = Console(stderr=True)


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar: _RichProgress | None = None
        self._task = None

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[Callable[[str], None]]:
        """A spinner for work without a known size (loading, writing); yields ``say(message)``, which
        replaces the spinner's text (a line of its own when stderr is not a terminal)."""
        if not self.enabled:
            yield lambda _msg: None
            return
        if not console.is_terminal:
            yield lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            with console.status(message, spinner="dots") as spinner:
                yield lambda msg: spinner.update(msg)
        self.note(message)

    def note(self, message: str) -> None:
        """One line saying that something was done (or reused), when progress is shown."""
        if self.enabled:
            console.print(f"[green]✓[/] {message}", highlight=False)

    @contextlib.contextmanager
    def task(self, description: str, total: float, completed: float = 0) -> Iterator[Callable[[float], None]]:
        """A bar with an ETA; yields ``advance(n)``. Units are whatever the caller counts."""
        if not self.enabled:
            yield lambda n=1: None
            return
        bar = _RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)
        with bar:
            self._bar, self._task = bar, bar.add_task(description, total=total, completed=completed)
            try:
                yield lambda n=1: bar.advance(self._task, n)
            finally:
                self._bar = self._task = None

    def describe(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=description)

    def count(self, description: str, total: int):
        """A bar counted in items (levels, windows), with M/N."""
        if not self.enabled:
            return contextlib.nullcontext(lambda n=1: None)
        return self._count(description, total)

    @contextlib.contextmanager
    def _count(self, description: str, total: int):
        bar = _RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        with bar:
            t = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(t, n)
