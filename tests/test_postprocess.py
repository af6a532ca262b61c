"""The ensemble's post-processing (solution.md §5) on small hand-made kNN results whose answers are worked out in the
comments. Scores are binary fractions (0.5, 0.375, ...) so that sums are exact and ties are real ties."""

from __future__ import annotations

import numpy as np
import pytest

from ray_landmark.infer.postprocess import (
    combine_families,
    fuse_models,
    invalid_rows,
    label_by_neighbours,
    nonlandmark_bias,
    ranked_ids,
    recognize,
    soft_rerank,
    vote,
)

# Recognition fixture: one query whose four nearest gallery images are 0 and 1 (landmark 10) then 2 and 3 (landmark
# 20); gallery images 0 and 1 are close to the non-landmark set (b = 0.5), 2 and 3 are not.
SCORES = np.array([[0.875, 0.75, 0.625, 0.5]], dtype=np.float32)
INDICES = np.array([[0, 1, 2, 3]])
GALLERY_LABELS = np.array([10, 10, 20, 20])
BIAS = np.array([0.5, 0.5, 0.0, 0.0], dtype=np.float32)


def test_plain_recognition_sums_the_top_3_similarities_per_label():
    # top 3: 0.875 (10) + 0.75 (10) = 1.625 for 10, 0.625 for 20
    landmarks, confidence = recognize(SCORES, INDICES, GALLERY_LABELS)
    assert landmarks.tolist() == [10] and landmarks.dtype == np.int64
    assert confidence.tolist() == [1.625]


def test_nonlandmark_reranking_resorts_before_taking_the_top_3_and_flips_the_prediction():
    # adjusted = clamp(cos) - b: 0.375, 0.25, 0.625, 0.5; re-sorted top 3: 0.625 (20), 0.5 (20), 0.375 (10)
    # -> 20 with 1.125. (Taking the raw top 3 first would leave 10 and 20 tied at 0.625, and 10 would win.)
    landmarks, confidence = recognize(SCORES, INDICES, GALLERY_LABELS, bias=BIAS)
    assert landmarks.tolist() == [20]
    assert confidence.tolist() == [1.125]


def test_confidence_is_reduced_by_the_mean_of_the_querys_top_10_similarities_to_n():
    # 12 neighbours in N: the top 10 are 0.5 (mean 0.5); the two 0.0 beyond them must not count (mean would be 5/12)
    to_n = np.array([[0.5] * 10 + [0.0, 0.0]], dtype=np.float32)
    landmarks, confidence = recognize(SCORES, INDICES, GALLERY_LABELS, bias=BIAS, query_nonlandmark_scores=to_n)
    assert landmarks.tolist() == [20]
    assert confidence.tolist() == [1.125 - 0.5]
    # nonlandmark_k = 2 reads only the first two columns: still 0.5; a query close to N loses more than one far away
    far = np.array([[0.25] * 12], dtype=np.float32)
    _, both = recognize(np.repeat(SCORES, 2, 0), np.repeat(INDICES, 2, 0), GALLERY_LABELS, bias=BIAS,
                        query_nonlandmark_scores=np.concatenate([to_n, far]), nonlandmark_k=2)
    assert both.tolist() == [1.125 - 0.5, 1.125 - 0.25]


def test_bias_is_the_mean_of_the_top_5_similarities_to_n_and_penalises_gallery_images_close_to_n():
    to_n = np.array([
        [1.0, 0.75, 0.5, 0.5, 0.25, 0.0, 0.0],  # close to N: (1 + 0.75 + 0.5 + 0.5 + 0.25) / 5 = 0.6
        [0.25, 0.0, 0.0, 0.0, 0.0, 0.0, -0.25],  # far from N: 0.25 / 5 = 0.05
    ], dtype=np.float32)
    assert nonlandmark_bias(to_n) == pytest.approx([0.6, 0.05])
    assert nonlandmark_bias(to_n, k=2) == pytest.approx([0.875, 0.125])
    # fewer neighbours in N than k: the mean over what there is
    assert nonlandmark_bias(to_n[:, :2], k=5) == pytest.approx([0.875, 0.125])


