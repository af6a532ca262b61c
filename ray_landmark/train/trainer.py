"""The driver side of training: what the workers get, the Ray Train TorchTrainer and where its checkpoints live.

Resuming is rerunning: the run is named ``run.name`` under ``run.output_dir``, and the workers continue from the newest
checkpoint of that folder that verifies (``train/loop.py``). Ray Train's own list of the run's checkpoints
(``checkpoint_manager_snapshot.json``) is not used: it cannot know that a checkpoint was damaged after it was reported,
its retention (``CheckpointConfig(num_to_keep)``) would prune good checkpoints while keeping a damaged one, and it
refuses to start when a checkpoint it lists was deleted by ours (``runs/checkpoint.prune_checkpoints``). So Ray keeps
every checkpoint it is given, and its list is dropped before each start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from ray_landmark.config import Config
from ray_landmark.data.metadata import LabelLookup, open_manifest
from ray_landmark.data.pipeline import decodes_in_worker, eval_stream, split_shards, train_stream
from ray_landmark.data.storage import check_writable, exists, resolve
from ray_landmark.errors import ConfigError
from ray_landmark.progress import ConsoleRelay, bookkeeping_actor, interactive, run_printing_relay, say
from ray_landmark.runs.checkpoint import CorruptCheckpoint, latest_checkpoint
from ray_landmark.runs.folders import output_folder, output_parent
from ray_landmark.runs.identity import check_rerun
from ray_landmark.train.eval_split import CompleteEvalSplit
from ray_landmark.train.worker_entry import WorkerInputs, train_loop_per_worker

# Ray Train V2's list of a run's reported checkpoints, in the run folder (Ray 2.60's
# ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME; tests/test_run_identity.py checks it).
RAY_CHECKPOINT_LIST = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class TrainingData:
    """What training needs from the manifest, read on the driver before Ray starts (a wrong URI fails at once)."""

    class_counts: list[int]
    landmark_ids: list[int]
    test_selection: LabelLookup
    index_selection: LabelLookup
    # The view's images in train shards left out (data.missing_shards: skip), where the shard index says which.
    skipped_images: int = 0

    @property
    def train_images(self) -> int:
        return sum(self.class_counts) - self.skipped_images


def load_training_data(cfg: Config, restart: bool = False) -> TrainingData:
    """What the workers need from the manifests; read before Ray starts, so that a wrong data.root, a missing
    train.init_from or a run folder trained with another config (``runs.identity``) fails at once. ``restart``
    moves such a run folder aside instead."""
    if cfg.model is None or cfg.train is None:
        raise ConfigError(f"run {cfg.run.name}: training needs the 'model' and 'train' sections")
    run = output_folder(cfg.run)
    check_writable(run, "run.output_dir")
    latest = latest_checkpoint(run)
    check_rerun(run, latest.config if latest else None, cfg.model_dump(mode="json"), restart=restart)
    if cfg.train.init_from and not exists(resolve(cfg.train.init_from, cfg.run.storage)):
        raise ConfigError(
            f"train.init_from: nothing at {cfg.train.init_from}; train the step before first (jobs/train_chain.py "
            f"runs a whole chain of configs/chains/) or --set train.init_from=null to start from ImageNet weights"
        )
    manifest = open_manifest(cfg.data)
    classes = manifest.view_classes(cfg.data.view)
    test, index = manifest.eval_selection(cfg.data.eval_queries, cfg.data.eval_index, cfg.data.seed)
    # Every shard training and validation read is there and whole, or named now (data.missing_shards).
    shards = {split: split_shards(cfg.data, split) for split in ("train", "test", "index")}
    data = TrainingData(classes["count"].tolist(), classes["landmark_id"].tolist(), test, index,
                        skipped_images=_view_images_in(manifest, cfg.data.view, set(shards["train"].skipped)))
    _check_one_step_fits(cfg, data)
    return data


def _check_one_step_fits(cfg: Config, data: TrainingData) -> None:
    """An epoch whose every worker gets fewer images than one optimizer step takes would train nothing: refused here,
    before Ray Train starts (the loop still fails such an epoch, for the images no manifest can foresee missing)."""
    tc = cfg.train
    per_step = tc.batch_size * tc.grad_accum
    if data.train_images // tc.num_workers < per_step:
        skipped = f", {data.skipped_images:,} more in skipped shards" if data.skipped_images else ""
        raise ConfigError(
            f"train.batch_size: one optimizer step takes {per_step:,} images on each of the {tc.num_workers} "
            f"worker(s) (batch_size x grad_accum), but view {cfg.data.view} of {cfg.data.root} has "
            f"{data.train_images:,} train images{skipped}: lower train.batch_size or train.num_workers")


def _view_images_in(manifest, view: str, shards: set[str]) -> int:
    """How many of the view's images the train ``shards`` hold (0 without a shard index, which would say)."""
    index = manifest.shard_index("train") if shards else None
    if index is None:
        return 0
    ids = index.loc[index["shard"].isin(shards) & (index["name"] == ""), "id"].to_numpy(np.uint64)
    return int(np.isin(manifest.view_images(view)["id"].to_numpy(np.uint64), ids).sum())


