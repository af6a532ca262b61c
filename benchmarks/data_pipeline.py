"""Images/s of the train pipeline against a plain loop and a torch DataLoader, in one run, on the same JPEGs and cores.

(a) ceiling: decode + resize + augment in plain loops, one process per core, JPEG bytes already in memory;
(b) the published solution's way: a torch DataLoader (one worker per core) over the JPEGs extracted to local files;
(c) this pipeline: Ray Data streaming the tar shards from a local S3 server into ``iter_torch_batches``.
All three run the same ``ImageTransform`` at the same output size. (b) and (c) are timed on a later pass (the first
warms up worker processes and the page cache); (c)'s first pass is reported too, and where the CPU went in (c).

    python benchmarks/data_pipeline.py [--images 1200] [--size 448]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
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


_BLOBS: list[bytes] = []
_TRANSFORM: ImageTransform | None = None
_START = None


def _init_worker(blob_file: str, size: int, start) -> None:
    """Load the JPEGs and warm up (imports, allocations) before anything is timed."""
    global _BLOBS, _TRANSFORM, _START
    torch.set_num_threads(1)  # one core per process, as DataLoader workers and Ray tasks run
    _BLOBS = pickle.loads(Path(blob_file).read_bytes())
    _TRANSFORM = ImageTransform(size, augment=True)
    for data in _BLOBS[:10]:
        _TRANSFORM(data)
    _START = start


def _transform_share(args: tuple[int, int]) -> tuple[int, float, float]:
    index, processes = args
    _START.wait()  # every process starts together, once all have started up
    started = time.time()
    share = _BLOBS[index::processes]
    for data in share:
        _TRANSFORM(data)
    return len(share), started, time.time()


def ceiling(blob_file: str, size: int, processes: int) -> float:
    """Decode + augment in plain loops, one process per core, each over its share of the JPEGs held in memory."""
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(processes)
    with ctx.Pool(processes, initializer=_init_worker, initargs=(blob_file, size, start)) as pool:
        shares = pool.map(_transform_share, [(i, processes) for i in range(processes)], chunksize=1)
    return sum(n for n, _, _ in shares) / (max(end for _, _, end in shares) - min(begin for _, begin, _ in shares))


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


def cpu_seconds_by_group() -> dict[str, float]:
    """CPU seconds used so far by each kind of process on this machine that takes part in the stream."""
    import psutil

    groups: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] == os.getpid():
            group = "driver: consumer and Ray Data's executor"
        elif "moto.server" in cmd:
            group = "S3 server (moto)"
        elif cmd.startswith("ray::") or "default_worker.py" in cmd:
            group = "Ray worker processes: read and decode tasks, idle workers"
        elif any(name in cmd for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env")):
            group = "Ray system processes: raylet, GCS, agents"
        else:
            continue
        times = proc.info["cpu_times"]
        groups[group] = groups.get(group, 0.0) + times.user + times.system
    machine_times = psutil.cpu_times()
    groups["whole machine"] = machine_times.user + machine_times.system + machine_times.nice
    return groups


def ray_stream(cfg: DataConfig, passes: int = 3) -> tuple[float, float, dict, str]:
    """First-pass and last-pass images/s, and where the CPU went during the last pass."""
    stream = train_stream(cfg)
    rates = []
    for _ in range(passes):
        before = cpu_seconds_by_group()
        started, n = time.perf_counter(), 0
        for batch in stream.dataset.iter_torch_batches(batch_size=BATCH, prefetch_batches=cfg.prefetch_batches):
            n += len(batch["label"])
        seconds = time.perf_counter() - started
        rates.append(n / seconds)
        after = cpu_seconds_by_group()
    cpu = {g: round((after[g] - before.get(g, 0.0)) / seconds, 2) for g in after}  # cores busy, on average
    # CPU of processes that ended during the pass (Ray replaces idle workers) shows only in the machine's total.
    cpu["processes that exited during the pass"] = round(
        cpu["whole machine"] - sum(v for g, v in cpu.items() if g != "whole machine"), 2
    )
    return rates[0], rates[-1], cpu, stream.dataset.stats()


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

        blob_file = Path(tmp) / "blobs.pickle"
        blob_file.write_bytes(pickle.dumps(blobs))
        single = ceiling(str(blob_file), args.size, 1)
        print(f"(a) plain loop, 1 process: {single:.1f} img/s")
        plain = ceiling(str(blob_file), args.size, cores)
        print(f"(a) plain loops, {cores} processes: {plain:.1f} img/s")
        loader = dataloader(paths, args.size, cores)
        print(f"(b) torch DataLoader, {cores} workers, local files: {loader:.1f} img/s")

        import ray

        from ray_landmark.runtime import init_ray

        init_ray()
        cfg = DataConfig(root=root.uri, storage=storage, view="full", image_size=args.size, shuffle_buffer=256)
        first, steady, cpu, stats = ray_stream(cfg)
        print(f"(c) Ray Data from S3: {steady:.1f} img/s (first pass {first:.1f} img/s)")
        # The transform alone needs 1/single core-seconds per image: at the steady rate, this many cores.
        cpu["decode + augment work itself (images/s / 1-process rate)"] = round(steady / single, 2)
        print(f"cores busy during the last pass: {cpu}")
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
        "ray_stream_cores_busy": cpu,
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

Where the CPU went during (c)'s timed pass (cores busy on average, out of {cores}):

| processes | cores |
|---|---|
""" + "\n".join(f"| {group} | {cores_busy} |" for group, cores_busy in cpu.items()) + "\n",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
