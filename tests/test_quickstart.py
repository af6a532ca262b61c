"""The README's quickstart command, end to end, as a user runs it (minus the venv set-up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_streams_trains_two_families_and_scores_their_ensemble(tmp_path):
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        [sys.executable, "jobs/quickstart.py", "--out", str(out), "--serve"],
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
    # Output a person can read: a bounded number of lines, no progress-bar redraws when not on a terminal, and
    # Ray's own chatter in its log files.
    output = proc.stdout + proc.stderr
    assert len(output.splitlines()) < 100, output
    assert "\r" not in output and "\x1b[" not in output
    assert "INFO" not in output and "[train] epoch 1 done: loss" in proc.stdout
    history = summary["training"]["quickstart"]["history"]
    assert [m["epoch"] for m in history] == list(range(summary["config"]["train"]["epochs"] + 1))
    # It learns (GAP 0.01 -> 0.18 in one run; mAP@100's rise on a toy set is within run-to-run noise: see
    # tests/test_training.py).
    assert history[-1]["val_gap"] > history[0]["val_gap"]
    assert all(0 < m["val_map100"] <= 1 for m in history)
    final_checkpoint = summary["training"]["quickstart"]["final_checkpoint"]
    assert final_checkpoint.startswith("quickstart-gldv2/runs/quickstart/checkpoint_")
    # The ensemble of the two models: metrics per model and for the ensemble, the report and the submissions.
    assert set(summary["models"]) == {"dolg", "efficientnet"}
    # The headline is Private first, as Kaggle scores it; Public beside it, never a pooled "gap".
    assert 0 < summary["gap_private"] <= 1 and 0 < summary["map100_private"] <= 1 and "gap" not in summary
    assert all(0 < summary["models"][m]["map100_private"] <= 1 for m in summary["models"])
    header = next(line for line in proc.stdout.splitlines() if "gap_private" in line)
    assert header.split()[:4] == ["gap_private", "gap_public", "map100_private", "map100_public"]
    assert (out / "ensemble" / "report.html").is_file() and "[quickstart] report:" in proc.stdout
    assert (out / "ensemble" / "submission_recognition.csv").is_file()
    assert "ensemble with post-processing" in proc.stdout
    # --serve: the two models as a service, asked about four test images over HTTP.
    assert "[quickstart] the service at http://127.0.0.1:" in proc.stdout
    assert proc.stdout.count(", confidence ") == 4 and "; index " in proc.stdout

    # The same command again: it reuses what the first run finished (data, both trained runs, the embeddings).
    again = subprocess.run([sys.executable, "jobs/quickstart.py", "--out", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[quickstart] restored s3://quickstart-gldv2 from " in again.stdout
    assert "written earlier with this spec; reused" in again.stdout
    assert again.stdout.count("trained earlier with this config (8 epochs); reused") == 2, again.stdout[-3000:]
    assert "[train] epoch" not in again.stdout
    assert again.stdout.count("was embedded earlier with ") == 2
    rerun = json.loads((out / "summary.json").read_text())
    assert not summary["dataset"]["reused"] and rerun["dataset"]["reused"]
    assert all(run["reused"] for run in rerun["training"].values())
    assert rerun["training"]["quickstart"]["final_checkpoint"] == final_checkpoint
    assert rerun["gap_private"] == summary["gap_private"] and rerun["map100_private"] == summary["map100_private"]
