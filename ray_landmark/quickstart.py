"""The quickstart: a synthetic GLDv2 in a local S3 server, streamed through the training pipeline; a tiny DOLG and a
tiny plain EfficientNet trained on it with Ray Train, checkpointing to the same server; then the ensemble of the two:
embeddings, kNN, post-processing, metrics per model and stage, submissions and an HTML report.

It exercises the same code path as a cluster run against real S3: an endpoint URL, credentials from the environment,
tar shards read by Ray Data tasks.
"""

from __future__ import annotations

import collections
import json
import shutil
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray

from ray_landmark.config import Config
from ray_landmark.data.config import DataConfig, SyntheticSpec
from ray_landmark.data.metadata import open_manifest, prepare_manifests
from ray_landmark.data.pipeline import BYTES_READ, SKIP_REASONS, eval_stream, train_stream
from ray_landmark.data.shard_members import dataset_shard_index
from ray_landmark.data.storage import exists, read_bytes, resolve, write_bytes
from ray_landmark.data.synthetic import write_synthetic_gldv2
from ray_landmark.infer.config import EnsembleConfig
from ray_landmark.infer.ensemble import HEADLINE, metrics_text, run_ensemble
from ray_landmark.local_s3 import LocalS3Server, free_port
from ray_landmark.progress import ProgressLine
from ray_landmark.runs.checkpoint import latest_checkpoint
from ray_landmark.runs.folders import output_folder, run_logs
from ray_landmark.runs.identity import run_state
from ray_landmark.train.metrics_log import read_metrics
from ray_landmark.train.trainer import fit, load_training_data
from ray_landmark.tune.sweep import check_sweep_rerun, run_sweep


BUCKET_COPY = "bucket"  # <out>/bucket/<bucket>/: the local S3 server's bucket as the last run left it
SYNTHETIC_RECORD = "synthetic.json"  # <data.root>/synthetic.json: the spec the set was written with, and its summary


def _bucket(cfg: Config) -> str:
    return cfg.data.root.removeprefix("s3://").split("/", 1)[0]


def restore_bucket(cfg: Config, server: LocalS3Server, out_dir: Path) -> bool:
    """Create the bucket named by data.root on the local server (new with every run) and fill it with the copy the
    last run in ``out_dir`` saved, if there is one: its data set and trained runs are then reused."""
    bucket = _bucket(cfg)
    server.create_bucket(bucket)
    copy = out_dir / BUCKET_COPY / bucket
    if not copy.is_dir():
        return False
    target = resolve(f"s3://{bucket}", cfg.data.storage)
    pafs.copy_files(str(copy), target.path, destination_filesystem=target.fs)
    print(f"[quickstart] restored s3://{bucket} from {copy} (the last run's data and trained runs)")
    return True


def save_bucket(cfg: Config, out_dir: Path) -> None:
    """Copy the bucket to ``out_dir`` for the next run, replacing the last copy only once this one is whole."""
    bucket = _bucket(cfg)
    source = resolve(f"s3://{bucket}", cfg.data.storage)
    copy, partial = out_dir / BUCKET_COPY / bucket, out_dir / BUCKET_COPY / f"{bucket}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pafs.copy_files(source.path, str(partial), source_filesystem=source.fs)
    shutil.rmtree(copy, ignore_errors=True)
    partial.rename(copy)


def prepare_dataset(cfg: Config) -> dict:
    """Write the synthetic set and its manifests under data.root, unless the set there was written with the same
    spec (a restored bucket): then it is reused as it is, and its summary says so (``reused``)."""
    spec = cfg.synthetic or SyntheticSpec()
    root = resolve(cfg.data.root, cfg.data.storage)
    record = root.child(SYNTHETIC_RECORD)
    if exists(record):
        earlier = json.loads(read_bytes(record))
        if earlier["spec"] == spec.model_dump(mode="json"):
            print(f"[quickstart] synthetic GLDv2 in {cfg.data.root}: written earlier with this spec; reused")
            return {**earlier["summary"], "reused": True}
    summary = write_synthetic_gldv2(spec, root)
    # With the shard index (prepare_gldv2.py --verify-shards), so that the streams read only the images they use.
    summary["manifest"] = prepare_manifests(root, resolve(cfg.data.manifest_uri, cfg.data.storage),
                                            shard_index=dataset_shard_index(root))
    write_bytes(record, json.dumps({"spec": spec.model_dump(mode="json"), "summary": summary}, default=str).encode())
    return {**summary, "reused": False}


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
        "bytes_read": counts.get(BYTES_READ, 0),
        "test_images_streamed": test_images,
    }


