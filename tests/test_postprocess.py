"""The ensemble's post-processing (arXiv 2110.03786; the non-landmark re-ranking of the 2020 1st-place code) on small
hand-made embeddings whose answers are worked out in the comments, and against brute force on random ones. Cosines are
binary fractions (0.5, 0.375, ...) so that sums are exact and ties are real ties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ray_landmark.infer.config import Expansion, RecognitionSettings, RetrievalSettings
from ray_landmark.infer.postprocess import (
    NonLandmarkBias,
    RetrievalModel,
    adjusted_topk,
    augment_database,
    combine_families,
    expand_queries,
    fuse_models,
    invalid_rows,
    label_images,
    nonlandmark_bias,
    query_penalty,
    ranked_ids,
    recognize,
    retrieve,
    label_rerank,
    vote,
)


def _star(cosines) -> tuple[np.ndarray, np.ndarray]:
    """A query e_0 and gallery images c_j e_0 + sqrt(1 - c_j^2) e_(j+1): cos(query, j) is exactly c_j."""
    c = np.asarray(cosines, dtype=np.float64)
    gallery = np.zeros((len(c), len(c) + 1))
    gallery[:, 0] = c
    gallery[np.arange(len(c)), np.arange(len(c)) + 1] = np.sqrt(1 - c**2)
    query = np.zeros((1, len(c) + 1))
    query[0, 0] = 1
    return query.astype(np.float32), gallery.astype(np.float32)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# Recognition fixture: one query whose four nearest gallery images are 0 and 1 (landmark 10) then 2 and 3 (landmark
# 20); gallery images 0 and 1 are close to the non-landmark set (b = 0.5), 2 and 3 are not.
QUERY, GALLERY = _star([0.875, 0.75, 0.625, 0.5])
GALLERY_LABELS = np.array([10, 10, 20, 20])
BIAS = NonLandmarkBias.of([0.5, 0.5, 0.0, 0.0])
TOP3 = RecognitionSettings()


def test_plain_recognition_sums_the_top_3_similarities_per_label():
    # top 3: 0.875 (10) + 0.75 (10) = 1.625 for 10, 0.625 for 20
    landmarks, confidence = recognize(QUERY, GALLERY, GALLERY_LABELS, TOP3, steps=())
    assert landmarks.tolist() == [10] and landmarks.dtype == np.int64
    assert confidence.tolist() == [1.625]


def test_the_bias_is_applied_before_the_top_3_are_taken_and_flips_the_prediction():
    # adjusted = clamp(cos) - b: 0.375, 0.25, 0.625, 0.5; top 3: 0.625 (20), 0.5 (20), 0.375 (10) -> 20 with 1.125.
    # (Taking the raw top 3 first would leave 10 and 20 tied at 0.625, and 10 would win.)
    landmarks, confidence = recognize(QUERY, GALLERY, GALLERY_LABELS, TOP3, bias=BIAS, steps=("bias",))
    assert landmarks.tolist() == [20] and confidence.tolist() == [1.125]


def test_each_step_applies_alone_or_together():
    penalty = np.array([0.5], dtype=np.float32)
    both = recognize(QUERY, GALLERY, GALLERY_LABELS, TOP3, bias=BIAS, penalty=penalty)
    penalty_alone = recognize(QUERY, GALLERY, GALLERY_LABELS, TOP3, bias=BIAS, penalty=penalty, steps=("penalty",))
    assert (both[0].tolist(), both[1].tolist()) == ([20], [1.125 - 0.5])
    assert (penalty_alone[0].tolist(), penalty_alone[1].tolist()) == ([10], [1.625 - 0.5])
    with pytest.raises(ValueError, match="needs the non-landmark set N"):
        recognize(QUERY, GALLERY, GALLERY_LABELS, TOP3, bias=BIAS)  # the penalty has nothing to come from
    with pytest.raises(ValueError, match="unknown recognition steps"):
        recognize(QUERY, GALLERY, GALLERY_LABELS, TOP3, steps=("bias", "qe"))


def test_bias_and_penalty_are_the_means_of_the_top_k_similarities_to_n():
    # gallery image 0 = e_0; N: images at cos 1, 0.75, 0.5, 0.5, 0.25, 0, 0 to it -> top 5 mean 0.6, top 2 0.875
    _, n = _star([1.0, 0.75, 0.5, 0.5, 0.25, 0.0, 0.0])
    image = np.eye(1, n.shape[1], dtype=np.float32)
    assert nonlandmark_bias(image, n).bias == pytest.approx([0.6])
    assert nonlandmark_bias(image, n, k=2).bias == pytest.approx([0.875])
    assert query_penalty(image, n, k=5) == pytest.approx([0.6])
    # recognize computes what is not given: N = gallery images 1..3 (cos 0.75, 0.625, 0.5): penalty top 2 = 0.6875
    assert recognize(QUERY, GALLERY, GALLERY_LABELS, RecognitionSettings(query_nonlandmark_k=2), bias=BIAS,
                     nonlandmark=GALLERY[1:])[1] == pytest.approx([1.125 - 0.6875])


def test_a_query_in_n_is_never_its_own_evidence():
    # The query is N's row 0. Its penalty without itself: cos 0.5, 0.25 to rows 1, 2 -> top 2 mean 0.375, not
    # (1 + 0.5) / 2. Gallery image 0 (cos 0.875 to the query) has the query among its top 2 in N, which raises its b_j.
    query, others = _star([0.5, 0.25, 0.0])
    n = np.concatenate([query, others])
    assert query_penalty(query, n, k=2) == pytest.approx([0.75])
    assert query_penalty(query, n, k=2, query_rows=np.array([0])) == pytest.approx([0.375])
    query, n = (np.pad(x, ((0, 0), (0, 1))) for x in (query, n))
    gallery = np.array([[0.875, 0, 0, 0, np.sqrt(1 - 0.875**2)]], np.float32)  # cos 0.875 * c to N's rows
    bias = nonlandmark_bias(gallery, n, k=2)
    # b_0 = mean(0.875, cos to row 1 = 0.875 * 0.5 = 0.4375) with the query; without it: row 1 and 2 (0.21875)
    assert bias.bias == pytest.approx([(0.875 + 0.4375) / 2])
    scores, indices = adjusted_topk(query, gallery, 1, bias, query_rows=np.array([0]))
    assert indices.tolist() == [[0]] and scores == pytest.approx(np.array([[0.875 - (0.4375 + 0.21875) / 2]]))
    scores, _ = adjusted_topk(query, gallery, 1, bias)  # a query not in N meets the full b_j
    assert scores == pytest.approx(np.array([[0.875 - (0.875 + 0.4375) / 2]]))


def test_a_gallery_image_in_n_is_left_out_of_its_own_bias():
    # gallery image 0 is N's row 0: without itself its top 2 in N are 0.5 and 0.25 (mean 0.375), not 1 and 0.5
    image, others = _star([0.5, 0.25, 0.0, 0.0])
    n = np.concatenate([image, others])
    assert nonlandmark_bias(image, n, k=2, gallery_rows=np.array([0])).bias == pytest.approx([0.375])


def test_an_n_no_larger_than_k_is_refused():
    _, n = _star([0.5] * 5)
    image = np.eye(1, 6, dtype=np.float32)
    with pytest.raises(ValueError, match="N has 5 images; b_j needs more than k = 5"):
        nonlandmark_bias(image, n, k=5)
    with pytest.raises(ValueError, match="N has 5 images; the query penalty needs more than k = 10"):
        query_penalty(image, n, k=10)
    with pytest.raises(ValueError, match="with gallery images that are in N needs more than k \\+ 1 = 5"):
        nonlandmark_bias(image, n, k=4, gallery_rows=np.array([0]))


def _brute_force(queries, gallery, n, k_bias, top_k, query_rows):
    """clamp(cos, 0, 1) - b_j over the whole gallery, b_j without the query's own row of N, and its top k."""
    to_n = gallery @ n.T
    scores, indices = [], []
    for q, row in enumerate(query_rows):
        keep = np.arange(len(n)) != row
        bias = -np.sort(-to_n[:, keep], axis=1)[:, :k_bias].mean(axis=1)
        adjusted = np.clip(gallery @ queries[q], 0, 1) - bias
        order = np.argsort(-adjusted, kind="stable")[:top_k]
        scores.append(adjusted[order]), indices.append(order)
    return np.array(scores), np.array(indices)


