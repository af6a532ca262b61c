"""Sweeps with Ray Tune: every key and value of the space is checked before a trial starts; a 3-trial CPU sweep,
interrupted and resumed, stops weak trials early and writes the table, the plot and a best config that trains."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from ray_landmark.config import load_config
from ray_landmark.errors import ConfigError
from ray_landmark.models.factory import build_model
from ray_landmark.train.trainer import load_training_data
from ray_landmark.tune.config import load_sweep

REPO = Path(__file__).resolve().parents[1]


def _sweep_file(tmp_path, space: str, base_overrides: str = "[]") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: s\nbase: {REPO / 'configs' / 'tiny_dolg.yaml'}\nbase_overrides: {base_overrides}\n"
                    f"output_dir: {tmp_path}\nspace:\n{space}\nsettings: {{epochs: 2}}\n")
    return path


@pytest.mark.parametrize("space, message", [
    ("  loss.scael: {grid: [16, 30]}", r"space key 'loss.scael' is not a value of the base config"),
    ("  loss.scale: {grid: [16, -1]}", r"space 'loss.scale' value -1: key 'loss.scale'"),
    ("  data.image_size: {choice: [64, 0]}", r"space 'data.image_size' value 0"),
    ("  train.lr: {loguniform: [0, 0.1]}", r"loguniform: bounds must be positive"),
    ("  train.lr: {uniform: [0.1, 0.01]}", r"low must be below high"),
    ("  train.lr: {uniform: [0.01, 0.1], choice: [1]}", r"give exactly one of"),
    ("  model.fusion: {grid: [exact, fancy]}", r"space 'model.fusion' value 'fancy'"),
])
def test_a_space_the_base_config_rejects_is_an_error_naming_the_key(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_sweep_file(tmp_path, space))


def test_every_sweep_config_loads_with_its_base():
    for path in sorted(REPO.glob("configs/tune_*.yaml")):
        sweep, base = load_sweep(path)
        assert sweep.space and base.model is not None


def _tune(config: Path, root: str, out: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "jobs/tune.py", "--config", str(config), "--set", f"output_dir={out}",
         "--set-base", f"data.root={root}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


@pytest.mark.slow
def test_a_three_trial_sweep_interrupted_and_rerun_resumes_stops_weak_trials_and_writes_a_trainable_best_config(
    gldv2_learnable, job_env, tmp_path
):
    config, out = REPO / "configs" / "tune_tiny.yaml", tmp_path / "sweeps"
    first = _tune(config, gldv2_learnable, out, job_env)
    lines, done = [], 0
    # Interrupt (Ctrl-C) once two trials are done: the good first one and a weak one, which ASHA stops against it.
    # (Tune does not save ASHA's rungs, so after the resume the last trial is compared only with trials run since.)
    for line in first.stdout:
        lines.append(line)
        done += line.startswith("[tune] ") and (" finished" in line or "stopped early" in line)
        if done == 2:
            first.send_signal(signal.SIGINT)
            break
    first_output = "".join(lines) + first.communicate(timeout=300)[0]
    assert done == 2, first_output[-3000:]  # the first run got as far as two trials
    done_first = {line.split()[1] for line in first_output.splitlines()
                  if line.startswith("[tune] ") and (" finished" in line or "stopped early" in line)}

    second = _tune(config, gldv2_learnable, out, job_env)
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output[-3000:]
    assert "resuming the sweep" in output
    restarted = {line.split()[1] for line in output.splitlines() if line.startswith("[tune] ") and " started" in line}
    assert not restarted & done_first, (restarted, done_first)  # finished trials are not run again

    sweep = out / "tune_tiny"
    table = pd.read_csv(sweep / "trials.csv")
    assert len(table) == 3 and set(table["status"]) <= {"finished", "stopped early"}
    assert (table["status"] == "stopped early").sum() >= 1, first_output[-2000:] + output[-2000:]  # ASHA
    assert (table["epochs"] <= 4).all() and table["best_val_gap"].notna().all()
    assert (sweep / "trials.md").read_text().count("\n") == 2 + 3
    assert (sweep / "metric_vs_params.png").read_bytes().startswith(b"\x89PNG")
    assert not any("Tune" in line and "│" in line for line in output.splitlines())  # no Tune status tables

    best = sweep / "best_config.yaml"
    cfg = load_config(best)
    assert cfg.train.lr == table.iloc[0]["train.lr"] and cfg.loss.margin == table.iloc[0]["loss.margin"]
    # jobs/train.py takes it as it is: its data and model are there to train (the trials trained the same configs;
    # training it once more here would cost a Ray Train start for nothing new).
    data = load_training_data(cfg)
    model = build_model(cfg.model, cfg.loss, len(data.class_counts), cfg.data.image_size, data.class_counts).eval()
    assert model(torch.zeros(2, 3, cfg.data.image_size, cfg.data.image_size))["embeddings"].shape[0] == 2


def test_the_table_records_finished_stopped_and_failed_trials_best_first(tmp_path):
    from types import SimpleNamespace

    from ray_landmark.tune.sweep import trials_table

    sweep, _ = load_sweep(_sweep_file(tmp_path, "  train.lr: {grid: [0.1, 0.2, 0.3]}"))

    def result(trial, lr, maps, error=None):
        history = pd.DataFrame({"epoch": range(1, len(maps) + 1), "val_map100": maps})
        return SimpleNamespace(metrics_dataframe=history if maps else None, error=error, config={"train.lr": lr},
                               metrics={"trial_id": trial} if maps else {}, path=f"/x/run_trial_{trial}")

    table = trials_table([result("a", 0.1, [0.2, 0.3]), result("b", 0.2, [0.4]),
                          result("c", 0.3, [], RuntimeError("crashed"))], sweep)
    assert list(table["trial"]) == ["b", "a", "run_trial_c"]
    assert list(table["status"]) == ["stopped early", "finished", "failed"]
    assert list(table["epochs"]) == [1, 2, 0] and table["best_val_map100"].iloc[:2].tolist() == [0.4, 0.3]


def test_a_sweep_rerun_with_other_values_is_refused_and_a_resumable_change_is_named(tmp_path):
    import json

    from ray_landmark.runs.folders import output_folder
    from ray_landmark.runs.identity import RunConflict
    from ray_landmark.tune.sweep import IDENTITY_FILE, sweep_identity, check_sweep_rerun

    sweep, base = load_sweep(_sweep_file(tmp_path, "  train.lr: {grid: [0.1, 0.2]}"))
    check_sweep_rerun(sweep, base)  # a new sweep: nothing to compare
    folder = Path(output_folder(sweep).path)
    folder.mkdir(parents=True)
    (folder / IDENTITY_FILE).write_text(json.dumps(sweep_identity(sweep, base)))
    lines = []
    check_sweep_rerun(sweep, base, printer=lines.append)
    assert lines == []
    more_at_once, _ = load_sweep(_sweep_file(tmp_path, "  train.lr: {grid: [0.1, 0.2]}"),
                                 ["settings.max_concurrent_trials=2"])
    check_sweep_rerun(more_at_once, base, printer=lines.append)
    assert lines == [f"[run] resuming {folder} with changed settings: sweep.settings.max_concurrent_trials None -> 2"]
    other_space, other_base = load_sweep(_sweep_file(tmp_path, "  train.lr: {grid: [0.1, 0.3]}", "[loss.scale=30]"))
    with pytest.raises(RunConflict, match=r"another config \(base.loss.scale 45.0 -> 30.0, sweep.base_overrides "
                                          r"\[\] -> \['loss.scale=30'\], sweep.space.train.lr.grid \[0.1, 0.2\] -> "
                                          r"\[0.1, 0.3\]\)"):
        check_sweep_rerun(other_space, other_base)


@pytest.mark.slow  # a job process: seconds of imports
def test_a_wrong_data_root_fails_before_ray_starts(tmp_path):
    job = subprocess.run(
        [sys.executable, "jobs/tune.py", "--config", "configs/tune_tiny.yaml", "--set", f"output_dir={tmp_path}",
         "--set-base", f"data.root={tmp_path / 'nowhere'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert job.returncode == 1 and "[ray]" not in job.stdout, job.stdout + job.stderr
    last = job.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "nowhere") in last


@pytest.mark.slow
def test_a_sweep_whose_every_trial_failed_exits_1_listing_them(gldv2_learnable, job_env, tmp_path):
    config = _sweep_file(tmp_path, "  train.lr: {grid: [0.1, 0.2]}",
                         f"[data.root={gldv2_learnable}, train.init_from={tmp_path / 'missing_step'}, "
                         f"train.cpus_per_worker=0.5]")
    job = subprocess.run([sys.executable, "jobs/tune.py", "--config", str(config), "--set", "settings.num_samples=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=job_env)
    assert job.returncode == 1, job.stdout[-3000:] + job.stderr[-3000:]
    last = job.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: sweep s: every trial failed \(\w+, \w+\), the first with: train.init_from: nothing at "
        rf"{tmp_path / 'missing_step'}; train the step before first .*; each trial's error.txt under {tmp_path / 's'} "
        rf"has the whole error, and Tune's log (/\S+/tune_s\.log)", last), last
    # Tune's traceback of each failed trial is in that log, not on the console: one line per failed trial there.
    assert "Traceback" not in job.stdout + job.stderr, job.stdout[-3000:] + job.stderr[-3000:]
    log = re.search(r"Tune's log (/\S+)$", last).group(1)
    assert "Traceback" in open(log).read()
    assert job.stdout.count(" FAILED: ") == 2
    assert (tmp_path / "s" / "trials.csv").read_text().count("failed") == 2