def train(cfg: Config, restart: bool = False) -> dict:
    """Train with Ray Train, or reuse a run that holds every epoch of this config (then ``reused`` is true); the
    per-epoch validation history comes back from the run's metrics log. ``restart``: a run made with another config
    is moved aside."""
    done, breaking = run_state(cfg)
    reused = done >= cfg.train.last_epoch and not breaking
    if reused:
        print(f"[quickstart] {cfg.run.name}: trained earlier with this config ({done} epochs); reused")
        final = latest_checkpoint(output_folder(cfg.run)).folder.path
    else:
        print(f"[quickstart] training {cfg.run.name} ({cfg.model.arch}) with {cfg.train.num_workers} workers; "
              f"checkpoints to {cfg.run.output_dir}")
        final = fit(cfg, load_training_data(cfg, restart)).checkpoint.path
    return {"final_checkpoint": final, "reused": reused, "history": read_metrics(run_logs(cfg.run))}


def serve_and_ask(ensemble: EnsembleConfig, data: DataConfig, images: int = 4) -> list[dict]:
    """Start the landmark service on the ensemble's models, send it a few test images over HTTP, print the answers
    next to the truth, stop it."""
    import requests
    from ray import serve

    from ray_landmark.infer.report import read_jpegs
    from ray_landmark.serve.app import start_service
    from ray_landmark.serve.config import read_serve_file

    url = start_service(read_serve_file("configs/serve/quickstart.yaml").settings, ensemble, port=free_port())
    truth = open_manifest(data).recognition()
    truth = truth[truth["usage"] != "Ignored"].head(images).set_index("id")["landmarks"].fillna("")
    jpegs = read_jpegs(resolve(data.root, data.storage).child("test"), truth.index)
    answers = []
    try:
        print(f"[quickstart] the service at {url}: {len(jpegs)} test images to /recognize and /retrieve?k=3")
        for image_id, jpeg in jpegs.items():
            sent = {"data": jpeg, "headers": {"Content-Type": "image/jpeg"}, "timeout": 60}
            recognized = requests.post(f"{url}/recognize", **sent).json()["results"][0]
            retrieved = requests.post(f"{url}/retrieve", params={"k": 3}, **sent).json()["results"][0]
            answers.append({"id": image_id, "truth": truth[image_id], **recognized, "retrieved": retrieved["ids"]})
            print(f"[quickstart]   {image_id}: landmark {recognized['landmark_id']} (true: {truth[image_id] or 'none'}),"
                  f" confidence {recognized['confidence']:.3f}; index {' '.join(retrieved['ids'])}")
    finally:
        serve.shutdown()
    return answers


def run(cfg: Config, second: Config, ensemble: EnsembleConfig, server: LocalS3Server, out_dir: Path,
        sweep: tuple | None = None, restart: bool = False) -> dict:
    """The whole quickstart; ``second`` is a model of another family, ``ensemble`` combines the two, ``sweep`` (a
    SweepConfig and its base, optional) is run last. A rerun into the same ``out_dir`` reuses what the last one
    finished: the data set, the trained runs (the bucket is saved to ``out_dir`` once they are, unless the restored
    copy already held them all) and the embeddings;
    ``restart`` moves aside a run made with another config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"[quickstart] local S3 server at {server.endpoint_url}; synthetic GLDv2 in {cfg.data.root}")
    restored = restore_bucket(cfg, server, out_dir)
    dataset = prepare_dataset(cfg)
    print(f"[quickstart] dataset: {dataset['images']} images, {dataset['landmarks']} landmarks")
    epoch = stream_epoch(cfg, cfg.train.batch_size)
    print(
        f"[quickstart] streamed {epoch['train_images_streamed']}/{epoch['train_images_in_view']} train images of "
        f"{epoch['classes_streamed']}/{epoch['classes_in_view']} classes at {epoch['images_per_second']} img/s; "
        f"{epoch['test_images_streamed']} test images; skipped: {epoch['skipped']}"
    )
    training = {c.run.name: train(c, restart) for c in (cfg, second)}
    # A rerun that reused the data and both runs left the bucket as it restored it: the copy is already that.
    if not (restored and dataset["reused"] and all(t["reused"] for t in training.values())):
        save_bucket(cfg, out_dir)
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
        check_sweep_rerun(*sweep)
        summary["sweep"] = run_sweep(*sweep)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"[quickstart] report: {scored['report']}")
    print(f"[quickstart] done in {summary['seconds']} s; summary in {out_dir / 'summary.json'}")
    return summary
