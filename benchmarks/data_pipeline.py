"""Images/s of the train pipelines against plain loops and a torch DataLoader, in one run, on the same JPEGs and cores.

(a) ceiling: the same work in plain loops over JPEG bytes already in memory, nothing else running: one loop per
    process (one thread each), the processes taking chunks of 32 images from a shared counter until none are left,
    for 1 .. cores + 1 processes and each kind of work below. Each process also measures its own CPU time, so
    every run gives images per CPU-second. (a) = cores x the best images per CPU-second of any run: every core doing
    nothing but the cheapest of these kinds of work at its best measured speed. No pipeline doing that work on these
    cores can beat it (it adds reading, batching and moving images to the same work), and, unlike a wall-clock
    rate, it does not drop when other programs on a shared machine take cores while the loops run.
(b) the published solution's way: a torch DataLoader (one worker per core) over the JPEGs extracted to local files;
(c) this pipeline with ``data.decode: cpu``: Ray Data streaming the tar shards from a local S3 server, decoded and
    augmented in Ray Data tasks, into ``iter_torch_batches``; with ``data.preprocessing`` fast and original;
(d) ``data.decode: worker`` on the CPU: the stream carries JPEG bytes and the consumer (here the driver, in training a
    Ray Train worker) decodes, resizes and augments each batch itself (``pipeline.train_batches``, device "cpu").
The kinds of work: the Ray Data tasks' (PIL decode, resize, the batched augmentation) with fast and with original
preprocessing, and the worker's (torchvision decode, resize and augmentation, a batch at a time). (b), (c) and (d) are
timed round robin, one pass of each per round, so that a busy spell on a shared machine hits them alike; each one's
rate is its best pass after the first (which warms up worker processes and the page cache; reported too), with where
the CPU went in (c) and (d).

    python benchmarks/data_pipeline.py [--images 1200] [--size 448] [--no-write]
"""

from __future__ import annotations

import argparse
import io
import json
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
from ray_landmark.data.pipeline import train_batches, train_stream  # noqa: E402
from ray_landmark.data.storage import resolve  # noqa: E402
from ray_landmark.data.synthetic import SyntheticSpec, write_synthetic_gldv2  # noqa: E402
from ray_landmark.data.transforms import ImageTransform  # noqa: E402
from ray_landmark.data.worker_decode import TrainBatchDecoder  # noqa: E402
from ray_landmark.local_s3 import LocalS3Server, use_test_credentials  # noqa: E402

BATCH = 32
# The plain loops' kinds of work: what a Ray Data decode task does per image (fast / original preprocessing), and what
# a worker decoding its own batches does per batch.
WORKS = ("ray_task_fast", "ray_task_original", "worker_fast")
ROUNDS = 3  # passes of each pipeline: one warm-up, then the best of the others


_BLOBS: list[bytes] = []
_WORK = None
_START = None
_NEXT = None


def _init_worker(blob_file: str, size: int, work: str, start, next_chunk) -> None:
    """Load the JPEGs and warm up (imports, allocations) before anything is timed."""
    global _BLOBS, _WORK, _START, _NEXT
    torch.set_num_threads(1)  # one core per process, as DataLoader workers and Ray tasks run
    _BLOBS = pickle.loads(Path(blob_file).read_bytes())
    if work == "worker_fast":
        decoder = TrainBatchDecoder(size, "fast", "cpu", augment=True)
        labels = np.zeros(BATCH, np.int64)
        _WORK = lambda chunk: decoder(chunk, labels[: len(chunk)])  # noqa: E731
    else:
        transform = ImageTransform(size, augment=True, preprocessing=work.removeprefix("ray_task_"))
        _WORK = lambda chunk: [transform(data) for data in chunk]  # noqa: E731
    _WORK(_BLOBS[:BATCH])
    _START, _NEXT = start, next_chunk


def _work_until_done(_) -> tuple[int, float, float, float]:
    """(images done, wall start, wall end, CPU seconds) of this process's share."""
    _START.wait()  # every process starts together, once all have started up
    started, cpu_started, done = time.time(), time.process_time(), 0
    while True:
        with _NEXT.get_lock():
            first = _NEXT.value
            _NEXT.value += BATCH
        chunk = _BLOBS[first : first + BATCH]
        if not chunk:
            return done, started, time.time(), time.process_time() - cpu_started
        _WORK(chunk)
        done += len(chunk)


