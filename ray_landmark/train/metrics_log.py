"""Rank 0's record of a run: ``metrics.jsonl`` (one line per report) and TensorBoard event files, written locally
and copied to ``<run.output_dir>/<run.name>/logs/`` after each write, so a bucket-backed run keeps them too."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from ray_landmark.data.storage import Location, exists, read_bytes, write_bytes

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, remote: Location):
        self.remote = remote
        self.local = Path(tempfile.mkdtemp(prefix="ray_landmark_logs_"))
        # A restarted worker continues the history instead of starting a new one.
        if exists(remote.child(METRICS_FILE)):
            (self.local / METRICS_FILE).write_bytes(read_bytes(remote.child(METRICS_FILE)))
        self.writer = SummaryWriter(log_dir=str(self.local / "tensorboard"))

    def write(self, metrics: dict, step: int) -> None:
        with open(self.local / METRICS_FILE, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()
        for path in self.local.rglob("*"):
            if path.is_file():
                write_bytes(self.remote.child(str(path.relative_to(self.local))), path.read_bytes())


def read_metrics(remote: Location) -> list[dict]:
    """The metrics history of a run's logs folder."""
    return [json.loads(line) for line in read_bytes(remote.child(METRICS_FILE)).decode().splitlines() if line]


