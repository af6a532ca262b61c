"""The train pipelines against torch DataLoaders and plain loops, each fed from the same sources, in one run on the
same JPEGs and cores; and the bytes each way of reading fetches per delivered image.

(a) ceiling: the same work in plain loops over JPEG bytes already in memory, nothing else running: one loop per
    process (one thread each), the processes taking chunks of 32 images from a shared counter until none are left,
    for 1 .. cores + 1 processes and each kind of work below. Each process also measures its own CPU time, so
    every run gives images per CPU-second. (a) = cores x the best images per CPU-second of any run: every core doing
    nothing but the cheapest of these kinds of work at its best measured speed. No pipeline doing that work on these
    cores can beat it (it adds reading, batching and moving images to the same work), and, unlike a wall-clock
    rate, it does not drop when other programs on a shared machine take cores while the loops run.
(b) torch DataLoaders, one worker per core: over the JPEGs extracted to local files (the published solution's way),
    and streaming the tar shards (each worker its share of the shards, in a new order every pass) from the local
    tars and from the local S3 server;
(c) this pipeline with ``data.decode: cpu``: Ray Data reading the tar shards and decoding and augmenting them in the
    same tasks (Ray fuses the two stages), into ``train_batches``: streamed whole from the local tars and from the S3
    server, and read through the shard index by ranged requests from the S3 server (``data.ranged_reads``), for the
    full view and for GLDv2c; and, from S3, the two stages apart (read tasks, then decode tasks, as Ray Data runs a
    read followed by ``map_batches`` with a batch size), the pipeline's shape before they were fused;
(d) ``data.decode: worker`` on the CPU: the stream carries JPEG bytes and the consumer (here the driver, in training a
    Ray Train worker) decodes, resizes and augments each batch itself (``batches.train_batches``, device "cpu").
The kinds of work: the Ray Data tasks' (``pipeline.decode_images`` on a batch of 32: PIL decode, resize, the
augmentation a few images at a time) with fast and with original preprocessing, and the worker's (torchvision
decode, resize and augmentation, a batch at a time); the DataLoaders' datasets decode and augment one image at a
time. The augmentation alone is also timed with 1 … 32 images augmented together (``transforms.AUGMENT_CHUNK``).
(b), (c) and (d) are timed round robin, one pass of each per round, so that a busy spell on a shared machine hits them
alike, the DataLoaders' passes between Ray's (so that Ray's workers never idle long enough to be retired). The first
round warms up (worker processes, the page cache) and is not counted; rounds go on until every path has two passes
after it that agree within ``--agreement`` (default 5 %; a spread is the faster pass's rate over the slower's, less
1), for at least ``--min-rounds`` and at most ``--max-rounds`` rounds, and a path whose passes never agreed is listed
as not settled. Each path's rate, first batch and CPU time (of every process taking part, the S3 server's own
included) are the means of its two closest passes (``results_io.closest_pair``), and its spread is theirs. A ratio of
two paths is the median of its per-round ratios (each round after the warm-up: the first path's pass over the
second's, run minutes apart at most, so that a busy spell weighs on both alike), and its spread is their range, top
over bottom less 1: the range of n per-round ratios holds their median with probability 1 - 2 x 0.5^n. (Two paths'
closest passes, picked apart, could come from different rounds and busy spells: two quiet runs' ratios of them
disagreed by more than their spreads.) A ratio to the ceiling is the path's rate over it, with the path's spread.
The load average is recorded at the start, after each round and at the end. The first pass of (c) from S3 is taken
apart: imports, worker start-up, the first batch.
(e) bytes: the read stage alone (no decoding) from the S3 server, for the full view and GLDv2c, with and without the
    shard index, and with the index over a range of ``data.range_gap_bytes``: bytes fetched and requests per
    delivered image, against the mean JPEG of the view.

    python -m benchmarks.data_pipeline [--images 1500] [--size 448] [--jpeg 640x480] [--agreement 0.05] \
        [--min-rounds 3] [--max-rounds 8] [--previous benchmarks/results/data_pipeline.json] [--no-write] [--out DIR]
    python -m benchmarks.data_pipeline --images 96 --size 32 --jpeg 160x120 --shards 2 --min-rounds 3 \
        --max-rounds 3 --processes 1 --gaps 0,65536 --out /tmp/toy     # a smoke run at toy size
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import ray
import torch

from benchmarks.one_by_one import OneByOne
from benchmarks.results_io import add_jpeg_option, add_out_option, closest_pair, machine, publish, results_path
from ray_landmark.data import gldv2, transforms
from ray_landmark.data.config import DataConfig, StorageConfig
from ray_landmark.data.metadata import open_manifest, prepare_manifests
from ray_landmark.data.batches import train_batches
from ray_landmark.data.pipeline import decode_images, train_stream
from ray_landmark.data.shard_members import dataset_shard_index
from ray_landmark.data.storage import Location, resolve
from ray_landmark.data.synthetic import SyntheticSpec, write_synthetic_gldv2
from ray_landmark.data.jpeg import decode_resized
from ray_landmark.data.transforms import TrainAugmentation, augment_hwc
from ray_landmark.data.worker_decode import TrainBatchDecoder
from ray_landmark.local_s3 import LocalS3Server, use_test_credentials
from ray_landmark.markdown import markdown_table
from ray_landmark.runtime import init_ray

BATCH = 32
# The plain loops' kinds of work: what a Ray Data decode task does per image (fast / original preprocessing), and what
# a worker decoding its own batches does per batch.
WORKS = ("ray_task_fast", "ray_task_original", "worker_fast")


_BLOBS: list[bytes] = []
_WORK = None
_START = None
_NEXT = None
_START_FAILED = ""  # the traceback of this process's start-up, which a pool initializer cannot raise


class PlainLoopCounter(dict):
    """What the plain loops' decode counts in place of a stream's ``StreamCounter``: the same ``add``, kept here."""

    def add(self, counts: dict[str, int]) -> None:
        for key, n in counts.items():
            self[key] = self.get(key, 0) + n


def _init_worker(blob_file: str, size: int, work: str, start, next_chunk) -> None:
    """Load the JPEGs and warm up (imports, allocations) before anything is timed. A pool replaces a process whose
    initializer raised, forever: a failure is kept for ``_work_until_done`` to raise, and the others' start barrier
    broken."""
    global _START, _NEXT, _START_FAILED
    try:
        _start_worker(blob_file, size, work)
    except Exception:
        _START_FAILED = traceback.format_exc()
        start.abort()
    _START, _NEXT = start, next_chunk


def _start_worker(blob_file: str, size: int, work: str) -> None:
    global _BLOBS, _WORK
    torch.set_num_threads(1)  # one core per process, as DataLoader workers and Ray tasks run
    _BLOBS = pickle.loads(Path(blob_file).read_bytes())
    if work == "worker_fast":
        decoder = TrainBatchDecoder(size, "fast", "cpu", augment=True)
        labels = np.zeros(BATCH, np.int64)
        _WORK = lambda chunk: decoder(chunk, labels[: len(chunk)])  # noqa: E731
    else:
        preprocessing = work.removeprefix("ray_task_")
        _WORK = lambda chunk: decode_images(  # noqa: E731  exactly a Ray Data decode task's work on one batch
            {"id": np.arange(len(chunk)).astype(str), "jpeg": np.array(chunk, dtype=object),
             "label": np.zeros(len(chunk), np.int64)},
            image_size=size, preprocessing=preprocessing, augment=True, keep_ids=False, counter=PlainLoopCounter())
    _WORK(_BLOBS[:BATCH])


def _work_until_done(_) -> tuple[int, float, float, float]:
    """(images done, wall start, wall end, CPU seconds) of this process's share."""
    if _START_FAILED:
        raise RuntimeError(f"a plain loop failed to start:\n{_START_FAILED}")
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