def test_exact_adjusted_top_k_equals_brute_force_with_queries_in_n():
    rng = np.random.default_rng(0)
    gallery, n = _unit(rng, 3000, 12), _unit(rng, 80, 12)
    queries = np.concatenate([n[:30], _unit(rng, 30, 12)])  # the first 30 are N's rows 0..29
    query_rows = np.r_[np.arange(30), np.full(30, -1)]
    bias = nonlandmark_bias(gallery, n, 5)
    scores, indices = adjusted_topk(queries, gallery, 7, bias, query_rows=query_rows)
    expected_scores, expected = _brute_force(queries, gallery, n, 5, 7, query_rows)
    assert np.array_equal(indices, expected)
    assert scores == pytest.approx(expected_scores, abs=1e-5)
    # the self-exclusion changed some answers: the full b_j would give others for queries in N
    assert not np.array_equal(adjusted_topk(queries, gallery, 7, bias)[1][:30], expected[:30])


def test_searched_sets_as_torch_tensors_give_the_numpy_answers():
    # A service keeps its gallery, N and index resident as tensors on its device (serve.answers).
    import torch

    rng = np.random.default_rng(1)
    gallery, n, queries = _unit(rng, 500, 8), _unit(rng, 40, 8), _unit(rng, 20, 8)
    labels = rng.integers(0, 30, len(gallery))
    bias = nonlandmark_bias(gallery, n, 5)
    as_tensors = nonlandmark_bias(torch.from_numpy(gallery), torch.from_numpy(n), 5)
    assert np.array_equal(as_tensors.bias, bias.bias) and np.array_equal(as_tensors.rows, bias.rows)
    penalty = query_penalty(queries, n, 10)
    assert np.array_equal(query_penalty(queries, torch.from_numpy(n), 10), penalty)
    expected = recognize(queries, gallery, labels, TOP3, bias=bias, penalty=penalty)
    got = recognize(queries, torch.from_numpy(gallery), labels, TOP3, bias=bias, penalty=penalty)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_exact_adjusted_top_k_finds_a_winner_outside_the_raw_top_100():
    # 200 gallery images at cos 0.9 .. 0.6 but close to N (b = 0.7): adjusted at most 0.2; the next 100 at cos
    # 0.55 .. 0.1 with b = 0.3: at most 0.25. Image 250 (cos 0.32) is far from N (b = 0): its 0.32 wins, though 250
    # images rank before it by cosine.
    cosines = np.r_[np.linspace(0.9, 0.6, 200), np.linspace(0.55, 0.1, 100)]
    query, gallery = _star(cosines)
    b = np.full(len(cosines), 0.7, np.float32)
    b[200:] = 0.3
    b[250] = 0.0
    raw_top_100 = np.argsort(-(gallery @ query[0]))[:100]
    assert 250 not in raw_top_100
    scores, indices = adjusted_topk(query, gallery, 3, NonLandmarkBias.of(b))
    assert indices[0, 0] == 250 and scores[0, 0] == pytest.approx(cosines[250])


