"""Bad input a user can hit gives one line naming the key, file or address, exit code 1, and nothing half-written:
checked in the driver before Ray starts, or carried out of a Ray worker as the same line. By mechanism: the shards a
manifest lists, one line for every failure (files, --set, storage, Ray's start), checks before the expensive part
(checkpoints, output paths); checkpoint retention is in tests/test_run_identity.py and tests/test_training.py, the
service's answers to bad images in tests/test_serve.py."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import job_error

from ray_landmark.cli import run_job
from ray_landmark.errors import ConfigError, JobError, user_error

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("setting, message", [
    ("width=0", r"key 'width': Input should be greater than or equal to 16 \(got 0\)"),
    ("train_shards=0", r"key 'train_shards': Input should be greater than or equal to 1 \(got 0\)"),
    ("min_images_per_landmark=50", r"min_images_per_landmark \(50\) is above max_images_per_landmark \(40\)"),
    ("clean_landmark_fraction=1.5", r"key 'clean_landmark_fraction': Input should be less than or equal to 1"),
])
def test_a_synthetic_spec_out_of_bounds_writes_nothing(monkeypatch, tmp_path, setting, message):
    out = tmp_path / "synthetic"
    error = job_error(monkeypatch, "make_synthetic_gldv2.py", "--out", str(out), "--set", setting)
    assert error.startswith("error: --set: ") and re.search(message, error), error
    assert not out.exists()


def test_a_zero_byte_released_file_is_named(monkeypatch, tmp_path):
    empty = tmp_path / "dolg_b5.pth"
    empty.write_bytes(b"")
    error = job_error(monkeypatch, "convert_released.py", "--source", str(empty), "--out", str(tmp_path / "run"))
    assert error.startswith(f"error: {empty}: not a torch checkpoint file ("), error
    assert not (tmp_path / "run").exists()


def test_embed_arguments_are_checked_by_the_ensemble_configs_model_before_anything(monkeypatch, tmp_path):
    error = job_error(monkeypatch, "embed.py", "--checkpoint", str(tmp_path / "none"), "--split", "test",
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
    error = job_error(monkeypatch, "prepare_gldv2.py", "--root", str(root))
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


# ---------------------------------------------------------------- shards the manifest lists

SHARD_DAMAGE = {"empty": "(empty, 0 bytes)", "missing": "(missing)", "folder": "(a folder, not a tar)",
                "shorter": "bytes, shorter than the",
                # a manifest written without --verify-shards: the tar list prepare_gldv2 records is what is expected
                "missing from a manifest without a shard index": "(missing)"}


def _damaged_copy(gldv2_local: str, tmp_path: Path, damage: str) -> tuple[Path, Path]:
    """A copy of the synthetic set (its manifest with the shard index) with one train shard damaged after it was
    indexed; (root, that shard)."""
    import shutil

    root = tmp_path / "gldv2"
    shutil.copytree(gldv2_local, root)
    if damage.endswith("without a shard index"):
        from ray_landmark.data.metadata import prepare_manifests
        from ray_landmark.data.shard_members import dataset_tar_files
        from ray_landmark.data.storage import resolve

        shutil.rmtree(root / "manifest")
        loc = resolve(str(root))
        prepare_manifests(loc, loc.child("manifest"), progress=None, shard_files=dataset_tar_files(loc))
    shard = sorted((root / "train").glob("*.tar"))[1]
    data = shard.read_bytes()
    shard.unlink()
    if damage == "empty":
        shard.write_bytes(b"")
    elif damage == "folder":
        shard.mkdir()
        (shard / "readme.txt").write_text("a folder where the tar was")
    elif damage == "shorter":
        shard.write_bytes(data[: len(data) // 2])
    return root, shard


@pytest.mark.parametrize("damage", list(SHARD_DAMAGE))
def test_a_listed_shard_that_is_missing_empty_a_folder_or_short_stops_training_before_ray_or_is_skipped_by_name(
    monkeypatch, gldv2_local, tmp_path, damage
):
    from ray_landmark.data.config import DataConfig
    from ray_landmark.data.pipeline import split_shards

    root, shard = _damaged_copy(gldv2_local, tmp_path, damage)
    runs = tmp_path / "runs"
    error = job_error(monkeypatch, "train.py", "--config", str(REPO / "configs" / "tiny_dolg.yaml"),
                       "--set", f"data.root={root}", "--set", f"run.output_dir={runs}")
    assert error.startswith(f"error: data.root: 1 train shard(s) unusable: {shard} ") and SHARD_DAMAGE[damage] in error
    assert error.endswith("or set data.missing_shards: skip to go on without them"), error
    assert not runs.exists()  # stopped before Ray Train wrote anything

    lines = []
    found = split_shards(DataConfig(root=str(root), missing_shards="skip"), "train", printer=lines.append)
    others = sorted(str(p) for p in (root / "train").glob("*.tar") if p != shard)
    assert found.paths == others and list(found.skipped) == [shard.name]
    assert SHARD_DAMAGE[damage].strip("()") in found.skipped[shard.name]
    assert lines == [f"[data] WARNING skipping 1 train shard(s) of {root / 'train'} (data.missing_shards: skip): "
                     f"{found.summary()}"]


@pytest.mark.parametrize("damage, named", [("empty", "is empty (0 bytes)"), ("folder", "is a folder, not a tar"),
                                           ("truncated", None)])
def test_verify_shards_names_an_unusable_tar_before_writing_and_a_truncated_one_in_a_line(
    monkeypatch, gldv2_local, tmp_path, capsys, damage, named
):
    root, shard = _damaged_copy(gldv2_local, tmp_path, "shorter" if damage == "truncated" else damage)
    summary = root / "manifest" / "summary.json"
    before = summary.stat().st_mtime_ns
    if named:
        error = job_error(monkeypatch, "prepare_gldv2.py", "--root", str(root), "--verify-shards")
        assert error == (f"error: 1 unusable shard(s) under {root / 'train'}: {shard} {named}; replace each with "
                         f"its complete tar (or remove it) and rerun")
        assert summary.stat().st_mtime_ns == before  # the earlier manifest is left whole
    else:
        monkeypatch.setattr(sys, "argv", ["prepare_gldv2.py", "--root", str(root), "--verify-shards"])
        runpy.run_path(str(REPO / "jobs" / "prepare_gldv2.py"), run_name="__main__")
        out = capsys.readouterr().out
        assert f"[verify] WARNING {shard} is truncated: it ends inside a member after " in out, out


@pytest.mark.slow
def test_training_past_skipped_shards_names_them_every_epoch_and_a_step_larger_than_what_is_left_is_refused(
    ray_session, monkeypatch, gldv2_local, tmp_path, capsys
):
    root, shard = _damaged_copy(gldv2_local, tmp_path, "empty")
    train = ["--config", str(REPO / "configs" / "tiny_dolg.yaml"), "--set", f"data.root={root}",
             "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "data.missing_shards=skip",
             "--set", "data.view=full", "--set", "data.image_size=32", "--set", "data.augment=false",
             "--set", "data.eval_queries=8", "--set", "data.eval_index=16", "--set", "train.cpus_per_worker=0.5",
             "--set", "train.epochs=1"]
    monkeypatch.setattr(sys, "argv", ["train.py", *train])
    runpy.run_path(str(REPO / "jobs" / "train.py"), run_name="__main__")
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("[train] epoch 1 done: ")]
    assert len(epoch_lines) == 1 and epoch_lines[0].endswith(f"1 train shard(s) skipped: {shard.name} (empty, "
                                                              f"0 bytes)"), out[-3000:]
    assert "[train] finished tiny_dolg; final checkpoint " in out

    # The same run, one epoch more, with batches larger than the view less its skipped shard: refused before Ray Train
    # starts, counting what the skipped shard held (test_training.py fails an epoch that trains no step all the same).
    error = job_error(monkeypatch, "train.py", *train, "--set", "train.epochs=2", "--set", "train.batch_size=5000")
    assert re.fullmatch(rf"error: train.batch_size: one optimizer step takes 5,000 images on each of the 1 worker\(s\) "
                        rf"\(batch_size x grad_accum\), but view full of {re.escape(str(root))} has \d+ train images, \d+ "
                        rf"more in skipped shards: lower train.batch_size or train.num_workers", error), error
    assert "[train] finished" not in capsys.readouterr().out


def test_an_epoch_whose_stream_gives_no_full_batch_fails_naming_the_data_root(ray_session, tmp_path):
    # What no manifest foresees (every JPEG of a worker's share corrupt, say): the loop's own check, on a real stream of
    # fewer images than one batch and the run's real skip counter, without starting Ray Train.
    from types import SimpleNamespace

    from ray_landmark.config import load_config
    from ray_landmark.data.counts import stream_counter
    from ray_landmark.runs.checkpoint import Progress
    from ray_landmark.train.loop import NoTrainingData, train_epoch

    cfg = load_config(REPO / "configs" / "tiny_dolg.yaml", [f"run.output_dir={tmp_path}", "data.root=s3://b/gldv2"])
    counter = stream_counter()
    counter.add({"read": 3, "corrupt_jpeg": 2})
    images = [{"image": np.zeros((8, 8, 3), np.uint8), "label": 0, "row": i} for i in range(3)]
    worker = SimpleNamespace(
        cfg=cfg, world=1, rank=0, device=torch.device("cpu"), precision=None, memory_format=torch.contiguous_format,
        say=lambda line, transient=False: None, checkpoint_clock=None,
        inputs=SimpleNamespace(skip_counter=counter, worker_decode=False, on_step=None, interactive_console=False))
    training = SimpleNamespace(model=torch.nn.Linear(1, 1), optimizer=None, scheduler=None, steps_per_epoch=4,
                               progress=Progress(0, 0, 0, 4), trained_rows=[], params=[])
    with pytest.raises(NoTrainingData) as err:
        train_epoch(worker, training, ray.data.from_items(images).iterator(), epoch=0)
    assert str(err.value) == ("epoch 1 trained no step: the train stream of s3://b/gldv2 gave this worker fewer than "
                              "the 16 images one step needs (the stream so far: 3 images read, dropped: 2 "
                              "corrupt_jpeg); check its train shards and data.view, or lower train.batch_size")


@pytest.mark.parametrize("job, args", [
    ("train.py", ["--config", "configs/tiny_dolg.yaml", "--set", "train.num_workers=0"]),
    ("train_dolg.py", ["--config", "configs/tiny_dolg.yaml", "--set", "train.num_workers=0"]),
    ("tune.py", ["--config", "configs/tune_tiny.yaml", "--set-base", "train.num_workers=0"]),
])
def test_zero_train_workers_are_refused_in_one_line_before_anything_is_written(monkeypatch, tmp_path, job, args):
    out = "output_dir" if job == "tune.py" else "run.output_dir"
    monkeypatch.chdir(REPO)
    error = job_error(monkeypatch, job, *args, "--set", f"{out}={tmp_path / 'runs'}")
    assert error.endswith("key 'train.num_workers': 0 (Ray Train's local mode, in the driver) keeps no checkpoint once "
                          "the job ends; use 1 or more workers (1 trains in one worker process) (got 0)"), error
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- one line for every failure


@pytest.mark.parametrize("job, args", [
    ("train.py", ["--config", "configs/tiny_dolg.yaml", "--set", "data.root=[unclosed"]),
    ("train_dolg.py", ["--config", "configs/tiny_dolg.yaml", "--set", "data.root=[unclosed"]),
    ("train_chain.py", ["--chain", "configs/chains/tiny_hybrid_swin.yaml", "--set", "data.root=[unclosed"]),
    ("tune.py", ["--config", "configs/tune_tiny.yaml", "--set", "name=[unclosed"]),
    ("ensemble.py", ["--config", "configs/ensemble/quickstart.yaml", "--set", "name=[unclosed"]),
    ("embed.py", ["--checkpoint", "{tmp}/none", "--split", "test", "--out", "{tmp}/out",
                  "--set", "data.root=[unclosed"]),
    ("convert_released.py", ["--source", "{tmp}/none.pth", "--out", "{tmp}/out", "--set", "data.root=[unclosed"]),
    ("make_synthetic_gldv2.py", ["--out", "{tmp}/out", "--set", "width=[unclosed"]),
    ("quickstart.py", ["--out", "{tmp}/out", "--set", "data.root=[unclosed"]),
    ("serve.py", ["--set", "ensemble=[unclosed"]),
])
def test_a_set_value_that_is_not_yaml_is_one_line_naming_it_in_every_job(monkeypatch, tmp_path, job, args):
    monkeypatch.chdir(REPO)
    error = job_error(monkeypatch, job, *(a.format(tmp=tmp_path) for a in args))
    key = args[-1].split("=")[0]
    assert f"--set '{key}=[unclosed': the value is not valid YAML (expected ',' or ']', but got '<stream end>' at " \
           f"line 1, column 10); quote it as a string" in error, error
    assert error.startswith(("error: ", "config error: ")) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("job, option", [("train.py", "--config"), ("tune.py", "--config"),
                                         ("ensemble.py", "--config"), ("serve.py", "--config"),
                                         ("train_chain.py", "--chain")])
def test_a_config_file_that_is_not_utf8_or_not_yaml_is_one_line_naming_it(monkeypatch, tmp_path, job, option):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run:\n  name: café\n".encode("latin-1"))
    error = job_error(monkeypatch, job, option, str(latin1))
    assert error.endswith(f"{latin1}: not UTF-8 text (byte 0xe9 at offset 16); save the "
                          f"{'Serve ' if job == 'serve.py' else ''}config file as UTF-8"), error
    broken = tmp_path / "broken.yaml"
    broken.write_text("run:\n  name: [a, b\n")
    error = job_error(monkeypatch, job, option, str(broken))
    assert re.search(rf"{broken}: not valid YAML \(.* at line \d+, column \d+\)$", error), error


def test_an_s3_root_on_an_endpoint_that_refuses_connections_is_one_line_naming_the_uri(monkeypatch, tmp_path):
    from ray_landmark.local_s3 import free_port, use_test_credentials

    use_test_credentials()
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    error = job_error(monkeypatch, "train.py", "--config", str(REPO / "configs" / "tiny_dolg.yaml"),
                       "--set", "data.root=s3://gldv2/v2", "--set", f"data.storage.endpoint_url={endpoint}",
                       "--set", "data.storage.retries=1", "--set", "data.storage.connect_timeout_s=1",
                       "--set", f"run.output_dir={tmp_path / 'runs'}")
    assert error.startswith("error: looking for s3://gldv2/v2/manifest/summary.json failed: "), error
    assert not (tmp_path / "runs").exists()


def test_a_landmark_id_that_is_not_a_number_names_the_csv_and_row_and_writes_nothing(monkeypatch, gldv2_local,
                                                                                     tmp_path):
    import shutil

    from ray_landmark.data import gldv2

    root = tmp_path / "gldv2"
    shutil.copytree(gldv2_local, root)
    csv = root / gldv2.TRAIN_CSV
    lines = csv.read_text().splitlines()
    head, first = lines[0].split(","), lines[3].split(",")
    first[head.index("landmark_id")] = "eiffel"
    csv.write_text("\n".join([*lines[:3], ",".join(first), *lines[4:]]) + "\n")
    before = (root / "manifest" / "summary.json").stat().st_mtime_ns
    error = job_error(monkeypatch, "prepare_gldv2.py", "--root", str(root))
    assert error == (f"error: {csv}: 1 landmark_id value(s) are not whole numbers, the first 'eiffel' on data row 3; "
                     f"is it GLDv2's file?")
    assert (root / "manifest" / "summary.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("job, args", [
    ("make_synthetic_gldv2.py", ["--out", "{file}/gldv2"]),
    ("export_onnx.py", ["--checkpoint", "{tmp}/none", "--out", "{file}/exported"]),
    ("make_synthetic_gldv2.py", ["--out", "{file}"]),
])
def test_an_output_path_under_a_regular_file_is_one_line_before_any_work(monkeypatch, tmp_path, job, args):
    file = tmp_path / "notes.txt"
    file.write_text("a file, not a folder")
    error = job_error(monkeypatch, job, *(a.format(tmp=tmp_path, file=file) for a in args))
    out = args[args.index("--out") + 1].format(file=file)
    where = "it" if out == str(file) else f"{file}, a folder it would be in,"
    assert error == f"error: --out: {out}: {where} is a file, not a folder; choose another path", error
    assert file.read_text() == "a file, not a folder"


@pytest.mark.parametrize("case", ["nothing listens at RAY_ADDRESS", "joining fails", "a local Ray fails to start"])
def test_ray_that_cannot_be_reached_or_started_is_one_line_after_a_bounded_wait(monkeypatch, case):
    import socket

    from ray_landmark import runtime

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_LANDMARK_CONNECT_WAIT_S", "0")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if case == "nothing listens at RAY_ADDRESS":
        listener.close()
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init would wait for ever"))
        expected = (rf"^RAY_ADDRESS=127.0.0.1:{port}: nothing answers there \(Connection refused, waited 0 s\); "
                    rf"start the cluster .* or unset it to run on a local Ray$")
    else:
        listener.listen()
        if case == "joining fails":
            monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        else:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)

        def fail(**kwargs):
            raise RuntimeError("The current node timed out during startup. This could happen because some of the\n"
                               "raylet failed to startup or the GCS has become overloaded.")

        monkeypatch.setattr(ray, "init", fail)
        expected = (rf"^RAY_ADDRESS=127.0.0.1:{port}: could not join the Ray cluster there \(The current node timed "
                    rf"out during startup\. .*\); check that it names" if case == "joining fails" else
                    r"^a local Ray did not start \(The current node timed out during startup\. .*overloaded\.\); check "
                    r"free memory")
    with pytest.raises(runtime.RayStartError if case != "nothing listens at RAY_ADDRESS" else JobError,
                       match=expected) as raised:
        runtime.init_ray()
    listener.close()
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("error, expected", [
    (OSError("AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7"),
     r"^error: AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7: a file or storage "
     r"request failed; check the path or URI, its permissions and the storage credentials \(traceback: (\S+)\)$"),
    (KeyError("landmark"),
     r"^error: unexpected KeyError: 'landmark' \(the whole traceback: (\S+); please report it\)$"),
])
def test_any_other_failure_ends_a_job_in_one_line_naming_the_file_with_its_traceback(error, expected):
    def main():
        raise error

    with pytest.raises(SystemExit) as exit_:
        run_job(main)
    match = re.match(expected, exit_.value.code)
    assert match, exit_.value.code
    assert "Traceback" in Path(match.group(1)).read_text()


# ---------------------------------------------------------------- checked before the expensive part


def _fake_checkpoint(folder: Path) -> Path:
    """A small checkpoint folder with a valid config (the tiny DOLG's): enough for every check made before a model
    is built."""
    import torch

    from ray_landmark.config import load_config
    from ray_landmark.runs.checkpoint import Progress, save_checkpoint

    cfg = load_config(REPO / "configs" / "tiny_dolg.yaml")
    save_checkpoint(folder, state={"w": torch.zeros(256)}, config=cfg.model_dump(mode="json"),
                    progress=Progress(1, 10, 0))
    return folder


@pytest.mark.parametrize("damage", ["missing", "damaged checkpoint folder", "run folder without a good checkpoint"])
@pytest.mark.parametrize("job", ["ensemble.py", "embed.py", "export_onnx.py"])
def test_a_checkpoint_missing_or_damaged_is_refused_before_ray_or_the_first_model(monkeypatch, tmp_path, damage,
                                                                                   job):
    from ray_landmark.runs.checkpoint import STATE_FILE

    good = _fake_checkpoint(tmp_path / "good" / "checkpoint_1")
    bad = tmp_path / "second"
    if damage != "missing":
        folder = _fake_checkpoint((bad / "checkpoint_1") if damage.startswith("run folder") else bad)
        (folder / STATE_FILE).write_bytes((folder / STATE_FILE).read_bytes()[:100])
    out = tmp_path / "out"
    if job == "ensemble.py":
        config = tmp_path / "ensemble.yaml"
        config.write_text(f"name: e\noutput_dir: {out}\nmodels:\n"
                          f"  - {{name: first, checkpoint: {good.parent}, family: dolg}}\n"
                          f"  - {{name: second, checkpoint: {bad}, family: efficientnet}}\n")
        args = ["--config", str(config)]
    elif job == "embed.py":
        args = ["--checkpoint", str(bad), "--split", "test", "--out", str(out)]
    else:
        args = ["--checkpoint", str(bad), "--out", str(out)]
    error = job_error(monkeypatch, job, *args)
    prefix = "error: models[second].checkpoint: " if job == "ensemble.py" else "error: "
    expected = {
        "missing": f"{bad}: no such checkpoint or run folder",
        "damaged checkpoint folder": f"checkpoint {bad}: state.pt has 100 bytes, not the ",
        "run folder without a good checkpoint": f"{bad}: neither a checkpoint folder (state.pt) nor a run with a "
                                                f"complete checkpoint",
    }[damage]
    assert error.startswith(prefix + expected), error
    assert not out.exists()  # nothing embedded, exported or written


def test_an_error_in_a_ray_actors_init_reaches_the_user_as_its_one_line(ray_session):
    from ray_landmark.runs.checkpoint import CorruptCheckpoint

    message = "checkpoint /runs/x/checkpoint_1: its weights do not fit the model its config.json describes"

    @ray.remote
    class LoadsAModel:  # as a Ray Data map worker's __init__ loads the checkpoint
        def __init__(self):
            raise CorruptCheckpoint(message)

        def ready(self):
            return True

    with pytest.raises(ray.exceptions.ActorDiedError) as died:
        ray.get(LoadsAModel.remote().ready.remote())
    found = user_error(died.value)
    assert isinstance(found, CorruptCheckpoint) and str(found) == message


@pytest.mark.slow
def test_embedding_a_guard_left_by_a_failed_run_never_blocks_the_rerun_and_a_model_that_cannot_load_is_one_line(
    monkeypatch, tiny_checkpoints, tmp_path
):
    import json
    import shutil

    from ray_landmark.runs.checkpoint import CONFIG_FILE, META_FILE, latest_checkpoint
    from ray_landmark.data.storage import resolve

    good = latest_checkpoint(resolve(tiny_checkpoints["dolg"])).folder.path
    # A copy whose config describes another model than its weights (and whose meta.json records the new size): it
    # verifies, so only the embedding actors' __init__, loading the model, finds out.
    unfit = tmp_path / "unfit"
    shutil.copytree(good, unfit)
    config = json.loads((unfit / CONFIG_FILE).read_text())
    config["model"]["embedding_dim"] = config["model"].get("embedding_dim", 512) // 2
    (unfit / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    meta = json.loads((unfit / META_FILE).read_text())
    meta["sizes"][CONFIG_FILE] = (unfit / CONFIG_FILE).stat().st_size
    (unfit / META_FILE).write_text(json.dumps(meta))
    out = tmp_path / "embeddings"
    embed = ["--split", "test", "--out", str(out), "--batch-size", "16"]

    error = job_error(monkeypatch, "embed.py", "--checkpoint", str(unfit), *embed)
    assert error.startswith(f"error: checkpoint {unfit}: its weights do not fit the model its config.json "
                            f"describes"), error
    assert (out / "test" / "_embedding.json").exists() and not list(out.glob("test/*.parquet"))

    # The same folder with the right checkpoint: the failed run's guard guards no embedding, and is replaced.
    monkeypatch.setattr(sys, "argv", ["embed.py", "--checkpoint", good, *embed])
    runpy.run_path(str(REPO / "jobs" / "embed.py"), run_name="__main__")
    assert json.loads((out / "test" / "_embedding.json").read_text())["checkpoint"] == good
    assert list(out.glob("test/*.parquet"))
    # With embeddings beside it, the guard holds: another checkpoint is refused.
    error = job_error(monkeypatch, "embed.py", "--checkpoint", str(unfit), *embed)
    assert error.startswith(f"error: {out / 'test'} holds embeddings of checkpoint={good}"), error


@pytest.mark.slow  # a job process: seconds of imports
def test_a_job_whose_ray_address_nothing_answers_stops_after_the_bounded_wait_naming_it(gldv2_local, tmp_path):
    import os
    import subprocess

    from ray_landmark.local_s3 import free_port

    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_LANDMARK_CONNECT_WAIT_S": "2", "PYTHONPATH": str(REPO)}
    job = subprocess.run([sys.executable, "jobs/train.py", "--config", "configs/tiny_dolg.yaml",
                          "--set", f"data.root={gldv2_local}", "--set", f"run.output_dir={tmp_path / 'runs'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 1 and "[ray]" not in job.stdout, job.stdout[-2000:] + job.stderr[-2000:]
    assert job.stderr.strip().splitlines() == [
        f"error: RAY_ADDRESS={address}: nothing answers there (Connection refused, waited 2 s); start the cluster (ray "
        f"up cluster.yaml, or ray start --head) or point RAY_ADDRESS at its head, or unset it to run on a local Ray"]
