"""The quickstart: a synthetic GLDv2 in a local S3 server, streamed through the training pipeline, then a tiny DOLG
trained on it with Ray Train, checkpointing to the same server.

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
from ray_landmark.data.synthetic import SyntheticSpec, write_synthetic_gldv2
from ray_landmark.local_s3 import LocalS3Server
from ray_landmark.progress import ProgressLine
from ray_landmark.train.metrics_log import read_metrics
from ray_landmark.train.trainer import fit


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
    progress = ProgressLine(f"epoch 1 ({cfg.data.view})", total=int(classes["count"].sum()), every_s=2)
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
    print(f"[quickstart] training {cfg.model.arch} with {cfg.train.num_workers} workers; checkpoints to {cfg.run.output_dir}")
    result = fit(cfg)
    history = read_metrics(resolve(cfg.run.output_dir, cfg.run.storage).child(cfg.run.name, "logs"))
    for m in history:
        print(f"[quickstart] epoch {m['epoch']}: val GAP {m.get('val_gap', float('nan')):.3f}, "
              f"val mAP@100 {m.get('val_map100', float('nan')):.3f}" + (f", loss {m['loss']:.3f}" if "loss" in m else ""))
    return {"final_checkpoint": result.checkpoint.path, "history": history}


def run(cfg: Config, server: LocalS3Server, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"[quickstart] local S3 server at {server.endpoint_url}; writing synthetic GLDv2 to {cfg.data.root}")
    dataset = prepare_dataset(cfg, server)
    print(f"[quickstart] dataset: {dataset['images']} images, {dataset['landmarks']} landmarks")
    batch_size = cfg.train.batch_size if cfg.train else 32
    epoch = stream_epoch(cfg, batch_size)
    print(
        f"[quickstart] streamed {epoch['train_images_streamed']}/{epoch['train_images_in_view']} train images of "
        f"{epoch['classes_streamed']}/{epoch['classes_in_view']} classes at {epoch['images_per_second']} img/s; "
        f"{epoch['test_images_streamed']} test images; skipped: {epoch['skipped']}"
    )
    training = train(cfg) if cfg.train else None
    summary = {
        "config": cfg.model_dump(mode="json"),
        "dataset": dataset,
        "stream": epoch,
        "training": training,
        "ray": {"cluster_cpus": ray.cluster_resources().get("CPU")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[quickstart] done in {summary['seconds']} s; summary in {out_dir / 'summary.json'}")
    return summary