def test_empty_nonlandmark_set_is_an_error_naming_it():
    with pytest.raises(ValueError, match="non-landmark set N is empty"):
        nonlandmark_bias(np.zeros((3, 0), dtype=np.float32))
    with pytest.raises(ValueError, match="non-landmark set N is empty"):
        recognize(SCORES, INDICES, GALLERY_LABELS, bias=BIAS, query_nonlandmark_scores=np.zeros((1, 0)))


def test_negative_cosines_are_clamped_to_zero_not_counted_against_a_label():
    # labels 1, 2, 1 with cos 0.25, 0.125, -0.25: clamped, 1 has 0.25 > 0.125; unclamped 1 would have 0.0 and lose
    landmarks, confidence = label_by_neighbours(np.array([[0.25, 0.125, -0.25]]), np.array([[0, 1, 2]]),
                                                np.array([1, 2, 1]))
    assert landmarks.tolist() == [1] and confidence.tolist() == [0.25]


def test_vote_sums_per_label_and_breaks_ties_by_the_best_ranked_neighbour():
    labels = np.array([[1, 2, 2], [7, 3, 3], [3, 7, 7]])
    weights = np.array([[0.5, 0.375, 0.25], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25]], dtype=np.float32)
    landmarks, totals = vote(labels, weights)
    # row 0: 2 has 0.625 > 0.5; rows 1 and 2: a tie 0.5 / 0.5 goes to the label of the first column
    assert landmarks.tolist() == [2, 7, 3]
    assert totals.tolist() == [0.625, 0.5, 0.5]


def test_equal_adjusted_similarities_keep_the_knn_order():
    # all four neighbours at 0.5: top_k = 1 takes the first kNN column (gallery image 3, landmark 40)
    landmarks, _ = label_by_neighbours(np.full((1, 4), 0.5), np.array([[3, 2, 1, 0]]), np.array([10, 20, 30, 40]),
                                       top_k=1)
    assert landmarks.tolist() == [40]


def test_knn_indices_outside_the_gallery_are_an_error():
    with pytest.raises(ValueError, match="indices outside"):
        recognize(SCORES, np.array([[0, 1, 2, -1]]), GALLERY_LABELS)
    with pytest.raises(ValueError, match="indices outside"):
        recognize(SCORES, np.array([[0, 1, 2, 4]]), GALLERY_LABELS)
    with pytest.raises(ValueError, match="NaN"):
        recognize(np.array([[np.nan, 0.5, 0.5, 0.5]]), INDICES, GALLERY_LABELS)


def test_soft_rerank_moves_a_same_label_index_image_up():
    # query label 5; index images 0 (label 5, c 0.5), 1 (label 6, c 0.25), 2 (label 6, c 1.0); kNN order 1, 2, 0:
    # 1: 0.75 - 0.1 * 0.25 = 0.725; 2: 0.5 - 0.1 * 1.0 = 0.4; 0: 0.25 + 0.5 = 0.75 -> order 0, 1, 2
    scores, indices = np.array([[0.75, 0.5, 0.25]]), np.array([[1, 2, 0]])
    labels, confidence = np.array([5, 6, 6]), np.array([0.5, 0.25, 1.0])
    new_scores, new_indices = soft_rerank(scores, indices, np.array([5]), labels, confidence)
    assert new_indices.tolist() == [[0, 1, 2]]
    assert new_scores == pytest.approx(np.array([[0.75, 0.725, 0.4]]))
    # the factors are parameters: with both 0 nothing moves
    unchanged_scores, unchanged = soft_rerank(scores, indices, np.array([5]), labels, confidence,
                                              same_factor=0.0, other_factor=0.0)
    assert unchanged.tolist() == [[1, 2, 0]] and unchanged_scores.tolist() == [[0.75, 0.5, 0.25]]


