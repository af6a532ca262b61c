"""The README's quickstart command, end to end, as a user runs it (minus the venv set-up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_streams_every_train_image_of_the_view_from_local_s3(tmp_path):
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        [sys.executable, "jobs/quickstart.py", "--set", f"run.output_dir={out}", "--set", "synthetic.num_landmarks=30"],
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