def test_the_clamp_at_zero_is_exact_for_images_of_negative_cosine():
    # image 1: cos -0.25 but b = -0.5 (far from N): clamp(cos) - b = 0.5, while cos - b would be only 0.25;
    # image 0: cos 0.875, b 0.5 -> 0.375. Image 1 must win with 0.5.
    query, gallery = _star([0.875, -0.25, 0.5])
    scores, indices = adjusted_topk(query, gallery, 2, NonLandmarkBias.of([0.5, -0.5, 0.25]))
    assert indices.tolist() == [[1, 0]] and scores == pytest.approx(np.array([[0.5, 0.375]]))


def test_negative_cosines_are_clamped_to_zero_not_counted_against_a_label():
    # labels 1, 2, 1 with cos 0.25, 0.125, -0.25: clamped, 1 has 0.25 > 0.125; unclamped 1 would have 0.0 and lose
    query, gallery = _star([0.25, 0.125, -0.25])
    landmarks, confidence = label_images(query, gallery, np.array([1, 2, 1]))
    assert landmarks.tolist() == [1] and confidence.tolist() == [0.25]


def test_vote_sums_per_label_and_breaks_ties_by_the_best_ranked_neighbour():
    labels = np.array([[1, 2, 2], [7, 3, 3], [3, 7, 7]])
    weights = np.array([[0.5, 0.375, 0.25], [0.5, 0.25, 0.25], [0.5, 0.25, 0.25]], dtype=np.float32)
    landmarks, totals = vote(labels, weights)
    # row 0: 2 has 0.625 > 0.5; rows 1 and 2: a tie 0.5 / 0.5 goes to the label of the first column
    assert landmarks.tolist() == [2, 7, 3]
    assert totals.tolist() == [0.625, 0.5, 0.5]


