"""Exact inner-product k-nearest-neighbour search in bounded memory.

Recognition ranks the train set by cosine similarity to each test image and retrieval ranks the index set; the
embeddings are L2-normalised, so the inner product is the cosine. At GLDv2 scale the similarity matrix fits nowhere:
117,577 test queries x 1,580,470 train images is 743 GB in float32. So the database and the queries are cut into
chunks, each chunk pair's similarity block is reduced to its top k straight away, and those are merged into a running
top k per query. Memory then holds one block and its bookkeeping (`chunk_bytes`), never queries x database;
`chunk_sizes` picks the chunks from a byte budget. The database is the outer loop, so each database row is converted
(and moved to the device) once.

Two backends compute a block's top k:
  faiss  `faiss.knn`: the exhaustive kernel behind `IndexFlatIP` (BLAS products in small tiles, a heap per query),
         called on the chunk directly so the chunk is not copied into an index. The CPU default: faster than torch
         on the CPU in every size `benchmarks/search.py` measured (see BENCHMARKS.md). GPU faiss is used when the
         device is CUDA and faiss was built with GPUs (`ray-landmark[gpu]`); not measured yet.
  torch  matmul + topk. The GPU default, in float16: an earlier plain-PyTorch matmul + topk run did 117,577 x
         1,580,470 x 512, top 100, in 2.3 s on one H200.
On the CPU both compute in float32 (float16 products are slow or missing there); the inputs may be float16.

`database_offset` adds a number per database row to every query's score of it: the augmented-dimension trick (query
extended by 1, database row j by offset_j) done block by block, so no extended copy of the database is ever made.
Recognition's non-landmark re-ranking ranks the gallery by `cos - b_j` with it (`postprocess.adjusted_topk`).
"""

from __future__ import annotations

import time

import numpy as np
import torch

MAX_QUERY_CHUNK = 8192  # the query chunk of the H200 measurement; larger buys nothing once the block is big
MIN_DATABASE_CHUNK = 1024  # shrink the query chunk before the database chunk falls below this (faiss's own tile)
TOPK_BYTES = 8 * (4 + 8)  # per query row and per neighbour: ~8 live (float32 score, int64 index) lists while merging
_searched = {"seconds": 0.0, "searches": 0}  # this process's knn calls so far (knn_clock)


def knn_clock() -> dict[str, float]:
    """Seconds spent in :func:`knn` and searches made by this process so far: the difference of two readings splits
    a job's time between exact search and the rest (the ensemble's summary.json)."""
    return dict(_searched)


def chunk_bytes(query_chunk: int, database_chunk: int, dim: int, k: int, elem_bytes: int = 4) -> int:
    """Bytes one chunk pair holds at once: both chunks in the compute dtype, their similarity block, the top-k merge.

    The output (queries x k scores and indices) is not included: it is the result, whatever the chunks.
    """
    vectors = (query_chunk + database_chunk) * dim * elem_bytes
    return vectors + query_chunk * database_chunk * elem_bytes + query_chunk * min(k, database_chunk) * TOPK_BYTES


