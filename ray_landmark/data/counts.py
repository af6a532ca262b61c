"""What the read and decode tasks of a stream saw, by reason, summed in one small actor per stream. It imports only
Ray: each counter is an actor process of its own, started with every stream, and a module that pulled in torch would
cost every one of them seconds of imports."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class SampleCounter:
    """Running totals of what the read and decode tasks saw, by reason."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, counts: dict[str, int]) -> None:
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + n

    def totals(self) -> dict[str, int]:
        return dict(self.counts)


def report_counts(counter, counts: dict[str, int]) -> None:
    # Waiting for the actor keeps the totals exact when the consumer reads them right after the last batch.
    if counts:
        ray.get(counter.add.remote(counts))


def counts_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))
            if after.get(k, 0) != before.get(k, 0)}
