"""Bad input a user can hit gives one line naming the key, file or address, exit code 1, and nothing half-written:
checked in the driver before Ray starts, or carried out of a Ray worker as the same line."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import ray

from ray_landmark.cli import run_job
from ray_landmark.errors import ConfigError, JobError, user_error

REPO = Path(__file__).resolve().parents[1]


def _job_error(monkeypatch, script: str, *args: str) -> str:
    """Run jobs/<script> in this process (no interpreter start: torch is imported already); its exit message."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "jobs" / script), run_name="__main__")
    message = exit_.value.code
    assert isinstance(message, str) and "\n" not in message, message  # sys.exit(str): printed, exit status 1
    return message


@pytest.mark.parametrize("setting, message", [
    ("width=0", r"key 'width': Input should be greater than or equal to 16 \(got 0\)"),
    ("train_shards=0", r"key 'train_shards': Input should be greater than or equal to 1 \(got 0\)"),
    ("min_images_per_landmark=50", r"min_images_per_landmark \(50\) is above max_images_per_landmark \(40\)"),
    ("clean_landmark_fraction=1.5", r"key 'clean_landmark_fraction': Input should be less than or equal to 1"),
])
def test_a_synthetic_spec_out_of_bounds_writes_nothing(monkeypatch, tmp_path, setting, message):
    out = tmp_path / "synthetic"
    error = _job_error(monkeypatch, "make_synthetic_gldv2.py", "--out", str(out), "--set", setting)
    assert error.startswith("error: --set: ") and re.search(message, error), error
    assert not out.exists()


def test_a_zero_byte_released_file_is_named(monkeypatch, tmp_path):
    empty = tmp_path / "dolg_b5.pth"
    empty.write_bytes(b"")
    error = _job_error(monkeypatch, "convert_released.py", "--source", str(empty), "--out", str(tmp_path / "run"))
    assert error.startswith(f"error: {empty}: not a torch checkpoint file ("), error
    assert not (tmp_path / "run").exists()


def test_embed_arguments_are_checked_by_the_ensemble_configs_model_before_anything(monkeypatch, tmp_path):
    error = _job_error(monkeypatch, "embed.py", "--checkpoint", str(tmp_path / "none"), "--split", "test",
                       "--out", str(tmp_path / "out"), "--actors", "0")
    assert error == ("error: jobs/embed.py arguments: key 'actors': Input should be greater than or equal to 1 "
                     "(got 0)")
    assert not (tmp_path / "out").exists()


def test_a_job_api_address_in_ray_address_says_how_to_submit(monkeypatch):
    from ray_landmark.runtime import init_ray

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(JobError, match=r"^RAY_ADDRESS=http://127.0.0.1:8265 is a job API address: submit this job "
                                       r"with `ray job submit --working-dir \. -- python jobs/\.\.\.`, or unset "
                                       r"RAY_ADDRESS to run it on a local Ray$"):
        init_ray()


def test_an_error_raised_in_a_ray_worker_reaches_the_user_as_its_one_line(ray_session):
    @ray.remote
    def read_a_shard():
        raise ConfigError("data.root: s3://nowhere/train/train_000.tar: no such file")

    def main():
        ray.get(read_a_shard.remote())

    with pytest.raises(SystemExit) as exit_:
        run_job(main)
    from ray_landmark.runtime import ray_logs_folder

    assert exit_.value.code == (f"error: data.root: s3://nowhere/train/train_000.tar: no such file "
                                f"(full log: {ray_logs_folder()})")


def test_user_error_finds_the_cause_inside_train_and_tune_wrappers():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    cause = ConfigError("train.init_from: nothing at s3://b/step1")
    assert user_error(WorkerGroupError("worker 1 failed", {0: RuntimeError("x"), 1: cause})) is cause
    assert user_error(ControllerError(cause)) is cause
    try:
        try:
            raise cause
        except ConfigError as err:
            raise RuntimeError("trial failed") from err
    except RuntimeError as wrapped:
        assert user_error(wrapped) is cause
    assert user_error(RuntimeError("a bug")) is None


def test_a_csv_without_its_columns_leaves_the_earlier_manifest_whole(monkeypatch, gldv2_local, tmp_path):
    import shutil

    from ray_landmark.data import gldv2
    from ray_landmark.data.config import DataConfig
    from ray_landmark.data.metadata import open_manifest

    root = tmp_path / "gldv2"
    shutil.copytree(gldv2_local, root)  # with its complete manifest
    before = {p: p.stat().st_mtime_ns for p in (root / "manifest").rglob("*") if p.is_file()}
    csv = root / gldv2.RECOGNITION_GT_CSV
    csv.write_text(csv.read_text().replace("Usage", "usage_renamed"))
    error = _job_error(monkeypatch, "prepare_gldv2.py", "--root", str(root))
    assert error.startswith(f"error: {csv}: ") and "Usage" in error, error
    after = {p: p.stat().st_mtime_ns for p in (root / "manifest").rglob("*") if p.is_file()}
    assert after == before  # not one file rewritten: every CSV is checked before anything is written
    assert len(open_manifest(DataConfig(root=str(root))).view_classes("gldv2c")) > 0


def test_a_manifest_cut_off_while_written_is_refused_naming_it(gldv2_local, tmp_path):
    import shutil

    from ray_landmark.data.config import DataConfig
    from ray_landmark.data.metadata import SUMMARY_FILE, open_manifest
    from ray_landmark.data.storage import StorageError

    manifest = tmp_path / "manifest"
    shutil.copytree(f"{gldv2_local}/manifest", manifest)
    (manifest / SUMMARY_FILE).unlink()  # as prepare_gldv2 leaves it until its last write
    with pytest.raises(StorageError, match=rf"^{manifest}: no complete manifest there \(summary.json missing"):
        open_manifest(DataConfig(root=gldv2_local, manifest=str(manifest)))