def augmentation_chunk_rates(blobs: list[bytes], size: int, chunks=(1, 2, 4, 8, 32), rounds: int = 5) -> dict:
    """Images per CPU-second of the CPU augmentation alone (``augment_hwc``) with ``transforms.AUGMENT_CHUNK`` set to
    each of ``chunks``, on one batch of decoded images, in this process with one thread: the best of ``rounds``
    interleaved rounds."""
    torch.set_num_threads(1)
    images = np.stack([decode_resized(blob, size) for blob in blobs[:BATCH]])
    augmentation, default, best = TrainAugmentation(), transforms.AUGMENT_CHUNK, {}
    try:
        for _ in range(rounds):
            for chunk in chunks:
                transforms.AUGMENT_CHUNK = chunk
                started = time.process_time()
                augment_hwc(images, augmentation)
                best[chunk] = max(best.get(chunk, 0.0), len(images) / (time.process_time() - started))
    finally:
        transforms.AUGMENT_CHUNK = default
        torch.set_num_threads(os.cpu_count() or 1)
    return {str(chunk): round(rate, 1) for chunk, rate in best.items()}


class JpegFolder(torch.utils.data.Dataset):
    """The JPEGs extracted to local files, one image per item (the published solution's way)."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.transform = paths, OneByOne(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(self.transform(self.paths[i].read_bytes())), 0


class TarShards(torch.utils.data.IterableDataset):
    """Every member of the tar shards, decoded and augmented: each DataLoader worker streams its share of the shards
    (opened as Ray Data opens them, a 32 MB buffered stream), in a new shard order every pass."""

    def __init__(self, uris: list[str], storage: StorageConfig, size: int):
        self.uris, self.storage, self.size, self.passes = uris, storage, size, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = np.random.default_rng([0, self.passes]).permutation(len(self.uris))  # the same in every worker
        self.passes += 1
        transform = OneByOne(self.size)
        for i in order[worker::workers]:
            loc = resolve(self.uris[i], self.storage)
            with (loc.fs.open_input_stream(loc.path, buffer_size=32 * 2**20) as f,
                  tarfile.open(fileobj=f, mode="r|") as tar):
                for member in tar:
                    if member.isreg():
                        yield torch.from_numpy(transform(tar.extractfile(member).read())), 0


def dataloader(dataset, workers: int) -> torch.utils.data.DataLoader:
    # Spawned workers: a forked copy of a process that has used pyarrow's S3 client can hang in it.
    return torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=not isinstance(dataset, torch.utils.data.IterableDataset),
        num_workers=workers, persistent_workers=True, multiprocessing_context="spawn",
    )


DRIVER = "driver: consumer (and its decoding in (d)) and Ray Data's executor"
SERVER = "S3 server (moto)"
RAY_WORKERS = "Ray worker processes: read and decode tasks, idle workers"
RAY_SYSTEM = "Ray system processes: raylet, GCS, agents"
LOADER_WORKERS = "DataLoader worker processes"
WHOLE_MACHINE = "whole machine (other programs included)"
WORK_ITSELF = "decode + augment work itself (images/s / best images per CPU-second)"


def cpu_seconds_by_process(server_pid: int) -> dict:
    """CPU seconds used so far by each process of this run (this process and its descendants), as pid -> (kind of
    process, seconds), and by the whole machine (other programs on a shared machine count only there)."""
    import psutil  # Ray's own copy: importing ray (pipeline.py does) puts ray/thirdparty_files on sys.path

    me = psutil.Process()
    times = me.cpu_times()
    processes = {me.pid: (DRIVER, times.user + times.system)}
    for proc in me.children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        if proc.pid == server_pid:
            group = SERVER
        elif cmd.startswith("ray::") or "default_worker.py" in cmd:
            group = RAY_WORKERS
        elif any(name in cmd for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "ray/")):
            group = RAY_SYSTEM
        elif "multiprocessing" in cmd:
            group = LOADER_WORKERS
        else:
            continue
        processes[proc.pid] = (group, times.user + times.system)
    machine_times = psutil.cpu_times()
    return {"processes": processes, WHOLE_MACHINE: machine_times.user + machine_times.system + machine_times.nice}


def cpu_seconds_by_group(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds each kind of process used between two readings of :func:`cpu_seconds_by_process`, counting only
    processes alive at the second: one that ended between them (Ray retires idle workers) left no last reading, and
    its CPU is counted with the whole machine's alone."""
    groups = {WHOLE_MACHINE: after[WHOLE_MACHINE] - before[WHOLE_MACHINE]}
    for pid, (group, seconds) in after["processes"].items():
        _, earlier = before["processes"].get(pid, (group, 0.0))
        groups[group] = groups.get(group, 0.0) + seconds - earlier
    return groups


def ray_worker_start_times() -> list[float]:
    """When each Ray worker process of this run started (epoch seconds)."""
    import psutil  # Ray's own copy: importing ray (pipeline.py does) puts ray/thirdparty_files on sys.path

    started = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            if cmd.startswith("ray::") or "default_worker.py" in cmd:
                started.append(proc.create_time())
        except psutil.Error:
            continue
    return started


def timed_pass(batches, server_pid: int) -> dict:
    """One pass over ``batches`` (dicts with a ``label`` column, or DataLoader pairs): images/s, seconds to the first
    batch, and the cores each kind of process kept busy meanwhile (and the S3 server's CPU seconds)."""
    before = cpu_seconds_by_process(server_pid)
    started, n, first = time.perf_counter(), 0, None
    wall_started = time.time()
    for batch in batches:
        n += len(batch["label"] if isinstance(batch, dict) else batch[1])
        first = first or time.perf_counter() - started
    seconds = time.perf_counter() - started
    used = cpu_seconds_by_group(before, cpu_seconds_by_process(server_pid))
    cpu = {g: round(used[g] / seconds, 2) for g in used}  # cores busy, on average
    # CPU of processes that ended during the pass (Ray replaces idle workers) and of other programs on the machine.
    cpu["other: processes that exited during the pass, other programs"] = round(
        cpu[WHOLE_MACHINE] - sum(v for g, v in cpu.items() if g != WHOLE_MACHINE), 2)
    return {"images_per_s": n / seconds, "images": n, "seconds": seconds, "first_batch_s": first,
            "started": wall_started, "cores_busy": cpu, "server_cpu_s": used.get(SERVER, 0.0)}


def stream_batches(cfg: DataConfig, worker_decode: bool = False):
    """A function giving one pass of the train stream as training consumes it (``batches.train_batches``)."""
    stream = train_stream(cfg, worker_decode=worker_decode)
    return lambda: train_batches(stream.dataset.iterator(), cfg, batch_size=BATCH, device=torch.device("cpu"),
                                 counter=stream.counter, worker_decode=worker_decode)


