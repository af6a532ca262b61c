"""The landmark service against a plain single-process loop doing the same work, for the torch and the onnxruntime
backends; with ``--load-minutes``, then a sustained load on the service (``benchmarks/serve_load.py``).

The work, both ways, by the replica's own code (``serve.app.ReplicaModels``), for each query JPEG:
``serve.app.check_image``, the decode the service does on a CPU replica (``decode_resized`` at the model's size and
preprocessing), the embedding by ``infer.embed.Embedder`` (the batch job's and the service's model wrapper; PyTorch,
or the checkpoint's ONNX export run by onnxruntime), then one
``serve.answers.answer_recognition`` per image, as the service answers each request of one image, on the index a
replica loads (``answers.load_served_index`` over the ensemble job's output). Both use the service's replica settings:
``--replica-cpus`` torch (and onnxruntime) threads, batches of up to ``--batch`` images.

(1) plain: one process, no HTTP: the images in batches, one batch at a time. At concurrency c the service cannot
    batch more than min(c, --batch) images, so plain runs at each of those batch sizes, and each concurrency level is
    compared with the plain loop at its batch size; the plain latency of an image is its batch's time;
(2) serve: the service (``ray_landmark/serve``, ``--replicas`` replicas) on 127.0.0.1, ``--requests`` POST /recognize
    of one JPEG each at concurrency 1, 8 and 32 (client threads with keep-alive sessions, on the same cores), giving
    requests/s, p50/p99 latency and the batch sizes the replica embedded (its ``model_batch_sizes``).

Passes run round robin (each path once per round, so that a busy spell of other work hits them alike), one backend
after the other, until every path has two passes within ``--agreement`` (10 %) of each other, or ``--max-rounds``;
each path reports the mean of its two closest passes and their spread, and a path whose passes never agreed says so.
The service's overhead per request at concurrency 1 is its p50 latency minus the plain loop's at batch 1; it includes
``batch_wait_timeout_s``, the wait of a lone request for others to batch with. The load average is recorded at the
start, after each round and at the end. Model: a tiny DOLG with random weights (speed does not depend on the
weights) at ``--image-size``, over a synthetic GLDv2.

    python -m benchmarks.serve [--image-size 128] [--requests 200] [--jpeg 640x480] [--backends torch,onnxruntime] \
        [--load-minutes 10] [--no-write] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import serve_load
from benchmarks.embed import make_checkpoint
from benchmarks.results_io import (add_jpeg_option, add_out_option, closest_pair, machine, publish, rate,
                                   results_path)
from ray_landmark.config import config_from_dict
from ray_landmark.data.config import DataConfig, SyntheticSpec
from ray_landmark.data.metadata import open_manifest, prepare_manifests
from ray_landmark.data.storage import resolve
from ray_landmark.data.synthetic import write_synthetic_gldv2
from ray_landmark.infer.config import EnsembleConfig
from ray_landmark.infer.ensemble import use_cpus
from ray_landmark.infer.report import read_jpegs
from ray_landmark.markdown import markdown_table
from ray_landmark.serve.answers import ServedIndex, answer_recognition, load_served_index
from ray_landmark.serve.app import ReplicaModels, check_image
from ray_landmark.serve.config import ReplicaSettings, ServeSettings

CONCURRENCY = (1, 8, 32)
MODEL = "dolg"  # the ensemble's one model
BACKENDS = ("torch", "onnxruntime")
APP = "landmark"  # the Serve application's name: its replicas' processes are named after it


def ensemble_config(folder: Path, checkpoint: str, batch: int) -> EnsembleConfig:
    """The ensemble of the one model: what the service serves, and whose settings the plain loop answers with."""
    return config_from_dict({"name": "bench", "output_dir": str(folder / "ensemble"), "report": {"queries": 0},
                             "models": [{"name": MODEL, "checkpoint": checkpoint, "family": "dolg"}],
                             "embed": {"batch_size": batch}}, "benchmark", EnsembleConfig)


def serve_settings(args, backend: str, onnx_dir: str) -> ServeSettings:
    return ServeSettings(ensemble="(in memory)", backend=backend, onnx_dir=onnx_dir, replicas={
        "num_cpus": args.replica_cpus, "num_replicas": args.replicas, "max_batch_size": args.batch,
        "batch_wait_timeout_s": args.batch_wait_s})


class PlainLoop:
    """What a replica does with each request of one image (``serve.app.ReplicaModels``, the replica's own code), in
    this process, a batch of requests at a time."""

    def __init__(self, cfg: EnsembleConfig, settings: ServeSettings, served: ServedIndex):
        self.work = ReplicaModels(settings, cfg)
        self.limits, self.served = settings.limits, served

    def answer(self, jpegs: list[bytes]) -> list[dict]:
        for data in jpegs:
            check_image(data, self.limits)
        embedded = self.work.embed_batch([self.work.decode(data) for data in jpegs])
        return [answer_recognition(self.served, {name: row[name][None] for name in self.work.models})[0]
                for row in embedded]


def percentiles(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"p50_ms": round(statistics.median(ms), 1), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1)}


def run_plain(loop: PlainLoop, queries: list[bytes], images: int, batch: int) -> dict:
    """``images`` queries (cycled) in batches of ``batch``; an image's latency is its batch's time."""
    loop.answer(queries[:batch])  # warm-up
    cycled = [queries[i % len(queries)] for i in range(images)]
    seconds, latencies, cpu_before = 0.0, [], time.process_time()
    for start in range(0, images, batch):
        chunk = cycled[start:start + batch]
        started = time.perf_counter()
        loop.answer(chunk)
        elapsed = time.perf_counter() - started
        seconds += elapsed
        latencies += [1000 * elapsed] * len(chunk)
    return {"images": images, "batch": batch, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1), **percentiles(latencies),
            "cpu_ms_per_image": round(1000 * (time.process_time() - cpu_before) / images, 2)}


def service_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this process (the clients) and of the service's HTTP proxy and replicas (its processes
    are this process's descendants on a local Ray; Ray names them after their actors)."""
    import psutil  # Ray's own copy (serve_load.replica_processes)

    def cpu(processes) -> float:
        total = 0.0
        for proc in processes.values():
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
        return total

    return {"clients": time.process_time(), "proxy": cpu(serve_load.descendants_named("ray::ProxyActor")),
            "replicas": cpu(serve_load.replica_processes(APP))}


def load_test(url: str, jpegs: list[bytes], requests_n: int, concurrency: int) -> dict:
    """``requests_n`` POST /recognize of one JPEG each, from ``concurrency`` threads; rate, latency, the batch
    sizes the service embedded them in, and the CPU milliseconds per request of the clients, the HTTP proxy and the
    replicas."""
    import requests

    latencies, batches, failures = [], [], []
    lock = threading.Lock()
    counter = iter(range(requests_n))

    def worker():
        session = requests.Session()
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            started = time.perf_counter()
            response = session.post(f"{url}/recognize", data=jpegs[n % len(jpegs)],
                                    headers={"Content-Type": "image/jpeg"}, timeout=300)
            elapsed = time.perf_counter() - started
            with lock:
                if response.status_code == 200:
                    latencies.append(1000 * elapsed)
                    batches.extend(response.json()["model_batch_sizes"])
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    cpu_before, started = service_cpu_s(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds, cpu_after = time.perf_counter() - started, service_cpu_s()
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests_n} requests failed at concurrency {concurrency}, e.g. "
                           f"{failures[0]}")
    return {"requests": requests_n, "concurrency": concurrency, "seconds": round(seconds, 2),
            "requests_per_s": round(requests_n / seconds, 1), **percentiles(latencies),
            "mean_batch": round(float(np.mean(batches)), 2),
            "cpu_ms_per_request": {k: round(1000 * (cpu_after[k] - cpu_before[k]) / requests_n, 2) for k in cpu_after}}