def plain_loops(blob_file: str, size: int, processes: int, work: str) -> tuple[float, float]:
    """Images/s (wall clock) of ``processes`` plain loops sharing the JPEGs held in memory, chunk by chunk, and their
    images per CPU-second."""
    ctx = mp.get_context("spawn")
    start, next_chunk = ctx.Barrier(processes), ctx.Value("q", 0)
    with ctx.Pool(processes, initializer=_init_worker, initargs=(blob_file, size, work, start, next_chunk)) as pool:
        shares = pool.map(_work_until_done, range(processes), chunksize=1)
    images = sum(n for n, _, _, _ in shares)
    wall = max(end for _, _, end, _ in shares) - min(begin for _, begin, _, _ in shares)
    return images / wall, images / sum(cpu for _, _, _, cpu in shares)


class JpegFolder(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], size: int):
        self.paths, self.transform = paths, ImageTransform(size, augment=True)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(self.transform(self.paths[i].read_bytes())), 0


def dataloader(paths: list[Path], size: int, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        JpegFolder(paths, size), batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=True
    )


DRIVER = "driver: consumer (and its decoding in (d)) and Ray Data's executor"
RAY_WORKERS = "Ray worker processes: read and decode tasks, idle workers"
WORK_ITSELF = "decode + augment work itself (images/s / best images per CPU-second)"


def cpu_seconds_by_group() -> dict[str, float]:
    """CPU seconds used so far by each kind of process on this machine that takes part in the stream."""
    import psutil

    groups: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] == os.getpid():
            group = DRIVER
        elif "moto.server" in cmd:
            group = "S3 server (moto)"
        elif cmd.startswith("ray::") or "default_worker.py" in cmd:
            group = RAY_WORKERS
        elif any(name in cmd for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env")):
            group = "Ray system processes: raylet, GCS, agents"
        else:
            continue
        times = proc.info["cpu_times"]
        groups[group] = groups.get(group, 0.0) + times.user + times.system
    machine_times = psutil.cpu_times()
    groups["whole machine"] = machine_times.user + machine_times.system + machine_times.nice
    return groups


def timed_pass(batches) -> tuple[float, dict[str, float]]:
    """Images/s of one pass over ``batches`` (dicts with a ``label`` column, or DataLoader pairs), and where the CPU
    went meanwhile."""
    before = cpu_seconds_by_group()
    started, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch["label"] if isinstance(batch, dict) else batch[1])
    seconds = time.perf_counter() - started
    after = cpu_seconds_by_group()
    cpu = {g: round((after[g] - before.get(g, 0.0)) / seconds, 2) for g in after}  # cores busy, on average
    # CPU of processes that ended during the pass (Ray replaces idle workers), and of other programs on a shared
    # machine, shows only in the machine's total.
    cpu["other: processes that exited during the pass, other programs"] = round(
        cpu["whole machine"] - sum(v for g, v in cpu.items() if g != "whole machine"), 2
    )
    return n / seconds, cpu


def stream_batches(cfg: DataConfig, worker_decode: bool):
    """A function giving one pass of the train stream as training consumes it (``pipeline.train_batches``)."""
    stream = train_stream(cfg, worker_decode=worker_decode)
    return lambda: train_batches(stream.dataset.iterator(), cfg, batch_size=BATCH, device=torch.device("cpu"),
                                 counter=stream.counter), stream


