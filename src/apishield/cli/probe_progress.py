"""The probe's progress bar: one line on a terminal's standard error, rewritten in place.

Drawn only when standard error is a terminal, so CI logs, pipes and `--format json` on
standard output never see it (the report goes to standard output, the bar to standard
error). Redrawn at most once per percent, and finished with a newline so the next line
starts clean.
"""

from __future__ import annotations

from typing import TextIO

WIDTH = 30


class ProgressBar:
    def __init__(self, stream: TextIO, label: str = "apishield probe") -> None:
        self.stream = stream
        self.label = label
        self.enabled = stream.isatty()
        self._last = -1
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        percent = done * 100 // total
        if percent == self._last and done != total:
            return
        self._last = percent
        filled = WIDTH * done // total
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] "
                          f"{done}/{total} ({percent}%)")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
