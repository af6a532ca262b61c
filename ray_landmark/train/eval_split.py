"""The split of a training run's datasets among its workers. Ray Train's controller, its dataset manager and the
eval dataset's split coordinator unpickle these classes, each in a process of its own started with every run: this
module imports Ray alone, so that none of them imports torch and the models for nothing."""

from __future__ import annotations

import ray.data
import ray.train


class SplitKeepingEveryRow(ray.data.Dataset):
    """A dataset whose streaming split never drops rows (``equal=False``), whatever its caller asks for."""

    def streaming_split(self, n: int, *, equal: bool = False, locality_hints=None):
        return super().streaming_split(n, equal=False, locality_hints=locality_hints)


class CompleteEvalSplit(ray.train.DataConfig):
    """Ray Train's split of the datasets, except that ``eval`` is split with ``equal=False``: the equal split drops up
    to world_size - 1 rows, a different one each epoch, so epochs would not score the same set."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        # Ray's configure copies each dataset keeping its class (Dataset.copy's _as), so the eval dataset's split is
        # the one above, and everything else (execution options, locality hints) stays Ray's.
        datasets = {name: ray.data.Dataset.copy(ds, _as=SplitKeepingEveryRow) if name == "eval" else ds
                    for name, ds in datasets.items()}
        return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
