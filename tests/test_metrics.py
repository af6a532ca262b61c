"""GAP and mAP@100 against hand-computed values of the official definitions (gldv2.md)."""

import pandas as pd
import pytest

from ray_landmark.eval.metrics import (
    global_average_precision,
    mean_average_precision,
    recognition_solution,
    retrieval_solution,
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
    recognition = pd.DataFrame({"id": ["a", "b", "c"], "landmarks": ["1", "", "2 3"], "usage": ["Public", "Private", "Ignored"]})
    assert recognition_solution(recognition) == {"a": {1}, "b": set()}
    assert recognition_solution(recognition, usages=["Ignored"]) == {"c": {2, 3}}
    retrieval = pd.DataFrame({"id": ["a", "b"], "images": ["x y", ""], "usage": ["Public", "Ignored"]})
    assert retrieval_solution(retrieval) == {"a": {"x", "y"}}