def two_stage_batches(cfg: DataConfig):
    """``stream_batches`` with the read and the decode in separate tasks: the read stage's rows (blocks of
    ``pipeline.READ_BLOCK_ROWS``), then ``decode_images`` on batches of ``data.decode_batch_size``, which Ray Data
    runs as a second operator."""
    stream = train_stream(cfg, worker_decode=True)
    dataset = stream.dataset.map_batches(
        decode_images, fn_kwargs=dict(image_size=cfg.image_size, preprocessing=cfg.preprocessing, augment=cfg.augment,
                                      keep_ids=False, counter=stream.counter),
        batch_size=cfg.decode_batch_size, batch_format="numpy", num_cpus=cfg.decode_cpus)
    return lambda: train_batches(dataset.iterator(), cfg, batch_size=BATCH, device=torch.device("cpu"),
                                 counter=stream.counter, worker_decode=False)


def import_seconds() -> float:
    """What a fresh Ray worker pays before its first read or decode task: importing the pipeline's modules (Ray,
    pyarrow, torch, PIL) in a new interpreter."""
    import subprocess

    code = ("import time; t = time.perf_counter(); import ray_landmark.data.pipeline, ray_landmark.data.transforms; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return float(out.stdout.strip().splitlines()[-1])


def read_stage_pass(cfg: DataConfig, server_pid: int) -> dict:
    """One pass of the read stage alone (rows of JPEG bytes, nothing decoded): images, bytes fetched, requests,
    seconds and the S3 server's CPU seconds."""
    stream = train_stream(cfg, worker_decode=True)
    before = cpu_seconds_by_process(server_pid)
    started, images = time.perf_counter(), 0
    for batch in stream.dataset.iter_batches(batch_size=256):
        images += len(batch["id"])
    seconds = time.perf_counter() - started
    counts = stream.counts()
    return {"images": images, "bytes": counts.get("bytes_read", 0), "requests": counts.get("range_requests"),
            "seconds": round(seconds, 2),
            "server_cpu_s": round(cpu_seconds_by_group(before, cpu_seconds_by_process(server_pid)).get(SERVER, 0.0),
                                  2)}


def _closest(paths: dict[str, float]) -> str:
    name = max(paths, key=paths.get)
    return f"{name} ({paths[name]:.2f} of the ceiling)"


# The timed paths: label -> (what it is, its source).
PATHS = {
    "dataloader_files": "(b) torch DataLoader, extracted local files",
    "dataloader_tars_local": "(b) torch DataLoader streaming the tars, local tars",
    "dataloader_tars_s3": "(b) torch DataLoader streaming the tars, S3 server",
    "ray_local": "(c) Ray Data streaming the tars, local tars",
    "ray_s3": "(c) Ray Data streaming the tars, S3 server",
    "ray_s3_ranged": "(c) Ray Data, ranged reads through the shard index, S3 server",
    "ray_s3_two_stages": "(c) Ray Data streaming the tars, read and decode in separate tasks, S3 server",
    "ray_s3_gldv2c": "(c) Ray Data streaming the tars, S3 server, GLDv2c",
    "ray_s3_gldv2c_ranged": "(c) Ray Data, ranged reads through the shard index, S3 server, GLDv2c",
    "worker_decode_s3": "(d) Ray Data streaming JPEG bytes, decoded in the consumer, S3 server",
}
GAPS = (0, 4096, 65536, 2**20, 16 * 2**20)  # data.range_gap_bytes measured under GLDv2c


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500, help="about this many train images")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--agreement", type=float, default=0.05,
                        help="two passes of a path after the warm-up round agree within this fraction")
    parser.add_argument("--min-rounds", type=int, default=3, help="rounds of one pass of each path, the warm-up "
                                                                  "included, before the passes may be judged settled")
    parser.add_argument("--max-rounds", type=int, default=8,
                        help="rounds at most, however far apart the passes of a path still are")
    parser.add_argument("--processes", type=int, help="(a): plain loops in 1 .. this many processes (default: "
                                                      "cores + 1)")
    parser.add_argument("--gaps", default=",".join(map(str, GAPS)),
                        help="(e): the data.range_gap_bytes measured under GLDv2c, comma-separated")
    parser.add_argument("--no-write", action="store_true", help="print the results; leave the JSON and BENCHMARKS.md")
    parser.add_argument("--previous", type=Path, metavar="RESULTS",
                        help="an earlier run's results file (benchmarks/results/data_pipeline.json): its ratios are "
                             "kept beside this run's, so that the section shows two runs")
    add_jpeg_option(parser)
    add_out_option(parser)
    args = parser.parse_args()
    if not 3 <= args.min_rounds <= args.max_rounds:
        parser.error("--min-rounds must be 3 or more (a warm-up round, then two passes that can agree) and at most "
                     "--max-rounds")
    args.processes = args.processes or (os.cpu_count() or 1) + 1
    args.gaps = [int(gap) for gap in args.gaps.split(",")]
    return args


def write_sources(spec: SyntheticSpec, folder: Path, storage: StorageConfig) -> tuple[Location, Location]:
    """The same dataset (deterministic from the seed) in a local folder and in the bucket of the S3 server, each with
    its manifests and shard index."""
    local_root, s3_root = resolve(str(folder / "gldv2")), resolve("s3://bench/gldv2", storage)
    for root in (local_root, s3_root):
        write_synthetic_gldv2(spec, root, progress=None)
        prepare_manifests(root, root.child("manifest"), progress=None,
                          shard_index=dataset_shard_index(root, progress=None))
    return local_root, s3_root


def extract_jpegs(train: Path, shard_names: list[str], folder: Path) -> tuple[list[bytes], list[Path]]:
    """The JPEGs of the tar shards in ``train``, held in memory and extracted to files under ``folder`` (what the
    published solution trains from)."""
    blobs: list[bytes] = []
    paths: list[Path] = []
    for shard in shard_names:
        with tarfile.open(train / shard) as tar:
            for m in tar:
                if m.isreg():
                    blob = tar.extractfile(m).read()
                    path = folder / m.name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(blob)
                    blobs.append(blob)
                    paths.append(path)
    return blobs, paths


def measure_plain_loops(blob_file: str, size: int, max_processes: int) -> tuple[dict, dict]:
    """(a): the wall-clock images/s of each kind of work in 1 .. ``max_processes`` processes, and each kind's best
    images per CPU-second."""
    plain: dict[str, dict[int, float]] = {work: {} for work in WORKS}
    per_cpu_second: dict[str, float] = {}
    for work in WORKS:
        for processes in range(1, max_processes + 1):
            rate, efficiency = plain_loops(blob_file, size, processes, work)
            plain[work][processes] = round(rate, 1)
            per_cpu_second[work] = round(max(per_cpu_second.get(work, 0.0), efficiency), 1)
            print(f"(a) plain loops, {work}, {processes} process(es): {rate:.1f} img/s, "
                  f"{efficiency:.1f} images per CPU-second")
    return plain, per_cpu_second


