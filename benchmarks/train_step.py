"""Images/s of the Ray Train loop against the same steps in a plain PyTorch loop, and fed by the data layer from S3
against in-memory batches; all in one run, on the same machine, same model, same batches.

(1) plain: one process, the loop body (normalise, forward, ArcFace loss, backward, Adam step, lr schedule) over
    batches held in memory; one torch thread, as a 1-CPU Ray worker gets (OMP_NUM_THREADS=1);
(2) ray in-memory: ``jobs/train.py``'s loop, 1 CPU worker, the same decoded batches materialised in Ray's object store;
(3) ray fed: the same, reading the tar shards from a local S3 server through the data layer.
Each rate is the mean of the epochs after the first (start-up excluded).

    python -m benchmarks.train_step [--epochs 4] [--image-size 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from benchmarks.results_io import REPO, add_out_option, machine, publish, results_path
from ray_landmark.config import load_config
from ray_landmark.data.metadata import open_manifest, prepare_manifests
from ray_landmark.data.pipeline import train_stream
from ray_landmark.data.storage import resolve
from ray_landmark.data.synthetic import SyntheticSpec, write_synthetic_gldv2
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.local_s3 import LocalS3Server, use_test_credentials
from ray_landmark.markdown import markdown_table
from ray_landmark.models.amp import MixedPrecision
from ray_landmark.models.factory import build_model
from ray_landmark.runs.folders import run_logs
from ray_landmark.runtime import init_ray
from ray_landmark.train.metrics_log import read_metrics
from ray_landmark.train.optim import build_optimizer, build_scheduler
from ray_landmark.train.trainer import fit


def plain_loop(cfg, batches: list[dict], class_counts: list[int], epochs: int) -> list[float]:
    """The training step of ray_landmark.train.loop without Ray: same model, optimizer, precision, schedule, batches
    (one optimizer step per batch)."""
    torch.set_num_threads(1)
    tc = cfg.train
    model = build_model(cfg.model, cfg.loss, len(class_counts), cfg.data.image_size, class_counts)
    model = model.to(memory_format=torch.channels_last).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    precision = MixedPrecision(torch.device("cpu"), tc.amp)
    scheduler = build_scheduler(optimizer, tc.model_copy(update={"warmup_epochs": 0, "epochs": epochs}), len(batches))
    rates = []
    for _ in range(epochs):
        started, n = time.perf_counter(), 0
        for batch in batches:
            images = normalize_on_device(batch["image"]).contiguous(memory_format=torch.channels_last)
            with precision.autocast():
                loss = model(images, batch["label"])["loss"]
            precision.backward(loss)
            precision.step(optimizer, params, tc.grad_clip)
            scheduler.step()
            n += len(images)
        rates.append(n / (time.perf_counter() - started))
    return rates


def ray_loop(cfg, name: str, train_dataset=None) -> list[float]:
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})
    fit(cfg, train_dataset=train_dataset)
    history = read_metrics(run_logs(cfg.run))
    return [m["images_per_s"] for m in history]


def measure(args) -> tuple[dict[str, list[float]], int]:
    """Images/s per epoch of the three loops, on a synthetic GLDv2 in a bucket of a local S3 server, and the images
    of an epoch."""
    spec = SyntheticSpec(num_landmarks=args.landmarks, clean_landmark_fraction=1.0, min_images_per_landmark=30,
                         max_images_per_landmark=60, width=128, height=96, train_shards=4)
    use_test_credentials()
    with LocalS3Server() as s3, tempfile.TemporaryDirectory() as runs:
        s3.create_bucket("bench")
        overrides = [
            "data.root=s3://bench/gldv2", f"data.storage.endpoint_url={s3.endpoint_url}", "data.view=full",
            f"data.image_size={args.image_size}", "data.augment=false", "data.shuffle_buffer=64",
            f"run.output_dir={runs}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
            "train.num_workers=1", "train.cpus_per_worker=1", "train.eval_every=1000", "train.warmup_epochs=0",
        ]
        cfg = load_config(REPO / "configs" / "tiny_dolg.yaml", overrides)
        root = resolve(cfg.data.root, cfg.data.storage)
        write_synthetic_gldv2(spec, root, progress=None)
        prepare_manifests(root, root.child("manifest"), progress=None)

        init_ray()
        classes = open_manifest(cfg.data).view_classes("full")
        in_memory = train_stream(cfg.data).dataset.materialize()
        batches = [
            {"image": torch.from_numpy(b["image"]), "label": torch.from_numpy(b["label"])}
            for b in in_memory.iter_batches(batch_size=args.batch_size, batch_format="numpy", drop_last=True)
        ]
        print(f"{len(batches)} batches of {args.batch_size} at {args.image_size} px per epoch, {args.epochs} epochs")

        plain = plain_loop(cfg, batches, classes["count"].tolist(), args.epochs)
        print(f"(1) plain loop: {[round(r, 1) for r in plain]} img/s per epoch")
        ray_memory = ray_loop(cfg, "in_memory", in_memory)
        print(f"(2) Ray Train, in-memory batches: {ray_memory} img/s per epoch")
        ray_fed = ray_loop(cfg, "fed")
        print(f"(3) Ray Train, fed from S3 by the data layer: {ray_fed} img/s per epoch")
    return {"plain": plain, "ray_in_memory": ray_memory, "ray_fed_from_s3": ray_fed}, len(batches) * args.batch_size


def benchmarks_md(payload: dict) -> str:
    """This benchmark's section of BENCHMARKS.md, from its results."""
    m, setup, r, ratios = payload["machine"], payload["setup"], payload["images_per_second"], payload["ratios"]
    table = markdown_table(["loop", "images/s", "ratio"], [
        ["(1) plain PyTorch, in-memory batches, 1 thread", r["plain"], ""],
        ["(2) Ray Train loop, in-memory batches", r["ray_in_memory"],
         f"`ray_vs_plain` = **{ratios['ray_vs_plain']}** (target ≥ 0.95)"],
        ["(3) Ray Train loop, fed from S3 by the data layer", r["ray_fed_from_s3"],
         f"`fed_vs_inmemory` = **{ratios['fed_vs_inmemory']}** (target ≥ 0.9)"],
    ])
    return f"""## Training step (`python -m benchmarks.train_step`)

Tiny DOLG (`test_efficientnet` backbone) at {setup['image_size']} px, batch {setup['batch_size']}, 1 CPU worker, on
{m['cores']} cores ({m['cpu']}); mean of epochs 2–{setup['epochs']}.

{table}

Raw numbers: `{results_path("train_step")}`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="at least 2: the first is start-up, not counted")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--landmarks", type=int, default=16, help="of the synthetic GLDv2, 30 to 60 images each")
    add_out_option(parser)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: each rate is the mean of the epochs after the first")
    per_epoch, images_per_epoch = measure(args)
    steady = {k: float(np.mean(v[1:])) for k, v in per_epoch.items()}
    payload = {
        "benchmark": "train_step",
        "machine": machine(),
        "setup": {
            "model": "tiny DOLG (configs/tiny_dolg.yaml: test_efficientnet backbone)", "image_size": args.image_size,
            "batch_size": args.batch_size, "epochs": args.epochs, "images_per_epoch": images_per_epoch,
            "workers": 1, "cpus_per_worker": 1, "plain_torch_threads": 1, "ray_logical_cpus": "2 x cores",
            "steady_state": "mean of epochs 2..N",
        },
        "images_per_second_per_epoch": per_epoch,
        "images_per_second": {k: round(v, 1) for k, v in steady.items()},
        "ratios": {
            "ray_vs_plain": round(steady["ray_in_memory"] / steady["plain"], 3),
            "fed_vs_inmemory": round(steady["ray_fed_from_s3"] / steady["ray_in_memory"], 3),
        },
        "targets": {"ray_vs_plain": ">= 0.95", "fed_vs_inmemory": ">= 0.9"},
    }
    publish("train_step", payload, benchmarks_md(payload), args.out)


if __name__ == "__main__":
    main()