def agreed(passes: list[dict], agreement: float) -> dict:
    """A path's numbers: the mean of its two closest passes, their spread, and whether they agree."""
    pair, spread = closest_pair(passes)
    keys = [k for k in ("images_per_s", "requests_per_s", "p50_ms", "p99_ms", "mean_batch", "cpu_ms_per_image")
            if k in pair[0]]
    numbers = {k: round((pair[0][k] + pair[1][k]) / 2, 2) for k in keys}
    if "cpu_ms_per_request" in pair[0]:
        numbers["cpu_ms_per_request"] = {k: round((pair[0]["cpu_ms_per_request"][k] + pair[1]["cpu_ms_per_request"][k])
                                                  / 2, 2) for k in pair[0]["cpu_ms_per_request"]}
    return {**numbers, "spread": round(spread, 3), "settled": spread <= agreement, "passes": len(passes)}


def plain_batches(args) -> dict[int, int]:
    """Concurrency level -> the plain loop's batch size compared with it: the most a replica can batch there."""
    return {c: min(c, args.batch) for c in CONCURRENCY}


def measure_backend(args, loop: PlainLoop, url: str, queries: list[bytes], loads: list) -> dict[str, list[dict]]:
    """Rounds of every path of one backend, round robin, until each has two passes that agree."""
    paths = {f"plain_batch_{b}": (lambda b=b: run_plain(loop, queries, args.requests, b))
             for b in sorted(set(plain_batches(args).values()))}
    paths |= {f"serve_{c}": (lambda c=c: load_test(url, queries, args.requests, c)) for c in CONCURRENCY}
    load_test(url, queries, 8, 4)  # warm-up: the replica's first batches
    passes: dict[str, list[dict]] = {name: [] for name in paths}
    for round_n in range(1, args.max_rounds + 1):
        for name, run in paths.items():
            passes[name].append(run())
        loads.append(round(os.getloadavg()[0], 2))
        unsettled = [n for n, p in passes.items() if round_n == 1 or not agreed(p, args.agreement)["settled"]]
        print(f"[serve] round {round_n}: load average {loads[-1]}; "
              f"{'every path settled' if not unsettled else 'not yet settled: ' + ', '.join(unsettled)}", flush=True)
        if round_n >= args.min_rounds and not unsettled:
            break
    return passes


