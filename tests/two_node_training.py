"""Run by tests/test_faults.py in a process of its own (a Ray cluster of its own): DDP across two Ray nodes on this
machine, one worker on each, and the second node dies in the middle of the second epoch. A replacement node joins, as
an autoscaler would start one, and Ray Train continues from the epoch-1 checkpoint.

    python tests/two_node_training.py DATA_ROOT OUT_DIR
Prints one JSON line: the nodes the workers ran on before the failure, the final checkpoint's progress.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ray_landmark.config import load_config  # noqa: E402
from ray_landmark.runs.checkpoint import latest_checkpoint  # noqa: E402
from ray_landmark.runs.folders import output_folder  # noqa: E402
from ray_landmark.runtime import init_ray  # noqa: E402
from ray_landmark.train.trainer import fit  # noqa: E402

NODE_CPUS = 4


class MarkEpoch2:
    """In each worker: record its node, and once the second epoch is under way, leave a marker for the driver."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, rank: int, epoch: int, step: int, rows=None) -> None:
        import ray
        import ray.train

        node = Path(self.folder) / f"rank{rank}.node"
        if not node.exists():
            node.write_text(ray.get_runtime_context().get_node_id())
        marker = Path(self.folder) / "epoch2"
        if epoch == 1 and not marker.exists():
            # Only once Ray Train holds the epoch-1 checkpoint (this waits for it): a node lost before that would
            # restart the run from scratch, not resume it.
            ray.train.get_all_reported_checkpoints()
            marker.touch()


def main(data_root: str, out: str) -> None:
    # Four logical CPUs a node and 2.5 a training worker: one worker fits on each node, and six of Ray Data's
    # 0.25-CPU read and decode tasks fit beside it (two would make the data the bottleneck).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    try:
        run(cluster, data_root, out)
    finally:
        ray.shutdown()  # the driver leaves before its head node goes
        cluster.shutdown()


def run(cluster: Cluster, data_root: str, out: str) -> None:
    second = cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    init_ray()
    markers = Path(out) / "markers"
    markers.mkdir(parents=True)
    cfg = load_config(REPO / "configs" / "tiny_dolg.yaml", [
        f"data.root={data_root}", "data.augment=false", f"run.output_dir={out}", "run.name=two_nodes",
        "train.epochs=2", "train.num_workers=2", "train.cpus_per_worker=2.5", "train.max_failures=2",
        "data.read_cpus=0.25", "data.decode_cpus=0.25",
        # What is checked is where the workers ran and the step counts, not what they learn: small images, and
        # validation (on a small eval set) only where the last epoch must have it.
        "data.image_size=32", "data.eval_queries=8", "data.eval_index=16", "train.eval_every=2",
    ])
    # Training runs in a thread: the main thread changes the cluster (Ray registers a node's signal handlers there).
    outcome: dict = {}

    def train() -> None:
        try:
            fit(cfg, on_step=MarkEpoch2(str(markers)))
        except BaseException as err:  # reported below, in the main thread
            outcome["error"] = err

    trainer = threading.Thread(target=train)
    trainer.start()
    while not (markers / "epoch2").exists() and trainer.is_alive():
        time.sleep(0.05)
    nodes_before = {p.stem: p.read_text() for p in markers.glob("rank*.node")}
    killed = trainer.is_alive()
    if killed:
        cluster.remove_node(second)
        cluster.add_node(num_cpus=NODE_CPUS)
    trainer.join()
    if "error" in outcome:
        raise outcome["error"]
    latest = latest_checkpoint(output_folder(cfg.run))
    print(json.dumps({"nodes_before": nodes_before, "second_node": second.node_id, "killed": killed,
                      "epoch": latest.progress.epoch, "step": latest.progress.step,
                      "steps_per_epoch": latest.progress.steps_per_epoch}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
