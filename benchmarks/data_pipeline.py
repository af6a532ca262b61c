"""Images/s of the train pipeline against a plain loop and a torch DataLoader, in one run, on the same JPEGs and cores.

(a) ceiling: decode + resize + augment in plain loops, one process per core, JPEG bytes already in memory;
(b) the published solution's way: a torch DataLoader (one worker per core) over the JPEGs extracted to local files;
(c) this pipeline: Ray Data streaming the tar shards from a local S3 server into ``iter_torch_batches``.
All three run the same ``ImageTransform`` at the same output size. Each is timed on its second pass (the first warms
up worker processes and the page cache) and the first pass of (c) is reported too.

    python benchmarks/data_pipeline.py [--images 1200] [--size 448]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine, update_benchmarks_md, write_results  # noqa: E402

from ray_landmark.data.config import DataConfig, StorageConfig  # noqa: E402
from ray_landmark.data.metadata import prepare_manifests  # noqa: E402
from ray_landmark.data.pipeline import train_stream  # noqa: E402
from ray_landmark.data.storage import resolve  # noqa: E402
from ray_landmark.data.synthetic import SyntheticSpec, write_synthetic_gldv2  # noqa: E402
from ray_landmark.data.transforms import ImageTransform  # noqa: E402
from ray_landmark.local_s3 import LocalS3Server, use_test_credentials  # noqa: E402

BATCH = 32


def _transform_all(args) -> int:
    blobs, size = args
    transform = ImageTransform(size, augment=True)
    for data in blobs:
        transform(data)
    return len(blobs)


def _warm_worker(sample: bytes, size: int) -> None:
    torch.set_num_threads(1)  # one core per process, as DataLoader workers and Ray tasks run
    ImageTransform(size, augment=True)(sample)


def ceiling(blobs: list[bytes], size: int, processes: int) -> float:
    chunks = [blobs[i::processes] for i in range(processes)]
    with mp.get_context("spawn").Pool(processes, initializer=_warm_worker, initargs=(blobs[0], size)) as pool:
        started = time.perf_counter()
        done = sum(pool.map(_transform_all, [(c, size) for c in chunks]))
        return done / (time.perf_counter() - started)


class JpegFolder(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], size: int):
        self.paths, self.transform = paths, ImageTransform(size, augment=True)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(self.transform(self.paths[i].read_bytes())), 0


def dataloader(paths: list[Path], size: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(
        JpegFolder(paths, size), batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=True
    )
    for _ in loader:  # warm-up pass: worker start-up, page cache
        pass
    started, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - started)


def ray_stream(cfg: DataConfig) -> tuple[float, float, str]:
    stream = train_stream(cfg)
    rates = []
    for _ in range(2):
        started, n = time.perf_counter(), 0
        for batch in stream.dataset.iter_torch_batches(batch_size=BATCH, prefetch_batches=cfg.prefetch_batches):
            n += len(batch["label"])
        rates.append(n / (time.perf_counter() - started))
    return rates[0], rates[1], stream.dataset.stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200, help="about this many train images")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--shards", type=int, default=8)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    spec = SyntheticSpec(
        num_landmarks=max(2, args.images // 12), max_images_per_landmark=60, min_images_per_landmark=8,
        test_landmark_images=2, test_non_landmark_images=1, index_distractor_landmarks=0,
        width=640, height=480, train_shards=args.shards, jpeg_quality=90,
    )
    use_test_credentials()
    with LocalS3Server() as s3, tempfile.TemporaryDirectory() as tmp:
        s3.create_bucket("bench")
        storage = StorageConfig(endpoint_url=s3.endpoint_url)
        root = resolve("s3://bench/gldv2", storage)
        print("writing synthetic shards ...")
        write_synthetic_gldv2(spec, root)
        prepare_manifests(root, root.child("manifest"), progress=None)
        # The same JPEGs, extracted to local files (what the published solution trains from) and held in memory.
        local = resolve(tmp)
        blobs: list[bytes] = []
        paths: list[Path] = []
        for shard in range(args.shards):
            data = root.child("train", f"images_{shard:03d}.tar").fs.open_input_stream(
                root.child("train", f"images_{shard:03d}.tar").path).read()
            with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
                for m in tar:
                    if m.isreg():
                        blob = tar.extractfile(m).read()
                        path = Path(local.path) / m.name
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(blob)
                        blobs.append(blob)
                        paths.append(path)
        print(f"{len(blobs)} JPEGs of {spec.width}x{spec.height}, output {args.size} px, {cores} cores")

        single = ceiling(blobs, args.size, 1)
        print(f"(a) plain loop, 1 process: {single:.1f} img/s")
        plain = ceiling(blobs, args.size, cores)
        print(f"(a) plain loops, {cores} processes: {plain:.1f} img/s")
        loader = dataloader(paths, args.size, cores)
        print(f"(b) torch DataLoader, {cores} workers, local files: {loader:.1f} img/s")

        import ray

        from ray_landmark.runtime import init_ray

        init_ray(progress_bars=False)
        cfg = DataConfig(root=root.uri, storage=storage, view="full", image_size=args.size, shuffle_buffer=256)
        first, steady, stats = ray_stream(cfg)
        print(f"(c) Ray Data from S3: {steady:.1f} img/s (first pass {first:.1f} img/s)")
        print(stats)
        ray.shutdown()

    payload = {
        "benchmark": "data_pipeline",
        "machine": machine(),
        "setup": {
            "images": len(blobs), "source": f"{spec.width}x{spec.height} JPEG q{spec.jpeg_quality}",
            "output_px": args.size, "augment": "solution.md §1 train augmentation", "shards": args.shards,
            "batch_size": BATCH, "workers_or_processes": cores,
            "ray_logical_cpus": 2 * cores if cores >= 2 else 4,
        },
        "images_per_second": {
            "ceiling_plain_loop_1_process": round(single, 1),
            "ceiling_plain_loops_all_cores": round(plain, 1),
            "torch_dataloader_local_files": round(loader, 1),
            "ray_stream_from_s3": round(steady, 1),
            "ray_stream_from_s3_first_pass": round(first, 1),
        },
        "ratios": {
            "stream_vs_dataloader": round(steady / loader, 3),
            "stream_vs_ceiling": round(steady / plain, 3),
        },
        "targets": {"stream_vs_dataloader": ">= 1.0", "stream_vs_ceiling": ">= 0.8"},
        "ray_data_stats": stats,
    }
    path = write_results("data_pipeline", payload)
    m = payload["machine"]
    r = payload["images_per_second"]
    update_benchmarks_md(
        "data_pipeline",
        f"""## Data pipeline (`benchmarks/data_pipeline.py`)

