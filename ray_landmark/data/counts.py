"""What the read and decode tasks of a stream saw, by reason, summed in a small actor. It imports only Ray and
``progress``: the actor is a process of its own, and a module that pulled in torch would cost it seconds of imports.

One actor serves every stream a process makes in one Ray session, each stream a tally of its own (``stream_counter``,
``progress.bookkeeping_actor``): a job makes several streams (train, eval, each split it embeds)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import ray

from ray_landmark.progress import bookkeeping_actor


@ray.remote(num_cpus=0)
class SampleCounter:
    """Running totals of what the read and decode tasks saw, by stream and reason."""

    def __init__(self):
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, stream: str, counts: dict[str, int]) -> None:
        tally = self.counts.setdefault(stream, {})
        for key, n in counts.items():
            tally[key] = tally.get(key, 0) + n

    def totals(self, stream: str) -> dict[str, int]:
        return dict(self.counts.get(stream, {}))


@dataclass(frozen=True)
class StreamCounter:
    """One stream's tally in a ``SampleCounter``; it travels to the stream's tasks and training workers."""

    actor: "ray.actor.ActorHandle"
    stream: str

    def add(self, counts: dict[str, int]) -> None:
        # Waiting for the actor keeps the totals exact when the consumer reads them right after the last batch.
        if counts:
            ray.get(self.actor.add.remote(self.stream, counts))

    def totals(self) -> dict[str, int]:
        return ray.get(self.actor.totals.remote(self.stream))


def stream_counter() -> StreamCounter:
    """A new stream's tally, in this process's ``SampleCounter`` for the current Ray session."""
    return StreamCounter(bookkeeping_actor(SampleCounter), uuid.uuid4().hex)


def counts_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))
            if after.get(k, 0) != before.get(k, 0)}