def _closest(paths: dict[str, float]) -> str:
    name = max(paths, key=paths.get)
    return f"{name} ({paths[name]:.2f} of the ceiling)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200, help="about this many train images")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="print the results; leave the JSON and BENCHMARKS.md")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
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
            tar_loc = root.child("train", f"images_{shard:03d}.tar")
            with tarfile.open(fileobj=io.BytesIO(tar_loc.fs.open_input_stream(tar_loc.path).read())) as tar:
                for m in tar:
                    if m.isreg():
                        blob = tar.extractfile(m).read()
                        path = Path(local.path) / m.name
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(blob)
                        blobs.append(blob)
                        paths.append(path)
        mean_jpeg = float(np.mean([len(blob) for blob in blobs]))
        print(f"{len(blobs)} JPEGs of {spec.width}x{spec.height} ({mean_jpeg / 1e3:.0f} KB), output {args.size} px, "
              f"{cores} cores")

        blob_file = Path(tmp) / "blobs.pickle"
        blob_file.write_bytes(pickle.dumps(blobs))
        plain: dict[str, dict[int, float]] = {work: {} for work in WORKS}  # wall-clock images/s
        per_cpu_second: dict[str, float] = {}  # the best images per CPU-second of each kind of work
        for work in WORKS:
            for processes in range(1, cores + 2):
                rate, efficiency = plain_loops(str(blob_file), args.size, processes, work)
                plain[work][processes] = round(rate, 1)
                per_cpu_second[work] = round(max(per_cpu_second.get(work, 0.0), efficiency), 1)
                print(f"(a) plain loops, {work}, {processes} process(es): {rate:.1f} img/s, "
                      f"{efficiency:.1f} images per CPU-second")
        ceiling_work = max(per_cpu_second, key=per_cpu_second.get)
        ceiling = round(cores * per_cpu_second[ceiling_work], 1)
        print(f"(a) ceiling: {ceiling} img/s ({cores} cores x {per_cpu_second[ceiling_work]} {ceiling_work} images "
              f"per CPU-second)")
        # (b)'s worker processes start (fork) before Ray does.
        loader = dataloader(paths, args.size, cores)
        timed_pass(loader)

        import ray

        from ray_landmark.runtime import init_ray

        init_ray()
        cfg = DataConfig(root=root.uri, storage=storage, view="full", image_size=args.size, shuffle_buffer=256)
        fast_passes, fast_stream = stream_batches(cfg, worker_decode=False)
        original_passes, _ = stream_batches(cfg.model_copy(update={"preprocessing": "original"}), False)
        worker_cfg = cfg.model_copy(update={"decode": "worker"})
        worker_passes, worker_stream = stream_batches(worker_cfg, worker_decode=True)
        paths_to_time = {"(b)": lambda: loader, "(c)": fast_passes, "(c) original": original_passes,
                         "(d)": worker_passes}
        # Round robin, one pass of each path per round, so that a busy spell on the shared machine hits them alike;
        # round 0 warms up (Ray's worker processes start); each path's steady rate is its best later pass.
        passes: dict[str, list[tuple[float, dict]]] = {name: [] for name in paths_to_time}
        for round_ in range(ROUNDS):
            for name, one_pass in paths_to_time.items():
                passes[name].append(timed_pass(one_pass()))
                print(f"round {round_}: {name} {passes[name][-1][0]:.1f} img/s")
        steady = {name: max(runs[1:], key=lambda run: run[0]) for name, runs in passes.items()}
        loader_rate = steady["(b)"][0]
        steady_fast, cpu = steady["(c)"]
        steady_original = steady["(c) original"][0]
        worker, worker_cpu = steady["(d)"]
        first, worker_first = passes["(c)"][0][0], passes["(d)"][0][0]
        stats, worker_stats = fast_stream.dataset.stats(), worker_stream.dataset.stats()
        print(f"(b) torch DataLoader, {cores} workers, local files: {loader_rate:.1f} img/s")
        print(f"(c) Ray Data from S3, decoded in Ray Data tasks: {steady_fast:.1f} img/s (first pass {first:.1f})")
        print(f"(c) the same with data.preprocessing: original: {steady_original:.1f} img/s")
        print(f"(d) Ray Data from S3, decoded in the consumer: {worker:.1f} img/s (first pass {worker_first:.1f})")
        # The work itself needs 1/(best images per CPU-second) core-seconds per image: at the steady rate, this many
        # cores.
        cpu[WORK_ITSELF] = round(steady_fast / per_cpu_second["ray_task_fast"], 2)
        worker_cpu[WORK_ITSELF] = round(worker / per_cpu_second["worker_fast"], 2)
        print(f"cores busy during (c)'s best pass: {cpu}\ncores busy during (d)'s best pass: {worker_cpu}")
        ray.shutdown()

    rates = {
        "ceiling": ceiling,
        "torch_dataloader_local_files": round(loader_rate, 1),
        "ray_stream_from_s3": round(steady_fast, 1),
        "ray_stream_from_s3_first_pass": round(first, 1),
        "ray_stream_from_s3_original_preprocessing": round(steady_original, 1),
        "worker_decode_from_s3": round(worker, 1),
        "worker_decode_from_s3_first_pass": round(worker_first, 1),
    }
    ratios = {
        "stream_vs_dataloader": round(steady_fast / loader_rate, 3),
        "stream_vs_ceiling": round(steady_fast / ceiling, 3),
        "worker_decode_vs_dataloader": round(worker / loader_rate, 3),
        "worker_decode_vs_ceiling": round(worker / ceiling, 3),
        "dataloader_vs_ceiling": round(loader_rate / ceiling, 3),
        "original_vs_fast_stream": round(steady_original / steady_fast, 3),
        "original_vs_fast_per_cpu_second": round(
            per_cpu_second["ray_task_original"] / per_cpu_second["ray_task_fast"], 3),
    }
    payload = {
        "benchmark": "data_pipeline",
        "machine": machine(),
        "setup": {
            "images": len(blobs), "source": f"{spec.width}x{spec.height} JPEG q{spec.jpeg_quality}",
            "mean_jpeg_kb": round(mean_jpeg / 1e3, 1),
            "output_px": args.size, "augment": "solution.md §1 train augmentation", "shards": args.shards,
            "batch_size": BATCH, "workers_or_processes": cores,
            "ray_logical_cpus": 2 * cores if cores >= 2 else 4, "load_average_at_start": round(load_before, 2),
        },
        "plain_loops_images_per_second": plain,
        "plain_loops_images_per_cpu_second": per_cpu_second,
        "ceiling": {"images_per_s": ceiling, "work": ceiling_work,
                    "definition": "cores x the best images per CPU-second of plain loops over in-memory JPEGs, over "
                                  "1..cores+1 processes sharing the work chunk by chunk and over every kind of work"},
        "images_per_second": rates,
        "ratios": ratios,
        "ray_stream_cores_busy": cpu,
        "worker_decode_cores_busy": worker_cpu,
        "targets": {"stream_vs_dataloader": ">= 1.0", "stream_vs_ceiling": ">= 0.8"},
        "ray_data_stats": stats,
        "worker_decode_ray_data_stats": worker_stats,
    }
    if args.no_write:
        print(json.dumps({k: v for k, v in payload.items() if "stats" not in k}, indent=2))
        return
    path = write_results("data_pipeline", payload)
    update_benchmarks_md("data_pipeline", benchmarks_md(payload, path.relative_to(path.parents[2])))
    print(f"wrote {path}")


