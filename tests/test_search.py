"""Exact chunked kNN (ray_landmark.eval.search): equal to brute force whatever the chunks, and bounded in memory."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_landmark.eval.search import chunk_bytes, chunk_sizes, knn
from ray_landmark.eval import search


def unit(n: int, dim: int, seed: int, dtype=np.float32) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def brute_force(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.fixture(params=["torch", "faiss"])
def backend(request):
    if request.param == "faiss":
        pytest.importorskip("faiss")
    return request.param


@pytest.mark.parametrize("query_chunk, database_chunk, k", [
    (None, None, 10),  # the chunks chunk_sizes picks (here: everything in one block)
    (7, 13, 5),  # chunks that divide neither size
    (64, 3, 10),  # database chunk smaller than k: each block offers fewer than k candidates
    (1, 1, 4),  # one query against one row at a time
    (50, 40, 100),  # k larger than a database chunk
    (16, 32, 500),  # k larger than the database: every row, sorted
])
def test_chunked_search_equals_brute_force(backend, query_chunk, database_chunk, k):
    queries, database = unit(50, 24, 0), unit(301, 24, 1)
    scores, indices = knn(queries, database, k, backend=backend, query_chunk=query_chunk,
                          database_chunk=database_chunk)
    expected_scores, expected_indices = brute_force(queries, database, min(k, len(database)))
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert scores.shape == indices.shape == (50, min(k, 301))
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


@pytest.mark.parametrize("query_chunk, database_chunk", [(None, None), (7, 13)])
def test_a_database_offset_is_added_to_every_score_of_its_row(backend, query_chunk, database_chunk):
    # The augmented dimension of recognition's exact adjusted top-k: the ranking is by q . g_j + offset_j, which moves
    # rows far below the plain top k to the front.
    queries, database = unit(30, 16, 4), unit(200, 16, 5)
    offset = np.random.default_rng(6).uniform(-1, 1, 200).astype(np.float32)
    scores, indices = knn(queries, database, 9, backend=backend, query_chunk=query_chunk,
                          database_chunk=database_chunk, database_offset=offset)
    sims = queries.astype(np.float64) @ database.astype(np.float64).T + offset
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=1), atol=1e-5)
    assert not np.array_equal(indices, knn(queries, database, 9, backend=backend)[1])
    with pytest.raises(ValueError, match="database_offset must be 200 finite numbers"):
        knn(queries, database, 9, backend=backend, database_offset=offset[:10])


def test_float16_tensors_and_a_small_budget(backend):
    queries, database = unit(40, 32, 2, np.float16), unit(500, 32, 3, np.float16)
    # A budget that forces several chunks of each.
    plan = chunk_sizes(40, 500, 32, 8, 40_000)
    assert plan[0] < 40 and plan[1] < 500
    scores, indices = knn(torch.from_numpy(queries), torch.from_numpy(database), 8, backend=backend,
                          max_bytes=40_000)
    expected_scores, expected_indices = brute_force(queries, database, 8)  # the same float16 values, exactly
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_default_backend_on_cpu_is_faiss(monkeypatch):
    pytest.importorskip("faiss")
    called = []
    monkeypatch.setattr(search, "_torch_topk", lambda *a: called.append("torch"))
    knn(unit(3, 8, 4), unit(20, 8, 5), 2)
    assert called == []


@pytest.mark.parametrize("queries, database, k, kwargs, message", [
    (unit(2, 8, 0), unit(5, 9, 1), 1, {}, "8-d but the database is 9-d"),
    (unit(2, 8, 0), np.zeros((0, 8), np.float32), 1, {}, "database is empty"),
    (unit(2, 8, 0), unit(5, 8, 1), 0, {}, "k must be at least 1"),
    (unit(2, 8, 0), unit(5, 8, 1), 1, {"backend": "annoy"}, "backend must be"),
    (unit(2, 8, 0), unit(5, 8, 1), 1, {"query_chunk": 0}, "chunk sizes must be at least 1"),
    (np.zeros(8, np.float32), unit(5, 8, 1), 1, {}, "queries must be a 2-d float"),
    (unit(2, 8, 0), np.zeros((5, 8), np.int64), 1, {}, "database must be a 2-d float"),
    (unit(2, 8, 0), unit(5, 8, 1), 1, {"max_bytes": 100}, "too small"),
])
def test_bad_input_is_a_one_line_value_error(queries, database, k, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        knn(queries, database, k, **{"backend": "torch", **kwargs})
    assert "\n" not in str(error.value)


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "ray-landmark\[cpu\]"'):
        knn(unit(2, 8, 0), unit(5, 8, 1), 1)


@pytest.mark.parametrize("n_query, n_db, dim, k, max_bytes", [
    (2048, 8192, 64, 10, 4 << 20),
    (117_577, 1_580_470, 512, 100, 1 << 30),  # GLDv2 recognition at the CPU default budget
    (117_577, 761_757, 1536, 100, 256 << 20),  # retrieval with the concatenated ensemble
    (10, 5, 4, 100, 1 << 20),  # k larger than the database
])
def test_chunk_sizes_fit_the_budget(n_query, n_db, dim, k, max_bytes):
    query_chunk, database_chunk = chunk_sizes(n_query, n_db, dim, k, max_bytes)
    assert 1 <= query_chunk <= n_query and 1 <= database_chunk <= n_db
    assert chunk_bytes(query_chunk, database_chunk, dim, k) <= max_bytes
    assert database_chunk >= min(n_db, search.MIN_DATABASE_CHUNK)


def _peak_rss_mib(run) -> float:
    """Peak resident memory of this process while `run()` runs, above what it held before: everything, torch's,
    numpy's and faiss's own C++ buffers alike."""
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident size
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(key: str) -> int:
    return int(re.search(key + r":\s*(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure_peaks(backend: str) -> tuple[float, float]:
    """(bounded, unbounded) peak MiB of a search with an 8 MiB budget and with a 1 GiB one. Run in a fresh process
    (see the test): a process with other threads (Ray's, in this test session) allocates beside the search.

    glibc malloc is set to hand freed memory back at once, so that memory freed earlier cannot hide a later peak."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 10)  # blocks over 64 KiB are mapped and unmapped by themselves
    libc.mallopt(m_trim_threshold, 0)
    queries, database, budget = unit(2048, 512, 6, np.float16), unit(8192, 512, 7, np.float16), 8 << 20
    knn(queries[:300], database[:3000], 10, backend=backend, max_bytes=budget)  # thread pools and BLAS buffers
    libc.malloc_trim(0)
    bounded = _peak_rss_mib(lambda: knn(queries, database, 10, backend=backend, max_bytes=budget))
    libc.malloc_trim(0)
    unbounded = _peak_rss_mib(lambda: knn(queries, database, 10, backend="torch", max_bytes=1 << 30))
    return bounded, unbounded


@pytest.mark.slow  # a search in a process of its own, which imports torch and faiss again
def test_peak_memory_stays_within_the_budget(backend):
    """2,048 queries x 8,192 rows of 512-d in float16: the float32 similarity matrix is 64 MiB, the budget 8 MiB. The
    unbounded run is the control: it shows that the measurement does see the 64 MiB block."""
    if not os.path.exists("/proc/self/clear_refs") or platform.libc_ver()[0] != "glibc":
        pytest.skip("needs Linux's /proc/self/clear_refs and glibc")

    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_search as t; " \
           f"print(*t.measure_peaks({backend!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bounded, unbounded = map(float, proc.stdout.split()[-2:])
    assert unbounded >= 64, unbounded
    # Slack over the budget: the result itself (2,048 x 10 scores and indices, 0.23 MiB), page rounding, Python.
    assert bounded <= 8 + 1.5, bounded

