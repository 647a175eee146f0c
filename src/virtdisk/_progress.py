"""A one-line progress bar for long command-line operations."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 30


class ProgressBar:
    """``bar(current, total)`` redraws the line; :meth:`finish` ends it.

    Drawn only on a terminal (and not when ``quiet``): a pipe or a log file
    gets nothing, so scripts see only the command's result.
    """

    def __init__(self, label: str, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = not quiet and self._stream.isatty()
        self._label = label
        self._drawn = False
        self._last = 0.0

    def __call__(self, current: int, total: int) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if self._drawn and now - self._last < 0.1 and current < total:
            return  # at most ten redraws a second
        self._last = now
        fraction = current / total if total else 1.0
        filled = int(fraction * _WIDTH)
        self._stream.write(
            f"\r{self._label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {fraction:6.1%}"
            f"  {_mib(current)}/{_mib(total)} MiB"
        )
        self._stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f}"
