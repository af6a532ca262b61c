"""The ensemble's post-processing (solution.md §5), on aligned numpy arrays: row i of every array is the same image.

kNN results come in as ``(scores, indices)``: float [Q, k] cosine similarities, each row sorted descending, and
int64 [Q, k] row numbers into the searched set. Nothing here searches; the caller runs the kNN.

Recognition: :func:`combine_families` -> kNN to the train gallery and to the non-landmark set N ->
:func:`nonlandmark_bias` for the gallery -> :func:`recognize`.
Retrieval, per model: :func:`label_by_neighbours` for queries and index images -> :func:`soft_rerank` of the
query -> index kNN; then :func:`fuse_models` over the models and :func:`ranked_ids` for the submission.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Below this norm a row has no direction: its cosine to anything would be noise (or NaN after normalising).
MIN_NORM = 1e-12


def invalid_rows(embeddings: np.ndarray) -> np.ndarray:
    """bool [N]: rows holding a NaN or infinity, or of (near-)zero norm, which no cosine similarity can use."""
    norms = np.linalg.norm(np.asarray(embeddings, dtype=np.float64), axis=1)
    return ~np.isfinite(norms) | (norms <= MIN_NORM)


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """float32 [N, D]: each row divided by its L2 norm (rows must be valid, see :func:`invalid_rows`)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)


def combine_families(models: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """The ensemble embedding of §5 recognition step 1: float32 [N, sum of the families' D], unit rows.

    ``models``: (family name, embeddings [N, D_family]) per model, all with the same N rows. Each model's rows are
    L2-normalised (so every model weighs the same within its family), averaged within the family, the family average
    is L2-normalised again, and the families are concatenated in sorted name order (so the layout does not depend on
    the order the models were listed in) and normalised once more. Normalising each family average before
    concatenating makes every family weigh the same: the cosine of two combined rows is the mean of the per-family
    cosines, however much the models inside a family disagree (which shrinks their average's norm).

    Raises ValueError when a model has an invalid row (NaN, infinity, zero): find those rows with
    :func:`invalid_rows` on every model, exclude and count them, and combine the rest.
    """
    if not models:
        raise ValueError("combine_families needs at least one model")
    n = len(models[0][1])
    families: dict[str, list[np.ndarray]] = {}
    for family, embeddings in models:
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or len(embeddings) != n:
            raise ValueError(f"family {family!r}: embeddings of shape {embeddings.shape}, expected ({n}, D)")
        _require_valid(embeddings, f"a {family!r} model")
        families.setdefault(family, []).append(l2_normalize(embeddings))
    averages = []
    for family in sorted(families):
        dims = {e.shape[1] for e in families[family]}
        if len(dims) > 1:
            raise ValueError(f"family {family!r}: models of different dimensions {sorted(dims)} cannot be averaged")
        average = np.mean(families[family], axis=0)
        _require_valid(average, f"the {family!r} average")  # only exactly opposite models cancel out
        averages.append(l2_normalize(average))
    return l2_normalize(np.concatenate(averages, axis=1))


def _require_valid(embeddings: np.ndarray, what: str) -> None:
    bad = invalid_rows(embeddings)
    if bad.any():
        raise ValueError(
            f"{what} has {int(bad.sum())} of {len(bad)} rows that are zero or not finite (first: row "
            f"{int(np.argmax(bad))}); exclude them (invalid_rows) before combining"
        )


def nonlandmark_bias(scores_to_nonlandmark: np.ndarray, k: int = 5) -> np.ndarray:
    """float32 [N]: the mean of each row's top-k similarities to the non-landmark set N (§5 recognition step 3).

    For the gallery this is b_j (k = 5); :func:`recognize` uses it with k = ``nonlandmark_k`` (10) for the query's
    confidence penalty. ``scores_to_nonlandmark``: the scores [N, k'] of a kNN to N, rows sorted descending; when N
    holds fewer than k images the mean is over the k' columns there are.
    """
    scores = np.asarray(scores_to_nonlandmark, dtype=np.float32)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"the non-landmark set N is empty (kNN scores of shape {scores.shape}): "
                         "non-landmark re-ranking needs at least one image in N")
    if not np.isfinite(scores).all():
        raise ValueError("kNN scores to the non-landmark set N hold NaN or infinity")
    return scores[:, :k].mean(axis=1)


