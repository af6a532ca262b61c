"""Kaggle submission files (docs/method.md §10.4): written, read back with pandas, and refused when the ids do not
fit."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from ray_landmark.data.storage import resolve
from ray_landmark.infer.submission import recognition_submission, retrieval_submission


def _read(data: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)


def test_recognition_csv_has_every_test_id_in_order_and_reads_back_exactly():
    confidence = float(np.float32(0.1234567))  # not a short decimal: must still read back to the same float
    data = recognition_submission(["a", "b", "c"], {"b": (12, confidence), "a": (3, -0.5)})
    table = _read(data)
    assert table.columns.tolist() == ["id", "landmarks"]
    assert table["id"].tolist() == ["a", "b", "c"]
    assert table["landmarks"].tolist()[0] == "3 -0.5" and table["landmarks"].tolist()[2] == ""
    landmark, score = table["landmarks"].tolist()[1].split()
    assert int(landmark) == 12 and float(score) == confidence


def test_retrieval_csv_written_to_a_location_reads_back_best_first(tmp_path):
    loc = resolve(str(tmp_path / "submissions" / "retrieval.csv"))
    images = [f"i{n:03d}" for n in range(100)]
    data = retrieval_submission(["q1", "q2"], [("q2", ["y", "x"]), ("q1", images)], loc)
    assert (tmp_path / "submissions" / "retrieval.csv").read_bytes() == data
    table = pd.read_csv(tmp_path / "submissions" / "retrieval.csv", dtype=str, keep_default_na=False)
    assert table.columns.tolist() == ["id", "images"]
    assert table["id"].tolist() == ["q1", "q2"]
    assert table["images"].str.split().tolist() == [images, ["y", "x"]]
    assert _read(retrieval_submission(["q1", "q2"], {}))["images"].tolist() == ["", ""]


def test_predictions_for_unknown_or_duplicate_ids_are_errors_naming_the_id():
    with pytest.raises(ValueError, match="'zz', which is not in the test list"):
        recognition_submission(["a"], {"a": (1, 0.5), "zz": (2, 0.5)})
    with pytest.raises(ValueError, match="'a' appears more than once in the test list"):
        retrieval_submission(["a", "b", "a"], {})
    with pytest.raises(ValueError, match="'b' appears more than once among the predictions"):
        retrieval_submission(["a", "b"], [("b", ["x"]), ("a", ["y"]), ("b", ["z"])])


def test_bad_prediction_values_are_errors_naming_the_id():
    with pytest.raises(ValueError, match="'a' has confidence nan"):
        recognition_submission(["a"], {"a": (1, float("nan"))})
    with pytest.raises(ValueError, match="'a' has 101 images; at most 100"):
        retrieval_submission(["a"], {"a": [str(n) for n in range(101)]})
