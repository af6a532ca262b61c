"""The official GLDv2 metrics (docs/method.md §10.3, after DELF's metrics.py): GAP for recognition, mAP@100 for
retrieval; and two extra ones for reports: top-1 accuracy and mean precision at k.

Ground truth comes from the manifests' eval tables; rows whose usage is Ignored are dropped, and Public and Private
can be scored apart (``usages``); :func:`recognition_metrics` and :func:`retrieval_metrics` score every usage at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

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


def top1_accuracy(predictions: Mapping[str, tuple[int, float]], solution: Mapping[str, set[int]]) -> float:
    """The share of the solution's landmark images whose predicted landmark is in their ground truth.

    ``predictions`` as for GAP; an image without a prediction counts as wrong. Non-landmark images (empty ground
    truth) are left out: no landmark is right for them, and ranking them low is what GAP measures.
    """
    landmark_images = [image_id for image_id, landmarks in solution.items() if landmarks]
    if not landmark_images:
        raise ValueError("top-1 accuracy needs at least one landmark image in the solution")
    correct = sum(
        1 for image_id in landmark_images if image_id in predictions and predictions[image_id][0] in solution[image_id]
    )
    return correct / len(landmark_images)


def mean_precision_at_k(
    predictions: Mapping[str, Sequence[str]], solution: Mapping[str, set[str]], k: int = 10
) -> float:
    """mP@k: for each query of the solution, the number of distinct relevant index images among its first k
    predictions divided by k, averaged over the queries; a query without predictions scores 0. The divisor is k even
    for a query with fewer than k relevant images (the plain definition), so such a query cannot reach 1."""
    if not solution:
        raise ValueError("mP@k needs at least one query in the solution")
    hits = sum(len(relevant.intersection(list(predictions.get(query, ()))[:k])) for query, relevant in solution.items())
    return hits / (k * len(solution))


def _by_usage(
    table: pd.DataFrame,
    to_solution: Callable[[pd.DataFrame, Iterable[str]], dict],
    scorable: Callable[[dict], bool],
    metrics: Mapping[str, Callable[[dict], float]],
) -> dict[str, float]:
    """``metrics`` on Public and Private together (plain names) and on each apart (``<name>_public``, ...), leaving out
    a group with nothing ``scorable`` in it."""
    groups = {"": SCORED_USAGES, **{f"_{usage.lower()}": (usage,) for usage in SCORED_USAGES}}
    scores = {}
    for suffix, usages in groups.items():
        solution = to_solution(table, usages)
        if scorable(solution):
            scores.update({f"{name}{suffix}": metric(solution) for name, metric in metrics.items()})
    return scores


def recognition_metrics(predictions: Mapping[str, tuple[int, float]], table: pd.DataFrame) -> dict[str, float]:
    """{"gap", "top1"} and their "_public"/"_private" variants, for the usages with at least one landmark image."""
    return _by_usage(
        table,
        recognition_solution,
        lambda solution: any(solution.values()),
        {
            "gap": lambda solution: global_average_precision(predictions, solution),
            "top1": lambda solution: top1_accuracy(predictions, solution),
        },
    )


def retrieval_metrics(
    predictions: Mapping[str, Sequence[str]], table: pd.DataFrame, precision_ks: Sequence[int] = (5, 10)
) -> dict[str, float]:
    """{"map100", "mp<k>" for each k of ``precision_ks``} and their "_public"/"_private" variants, for the usages with
    at least one query."""
    metrics: dict[str, Callable[[dict], float]] = {
        "map100": lambda solution: mean_average_precision(predictions, solution)
    }
    for k in precision_ks:
        metrics[f"mp{k}"] = lambda solution, k=k: mean_precision_at_k(predictions, solution, k)
    return _by_usage(table, retrieval_solution, bool, metrics)