def fit(
    cfg: Config, data: TrainingData | None = None, on_step=None, train_dataset: ray.data.Dataset | None = None,
    callbacks: list | None = None, data_cpus: float | None = None,
) -> ray.train.Result:
    """Train ``cfg`` on the Ray cluster this process is connected to, printing the workers' progress here. ``data``
    is ``load_training_data(cfg)``'s (which also checks the run folder's config), read here when not given.
    ``train_dataset`` replaces the streamed shards (the benchmarks feed in-memory batches through it); ``callbacks``
    are Ray Train UserCallbacks (a sweep's TuneReportCallback); ``data_cpus`` caps the CPUs of this run's Ray Data
    tasks (a sweep's concurrent trials)."""
    data = data or load_training_data(cfg)
    forget_ray_checkpoint_list(cfg)
    console = bookkeeping_actor(ConsoleRelay)
    ray.get(console.drain.remote())  # lines a run of this process posted after its end belong to no run now
    trainer = build_trainer(cfg, data, console, on_step=on_step, train_dataset=train_dataset, callbacks=callbacks,
                            data_cpus=data_cpus)
    try:
        return run_printing_relay(trainer.fit, console)
    except KeyboardInterrupt:
        say(f"\n[train] interrupted; rerun the same command to resume from the last checkpoint in "
            f"{output_folder(cfg.run).uri}")
        raise SystemExit(130) from None


def final_checkpoint(cfg: Config) -> str:
    """The URI of the run's newest verified checkpoint, read back from its folder (not Ray's word for it)."""
    run = output_folder(cfg.run)
    check_writable(run, "run.output_dir")
    latest = latest_checkpoint(run)
    if latest is None:
        raise CorruptCheckpoint(f"{run.uri}: training ended but no checkpoint there verifies; rerun the same "
                                f"command to train its last epoch again")
    return latest.folder.uri


def forget_ray_checkpoint_list(cfg: Config) -> None:
    """Delete Ray Train's list of the run's reported checkpoints (see the module's docstring): the workers resume
    from the run folder itself, and Ray starts a new list."""
    snapshot = output_folder(cfg.run).child(RAY_CHECKPOINT_LIST)
    if exists(snapshot):
        snapshot.fs.delete_file(snapshot.path)


def build_trainer(
    cfg: Config, data: TrainingData, console, on_step=None, train_dataset: ray.data.Dataset | None = None,
    callbacks: list | None = None, data_cpus: float | None = None,
) -> TorchTrainer:
    """The TorchTrainer of ``cfg``, its workers posting their lines to ``console`` (a ConsoleRelay); ``fit`` says
    what the other arguments do."""
    tc = cfg.train
    # Decided once, here (WorkerInputs tells the workers): JPEG bytes when they decode them (data.decode), else images.
    worker_decode = decodes_in_worker(cfg.data, tc.use_gpu)
    train = train_stream(cfg.data, worker_decode=worker_decode)
    # Queries and index images in one dataset (rows carry their split): one split coordinator less.
    evaluation = eval_stream(cfg.data, "test", data.test_selection, worker_decode=worker_decode).dataset.union(
        eval_stream(cfg.data, "index", data.index_selection, worker_decode=worker_decode).dataset
    )
    storage = output_parent(cfg.run)
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}
    inputs = WorkerInputs(
        config=cfg, class_counts=data.class_counts, landmark_ids=data.landmark_ids, train_images=data.train_images,
        worker_decode=worker_decode, skip_counter=train.counter, console=console, interactive_console=interactive(),
        on_step=on_step, skipped_shards=train.skipped_shards or {},
        # In-memory batches (train_dataset) carry no train rows: their epochs are not kept exactly once.
        epoch_rows=train.epoch_rows if train_dataset is None else None,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            # Every checkpoint kept by Ray: retention is rank 0's, after each report (train.keep_checkpoints).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            callbacks=callbacks,
        ),
        datasets={"train": train_dataset if train_dataset is not None else train.dataset, "eval": evaluation},
        # This run's datasets only: the process's Ray Data context (shared by the trials a Tune actor runs) stays as
        # it was.
        dataset_config=CompleteEvalSplit(execution_options=ray.data.ExecutionOptions(
            resource_limits=ray.data.ExecutionResources(cpu=data_cpus)) if data_cpus else None),
    )
