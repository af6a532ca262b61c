"""The README's quickstart command, end to end, as a user runs it (minus the venv set-up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_streams_the_view_from_local_s3_and_trains_with_improving_metrics(tmp_path):
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        [sys.executable, "jobs/quickstart.py", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stream = summary["stream"]
    assert stream["train_images_streamed"] == stream["train_images_in_view"] > 0
    assert stream["classes_streamed"] == stream["classes_in_view"]
    assert stream["test_images_streamed"] == summary["dataset"]["images"]["test"]
    assert not any(stream["skipped"].values())
    assert "[quickstart] streamed" in proc.stdout and "img/s" in proc.stdout
    history = summary["training"]["history"]
    assert [m["epoch"] for m in history] == list(range(summary["config"]["train"]["epochs"] + 1))
    assert history[-1]["val_gap"] > history[0]["val_gap"] and history[-1]["val_map100"] > history[0]["val_map100"]
    assert summary["training"]["final_checkpoint"].startswith("quickstart-gldv2/runs/quickstart/checkpoint_")