def chunk_sizes(n_query: int, n_db: int, dim: int, k: int, max_bytes: int, elem_bytes: int = 4) -> tuple[int, int]:
    """(query chunk, database chunk) whose `chunk_bytes` fit in `max_bytes`: the largest database chunk for a query
    chunk of up to MAX_QUERY_CHUNK rows, halving the query chunk while the database chunk would be under
    MIN_DATABASE_CHUNK rows (or the whole database)."""
    k = min(k, n_db)
    query_chunk = max(1, min(n_query, MAX_QUERY_CHUNK))
    while True:
        # Solved for the database chunk with the top-k term at k (an overestimate when the chunk is under k rows).
        free = max_bytes - query_chunk * (dim * elem_bytes + k * TOPK_BYTES)
        database_chunk = min(n_db, max(0, free) // ((query_chunk + dim) * elem_bytes))
        if database_chunk >= min(n_db, MIN_DATABASE_CHUNK) or query_chunk == 1:
            break
        query_chunk = (query_chunk + 1) // 2
    if database_chunk < 1:
        raise ValueError(f"max_bytes={max_bytes:,} is too small for a top {k} over {dim}-d vectors")
    return query_chunk, database_chunk


def knn(queries, database, k: int, *, device: str | torch.device | None = None, backend: str | None = None,
        max_bytes: int | None = None, query_chunk: int | None = None, database_chunk: int | None = None,
        database_offset=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of each query over the database, plus ``database_offset[j]`` (float [N]) when given.

    queries [Q, D] and database [N, D]: numpy arrays or torch tensors, float16 or float32. device: where to compute
    (default: the queries' device). backend: "faiss" (the CPU default) or "torch" (the GPU default). max_bytes bounds
    `chunk_bytes` (default: 1 GiB on the CPU, a quarter of the free memory on a GPU); query_chunk and database_chunk
    override the chunks it picks. Returns (scores float32 [Q, k'], indices int64 [Q, k']) as numpy arrays, k' =
    min(k, N), each row by descending score.
    """
    started = time.perf_counter()
    queries, database = _as_tensor(queries, "queries"), _as_tensor(database, "database")
    _check(queries, database, k, query_chunk, database_chunk)
    offset = None
    if database_offset is not None:
        offset = torch.as_tensor(np.asarray(database_offset, dtype=np.float32))
        if offset.shape != (len(database),) or not torch.isfinite(offset).all():
            raise ValueError(f"database_offset must be {len(database)} finite numbers, got shape {tuple(offset.shape)}")
    device = torch.device(device) if device is not None else queries.device
    backend = backend or ("torch" if device.type == "cuda" else "faiss")
    # float16 products on a GPU (what was measured); float32 on the CPU, where float16 matmul is slow or missing.
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    n_query, n_db, dim = len(queries), len(database), queries.shape[1] + (offset is not None)
    k = min(k, n_db)
    if query_chunk is None or database_chunk is None:
        budget = max_bytes if max_bytes is not None else default_max_bytes(device)
        planned = chunk_sizes(n_query, n_db, dim, k, budget, dtype.itemsize)
        query_chunk, database_chunk = query_chunk or planned[0], database_chunk or planned[1]

    if backend == "torch":
        block_topk, where = _torch_topk, device
    elif backend == "faiss":
        block_topk, where = _faiss_topk(device), torch.device("cpu")  # faiss reads host
    else:
        raise ValueError(f"backend must be 'torch' or 'faiss', not {backend!r}")
    scores = torch.full((n_query, k), -torch.inf, device=where)
    indices = torch.full((n_query, k), -1, dtype=torch.int64, device=where)
    for d0 in range(0, n_db, database_chunk):
        block = database[d0:d0 + database_chunk].to(where, dtype)
        if offset is not None:  # the augmented dimension: the block gains its offsets, each query chunk a 1
            block = torch.cat([block, offset[d0:d0 + database_chunk, None].to(where, dtype)], dim=1)
        for q0 in range(0, n_query, query_chunk):
            rows = slice(q0, q0 + query_chunk)
            chunk = queries[rows].to(where, dtype)
            if offset is not None:
                chunk = torch.cat([chunk, torch.ones(len(chunk), 1, dtype=dtype, device=where)], dim=1)
            top_scores, top_indices = block_topk(chunk, block, min(k, len(block)))
            scores[rows], indices[rows] = _merge(scores[rows], indices[rows], top_scores, top_indices + d0, k)
        del block  # before the next one is made: never two database chunks at once
    found = scores.cpu().numpy(), indices.cpu().numpy()
    _searched["seconds"] += time.perf_counter() - started
    _searched["searches"] += 1
    return found


def _as_tensor(x, name: str) -> torch.Tensor:
    x = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a 2-d float numpy array or torch tensor")
    return x


def _check(queries: torch.Tensor, database: torch.Tensor, k: int, *chunks: int | None) -> None:
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries are {queries.shape[1]}-d but the database is {database.shape[1]}-d")
    if len(database) == 0:
        raise ValueError("the database is empty")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if any(chunk is not None and chunk < 1 for chunk in chunks):
        raise ValueError(f"chunk sizes must be at least 1, not {chunks}")


def default_max_bytes(device: torch.device) -> int:
    """The memory budget knn uses when max_bytes is not given."""
    if device.type == "cuda":
        # Room for the H200 run's blocks (8,192 queries x 1.58 M rows in float16 is 26 GB) on a large card.
        return torch.cuda.mem_get_info(device)[0] // 4
    return 1 << 30


def _merge(scores, indices, new_scores, new_indices, k: int):
    """Top k of two candidate lists per row: the running top k and a block's."""
    scores = torch.cat([scores, new_scores.float()], dim=1)
    indices = torch.cat([indices, new_indices], dim=1)
    scores, picked = scores.topk(k, dim=1)
    return scores, indices.gather(1, picked)


def _torch_topk(queries: torch.Tensor, block: torch.Tensor, k: int):
    return (queries @ block.T).topk(k, dim=1)


def _faiss_topk(device: torch.device):
    try:
        import faiss
    except ImportError:
        extra = "gpu" if device.type == "cuda" else "cpu"
        raise ImportError(f'the faiss backend needs faiss: pip install "ray-landmark[{extra}]"') from None
    if device.type == "cuda":
        if faiss.get_num_gpus() == 0:
            raise ImportError('this faiss has no GPU support: pip install "ray-landmark[gpu]"')
        resources = faiss.StandardGpuResources()

        gpu = -1 if device.index is None else device.index  # -1: the current CUDA device

        def gpu_topk(queries, block, k):
            scores, indices = faiss.knn_gpu(resources, queries.numpy(), block.numpy(), k,
                                            metric=faiss.METRIC_INNER_PRODUCT, device=gpu)
            return torch.from_numpy(scores), torch.from_numpy(indices)

        return gpu_topk

    def cpu_topk(queries, block, k):
        # faiss tiles the products itself (at most 4,096 x 1,024 at a time), inside the block that chunk_bytes counts.
        scores, indices = faiss.knn(queries.numpy(), block.numpy(), k, metric=faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(scores), torch.from_numpy(indices)

    return cpu_topk