def ray_paths(cfg: DataConfig, local_root: Location) -> dict:
    """(c) and (d): a function giving one pass of each, from S3 first (its first pass is the one taken apart: Ray's
    workers start during it)."""
    ranged, gldv2c = {"ranged_reads": True}, {"view": "gldv2c"}
    return {
        "ray_s3": stream_batches(cfg),
        "ray_local": stream_batches(cfg.model_copy(update={"root": local_root.uri})),
        "ray_s3_ranged": stream_batches(cfg.model_copy(update=ranged)),
        "ray_s3_two_stages": two_stage_batches(cfg),
        "ray_s3_gldv2c": stream_batches(cfg.model_copy(update=gldv2c)),
        "ray_s3_gldv2c_ranged": stream_batches(cfg.model_copy(update={**ranged, **gldv2c})),
        "worker_decode_s3": stream_batches(cfg.model_copy(update={"decode": "worker"}), worker_decode=True),
    }


def pass_order(ray: dict, loaders: dict) -> dict:
    """Every path's pass function in the order a round runs them: the DataLoaders' passes between Ray's, one at a
    time, so that Ray's workers never idle for long. Ray retires workers idle for a minute (runtime.init_ray) and new
    ones import torch first: with the DataLoaders' passes in a row, the Ray pass after them saw worker processes exit
    during it in every round."""
    order = {}
    loader_items = list(loaders.items())
    for i, (name, one_pass) in enumerate(ray.items()):
        order[name] = one_pass
        if i < len(loader_items):
            loader_name, loader = loader_items[i]
            order[loader_name] = lambda loader=loader: loader
    return order


def mean_pass(pair: list[dict]) -> dict:
    """Two passes of a path as one: the mean of their rates, times, first batches, S3 server CPU and cores busy."""
    first, second = pair
    groups = dict.fromkeys([*first["cores_busy"], *second["cores_busy"]])
    return {**{key: (first[key] + second[key]) / 2
               for key in ("images_per_s", "seconds", "first_batch_s", "server_cpu_s")},
            "images": first["images"],
            "cores_busy": {g: round((first["cores_busy"].get(g, 0.0) + second["cores_busy"].get(g, 0.0)) / 2, 2)
                           for g in groups}}


def settle(passes: dict[str, list[dict]], agreement: float) -> dict[str, dict]:
    """Each path's two closest passes after the warm-up round, as one (``mean_pass``), their spread, and whether they
    agree within ``agreement``."""
    settled = {}
    for name, runs in passes.items():
        pair, spread = closest_pair(runs[1:])
        settled[name] = {"pass": mean_pass(pair), "spread": spread, "settled": spread <= agreement}
    return settled


def run_rounds(paths: dict, args: argparse.Namespace, server_pid: int) -> tuple[dict[str, list[dict]], list[float],
                                                                                 list[float]]:
    """Round robin, one pass of each path per round, so that a busy spell on the shared machine hits them alike
    (round 0 warms up: worker processes start), until every path has two passes after it within ``--agreement``
    (at least ``--min-rounds`` rounds, at most ``--max-rounds``): every pass of each path, when the Ray workers that
    started during the first pass from S3 did (seconds after it began), and the load average after each round."""
    passes: dict[str, list[dict]] = {name: [] for name in paths}
    workers_started: list[float] = []
    loads: list[float] = []
    for round_ in range(args.max_rounds):
        for name, one_pass in paths.items():
            passes[name].append(timed_pass(one_pass(), server_pid))
            if round_ == 0 and name == "ray_s3":
                run = passes[name][-1]
                workers_started = [t - run["started"] for t in ray_worker_start_times()
                                   if run["started"] <= t <= run["started"] + run["seconds"]]
            print(f"round {round_}: {name} {passes[name][-1]['images_per_s']:.1f} img/s, S3 server "
                  f"{passes[name][-1]['server_cpu_s']:.2f} CPU-s")
        loads.append(round(os.getloadavg()[0], 2))
        unsettled = list(paths) if round_ < 2 else [  # before round 2, fewer than two passes after the warm-up
            name for name, path in settle(passes, args.agreement).items() if not path["settled"]]
        print(f"round {round_}: load average {loads[-1]}; "
              f"{'every path settled' if not unsettled else 'not yet settled: ' + ', '.join(unsettled)}", flush=True)
        if round_ + 1 >= args.min_rounds and not unsettled:
            break
    return passes, workers_started, loads


def first_pass_summary(cold: dict, steady: dict, workers_started: list[float], imports: float,
                       ray_started: float) -> dict:
    """The first pass of Ray Data from S3 taken apart, against its steady passes after it (``steady``: the mean of
    the two closest)."""
    return {
        "seconds": round(cold["seconds"], 2),
        "images_per_s": round(cold["images_per_s"], 1),
        "steady_seconds_for_the_same_images": round(cold["images"] / steady["images_per_s"], 2),
        "first_batch_s": round(cold["first_batch_s"], 2),
        "steady_first_batch_s": round(steady["first_batch_s"], 2),
        "ray_workers_started_during_it_and_alive_at_its_end": len(workers_started),
        "last_ray_worker_started_after_s": round(max(workers_started), 2) if workers_started else None,
        "import_seconds_per_fresh_worker": imports,
        "seconds_from_ray_init_to_it": round(cold["started"] - ray_started, 2),
    }


def view_mean_jpeg(cfg: DataConfig) -> dict[str, float]:
    """The mean JPEG size of each view's train images, from the shard index."""
    manifest = open_manifest(cfg)
    index = manifest.shard_index("train")
    return {view: float(index.loc[index["id"].isin(manifest.view_images(view)["id"].to_numpy(np.uint64)),
                                  "size"].mean()) for view in ("full", "gldv2c")}


def bytes_read_rows(cfg: DataConfig, server_pid: int, view_mean: dict[str, float]) -> dict[str, dict]:
    """(e): the read stage alone from S3, whole shards streamed and ranged through the shard index, for each view."""
    rows = {}
    for view in ("full", "gldv2c"):
        for label, ranged in (("streamed", False), ("ranged", True)):
            run = read_stage_pass(cfg.model_copy(update={"view": view, "ranged_reads": ranged}), server_pid)
            run["bytes_per_image"] = round(run["bytes"] / run["images"])
            run["bytes_per_image_vs_view"] = round(run["bytes_per_image"] / view_mean[view], 3)
            rows[f"{view}_{label}"] = run
            print(f"(e) {view} {label}: {run}")
    return rows


def range_gap_rows(cfg: DataConfig, server_pid: int, mean_jpeg: float, gaps: list[int]) -> dict[int, dict]:
    """(e): the read stage under GLDv2c with the shard index for each ``data.range_gap_bytes``, the faster of two
    passes each."""
    rows: dict[int, dict] = {}
    for round_ in range(2):
        for gap in gaps:
            run = read_stage_pass(cfg.model_copy(update={"view": "gldv2c", "ranged_reads": True,
                                                        "range_gap_bytes": gap}), server_pid)
            if round_ == 0 or run["seconds"] < rows[gap]["seconds"]:
                run["bytes_per_image_vs_view"] = round(run["bytes"] / run["images"] / mean_jpeg, 3)
                run["images_per_s"] = round(run["images"] / run["seconds"], 1)
                rows[gap] = run
    for gap, run in rows.items():
        print(f"(e) gldv2c, range_gap_bytes {gap}: {run}")
    return rows