def benchmarks_md(payload: dict, results_path: Path) -> str:
    """This benchmark's section of BENCHMARKS.md, from its results (as written to ``results_path``)."""
    m, setup, ratios = payload["machine"], payload["setup"], payload["ratios"]
    cores, size = m["cores"], setup["output_px"]
    plain, per_cpu_second = payload["plain_loops_images_per_second"], payload["plain_loops_images_per_cpu_second"]
    ceiling, rates = payload["ceiling"], payload["images_per_second"]
    cpu, worker_cpu = payload["ray_stream_cores_busy"], payload["worker_decode_cores_busy"]
    process_counts = list(plain[WORKS[0]])
    width, height = map(int, setup["source"].split()[0].split("x"))
    # libjpeg's reduced-size decode halves both sides at least once only when both stay >= the output size.
    draft_note = (f"from {width}×{height} to {size} px the fast mode's reduced-size decode cannot apply: both decode "
                  f"in full, and the resize without antialiasing is the cheaper one" if min(width, height) < 2 * size
                  else f"from {width}×{height} to {size} px the fast mode decodes at reduced size")
    plain_rows = "\n".join(f"| {work} | " + " | ".join(str(v) for v in plain[work].values()) + " |" for work in WORKS)
    closest = _closest({"(b) DataLoader": ratios["dataloader_vs_ceiling"], "(c) Ray Data decode tasks":
                        ratios["stream_vs_ceiling"], "(d) decoding in the consumer": ratios["worker_decode_vs_ceiling"]})
    return f"""## Data pipeline (`benchmarks/data_pipeline.py`)

{setup['images']} synthetic JPEGs ({setup['source']}, mean {setup['mean_jpeg_kb']} KB) → {size} px with the train
augmentation, batch {setup['batch_size']}, on {cores} cores ({m['cpu']}, {m['memory_gib']} GiB; load average
{setup['load_average_at_start']} when it started: the machine is shared), Ray {m['ray']}, torch {m['torch']}. (b), (c)
and (d) ran round robin, one pass of each per round, so that a busy spell hits them alike; each one's rate is its best
pass after a warm-up pass. Every number comes from this run.

(a) the ceiling is {cores} cores × the best images per CPU-second of plain loops doing the same work over JPEGs
already in memory (one thread per process, 1 … {cores + 1} processes sharing the work chunk by chunk, every kind of
work below): all cores doing nothing but the cheapest of that work at its best measured speed. No pipeline doing that
work on these cores can beat it, and unlike a wall-clock rate it does not drop when other programs take cores while
the loops run; the pipelines' rates do, so their ratios to (a) include what other programs took (see the load
average). Ratios between (b), (c) and (d), measured side by side, compare the paths. Plain loops, wall clock
images/s:

| work | """ + " | ".join(f"{p} process{'es' if int(p) > 1 else ''}" for p in process_counts) + """ |
|---|""" + "---|" * len(process_counts) + f"""
{plain_rows}

`ray_task_*`: PIL decode, resize and the batched augmentation, per image, as a Ray Data decode task does, with
`data.preprocessing` fast (reduced-size decode, antialiased resize) and original (full decode, bilinear resize without
antialiasing); `worker_fast`: torchvision decode, resize and augmentation a batch at a time, as a worker decoding its
own batches does (`data.decode: worker`; `gpu` runs the same code on the GPU). Best images per CPU-second: """ + ", ".join(
        f"{work} {rate}" for work, rate in per_cpu_second.items()) + f""".

| pipeline | images/s | vs ceiling |
|---|---|---|
| (a) ceiling: {cores} × {per_cpu_second[ceiling['work']]} ({ceiling['work']}) | {ceiling['images_per_s']} | 1.00 |
| (b) torch DataLoader, {cores} workers, extracted local files | {rates['torch_dataloader_local_files']} | {ratios['dataloader_vs_ceiling']:.2f} |
| (c) Ray Data streaming tars from S3 (local moto server), decode tasks (`data.decode: cpu`) | {rates['ray_stream_from_s3']} | {ratios['stream_vs_ceiling']:.2f} |
| (c) first pass (worker start-up included) | {rates['ray_stream_from_s3_first_pass']} | |
| (c) with `data.preprocessing: original` | {rates['ray_stream_from_s3_original_preprocessing']} | {rates['ray_stream_from_s3_original_preprocessing'] / ceiling['images_per_s']:.2f} |
| (d) Ray Data streaming JPEG bytes, decoded in the consumer on its CPU (`data.decode: worker`) | {rates['worker_decode_from_s3']} | {ratios['worker_decode_vs_ceiling']:.2f} |
| (d) first pass | {rates['worker_decode_from_s3_first_pass']} | |

`stream_vs_dataloader` (c/b) = **{ratios['stream_vs_dataloader']}** (target ≥ 1.0),
`stream_vs_ceiling` (c/a) = **{ratios['stream_vs_ceiling']}** (target ≥ 0.8);
`worker_decode_vs_dataloader` (d/b) = **{ratios['worker_decode_vs_dataloader']}**,
`worker_decode_vs_ceiling` (d/a) = **{ratios['worker_decode_vs_ceiling']}**. Closest to the ceiling: {closest}.
Original preprocessing vs fast: {ratios['original_vs_fast_stream']} in (c), {ratios['original_vs_fast_per_cpu_second']}
in images per CPU-second ({draft_note}). Raw numbers: `{results_path}`.

What each path pays on top of the work itself. (b)'s worker processes decode and hand finished batches to the
consumer through shared memory, and nothing else runs. In (c) the Ray worker processes were {cpu[RAY_WORKERS]} cores
busy where the decode work itself needs {cpu[WORK_ITSELF]}: the rest is the read tasks and Ray Data's handling of each
block (a decoded image is {size}²×3 bytes, {size ** 2 * 3 / (setup['mean_jpeg_kb'] * 1e3):.1f}× its JPEG, converted
to and from Arrow and written to the object store); its executor and the consumer in the driver take {cpu[DRIVER]}
cores. (d) moves only JPEG bytes and has none of that, but decodes in the one consuming process, between batches: JPEG
decoding runs on one thread there (torch's threads share only resizing and augmenting; the consumer was
{worker_cpu[DRIVER]} cores busy for {worker_cpu[WORK_ITSELF]} cores' worth of decode work), so on a CPU it cannot
spread decoding over all cores as (b) and (c) do. (d) is the CPU twin of `data.decode: gpu`, where that process hands
the work to its GPU (`benchmarks/gpu_decode.py`); on CPU-only workers `data.decode: cpu` spreads decoding over all
cores.

Where the CPU went during the timed passes (cores busy on average, out of {cores}):

| processes | (c) decode tasks | (d) decoding in the consumer |
|---|---|---|
""" + "\n".join(f"| {group} | {cpu.get(group, '')} | {worker_cpu.get(group, '')} |"
                for group in dict.fromkeys([*cpu, *worker_cpu])) + "\n"


if __name__ == "__main__":
    main()
