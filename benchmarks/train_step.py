"""Images/s of the Ray Train loop against the same steps in a plain PyTorch loop, and fed by the data layer from S3
against in-memory batches; all in one run, on the same machine, same model, same batches.

(1) plain: one process, the loop body (normalise, forward, ArcFace loss, backward, Adam step, lr schedule) over
    batches held in memory; one torch thread, as a 1-CPU Ray worker gets (OMP_NUM_THREADS=1);
(2) ray in-memory: ``jobs/train.py``'s loop, 1 CPU worker, the same decoded batches materialised in Ray's object store;
(3) ray fed: the same, reading the tar shards from a local S3 server through the data layer.
Each rate is the mean of the epochs after the first (start-up excluded).

    python benchmarks/train_step.py [--epochs 4] [--image-size 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine, update_benchmarks_md, write_results  # noqa: E402

from ray_landmark.config import load_config  # noqa: E402
from ray_landmark.data.metadata import open_manifest, prepare_manifests  # noqa: E402
from ray_landmark.data.pipeline import train_stream  # noqa: E402
from ray_landmark.data.storage import resolve  # noqa: E402
from ray_landmark.data.synthetic import SyntheticSpec, write_synthetic_gldv2  # noqa: E402
from ray_landmark.data.transforms import normalize_on_device  # noqa: E402
from ray_landmark.local_s3 import LocalS3Server, use_test_credentials  # noqa: E402
from ray_landmark.models.amp import MixedPrecision  # noqa: E402
from ray_landmark.models.factory import build_model  # noqa: E402
from ray_landmark.runs.checkpoint import run_logs  # noqa: E402
from ray_landmark.train.metrics_log import read_metrics  # noqa: E402
from ray_landmark.train.optim import build_optimizer, build_scheduler  # noqa: E402
from ray_landmark.train.trainer import fit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    spec = SyntheticSpec(num_landmarks=16, clean_landmark_fraction=1.0, min_images_per_landmark=30,
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

        from ray_landmark.runtime import init_ray

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

    steady = {k: float(np.mean(v[1:])) for k, v in
              {"plain": plain, "ray_in_memory": ray_memory, "ray_fed_from_s3": ray_fed}.items()}
    payload = {
        "benchmark": "train_step",
        "machine": machine(),
        "setup": {
            "model": "tiny DOLG (configs/tiny_dolg.yaml: test_efficientnet backbone)", "image_size": args.image_size,
            "batch_size": args.batch_size, "epochs": args.epochs, "images_per_epoch": len(batches) * args.batch_size,
            "workers": 1, "cpus_per_worker": 1, "plain_torch_threads": 1, "ray_logical_cpus": "2 x cores",
            "steady_state": "mean of epochs 2..N",
        },
        "images_per_second_per_epoch": {"plain": plain, "ray_in_memory": ray_memory, "ray_fed_from_s3": ray_fed},
        "images_per_second": {k: round(v, 1) for k, v in steady.items()},
        "ratios": {
            "ray_vs_plain": round(steady["ray_in_memory"] / steady["plain"], 3),
            "fed_vs_inmemory": round(steady["ray_fed_from_s3"] / steady["ray_in_memory"], 3),
        },
        "targets": {"ray_vs_plain": ">= 0.95", "fed_vs_inmemory": ">= 0.9"},
    }
    path = write_results("train_step", payload)
    m, r = payload["machine"], payload["images_per_second"]
    update_benchmarks_md(
        "train_step",
        f"""## Training step (`benchmarks/train_step.py`)

Tiny DOLG (`test_efficientnet` backbone) at {args.image_size} px, batch {args.batch_size}, 1 CPU worker, on
{m['cores']} cores ({m['cpu']}); mean of epochs 2–{args.epochs}.

| loop | images/s | ratio |
|---|---|---|
| (1) plain PyTorch, in-memory batches, 1 thread | {r['plain']} | |
| (2) Ray Train loop, in-memory batches | {r['ray_in_memory']} | `ray_vs_plain` = **{payload['ratios']['ray_vs_plain']}** (target ≥ 0.95) |
| (3) Ray Train loop, fed from S3 by the data layer | {r['ray_fed_from_s3']} | `fed_vs_inmemory` = **{payload['ratios']['fed_vs_inmemory']}** (target ≥ 0.9) |

Raw numbers: `{path.relative_to(REPO)}`.
""",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