def test_fusion_sums_scores_over_models_counting_a_missing_image_as_zero():
    model_a = (np.array([[0.5, 0.375, 0.25], [0.5, 0.25, 0.125]]), np.array([[10, 11, 12], [1, 2, 3]]))
    model_b = (np.array([[0.5, 0.25], [0.5, 0.25]]), np.array([[12, 13], [3, 2]]))
    # row 0: 10 0.5, 11 0.375, 12 0.25 + 0.5 = 0.75, 13 0.25 -> 12, 10, 11
    # row 1: 1 0.5, 2 0.25 + 0.25 = 0.5, 3 0.125 + 0.5 = 0.625 -> 3, then 1 and 2 tied at 0.5 (ascending index)
    scores, indices = fuse_models([model_a, model_b], out_k=3, chunk_rows=1)
    assert indices.tolist() == [[12, 10, 11], [3, 1, 2]] and indices.dtype == np.int64
    assert scores.tolist() == [[0.75, 0.5, 0.375], [0.625, 0.5, 0.5]]


def test_fusion_keeps_per_model_columns_and_pads_rows_short_of_distinct_images():
    model_a = (np.array([[0.5, 0.375, 0.25]]), np.array([[10, 11, 12]]))
    model_b = (np.array([[0.5, 0.25]]), np.array([[12, 13]]))
    # per_model 2: a keeps 10, 11; b keeps 12, 13: 10 and 12 tie at 0.5 (ascending index), then 11, 13
    scores, indices = fuse_models([model_a, model_b], per_model=2, out_k=3)
    assert indices.tolist() == [[10, 12, 11]] and scores.tolist() == [[0.5, 0.5, 0.375]]
    # all 5 kept columns hold 4 distinct images: the fifth place is padding
    scores, indices = fuse_models([model_a, model_b], out_k=10)
    assert indices.tolist() == [[12, 10, 11, 13, -1]]
    assert scores[0, :4].tolist() == [0.75, 0.5, 0.375, 0.25] and scores[0, 4] == -np.inf
    assert ranked_ids(indices, [f"img{i}" for i in range(14)]) == [["img12", "img10", "img11", "img13"]]
    with pytest.raises(ValueError, match="number of queries"):
        fuse_models([model_a, (np.zeros((2, 2)), np.zeros((2, 2), dtype=np.int64))])


def test_families_are_averaged_normalised_and_concatenated_in_name_order():
    # dolg: [1, 0] and [0, 2] -> unit [0, 1] -> average [0.5, 0.5] -> [1/sqrt2, 1/sqrt2]; effnet: [3] -> [1];
    # concatenated (dolg before effnet) and divided by sqrt(2): [0.5, 0.5, 1/sqrt2]
    dolg_1 = np.array([[1.0, 0.0], [0.0, 1.0]])
    dolg_2 = np.array([[0.0, 2.0], [0.0, 1.0]])
    effnet = np.array([[3.0], [-1.0]])
    combined = combine_families([("effnet", effnet), ("dolg", dolg_1), ("dolg", dolg_2)])
    assert combined.dtype == np.float32
    assert combined == pytest.approx(np.array([[0.5, 0.5, 2**-0.5], [0.0, 2**-0.5, -(2**-0.5)]]))
    # each family weighs the same: the combined cosine is the mean of the family cosines (dolg 1/sqrt2, effnet -1)
    assert combined[0] @ combined[1] == pytest.approx((2**-0.5 - 1) / 2)
    assert combine_families([("dolg", dolg_1), ("dolg", dolg_2), ("effnet", effnet)]) == pytest.approx(combined)


def test_bad_rows_are_found_and_refused_rather_than_combined():
    embeddings = np.array([[0.0, 0.0], [1.0, 0.0], [np.nan, 1.0], [np.inf, 0.0]])
    assert invalid_rows(embeddings).tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match=r"'dolg' model has 3 of 4 rows .* row 0"):
        combine_families([("dolg", embeddings)])
    # models that exactly cancel out leave a family average without direction
    with pytest.raises(ValueError, match="'dolg' average"):
        combine_families([("dolg", np.array([[1.0, 0.0]])), ("dolg", np.array([[-1.0, 0.0]]))])
    with pytest.raises(ValueError, match="different dimensions"):
        combine_families([("dolg", np.ones((1, 2))), ("dolg", np.ones((1, 3)))])
    with pytest.raises(ValueError, match="expected"):
        combine_families([("dolg", np.ones((1, 2))), ("effnet", np.ones((2, 2)))])