def measure(args: argparse.Namespace, spec: SyntheticSpec, cores: int) -> dict:
    """Every measurement of the run, from the sources it writes (a local folder, the local S3 server's bucket)."""
    use_test_credentials()
    with LocalS3Server() as s3, tempfile.TemporaryDirectory() as tmp:
        server_pid = s3._process.pid
        s3.create_bucket("bench")
        storage = StorageConfig(endpoint_url=s3.endpoint_url)
        print("writing synthetic shards ...")
        local_root, s3_root = write_sources(spec, Path(tmp), storage)
        shard_names = [gldv2.shard_name(i) for i in range(args.shards)]
        blobs, paths = extract_jpegs(Path(local_root.path) / "train", shard_names, Path(tmp) / "files")
        print(f"{len(blobs)} JPEGs of {spec.width}x{spec.height} ({np.mean([len(b) for b in blobs]) / 1e3:.0f} KB), "
              f"output {args.size} px, {cores} cores")
        blob_file = Path(tmp) / "blobs.pickle"
        blob_file.write_bytes(pickle.dumps(blobs))
        plain, per_cpu_second = measure_plain_loops(str(blob_file), args.size, args.processes)
        imports = round(import_seconds(), 2)
        print(f"importing the pipeline's modules in a fresh interpreter: {imports} s")
        chunk_rates = augmentation_chunk_rates(blobs, args.size)
        print(f"the augmentation alone, images per CPU-second by images augmented together: {chunk_rates}")

        loaders = {
            "dataloader_files": dataloader(JpegFolder(paths, args.size), cores),
            **{f"dataloader_tars_{where}": dataloader(TarShards(
                [root.child("train", s).uri for s in shard_names], storage, args.size), cores)
               for where, root in (("local", local_root), ("s3", s3_root))},
        }
        init_ray()
        ray_started = time.time()
        cfg = DataConfig(root=s3_root.uri, storage=storage, view="full", image_size=args.size, shuffle_buffer=256,
                         ranged_reads=False)
        passes, workers_started, loads = run_rounds(pass_order(ray_paths(cfg, local_root), loaders), args, server_pid)
        settled = settle(passes, args.agreement)
        first_pass = first_pass_summary(passes["ray_s3"][0], settled["ray_s3"]["pass"], workers_started, imports,
                                        ray_started)
        print(f"the first pass from S3: {first_pass}")
        view_mean = view_mean_jpeg(cfg)
        bytes_rows = bytes_read_rows(cfg, server_pid, view_mean)
        gap_rows = range_gap_rows(cfg, server_pid, view_mean["gldv2c"], args.gaps)
        ray.shutdown()
    return {"images": len(blobs), "mean_jpeg": float(np.mean([len(blob) for blob in blobs])), "plain": plain,
            "per_cpu_second": per_cpu_second, "chunk_rates": chunk_rates, "passes": passes, "settled": settled,
            "loads": loads, "first_pass": first_pass,
            "view_mean": view_mean, "bytes_rows": bytes_rows, "gap_rows": gap_rows}


def steady_numbers(settled: dict[str, dict], per_cpu_second: dict[str, float]) -> tuple[dict, dict, dict, dict]:
    """Each path's two closest passes after the first as one (``settle``), its rate, its S3 server CPU and its
    CPU-milliseconds per image."""
    steady = {name: path["pass"] for name, path in settled.items()}
    rate = {name: round(run["images_per_s"], 1) for name, run in steady.items()}
    server = {name: {"cpu_s_per_pass": round(run["server_cpu_s"], 2),
                     "cpu_ms_per_image": round(1e3 * run["server_cpu_s"] / run["images"], 2),
                     "cores_busy": run["cores_busy"].get(SERVER, 0.0)} for name, run in steady.items()}
    for name in ("ray_s3", "ray_s3_ranged", "ray_s3_two_stages", "ray_s3_gldv2c", "ray_s3_gldv2c_ranged",
                 "worker_decode_s3"):
        steady[name]["cores_busy"][WORK_ITSELF] = round(
            rate[name] / per_cpu_second["worker_fast" if name.startswith("worker") else "ray_task_fast"], 2)
    # CPU-milliseconds per delivered image of this run's processes (the S3 server's included): how much work each path
    # spends per image, whatever share of the cores other programs took meanwhile.
    ours = (DRIVER, SERVER, RAY_WORKERS, RAY_SYSTEM, LOADER_WORKERS)
    cpu_ms = {name: round(1e3 * sum(run["cores_busy"].get(g, 0.0) for g in ours) / run["images_per_s"], 1)
              for name, run in steady.items()}
    return steady, rate, server, cpu_ms


# The ratios of rates: name -> (the path over, the path under; "ceiling" is (a)).
RATE_RATIOS = {
    "stream_vs_dataloader_same_source_s3": ("ray_s3", "dataloader_tars_s3"),
    "stream_vs_dataloader_same_source_local": ("ray_local", "dataloader_tars_local"),
    # The default path (ranged reads through the shard index) against the same DataLoader.
    "ranged_vs_dataloader_same_source_s3": ("ray_s3_ranged", "dataloader_tars_s3"),
    "stream_s3_vs_dataloader_files": ("ray_s3", "dataloader_files"),
    "ranged_vs_streamed_s3_full": ("ray_s3_ranged", "ray_s3"),
    "two_stages_vs_one_s3": ("ray_s3_two_stages", "ray_s3"),
    "ranged_vs_streamed_s3_gldv2c": ("ray_s3_gldv2c_ranged", "ray_s3_gldv2c"),
    "stream_s3_vs_ceiling": ("ray_s3", "ceiling"),
    "stream_local_vs_ceiling": ("ray_local", "ceiling"),
    "dataloader_tars_s3_vs_ceiling": ("dataloader_tars_s3", "ceiling"),
    "dataloader_files_vs_ceiling": ("dataloader_files", "ceiling"),
    "worker_decode_vs_ceiling": ("worker_decode_s3", "ceiling"),
}


