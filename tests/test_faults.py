"""The faults a cluster has, made for real: an object store that fails writes in the middle of a checkpoint, and an
embedding job killed in the middle of its shards. Nothing incomplete is ever taken as complete, and a rerun
continues from what was."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fault_proxy import FaultProxy
from ray_landmark.config import config_from_dict, load_config
from ray_landmark.data.config import DataConfig
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.storage import resolve
from ray_landmark.infer.embed import read_ids, split_image_ids
from ray_landmark.runs.checkpoint import STATE_FILE, latest_checkpoint, read_checkpoint_config
from ray_landmark.runs.folders import output_folder
from ray_landmark.train.trainer import fit

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_checkpoint_the_store_fails_to_write_is_never_taken_and_the_rerun_resumes_from_the_one_before(
    s3, ray_session, gldv2_learnable, capsys
):
    bucket = s3.create_bucket("faulty-store")
    with FaultProxy(s3.endpoint_url) as proxy:
        cfg = load_config(REPO / "configs" / "tiny_dolg.yaml", [
            f"data.root={gldv2_learnable}", "data.augment=false", f"run.output_dir={bucket}/runs",
            f"run.storage.endpoint_url={proxy.endpoint_url}", "run.storage.retries=1", "run.name=faulty",
            "train.epochs=2", "train.max_failures=0", "train.cpus_per_worker=0.5",
            # What is checked is which checkpoints count, not what the model learns: small images, a small eval set.
            "data.image_size=32", "data.eval_queries=8", "data.eval_index=16",
        ])
        proxy.fail_writes, proxy.spare = re.escape(STATE_FILE), 1  # epoch 1's checkpoint lands, epoch 2's does not
        with pytest.raises(Exception):
            fit(cfg)
        assert proxy.failed and all(p.endswith(STATE_FILE) for p in proxy.failed)
        run = output_folder(cfg.run)
        lines = []
        latest = latest_checkpoint(run, printer=lines.append)
        assert latest.progress.epoch == 1  # never the half-written epoch-2 checkpoint
        # Its other files may have landed: then it is named and passed over.
        assert all(line.startswith("[checkpoint] WARNING checkpoint s3://faulty-store/runs/faulty/") and
                   f"{STATE_FILE} is missing (an interrupted write); passed over" in line for line in lines), lines

        proxy.fail_writes = None  # the store recovers: the same command resumes after epoch 1
        capsys.readouterr()
        fit(cfg)
        assert "[train] resumed from s3://faulty-store/runs/faulty/" in capsys.readouterr().out
        assert latest_checkpoint(run).progress.epoch == 2


def _embed(checkpoint: str, out: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "jobs/embed.py", "--checkpoint", checkpoint, "--split", "test", "--split", "index",
         "--out", str(out), "--shards-per-pass", "1", "--batch-size", "16"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen,
    )


@pytest.mark.slow
def test_an_embedding_job_killed_between_shards_reruns_only_the_missing_ones_with_exact_rows(tiny_checkpoints,
                                                                                              tmp_path):
    out = tmp_path / "embeddings"
    first = _embed(tiny_checkpoints["dolg"], out, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("*/*.parquet")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started, in the middle of the next shard
    first.wait()
    written = sorted(out.glob("*/*.parquet"))
    assert written, first.stdout.read()[-3000:]

    second = _embed(tiny_checkpoints["dolg"], out)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output[-3000:]
    shards = 3  # the learnable set: 1 test shard and 2 index shards
    assert f"{shards - len(written)} shards to embed" in output, output[-3000:]

    data = config_from_dict(read_checkpoint_config(tiny_checkpoints["dolg"])["data"], "checkpoint", DataConfig)
    manifest = open_manifest(data)
    for split in ("test", "index"):
        ids = read_ids(resolve(str(out / split)))
        assert len(ids) == len(set(ids)) and set(ids) == split_image_ids(manifest, split, "gldv2c"), split


@pytest.mark.slow
def test_ddp_across_two_ray_nodes_survives_a_node_that_dies_mid_epoch_with_exact_step_counts(gldv2_learnable,
                                                                                              tmp_path):
    job = subprocess.run([sys.executable, "tests/two_node_training.py", gldv2_learnable, str(tmp_path / "runs")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    result = json.loads(job.stdout.strip().splitlines()[-1])
    assert result["killed"]
    # One worker on each node: the run was DDP across two Ray nodes, and one of them died under it.
    assert sorted(result["nodes_before"]) == ["rank0", "rank1"]
    assert len(set(result["nodes_before"].values())) == 2 and result["second_node"] in result["nodes_before"].values()
    assert "[train] resumed from " in job.stdout and ": epoch 2, step " in job.stdout, job.stdout[-3000:]
    # Both epochs complete, each exactly once: no step lost or counted twice across the failure.
    assert result["epoch"] == 2 and result["step"] == 2 * result["steps_per_epoch"] > 0
