"""What the TorchTrainer hands its workers: their inputs and the function each runs.

Ray Train's controller unpickles both before it starts the workers, so this module imports only what their fields
need. The loop itself (``train/loop.py``) imports the models, timm and torchvision, which only the workers use: when
the function lived there, every run's controller spent 1.7 s importing them before its first worker started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import ray

from ray_landmark.config import Config
from ray_landmark.data.counts import StreamCounter
from ray_landmark.data.epoch_rows import StreamRows


@dataclass(frozen=True)
class WorkerInputs:
    """Everything a training worker receives besides its dataset shards."""

    config: Config
    class_counts: list[int]
    landmark_ids: list[int]
    train_images: int
    # The streams carry JPEG bytes and each worker decodes its batches (data.decode): decided once, by the driver.
    worker_decode: bool
    skip_counter: StreamCounter  # the train stream's tally of what was skipped
    console: "ray.actor.ActorHandle"  # a ConsoleRelay: rank 0's progress and epoch lines
    interactive_console: bool  # the driver's console is a terminal: refresh progress in place, often
    # on_step(rank=, epoch=, step=, rows=) after each optimizer step, rows: the step's train rows (fault-injection
    # tests)
    on_step: Callable | None = None
    skipped_shards: dict | None = None  # train shard -> why it is left out (data.missing_shards: skip)
    epoch_rows: StreamRows | None = None  # the train stream's ledger of trained rows; None: they are not known


def train_loop_per_worker(loop_config: dict) -> dict:
    """The TorchTrainer's function: ``train/loop.py``'s ``train_worker`` on ``loop_config["inputs"]``
    (``WorkerInputs``), imported here, in the worker."""
    from ray_landmark.train.loop import train_worker

    return train_worker(loop_config["inputs"])
