"""Exact kNN (ray_landmark.infer.search) on this machine: seconds as the database grows, for each backend, against a
plain matrix product of the same size in the same run; peak memory; an extrapolation to GLDv2's sizes.

Queries and database are random unit vectors stored as float16 (as embeddings are). The reference is the matrix
product alone, queries x database^T in the search's compute dtype (float32 on the CPU, float16 on a GPU), written
block by block (16,384 database rows) into one preallocated buffer: no top-k, no allocation, the BLAS rate.
`search_vs_gemm` = reference seconds / search seconds at the same size. Times are the best of --repeats runs (on a
shared machine interference only adds time). On a CUDA device the torch backend also runs there, at the same sizes
and at GLDv2's real sizes. No Ray. Writes benchmarks/results/search.json and its section of BENCHMARKS.md.

    python benchmarks/search.py [--queries 2000] [--sizes 50000,100000,200000,400000] [--dim 512] [--k 100]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import REPO, machine, sync, update_benchmarks_md, write_results  # noqa: E402

from ray_landmark.infer.search import chunk_bytes, chunk_sizes, default_max_bytes, knn  # noqa: E402

GLDV2 = {  # queries x database at 512-d
    "recognition: test x GLDv2c train": (117_577, 1_580_470),
    "retrieval: test x index": (117_577, 761_757),
}
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


def interleaved_seconds(runs: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each run, in `repeats` rounds of all of them: a burst of load elsewhere on a shared machine then
    slows one round of every candidate, not every round of one."""
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync(device)
            started = time.perf_counter()
            run()
            sync(device)
            seconds[name].append(round(time.perf_counter() - started, 4))
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


def markdown(payload: dict) -> str:
    m, s = payload["machine"], payload["setup"]
    lines = [
        "## Exact kNN search (`benchmarks/search.py`)",
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
        "| device | backend | database | seconds (best) | every run, s | GFLOP/s | gemm s | vs gemm | peak MiB | "
        "chunks (queries × rows) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["runs"]:
        lines.append(f"| {r['device']} | {r['backend']} | {r['database']:,} | {r['seconds']} | "
                     f"{', '.join(map(str, r['all_seconds']))} | {r['gflops']} | {r['gemm_seconds']} | "
                     f"{r['search_vs_gemm']} | {r['peak_mib']} | {r['chunks'][0]:,} × {r['chunks'][1]:,} |")
    ratios = payload["ratios"]
    lines += [
        "",
        f"`search_vs_gemm` (CPU default backend `{payload['default_backend']['cpu']}`, largest database) = "
        f"**{ratios['search_vs_gemm']}** (target ≥ 0.5); `faiss_vs_torch` (torch seconds / faiss seconds, same "
        f"size) = **{ratios['faiss_vs_torch']}**. {payload['default_backend']['why']}",
    ]
    if payload["budget_sweep"]:
        lines += ["", f"Memory budget against speed (CPU, database {payload['budget_sweep'][0]['database']:,}):", "",
                  "| backend | max_bytes MiB | chunks | seconds (best) | every run, s | peak MiB |",
                  "|---|---|---|---|---|---|"]
        for r in payload["budget_sweep"]:
            lines.append(f"| {r['backend']} | {r['max_bytes_mib']} | {r['chunks'][0]:,} × {r['chunks'][1]:,} | "
                         f"{r['seconds']} | {', '.join(map(str, r['all_seconds']))} | {r['peak_mib']} |")
    if payload["gldv2_measured_on_gpu"]:
        lines += ["", "GLDv2's sizes, measured on the GPU (torch, float16):", "",
                  "| case | queries × database | seconds | GFLOP/s | peak MiB |", "|---|---|---|---|---|"]
        for r in payload["gldv2_measured_on_gpu"]:
            lines.append(f"| {r['case']} | {r['queries']:,} × {r['database']:,} | {r['seconds']} | {r['gflops']} | "
                         f"{r['peak_mib']} |")
    lines += ["", "**Extrapolation** to GLDv2's sizes at 512-d (not measured): seconds = 2·Q·N·D / the GFLOP/s "
              "measured at the largest database above; memory: the chunk pair the default budget allows plus the "
              "result (Q × k scores and indices), against the full float32 similarity matrix.", "",
              "| case | device, backend | queries × database | extrapolated seconds | chunk MiB | result MiB | "
              "full matrix GB |", "|---|---|---|---|---|---|---|"]
    for r in payload["extrapolation"]:
        lines.append(f"| {r['case']} | {r['device']}, {r['backend']} | {r['queries']:,} × {r['database']:,} | "
                     f"{r['extrapolated_seconds']:,} | {r['chunk_mib']} | {r['result_mib']} | "
                     f"{r['full_float32_matrix_gb']:,} |")
    lines += ["", f"Raw numbers: `{payload['results_path']}`."]
    return "\n".join(lines) + "\n"


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
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
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
        "results_path": "benchmarks/results/search.json",
    }
    print(json.dumps(payload["ratios"]), payload["default_backend"]["why"])
    if args.no_write:
        print(markdown(payload))
        return
    path = write_results("search", payload)
    update_benchmarks_md("search", markdown(payload))
    print(f"wrote {path.relative_to(REPO)} and BENCHMARKS.md")


if __name__ == "__main__":
    main()