def round_ratios(every_pass: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each ratio of two paths (the ceiling's aside) in every round after the warm-up: the pass of the path over, over
    the pass of the path under in the same round."""
    return {name: [round(a / b, 3) for a, b in zip(every_pass[over][1:], every_pass[under][1:])]
            for name, (over, under) in RATE_RATIOS.items() if under != "ceiling"}


def ratio_spreads(spreads: dict[str, float], per_round: dict[str, list[float]]) -> dict[str, float]:
    """The spread of each ratio: the range of its per-round ratios (top over bottom, less 1), or for a ratio to the
    ceiling (computed from CPU time, without a spread) the path's own."""
    return {name: round(max(per_round[name]) / min(per_round[name]) - 1 if name in per_round else spreads[over], 3)
            for name, (over, _) in RATE_RATIOS.items()}


def path_ratios(rate: dict[str, float], ceiling: float, per_round: dict[str, list[float]],
                per_cpu_second: dict[str, float], bytes_rows: dict[str, dict]) -> dict:
    """Each ratio of two paths, the median of its per-round ratios; each ratio to the ceiling, the path's rate over
    it; and the plain loops' and the bytes' ratios."""
    return {
        **{name: round(statistics.median(per_round[name]) if name in per_round else rate[over] / ceiling, 3)
           for name, (over, _) in RATE_RATIOS.items()},
        "original_vs_fast_per_cpu_second": round(
            per_cpu_second["ray_task_original"] / per_cpu_second["ray_task_fast"], 3),
        "bytes_per_image_vs_view": {name: run["bytes_per_image_vs_view"] for name, run in bytes_rows.items()},
    }


def results_of(args: argparse.Namespace, spec: SyntheticSpec, cores: int, load_before: float, measured: dict) -> dict:
    """The results file's contents."""
    per_cpu_second = measured["per_cpu_second"]
    ceiling_work = max(per_cpu_second, key=per_cpu_second.get)
    ceiling = round(cores * per_cpu_second[ceiling_work], 1)
    settled = measured["settled"]
    steady, rate, server, cpu_ms = steady_numbers(settled, per_cpu_second)
    spreads = {name: path["spread"] for name, path in settled.items()}
    every_pass = {name: [round(r["images_per_s"], 1) for r in runs] for name, runs in measured["passes"].items()}
    per_round = round_ratios(every_pass)
    return {
        "benchmark": "data_pipeline",
        "machine": machine(),
        "setup": {
            "images": measured["images"], "source": f"{spec.width}x{spec.height} JPEG q{spec.jpeg_quality}",
            "mean_jpeg_kb": round(measured["mean_jpeg"] / 1e3, 1),
            "output_px": args.size, "augment": "the 2021 solution's train augmentation", "shards": args.shards,
            "batch_size": BATCH, "workers_or_processes": cores, "rounds": len(measured["loads"]),
            "agreement": args.agreement, "min_rounds": args.min_rounds, "max_rounds": args.max_rounds,
            "ray_logical_cpus": max(4, 2 * cores), "load_average_at_start": round(load_before, 2),
            "load_average_after_each_round": measured["loads"], "load_average_at_end": round(os.getloadavg()[0], 2),
            "range_gap_bytes": DataConfig.model_fields["range_gap_bytes"].default,
            "view_mean_jpeg_bytes": {view: round(mean) for view, mean in measured["view_mean"].items()},
        },
        "plain_loops_images_per_second": measured["plain"],
        "plain_loops_images_per_cpu_second": per_cpu_second,
        "ceiling": {"images_per_s": ceiling, "work": ceiling_work,
                    "definition": "cores x the best images per CPU-second of plain loops over in-memory JPEGs, over "
                                  "1..cores+1 processes sharing the work chunk by chunk and over every kind of work"},
        "images_per_second": {"ceiling": ceiling, **rate},
        "augmentation_images_per_cpu_second_by_chunk": measured["chunk_rates"],
        "every_pass_images_per_second": every_pass,
        "path_spreads": {name: round(spread, 3) for name, spread in spreads.items()},
        "unsettled_paths": [name for name, path in settled.items() if not path["settled"]],
        "ratios": path_ratios(rate, ceiling, per_round, per_cpu_second, measured["bytes_rows"]),
        "ratio_spreads": ratio_spreads(spreads, per_round),
        "round_ratios": per_round,
        "s3_server": server,
        "cores_busy": {name: run["cores_busy"] for name, run in steady.items()},
        "cpu_ms_per_image": cpu_ms,
        "first_pass_ray_s3": measured["first_pass"],
        "bytes_read": measured["bytes_rows"],
        "range_gap_bytes_gldv2c": {str(gap): run for gap, run in measured["gap_rows"].items()},
        "targets": {"bytes_per_image_vs_view (gldv2c, with the index)": "<= 1.1",
                    "stream_vs_dataloader_same_source_s3": ">= 0.9"},
    }


# What --previous keeps of an earlier run: enough to set its ratios beside this run's and judge how quiet it was;
# ``round_ratios`` marks a run whose ratios are medians of rounds, as this version's are (not closest pairs).
PREVIOUS_RUN_KEYS = ("machine", "setup", "unsettled_paths", "ratios", "ratio_spreads", "round_ratios")
# The ratios the two runs are compared by, side by side.
COMPARED_RATIOS = ("stream_vs_dataloader_same_source_s3", "ranged_vs_dataloader_same_source_s3",
                   "stream_vs_dataloader_same_source_local", "stream_s3_vs_dataloader_files",
                   "ranged_vs_streamed_s3_full", "ranged_vs_streamed_s3_gldv2c")


def read_previous(path: Path) -> dict:
    """The earlier run's results that ``--previous`` names, or one line on why they cannot be used."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"--previous {path}: cannot read it as JSON ({err})") from None
    missing = [key for key in PREVIOUS_RUN_KEYS if key not in previous]
    if missing or not set(COMPARED_RATIOS) <= set(previous.get("ratio_spreads", {})):
        raise SystemExit(f"--previous {path}: not the results of a run of this benchmark with per-round ratios "
                         f"(missing {', '.join(missing) or 'ratio spreads'}); pass a results file this version wrote")
    return previous


def main() -> None:
    args = parse_args()
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    spec = SyntheticSpec(
        num_landmarks=max(2, args.images // 12), max_images_per_landmark=60, min_images_per_landmark=8,
        test_landmark_images=2, test_non_landmark_images=1, index_distractor_landmarks=0,
        width=args.jpeg[0], height=args.jpeg[1], train_shards=args.shards, jpeg_quality=90,
    )
    previous = read_previous(args.previous) if args.previous else None  # read first: a wrong file fails now
    payload = results_of(args, spec, cores, load_before, measure(args, spec, cores))
    if previous:
        payload["previous_run"] = {key: previous[key] for key in PREVIOUS_RUN_KEYS}
    if args.no_write:
        print(json.dumps(payload, indent=2))
    else:
        publish("data_pipeline", payload, benchmarks_md(payload), args.out)


def _workers_text(first: dict) -> str:
    if first.get("ray_workers_started_during_it_and_alive_at_its_end") is None:
        return "(the Ray workers started during it were not counted in this run) "
    return (f"{first['ray_workers_started_during_it_and_alive_at_its_end']} Ray worker processes started during it "
            f"(and were still there at its end), the last {first['last_ray_worker_started_after_s']} s in; ")


def _default_text(payload: dict) -> str:
    """Why the defaults are what they are, from this run's numbers."""
    ratios, bytes_read, gaps = payload["ratios"], payload["bytes_read"], payload["range_gap_bytes_gldv2c"]
    default_gap = payload["setup"]["range_gap_bytes"]
    fewer = {view: bytes_read[f"{view}_ranged"]["bytes"] / bytes_read[f"{view}_streamed"]["bytes"]
             for view in ("full", "gldv2c")}
    speed = {"the full view": "ranged_vs_streamed_s3_full", "GLDv2c": "ranged_vs_streamed_s3_gldv2c"}
    slower = [view for view, name in speed.items() if ratios[name] < 0.95]
    verdict = ("and it was not slower here (images/s, ranged vs streamed: " + ", ".join(
        f"{_ratio(payload, name)} under {view}" for view, name in speed.items()) + ")" if not slower else
        "though here it ran at " + ", ".join(f"{_ratio(payload, speed[view])} of streaming's rate under {view}"
                                             for view in slower))
    gap = gaps.get(str(default_gap))
    gap_text = (f" The default `data.range_gap_bytes` ({default_gap:,}) fetched "
                f"{gap['bytes_per_image_vs_view']} of GLDv2c's bytes in {gap['requests']} requests, against "
                f"{gaps['0']['bytes_per_image_vs_view']} in {gaps['0']['requests']} without merging"
                if gap and "0" in gaps else "")
    return (f"**The defaults.** `data.ranged_reads: true`, used wherever the manifest has the shard index: it fetched "
            f"{fewer['gldv2c']:.2f} of the bytes that streaming whole shards fetched under GLDv2c and "
            f"{fewer['full']:.3f} under the full view (the tar headers it skips), {verdict}. On these 2 cores with "
            f"the server next to the reader, bytes cost little time; on a real bucket they are GLDv2's hundreds of GB "
            f"an epoch (docs/reproduction.md).{gap_text}.")


def benchmarks_md(payload: dict) -> str:
    """This benchmark's section of BENCHMARKS.md, from its results."""
    return "\n".join([_setup_md(payload), _throughput_md(payload), _bytes_md(payload), _first_pass_md(payload),
                      _cpu_md(payload)])


def _ratio(payload: dict, name: str) -> str:
    """A ratio of rates with its spread beside it."""
    return f"{payload['ratios'][name]} (spread {100 * payload['ratio_spreads'][name]:.1f} %)"


def _two_runs_md(payload: dict) -> str:
    """The ratios of this run and of the earlier one (``--previous``) side by side, where there is one."""
    previous = payload.get("previous_run")
    if not previous:
        return "One run is recorded (`--previous` sets an earlier run's ratios beside this one's)."
    table = markdown_table(["ratio", "this run", "the run before"],
                           [[f"`{name}`", _ratio(payload, name), _ratio(previous, name)] for name in COMPARED_RATIOS])
    loads = previous["setup"]["load_average_after_each_round"]
    unsettled = ", ".join(previous["unsettled_paths"]) or "none"
    # Two runs disagree on a ratio where they differ by more than the larger of their spreads.
    apart = [f"`{name}`" for name in COMPARED_RATIOS
             if abs(payload["ratios"][name] - previous["ratios"][name])
             / min(payload["ratios"][name], previous["ratios"][name])
             > max(payload["ratio_spreads"][name], previous["ratio_spreads"][name])]
    verdict = (f"\n\nThe two runs disagree by more than their spreads on {', '.join(apart)}." if apart else
               "\n\nThe two runs agree within their spreads on every ratio.")
    return (f"Two runs, recorded one after the other on the same machine (the run before: "
            f"{previous['setup']['rounds']} rounds, load average {loads} after each, paths not settled: "
            f"{unsettled}):\n\n{table}{verdict}")


def _coverage_text(rounds: int) -> str:
    """How surely the range of ``rounds`` per-round ratios holds their median (sign test: 1 - 2 x 0.5^n)."""
    return (f"{rounds} per-round ratios, whose range holds their median with probability "
            f"{100 * (1 - 2 * 0.5 ** rounds):.0f} %")


def _settled_text(payload: dict) -> str:
    setup, unsettled = payload["setup"], payload["unsettled_paths"]
    if not unsettled:
        return f"Every path settled: two of its passes agreed within {100 * setup['agreement']:g} %."
    return (f"**Not settled** (no two passes within {100 * setup['agreement']:g} % after {setup['rounds']} rounds): "
            f"{', '.join(f'`{name}`' for name in unsettled)}; their rates and the ratios that use them are less sure "
            f"than their spreads say.")


def _setup_md(payload: dict) -> str:
    m, setup = payload["machine"], payload["setup"]
    notes = "".join("\n\n**Note on this run.** " + note for note in payload.get("notes", []))
    agreement = f"{100 * setup['agreement']:g} %"
    return f"""## Data pipeline (`python -m benchmarks.data_pipeline`)

{setup['images']} synthetic JPEGs ({setup['source']}, mean {setup['mean_jpeg_kb']} KB) in {setup['shards']} tar shards
→ {setup['output_px']} px with the train augmentation, batch {setup['batch_size']}, on {m['cores']} cores ({m['cpu']},
{m['memory_gib']} GiB), Ray {m['ray']}, torch {m['torch']}. The same shards (byte for byte) lie in a local folder and
in a bucket of the local S3 server (moto, a Python process on the same cores), each with its manifest and shard index.
Every number but the last ratio table's comes from one run. The machine may be shared with other work: the load average
was {setup['load_average_at_start']} when the run started, {setup['load_average_at_end']} when it ended and
{setup['load_average_after_each_round']} after each round (the run's own processes count in it), and rates move from
pass to pass (all passes are listed).
The paths ran round robin, one pass of each per round, so that a busy spell hits them alike, until every path had two
passes after the first round (a warm-up) within {agreement} of each other (at least {setup['min_rounds']} rounds, at
most {setup['max_rounds']}): {setup['rounds']} rounds. Each rate is the mean of the path's two closest passes, and its
spread is theirs (the faster's rate over the slower's, less 1). A comparison of two paths is the median of their
ratios round by round, and its spread is the range of those ratios, top over bottom less 1 (after the warm-up:
{_coverage_text(setup['rounds'] - 1)}); a comparison with the ceiling is the path's rate over it, with
the path's spread. {_settled_text(payload)}{notes}
"""


def _throughput_md(payload: dict) -> str:
    """(a) to (d): rates, CPU, the plain loops, the ratios, the augmentation's chunks."""
    m, setup, ratios = payload["machine"], payload["setup"], payload["ratios"]
    cores, size = m["cores"], setup["output_px"]
    plain, per_cpu_second = payload["plain_loops_images_per_second"], payload["plain_loops_images_per_cpu_second"]
    ceiling, rates, server = payload["ceiling"], payload["images_per_second"], payload["s3_server"]
    every, cpu_ms = payload["every_pass_images_per_second"], payload["cpu_ms_per_image"]
    process_counts = list(plain[WORKS[0]])
    plain_table = markdown_table(["work", *(f"{p} process{'es' if int(p) > 1 else ''}" for p in process_counts)],
                                 [[work, *plain[work].values()] for work in WORKS])
    spreads, unsettled = payload["path_spreads"], payload["unsettled_paths"]
    path_table = markdown_table(
        ["path", "images/s", "vs ceiling", "every pass", "spread of the two closest", "CPU ms per image",
         "S3 server CPU ms per image"],
        [[f"(a) ceiling: {cores} × {per_cpu_second[ceiling['work']]} ({ceiling['work']})", ceiling["images_per_s"],
          "1.00", "", "", round(1e3 / per_cpu_second[ceiling["work"]], 1), ""]]
        + [[what, rates[name], f"{rates[name] / ceiling['images_per_s']:.2f}", ", ".join(map(str, every[name])),
            f"{100 * spreads[name]:.1f} %" + (" (not settled)" if name in unsettled else ""), cpu_ms[name],
            server[name]["cpu_ms_per_image"] if "s3" in name else ""] for name, what in PATHS.items()])
    best_per_cpu_second = ", ".join(f"{work} {rate}" for work, rate in per_cpu_second.items())
    closest = _closest({what: rates[name] / ceiling["images_per_s"] for name, what in PATHS.items()})
    by_chunk = ", ".join(f"{chunk}: {rate}"
                         for chunk, rate in payload["augmentation_images_per_cpu_second_by_chunk"].items())
    return f"""### Throughput, each path from the same sources

{path_table}

CPU ms per image: the CPU time of this run's processes (consumer, workers, Ray's own, the S3 server) per delivered
image during the pass; for the ceiling, that of the plain loop. (a) the ceiling is {cores} cores × the best images
per CPU-second of plain loops doing the same work over JPEGs already in memory (one thread per process, 1 …
{process_counts[-1]} processes sharing the work chunk by chunk): no pipeline doing that work on these cores can beat
it, and unlike a wall-clock rate it does not drop when other programs take cores. When the machine runs short of
memory, Ray's memory monitor kills worker processes: the passes that replace them are slower. A process that ended
during a pass (Ray retires idle workers) counts in no group, only in "other". Plain loops, wall clock
images/s (best images per CPU-second: {best_per_cpu_second}):

{plain_table}

Like with like: Ray Data vs a DataLoader streaming the same tars, **from the S3 server
`stream_vs_dataloader_same_source_s3` = {_ratio(payload, 'stream_vs_dataloader_same_source_s3')}** (target ≥ 0.9),
from local tars {_ratio(payload, 'stream_vs_dataloader_same_source_local')}. Against the DataLoader over extracted
local files (the seed's comparison, which charged the S3 server to the Ray side only):
{_ratio(payload, 'stream_s3_vs_dataloader_files')}. Ranged reads vs whole shards streamed, both from S3:
{_ratio(payload, 'ranged_vs_streamed_s3_full')} for the full view, {_ratio(payload, 'ranged_vs_streamed_s3_gldv2c')}
for GLDv2c; the default path (ranged) vs the same DataLoader: {_ratio(payload, 'ranged_vs_dataloader_same_source_s3')}.
A pass here is {setup['images']} images, and Ray Data's first batch of a steady pass came after
{payload['first_pass_ray_s3']['steady_first_batch_s']} s of it: these ratios weigh each pass's start-up more than a
GLDv2 epoch of hours would.

{_two_runs_md(payload)}

**Why one task reads and decodes.** Each read task decodes and augments the blocks it reads (`data.decode: cpu`), and
Ray Data fuses the two into one operator. With the read and the decode in separate tasks, the pipeline's shape before,
the same stream from S3 ran at {_ratio(payload, 'two_stages_vs_one_s3')} of the fused rate and took
{cpu_ms['ray_s3_two_stages']} CPU-ms per image against {cpu_ms['ray_s3']} fused
({cpu_ms['dataloader_tars_s3']} for the DataLoader over the same tars, {round(1e3 / per_cpu_second['ray_task_fast'], 1)}
for the decode task's work alone in a plain loop). In two stages every block of JPEGs also passes through the
object store to a second task, and Ray Data schedules and buffers two operators. Closest to the ceiling: {closest}.
Original preprocessing vs fast, images per CPU-second of the plain loops: {ratios['original_vs_fast_per_cpu_second']}.

The augmentation alone on the CPU, images per CPU-second by how many {size} px images are augmented together
(`transforms.AUGMENT_CHUNK`, default {transforms.AUGMENT_CHUNK}): {by_chunk}. A whole
batch of 32 leaves the CPU's cache; a few at a time stay in it.

The S3 server's own CPU is in the table (CPU-milliseconds per delivered image): it serves the same bytes to the
DataLoader and to Ray Data when both stream whole shards, so it no longer weighs on one side only; with ranged reads
it serves fewer bytes under GLDv2c but one request per range.
"""


def _bytes_md(payload: dict) -> str:
    """(e): bytes and requests per delivered image."""
    setup, bytes_read, gaps = payload["setup"], payload["bytes_read"], payload["range_gap_bytes_gldv2c"]
    view_mean = setup["view_mean_jpeg_bytes"]
    bytes_table = markdown_table(
        ["view", "read", "images", "bytes per image", "vs the view's mean JPEG", "requests per image",
         "read stage s", "S3 server CPU s"],
        [[name.split("_")[0], "ranged (shard index)" if name.endswith("ranged") else "whole shards streamed",
          run["images"], f"{run['bytes_per_image']:,}", run["bytes_per_image_vs_view"],
          f"{run['requests'] / run['images']:.2f}" if run["requests"] else "", run["seconds"], run["server_cpu_s"]]
         for name, run in bytes_read.items()])
    gap_table = markdown_table(
        ["`range_gap_bytes`", "requests", "bytes per image vs the view's mean JPEG", "read stage images/s",
         "S3 server CPU s"],
        [[f"{int(gap):,}", run["requests"], run["bytes_per_image_vs_view"], run["images_per_s"], run["server_cpu_s"]]
         for gap, run in gaps.items()])
    gldv2c_ranged = bytes_read["gldv2c_ranged"]["bytes_per_image_vs_view"]
    return f"""### Bytes per delivered image

The read stage alone (JPEG bytes, nothing decoded) from the S3 server; bytes as the read tasks count them (whole
shards: every byte of the tar; ranged: the bytes of the ranges requested), against the mean JPEG of the view's images
({view_mean['full']:,} bytes full, {view_mean['gldv2c']:,} GLDv2c), with the default `data.range_gap_bytes`
({setup['range_gap_bytes']:,}):

{bytes_table}

**`bytes_per_image_vs_view` for GLDv2c with the index: {gldv2c_ranged}** (target ≤ 1.1; without the index
{bytes_read['gldv2c_streamed']['bytes_per_image_vs_view']}).

`data.range_gap_bytes` under GLDv2c with the index (the best of 2 passes each): a larger gap merges neighbouring
members into one request, reading the members in between too:

{gap_table}

{_default_text(payload)}
"""


def _first_pass_md(payload: dict) -> str:
    first = payload["first_pass_ray_s3"]
    return f"""### The first pass

The first pass of Ray Data from S3 ran at {first['images_per_s']} images/s: {first['seconds']} s for what a steady
pass does in {first['steady_seconds_for_the_same_images']} s. Its first batch came after {first['first_batch_s']} s
({first['steady_first_batch_s']} s in the steady pass); {_workers_text(first)}each fresh worker first imports the
pipeline's modules (Ray, pyarrow, torch, PIL): {first['import_seconds_per_fresh_worker']} s in a new interpreter here.
The pass began {first['seconds_from_ray_init_to_it']} s after `ray.init`.
"""


def _cpu_md(payload: dict) -> str:
    """Where the CPU went during each path's two closest passes."""
    busy = payload["cores_busy"]
    groups = list(dict.fromkeys(g for name in PATHS for g in busy[name]))
    shown = ["dataloader_tars_s3", "ray_s3", "ray_s3_ranged", "ray_s3_two_stages", "worker_decode_s3"]
    cpu_table = markdown_table(["processes", *shown],
                               [[g, *(busy[name].get(g, "") for name in shown)] for g in groups])
    cores = payload["machine"]["cores"]
    return f"""### Where the CPU went

Cores busy on average during each path's two closest passes (their mean, out of {cores}); the processes of this
run only, other programs in the machine's total:

{cpu_table}

Raw numbers: `{results_path("data_pipeline")}`.
"""


if __name__ == "__main__":
    main()
