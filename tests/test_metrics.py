"""GAP and mAP@100 against hand-computed values of the official definitions (docs/method.md §10.3); top-1 accuracy,
mP@k and the per-usage scoring against hand-computed values of our definitions."""

import pandas as pd
import pytest

from ray_landmark.eval.metrics import (
    global_average_precision,
    mean_average_precision,
    mean_precision_at_k,
    recognition_metrics,
    recognition_solution,
    retrieval_metrics,
    retrieval_solution,
    top1_accuracy,
)


def test_gap_counts_non_landmark_predictions_as_false_positives_and_missing_ones_in_m():
    solution = {"a": {1}, "b": {2}, "c": set(), "d": {3}}
    predictions = {"a": (1, 0.9), "c": (5, 0.8), "b": (2, 0.7), "x": (9, 1.0)}  # x is not scored (Ignored)
    # a: correct 1/1; c: wrong; b: correct 2/3; d has no prediction but counts in M = 3
    assert global_average_precision(predictions, solution) == pytest.approx((1 + 2 / 3) / 3)


def test_gap_breaks_score_ties_by_image_id():
    solution = {"a": {1}, "b": {2}}
    predictions = {"b": (2, 0.5), "a": (7, 0.5)}  # a ranks first on the tie and is wrong
    assert global_average_precision(predictions, solution) == pytest.approx((1 / 2) / 2)


def test_map_skips_duplicates_keeps_their_rank_and_scores_missing_queries_zero():
    solution = {"q": {"x", "y"}, "r": {"z"}}
    predictions = {"q": ["x", "z", "x", "y"]}
    assert mean_average_precision(predictions, solution) == pytest.approx((1 / 1 + 2 / 4) / 2 / 2)


def test_map_divides_by_at_most_k_relevant_and_reads_only_the_first_k():
    relevant = {f"i{n}" for n in range(150)}
    ranked = [f"i{n}" for n in range(150)]
    assert mean_average_precision({"q": ranked}, {"q": relevant}) == pytest.approx(1.0)
    assert mean_average_precision({"q": ["junk"] * 100 + ranked}, {"q": relevant}) == 0.0


def test_solutions_drop_ignored_rows_and_keep_non_landmarks():
    recognition = pd.DataFrame(
        {"id": ["a", "b", "c"], "landmarks": ["1", "", "2 3"], "usage": ["Public", "Private", "Ignored"]}
    )
    assert recognition_solution(recognition) == {"a": {1}, "b": set()}
    assert recognition_solution(recognition, usages=["Ignored"]) == {"c": {2, 3}}
    retrieval = pd.DataFrame({"id": ["a", "b"], "images": ["x y", ""], "usage": ["Public", "Ignored"]})
    assert retrieval_solution(retrieval) == {"a": {"x", "y"}}


def test_top1_counts_landmark_images_only_and_missing_predictions_as_wrong():
    solution = {"a": {1}, "b": {2, 3}, "c": set(), "d": {4}}
    predictions = {"a": (1, 0.1), "b": (3, 0.9), "c": (5, 0.9)}  # c is a non-landmark image: not counted
    assert top1_accuracy(predictions, solution) == pytest.approx(2 / 3)  # a and b right, d without a prediction
    with pytest.raises(ValueError, match="landmark image"):
        top1_accuracy(predictions, {"c": set()})


def test_mean_precision_at_k_counts_distinct_hits_in_the_first_k_over_k():
    solution = {"q": {"x", "y"}, "r": {"z"}}
    predictions = {"q": ["x", "n", "x", "y", "m", "z"]}  # the repeated x counts once; r has no predictions
    assert mean_precision_at_k(predictions, solution, k=5) == pytest.approx((2 / 5 + 0) / 2)
    assert mean_precision_at_k(predictions, solution, k=2) == pytest.approx((1 / 2 + 0) / 2)
    assert mean_precision_at_k({"q": ["x"], "r": ["z"]}, solution, k=1) == 1.0
    with pytest.raises(ValueError, match="at least one query"):
        mean_precision_at_k(predictions, {})


def test_recognition_metrics_per_usage_drop_ignored_rows():
    table = pd.DataFrame({
        "id": ["a", "b", "c", "d"],
        "landmarks": ["1", "", "2", "3"],
        "usage": ["Public", "Public", "Private", "Ignored"],
    })
    # d would rank first and be right: it must not count
    predictions = {"a": (1, 0.9), "b": (7, 0.8), "c": (9, 0.7), "d": (3, 1.0)}
    # Public: a right (1/1), b wrong; M = 1 -> GAP 1. Private: c wrong -> 0.
    # Together: a right (1/1), b and c wrong; M = 2 -> GAP 1/2; top-1 over a and c: 1/2
    assert recognition_metrics(predictions, table) == pytest.approx(
        {"gap": 0.5, "gap_public": 1.0, "gap_private": 0.0, "top1": 0.5, "top1_public": 1.0, "top1_private": 0.0}
    )


def test_recognition_metrics_leave_out_a_usage_without_landmark_images():
    table = pd.DataFrame({"id": ["a", "b"], "landmarks": ["1", ""], "usage": ["Public", "Private"]})
    assert recognition_metrics({"a": (1, 0.5)}, table) == {"gap": 1.0, "gap_public": 1.0, "top1": 1.0,
                                                           "top1_public": 1.0}
    assert recognition_metrics({}, table.assign(usage="Ignored")) == {}


def test_retrieval_metrics_per_usage_drop_ignored_rows_and_leave_out_empty_usages():
    table = pd.DataFrame({
        "id": ["q1", "q2", "q3"],
        "images": ["x", "z", ""],  # q3 has no relevant image: scoring it would raise, so it must be dropped
        "usage": ["Public", "Private", "Ignored"],
    })
    predictions = {"q1": ["x"], "q2": ["n", "z"], "q3": ["x"]}
    # q1: AP 1, P@1 1, P@5 1/5; q2: AP 1/2, P@1 0, P@5 1/5
    assert retrieval_metrics(predictions, table, precision_ks=(1, 5)) == pytest.approx({
        "map100": 0.75, "mp1": 0.5, "mp5": 0.2,
        "map100_public": 1.0, "mp1_public": 1.0, "mp5_public": 0.2,
        "map100_private": 0.5, "mp1_private": 0.0, "mp5_private": 0.2,
    })
    public_only = table[table["usage"] != "Private"]
    assert set(retrieval_metrics(predictions, public_only)) == {"map100", "mp5", "mp10", "map100_public",
                                                                "mp5_public", "mp10_public"}
