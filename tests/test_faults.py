"""The faults a cluster has, made for real: an object store that fails writes in the middle of a checkpoint, and an
embedding job killed in the middle of its shards. Nothing incomplete is ever taken as complete, and a rerun
continues from what was."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
                                                                                              job_env, tmp_path):
    out = tmp_path / "embeddings"
    first = _embed(tiny_checkpoints["dolg"], out, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("*/*.parquet")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray it started, in the middle of the next shard
    first.wait()
    written = sorted(out.glob("*/*.parquet"))
    assert written, first.stdout.read()[-3000:]

    second = _embed(tiny_checkpoints["dolg"], out, env=job_env)  # joining the session's Ray: the first's is gone
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
def test_a_preemption_drill_three_nodes_lost_in_one_epoch_trains_every_image_exactly_once(gldv2_learnable, tmp_path):
    seed = random.randrange(10**6)  # the steps at which nodes go: named in every failure message
    job = subprocess.run([sys.executable, "tests/preemption_drill.py", gldv2_learnable, str(tmp_path / "runs"),
                          str(seed)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, f"seed {seed}\n" + job.stdout[-3000:] + job.stderr[-3000:]
    result = json.loads(job.stdout.strip().splitlines()[-1])
    log = f"seed {seed}, nodes removed at steps {result['stops']}\n{job.stdout[-3000:]}"
    assert result["removed_at"] == result["stops"] and len(result["stops"]) == 3, log
    # One worker on each node: the run was DDP across two Ray nodes, and the second went under it three times.
    assert sorted(result["nodes_before"]) == ["rank0", "rank1"], log
    assert len(set(result["nodes_before"].values())) == 2, log
    assert result["second_node"] in result["nodes_before"].values(), log
    assert job.stdout.count("[train] resumed from ") == 3 and job.stdout.count(" were trained before ") == 3, log
    # The epoch ended at exactly its number of optimizer steps: none lost or taken twice across the failures.
    steps = result["train_images"] // 2 // 8
    assert result["epoch"] == 1 and result["step"] == result["steps_per_epoch"] == steps > result["stops"][-1], log
    # Every step of each rank, as finally trained (a step redone after a resume replaced its first try), took 8
    # images, and no image twice: each image of the view once, apart from those the epoch left over, counted.
    rows = result["rows"]
    assert sorted(rows) == sorted(f"rank{r}-step{s}" for r in (0, 1) for s in range(1, steps + 1)), log
    trained = np.concatenate([np.asarray(r, np.int64) for r in rows.values()])
    assert all(len(r) == 8 for r in rows.values()) and len(np.unique(trained)) == len(trained) == 2 * steps * 8, log
    data = DataConfig(root=gldv2_learnable)
    manifest = open_manifest(data)
    view = manifest.label_lookup(data.view).rows_of(manifest.view_images(data.view)["id"].to_numpy(np.uint64))
    assert np.isin(trained, view).all() and len(view) == result["train_images"], log
    metrics = result["metrics"]
    assert metrics["images_trained"] == len(trained) and metrics["images_trained_twice"] == 0, log
    assert metrics["images_not_trained"] == len(view) - len(trained) == len(view) % (2 * 8), log
