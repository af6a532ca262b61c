"""Where a job writes: ``<output_dir>/<name>``, for a training run (``run``), a sweep and an ensemble alike."""

from __future__ import annotations

from typing import Protocol

from ray_landmark.data.config import StorageConfig
from ray_landmark.data.storage import Location, resolve


class Named(Protocol):
    """A config section that says where its job writes: ``run``, a sweep config, an ensemble config."""

    name: str
    output_dir: str
    storage: StorageConfig


def output_parent(section: Named) -> Location:
    """``<output_dir>`` resolved: the folder Ray Train and Ray Tune are given as their storage path."""
    return resolve(section.output_dir, section.storage)


def output_folder(section: Named) -> Location:
    """``<output_dir>/<name>``: everything the job writes (checkpoints, logs, trials, embeddings, submissions)."""
    return output_parent(section).child(section.name)


def run_logs(run: Named) -> Location:
    """``<output_dir>/<name>/logs`` of a training run: metrics.jsonl and TensorBoard event files."""
    return output_folder(run).child("logs")
