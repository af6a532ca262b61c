"""The quickstart: a synthetic GLDv2 in a local S3 server, streamed through the training pipeline; a tiny DOLG and a
tiny plain EfficientNet trained on it with Ray Train, checkpointing to the same server; then the ensemble of the two:
embeddings, kNN, post-processing, metrics per model and stage, submissions and an HTML report.

It exercises the same code path as a cluster run against real S3: an endpoint URL, credentials from the environment,
tar shards read by Ray Data tasks.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import ray

from ray_landmark.config import Config
from ray_landmark.data.metadata import open_manifest, prepare_manifests
from ray_landmark.data.pipeline import SKIP_REASONS, eval_stream, train_stream
from ray_landmark.data.storage import resolve
from ray_landmark.infer.config import EnsembleConfig
from ray_landmark.infer.ensemble import HEADLINE, metrics_text, run_ensemble
from ray_landmark.data.config import SyntheticSpec
from ray_landmark.data.synthetic import write_synthetic_gldv2
from ray_landmark.local_s3 import LocalS3Server
from ray_landmark.progress import ProgressLine
from ray_landmark.train.checkpoint import run_logs
from ray_landmark.train.metrics_log import read_metrics
from ray_landmark.train.trainer import fit
from ray_landmark.tune.sweep import run_sweep


def prepare_dataset(cfg: Config, server: LocalS3Server) -> dict:
    """Create the bucket named by data.root on the local server and write the synthetic set and its manifests."""
    bucket = cfg.data.root.removeprefix("s3://").split("/", 1)[0]
    server.create_bucket(bucket)
    root = resolve(cfg.data.root, cfg.data.storage)
    summary = write_synthetic_gldv2(cfg.synthetic or SyntheticSpec(), root)
    summary["manifest"] = prepare_manifests(root, resolve(cfg.data.manifest_uri, cfg.data.storage))
    return summary


def stream_epoch(cfg: Config, batch_size: int) -> dict:
    """One epoch of the train pipeline as a training worker sees it, then one pass over the test images."""
    manifest = open_manifest(cfg.data)
    classes = manifest.view_classes(cfg.data.view)
    stream = train_stream(cfg.data, manifest)
    progress = ProgressLine(f"[quickstart] stream epoch 1 ({cfg.data.view})", total=int(classes["count"].sum()))
    per_class = collections.Counter()
    started = time.perf_counter()
    for batch in stream.dataset.iter_torch_batches(batch_size=batch_size, prefetch_batches=cfg.data.prefetch_batches):
        per_class.update(batch["label"].tolist())
        progress.update(len(batch["label"]))
    seconds = time.perf_counter() - started
    progress.close()
    counts = stream.counts()

    test = eval_stream(cfg.data, "test")
    test_images = sum(len(b["id"]) for b in test.dataset.iter_batches(batch_size=batch_size))
    return {
        "view": cfg.data.view,
        "image_size": cfg.data.image_size,
        "train_images_streamed": sum(per_class.values()),
        "train_images_in_view": int(classes["count"].sum()),
        "classes_streamed": len(per_class),
        "classes_in_view": len(classes),
        "images_per_second": round(sum(per_class.values()) / seconds, 1),
        "epoch_seconds": round(seconds, 2),
        "skipped": {r: counts.get(r, 0) for r in SKIP_REASONS},
        "not_in_view": counts.get("not_in_view", 0),
        "test_images_streamed": test_images,
    }


def train(cfg: Config) -> dict:
    """Train with Ray Train; the per-epoch validation history comes back from the run's metrics log."""
    print(f"[quickstart] training {cfg.run.name} ({cfg.model.arch}) with {cfg.train.num_workers} workers; "
          f"checkpoints to {cfg.run.output_dir}")
    result = fit(cfg)
    history = read_metrics(run_logs(cfg.run))
    return {"final_checkpoint": result.checkpoint.path, "history": history}


def run(cfg: Config, second: Config, ensemble: EnsembleConfig, server: LocalS3Server, out_dir: Path,
        sweep: tuple | None = None) -> dict:
    """The whole quickstart; ``second`` is a model of another family, ``ensemble`` combines the two, ``sweep`` (a
    SweepConfig and its base, optional) is run last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"[quickstart] local S3 server at {server.endpoint_url}; writing synthetic GLDv2 to {cfg.data.root}")
    dataset = prepare_dataset(cfg, server)
    print(f"[quickstart] dataset: {dataset['images']} images, {dataset['landmarks']} landmarks")
    epoch = stream_epoch(cfg, cfg.train.batch_size)
    print(
        f"[quickstart] streamed {epoch['train_images_streamed']}/{epoch['train_images_in_view']} train images of "
        f"{epoch['classes_streamed']}/{epoch['classes_in_view']} classes at {epoch['images_per_second']} img/s; "
        f"{epoch['test_images_streamed']} test images; skipped: {epoch['skipped']}"
    )
    training = {c.run.name: train(c) for c in (cfg, second)}
    print(f"[quickstart] ensemble of {', '.join(m.name for m in ensemble.models)}: embeddings, kNN, post-processing")
    scored = run_ensemble(ensemble)
    print(metrics_text(scored["stages"]))
    summary = {
        **{key: scored[key] for key in HEADLINE},  # Private first: the score that counts
        "models": scored["models"],
        "report": scored["report"],
        "ensemble": scored,
        "config": cfg.model_dump(mode="json"),
        "dataset": dataset,
        "stream": epoch,
        "training": training,
        "ray": {"cluster_cpus": ray.cluster_resources().get("CPU")},
    }
    if sweep:
        summary["sweep"] = run_sweep(*sweep)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"[quickstart] report: {scored['report']}")
    print(f"[quickstart] done in {summary['seconds']} s; summary in {out_dir / 'summary.json'}")
    return summary
