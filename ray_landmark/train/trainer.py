"""The driver side of training: datasets, the Ray Train TorchTrainer and where its checkpoints live.

Resuming is rerunning: the run is named ``run.name`` under ``run.output_dir``, and Ray Train V2 reloads that run's
checkpoint history when the same name is submitted again.
"""

from __future__ import annotations

import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from ray_landmark.config import Config
from ray_landmark.config_base import ConfigError
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.pipeline import eval_stream, train_stream
from ray_landmark.data.storage import resolve
from ray_landmark.train.loop import train_loop_per_worker


def fit(cfg: Config, on_step=None) -> ray.train.Result:
    """Train ``cfg`` on the Ray cluster this process is connected to. ``on_step(rank=, epoch=, step=)``, when given,
    runs in every worker after each optimizer step (fault-injection tests use it)."""
    return build_trainer(cfg, on_step=on_step).fit()


def build_trainer(cfg: Config, on_step=None, train_dataset: ray.data.Dataset | None = None) -> TorchTrainer:
    """The TorchTrainer of ``cfg``; ``train_dataset`` replaces the streamed shards (the benchmarks feed in-memory
    batches through it)."""
    if cfg.model is None or cfg.train is None:
        raise ConfigError(f"run {cfg.run.name}: training needs the 'model' and 'train' sections")
    tc = cfg.train
    manifest = open_manifest(cfg.data)
    classes = manifest.view_classes(cfg.data.view)
    train = train_stream(cfg.data, manifest)
    test_lookup, index_lookup = manifest.eval_selection(cfg.data.eval_queries, cfg.data.eval_index, cfg.data.seed)
    # Queries and index images in one dataset (labelled EVAL_QUERY / EVAL_INDEX): one split coordinator less.
    evaluation = eval_stream(cfg.data, "test", test_lookup).dataset.union(
        eval_stream(cfg.data, "index", index_lookup).dataset
    )
    datasets = {"train": train_dataset if train_dataset is not None else train.dataset, "eval": evaluation}
    storage = resolve(cfg.run.output_dir, cfg.run.storage)
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "class_counts": classes["count"].tolist(),
            "landmark_ids": classes["landmark_id"].tolist(),
            "train_images": int(classes["count"].sum()),
            "skip_counter": train.counter,
            "on_step": on_step,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
        ),
        datasets=datasets,
    )
