"""Kaggle submission files (docs/method.md §10.4), as CSV bytes and optionally written to a location.

* recognition: ``id,landmarks`` with ``"<landmark_id> <confidence>"``, empty for an image without a prediction;
* retrieval: ``id,images`` with up to 100 space-separated index ids, best first (empty when none).

Every test id gets one row, in the order given. Predictions come as a mapping or as (id, prediction) pairs; a
prediction for an id outside the test list, a duplicate id (in the test list or among the pairs) or a NaN
confidence is an error that names the id. ``loc`` is a folder file or an S3 object (``ray_landmark.data.storage``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import pandas as pd

from ray_landmark.data.storage import Location, write_bytes

P = TypeVar("P")
MAX_RETRIEVED = 100


def recognition_submission(
    test_ids: Sequence[str],
    predictions: Mapping[str, tuple[int, float]] | Iterable[tuple[str, tuple[int, float]]],
    loc: Location | None = None,
) -> bytes:
    """The recognition CSV: one (landmark id, confidence) per predicted image; written to ``loc`` when given."""

    def cell(image_id: str, prediction: tuple[int, float]) -> str:
        landmark, confidence = prediction
        if not math.isfinite(confidence):
            raise ValueError(f"recognition prediction for {image_id!r} has confidence {confidence}")
        return f"{int(landmark)} {float(confidence)!r}"  # repr: the shortest text that reads back to the same float

    return _submission(test_ids, predictions, "landmarks", cell, loc)


def retrieval_submission(
    test_ids: Sequence[str],
    predictions: Mapping[str, Sequence[str]] | Iterable[tuple[str, Sequence[str]]],
    loc: Location | None = None,
) -> bytes:
    """The retrieval CSV: up to 100 index ids per query, best first; written to ``loc`` when given."""

    def cell(query_id: str, images: Sequence[str]) -> str:
        if len(images) > MAX_RETRIEVED:
            raise ValueError(f"retrieval prediction for {query_id!r} has {len(images)} images; at most {MAX_RETRIEVED}")
        return " ".join(images)

    return _submission(test_ids, predictions, "images", cell, loc)


def _submission(test_ids, predictions, column: str, cell, loc: Location | None) -> bytes:
    """The CSV ``id,<column>`` with ``cell(id, prediction)`` for each predicted test id and '' for the others."""
    by_id = _by_id(test_ids, predictions)
    cells = [cell(i, by_id[i]) if i in by_id else "" for i in test_ids]
    data = pd.DataFrame({"id": list(test_ids), column: cells}).to_csv(index=False).encode()
    if loc is not None:
        write_bytes(loc, data)
    return data


def _by_id(test_ids: Sequence[str], predictions: Mapping[str, P] | Iterable[tuple[str, P]]) -> dict[str, P]:
    """The predictions by id, after checking that ids are unique and all in the test list."""
    _require_unique(test_ids, "in the test list")
    pairs = list(predictions.items() if isinstance(predictions, Mapping) else predictions)
    _require_unique([i for i, _ in pairs], "among the predictions")
    known = set(test_ids)
    unknown = next((i for i, _ in pairs if i not in known), None)
    if unknown is not None:
        raise ValueError(f"prediction for id {unknown!r}, which is not in the test list")
    return dict(pairs)


def _require_unique(ids: Sequence[str], where: str) -> None:
    ids = pd.Series(list(ids), dtype=object)
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise ValueError(f"id {duplicated.iloc[0]!r} appears more than once {where}")