def adjusted_similarity(scores: np.ndarray, indices: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """float32 [Q, k]: ``clamp(cos(q, j), 0, 1) - b_j`` for each query's gallery neighbours j (``bias`` None: b = 0)."""
    adjusted = np.clip(np.asarray(scores, dtype=np.float32), 0.0, 1.0)
    return adjusted if bias is None else adjusted - np.asarray(bias, dtype=np.float32)[indices]


def vote(labels: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the label with the largest summed weight, and that sum: (int64 [Q], float32 [Q]).

    ``labels`` int [Q, n] and ``weights`` float [Q, n], columns best-ranked first. A tie between labels goes to the one
    whose best neighbour ranks first.
    """
    labels, weights = np.asarray(labels, dtype=np.int64), np.asarray(weights, dtype=np.float32)
    if labels.shape != weights.shape or labels.ndim != 2 or labels.shape[1] == 0:
        raise ValueError(f"vote needs labels and weights of one shape [Q, n >= 1], got {labels.shape} and "
                         f"{weights.shape}")
    same = labels[:, :, None] == labels[:, None, :]
    # totals[q, c]: the summed weight of column c's label. Columns sharing a label sum the same terms in the same
    # order, so their totals are bit-identical and argmax's first-maximum rule picks the best-ranked label on ties.
    totals = np.where(same, weights[:, None, :], np.float32(0)).sum(axis=2)
    best = totals.argmax(axis=1)
    rows = np.arange(len(labels))
    return labels[rows, best], totals[rows, best]


def label_by_neighbours(
    scores: np.ndarray,
    indices: np.ndarray,
    gallery_labels: np.ndarray,
    bias: np.ndarray | None = None,
    top_k: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Label images by their nearest train (gallery) images: (landmark ids int64 [Q], confidence float32 [Q]).

    ``scores``/``indices`` [Q, k]: the kNN to the gallery; ``gallery_labels`` int [G]: landmark id per gallery image;
    ``bias`` float [G] or None: b_j of :func:`nonlandmark_bias`. The neighbours are re-sorted by
    :func:`adjusted_similarity` *before* the top ``top_k`` are taken, so that a gallery image close to N drops out and
    the next neighbour votes in its place; ties keep the kNN order. The top ``top_k`` adjusted similarities are summed
    per label (:func:`vote`): the label with the largest sum wins, with that sum as its confidence.

    This is retrieval step 2 (no bias; the voting was never published, the sum of similarity is our choice) and the
    core of recognition (:func:`recognize`).
    """
    scores, indices = _checked_knn(scores, indices, len(gallery_labels), "gallery")
    if bias is not None and len(bias) != len(gallery_labels):
        raise ValueError(f"bias has {len(bias)} values for {len(gallery_labels)} gallery images")
    adjusted = adjusted_similarity(scores, indices, bias)
    top = np.argsort(-adjusted, axis=1, kind="stable")[:, :top_k]
    neighbours = np.take_along_axis(indices, top, axis=1)
    return vote(np.asarray(gallery_labels)[neighbours], np.take_along_axis(adjusted, top, axis=1))


def recognize(
    scores: np.ndarray,
    indices: np.ndarray,
    gallery_labels: np.ndarray,
    bias: np.ndarray | None = None,
    query_nonlandmark_scores: np.ndarray | None = None,
    top_k: int = 3,
    nonlandmark_k: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Landmark ids int64 [Q] and confidences float32 [Q] with non-landmark re-ranking (§5 recognition step 3).

    :func:`label_by_neighbours` with the gallery's b_j, then ``confidence -= mean of the query's top-nonlandmark_k
    similarities to N`` (``query_nonlandmark_scores`` [Q, k'] from the query -> N kNN). Leaving ``bias`` and
    ``query_nonlandmark_scores`` None gives the ensemble without post-processing (b = 0, no penalty).
    """
    landmarks, confidence = label_by_neighbours(scores, indices, gallery_labels, bias, top_k)
    if query_nonlandmark_scores is None:
        return landmarks, confidence
    if len(query_nonlandmark_scores) != len(landmarks):
        raise ValueError(f"{len(query_nonlandmark_scores)} rows of query -> N scores for {len(landmarks)} queries")
    return landmarks, confidence - nonlandmark_bias(query_nonlandmark_scores, nonlandmark_k)


def soft_rerank(
    scores: np.ndarray,
    indices: np.ndarray,
    query_labels: np.ndarray,
    index_labels: np.ndarray,
    index_confidence: np.ndarray,
    same_factor: float = 1.0,
    other_factor: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """One model's query -> index kNN re-scored by labels (§5 retrieval step 3) and re-sorted: (float32, int64) [Q, k].

    ``s(q, j) += same_factor * c_j`` when ``query_labels[q] == index_labels[j]``, else ``s(q, j) -= other_factor *
    c_j``, with c_j = ``index_confidence[j]`` (labels and confidences from :func:`label_by_neighbours`). Ties keep the
    kNN order.
    """
    scores, indices = _checked_knn(scores, indices, len(index_labels), "index")
    if len(query_labels) != len(scores) or len(index_confidence) != len(index_labels):
        raise ValueError(f"{len(query_labels)} query labels for {len(scores)} queries, {len(index_confidence)} "
                         f"confidences for {len(index_labels)} index labels")
    same = np.asarray(query_labels)[:, None] == np.asarray(index_labels)[indices]
    confidence = np.asarray(index_confidence, dtype=np.float32)[indices]
    rescored = scores + np.where(same, same_factor * confidence, -other_factor * confidence).astype(np.float32)
    order = np.argsort(-rescored, axis=1, kind="stable")
    return np.take_along_axis(rescored, order, axis=1), np.take_along_axis(indices, order, axis=1)


def fuse_models(
    results: Sequence[tuple[np.ndarray, np.ndarray]],
    per_model: int = 750,
    out_k: int = 100,
    chunk_rows: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum the models' retrieval scores per index image (§5 retrieval step 4): (float32, int64) [Q, min(out_k, W)].

    ``results``: (scores, indices) [Q, k_m] per model, rows sorted descending. Each model keeps its first
    ``per_model`` columns; an index image's fused score is the sum over the models that kept it (0 from a model that
    did not); each row lists its best ``out_k`` images, ties by ascending index. W is the total number of kept
    columns; a row with fewer distinct images than its width is padded with index -1 and score -inf.
    ``chunk_rows`` queries are fused at a time, to bound memory (Q x W can be 117,577 x 6,000).
    """
    if not results:
        raise ValueError("fuse_models needs at least one model's results")
    kept = [_checked_knn(s, i, None, f"model {m}") for m, (s, i) in enumerate(results)]
    q = len(kept[0][0])
    if any(len(s) != q for s, _ in kept):
        raise ValueError(f"models disagree on the number of queries: {[len(s) for s, _ in kept]}")
    kept = [(s[:, :per_model], i[:, :per_model]) for s, i in kept]
    width = min(out_k, sum(s.shape[1] for s, _ in kept))
    scores = np.empty((q, width), dtype=np.float32)
    indices = np.empty((q, width), dtype=np.int64)
    for start in range(0, q, chunk_rows):
        rows = slice(start, start + chunk_rows)
        scores[rows], indices[rows] = _fuse_rows(
            np.concatenate([s[rows] for s, _ in kept], axis=1), np.concatenate([i[rows] for _, i in kept], axis=1),
            width,
        )
    return scores, indices


def _fuse_rows(scores: np.ndarray, indices: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: sum the scores of equal indices, keep the ``width`` best (the fuse_models contract)."""
    by_index = np.argsort(indices, axis=1, kind="stable")
    indices = np.take_along_axis(indices, by_index, axis=1)
    scores = np.take_along_axis(scores, by_index, axis=1)
    first = np.ones(indices.shape, dtype=bool)
    first[:, 1:] = indices[:, 1:] != indices[:, :-1]
    # Every row opens a run, so the runs of equal indices in the flattened array never cross rows.
    starts = np.flatnonzero(first)
    fused = np.full(indices.shape, -np.inf, dtype=np.float32)
    fused.reshape(-1)[starts] = np.add.reduceat(scores.reshape(-1), starts)
    best = np.argsort(-fused, axis=1, kind="stable")[:, :width]
    best_scores = np.take_along_axis(fused, best, axis=1)
    return best_scores, np.where(np.isfinite(best_scores), np.take_along_axis(indices, best, axis=1), -1)


def ranked_ids(indices: np.ndarray, ids: Sequence[str] | np.ndarray) -> list[list[str]]:
    """Per row of ``indices`` [Q, k], the ``ids`` of its entries in order, padding (-1) left out."""
    ids = np.asarray(ids, dtype=object)
    return [ids[row[row >= 0]].tolist() for row in np.asarray(indices)]


def _checked_knn(scores, indices, size: int | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The kNN arrays as float32/int64 after checking shape, finiteness and (when ``size`` is known) index range:
    a NaN score or an out-of-range index (such as -1 padding) would otherwise silently pick a wrong image."""
    scores, indices = np.asarray(scores, dtype=np.float32), np.asarray(indices, dtype=np.int64)
    if scores.shape != indices.shape or scores.ndim != 2:
        raise ValueError(f"{what} kNN: scores {scores.shape} and indices {indices.shape} must share one [Q, k] shape")
    if not np.isfinite(scores).all():
        raise ValueError(f"{what} kNN: scores hold NaN or infinity")
    if indices.size and (indices.min() < 0 or (size is not None and indices.max() >= size)):
        raise ValueError(f"{what} kNN: indices outside [0, {size if size is not None else 'size'}): "
                         f"min {indices.min()}, max {indices.max()}")
    return scores, indices