def test_equal_adjusted_similarities_go_to_the_lower_gallery_row():
    query, gallery = _star([0.5, 0.5, 0.5, 0.5])
    landmarks, _ = recognize(query, gallery, np.array([10, 20, 30, 40]), RecognitionSettings(top_k=1),
                             bias=NonLandmarkBias.of(np.zeros(4)), steps=("bias",))
    assert landmarks.tolist() == [10]


def test_the_label_rerank_moves_a_same_label_index_image_up():
    # query label 5; index images 0 (label 5, c 0.5), 1 (label 6, c 0.25), 2 (label 6, c 1.0); kNN order 1, 2, 0:
    # 1: 0.75 - 0.1 * 0.25 = 0.725; 2: 0.5 - 0.1 * 1.0 = 0.4; 0: 0.25 + 0.5 = 0.75 -> order 0, 1, 2
    query, index = _star([0.25, 0.75, 0.5])
    pool = (np.array([[0.75, 0.5, 0.25]]), np.array([[1, 2, 0]]))
    labels, confidence = np.array([5, 6, 6]), np.array([0.5, 0.25, 1.0])
    new_scores, new_indices = label_rerank(query, index, pool, np.array([5]), labels, confidence, keep=3)
    assert new_indices.tolist() == [[0, 1, 2]]
    assert new_scores == pytest.approx(np.array([[0.75, 0.725, 0.4]]))
    # the factors are parameters: with both 0 nothing moves
    unchanged_scores, unchanged = label_rerank(query, index, pool, np.array([5]), labels, confidence, keep=3,
                                               same_factor=0.0, other_factor=0.0)
    assert unchanged.tolist() == [[1, 2, 0]] and unchanged_scores.tolist() == [[0.75, 0.5, 0.25]]


def test_a_same_label_image_beyond_the_pool_is_found_and_moves_up():
    # index cosines 0.875, 0.75, 0.625, 0.5, 0.125 to the query; the pool holds the first two only. Image 4 (cos
    # 0.125) carries the query's label with c 1: 0.125 + 1 = 1.125 beats every other image.
    query, index = _star([0.875, 0.75, 0.625, 0.5, 0.125])
    labels, confidence = np.array([1, 2, 3, 4, 9]), np.array([0.5, 0.5, 0.5, 0.5, 1.0])
    pool = (np.array([[0.875, 0.75]]), np.array([[0, 1]]))
    scores, indices = label_rerank(query, index, pool, np.array([9]), labels, confidence, keep=2)
    assert indices.tolist() == [[4, 0]] and scores == pytest.approx(np.array([[1.125, 0.875 - 0.05]]))


def test_a_pool_too_narrow_to_be_sure_is_searched_again():
    # pool = image 0 only (cos 0.5, c 1 -> 0.5 - 0.1 = 0.4); image 1 (cos 0.4375, c 0 -> 0.4375) lies outside it and
    # wins, which only a wider search can show.
    query, index = _star([0.5, 0.4375, 0.25])
    labels, confidence = np.array([1, 2, 3]), np.array([1.0, 0.0, 0.0])
    pool = (np.array([[0.5]]), np.array([[0]]))
    scores, indices = label_rerank(query, index, pool, np.array([7]), labels, confidence, keep=1)
    assert indices.tolist() == [[1]] and scores == pytest.approx(np.array([[0.4375]]))


