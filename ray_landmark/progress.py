"""What a person sees while a job runs: one line per stage with rate and ETA, refreshed in place on a terminal and
printed at most every few seconds otherwise, plus the lines Ray workers post through ``ConsoleRelay``.

Ray's own output (worker logs, progress bars, scheduler warnings) goes to its log files (``runtime.init_ray``), so
workers cannot print to the job's console directly: they post lines to a small actor, and the driver prints them.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Protocol

import ray

_ERASE_LINE = "\r\033[K"


class Printer(Protocol):
    def __call__(self, line: str, transient: bool = False) -> None: ...


def say(line: str, transient: bool = False) -> None:
    """One line to the job's console (this process's stdout); on a terminal a transient line (progress) is
    overwritten in place by the next one."""
    out = sys.stdout
    if out.isatty():
        out.write(_ERASE_LINE + line + ("" if transient else "\n"))
    else:
        out.write(line + "\n")
    out.flush()


def interactive() -> bool:
    return sys.stdout.isatty()


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLine:
    """``update(n)`` after each batch; prints a transient line at most every ``every_s`` seconds (1 s on a terminal,
    10 s otherwise, by default), and a permanent one at ``close()``."""

    def __init__(self, label: str, total: int | None, unit: str = "img", every_s: float | None = None,
                 printer: Printer = say, interactive_console: bool | None = None):
        if every_s is None:
            every_s = 1.0 if (interactive() if interactive_console is None else interactive_console) else 10.0
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
            self.printer(self.line(extra() if callable(extra) else extra), True)

    def close(self, extra: str = "") -> None:
        self.printer(self.line(extra), False)


def on_this_node() -> dict:
    """Actor options that keep a job's small bookkeeping actors (the console relay, the sample counter, the epoch
    ledgers) on the node of the process that creates them: they live and die with the driver, not with a worker node
    that may be lost."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def ray_job() -> tuple[str, str, str]:
    """This process's Ray session and job: (GCS address, node, job id). A Ray started anew, or the same cluster joined
    again after ``ray.shutdown()``, is another job, whose actors the last one's are not."""
    context = ray.get_runtime_context()
    return context.gcs_address, context.get_node_id(), context.get_job_id()


_bookkeeping: dict[tuple, "ray.actor.ActorHandle"] = {}  # (actor class, Ray session, job) -> this process's actor


def bookkeeping_actor(actor_class) -> "ray.actor.ActorHandle":
    """This process's one ``actor_class`` actor (``ConsoleRelay``, ``SampleCounter``, ``EpochRows``) for the current
    Ray job (``ray_job``), started on first use on this node (``on_this_node``). Every stream and run the process
    makes shares it: each actor is a process of its own, whose start cost about 1.4 CPU-seconds per stream or run
    when each had its own."""
    key = (actor_class, *ray_job())
    if key not in _bookkeeping:
        _bookkeeping[key] = actor_class.options(**on_this_node()).remote()
    return _bookkeeping[key]


@ray.remote(num_cpus=0)
class ConsoleRelay:
    """Lines posted by workers, in order, until the driver drains them: one per process (``bookkeeping_actor``), the
    runs it makes one after another."""

    def __init__(self):
        self.lines: list[tuple[str, bool]] = []

    def post(self, line: str, transient: bool = False) -> None:
        self.lines.append((line, transient))

    def drain(self) -> list[tuple[str, bool]]:
        lines, self.lines = self.lines, []
        return lines


def relay_printer(relay) -> Printer:
    """A printer for worker code: posts to the relay without waiting (calls from one worker keep their order)."""
    return lambda line, transient=False: relay.post.remote(line, transient)


def run_printing_relay(fn: Callable[[], object], relay, every_s: float = 0.5):
    """Run ``fn()`` in a thread while printing what workers post to ``relay``; returns fn's result or raises its
    error. KeyboardInterrupt reaches the caller (the main thread) at once."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(every_s)
        for line, transient in ray.get(relay.drain.remote()):
            say(line, transient)
    for line, transient in ray.get(relay.drain.remote()):
        say(line, transient)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")
