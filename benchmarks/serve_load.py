"""The sustained load test of the landmark service: ``python -m benchmarks.serve --load-minutes 10`` runs it after
the benchmark's passes, on the service of ``--load-backend`` that the benchmark just measured.

Requests arrive on a fixed schedule (open loop) at ``--load-fraction`` (80 %) of the highest requests/s the benchmark
measured for that backend, for ``--load-minutes``; each is sent by one of ``--load-workers`` client threads, and its
latency counts from its scheduled time, so a service that falls behind shows it in the latency rather than by
receiving fewer requests. One request in ``--bad-every`` is a bad one, each kind in turn (an empty body, bytes that
are no image, a PNG, a truncated JPEG, a JPEG sent as a form-encoded body), and must get its own 4xx
(docs/serving.md) while the good ones keep getting 200.

Per ``--load-bucket-s`` (a minute): requests, good requests' p50/p99 latency, errors, bad requests answered as they
should be, and each replica's resident memory (RSS, the median of the samples taken every ``--rss-sample-s`` from the
replica processes, which are this process's descendants on a local Ray). An error is a good request that did not get
200 or a bad one that did not get its 4xx, or any request that got no answer; there must be none.

RSS is flat when, for each replica, the least-squares line through its per-minute RSS after the first minute (start-up
and the allocator's warm-up) rises by at most ``--rss-tolerance`` (2 %) of its mean over the run; with fewer than
three minutes after the first it is not judged. A run with errors, or with a replica whose RSS is not flat, writes its
results and then exits with an error. The plot (matplotlib) shows each good request's latency and each replica's RSS
against time: benchmarks/results/serve_load.png.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from benchmarks.results_io import publish, results_path
from ray_landmark.markdown import markdown_table
from ray_landmark.progress import ProgressLine

RESULTS = "serve_load"
PLOT = f"benchmarks/results/{RESULTS}.png"  # beside the results file, under --out
MIB = 2**20


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load-minutes", type=float, default=0.0,
                        help="then a sustained load test of this many minutes (default none)")
    parser.add_argument("--load-backend", help="the backend under the load test (default: the last of --backends)")
    parser.add_argument("--load-fraction", type=float, default=0.8,
                        help="the load's requests/s, as a fraction of the highest that the backend's passes measured")
    parser.add_argument("--load-bucket-s", type=float, default=60.0, help="the load test reports per this many s")
    parser.add_argument("--load-workers", type=int, default=64, help="client threads sending the load")
    parser.add_argument("--bad-every", type=int, default=20, help="one request in this many is a bad one")
    parser.add_argument("--rss-sample-s", type=float, default=5.0)
    parser.add_argument("--rss-tolerance", type=float, default=0.02,
                        help="the largest rise of a replica's RSS over the run, as a fraction of its mean")


def bad_requests(jpeg: bytes) -> dict[str, tuple[bytes, str, int]]:
    """kind -> (body, Content-Type, the status docs/serving.md promises)."""
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(png, format="PNG")
    return {"empty body": (b"", "image/jpeg", 400),
            "not an image": (b"this is not a JPEG" * 8, "image/jpeg", 415),
            "a PNG": (png.getvalue(), "image/png", 415),
            "truncated JPEG": (jpeg[:len(jpeg) // 2], "image/jpeg", 400),
            "form-encoded body": (jpeg, "application/x-www-form-urlencoded", 415)}


def replica_processes(app: str) -> dict:
    """pid -> psutil.Process of each replica of Serve application ``app`` among this process's descendants (Ray
    names an actor's worker process after the actor's class: ray::ServeReplica:<app>:<deployment>)."""
    return descendants_named(f"ServeReplica:{app}:")


def descendants_named(marker: str) -> dict:
    """pid -> psutil.Process of each of this process's descendants whose command line holds ``marker``."""
    import psutil  # Ray's own copy: importing ray (serve.py does) puts ray/thirdparty_files on sys.path

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()):
                found[proc.pid] = proc
        except psutil.Error:  # ended while listed
            continue
    return found


def _rss_sampler(app: str, every_s: float, t0: float, samples: list, stop: threading.Event) -> None:
    import psutil  # Ray's copy, as above

    while True:
        for pid, proc in replica_processes(app).items():
            try:
                samples.append((time.perf_counter() - t0, pid, proc.memory_info().rss))
            except psutil.Error:
                continue
        if stop.wait(every_s):
            return


