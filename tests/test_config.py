"""Config loading: every mistake names the key and the file, before anything is started."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_landmark.config import load_config
from ray_landmark.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GOOD = """
run: {name: t}
data:
  root: /tmp/gldv2
  image_size: 64
"""

TRAIN = "train: {epochs: 1, batch_size: 2, lr: 0.1}\n"


def _write(tmp_path, text) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_a_good_config_loads_with_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.data.image_size == 64 and cfg.data.view == "gldv2c"
    assert cfg.data.manifest_uri == "/tmp/gldv2/manifest"


def test_overrides_set_single_values_parsed_as_yaml(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), ["data.image_size=448", "data.storage.anonymous=true", "data.view=full"])
    assert cfg.data.image_size == 448 and cfg.data.storage.anonymous is True and cfg.data.view == "full"


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        (GOOD + "  image_sise: 3\n", [], r"cfg.yaml: unknown key 'data.image_sise'"),
        (GOOD, ["data.image_size=big"], r"cfg.yaml: key 'data.image_size': .*integer.*'big'"),
        (GOOD, ["data.view=gldv3"], r"cfg.yaml: key 'data.view'"),
        ("run: {name: t}\ndata: {image_size: 3}\n", [], r"cfg.yaml: missing required key 'data.root'"),
        (GOOD, ["data.image_size=0"], r"key 'data.image_size': .*greater than 0"),
        # One line naming the key, as every mistake.
        (GOOD + TRAIN, ["train.checkpoint_every_minutes=0"],
         r"^[^\n]*cfg.yaml: key 'train.checkpoint_every_minutes': [^\n]*greater than 0 \(got 0\)$"),
        (GOOD + TRAIN, ["train.checkpoint_every_minutes=-5"], r"key 'train.checkpoint_every_minutes': .*than 0"),
        (GOOD, ["data.root.x=1"], r"--set data.root.x: 'root' is a value"),
        (GOOD, ["data.image_size"], r"expected KEY=VALUE"),
        ("- a\n- b\n", [], r"the top level must be a mapping"),
    ],
)
def test_mistakes_name_the_key_and_the_file(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), overrides)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_job_with_a_bad_config_stops_before_starting_ray(tmp_path):
    bad = _write(tmp_path, GOOD + "  shufle_buffer: 3\n")
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "jobs/quickstart.py", "--config", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert f"config error: {bad}: unknown key 'data.shufle_buffer'" in proc.stderr
    assert "Ray" not in proc.stdout and "Ray" not in proc.stderr.replace("Ray Data", "")
    assert time.perf_counter() - started < 60


@pytest.mark.slow  # a job process: seconds of imports
def test_a_training_job_without_a_manifest_fails_at_once_before_starting_ray(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--config", "configs/tiny_dolg.yaml", "--set", f"data.root={tmp_path}"],
        cwd=REPO, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - started
    assert proc.returncode != 0
    assert f"error: {tmp_path}/manifest: no complete manifest there (summary.json missing" in proc.stderr
    assert "jobs/prepare_gldv2.py" in proc.stderr and "try" not in proc.stderr  # no retries of a missing file
    assert "Ray" not in proc.stdout
    assert seconds < 30, seconds  # the Python imports; the check itself reads one file


def test_every_ensemble_config_loads():
    from ray_landmark.infer.config import EnsembleConfig

    configs = sorted((REPO / "configs" / "ensemble").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"quickstart", "gldv2_2021"}
    for path in configs:
        cfg = load_config(path, cls=EnsembleConfig)
        assert {m.family for m in cfg.models} and all("recognition" in m.tasks or "retrieval" in m.tasks
                                                     for m in cfg.models)


@pytest.mark.parametrize("tree, message", [
    ({"models": []}, "models"),
    ({"models": [{"name": "a", "checkpoint": "x", "family": "f"}] * 2}, r"the names \['a'\] appear more than once"),
    ({"models": [{"name": "a", "checkpoint": "x", "family": "f", "tasks": ["recognition"]}]},
     "no model is used for retrieval"),
    ({"models": [{"name": "a", "checkpoint": "x", "family": "f"}], "recognition": {"nonlandmark": {"source": "ids"}}},
     "a CSV URI is required"),
    ({"models": [{"name": "a", "checkpoint": "x", "family": "f"}], "retrieval": {"qe": {"k": 0}}}, r"retrieval\.qe\.k"),
    ({"models": [{"name": "a", "checkpoint": "x", "family": "f"}], "retrieval": {"dba": {"alpha": -1}}},
     r"retrieval\.dba\.alpha"),
    ({"models": [{"name": "a", "checkpoint": "x", "family": "f"}], "retrieval": {"labels": "both"}},
     r"retrieval\.labels"),
])
def test_ensemble_config_mistakes_are_named(tree, message):
    from ray_landmark.config import config_from_dict
    from ray_landmark.infer.config import EnsembleConfig

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"name": "e", "output_dir": "/tmp/e", **tree}, "e.yaml", EnsembleConfig)
