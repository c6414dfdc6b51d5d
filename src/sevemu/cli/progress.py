"""Progress of long commands on a terminal, through ``rich`` -- and nothing when not on one.

Commands that can take more than about two seconds (the demo, the benchmarks, a launch of a large
image, the VMM waiting for its secret) report what they are doing on stderr when stderr is a
terminal; piped, redirected or with ``--json`` / ``-q`` they print nothing extra, so their output
stays exactly what docs/cli.md describes.  The display is transient: it disappears when the work is
done.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, Self

__all__ = ["Progress", "progress_enabled"]


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def progress_enabled(*, quiet: bool = False) -> bool:
    """Whether a progress display may be shown: stderr is a terminal and the user did not ask for
    machine output or silence."""
    return not quiet and _isatty(sys.stderr)


class Progress:
    """A transient progress display: named steps, optionally with a byte or item count.

    ::

        with Progress(enabled, "demo") as p:
            p.step("launching two SEV guests")
            p.start("LAUNCH_UPDATE_DATA", total=len(image)); ...; p.advance(n)
    """

    def __init__(self, enabled: bool, title: str = "") -> None:
        self.enabled = enabled
        self.title = title
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Self:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            # lines printed to stdout go above the display when stdout is the same terminal; a piped
            # stdout is left alone
            on_terminal = _isatty(sys.stdout)
            self._progress = RichProgress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                redirect_stdout=on_terminal, redirect_stderr=False,
            )
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _label(self, text: str) -> str:
        return f"{self.title}: {text}" if self.title else text

    def step(self, text: str) -> None:
        """A new step of unknown length (a spinner)."""
        self.start(text, total=None)

    def start(self, text: str, total: float | None) -> None:
        """A new step of ``total`` units (bytes, pages, ...); ``None`` for an unknown length."""
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(self._label(text), total=total)

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, amount)
