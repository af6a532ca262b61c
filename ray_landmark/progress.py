"""A one-line progress report with rate and ETA, for loops that Ray Data's own bars do not cover."""

from __future__ import annotations

import sys
import time
from typing import Callable


def say(message: str) -> None:
    """One line to stdout. Ray Train V2 patches print() in its workers to go through its logger, which shows each
    line twice on the driver; writing to the stream directly shows it once."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """``update(n)`` after each batch; prints at most every ``every_s`` seconds, and always at ``close()``."""

    def __init__(self, label: str, total: int | None, unit: str = "img", every_s: float = 5.0, printer=print):
        self.label, self.total, self.unit, self.every_s, self.printer = label, total, unit, every_s, printer
        self.done = 0
        self.started = self.last_print = time.perf_counter()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self, extra: str = "") -> str:
        parts = [f"{self.label}: {self.done:,}"]
        if self.total:
            parts[0] += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{self.rate:.1f} {self.unit}/s")
        if self.total and self.rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.done) / self.rate)}")
        if extra:
            parts.append(extra)
        return " | ".join(parts)

    def update(self, n: int, extra: str | Callable[[], str] = "") -> None:
        """``extra`` may be a function, called only when a line is printed (e.g. to read a GPU value lazily)."""
        self.done += n
        now = time.perf_counter()
        if now - self.last_print >= self.every_s:
            self.last_print = now
            self.printer(self.line(extra() if callable(extra) else extra))

    def close(self, extra: str = "") -> None:
        self.printer(self.line(extra))
