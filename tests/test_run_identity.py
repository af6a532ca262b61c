"""Run identity and complete checkpoints: a rerun resumes the same config, resumes with resumable changes saying so,
or refuses a different training in one line (``--restart`` moves the old run aside); only complete, verified
checkpoints count, and each partial or corrupt one is named and passed over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ray_landmark.config import load_config
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.storage import resolve
from ray_landmark.runs.checkpoint import (
    CONFIG_FILE, META_FILE, STATE_FILE, CorruptCheckpoint, Progress, checkpoint_folder, latest_checkpoint,
    prune_checkpoints, read_checkpoint_at, save_checkpoint,
)
from ray_landmark.runs.identity import RunConflict, check_rerun, config_differences
from ray_landmark.train.trainer import load_training_data

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, *overrides):
    return load_config(REPO / "configs" / "tiny_dolg.yaml", [f"run.output_dir={tmp_path / 'runs'}", *overrides])


def _fake_run(run: Path, config: dict, steps=(10, 20)) -> None:
    """A run folder with one small checkpoint per step (Ray Train's folder names are times, not steps)."""
    for n, step in enumerate(steps):
        save_checkpoint(run / f"checkpoint_2026-12-02_00-00-0{n}", state={"w": torch.full((64,), float(step))},
                        config=config, progress=Progress(epoch=step // 10, step=step, epoch_step=0))


def test_config_differences_split_resumable_from_breaking_keys(tmp_path):
    saved = _config(tmp_path).model_dump(mode="json")
    same = _config(tmp_path).model_dump(mode="json")
    assert config_differences(saved, same) == ([], [])
    resumable = _config(tmp_path, "train.epochs=13", "train.num_workers=4", "train.batch_size=8",
                        "train.compile=true").model_dump(mode="json")
    assert config_differences(saved, resumable) == (
        ["train.batch_size", "train.compile", "train.epochs", "train.num_workers"], [])
    breaking = _config(tmp_path, "data.image_size=96", "model.dilations=[2,4,6]", "train.epochs=13")
    assert config_differences(saved, breaking.model_dump(mode="json")) == (
        ["train.epochs"], ["data.image_size", "model.dilations"])


def test_a_rerun_resumes_an_identical_config_silently_and_a_resumable_change_in_one_line(tmp_path, capsys):
    cfg = _config(tmp_path)
    _fake_run(tmp_path / "runs" / cfg.run.name, cfg.model_dump(mode="json"))
    run = resolve(str(tmp_path / "runs" / cfg.run.name))
    lines = []
    check_rerun(run, cfg.model_dump(mode="json"), cfg.model_dump(mode="json"), restart=False, printer=lines.append)
    assert lines == []
    more = _config(tmp_path, "train.epochs=13", "train.num_workers=4").model_dump(mode="json")
    check_rerun(run, cfg.model_dump(mode="json"), more, restart=False, printer=lines.append)
    assert lines == [f"[run] resuming {run.uri} with changed settings: train.epochs 2 -> 13, "
                     f"train.num_workers 1 -> 4"]


@pytest.mark.slow  # a job process: seconds of imports
def test_a_breaking_change_is_refused_before_ray_starts_and_restart_moves_the_run_aside(gldv2_local, tmp_path):
    cfg = _config(tmp_path, f"data.root={gldv2_local}")
    run = tmp_path / "runs" / cfg.run.name
    _fake_run(run, cfg.model_dump(mode="json"))
    changed = [f"data.root={gldv2_local}", "data.image_size=96", "model.dilations=[2,4,6]", "train.epochs=13"]
    with pytest.raises(RunConflict, match=(
            r"was made with another config \(data.image_size 64 -> 96, model.dilations \[1, 2, 3\] -> "
            r"\[2, 4, 6\]\); resuming it would mix two configs: choose a new run.name, or pass --restart")):
        load_training_data(_config(tmp_path, *changed))
    assert latest_checkpoint(resolve(str(run))).progress.step == 20  # untouched

    # The job: one line, exit 1, before Ray starts; nothing written.
    job = subprocess.run(
        [sys.executable, "jobs/train.py", "--config", "configs/tiny_dolg.yaml",
         f"--set=run.output_dir={tmp_path / 'runs'}", *(f"--set={o}" for o in changed)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert job.returncode == 1 and job.stderr.strip().splitlines()[-1].startswith(f"error: {run} was made with "
                                                                                  f"another config"), job.stderr
    assert "[ray]" not in job.stdout
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [cfg.run.name]

    lines = []
    check_rerun(resolve(str(run)), cfg.model_dump(mode="json"), _config(tmp_path, *changed).model_dump(mode="json"),
                restart=True, printer=lines.append)
    aside = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(f"{cfg.run.name}.replaced-")]
    assert len(aside) == 1 and not run.exists()
    assert lines == [f"[run] --restart: {run} moved to {aside[0]}; starting afresh"]
    assert latest_checkpoint(resolve(str(aside[0]))).progress.step == 20  # moved, never deleted


def test_restart_moves_a_run_aside_in_a_bucket_too(s3, tmp_path):
    storage = StorageConfig(endpoint_url=s3.endpoint_url)
    bucket = s3.create_bucket("identity-restart")
    local = tmp_path / "run"
    _fake_run(local, {"model": {"arch": "dolg"}})
    run = resolve(f"{bucket}/runs/r1", storage)
    import pyarrow.fs as pafs
    pafs.copy_files(str(local), run.path, destination_filesystem=run.fs)
    check_rerun(run, {"model": {"arch": "dolg"}}, {"model": {"arch": "hybrid_swin"}}, restart=True,
                printer=lambda line: None)
    assert latest_checkpoint(run) is None
    moved = [i.path for i in run.fs.get_file_info(pafs.FileSelector(f"{run.path.rsplit('/', 1)[0]}"))]
    assert len(moved) == 1 and moved[0].rsplit("/", 1)[1].startswith("r1.replaced-")
    assert latest_checkpoint(resolve(f"s3://{moved[0]}", storage)).progress.step == 20


@pytest.mark.parametrize("damage", ["truncated state", "truncated meta", "missing meta", "missing state",
                                    "altered state"])
def test_the_newest_complete_verified_checkpoint_is_chosen_and_a_damaged_one_is_named(tmp_path, damage):
    run = tmp_path / "run"
    _fake_run(run, {"run": {"name": "r"}})
    newest = run / "checkpoint_2026-12-02_00-00-01"
    state = newest / STATE_FILE
    if damage == "truncated state":
        state.write_bytes(state.read_bytes()[:100])
    elif damage == "truncated meta":
        (newest / META_FILE).write_text((newest / META_FILE).read_text()[:30])
    elif damage == "missing meta":
        (newest / META_FILE).unlink()
    elif damage == "missing state":
        state.unlink()
    else:
        data = bytearray(state.read_bytes())
        data[-10] ^= 0xFF
        state.write_bytes(bytes(data))
    lines = []
    latest = latest_checkpoint(resolve(str(run)), printer=lines.append)
    assert latest.progress.step == 10 and latest.folder.path.endswith("00-00-00")
    if damage == "missing meta":  # never a checkpoint: meta.json is what marks one
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"[checkpoint] WARNING checkpoint {newest}: ")
        assert lines[0].endswith("; passed over")
    # Every consumer goes through it: a run folder's checkpoint, its weights, its config.
    assert checkpoint_folder(str(run), printer=lambda line: None).path == latest.folder.path
    assert read_checkpoint_at(str(run)).state["w"][0].item() == 10.0


def test_a_run_with_only_damaged_checkpoints_is_an_error_naming_it(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, {}, steps=(10,))
    (run / "checkpoint_2026-12-02_00-00-00" / CONFIG_FILE).write_text("{")
    meta = json.loads((run / "checkpoint_2026-12-02_00-00-00" / META_FILE).read_text())
    assert meta["sizes"][CONFIG_FILE] > 1  # the size check catches the truncated config first
    with pytest.raises(CorruptCheckpoint, match=f"{run}: neither a checkpoint folder .* nor a run with a complete"):
        checkpoint_folder(str(run), printer=lambda line: None)


@pytest.mark.parametrize("damage", ["truncated state", "altered state", "truncated meta", "no meta",
                                    "a store that fails reads"])
def test_retention_keeps_verified_checkpoints_and_never_a_damaged_one_in_their_place(tmp_path, damage, request):
    """train.keep_checkpoints=2 with the newest checkpoint damaged (a resume passed over it, then wrote nothing newer):
    the two good ones are kept, the damaged one is named and deleted, never counted; one the store would not read is
    neither counted nor deleted."""
    local = tmp_path / "run"
    _fake_run(local, {}, steps=(10, 20, 30))
    newest = local / "checkpoint_2026-12-02_00-00-02"
    run = resolve(str(local))
    if damage == "truncated state":
        (newest / STATE_FILE).write_bytes((newest / STATE_FILE).read_bytes()[:100])
    elif damage == "altered state":
        data = bytearray((newest / STATE_FILE).read_bytes())
        data[-10] ^= 0xFF
        (newest / STATE_FILE).write_bytes(bytes(data))
    elif damage == "truncated meta":
        (newest / META_FILE).write_text((newest / META_FILE).read_text()[:30])
    elif damage == "no meta":
        (newest / META_FILE).unlink()
    if damage == "a store that fails reads":
        import pyarrow.fs as pafs

        from fault_proxy import FaultProxy

        s3 = request.getfixturevalue("s3")
        bucket = s3.create_bucket("retention")
        with FaultProxy(s3.endpoint_url) as proxy:
            run = resolve(f"{bucket}/run", StorageConfig(endpoint_url=proxy.endpoint_url, retries=1))
            pafs.copy_files(str(local), run.path, destination_filesystem=run.fs)
            proxy.fail_reads = r"00-00-02/state\.pt"
            lines = []
            pruned = prune_checkpoints(run, keep=2, printer=lines.append)
        newest_uri = run.child(newest.name).uri
        assert len(lines) == 1 and lines[0].startswith(f"[checkpoint] WARNING checkpoint {newest_uri}: could not be "
                                                        f"read (") and lines[0].endswith("; not counted, kept")
        assert pruned.deleted_damaged == [] and pruned.deleted_old == []
        assert run.fs.get_file_info(run.child(newest.name, STATE_FILE).path).is_file  # the store may answer later
    else:
        lines = []
        pruned = prune_checkpoints(run, keep=2, printer=lines.append)
        newest_uri = str(newest)
        assert pruned.deleted_damaged == [newest_uri] and pruned.deleted_old == [] and not newest.exists()
        assert len(lines) == 1 and lines[0].startswith(f"[checkpoint] WARNING checkpoint {newest_uri}: ")
        assert lines[0].endswith("; deleted (damaged; the run keeps its newest verified checkpoints)")
    assert pruned.kept == [run.child(f"checkpoint_2026-12-02_00-00-0{n}").uri for n in (1, 0)]
    assert latest_checkpoint(run, printer=lambda line: None).progress.step == 20


def test_retention_of_every_epoch_end_counts_only_mid_epoch_checkpoints_and_never_a_damaged_one(tmp_path):
    """train.keep_epoch_checkpoints with keep_checkpoints=2: every epoch-end checkpoint stays, the two newest verified
    mid-epoch ones stay, older mid-epoch ones go; a damaged one is deleted and never counted. Epoch-end checkpoints
    older than the newest one that verifies are not read again (each was verified while it was the newest)."""
    run = tmp_path / "run"
    # (step, epoch_step), 10 steps an epoch: epoch ends at 10, 20 and 30, mid-epoch checkpoints between them.
    steps = [(10, 0), (15, 5), (20, 0), (25, 5), (27, 7), (30, 0), (35, 5), (37, 7)]
    names = [f"checkpoint_2026-12-02_00-00-0{n}" for n in range(len(steps))]
    for name, (step, epoch_step) in zip(names, steps):
        save_checkpoint(run / name, state={"w": torch.full((64,), float(step))}, config={},
                        progress=Progress(epoch=step // 10, step=step, epoch_step=epoch_step))
    for step in (37, 30, 10):  # the newest mid-epoch one, the newest epoch-end one, the oldest epoch-end one
        state = run / names[[s for s, _ in steps].index(step)] / STATE_FILE
        state.write_bytes(b"\0" * state.stat().st_size)  # the same size, other bytes

    lines = []
    pruned = prune_checkpoints(resolve(str(run)), keep=2, printer=lines.append, every_epoch_end=True)

    uri = {step: str(run / name) for (step, _), name in zip(steps, names)}
    assert pruned.kept == [uri[35], uri[27], uri[20], uri[10]]
    assert pruned.deleted_damaged == sorted([uri[37], uri[30]]) and pruned.deleted_old == [uri[25], uri[15]]
    assert len(lines) == 2 and all(line.endswith("; deleted (damaged; the run keeps its newest verified checkpoints)")
                                   for line in lines)
    assert sorted(p.name for p in run.iterdir()) == sorted(Path(p).name for p in pruned.kept)


def test_retention_deletes_good_checkpoints_only_beyond_the_newest_kept(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, {}, steps=(10, 20, 30))
    pruned = prune_checkpoints(resolve(str(run)), keep=2, printer=pytest.fail)
    assert [Path(p).name for p in pruned.kept] == ["checkpoint_2026-12-02_00-00-02", "checkpoint_2026-12-02_00-00-01"]
    assert pruned.deleted_old == [str(run / "checkpoint_2026-12-02_00-00-00")] and pruned.deleted_damaged == []
    assert sorted(p.name for p in run.iterdir()) == [Path(p).name for p in reversed(pruned.kept)]
    # Nothing verifies: nothing is deleted.
    for folder in run.iterdir():
        (folder / STATE_FILE).write_bytes(b"")
    assert prune_checkpoints(resolve(str(run)), keep=2, printer=lambda line: None).kept == []
    assert len(list(run.iterdir())) == 2


def test_the_file_the_trainer_drops_is_ray_trains_checkpoint_list():
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from ray_landmark.train.trainer import RAY_CHECKPOINT_LIST

    assert RAY_CHECKPOINT_LIST == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