{len(blobs)} synthetic {spec.width}×{spec.height} JPEGs → {args.size} px with the train augmentation, batch {BATCH},
on {m['cores']} cores ({m['cpu']}, {m['memory_gib']} GiB), Ray {m['ray']}, torch {m['torch']}. Steady-state pass of each.

| pipeline | images/s | ratio |
|---|---|---|
| (a) ceiling: plain loop, 1 process | {r['ceiling_plain_loop_1_process']} | |
| (a) ceiling: plain loops, {cores} processes | {r['ceiling_plain_loops_all_cores']} | 1.00 |
| (b) torch DataLoader, {cores} workers, extracted local files | {r['torch_dataloader_local_files']} | {r['torch_dataloader_local_files'] / r['ceiling_plain_loops_all_cores']:.2f} |
| (c) Ray Data streaming tars from S3 (local moto server) | {r['ray_stream_from_s3']} | {payload['ratios']['stream_vs_ceiling']:.2f} |
| (c) first pass (worker start-up included) | {r['ray_stream_from_s3_first_pass']} | |

`stream_vs_dataloader` (c/b) = **{payload['ratios']['stream_vs_dataloader']}** (target ≥ 1.0),
`stream_vs_ceiling` (c/a) = **{payload['ratios']['stream_vs_ceiling']}** (target ≥ 0.8). Raw numbers: `{path.relative_to(path.parents[2])}`.
""",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