@pytest.mark.parametrize("other_factor", [0.1, -0.2])
def test_the_label_rerank_equals_a_brute_force_rerank_of_the_whole_index(other_factor):
    rng = np.random.default_rng(3)
    queries, index = _unit(rng, 60, 8), _unit(rng, 400, 8)
    # Few labels with many images each, so that most same-label images lie outside a pool of 10.
    query_labels, index_labels = rng.integers(0, 6, 60), rng.integers(0, 6, 400)
    confidence = rng.uniform(0, 3, 400).astype(np.float32)
    cos = queries @ index.T
    same = query_labels[:, None] == index_labels[None, :]
    brute = cos + np.where(same, 0.5, -other_factor) * confidence[None, :]
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :25]
    pool = tuple(np.take_along_axis(a, np.argsort(-cos, axis=1)[:, :30], axis=1)
                 for a in (cos, np.broadcast_to(np.arange(400), cos.shape)))
    scores, indices = label_rerank(queries, index, pool, query_labels, index_labels, confidence, keep=25,
                                   same_factor=0.5, other_factor=other_factor, chunk_rows=16)
    assert (indices == expected).all()
    assert scores == pytest.approx(np.take_along_axis(brute, expected, axis=1), abs=1e-5)
    assert (expected[:, :, None] != pool[1][:, None, :]).all(axis=2).any()  # some winner lay beyond the pool


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


def test_retrieve_sums_weighted_model_scores_and_the_label_rerank_moves_a_same_label_image_up():
    # index images 0 (cos 0.75) and 1 (cos 0.5) to the query; the query and image 1 sit on train image 1 (landmark
    # 7), image 0 on train image 0 (landmark 3), so the re-rank lifts image 1 by its confidence and lowers image 0.
    query, index = _star([0.75, 0.5])
    train = index.copy()
    query_on_1 = index[1:2].copy()
    settings = RetrievalSettings(per_model=2, rerank_pool=2, out_k=2, label_k=1)
    model = RetrievalModel(query_on_1, index, train, weight=2.0)
    scores, indices = retrieve([model], np.array([3, 7]), settings, rerank=False)
    assert indices.tolist() == [[1, 0]] and scores == pytest.approx(np.array([[2.0, 2 * 0.375]]))  # cos(i1, i0) = 0.375
    model = RetrievalModel(query, index, train)
    assert retrieve([model], np.array([3, 7]), settings, rerank=False)[1].tolist() == [[0, 1]]
    model = RetrievalModel(query, index, train, index_labels=(np.array([3, 7]), np.array([0.25, 1.0])))
    scores, indices = retrieve([model], np.array([3, 3]), settings)  # the query is labelled 3 (train image 0)
    assert indices.tolist() == [[0, 1]] and scores == pytest.approx(np.array([[0.75 + 0.25, 0.5 - 0.1]]))
    scores, indices = retrieve([model], np.array([7, 7]), settings)  # now 7: image 1 moves up
    assert indices.tolist() == [[1, 0]] and scores == pytest.approx(np.array([[0.5 + 1.0, 0.75 - 0.1 * 0.25]]))


def test_the_boost_as_a_mean_divides_c_j_by_label_k_and_ensemble_labels_are_taken_as_given():
    # index image 1 (cos 0.5) carries the query's label 7 with c 0.6: as a sum (0.5 + 0.6) it passes image 0 (cos
    # 0.75, label 3, c 0.5: 0.75 - 0.05); as a mean over label_k 3 (0.5 + 0.2) it stays below it (0.75 - 0.05 / 3).
    query, index = _star([0.75, 0.5])
    labels = (np.array([3, 7]), np.array([0.5, 0.6]))
    model = RetrievalModel(query, index, index.copy(), index_labels=labels, query_labels=np.array([7]))
    settings = RetrievalSettings(per_model=2, rerank_pool=2, out_k=2, label_k=3)
    scores, indices = retrieve([model], np.array([3, 7]), settings)
    assert indices.tolist() == [[1, 0]] and scores == pytest.approx(np.array([[0.5 + 0.6, 0.75 - 0.05]]))
    scores, indices = retrieve([model], np.array([3, 7]), settings.model_copy(update={"boost": "mean"}))
    assert indices.tolist() == [[0, 1]] and scores == pytest.approx(np.array([[0.75 - 0.05 / 3, 0.5 + 0.2]]))
    with pytest.raises(ValueError, match="retrieval.labels 'ensemble' needs the labels of the ensemble embedding"):
        retrieve([RetrievalModel(query, index, index.copy())], np.array([3, 7]),
                 settings.model_copy(update={"labels": "ensemble"}))


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
    # weights inside a family: dolg_2 at 3 against 1 -> [0.25, 0.75] before normalising; a family alone, so the
    # weight of effnet changes nothing
    weighted = combine_families([("dolg", dolg_1), ("dolg", dolg_2), ("effnet", effnet)], [1.0, 3.0, 5.0])
    assert weighted[0, :2] == pytest.approx(np.array([0.25, 0.75]) / np.hypot(0.25, 0.75) / 2**0.5)
    assert weighted[0, 2] == pytest.approx(2**-0.5)
    with pytest.raises(ValueError, match="one positive weight per model"):
        combine_families([("dolg", dolg_1)], [0.0])


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


