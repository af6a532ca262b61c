"""Exact kNN (ray_landmark.eval.search) on this machine: seconds as the database grows, for each backend, against a
plain matrix product of the same size in the same run; peak memory; an extrapolation to GLDv2's sizes.

With --adjusted it measures recognition's exact adjusted top-k instead (ray_landmark.infer.postprocess.adjusted_topk:
the top 3 of clamp(cos, 0, 1) - b_j over the whole gallery, by the augmented dimension plus candidate merging) against
the path it replaced (the raw top 100 by cosine, re-sorted by the adjusted similarity), side by side at a scaled-down
size, and the candidate merging alone at GLDv2's full size; writes benchmarks/results/search_adjusted.json and its
own section of BENCHMARKS.md.

With --label-rerank it measures retrieval's exact label re-rank (postprocess.label_rerank: the pool plus every index
image of the query's label, a second, wider search for a query its pool leaves uncertain) against the plain re-rank of
the pool alone, at GLDv2's index size (761,757 images over GLDv2c's 81,313 labels, drawn long-tailed: P(label of rank
r) ~ r^-zipf), for a sample of the test queries, extrapolated linearly to all 117,577; writes
benchmarks/results/search_label_rerank.json and its own section of BENCHMARKS.md.

Queries and database are random unit vectors stored as float16 (as embeddings are). The reference is the matrix
product alone, queries x database^T in the search's compute dtype (float32 on the CPU, float16 on a GPU), written
block by block (16,384 database rows) into one preallocated buffer: no top-k, no allocation, the BLAS rate.
`search_vs_gemm` = reference seconds / search seconds at the same size. Times are the best of --repeats runs (on a
shared machine interference only adds time). On a CUDA device the torch backend also runs there, at the same sizes
and at GLDv2's real sizes. No Ray. Writes benchmarks/results/search.json and its section of BENCHMARKS.md.

    python -m benchmarks.search [--queries 2000] [--sizes 50000,100000,200000,400000] [--dim 512] [--k 100]
    python -m benchmarks.search --adjusted [--queries 4000] [--sizes 200000] [--dim 512]
    python -m benchmarks.search --label-rerank [--queries 1000] [--index-fraction 1] [--zipf 0.6] [--dim 512]
    (either with [--no-write] or [--out DIR])
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch

from benchmarks.results_io import add_out_option, machine, publish, results_path, sync
from ray_landmark.eval.search import chunk_bytes, chunk_sizes, default_max_bytes, knn
from ray_landmark.infer import postprocess as pp
from ray_landmark.markdown import markdown_table

GLDV2 = {  # queries x database at 512-d
    "recognition: test x GLDv2c train": (117_577, 1_580_470),
    "retrieval: test x index": (117_577, 761_757),
}
# Recognition at GLDv2's size as the method runs it: the test queries against the GLDv2x gallery (about 3.2 M train
# images) in the 1536-d ensemble embedding, N the about 115k non-landmark test images, nearly all queries in N.
GLDV2_RECOGNITION = {"queries": 117_577, "gallery": 3_200_000, "nonlandmark": 115_000, "dim": 1536}
TODAY_K = 100  # the raw shortlist the replaced path re-sorted
# Retrieval at GLDv2's size as the method runs it, per model: the test queries against the index, labelled with
# GLDv2c's classes by their label_k train neighbours, each query's rerank_pool nearest re-ranked and cut to per_model
# (the defaults of infer.config.RetrievalSettings).
GLDV2_RETRIEVAL = {"queries": 117_577, "index": 761_757, "labels": 81_313, "dim": 512, "rerank_pool": 3000,
                   "per_model": 750, "label_k": 3}
GEMM_BLOCK = 16_384
MIB = 2**20


def unit_vectors(n: int, dim: int, device: torch.device, seed: int) -> torch.Tensor:
    out = torch.empty(n, dim, dtype=torch.float16, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    for start in range(0, n, 65_536):  # in pieces: no float32 copy of the whole set
        piece = torch.randn(min(65_536, n - start), dim, device=device, generator=generator)
        out[start:start + len(piece)] = torch.nn.functional.normalize(piece, dim=1)
    return out


def peak_mib(run, device: torch.device) -> float | None:
    """Peak memory while `run()` runs, above what was held before, MiB: on a GPU torch's allocations; on the CPU the
    process's resident memory (Linux: VmHWM, reset through /proc/self/clear_refs), so faiss's C++ buffers too."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        return round((torch.cuda.max_memory_allocated(device) - before) / MIB, 1)
    if not Path("/proc/self/clear_refs").exists():
        return None
    # glibc set to hand freed memory back at once (for the rest of the process: the timings are taken before), so
    # that memory freed earlier cannot hide this peak.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD: blocks over 64 KiB are mapped and unmapped by themselves
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    run()
    return round((_status_kib("VmHWM") - before) / 1024, 1)


