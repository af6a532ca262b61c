"""The ensemble's post-processing (arXiv 2110.03786, and the 2020 1st-place code it takes the non-landmark re-ranking
from: psinger/kaggle-landmark-recognition-2020-1st-place, ``notebooks/blend_ranking.ipynb``), on plain arrays of
unit rows: no files, manifests or Ray, so a batch job and an online service answer alike.

Recognition: :func:`combine_families` -> :func:`nonlandmark_bias` (b_j of every gallery image, once per gallery and N)
-> :func:`recognize`, which takes the *exact* top-k of ``clamp(cos, 0, 1) - b_j`` over the whole gallery
(:func:`adjusted_topk`), votes, and subtracts :func:`query_penalty`. A query that is itself in N is never its own
evidence: ``query_rows`` names its row of N, which is then left out of every b_j it meets and of its own penalty.
Retrieval: :func:`label_images` (query and index images by their train neighbours) -> :func:`retrieve`, per model
:func:`label_rerank` of the query -> index kNN (exact over the whole index), then :func:`fuse_models`; :func:`ranked_ids` for the submission.

Low-level pieces take kNN results as ``(scores, indices)``: float [Q, k] similarities, each row sorted descending, and
int64 [Q, k] row numbers into the searched set. The sets searched (gallery, N, index) may also be torch tensors, as
``search.knn`` takes them: a service keeps them on its GPU instead of copying them there for every request.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from ray_landmark.eval.search import knn

if TYPE_CHECKING:  # only their fields are read: no pydantic needed where the settings come from elsewhere
    from ray_landmark.infer.config import RecognitionSettings, RetrievalSettings

# The recognition post-processing steps, each of which can be left out (the report's ablation rows).
RECOGNITION_STEPS = ("bias", "penalty")

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


def combine_families(models: Sequence[tuple[str, np.ndarray]], weights: Sequence[float] | None = None) -> np.ndarray:
    """The ensemble embedding (the method's recognition step 1): float32 [N, sum of the families' D], unit rows.

    ``models``: (family name, embeddings [N, D_family]) per model, all with the same N rows; ``weights``: one per model
    (default all 1). Each model's rows are L2-normalised, averaged within the family with the models' weights, the
    family average is L2-normalised again, and the families are concatenated in sorted name order (so the layout does
    not depend on the order the models were listed in) and normalised once more. Normalising each family average
    before concatenating makes every family weigh the same: the cosine of two combined rows is the mean of the
    per-family cosines, however much the models inside a family disagree (which shrinks their average's norm).

    Raises ValueError when a model has an invalid row (NaN, infinity, zero): find those rows with
    :func:`invalid_rows` on every model, exclude and count them, and combine the rest.
    """
    if not models:
        raise ValueError("combine_families needs at least one model")
    weights = [1.0] * len(models) if weights is None else list(weights)
    if len(weights) != len(models) or not all(w > 0 for w in weights):
        raise ValueError(f"combine_families needs one positive weight per model, got {weights}")
    n = len(models[0][1])
    families: dict[str, list[tuple[float, np.ndarray]]] = {}
    for (family, embeddings), weight in zip(models, weights):
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or len(embeddings) != n:
            raise ValueError(f"family {family!r}: embeddings of shape {embeddings.shape}, expected ({n}, D)")
        _require_valid(embeddings, f"a {family!r} model")
        families.setdefault(family, []).append((weight, l2_normalize(embeddings)))
    averages = []
    for family in sorted(families):
        dims = {e.shape[1] for _, e in families[family]}
        if len(dims) > 1:
            raise ValueError(f"family {family!r}: models of different dimensions {sorted(dims)} cannot be averaged")
        average = sum(w * e for w, e in families[family]) / sum(w for w, _ in families[family])
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


# ---------------------------------------------------------------- non-landmark re-ranking


@dataclass(frozen=True)
class NonLandmarkBias:
    """b_j of each gallery image j: the mean of its top-k similarities to the non-landmark set N, and what leaving one
    image of N out does to it.

    ``rows`` and ``sims``: j's top-k rows of N and their similarities; ``drops``: b_j minus b_j computed over N without
    that row ((sim - the (k+1)-th similarity) / k, >= 0). A query that is N's row r sees every j listing r with the
    bias lowered by that drop, and its own similarity to j is that ``sims`` entry. From precomputed biases alone
    (:meth:`of`) there is no such correction: fine for queries outside N.
    """

    bias: np.ndarray  # float32 [G]
    rows: np.ndarray | None = None  # int64 [G, k]
    sims: np.ndarray | None = None  # float32 [G, k]
    drops: np.ndarray | None = None  # float32 [G, k]

    @classmethod
    def of(cls, bias: np.ndarray) -> "NonLandmarkBias":
        bias = np.asarray(bias, dtype=np.float32)
        if bias.ndim != 1 or not np.isfinite(bias).all():
            raise ValueError(f"b_j must be a finite float vector [G], got shape {bias.shape}")
        return cls(bias)

    def listing(self, n_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For queries that are N's rows ``n_rows`` (int [Q], -1: not in N): the pairs (query, gallery image j) whose
        b_j counted that row, as flat arrays (query position, j, the query's similarity to j, the lowered b_j)."""
        empty = (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32),) * 2
        if self.rows is None:
            return empty
        order, sorted_rows = self._by_row
        n_rows = np.asarray(n_rows, dtype=np.int64)
        starts = np.searchsorted(sorted_rows, n_rows, "left")
        counts = np.where(n_rows >= 0, np.searchsorted(sorted_rows, n_rows, "right") - starts, 0)
        if not counts.sum():
            return empty
        queries = np.repeat(np.arange(len(n_rows)), counts)
        # Positions starts[q] .. starts[q] + counts[q] - 1 of the sorted listing, for every query, in one array.
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        entries = order[np.repeat(starts, counts) + offsets]  # into the flattened [G, k] arrays
        gallery = entries // self.rows.shape[1]
        return queries, gallery, self.sims.ravel()[entries], self.bias[gallery] - self.drops.ravel()[entries]

    @cached_property
    def _by_row(self) -> tuple[np.ndarray, np.ndarray]:
        """The flattened ``rows`` sorted (a permutation, the sorted values), once per bias: a service lists every
        query against the same one."""
        order = np.argsort(self.rows.ravel(), kind="stable")
        return order, self.rows.ravel()[order]


