"""Run by tests/test_faults.py in a process of its own (a Ray cluster of its own): a preemption drill. DDP across two
Ray nodes on this machine, one worker on each, trains one epoch; three times during it, at steps drawn at random, each
after at least one mid-epoch checkpoint, the second node is removed (as a spot node is reclaimed) and a replacement
joins (as the autoscaler would start one). Ray Train restarts the worker group each time and the loop resumes from the
newest checkpoint, streaming only the images that checkpoint had not trained.

    python tests/preemption_drill.py DATA_ROOT OUT_DIR SEED
Prints one JSON line: the nodes the workers ran on first, the steps at which nodes were removed, the final
checkpoint's progress, the epoch's metrics, and the train rows of every optimizer step of the trained epoch, as the
workers reported them (a step redone after a resume replaces what its first try reported).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import ray
from ray.cluster_utils import Cluster

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray_landmark.config import load_config  # noqa: E402
from ray_landmark.runs.checkpoint import latest_checkpoint  # noqa: E402
from ray_landmark.runs.folders import output_folder  # noqa: E402
from ray_landmark.runtime import init_ray  # noqa: E402
from ray_landmark.train.trainer import fit, load_training_data  # noqa: E402

NODE_CPUS = 4
REMOVALS = 3


class RecordSteps:
    """In each worker, after each optimizer step: record its node and the step's rows (a file per rank and step, so
    that a redone step replaces its first try); on rank 0 at each of the ``stops``, once, leave a marker and wait there
    for the driver to remove the second node, so that the moment is exactly that step."""

    def __init__(self, folder: str, stops: list[int]):
        self.folder, self.stops = folder, stops

    def __call__(self, rank: int, epoch: int, step: int, rows=None) -> None:
        import ray
        import ray.train

        folder = Path(self.folder)
        node = folder / f"rank{rank}.node"
        if not node.exists():
            node.write_text(ray.get_runtime_context().get_node_id())
        np.save(folder / f"rows-rank{rank}-step{step}.npy", rows)
        marker = folder / f"stop-{step}"
        if rank == 0 and step in self.stops and not marker.exists():
            # The checkpoint of step - 1 is the newest: held by Ray Train (this waits for it) and in the run folder.
            ray.train.get_all_reported_checkpoints()
            marker.touch()
            time.sleep(120)  # the node's removal ends the worker group, this worker with it


def main(data_root: str, out: str, seed: str) -> None:
    # Four logical CPUs a node and 2.5 a training worker: one worker fits on each node, and six of Ray Data's
    # 0.25-CPU read and decode tasks fit beside it (two would make the data the bottleneck).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    try:
        run(cluster, data_root, out, int(seed))
    finally:
        ray.shutdown()  # the driver leaves before its head node goes
        cluster.shutdown()


def run(cluster: Cluster, data_root: str, out: str, seed: int) -> None:
    second = cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    init_ray()
    markers = Path(out) / "markers"
    markers.mkdir(parents=True)
    cfg = load_config(REPO / "configs" / "tiny_dolg.yaml", [
        f"data.root={data_root}", "data.augment=false", f"run.output_dir={out}", "run.name=drill",
        "train.epochs=1", "train.num_workers=2", "train.cpus_per_worker=2.5", f"train.max_failures={REMOVALS}",
        "train.batch_size=8", "train.checkpoint_every_steps=1", "train.keep_checkpoints=2",
        "data.read_cpus=0.25", "data.decode_cpus=0.25",
        # What is checked is where the workers ran, the steps and the images, not what they learn: small images, and
        # validation on a small eval set.
        "data.image_size=32", "data.eval_queries=8", "data.eval_index=16",
    ])
    data = load_training_data(cfg)
    steps = data.train_images // 2 // 8
    # Three steps of the epoch, none the first (a checkpoint comes before each) nor the last (the epoch must resume).
    stops = sorted(random.Random(seed).sample(range(2, steps), REMOVALS))
    # Training runs in a thread: the main thread changes the cluster (Ray registers a node's signal handlers there).
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = fit(cfg, data, on_step=RecordSteps(str(markers), stops))
        except BaseException as err:  # reported below, in the main thread
            outcome["error"] = err

    trainer = threading.Thread(target=train)
    trainer.start()
    first_second, nodes_before, removed_at = second.node_id, {}, []
    for stop in stops:
        while not (markers / f"stop-{stop}").exists() and trainer.is_alive():
            time.sleep(0.05)
        if not trainer.is_alive():
            break
        nodes_before = nodes_before or {p.stem: p.read_text() for p in markers.glob("rank*.node")}
        cluster.remove_node(second)
        second = cluster.add_node(num_cpus=NODE_CPUS)
        removed_at.append(stop)
    trainer.join()
    if "error" in outcome:
        raise outcome["error"]
    latest = latest_checkpoint(output_folder(cfg.run))
    rows = {f.stem.removeprefix("rows-"): np.load(f).tolist() for f in markers.glob("rows-*.npy")}
    print(json.dumps({"nodes_before": nodes_before, "second_node": first_second,
                      "stops": stops, "removed_at": removed_at, "train_images": data.train_images,
                      "epoch": latest.progress.epoch, "step": latest.progress.step,
                      "steps_per_epoch": latest.progress.steps_per_epoch, "metrics": outcome["result"].metrics,
                      "rows": rows}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