def _random_ensemble(gldv2_local: str, out: Path, labels: str):
    """An ensemble config of two models whose embeddings of the synthetic GLDv2's ids are random unit rows, written
    where the ensemble reads them: (config, the splits as loaded, the gallery's labels)."""
    from ray_landmark.data.config import DataConfig
    from ray_landmark.data.metadata import open_manifest
    from ray_landmark.infer.config import EnsembleConfig
    from ray_landmark.infer.embed import write_embeddings
    from ray_landmark.infer.ensemble import Tables, embeddings_folder, load_split

    cfg = EnsembleConfig.model_validate({
        "name": "e", "output_dir": str(out), "data": {"root": gldv2_local},
        "models": [{"name": "a", "checkpoint": "x", "family": "dolg"},
                   {"name": "b", "checkpoint": "x", "family": "effnet", "weight": 0.5}],
        "retrieval": {"labels": labels, "per_model": 6, "rerank_pool": 8, "out_k": 6, "label_k": 2},
        "recognition": {"gallery_nonlandmark_k": 1, "query_nonlandmark_k": 1},
    })
    tables = Tables.read(DataConfig(root=gldv2_local), cfg.gallery_view)
    ids = {"test": tables.test_ids, "train": list(tables.gallery_landmarks.index),
           "index": open_manifest(cfg.data).index()["id"].tolist()}
    rng = np.random.default_rng(5)
    rows = {(m, split): _unit(rng, len(split_ids), 8).astype(np.float16)
            for m in ("a", "b") for split, split_ids in ids.items()}
    for (m, split), embeddings in rows.items():
        write_embeddings(embeddings_folder(cfg, cfg.models[m == "b"]).child(split, "images_000.parquet"),
                         ids[split], embeddings)
    splits = {s: load_split(cfg, s) for s in ids}
    return cfg, splits, tables.gallery_landmarks.loc[list(splits["train"].ids)].to_numpy(np.int64)


@pytest.mark.parametrize("labels", ["model", "ensemble"])
def test_the_service_retrieves_as_the_batch_job_under_either_labelling(gldv2_local, tmp_path, labels):
    """``serve.answers`` against ``infer.ensemble`` on random embeddings of the synthetic GLDv2's ids, without Ray:
    the same top ids for every test image, whoever labels the queries and index images."""
    from ray_landmark.infer.ensemble import retrieve_with_reranking
    from ray_landmark.serve.answers import answer_retrieval, load_served_index

    cfg, splits, gallery_labels = _random_ensemble(gldv2_local, tmp_path, labels)
    _, batch = retrieve_with_reranking(cfg, splits, gallery_labels, "cpu")
    served = load_served_index(cfg, "cpu")
    online = answer_retrieval(served, {m: splits["test"].by_model[m] for m in ("a", "b")}, k=6)
    assert [answer["ids"] for answer in online] == ranked_ids(batch, splits["index"].ids)


