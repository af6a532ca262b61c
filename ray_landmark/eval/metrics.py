"""The official GLDv2 metrics (gldv2.md, after DELF's metrics.py): GAP for recognition, mAP@100 for retrieval.

Ground truth comes from the manifests' eval tables; rows whose usage is Ignored are dropped, and Public and Private
can be scored apart (``usages``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

SCORED_USAGES = ("Public", "Private")


def recognition_solution(table: pd.DataFrame, usages: Iterable[str] = SCORED_USAGES) -> dict[str, set[int]]:
    """id -> set of landmark ids (empty for non-landmark images), for the rows of the given usages."""
    rows = table[table["usage"].isin(list(usages))]
    return {str(i): {int(x) for x in str(lm).split()} for i, lm in zip(rows["id"], rows["landmarks"])}


def retrieval_solution(table: pd.DataFrame, usages: Iterable[str] = SCORED_USAGES) -> dict[str, set[str]]:
    """query id -> set of relevant index ids, for the rows of the given usages."""
    rows = table[table["usage"].isin(list(usages))]
    return {str(i): set(str(images).split()) for i, images in zip(rows["id"], rows["images"])}


def global_average_precision(predictions: Mapping[str, tuple[int, float]], solution: Mapping[str, set[int]]) -> float:
    """Micro-averaged precision over all predictions sorted by confidence.

    ``predictions``: image id -> (landmark id, confidence), at most one per image. Predictions on images outside
    ``solution`` are ignored; on non-landmark images they are false positives wherever they rank. A landmark image
    without a prediction still counts in M, the number of images with a non-empty ground truth.
    """
    m = sum(1 for landmarks in solution.values() if landmarks)
    if m == 0:
        raise ValueError("GAP needs at least one landmark image in the solution")
    scored = sorted(
        ((score, image_id, landmark) for image_id, (landmark, score) in predictions.items() if image_id in solution),
        key=lambda x: (-x[0], x[1], x[2]),
    )
    correct = 0
    gap = 0.0
    for total, (_, image_id, landmark) in enumerate(scored, start=1):
        if landmark in solution[image_id]:
            correct += 1
            gap += correct / total
    return gap / m


def mean_average_precision(
    predictions: Mapping[str, Sequence[str]], solution: Mapping[str, set[str]], k: int = 100
) -> float:
    """mAP@k: for each query of the solution, the precision at each rank (of the first k) holding a new relevant
    index image, summed and divided by min(#relevant, k); a query without predictions scores 0."""
    if not solution:
        raise ValueError("mAP needs at least one query in the solution")
    total = 0.0
    for query, relevant in solution.items():
        if not relevant:
            raise ValueError(f"query {query} has no relevant index image; drop it (Usage Ignored) before scoring")
        seen: set[str] = set()
        hits = 0
        ap = 0.0
        for rank, image_id in enumerate(list(predictions.get(query, ()))[:k], start=1):
            if image_id in seen:  # a duplicate keeps its rank position but scores nothing
                continue
            seen.add(image_id)
            if image_id in relevant:
                hits += 1
                ap += hits / rank
        total += ap / min(len(relevant), k)
    return total / len(solution)