def _require_size(n: int, k: int, what: str, self_excluded: bool) -> None:
    if n <= k:
        raise ValueError(f"the non-landmark set N has {n} images; {what} needs more than k = {k}")
    if self_excluded and n <= k + 1:
        raise ValueError(f"the non-landmark set N has {n} images; {what} with gallery images that are in N "
                         f"needs more than k + 1 = {k + 1}")


def _without_own(scores: np.ndarray, indices: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first k kNN entries once the entry of its own row ``own`` (-1: none) is dropped; a row whose own
    entry is not among them (not in N, or behind exact duplicates) drops its last entry instead, which then ranks
    below k anyway. The rows must be at least k + 1 wide."""
    keep = indices != np.asarray(own, dtype=np.int64)[:, None]
    keep[keep.all(axis=1), -1] = False
    width = scores.shape[1] - 1
    return scores[keep].reshape(-1, width)[:, :k], indices[keep].reshape(-1, width)[:, :k]


def nonlandmark_bias(gallery: np.ndarray, nonlandmark: np.ndarray, k: int = 5, *,
                     gallery_rows: np.ndarray | None = None, device: str | None = None) -> NonLandmarkBias:
    """b_j for every gallery image: the mean of its top-k similarities to N (the method's recognition step 3), with
    what each of those N images contributes (see :class:`NonLandmarkBias`).

    ``gallery`` [G, D] and ``nonlandmark`` [n, D]: unit rows; ``gallery_rows`` int [G]: the row of N that a gallery
    image is itself (-1: none), left out of its own b_j. N must hold more than k images (k + 1 when some gallery
    image is in N), so that leaving any one out still leaves k, and a (k+1)-th to move up.
    """
    own = None if gallery_rows is None or not (np.asarray(gallery_rows) >= 0).any() else np.asarray(gallery_rows)
    _require_size(len(nonlandmark), k, "b_j", own is not None)
    scores, indices = knn(gallery, nonlandmark, k + 1 + (own is not None), device=device)
    if own is not None:
        scores, indices = _without_own(scores, indices, own, k + 1)
    _require_finite(scores, "kNN scores to the non-landmark set N")
    top = scores[:, :k]
    return NonLandmarkBias(bias=top.mean(axis=1), rows=indices[:, :k], sims=top,
                           drops=(top - scores[:, k:k + 1]) / np.float32(k))


def query_penalty(queries: np.ndarray, nonlandmark: np.ndarray, k: int = 10, *, query_rows: np.ndarray | None = None,
                  device: str | None = None) -> np.ndarray:
    """float32 [Q]: the mean of each query's top-k similarities to N (the method's recognition step 3), which the
    confidence loses. A query that is N's row ``query_rows[q]`` (-1: none) leaves itself out: the 2020 code takes the
    top k + 1 and drops the first; here the dropped entry is the query's own row, found by index."""
    own = None if query_rows is None or not (np.asarray(query_rows) >= 0).any() else np.asarray(query_rows)
    _require_size(len(nonlandmark), k, "the query penalty", False)  # a query in N still has k others
    scores, indices = knn(queries, nonlandmark, k + (own is not None), device=device)
    if own is not None:
        scores, _ = _without_own(scores, indices, own, k)
    _require_finite(scores, "kNN scores to the non-landmark set N")
    return scores.mean(axis=1)


def adjusted_topk(queries: np.ndarray, gallery: np.ndarray, k: int, bias: NonLandmarkBias | None = None, *,
                  query_rows: np.ndarray | None = None, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k of ``a(q, j) = clamp(cos(q, j), 0, 1) - b_j`` over the whole gallery: (float32, int64) [Q, k].

    The 2020 code computes ``a`` for every gallery image and takes its top k; a re-sort of a raw top-k would lose a
    gallery image that wins only after the adjustment. Here one kNN finds the top k of ``u = cos - b_j`` (the search
    adds ``-b_j`` to each gallery row's inner product: the augmented-dimension trick, query extended by 1 and gallery
    image j by -b_j). The clamp is exact because ``a = max(u, -b_j)`` whenever cos <= 1, so the top k of ``a`` lies in
    the union of the top k of ``u`` and the top k of ``-b_j`` (the k smallest biases, the same for every query):
    any other image is beaten by k images of one of the two lists. A query in N (``query_rows``) meets a lowered b_j
    on the gallery images whose b_j counted it (:meth:`NonLandmarkBias.listing`): those pairs join the candidates
    with their own scores. The candidates are scored as ``a`` and the best k kept, ties to the lower gallery row.
    ``bias`` None: b = 0, the plain top k by cosine.
    """
    k = min(k, len(gallery))
    if bias is None:
        scores, indices = knn(queries, gallery, k, device=device)
        return np.clip(scores, 0.0, 1.0), indices
    b = np.asarray(bias.bias, dtype=np.float32)
    if len(b) != len(gallery):
        raise ValueError(f"b_j has {len(b)} values for {len(gallery)} gallery images")
    if query_rows is not None and len(query_rows) != len(queries):
        raise ValueError(f"{len(query_rows)} query rows of N for {len(queries)} queries")
    scores, indices = knn(queries, gallery, k, device=device, database_offset=-b)
    lowest = np.argsort(b, kind="stable")[:k]
    return merge_candidates(scores, indices, _inner(queries, gallery[lowest]), lowest, bias, query_rows)


def merge_candidates(scores: np.ndarray, indices: np.ndarray, cos_lowest: np.ndarray, lowest: np.ndarray,
                     bias: NonLandmarkBias, query_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The part of :func:`adjusted_topk` after its search: from the search's top k of ``cos - b_j`` (``scores``,
    ``indices`` [Q, k]), the queries' cosines ``cos_lowest`` [Q, k] to the k gallery images of smallest b_j
    (``lowest``), and the pairs of queries in N, each query's best k by ``a``: (float32, int64) [Q, k]."""
    n_query, k = scores.shape
    b = np.asarray(bias.bias, dtype=np.float32)
    q_pos = [np.repeat(np.arange(n_query), k)] * 2
    j = [indices.ravel(), np.tile(lowest, n_query)]
    a = [(np.clip(scores + b[indices], 0.0, 1.0) - b[indices]).ravel(),
         (np.clip(cos_lowest, 0.0, 1.0) - b[lowest]).ravel()]
    if query_rows is not None:
        pair_q, pair_j, pair_cos, pair_b = bias.listing(query_rows)
        pair_a = np.clip(pair_cos, 0.0, 1.0) - pair_b
        # A pair below its query's k-th best search candidate cannot enter the top k (those k images score at least
        # that much): only the others join the merge, which keeps it small at GLDv2's gallery x 5 pairs.
        useful = pair_a >= a[0].reshape(n_query, k).min(axis=1)[pair_q]
        q_pos.append(pair_q[useful]), j.append(pair_j[useful]), a.append(pair_a[useful])
    return _best_per_query(np.concatenate(q_pos), np.concatenate(j), np.concatenate(a).astype(np.float32), n_query, k)


def _inner(queries, rows) -> np.ndarray:
    """float32 [Q, r]: inner products with a few rows, in float32 on the CPU; numpy arrays or tensors on any device
    (a service keeps its gallery on the GPU)."""
    return (torch.as_tensor(queries, dtype=torch.float32).cpu()
            @ torch.as_tensor(rows, dtype=torch.float32).cpu().T).numpy()


def _best_per_query(queries: np.ndarray, gallery: np.ndarray, scores: np.ndarray, n_query: int,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """From candidate (query, gallery image, score) triples, each query's k best distinct images: (float32, int64)
    [n_query, k], by descending score, ties to the lower gallery row; an image listed twice counts with its higher
    score. Every query must have at least k distinct candidates."""
    order = np.lexsort((gallery, -scores, queries))
    queries, gallery, scores = queries[order], gallery[order], scores[order]
    # Keep each (query, image) pair's first, best, entry: sort the pairs stably by image within each query.
    by_pair = np.lexsort((gallery, queries))
    repeated = np.zeros(len(order), bool)
    repeated[by_pair[1:]] = (queries[by_pair[1:]] == queries[by_pair[:-1]]) & (gallery[by_pair[1:]]
                                                                                == gallery[by_pair[:-1]])
    queries, gallery, scores = queries[~repeated], gallery[~repeated], scores[~repeated]
    starts = np.searchsorted(queries, np.arange(n_query))
    rank = np.arange(len(queries)) - starts[queries]
    top = rank < k
    out_scores = np.empty((n_query, k), np.float32)
    out_indices = np.empty((n_query, k), np.int64)
    out_scores[queries[top], rank[top]] = scores[top]
    out_indices[queries[top], rank[top]] = gallery[top]
    return out_scores, out_indices


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


def vote_neighbours(scores: np.ndarray, indices: np.ndarray, gallery_labels: np.ndarray) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """:func:`vote` over kNN results to the gallery (from :func:`adjusted_topk`): each neighbour votes for its
    landmark with its score."""
    scores, indices = _checked_knn(scores, indices, len(gallery_labels), "gallery")
    return vote(np.asarray(gallery_labels)[indices], scores)


def label_images(embeddings: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray, k: int = 3, *,
                 device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label images by their k nearest train (gallery) images, the method's retrieval step 2: (landmark ids int64 [Q],
    confidence float32 [Q]), the summed ``clamp(cos, 0, 1)`` of the winning label (the voting was never published;
    the sum of similarity is our choice)."""
    return vote_neighbours(*adjusted_topk(embeddings, gallery, k, device=device), gallery_labels)


def recognize(queries: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray,
              settings: RecognitionSettings, *, nonlandmark: np.ndarray | None = None,
              bias: NonLandmarkBias | None = None, penalty: np.ndarray | None = None,
              query_rows: np.ndarray | None = None, gallery_rows: np.ndarray | None = None,
              steps: Iterable[str] = RECOGNITION_STEPS, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Landmark ids int64 [Q] and confidences float32 [Q] of the queries (the method's recognition, steps 2-3).

    The exact top ``settings.top_k`` gallery images by ``clamp(cos, 0, 1) - b_j`` (:func:`adjusted_topk`) vote with
    those adjusted similarities, summed per landmark (:func:`vote`); the winner's sum, minus the mean of the query's
    top ``query_nonlandmark_k`` similarities to N (:func:`query_penalty`), is the confidence. A label is output for
    every query (the confidence may be negative).

    ``queries`` [Q, D], ``gallery`` [G, D]: unit rows (the ensemble embedding); ``gallery_labels`` int [G].
    ``nonlandmark`` [n, D]: the non-landmark set N, from which ``bias`` (b_j over ``gallery_nonlandmark_k``) and
    ``penalty`` are computed unless given precomputed (``bias`` from :func:`nonlandmark_bias`, or
    :meth:`NonLandmarkBias.of` for bare b_j; ``penalty`` float [Q] from :func:`query_penalty`).
    ``query_rows`` / ``gallery_rows`` int: the row of N each query / gallery image is itself (-1: none), left out of
    its own evidence. ``steps``: the subset of :data:`RECOGNITION_STEPS` to apply (none: the plain kNN vote).
    """
    steps = set(steps)
    if steps - set(RECOGNITION_STEPS):
        raise ValueError(f"unknown recognition steps {sorted(steps - set(RECOGNITION_STEPS))}")
    if steps and nonlandmark is None and (("bias" in steps and bias is None) or ("penalty" in steps
                                                                                  and penalty is None)):
        raise ValueError("non-landmark re-ranking needs the non-landmark set N (nonlandmark) or precomputed b_j and "
                         "penalty")
    if "bias" in steps and bias is None:
        bias = nonlandmark_bias(gallery, nonlandmark, settings.gallery_nonlandmark_k, gallery_rows=gallery_rows,
                                device=device)
    scores, indices = adjusted_topk(queries, gallery, settings.top_k, bias if "bias" in steps else None,
                                    query_rows=query_rows if "bias" in steps else None, device=device)
    landmarks, confidence = vote_neighbours(scores, indices, gallery_labels)
    if "penalty" not in steps:
        return landmarks, confidence
    if penalty is None:
        penalty = query_penalty(queries, nonlandmark, settings.query_nonlandmark_k, query_rows=query_rows,
                                device=device)
    if len(penalty) != len(landmarks):
        raise ValueError(f"{len(penalty)} query penalties for {len(landmarks)} queries")
    return landmarks, confidence - np.asarray(penalty, dtype=np.float32)


def _require_finite(scores: np.ndarray, what: str) -> None:
    if not np.isfinite(scores).all():
        raise ValueError(f"{what} hold NaN or infinity")


# ---------------------------------------------------------------- retrieval


def label_rerank(
    queries: np.ndarray,
    index: np.ndarray,
    pool: tuple[np.ndarray, np.ndarray],
    query_labels: np.ndarray,
    index_labels: np.ndarray,
    index_confidence: np.ndarray,
    keep: int,
    same_factor: float = 1.0,
    other_factor: float = 0.1,
    *,
    device: str | None = None,
    chunk_rows: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """One model's retrieval re-scored by labels (retrieval step 3), exact over the whole index: each query's best
    ``keep`` index images by ``s(q, j) = cos(q, j) + same_factor * c_j`` when ``query_labels[q] == index_labels[j]``,
    else ``cos(q, j) - other_factor * c_j`` (c_j = ``index_confidence[j]``), as (float32, int64) [Q, keep], best
    first; equal scores keep the kNN order.

    ``pool``: the queries' kNN to the index (scores, indices) [Q, P], P >= keep. The candidates are the pool plus
    every index image that carries the query's label, found by label whatever its cosine (its boost can lift it past
    the whole pool). An image outside the pool with another label scores at most the pool's last cosine plus the
    largest ``-other_factor * c_j``; a query whose ``keep``-th score is not above that bound is searched again with
    a pool twice as wide, until every query is certain or its pool is the whole index. ``chunk_rows`` queries are
    merged at a time, to bound memory.
    """
    scores, indices = _checked_knn(*pool, len(index_labels), "index")
    query_labels, index_labels = np.asarray(query_labels), np.asarray(index_labels)
    confidence = np.asarray(index_confidence, dtype=np.float32)
    if len(query_labels) != len(scores) or len(confidence) != len(index_labels):
        raise ValueError(f"{len(query_labels)} query labels for {len(scores)} queries, {len(confidence)} "
                         f"confidences for {len(index_labels)} index labels")
    size = len(index_labels)
    keep = min(keep, size)
    if scores.shape[1] < keep:
        raise ValueError(f"a pool of {scores.shape[1]} index images cannot give the best {keep}")
    labelled = LabelledIndex(index_labels, confidence, same_factor, other_factor)
    out_scores = np.empty((len(scores), keep), np.float32)
    out_indices = np.empty((len(scores), keep), np.int64)
    rows, searched = np.arange(len(scores)), queries
    while True:
        for start in range(0, len(rows), chunk_rows):
            part = slice(start, start + chunk_rows)
            out_scores[rows[part]], out_indices[rows[part]] = labelled.best(
                _take(searched, np.arange(len(rows))[part]), index, scores[part], indices[part], query_labels[rows[part]],
                keep)
        if scores.shape[1] >= size:
            return out_scores, out_indices
        unsure = out_scores[rows, -1] <= scores[:, -1] + labelled.other_label_ceiling
        if not unsure.any():
            return out_scores, out_indices
        rows = rows[unsure]
        searched = _take(queries, rows)
        scores, indices = knn(searched, index, min(2 * scores.shape[1], size), device=device)


@dataclass
class LabelledIndex:
    """The index's labels and confidences c_j, sorted by label once, for :func:`label_rerank`."""

    labels: np.ndarray  # int [I]
    confidence: np.ndarray  # float32 [I]
    same_factor: float
    other_factor: float

    @cached_property
    def by_label(self) -> np.ndarray:
        return np.argsort(self.labels, kind="stable")

    @cached_property
    def other_label_ceiling(self) -> np.float32:
        """The largest adjustment an index image of another label than the query's gets: max_j -other_factor * c_j."""
        extreme = self.confidence.min() if self.other_factor >= 0 else self.confidence.max()
        return np.float32(-self.other_factor * extreme)

    def same_label_pairs(self, query_labels: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query position, index row) of every index image labelled as its query and not in its pool ``indices``."""
        sorted_labels = self.labels[self.by_label]
        first = np.searchsorted(sorted_labels, query_labels, "left")
        count = np.searchsorted(sorted_labels, query_labels, "right") - first
        pair_q = np.repeat(np.arange(len(query_labels)), count)
        pair_j = self.by_label[np.repeat(first - np.cumsum(count) + count, count) + np.arange(count.sum())]
        size = len(self.labels)
        pool_keys = np.sort((np.arange(len(indices))[:, None] * size + indices).ravel())
        keys = pair_q * size + pair_j
        found = pool_keys[np.minimum(np.searchsorted(pool_keys, keys), len(pool_keys) - 1)]
        return pair_q[found != keys], pair_j[found != keys]

    def best(self, queries, index, scores: np.ndarray, indices: np.ndarray, query_labels: np.ndarray,
             keep: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``keep`` of the pool (``scores``, ``indices`` [q, P]) and the same-label images outside it."""
        same = query_labels[:, None] == self.labels[indices]
        pool_scores = scores + np.where(same, self.same_factor, -self.other_factor) * self.confidence[indices]
        pair_q, pair_j = self.same_label_pairs(query_labels, indices)
        pair_scores = _pair_inner(queries, index, pair_q, pair_j) + self.same_factor * self.confidence[pair_j]
        # The pairs as extra columns of their query's row, padded with -inf.
        count = np.bincount(pair_q, minlength=len(scores))
        column = np.arange(len(pair_q)) - np.repeat(np.cumsum(count) - count, count)
        extra_scores = np.full((len(scores), count.max(initial=0)), -np.inf, np.float32)
        extra_indices = np.full(extra_scores.shape, -1, np.int64)
        extra_scores[pair_q, column], extra_indices[pair_q, column] = pair_scores, pair_j
        all_scores = np.concatenate([pool_scores.astype(np.float32), extra_scores], axis=1)
        all_indices = np.concatenate([indices, extra_indices], axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :keep]
        return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_indices, order, axis=1)


def _take(rows, which: np.ndarray):
    """``rows[which]`` of a numpy array or of a tensor on any device."""
    return rows[torch.as_tensor(which, device=rows.device)] if isinstance(rows, torch.Tensor) else rows[which]


def _pair_inner(queries, rows, pair_q: np.ndarray, pair_j: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """float32 [P]: the inner product of query ``pair_q[p]`` with row ``pair_j[p]``, ``chunk`` pairs at a time; numpy
    arrays or tensors on any device."""
    queries = torch.as_tensor(queries, dtype=torch.float32)
    rows = torch.as_tensor(rows, dtype=torch.float32)
    out = np.empty(len(pair_q), np.float32)
    for start in range(0, len(pair_q), chunk):
        q = torch.as_tensor(pair_q[start:start + chunk], device=queries.device)
        j = torch.as_tensor(pair_j[start:start + chunk], device=rows.device)
        out[start:start + chunk] = (queries[q] * rows[j].to(queries.device)).sum(dim=1).cpu().numpy()
    return out


@dataclass
class RetrievalModel:
    """One model's unit rows for retrieval (the method's retrieval) and its weight in the score sum."""

    queries: np.ndarray  # [Q, D]
    index: np.ndarray  # [I, D]
    train: np.ndarray  # [G, D]: the labelled gallery that labels the queries and the index images
    weight: float = 1.0
    # label_images of the index when precomputed (an online service labels its index once, and labels from the
    # ensemble embedding come from outside): (labels, confidence)
    index_labels: tuple[np.ndarray, np.ndarray] | None = None
    query_labels: np.ndarray | None = None  # int [Q], precomputed as the index labels
    augmented: bool = False  # the index rows are database-augmented already (a service does it once)


def retrieve(models: Iterable[RetrievalModel], gallery_labels: np.ndarray, settings: RetrievalSettings, *,
             rerank: bool = True, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The method's retrieval, steps 1-4: (fused scores float32, index rows int64) [Q, out_k], best first (-1 padding).

    Per model: the query's ``rerank_pool`` nearest index images, plus every index image that carries the query's
    label, are soft re-ranked by the labels of the query and the index images (:func:`label_images`, top ``label_k``
    train neighbours; :func:`label_rerank`, exact over the whole index) and cut to ``per_model``; weighted, summed
    per index image over the models (:func:`fuse_models`). The pool only sets how many searches that takes.
    ``settings.dba`` and ``settings.qe``, when enabled, replace the index and query rows of the search (not those
    that label them: labels come from the train neighbours of the model's own rows). ``settings.boost`` ``mean``
    divides c_j by ``label_k``; ``settings.labels`` ``ensemble`` takes every model's query and index labels as given
    (:func:`query_and_index_labels`); a model's own labels are computed here unless given. ``rerank`` False: the
    plain score sum of each model's top ``per_model`` (the report's ablation). ``models`` is consumed one at a time,
    so a generator holds one model's rows in memory at once.
    """
    kept = []
    for model in models:
        index = model.index
        if settings.dba.enabled and not model.augmented:
            index = augment_database(index, settings.dba.k, settings.dba.alpha, device=device)
        queries = model.queries
        if settings.qe.enabled:
            queries = expand_queries(queries, index, settings.qe.k, settings.qe.alpha, device=device)
        pool = max(settings.rerank_pool, settings.per_model) if rerank else settings.per_model
        scores, indices = knn(queries, index, pool, device=device)
        if rerank:
            if settings.labels == "ensemble" and (model.query_labels is None or model.index_labels is None):
                raise ValueError("retrieval.labels 'ensemble' needs the labels of the ensemble embedding "
                                 "(query_and_index_labels) for every model")
            query_labels = model.query_labels if model.query_labels is not None else label_images(
                model.queries, model.train, gallery_labels, settings.label_k, device=device)[0]
            index_labels, index_confidence = model.index_labels or label_images(
                model.index, model.train, gallery_labels, settings.label_k, device=device)
            if settings.boost == "mean":
                index_confidence = np.asarray(index_confidence, np.float32) / np.float32(settings.label_k)
            scores, indices = label_rerank(queries, index, (scores, indices), query_labels, index_labels,
                                           index_confidence, settings.per_model, settings.same_factor,
                                           settings.other_factor, device=device)
        kept.append((scores[:, :settings.per_model] * np.float32(model.weight), indices[:, :settings.per_model]))
    return fuse_models(kept, settings.per_model, settings.out_k)


def _expand(rows, index, k: int, alpha: float, *, drop_first: bool, device: str | None,
            chunk_rows: int = 8192) -> np.ndarray:
    """float32 [N, D] unit rows: ``rows`` plus their ``k`` nearest index rows weighted by ``max(cos, 0) ** alpha``
    (``drop_first``: the rows are the index itself, whose nearest row is the row again); ``chunk_rows`` rows are
    summed at a time, so memory stays at chunk_rows x k x D whatever N is."""
    if k + drop_first > len(index):
        raise ValueError(f"k {k} is larger than the index ({len(index) - drop_first} other images)")
    scores, indices = knn(rows, index, k + drop_first, device=device)
    weights = np.clip(scores[:, drop_first:], 0.0, None) ** np.float32(alpha)
    indices = indices[:, drop_first:]
    rows = torch.as_tensor(rows, dtype=torch.float32).cpu()
    index = torch.as_tensor(index, dtype=torch.float32).cpu()
    expanded = np.empty(tuple(rows.shape), np.float32)
    for start in range(0, len(rows), chunk_rows):
        part = slice(start, start + chunk_rows)
        neighbours = index[torch.from_numpy(indices[part])]  # [n, k, D]
        expanded[part] = (rows[part] + (torch.from_numpy(weights[part])[:, :, None] * neighbours).sum(dim=1)).numpy()
    return l2_normalize(expanded)


def expand_queries(queries, index, k: int, alpha: float, *, device: str | None = None) -> np.ndarray:
    """Alpha query expansion: each query row plus its ``k`` nearest index images, weighted by ``max(cos, 0) **
    alpha``, L2-normalised (:class:`infer.config.Expansion`)."""
    return _expand(queries, index, k, alpha, drop_first=False, device=device)


def augment_database(index, k: int, alpha: float, *, device: str | None = None) -> np.ndarray:
    """Database-side augmentation: each index row plus its ``k`` nearest other index images, weighted as in
    :func:`expand_queries`, L2-normalised."""
    return _expand(index, index, k, alpha, drop_first=True, device=device)


def query_and_index_labels(queries: np.ndarray, index: np.ndarray, train: np.ndarray, gallery_labels: np.ndarray,
                           k: int, *, device: str | None = None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Queries and index images labelled once by their ``k`` train neighbours (:func:`label_images`): (query labels,
    (index labels, index confidence)), as :class:`RetrievalModel` takes them precomputed. For ``retrieval.labels:
    ensemble``, the rows are the retrieval models' ensemble embedding (:func:`combine_families` of their rows)."""
    query_labels, _ = label_images(queries, train, gallery_labels, k, device=device)
    return query_labels, label_images(index, train, gallery_labels, k, device=device)


def fuse_models(
    results: Sequence[tuple[np.ndarray, np.ndarray]],
    per_model: int = 750,
    out_k: int = 100,
    chunk_rows: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum the models' retrieval scores per index image (retrieval step 4): (float32, int64) [Q, min(out_k, W)].

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