def test_the_reports_retrievals_label_each_way_once_and_retrieve_as_if_each_labelled_its_own(gldv2_local, tmp_path,
                                                                                               monkeypatch):
    """The ensemble's ablations share one ``labelled`` dict: each labelling (every model's own, the ensemble
    embedding's) searches the train gallery once, and every retrieval is the one it makes labelling afresh."""
    import ray_landmark.infer.postprocess as pp
    from ray_landmark.infer.ensemble import retrieval_alternatives, retrieve_with_reranking

    cfg, splits, gallery_labels = _random_ensemble(gldv2_local, tmp_path, "model")
    flips = [settings for _, settings in retrieval_alternatives(cfg.retrieval, len(splits["index"].ids))]
    assert {s.labels for s in flips} == {"model", "ensemble"} and len(flips) >= 3
    afresh = [retrieve_with_reranking(cfg, splits, gallery_labels, "cpu", settings=s) for s in [*flips, None]]
    labellings = []
    monkeypatch.setattr(pp, "label_images", lambda rows, *args, **kwargs: labellings.append(len(rows)) or
                        label_images(rows, *args, **kwargs))
    labelled: dict = {}
    shared = [retrieve_with_reranking(cfg, splits, gallery_labels, "cpu", settings=s, labelled=labelled)
              for s in [*flips, None]]
    for (scores, indices), (shared_scores, shared_indices) in zip(afresh, shared):
        assert (indices == shared_indices).all() and (scores == shared_scores).all()
    # Models a and b and the ensemble embedding, each labelling its queries and its index once.
    assert len(labelled) == 3 and len(labellings) == 3 * 2
    assert sorted(set(labellings)) == sorted({len(splits["test"].ids), len(splits["index"].ids)})


def test_query_expansion_and_database_augmentation_add_weighted_neighbours():
    # Index rows e0, e1, and (e0 + e1) / sqrt 2 (cos 0.707 to each); a query e0.
    e0, e1 = np.eye(2, dtype=np.float32)
    index = np.stack([e0, e1, (e0 + e1) / np.sqrt(2)]).astype(np.float32)
    query = e0[None, :]
    # alpha-QE, k 2, alpha 1: q + 1 * e0 + 0.707 * (e0 + e1) / sqrt 2 = (2.5, 0.5), normalised.
    expanded = expand_queries(query, index, k=2, alpha=1.0)
    assert expanded == pytest.approx(np.array([[2.5, 0.5]]) / np.hypot(2.5, 0.5), abs=1e-6)
    # alpha 0: every neighbour with weight 1 (negative similarities would count 0).
    assert expand_queries(query, index, k=1, alpha=0.0) == pytest.approx(np.array([[1.0, 0.0]]), abs=1e-6)
    # DBA, k 1: each row plus its nearest other row; e0's is the diagonal (cos 0.707 ** 3).
    augmented = augment_database(index, k=1, alpha=3.0)
    w = np.float32(np.sqrt(0.5) ** 3)
    assert augmented[0] == pytest.approx((e0 + w * index[2]) / np.linalg.norm(e0 + w * index[2]), abs=1e-6)
    with pytest.raises(ValueError, match=r"k 3 is larger than the index \(2 other images\)"):
        augment_database(index, k=3, alpha=3.0)


def test_retrieve_searches_with_the_expanded_descriptors_and_labels_with_the_models_own():
    rng = np.random.default_rng(7)
    queries, index, train = _unit(rng, 5, 6), _unit(rng, 40, 6), _unit(rng, 30, 6)
    gallery_labels = rng.integers(0, 4, 30)
    base = RetrievalSettings(per_model=10, rerank_pool=12, out_k=10, label_k=2)
    qe = base.model_copy(update={"qe": Expansion(enabled=True, k=3), "dba": Expansion(enabled=True, k=2)})
    _, plain = retrieve([RetrievalModel(queries, index, train)], gallery_labels, base)
    scores, expanded = retrieve([RetrievalModel(queries, index, train)], gallery_labels, qe)
    assert not (plain == expanded).all()
    # The same as searching by hand with the expanded rows, whose labels are still the original rows'.
    dba = augment_database(index, 2, 3.0)
    by_hand = RetrievalModel(expand_queries(queries, dba, 3, 3.0), dba, train,
                             index_labels=label_images(index, train, gallery_labels, 2),
                             query_labels=label_images(queries, train, gallery_labels, 2)[0], augmented=True)
    by_hand_scores, by_hand_indices = retrieve([by_hand], gallery_labels, base)  # expanded already
    assert (by_hand_indices == expanded).all() and by_hand_scores == pytest.approx(scores, abs=1e-5)