def summarise(args, passes: dict[str, list[dict]]) -> dict:
    """One backend's agreed numbers, its serve/plain ratios and its overhead per request at concurrency 1."""
    paths = {name: agreed(p, args.agreement) for name, p in passes.items()}
    batches = plain_batches(args)
    serve_vs_plain = {str(c): round(paths[f"serve_{c}"]["requests_per_s"] /
                                    paths[f"plain_batch_{batches[c]}"]["images_per_s"], 3) for c in CONCURRENCY}
    overhead = paths["serve_1"]["p50_ms"] - paths["plain_batch_1"]["p50_ms"]
    return {"paths": paths, "serve_vs_plain": serve_vs_plain, "overhead_ms_at_concurrency_1": round(overhead, 1),
            "max_requests_per_s": max(paths[f"serve_{c}"]["requests_per_s"] for c in CONCURRENCY),
            "unsettled": [name for name, p in paths.items() if not p["settled"]], "every_pass": passes}


def synthetic_set(folder: Path, image_size: int, jpeg: tuple[int, int]) -> tuple[str, list[bytes]]:
    """A synthetic GLDv2 of ``jpeg`` (width, height) JPEGs under ``folder`` and a tiny DOLG checkpoint reading it: the
    checkpoint and the JPEGs of the queries (every test image)."""
    spec = SyntheticSpec(num_landmarks=30, max_images_per_landmark=12, min_images_per_landmark=6, width=jpeg[0],
                         height=jpeg[1], test_landmark_images=48, test_non_landmark_images=16, train_shards=2,
                         clean_landmark_fraction=1.0)
    local = resolve(str(folder / "gldv2"))
    write_synthetic_gldv2(spec, local, progress=None)
    prepare_manifests(local, local.child("manifest"), progress=None)
    checkpoint = make_checkpoint(folder / "ckpt", image_size, f"data.root={local.path}")
    ids = open_manifest(DataConfig(root=local.path)).test()["id"].tolist()
    return checkpoint, list(read_jpegs(local.child("test"), ids).values())