def run(args, url: str, queries: list[bytes], max_rps: float, app: str) -> dict:
    """Send the load at ``--load-fraction`` of ``max_rps``: every request's (scheduled second, latency s, kind, status
    or error) and the RSS samples."""
    import requests

    target_rps = args.load_fraction * max_rps
    total, bad = int(target_rps * 60 * args.load_minutes), bad_requests(queries[0])
    kinds, local, lock = list(bad), threading.local(), threading.Lock()
    records, samples, stop = [], [], threading.Event()
    progress = ProgressLine("[serve_load]", total=total, unit="req")
    errors = [0]

    def send(i: int, scheduled: float) -> None:
        kind = kinds[(i // args.bad_every) % len(kinds)] if (i + 1) % args.bad_every == 0 else "good"
        body, content_type = (queries[i % len(queries)], "image/jpeg") if kind == "good" else bad[kind][:2]
        if not hasattr(local, "session"):
            local.session = requests.Session()
        try:
            status = local.session.post(f"{url}/recognize", data=body, headers={"Content-Type": content_type},
                                        timeout=120).status_code
        except Exception as err:  # noqa: BLE001 (a request that got no answer, however it failed, is an error)
            status = f"no answer ({type(err).__name__}: {err})"[:200]
        latency = time.perf_counter() - scheduled
        with lock:
            records.append((round(scheduled - t0, 3), latency, kind, status))
            errors[0] += status != (200 if kind == "good" else bad[kind][2])
            progress.update(1, lambda: f"errors {errors[0]}")

    print(f"[serve_load] {args.load_minutes:g} min at {target_rps:.1f} requests/s ({total:,} requests, one in "
          f"{args.bad_every} bad)", flush=True)
    t0 = time.perf_counter()
    sampler = threading.Thread(target=_rss_sampler, args=(app, args.rss_sample_s, t0, samples, stop), daemon=True)
    sampler.start()
    with ThreadPoolExecutor(args.load_workers) as pool:
        for i in range(total):
            scheduled = t0 + i / target_rps
            time.sleep(max(0.0, scheduled - time.perf_counter()))
            pool.submit(send, i, scheduled)
    stop.set()
    sampler.join()
    progress.close(f"errors {errors[0]}")
    return {"max_rps": max_rps, "target_rps": round(target_rps, 2), "seconds": round(time.perf_counter() - t0, 1),
            "records": records, "rss_samples": samples,
            "expected": {kind: status for kind, (_, _, status) in bad.items()}}


def buckets(load: dict, bucket_s: float) -> list[dict]:
    """The load's numbers per bucket of ``bucket_s`` seconds (by scheduled time)."""
    expected = {"good": 200, **load["expected"]}
    count = int(max([r[0] for r in load["records"]] + [0.0]) // bucket_s) + 1
    rows = []
    for b in range(count):
        inside = [r for r in load["records"] if b * bucket_s <= r[0] < (b + 1) * bucket_s]
        good = sorted(1000 * r[1] for r in inside if r[2] == "good" and r[3] == 200)
        bad = [r for r in inside if r[2] != "good"]
        rss: dict[str, list[int]] = {}
        for t, pid, value in load["rss_samples"]:
            if b * bucket_s <= t < (b + 1) * bucket_s:
                rss.setdefault(str(pid), []).append(value)
        rows.append({"from_s": round(b * bucket_s, 1), "requests": len(inside),
                     "p50_ms": round(statistics.median(good), 1) if good else None,
                     "p99_ms": round(good[min(len(good) - 1, int(0.99 * len(good)))], 1) if good else None,
                     "errors": sum(r[3] != expected[r[2]] for r in inside),
                     "bad": len(bad), "bad_answered_as_promised": sum(r[3] == expected[r[2]] for r in bad),
                     "rss_mib": {pid: round(statistics.median(v) / MIB, 1) for pid, v in rss.items()}})
    return rows


def flatness(rows: list[dict], tolerance: float) -> dict:
    """Per replica: the rise of the least-squares line through its RSS after the first bucket, against its mean."""
    verdicts = {}
    for pid in sorted({pid for row in rows for pid in row["rss_mib"]}):
        series = [row["rss_mib"][pid] for row in rows[1:] if pid in row["rss_mib"]]
        if len(series) < 3:
            verdicts[pid] = {"flat": None, "why": f"not judged: {len(series)} buckets after the first (3 needed)"}
            continue
        slope = float(np.polyfit(np.arange(len(series)), series, 1)[0])
        rise, mean = slope * (len(series) - 1), float(np.mean(series))
        verdicts[pid] = {"flat": rise <= tolerance * mean, "rise_mib": round(rise, 1), "mean_mib": round(mean, 1),
                         "slope_mib_per_bucket": round(slope, 2), "tolerance": tolerance}
    return verdicts


def plot(load: dict, rows: list[dict], bucket_s: float, path) -> str | None:
    """Latency and RSS against time, as a PNG at ``path``; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    good = [(r[0], 1000 * r[1]) for r in load["records"] if r[2] == "good" and r[3] == 200]
    figure, (latency, memory) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    latency.scatter([t for t, _ in good], [ms for _, ms in good], s=2, alpha=0.3, label="each good request")
    edges = [row["from_s"] for row in rows] + [rows[-1]["from_s"] + bucket_s]
    for key in ("p50_ms", "p99_ms"):
        values = [np.nan if row[key] is None else row[key] for row in rows]
        latency.stairs(values, edges, baseline=None, label=f"{key[:3]} per bucket")
    latency.set_ylabel("latency, ms")
    latency.legend(loc="upper right")
    for pid in sorted({pid for _, pid, _ in load["rss_samples"]}):
        points = [(t, rss / MIB) for t, p, rss in load["rss_samples"] if p == pid]
        memory.plot([t for t, _ in points], [m for _, m in points], label=f"replica pid {pid}")
    top = max([rss / MIB for _, _, rss in load["rss_samples"]] + [1.0])
    memory.set_ylim(0, 1.25 * top)  # from zero: a rise shows at its true size
    memory.set_ylabel("RSS, MiB")
    memory.set_xlabel("seconds into the load")
    memory.legend(loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


def benchmarks_md(payload: dict) -> str:
    """The load test's section of BENCHMARKS.md, from its results."""
    setup, rows, flat = payload["setup"], payload["buckets"], payload["rss_flat"]
    pids = sorted({pid for row in rows for pid in row["rss_mib"]})
    table = markdown_table(
        ["from s", "requests", "p50 ms", "p99 ms", "errors", "bad answered as promised",
         *(f"RSS MiB, replica {n + 1}" for n in range(len(pids)))],
        [[row["from_s"], row["requests"], row["p50_ms"], row["p99_ms"], row["errors"],
          f"{row['bad_answered_as_promised']}/{row['bad']}", *(row["rss_mib"].get(pid) for pid in pids)]
         for row in rows])
    verdicts = "; ".join(f"replica {n + 1}: " + (v["why"] if v["flat"] is None else
                                                 f"{'flat' if v['flat'] else '**not flat**'}, rises {v['rise_mib']} "
                                                 f"MiB over the run (mean {v['mean_mib']} MiB)")
                         for n, (_, v) in enumerate(sorted(flat.items())))
    plot_text = f"![latency and RSS against time]({payload['plot']})" if payload["plot"] else \
        "No plot: matplotlib is not installed."
    offered_s = 60 * setup["minutes"]
    kept_up = (f"It answered {payload['requests'] / payload['seconds']:.1f} requests/s: the last answer came "
               f"{payload['seconds']:g} s after the start, for {offered_s:g} s of requests")
    kept_up += ("; **it fell behind** the offered rate, so requests queued and the latencies below are mostly that "
                "queue." if payload["seconds"] > 1.05 * offered_s else ".")
    return f"""## The service under sustained load (`python -m benchmarks.serve --load-minutes {setup['minutes']:g}`)

{setup['backend']} backend, {setup['replicas']} replica(s), the benchmark's setup above; {setup['minutes']:g} minutes
at {setup['target_rps']} requests/s ({100 * setup['fraction']:g} % of the {setup['max_rps']} requests/s the
benchmark measured), open loop from {setup['workers']} client threads, latency from each request's scheduled time;
one request in {setup['bad_every']} bad ({', '.join(setup['bad_kinds'])}), each expected to get its 4xx. Errors over
the run: **{payload['errors']}** of {payload['requests']:,} requests. RSS (median of samples every
{setup['rss_sample_s']:g} s), flat if the least-squares line after the first bucket rises by at most
{100 * setup['rss_tolerance']:g} % of the mean: {verdicts or 'no replica process found'}. {kept_up}

{table}

{plot_text} Raw numbers (every RSS sample too): `{results_path(RESULTS)}`.
"""


def report(load: dict, args, benchmark_setup: dict) -> None:
    """Summarise, print, write (with the plot) and exit with an error on errors or memory that is not flat."""
    rows = buckets(load, args.load_bucket_s)
    flat = flatness(rows, args.rss_tolerance)
    errors = sum(row["errors"] for row in rows)
    setup = {"backend": args.load_backend, "replicas": args.replicas, "minutes": args.load_minutes,
             "fraction": args.load_fraction, "target_rps": load["target_rps"], "max_rps": load["max_rps"],
             "workers": args.load_workers, "bad_every": args.bad_every, "bad_kinds": list(load["expected"]),
             "bucket_s": args.load_bucket_s, "rss_sample_s": args.rss_sample_s, "rss_tolerance": args.rss_tolerance,
             "benchmark": benchmark_setup}
    plotted = None if args.no_write else plot(load, rows, args.load_bucket_s, args.out / PLOT)
    payload = {"setup": setup, "requests": len(load["records"]), "seconds": load["seconds"], "errors": errors,
               "error_examples": [r for r in load["records"] if r[3] != {"good": 200, **load["expected"]}[r[2]]][:5],
               "buckets": rows, "rss_flat": flat, "plot": PLOT if plotted else None,
               "rss_samples": {"columns": ["s", "pid", "rss_bytes"], "rows": load["rss_samples"]}}
    print(json.dumps({k: v for k, v in payload.items() if k != "rss_samples"}, indent=2))
    if not args.no_write:
        publish(RESULTS, payload, benchmarks_md(payload), args.out)
    not_flat = [pid for pid, v in flat.items() if v["flat"] is False]
    if errors or not_flat:
        raise SystemExit(f"the load test failed: {errors} errors, replicas whose RSS is not flat: "
                         f"{', '.join(not_flat) or 'none'} (see {results_path(RESULTS)})")
