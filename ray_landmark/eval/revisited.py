"""The evaluation protocol of Revisited Oxford and Paris (Radenović et al., "Revisiting Oxford and Paris: Large-Scale
Image Retrieval Benchmarking", CVPR 2018), as its official code computes it (filipradenovic/revisitop,
python/evaluate.py and example_evaluate.py).

Each query's ground truth names database images (positions in ``imlist``) as ``easy``, ``hard`` or ``junk``. The
three protocols pick the positives and the images to ignore from those lists:

    Easy    positives: easy          ignored: junk + hard
    Medium  positives: easy + hard   ignored: junk
    Hard    positives: hard          ignored: junk + easy

Ignored ("junk") images are taken out of the ranking: every positive moves up by the number of junk images ranked
before it. AP is then not the classic mean of precisions at the positives but the area under the precision-recall
curve by trapezoids: each positive adds one recall step of ``1 / positives`` times the mean of the precision just
before it (rank r, j positives above: j / r, or 1 at rank 0) and at it ((j + 1) / (r + 1)). A positive that is not in
the ranking adds nothing. A query with no positive under a protocol is left out of that protocol's mean.

mP@k follows the official code too: with the positives' 1-based ranks p, ``k' = min(max(p), k)`` and
``P@k = |{p <= k'}| / k'``, so a query whose positives are all found above rank k is not penalised for having fewer
than k of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

PROTOCOLS = ("easy", "medium", "hard")
KAPPAS = (1, 5, 10)

# protocol -> (lists whose images are positives, lists whose images are ignored)
_PROTOCOL_LISTS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def protocol_sets(query_gnd: Mapping[str, Sequence[int]], protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored) database positions of one query's ground truth under ``protocol``."""
    if protocol not in _PROTOCOL_LISTS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    positive_lists, ignored_lists = _PROTOCOL_LISTS[protocol]

    def gather(names):
        return np.concatenate([np.asarray(query_gnd[n], dtype=np.int64).reshape(-1) for n in names])

    return gather(positive_lists), gather(ignored_lists)


def positive_ranks(ranking: np.ndarray, positives: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives found in ``ranking`` (database positions, best first) once the ignored images
    are taken out, ascending."""
    ranking = np.asarray(ranking)
    at_positive = np.isin(ranking, positives)
    at_ignored = np.isin(ranking, ignored)
    ignored_before = np.cumsum(at_ignored) - at_ignored  # ignored images strictly before each place
    places = np.flatnonzero(at_positive)
    return places - ignored_before[places]


def average_precision(ranks: np.ndarray, n_positives: int) -> float:
    """The trapezoid AP of the official code from the positives' 0-based ranks (ascending, junk taken out)."""
    if n_positives <= 0:
        raise ValueError("average precision needs at least one positive")
    ranks = np.asarray(ranks, dtype=np.float64)
    found = np.arange(len(ranks), dtype=np.float64)  # positives ranked above each one
    before = np.divide(found, ranks, out=np.ones_like(ranks), where=ranks > 0)  # rank 0: precision 1
    at = (found + 1) / (ranks + 1)
    return float(np.sum((before + at) / 2) / n_positives)


def precision_at(ranks: np.ndarray, kappas: Sequence[int] = KAPPAS) -> np.ndarray:
    """mP@k's per-query term for each k (see the module docstring); 0 when no positive was ranked."""
    one_based = np.asarray(ranks) + 1
    if not len(one_based):
        return np.zeros(len(kappas))
    last = one_based.max()
    return np.array([np.sum(one_based <= min(last, k)) / min(last, k) for k in kappas], dtype=np.float64)


def evaluate_protocol(rankings: np.ndarray, gnd: Sequence[Mapping[str, Sequence[int]]], protocol: str,
                      kappas: Sequence[int] = KAPPAS) -> dict:
    """mAP and mP@k (in percent, as papers print them) of ``rankings`` [queries, depth] (database positions, best
    first; positions outside the ground truth's lists, such as distractors, are negatives) under one protocol, with
    each query's AP (None for a query without positives)."""
    if len(rankings) != len(gnd):
        raise ValueError(f"{len(rankings)} rankings for {len(gnd)} queries")
    aps: list[float | None] = []
    precisions = []
    for ranking, query_gnd in zip(rankings, gnd):
        positives, ignored = protocol_sets(query_gnd, protocol)
        if not len(positives):
            aps.append(None)  # the official code leaves such a query out of the mean
            continue
        ranks = positive_ranks(ranking, positives, ignored)
        aps.append(average_precision(ranks, len(positives)))
        precisions.append(precision_at(ranks, kappas))
    scored = [ap for ap in aps if ap is not None]
    mean_precision = np.mean(precisions, axis=0) if precisions else np.full(len(kappas), np.nan)
    return {
        "mAP": 100 * float(np.mean(scored)) if scored else float("nan"),
        **{f"mP@{k}": 100 * float(p) for k, p in zip(kappas, mean_precision)},
        "queries": len(scored),
        "skipped_without_positives": len(aps) - len(scored),
        "ap": aps,
    }


def evaluate(rankings: np.ndarray, gnd: Sequence[Mapping[str, Sequence[int]]],
             kappas: Sequence[int] = KAPPAS) -> dict[str, dict]:
    """``evaluate_protocol`` for Easy, Medium and Hard."""
    return {protocol: evaluate_protocol(rankings, gnd, protocol, kappas) for protocol in PROTOCOLS}