def measure(args, folder: Path) -> tuple[dict, dict, dict | None]:
    """Each backend's rounds (the load test's backend last, so that it stays deployed), then the load test: the
    results per backend, the sizes measured, and the load test's results (None without ``--load-minutes``)."""
    from ray import serve

    from ray_landmark.infer.ensemble import run_ensemble
    from ray_landmark.local_s3 import free_port
    from ray_landmark.runtime import init_ray
    from ray_landmark.serve.app import start_service

    checkpoint, queries = synthetic_set(folder, args.image_size, args.jpeg)
    cfg = ensemble_config(folder, checkpoint, args.batch)
    init_ray()
    run_ensemble(cfg, printer=lambda line, transient=False: None)
    use_cpus(max(1, int(args.replica_cpus)))  # what serve.app gives a replica: its torch and onnxruntime threads
    served = load_served_index(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    onnx_dir, port = str(folder / "onnx"), free_port()
    results, loads, load = {}, [], None
    try:
        for backend in sorted(args.backends, key=lambda b: b == args.load_backend):
            settings = serve_settings(args, backend, onnx_dir)
            loop = PlainLoop(cfg, settings, served)  # exports the ONNX file, where the service's replicas find it
            if results:  # the backend before: its replicas go first, so that they never hold CPUs beside the new ones
                serve.delete(APP)
            print(f"[serve] {backend}: deploying the service", flush=True)
            url = start_service(settings, cfg, port=port, name=APP)
            results[backend] = summarise(args, measure_backend(args, loop, url, queries, loads))
        if args.load_minutes:
            load = serve_load.run(args, url, queries, results[args.load_backend]["max_requests_per_s"], APP)
    finally:
        serve.shutdown()
    sizes = {"queries": len(queries), **served.summary(), "load_average_after_each_round": loads}
    return results, sizes, load


def benchmarks_md(payload: dict) -> str:
    """This benchmark's section of BENCHMARKS.md, from its results."""
    m, setup, results = payload["machine"], payload["setup"], payload["results"]
    rows = []
    for backend, r in results.items():
        for name, p in r["paths"].items():
            c = int(name.rsplit("_", 1)[1])
            serve_row = name.startswith("serve")
            cpu = p["cpu_ms_per_request"] if serve_row else {"replicas": p["cpu_ms_per_image"], "proxy": "",
                                                                       "clients": ""}
            rows.append([backend, f"serve, concurrency {c}" if serve_row else f"plain, batch {c}",
                         p.get("requests_per_s", p.get("images_per_s")), p["p50_ms"], p["p99_ms"],
                         p.get("mean_batch", c), r["serve_vs_plain"][str(c)] if serve_row else "",
                         cpu["replicas"], cpu["proxy"], cpu["clients"],
                         f"{100 * p['spread']:.1f} %" + ("" if p["settled"] else " (not settled)"), p["passes"]])
    table = markdown_table(["backend", "path", "images or requests/s", "p50 ms", "p99 ms", "mean batch",
                            "serve / plain", "CPU ms per image: replica or plain loop", "HTTP proxy", "clients",
                            "spread of the two closest passes", "passes"], rows)
    overheads = "; ".join(f"{b} {r['overhead_ms_at_concurrency_1']} ms" for b, r in results.items())
    unsettled = [f"{b} {name}" for b, r in results.items() for name in r["unsettled"]]
    unsettled_text = (f" **Not settled** (no two passes within {100 * setup['agreement']:g} % after "
                      f"{setup['max_rounds']} rounds): {', '.join(unsettled)}." if unsettled else "")
    ratios = payload["ratios"]
    onnx_text = (f" onnxruntime vs torch, plain loop at batch {setup['batch']}: "
                 f"{ratios['onnxruntime_vs_torch_plain']}; the service at concurrency 32: "
                 f"{ratios['onnxruntime_vs_torch_serve_32']}." if "onnxruntime_vs_torch_plain" in ratios else "")
    load = payload["load_average"]
    return f"""## The landmark service (`python -m benchmarks.serve`)

{setup['queries']} synthetic {setup['jpeg']} test JPEGs as queries (cycled, {setup['requests']} per pass) against a
gallery of {setup['gallery_images']} train images and {setup['nonlandmark_images']} non-landmark images; tiny DOLG
(random weights) at {setup['image_size']} px on {m['cores']} cores ({m['cpu']}), {m['gpu'] or 'no GPU'}, torch
{m['torch']}, Ray {m['ray']}. Both paths do the same work per image: `check_image`, the decode, `Embedder` (torch or
the ONNX export on onnxruntime's CPU provider), one `answer_recognition` per image, on {setup['replica_cpus']:g}
CPU threads. The service: {setup['replicas']} replica(s), batches of up to {setup['batch']} images, batch wait
{1000 * setup['batch_wait_s']:g} ms, HTTP keep-alive clients on the same cores. The plain loop runs at the batch the
service can reach at each concurrency (min(concurrency, {setup['batch']})); "mean batch" on a serve row is what the
replica embedded. CPU milliseconds per image (each request is one image): the plain loop's process, and the
service's replica, HTTP proxy and client threads, from their processes' CPU times over the pass.

{table}

Each row: the mean of the path's two closest passes (passes ran round robin, one backend after the other, until
two agreed within {100 * setup['agreement']:g} %, at least {setup['min_rounds']} rounds).{unsettled_text} Load average
(1 min): {load['start']} at the start, {load['end']} at the end, {load['after_each_round']} after each round. Every
pass is in `{results_path("serve")}`.

The service's overhead per request at concurrency 1 (its p50 minus the plain loop's at batch 1; the
{1000 * setup['batch_wait_s']:g} ms batch wait included): {overheads}. serve / plain at concurrency 32:
{', '.join(f"{b} {r['serve_vs_plain']['32']}" for b, r in results.items())}.{onnx_text} Targets (issue 29, not
asserted): serve / plain ≥ 0.9 at concurrency 32, overhead ≤ 10 ms at concurrency 1, onnxruntime ≥ 1.5× torch.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    replica = ReplicaSettings()
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--requests", type=int, default=200, help="requests (and plain images) per pass")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: torch, onnxruntime")
    parser.add_argument("--batch", type=int, default=replica.max_batch_size, help="the service's max_batch_size")
    parser.add_argument("--batch-wait-s", type=float, default=replica.batch_wait_timeout_s,
                        help="the service's batch_wait_timeout_s")
    parser.add_argument("--replica-cpus", type=float, default=2.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--agreement", type=float, default=0.10, help="two passes of a path agree within this")
    parser.add_argument("--min-rounds", type=int, default=2)
    parser.add_argument("--max-rounds", type=int, default=6)
    serve_load.add_options(parser)
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    add_jpeg_option(parser)
    add_out_option(parser)
    args = parser.parse_args()
    args.backends = args.backends.split(",")
    args.load_backend = args.load_backend or args.backends[-1]
    if set(args.backends) - set(BACKENDS) or args.load_backend not in args.backends:
        parser.error(f"--backends {','.join(args.backends)} --load-backend {args.load_backend}: backends are "
                     f"{', '.join(BACKENDS)}, and the load test's must be one of --backends")
    if not 2 <= args.min_rounds <= args.max_rounds:
        parser.error("--min-rounds must be 2 or more (two passes must agree) and at most --max-rounds")
    started_load = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        results, sizes, load = measure(args, Path(tmp))
    payload = {
        "machine": machine(),
        "setup": {**{k: v for k, v in sizes.items() if k != "load_average_after_each_round"},
                  "jpeg": f"{args.jpeg[0]}x{args.jpeg[1]}", "image_size": args.image_size,
                  "model": "tiny DOLG (timm test_efficientnet), random weights", "requests": args.requests,
                  "batch": args.batch, "batch_wait_s": args.batch_wait_s, "replica_cpus": args.replica_cpus,
                  "replicas": args.replicas, "torch_threads": torch.get_num_threads(), "agreement": args.agreement,
                  "min_rounds": args.min_rounds, "max_rounds": args.max_rounds,
                  "plain_batch_at_concurrency": {str(c): b for c, b in plain_batches(args).items()}},
        "load_average": {"start": started_load, "after_each_round": sizes["load_average_after_each_round"],
                         "end": round(os.getloadavg()[0], 2)},
        "results": results,
        "ratios": {f"serve_vs_plain_32_{b}": r["serve_vs_plain"]["32"] for b, r in results.items()},
    }
    if set(results) == set(BACKENDS):
        plain = f"plain_batch_{args.batch}"
        payload["ratios"]["onnxruntime_vs_torch_plain"] = round(
            rate(results["onnxruntime"]["paths"][plain]) / rate(results["torch"]["paths"][plain]), 3)
        payload["ratios"]["onnxruntime_vs_torch_serve_32"] = round(
            rate(results["onnxruntime"]["paths"]["serve_32"]) / rate(results["torch"]["paths"]["serve_32"]), 3)
    print(json.dumps(payload, indent=2))
    if not args.no_write:
        publish("serve", payload, benchmarks_md(payload), args.out)
    if load is not None:
        serve_load.report(load, args, payload["setup"])


if __name__ == "__main__":
    main()