def _status_kib(key: str) -> int:
    return int(re.search(key + r":\s*(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def interleaved_seconds(runs: dict, repeats: int, device: torch.device,
                        cpu_seconds: dict | None = None) -> dict[str, list[float]]:
    """Seconds of each run, in `repeats` rounds of all of them: a burst of load elsewhere on a shared machine then
    slows one round of every candidate, not every round of one. `cpu_seconds`, when given, receives each run's
    process CPU time too (all threads): on an oversubscribed machine it moves far less with the others' load."""
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            run()
            sync(device)
            seconds[name].append(round(time.perf_counter() - started, 4))
            if cpu_seconds is not None:
                cpu_seconds.setdefault(name, []).append(round(time.process_time() - cpu_started, 4))
    return seconds


def search_run(queries, database, k, device, backend, max_bytes=None):
    return lambda: knn(queries, database, k, device=device, backend=backend, max_bytes=max_bytes)


def gemm_run(queries, database, device):
    """The matrix product alone, in the search's compute dtype, block by block into one preallocated buffer."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    queries = queries.to(device, dtype)
    buffer = torch.empty(len(queries), GEMM_BLOCK, dtype=dtype, device=device)
    blocks = [database[s:s + GEMM_BLOCK].to(device, dtype) for s in range(0, len(database), GEMM_BLOCK)]

    def run():
        for block in blocks:
            torch.mm(queries, block.T, out=buffer[:, :len(block)])

    return run


def plan(n_query, n_db, dim, k, device, max_bytes=None) -> dict:
    dtype_bytes = 2 if device.type == "cuda" else 4
    budget = max_bytes or default_max_bytes(device)
    chunks = chunk_sizes(n_query, n_db, dim, k, budget, dtype_bytes)
    return {"max_bytes_mib": round(budget / MIB, 1), "chunks": list(chunks),
            "chunk_mib": round(chunk_bytes(*chunks, dim, min(k, n_db), dtype_bytes) / MIB, 1)}


def gflops(n_query: int, n_db: int, dim: int, seconds: float) -> float:
    return round(2 * n_query * n_db * dim / seconds / 1e9, 1)


def run_device(device, backends, args) -> tuple[list[dict], list[dict]]:
    queries = unit_vectors(args.queries, args.dim, device, seed=0)
    database = unit_vectors(max(args.sizes), args.dim, device, seed=1)
    for backend in backends:  # warm-up: thread pools, BLAS buffers, CUDA context
        knn(queries[:256], database[:4096], args.k, device=device, backend=backend)
    rows = []
    for n in args.sizes:
        runs = {"gemm": gemm_run(queries, database[:n], device)}
        runs.update({b: search_run(queries, database[:n], args.k, device, b) for b in backends})
        seconds = interleaved_seconds(runs, args.repeats, device)
        del runs
        gemm = min(seconds["gemm"])
        for backend in backends:
            best = min(seconds[backend])
            row = {"device": device.type, "backend": backend, "queries": args.queries, "database": n,
                   "seconds": best, "gflops": gflops(args.queries, n, args.dim, best), "gemm_seconds": gemm,
                   "gemm_gflops": gflops(args.queries, n, args.dim, gemm), "search_vs_gemm": round(gemm / best, 3),
                   **plan(args.queries, n, args.dim, args.k, device), "all_seconds": seconds[backend],
                   "all_gemm_seconds": seconds["gemm"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    sweep = []
    if device.type == "cpu" and args.sweep_mib:  # what the memory budget costs in speed, at the second size
        n = args.sizes[min(1, len(args.sizes) - 1)]
        cases = [(mib, b) for mib in args.sweep_mib for b in backends]
        seconds = interleaved_seconds({case: search_run(queries, database[:n], args.k, device, case[1], case[0] * MIB)
                                       for case in cases}, args.repeats, device)
        for mib, backend in cases:
            sweep.append({"backend": backend, "database": n, "seconds": min(seconds[(mib, backend)]),
                          **plan(args.queries, n, args.dim, args.k, device, mib * MIB),
                          "all_seconds": seconds[(mib, backend)]})
            print("sweep", json.dumps(sweep[-1]), flush=True)
    for row in rows + sweep:  # after all the timings: peak_mib changes the CPU allocator for the rest of the run
        row["peak_mib"] = peak_mib(search_run(queries, database[:row["database"]], args.k, device, row["backend"],
                                              int(row["max_bytes_mib"] * MIB)), device)
    return rows, sweep


def run_gldv2_on_gpu(device, args) -> list[dict]:
    """GLDv2's real sizes, measured (not extrapolated), with the GPU default (torch, float16)."""
    rows = []
    for name, (n_query, n_db) in GLDV2.items():
        queries = unit_vectors(n_query, 512, device, seed=0)
        database = unit_vectors(n_db, 512, device, seed=1)
        run = search_run(queries, database, args.k, device, "torch")
        seconds = interleaved_seconds({"torch": run}, args.repeats, device)["torch"]
        row = {"case": name, "queries": n_query, "database": n_db, "dim": 512, "seconds": min(seconds),
               "gflops": gflops(n_query, n_db, 512, min(seconds)), **plan(n_query, n_db, 512, args.k, device),
               "all_seconds": seconds, "peak_mib": peak_mib(run, device)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del queries, database, run
        torch.cuda.empty_cache()
    return rows


def extrapolate(rows: list[dict], backend: str, device: str, args) -> list[dict]:
    """GLDv2's sizes at the FLOP rate measured at the largest database: an extrapolation, not a measurement."""
    largest = max((r for r in rows if r["backend"] == backend and r["device"] == device), key=lambda r: r["database"])
    out = []
    for name, (n_query, n_db) in GLDV2.items():
        chunks = chunk_sizes(n_query, n_db, 512, args.k, largest["max_bytes_mib"] * MIB, 2 if device == "cuda" else 4)
        out.append({
            "case": name, "queries": n_query, "database": n_db, "dim": 512, "device": device, "backend": backend,
            "extrapolated_seconds": round(2 * n_query * n_db * 512 / (largest["gflops"] * 1e9), 1),
            "from_gflops": largest["gflops"], "chunks": list(chunks),
            "chunk_mib": round(chunk_bytes(*chunks, 512, args.k, 2 if device == "cuda" else 4) / MIB, 1),
            "result_mib": round(n_query * args.k * 12 / MIB, 1),
            "full_float32_matrix_gb": round(n_query * n_db * 4 / 1e9),
        })
    return out


def benchmarks_md(payload: dict) -> str:
    """The kNN section of BENCHMARKS.md, from its results."""
    m, s = payload["machine"], payload["setup"]
    lines = [
        "## Exact kNN search (`python -m benchmarks.search`)",
        "",
        f"{s['queries']:,} queries, {s['dim']}-d unit vectors stored as float16, top {s['k']}, on {m['cores']} cores "
        f"({m['cpu']}, {m['memory_gib']} GiB), GPU: {m['gpu'] or 'none'}; torch {m['torch']} with "
        f"{payload['torch_threads']} threads, faiss {payload['faiss']} with {payload['faiss_threads']}; load average "
        f"{payload['load_average_1m']} when it started, {payload['load_average_1m_end']} when it ended. Best of "
        f"{s['repeats']} interleaved runs each, memory budget the default (`max_bytes`: 1 GiB on the CPU). gemm: "
        "the matrix product alone (float32 on the CPU), block by block into a preallocated buffer; vs gemm = gemm "
        "seconds / search seconds. Peak: resident memory above the inputs (CPU) or torch's allocations (GPU) during "
        "the search.",
        "",
        markdown_table(
            ["device", "backend", "database", "seconds (best)", "every run, s", "GFLOP/s", "gemm s", "vs gemm",
             "peak MiB", "chunks (queries × rows)"],
            [[r["device"], r["backend"], f"{r['database']:,}", r["seconds"], _runs(r["all_seconds"]), r["gflops"],
              r["gemm_seconds"], r["search_vs_gemm"], r["peak_mib"], _chunks(r)] for r in payload["runs"]]),
    ]
    ratios = payload["ratios"]
    lines += [
        "",
        f"`search_vs_gemm` (CPU default backend `{payload['default_backend']['cpu']}`, largest database) = "
        f"**{ratios['search_vs_gemm']}** (target ≥ 0.5); `faiss_vs_torch` (torch seconds / faiss seconds, same "
        f"size) = **{ratios['faiss_vs_torch']}**. {payload['default_backend']['why']}",
    ]
    if payload["budget_sweep"]:
        lines += ["", f"Memory budget against speed (CPU, database {payload['budget_sweep'][0]['database']:,}):", "",
                  markdown_table(["backend", "max_bytes MiB", "chunks", "seconds (best)", "every run, s", "peak MiB"],
                                 [[r["backend"], r["max_bytes_mib"], _chunks(r), r["seconds"], _runs(r["all_seconds"]),
                                   r["peak_mib"]] for r in payload["budget_sweep"]])]
    if payload["gldv2_measured_on_gpu"]:
        lines += ["", "GLDv2's sizes, measured on the GPU (torch, float16):", "",
                  markdown_table(["case", "queries × database", "seconds", "GFLOP/s", "peak MiB"],
                                 [[r["case"], _sizes(r), r["seconds"], r["gflops"], r["peak_mib"]]
                                  for r in payload["gldv2_measured_on_gpu"]])]
    lines += ["", "**Extrapolation** to GLDv2's sizes at 512-d (not measured): seconds = 2·Q·N·D / the GFLOP/s "
              "measured at the largest database above; memory: the chunk pair the default budget allows plus the "
              "result (Q × k scores and indices), against the full float32 similarity matrix.", "",
              markdown_table(["case", "device, backend", "queries × database", "extrapolated seconds", "chunk MiB",
                              "result MiB", "full matrix GB"],
                             [[r["case"], f"{r['device']}, {r['backend']}", _sizes(r), f"{r['extrapolated_seconds']:,}",
                               r["chunk_mib"], r["result_mib"], f"{r['full_float32_matrix_gb']:,}"]
                              for r in payload["extrapolation"]])]
    lines += ["", f"Raw numbers: `{payload['results_path']}`."]
    return "\n".join(lines) + "\n"


def _runs(seconds: list[float]) -> str:
    return ", ".join(map(str, seconds))


def _chunks(row: dict) -> str:
    return f"{row['chunks'][0]:,} × {row['chunks'][1]:,}"


def _sizes(row: dict) -> str:
    return f"{row['queries']:,} × {row['database']:,}"


def resort_shortlist(queries, gallery, k, bias, device):
    """The replaced path: the raw top TODAY_K by cosine, re-sorted by clamp(cos, 0, 1) - b_j, its first k."""
    scores, indices = knn(queries, gallery, TODAY_K, device=device)
    adjusted = np.clip(scores, 0, 1) - bias[indices]
    order = np.argsort(-adjusted, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(adjusted, order, axis=1), np.take_along_axis(indices, order, axis=1)


def run_adjusted(args) -> dict:
    """Both paths side by side at the scaled size; the candidate merging alone at GLDv2's size; an estimate."""
    device = torch.device("cpu")
    n_query, n_gallery, dim = args.queries, args.sizes[0], args.dim
    n_nonlandmark = max(16, round(n_query * GLDV2_RECOGNITION["nonlandmark"] / GLDV2_RECOGNITION["queries"]))
    gallery = unit_vectors(n_gallery, dim, device, seed=1).numpy()
    nonlandmark = unit_vectors(n_nonlandmark, dim, device, seed=2).numpy()
    # As on GLDv2: nearly every query is a non-landmark test image, so in N; the rest are other images.
    queries = np.concatenate([nonlandmark, unit_vectors(n_query - n_nonlandmark, dim, device, seed=3).numpy()])
    query_rows = np.r_[np.arange(n_nonlandmark), np.full(n_query - n_nonlandmark, -1)]
    k = 3
    bias = pp.nonlandmark_bias(gallery, nonlandmark, 5, device=device)  # once, outside the timings: both paths use it
    runs = {
        "b_j (shared)": lambda: pp.nonlandmark_bias(gallery, nonlandmark, 5, device=device),
        "replaced: raw top 100, re-sorted": lambda: resort_shortlist(queries, gallery, k, bias.bias, device),
        "exact adjusted top 3": lambda: pp.adjusted_topk(queries, gallery, k, bias, query_rows=query_rows,
                                                         device=device),
        "plain top 3 (no adjustment)": lambda: knn(queries, gallery, k, device=device),
        "raw top 100 (the replaced path's search)": lambda: knn(queries, gallery, TODAY_K, device=device),
    }
    cpu = {}
    seconds = interleaved_seconds(runs, args.repeats, device, cpu)
    _, exact = pp.adjusted_topk(queries, gallery, k, bias, query_rows=query_rows, device=device)
    _, replaced = resort_shortlist(queries, gallery, k, bias.bias, device)
    # The comparison and the estimate use CPU seconds: this machine is shared, and wall time there measures the load.
    best = {name: min(times) for name, times in cpu.items()}
    scaled = {"queries": n_query, "gallery": n_gallery, "nonlandmark": n_nonlandmark, "dim": dim, "k": k,
              "queries_in_n": n_nonlandmark, "cpu_seconds": best, "all_cpu_seconds": cpu,
              "wall_seconds": {name: min(times) for name, times in seconds.items()}, "all_wall_seconds": seconds,
              "top3_differs_share": round(float((np.sort(exact, 1) != np.sort(replaced, 1)).any(1).mean()), 4)}
    print(json.dumps(scaled), flush=True)
    full = merge_at_size(GLDV2_RECOGNITION if not args.toy_merge else
                         {"queries": n_query, "gallery": n_gallery, "nonlandmark": n_nonlandmark, "dim": dim},
                         args.repeats)
    print(json.dumps(full), flush=True)
    g = GLDV2_RECOGNITION
    flop_scale = g["queries"] * g["gallery"] * g["dim"] / (n_query * n_gallery * dim)
    # Each path's search scaled by the FLOPs (the exact one is a top-3 search one dimension wider), plus its
    # per-query work measured at full size.
    estimate = {
        "replaced_seconds": round(best["raw top 100 (the replaced path's search)"] * flop_scale
                                  + full["resort_seconds"], 1),
        "exact_seconds": round(best["plain top 3 (no adjustment)"] * flop_scale * (g["dim"] + 1) / g["dim"]
                               + full["merge_seconds"], 1),
        "b_j_seconds": round(best["b_j (shared)"] * g["gallery"] * g["nonlandmark"] * g["dim"]
                             / (n_gallery * n_nonlandmark * dim), 1),
    }
    return {"scaled": scaled, "gldv2_candidate_merge": full, "gldv2_estimate_cpu": estimate,
            "exact_vs_replaced": round(best["replaced: raw top 100, re-sorted"] / best["exact adjusted top 3"], 3)}


def merge_at_size(g: dict, repeats: int) -> dict:
    """What the exact path adds to its search, at GLDv2's real size (postprocess.merge_candidates): listing the
    gallery images whose b_j counted each query (nearly every query is in N) and keeping each query's best 3 of its
    candidates (the search's top 3, the 3 smallest b_j and the listed pairs that can still enter the top 3). The
    inputs are random values of the right shapes: the listing's cost depends on their number (gallery x 5); how many
    pairs survive the threshold depends on the values, so the share kept is recorded."""
    k, k_bias = 3, 5
    rng = np.random.default_rng(0)
    sims = np.sort(rng.random((g["gallery"], k_bias + 1), dtype=np.float32), axis=1)[:, ::-1]
    bias = pp.NonLandmarkBias(bias=sims[:, :k_bias].mean(1), rows=rng.integers(0, g["nonlandmark"],
                                                                                (g["gallery"], k_bias)),
                              sims=np.ascontiguousarray(sims[:, :k_bias]),
                              drops=(sims[:, :k_bias] - sims[:, k_bias:]) / k_bias)
    query_rows = np.r_[np.arange(g["nonlandmark"]), np.full(g["queries"] - g["nonlandmark"], -1)]
    n_query = g["queries"]
    # The search's top 3 of cos - b_j and the cosines to the 3 lowest b_j, as random values of the right shapes.
    scores = np.sort(rng.random((n_query, k), dtype=np.float32), axis=1)[:, ::-1] - 0.5
    indices = rng.integers(0, g["gallery"], (n_query, k))
    cos_lowest, lowest = rng.random((n_query, k), dtype=np.float32), np.argsort(bias.bias)[:k]

    def merge():
        bias.__dict__.pop("_by_row", None)  # the listing's sort, cached per bias, counts in each run
        return pp.merge_candidates(scores, indices, cos_lowest, lowest, bias, query_rows)

    shortlist = (rng.random((n_query, TODAY_K), dtype=np.float32), rng.integers(0, g["gallery"], (n_query, TODAY_K)))

    def resort():  # the replaced path's work after its search
        adjusted = np.clip(shortlist[0], 0, 1) - bias.bias[shortlist[1]]
        order = np.argsort(-adjusted, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(adjusted, order, axis=1), np.take_along_axis(shortlist[1], order, axis=1)

    seconds = {}
    interleaved_seconds({"merge": merge, "resort": resort}, repeats, torch.device("cpu"), seconds)  # CPU seconds
    pair_q, _, pair_cos, pair_b = bias.listing(query_rows)
    kept = float(np.mean(np.clip(pair_cos, 0, 1) - pair_b >= (np.clip(scores + bias.bias[indices], 0, 1)
                                                              - bias.bias[indices]).min(axis=1)[pair_q]))
    return {**g, "listed_pairs": len(pair_q), "pairs_kept_share": round(kept, 4),
            "merge_seconds": min(seconds["merge"]), "all_seconds": seconds["merge"],
            "resort_seconds": min(seconds["resort"]), "all_resort_seconds": seconds["resort"],
            "peak_mib": peak_mib(merge, torch.device("cpu"))}


def adjusted_benchmarks_md(payload: dict) -> str:
    """The adjusted top-k section of BENCHMARKS.md, from its results."""
    m, s = payload["machine"], payload["scaled"]
    full, est = payload["gldv2_candidate_merge"], payload["gldv2_estimate_cpu"]
    g = GLDV2_RECOGNITION
    lines = [
        "## Exact adjusted top-k for recognition (`python -m benchmarks.search --adjusted`)",
        "",
        f"Command: `{payload['command']}`. On {m['cores']} cores ({m['cpu']}), GPU: {m['gpu'] or 'none'}; load average "
        f"{payload['load_average_1m']} when it started, {payload['load_average_1m_end']} when it ended; best of "
        f"{payload['repeats']} interleaved runs. Scaled down from GLDv2 for a 2-core machine: {s['queries']:,} queries "
        f"({s['queries_in_n']:,} of them in N) against {s['gallery']:,} gallery images and {s['nonlandmark']:,} "
        f"non-landmark images, {s['dim']}-d random unit vectors (float16), top {s['k']}.",
        "",
        "Times are process CPU seconds (all threads), best of the runs: the machine is shared and oversubscribed, so "
        "wall time measured the others' load (it is in the JSON). The merging's numbers below are CPU seconds too.",
        "",
        markdown_table(["step", "CPU seconds (best)", "every run, CPU s", "wall s (best)"],
                       [[name, s["cpu_seconds"][name], _runs(seconds), s["wall_seconds"][name]]
                        for name, seconds in s["all_cpu_seconds"].items()]),
    ]
    lines += [
        "",
        f"`exact_vs_replaced` (replaced CPU seconds / exact CPU seconds) = **{payload['exact_vs_replaced']}**. On "
        f"these random vectors the two paths' top 3 differ for {s['top3_differs_share']:.1%} of the queries (the "
        "exact one is right by construction; on real embeddings the share differs).",
        "",
        f"Measured at {'GLDv2’s size' if full['gallery'] == g['gallery'] else 'the scaled size'}, the candidate "
        f"merging the exact path adds to its search: {full['queries']:,} queries, {full['nonlandmark']:,} of them in "
        f"N, gallery {full['gallery']:,} with 5 N neighbours "
        f"each ({full['listed_pairs']:,} listed pairs, {full['pairs_kept_share']:.1%} of them past the threshold on "
        f"these random values): **{full['merge_seconds']} s** "
        f"(runs: {', '.join(map(str, full['all_seconds']))}), peak {full['peak_mib']} MiB; the replaced path's "
        f"re-sort of {full['queries']:,} × {TODAY_K} shortlists: {full['resort_seconds']} s.",
        "",
        f"**Estimate** for GLDv2 on this CPU (not measured): {g['queries']:,} × {g['gallery']:,} at {g['dim']}-d, "
        "each path's search (raw top 100; top 3 one dimension wider) at its scaled seconds times the FLOP ratio, "
        f"plus its per-query work measured at full size, in CPU seconds: replaced path {est['replaced_seconds']:,}, "
        f"exact {est['exact_seconds']:,}; b_j (the same for both) {est['b_j_seconds']:,}. The search dominates "
        "both; on a GPU it takes seconds (the search section above), but the adjusted path was not measured there.",
        "",
        f"Raw numbers: `{payload['results_path']}`.",
    ]
    return "\n".join(lines) + "\n"


def run_mode(name: str, measure, render, args) -> dict:
    """One measuring mode on every CPU thread: the machine, the command and the load around ``measure(args)`` (a
    dict), written as the results file ``name`` and its section (``render(payload)``); the payload."""
    import faiss

    load_average_1m = round(os.getloadavg()[0], 2)
    torch.set_num_threads(os.cpu_count())
    faiss.omp_set_num_threads(os.cpu_count())
    payload = {"benchmark": name, "machine": machine(), "load_average_1m": load_average_1m,
               "command": "python -m benchmarks.search " + " ".join(sys.argv[1:]), "repeats": args.repeats,
               **measure(args), "load_average_1m_end": round(os.getloadavg()[0], 2),
               "results_path": results_path(name)}
    print_or_publish(name, payload, render(payload), args)
    return payload


def main_adjusted(args) -> None:
    payload = run_mode("search_adjusted", run_adjusted, adjusted_benchmarks_md, args)
    print(json.dumps({"exact_vs_replaced": payload["exact_vs_replaced"], **payload["gldv2_estimate_cpu"]}))


# ---------------------------------------------------------------- retrieval's label re-rank


def zipf_labels(n: int, labels: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """int64 [n]: labels 0..labels-1 drawn with P(label of rank r) proportional to r^-exponent (a long tail)."""
    weights = np.arange(1, labels + 1, dtype=np.float64) ** -exponent
    return rng.choice(labels, size=n, p=weights / weights.sum())


def pool_rerank(pool, query_labels, index_labels, confidence, keep: int, same_factor: float = 1.0,
                other_factor: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The path the exact re-rank replaced: the pool alone re-scored by labels, its best ``keep`` (a same-label image
    beyond the pool is never seen, and no query is searched again)."""
    scores, indices = pool
    same = query_labels[:, None] == index_labels[indices]
    rescored = scores + np.where(same, same_factor, -other_factor) * confidence[indices]
    order = np.argsort(-rescored, axis=1, kind="stable")[:, :keep]
    return np.take_along_axis(rescored, order, axis=1), np.take_along_axis(indices, order, axis=1)


def label_rerank_inputs(args) -> dict:
    """Random unit queries and index images (float32, as retrieval searches them), long-tailed labels for both (the
    labels scaled with --index-fraction, so that a label has as many images as at full size) and c_j uniform over
    its range, 0 to label_k (a sum of label_k clamped cosines)."""
    g, cpu, rng = GLDV2_RETRIEVAL, torch.device("cpu"), np.random.default_rng(0)
    n_index = round(g["index"] * args.index_fraction)
    n_labels = max(1, round(g["labels"] * args.index_fraction))
    return {"queries": unit_vectors(args.queries, args.dim, cpu, seed=0).float().numpy(),
            "index": unit_vectors(n_index, args.dim, cpu, seed=1).float().numpy(),
            "query_labels": zipf_labels(args.queries, n_labels, args.zipf, rng),
            "index_labels": zipf_labels(n_index, n_labels, args.zipf, rng),
            "confidence": rng.uniform(0, g["label_k"], n_index).astype(np.float32), "labels": n_labels}


def label_counts(labels: np.ndarray) -> dict:
    """How the index images spread over their labels."""
    counts = np.bincount(labels)
    used = counts[counts > 0]
    return {"labels_with_images": len(used), "largest": int(used.max()), "median": float(np.median(used)),
            "mean": round(float(used.mean()), 2), "with_one_image": int((used == 1).sum())}


def run_label_rerank(args) -> dict:
    """Both re-ranks of the same pool, interleaved; the pool's search alone; the exact path's wider searches (counted
    by a wrapper of the kNN it calls, in its first timed run); memory; the extrapolation to every test query."""
    g, cpu = GLDV2_RETRIEVAL, torch.device("cpu")
    x = label_rerank_inputs(args)
    n_index = len(x["index"])
    pool_k, keep = min(g["rerank_pool"], n_index), min(g["per_model"], n_index)
    labels = (x["query_labels"], x["index_labels"], x["confidence"])
    pool = knn(x["queries"], x["index"], pool_k, device=cpu)
    runs = {"pool search (both paths)": lambda: knn(x["queries"], x["index"], pool_k, device=cpu),
            "plain pool re-rank": lambda: pool_rerank(pool, *labels, keep),
            "exact label re-rank": lambda: pp.label_rerank(x["queries"], x["index"], pool, *labels, keep, device=cpu)}
    searches = []  # (queries, k) of each search label_rerank runs, its wider ones, over every timed run

    def counted(queries, *rest, **options):
        searches.append((len(queries), rest[1]))
        return knn(queries, *rest, **options)

    cpu_seconds = {}
    with patch.object(pp, "knn", counted):  # the pool's search calls this module's knn, uncounted
        wall = interleaved_seconds(runs, args.repeats, cpu, cpu_seconds)
    searches = searches[:len(searches) // args.repeats]  # every run searches alike: the first run's
    labelled = pp.LabelledIndex(x["index_labels"], x["confidence"], 1.0, 0.1)
    pairs, _ = labelled.same_label_pairs(x["query_labels"], pool[1])
    per_label_mib = (labelled.by_label.nbytes + x["index_labels"].nbytes) / MIB  # the order, and the sorted labels
    peaks = {name: peak_mib(runs[name], cpu) for name in ("plain pool re-rank", "exact label re-rank")}
    best = {name: min(times) for name, times in cpu_seconds.items()}
    per_1000 = {name: round(seconds * 1000 / args.queries, 3) for name, seconds in best.items()}
    search = per_1000["pool search (both paths)"]
    scale = g["queries"] / args.queries * g["index"] / n_index  # linear in queries and in index images
    total = {"plain": search + per_1000["plain pool re-rank"], "exact": search + per_1000["exact label re-rank"]}
    return {
        "setup": {"queries": args.queries, "index": n_index, "index_fraction": args.index_fraction, "dim": args.dim,
                  "labels": x["labels"], "zipf": args.zipf, "rerank_pool": pool_k, "per_model": keep,
                  "confidence": f"uniform 0..{g['label_k']}", "labels_of_index": label_counts(x["index_labels"])},
        "cpu_seconds": best, "all_cpu_seconds": cpu_seconds, "wall_seconds": {n: min(t) for n, t in wall.items()},
        "all_wall_seconds": wall, "cpu_seconds_per_1000_queries": per_1000,
        "plain_total_per_1000": round(total["plain"], 3), "exact_total_per_1000": round(total["exact"], 3),
        "exact_vs_plain_total": round(total["exact"] / total["plain"], 3),
        "exact_vs_plain_rerank": round(best["exact label re-rank"] / best["plain pool re-rank"], 2),
        "wider_searches": [{"queries": q, "k": k} for q, k in searches],
        "queries_searched_again": searches[0][0] if searches else 0,
        "same_label_images_beyond_pool_per_query": round(len(pairs) / args.queries, 2),
        "per_label_lists_mib": round(per_label_mib, 2), "peak_mib": peaks,
        "extrapolated_cpu_seconds_all_queries": {
            "law": f"x {g['queries']:,} / {args.queries:,} queries" + (
                f" x {g['index']:,} / {n_index:,} index images" if n_index != g["index"] else ""),
            **{path: round(seconds * args.queries / 1000 * scale, 1) for path, seconds in total.items()}},
    }


def label_rerank_benchmarks_md(payload: dict) -> str:
    """The label re-rank section of BENCHMARKS.md, from its results."""
    m, s, spread = payload["machine"], payload["setup"], payload["setup"]["labels_of_index"]
    per_1000, extrapolated = payload["cpu_seconds_per_1000_queries"], payload["extrapolated_cpu_seconds_all_queries"]
    size = ("GLDv2's index size" if s["index"] == GLDV2_RETRIEVAL["index"]
            else f"{s['index_fraction']:g} of GLDv2's index")
    wider = ", then ".join(f"{w['queries']:,} queries with k {w['k']:,}" for w in payload["wider_searches"]) or "none"
    lines = [
        "## Exact label re-rank for retrieval (`python -m benchmarks.search --label-rerank`)",
        "",
        f"Command: `{payload['command']}`. On {m['cores']} cores ({m['cpu']}, {m['memory_gib']} GiB), GPU: "
        f"{m['gpu'] or 'none'}; load average {payload['load_average_1m']} when it started, "
        f"{payload['load_average_1m_end']} when it ended; best of {payload['repeats']} interleaved runs, in process "
        "CPU seconds (all threads: the machine is shared, and wall time measured the others' load; it is in the "
        f"JSON). One model's retrieval: {s['queries']:,} random unit queries against {s['index']:,} random unit index "
        f"images ({size}), {s['dim']}-d float32, pool {s['rerank_pool']:,}, the best {s['per_model']} kept. Labels: "
        f"{s['labels']:,}, drawn for index images and queries alike with P(label of rank r) ∝ r^-{s['zipf']:g}: "
        f"{spread['labels_with_images']:,} labels have index images, the largest {spread['largest']:,}, median "
        f"{spread['median']:g}, mean {spread['mean']:g}, {spread['with_one_image']:,} with one. c_j: "
        f"{s['confidence']}.",
        "",
        markdown_table(["step", "CPU s per 1,000 queries (best)", "every run, CPU s", "wall s (best)", "peak MiB"],
                       [[name, seconds, _runs(payload["all_cpu_seconds"][name]), payload["wall_seconds"][name],
                         payload["peak_mib"].get(name, "")] for name, seconds in per_1000.items()]),
        "",
        f"Per 1,000 queries, search included: plain pool re-rank {payload['plain_total_per_1000']} CPU s, exact "
        f"{payload['exact_total_per_1000']} CPU s: `exact_vs_plain_total` = **{payload['exact_vs_plain_total']}**; "
        f"the re-ranks alone: `exact_vs_plain_rerank` = **{payload['exact_vs_plain_rerank']}**. Same-label index "
        f"images beyond the pool: {payload['same_label_images_beyond_pool_per_query']} per query. Searched again, "
        f"wider: {wider} ({payload['queries_searched_again']:,} of {s['queries']:,} queries). Per-label lists "
        f"(the index's order by label and the sorted labels, int64): {payload['per_label_lists_mib']} MiB.",
        "",
        "Why the wider searches: a query is certain once its kept score beats the pool's last cosine plus the "
        "largest score another label's image can get (−0.1·min c_j, about 0 here). Random unit vectors in "
        f"{s['dim']} dimensions have nearly equal cosines (standard deviation 1/√{s['dim']}), so the −0.1·c_j of "
        "the other labels' images pushes the pool's kept scores below that bound, and searches widen until they "
        "do not: the exact path's cost above is mostly those searches (each at least the pool's own), not the "
        "same-label images. How many real queries need "
        "it depends on how far their kept images' cosines stand above the pool's last, which random vectors "
        "cannot tell: measure it on real embeddings before taking this ratio for GLDv2's.",
        "",
        f"**Extrapolation** to all {GLDV2_RETRIEVAL['queries']:,} test queries (not measured; linear: "
        f"{extrapolated['law']}), CPU seconds per model: plain {extrapolated['plain']:,}, exact "
        f"{extrapolated['exact']:,}.",
        "",
        f"Raw numbers: `{payload['results_path']}`.",
    ]
    return "\n".join(lines) + "\n"


def print_or_publish(name: str, payload: dict, section: str, args) -> None:
    """Print the BENCHMARKS.md section (``--no-write``), or write the results file and the section."""
    if args.no_write:
        print(section)
    else:
        publish(name, payload, section, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--sizes", default="50000,100000,200000,400000", help="database sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep-mib", default="16,64,256", help="CPU memory budgets to compare, MiB")
    parser.add_argument("--no-gpu", action="store_true", help="CPU only, even where CUDA is available")
    parser.add_argument("--no-write", action="store_true", help="print the results, write no files")
    parser.add_argument("--adjusted", action="store_true",
                        help="recognition's exact adjusted top-k against the re-sorted top 100 (--sizes: the gallery)")
    parser.add_argument("--toy-merge", action="store_true", help="--adjusted: merge at the scaled size, not GLDv2's")
    parser.add_argument("--label-rerank", action="store_true",
                        help="retrieval's exact label re-rank against the plain re-rank of the pool, at GLDv2's size")
    parser.add_argument("--index-fraction", type=float, default=1.0,
                        help="--label-rerank: this share of GLDv2's index images and labels")
    parser.add_argument("--zipf", type=float, default=0.6, help="--label-rerank: P(label of rank r) ~ r^-zipf")
    add_out_option(parser)
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.adjusted:
        main_adjusted(args)
        return
    if args.label_rerank:
        payload = run_mode("search_label_rerank", run_label_rerank, label_rerank_benchmarks_md, args)
        print(json.dumps({key: payload[key] for key in ("exact_vs_plain_total", "queries_searched_again",
                                                         "extrapolated_cpu_seconds_all_queries")}))
        return
    args.sweep_mib = [int(s) for s in args.sweep_mib.split(",")] if args.sweep_mib else []
    import faiss

    load_average_1m = round(os.getloadavg()[0], 2)
    runs, sweep = run_device(torch.device("cpu"), ["faiss", "torch"], args)
    gldv2_gpu = []
    if torch.cuda.is_available() and not args.no_gpu:
        gpu_runs, _ = run_device(torch.device("cuda"), ["torch"], args)
        runs += gpu_runs
        gldv2_gpu = run_gldv2_on_gpu(torch.device("cuda"), args)

    cpu = {b: max((r for r in runs if r["device"] == "cpu" and r["backend"] == b), key=lambda r: r["database"])
           for b in ("faiss", "torch")}
    by_size: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["device"] == "cpu":
            by_size.setdefault(r["database"], {})[r["backend"]] = r["seconds"]
    faster = {n: min(seconds, key=seconds.get) for n, seconds in by_size.items()}
    winners = set(faster.values())
    verdict = (f"{winners.pop()} was the faster on the CPU at every database size" if len(winners) == 1 else
               "the faster on the CPU depends on the size: " + ", ".join(f"{n:,}: {b}" for n, b in faster.items()))
    payload = {
        "benchmark": "search", "machine": machine(), "load_average_1m": load_average_1m,
        "load_average_1m_end": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
        "setup": {"queries": args.queries, "dim": args.dim, "k": args.k, "sizes": args.sizes, "repeats": args.repeats,
                  "stored_dtype": "float16", "gemm_block_rows": GEMM_BLOCK},
        "runs": runs, "budget_sweep": sweep, "gldv2_measured_on_gpu": gldv2_gpu,
        "faster_backend_on_cpu_by_database": faster,
        "default_backend": {
            "cpu": "faiss", "cuda": "torch",
            "why": f"Measured here: {verdict}. The library's defaults: faiss on the CPU; torch on a GPU, from an "
                   "earlier plain-PyTorch run on an H200 (this script measures it wherever CUDA is present).",
        },
        "ratios": {
            "search_vs_gemm": cpu["faiss"]["search_vs_gemm"],
            "torch_search_vs_gemm": cpu["torch"]["search_vs_gemm"],
            "faiss_vs_torch": round(cpu["torch"]["seconds"] / cpu["faiss"]["seconds"], 3),
        },
        "targets": {"search_vs_gemm": ">= 0.5"},
        "extrapolation": extrapolate(runs, "faiss", "cpu", args) + extrapolate(runs, "torch", "cpu", args),
        "results_path": results_path("search"),
    }
    print(json.dumps(payload["ratios"]), payload["default_backend"]["why"])
    print_or_publish("search", payload, benchmarks_md(payload), args)


if __name__ == "__main__":
    main()
