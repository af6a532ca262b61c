"""Revisited Oxford and Paris: the official protocol's AP and mP@k on hand-made rankings, the safe ground-truth
reader, the synthetic set and its distractors, multi-scale descriptors on a tiny model, and the job end to end."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ray_landmark.data import revisited as rd
from ray_landmark.data.storage import resolve
from ray_landmark.eval.revisited import (
    average_precision, evaluate, evaluate_protocol, positive_ranks, precision_at, protocol_sets,
)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the protocol


def test_protocols_pick_positives_and_ignored_images_as_the_paper_defines():
    gnd = {"easy": [1, 4], "hard": [2], "junk": [3]}
    expected = {"easy": ({1, 4}, {3, 2}), "medium": ({1, 4, 2}, {3}), "hard": ({2}, {3, 1, 4})}
    for protocol, (positives, ignored) in expected.items():
        ok, junk = protocol_sets(gnd, protocol)
        assert (set(ok.tolist()), set(junk.tolist())) == (positives, ignored), protocol


def test_ap_is_the_trapezoid_of_the_official_code_not_classic_ap():
    assert average_precision(np.array([0]), 1) == 1.0
    # Positives at ranks 0 and 2: (1 + 1)/2 * 1/2 + (1/2 + 2/3)/2 * 1/2 = 0.791666..., where classic AP is 0.8333.
    assert average_precision(np.array([0, 2]), 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    # A single positive at rank 1: (0/1 + 1/2) / 2 = 0.25 (classic: 0.5).
    assert average_precision(np.array([1]), 1) == pytest.approx(0.25)
    # A positive missing from the ranking adds nothing: half of the recall is never reached.
    assert average_precision(np.array([0]), 2) == pytest.approx(0.5)
    assert average_precision(np.array([], dtype=np.int64), 3) == 0.0


def test_junk_in_the_way_is_taken_out_of_the_ranking():
    positives, junk = np.array([7]), np.array([5, 6])
    assert positive_ranks(np.array([5, 6, 7, 1]), positives, junk).tolist() == [0]  # two junk before: rank 0
    assert positive_ranks(np.array([1, 5, 7]), positives, junk).tolist() == [1]  # a negative stays in the way
    assert positive_ranks(np.array([7, 5, 6]), positives, junk).tolist() == [0]  # junk after it changes nothing
    gnd = [{"easy": [7], "hard": [], "junk": [5, 6]}]
    assert evaluate_protocol(np.array([[5, 6, 7]]), gnd, "easy")["mAP"] == 100.0
    assert evaluate_protocol(np.array([[1, 5, 7]]), gnd, "easy")["mAP"] == pytest.approx(25.0)


def test_a_query_without_positives_under_a_protocol_is_skipped():
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [1], "hard": [2], "junk": []}]
    rankings = np.array([[0, 1, 2], [2, 0, 1]])
    hard = evaluate_protocol(rankings, gnd, "hard")
    assert (hard["queries"], hard["skipped_without_positives"], hard["ap"][0]) == (1, 1, None)
    assert hard["mAP"] == 100.0  # the second query's only hard image is first; the first query is not a zero
    easy = evaluate(rankings, gnd)["easy"]
    # Query 2 under Easy: its hard image 2 is ignored, so its easy image 1 is at rank 1 behind image 0.
    assert easy["ap"] == [1.0, pytest.approx(0.25)] and easy["mAP"] == pytest.approx(62.5)


def test_mean_precision_at_k_uses_the_official_kappa_rule():
    assert precision_at(np.array([0, 1])).tolist() == [1.0, 1.0, 1.0]  # both found by rank 2: no penalty at 5, 10
    assert precision_at(np.array([0, 6])).tolist() == pytest.approx([1.0, 1 / 5, 2 / 7])
    assert precision_at(np.array([], dtype=np.int64)).tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- the ground truth, safely


def _truth(**changes) -> dict:
    truth = {"imlist": ["a", "b", "c"], "qimlist": ["q"],
             "gnd": [{"bbx": [1.0, 2.0, 30.0, 20.0], "easy": [0], "hard": [1], "junk": [2]}]}
    return truth | changes


def _write_truth(root: Path, payload: bytes, dataset: str = "roxford5k") -> None:
    (root / dataset / "jpg").mkdir(parents=True, exist_ok=True)
    (root / dataset / f"gnd_{dataset}.pkl").write_bytes(payload)


def test_a_plain_ground_truth_loads(tmp_path):
    truth = _truth(gnd=[{"bbx": (1, 2.0, 30.0, 20.0), "easy": [0], "hard": (1,), "junk": [2]}])
    _write_truth(tmp_path, pickle.dumps(truth, protocol=2))
    loaded = rd.read_ground_truth(str(tmp_path), "roxford5k")
    assert loaded.gnd == [{"bbx": [1.0, 2.0, 30.0, 20.0], "easy": [0], "hard": [1], "junk": [2]}]
    assert (loaded.imlist, loaded.qimlist) == (["a", "b", "c"], ["q"])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("payload, message", [
    (pickle.dumps(_truth(extra=_Exploit())), "refused to load this pickle: it names posix.system"),
    (pickle.dumps(_truth(gnd=[{"bbx": np.zeros(4), "easy": [], "hard": [], "junk": []}])), "it names numpy"),
    (pickle.dumps({"imlist": ["a"], "qimlist": []}), "missing key 'gnd'"),
    (pickle.dumps(_truth(gnd=[{"bbx": [1, 2, 3, 4], "easy": [5], "hard": [], "junk": []}])), "gnd[0]['easy']"),
    (pickle.dumps(_truth(gnd=[{"bbx": [1, 2, 3], "easy": [], "hard": [], "junk": []}])), "gnd[0]['bbx']"),
    (b"not a pickle", "refused to load this pickle"),
], ids=["a function", "a numpy array", "no gnd key", "a position outside imlist", "a box of 3", "not a pickle"])
def test_bad_or_unsafe_ground_truth_is_refused_with_one_line(tmp_path, monkeypatch, payload, message):
    monkeypatch.chdir(tmp_path)
    _write_truth(tmp_path, payload)
    with pytest.raises(rd.RevisitedDataError) as err:
        rd.read_ground_truth(str(tmp_path), "roxford5k")
    assert message in str(err.value) and "gnd_roxford5k.pkl" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()  # nothing of the pickle ran


def test_boxes_are_clipped_to_the_image_and_counted():
    assert rd.crop_box((100, 80), (10.4, 5.6, 50, 60)) == ((10, 6, 50, 60), False)
    assert rd.crop_box((100, 80), (-5, 10, 120, 60)) == ((0, 10, 100, 60), True)
    assert rd.crop_box((100, 80), (150, 10, 180, 60)) == (None, True)


def _jpeg(width: int, height: int, color=(200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="JPEG")
    return out.getvalue()


def test_prepare_images_crops_clips_resizes_and_marks_what_went_wrong():
    from ray_landmark.infer.revisited import prepare_images

    jpegs = np.empty(4, dtype=object)
    jpegs[:] = [_jpeg(120, 60), _jpeg(120, 60), _jpeg(120, 60), b"\xff\xd8\xff broken"]
    boxes = np.array([[np.nan] * 4, [0, 0, 60, 60], [100, 10, 200, 50], [np.nan] * 4])
    out = prepare_images({"id": np.array(list("abcd"), dtype=object), "part": np.array(["p"] * 4, dtype=object),
                          "jpeg": jpegs, "box": boxes}, long_side=48, square=False)
    assert [image.shape for image in out["image"][:3]] == [(24, 48, 3), (48, 48, 3), (48, 24, 3)]
    assert out["status"].tolist() == ["ok", "ok", "ok", "corrupt_jpeg"]
    assert out["box"].tolist() == ["", "", "clipped", ""]
    squashed = prepare_images({k: v[:1] for k, v in {"id": out["id"], "part": out["part"], "jpeg": jpegs,
                                                      "box": boxes}.items()}, long_side=48, square=True)
    assert squashed["image"][0].shape == (48, 48, 3)


def _missing_image_set(root: Path) -> None:
    _write_truth(root, pickle.dumps(_truth()))
    for name in ("a", "b", "q"):
        (root / "roxford5k" / "jpg" / f"{name}.jpg").write_bytes(_jpeg(40, 30))


def test_missing_images_are_named_and_refused_unless_allowed(tmp_path):
    from ray_landmark.infer.revisited import RevisitedRequest, check_inputs

    _missing_image_set(tmp_path)
    request = RevisitedRequest("roxford5k", str(tmp_path), str(tmp_path / "out"), models=())
    with pytest.raises(rd.RevisitedDataError, match=r"1 of the 4 images listed in .* are missing .*: c; .*"
                                                    r"--allow-missing"):
        check_inputs(request)
    from dataclasses import replace
    assert check_inputs(replace(request, allow_missing=True)).missing == ["c"]


@pytest.mark.slow  # a job process: seconds of imports
def test_the_job_refuses_bad_input_with_one_line_and_exit_1(tmp_path):
    _missing_image_set(tmp_path)
    done = subprocess.run(
        [sys.executable, "jobs/eval_revisited.py", "--checkpoint", str(tmp_path / "no-such-run"), "--dataset",
         "roxford5k", "--data", str(tmp_path), "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 1 of the 4 images listed in") and " c;" in lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--qe", "0"], "--qe 0: the neighbours summed must be at least 1"),
    (["--dba", "-1", "--qe", "2"], "--dba -1: the neighbours summed must be at least 1"),
    (["--qe", "2", "--alpha", "-0.5"], "--alpha -0.5: the power of the neighbours' similarities must be a number >= 0"),
    (["--dba", "1", "--alpha", "nan"], "--alpha nan: the power of the neighbours' similarities must be a number >= 0"),
    (["--alpha", "2"], "--alpha 2: it weighs the neighbours of --qe and --dba; give one of them"),
    # The database is a and b (c is missing): what neither flag can take from it, before any checkpoint is read.
    (["--qe", "3", "--allow-missing"], "--qe 3 is larger than the database allows (2 images); lower it"),
    (["--dba", "2", "--qe", "2", "--allow-missing"],
     "--dba 2 is larger than the database allows (2 images, each with itself left out); lower it"),
])
def test_bad_expansion_flags_are_one_line_naming_the_flag(monkeypatch, tmp_path, flags, message):
    from conftest import job_error

    _missing_image_set(tmp_path)
    error = job_error(monkeypatch, "eval_revisited.py", "--checkpoint", str(tmp_path / "no-such-run"), "--dataset",
                      "roxford5k", "--data", str(tmp_path), "--out", str(tmp_path / "out"), *flags)
    assert error == f"error: {message}"


# ---------------------------------------------------------------- the synthetic set and the distractors


@pytest.fixture(scope="module")
def synthetic_revisited(tmp_path_factory):
    """The synthetic ROxf of the learnable GLDv2's landmarks, its distractors as tar shards and as a folder."""
    from conftest import LEARNABLE_SPEC

    root = tmp_path_factory.mktemp("revisited")
    spec = rd.SyntheticRevisitedSpec(LEARNABLE_SPEC)
    summary = rd.write_synthetic_revisited(spec, resolve(str(root / "data")), resolve(str(root / "tars")))
    rd.write_synthetic_revisited(spec, resolve(str(root / "copy")), resolve(str(root / "folder")),
                                 distractor_format="folder")
    return root, spec, summary


def test_the_synthetic_set_is_a_valid_revisited_set(synthetic_revisited):
    root, spec, summary = synthetic_revisited
    truth = rd.read_ground_truth(str(root / "data"), "roxford5k")
    assert len(truth.qimlist) == spec.landmarks * spec.queries_per_landmark == summary["queries"]
    assert rd.missing_images(truth, rd.image_folder(str(root / "data"), "roxford5k")) == []
    hard_counts = [len(g["hard"]) for g in truth.gnd]
    assert hard_counts[-1] == 0 and min(hard_counts[:-spec.queries_per_landmark]) == spec.hard
    for name, g in zip(truth.qimlist, truth.gnd):
        with Image.open(root / "data" / "roxford5k" / "jpg" / f"{name}.jpg") as image:
            assert rd.crop_box(image.size, g["bbx"])[1] is False  # every box lies inside its query
        assert not set(g["easy"]) & set(g["hard"]) and not set(g["easy"]) & set(g["junk"])


def test_distractors_read_alike_from_tar_shards_and_from_a_folder(synthetic_revisited, tmp_path):
    root, spec, _ = synthetic_revisited

    def images(uri: str) -> dict[str, bytes]:
        parts = rd.distractor_parts(uri, None, part_size=7)
        return {i: data for part in parts for i, data, box in rd.read_part(part, None)}

    from_tars = images(str(root / "tars"))
    assert len(rd.distractor_parts(str(root / "tars"), None, 7)) == spec.distractor_shards
    assert len(rd.distractor_parts(str(root / "folder"), None, 7)) == -(-spec.distractors // 7)
    assert from_tars == images(str(root / "folder")) and len(from_tars) == spec.distractors
    gzipped = tmp_path / "gz"
    gzipped.mkdir()
    with tarfile.open(gzipped / "r1m.1.tar.gz", "w:gz") as tar:
        tar.add(root / "folder", arcname="jpg")
    assert images(str(gzipped)) == from_tars
    (gzipped / "cut.tar").write_bytes((root / "tars" / "distractors_000.tar").read_bytes()[:3000])
    with pytest.raises(rd.RevisitedDataError, match="cut.tar: unreadable or truncated tar"):
        images(str(gzipped))


def test_a_user_error_raised_in_a_ray_task_is_found_behind_the_wrappers():
    from ray_landmark.errors import user_error

    class Wrapper(Exception):  # as a RayTaskError: the original exception in ``cause``
        def __init__(self, cause):
            super().__init__("Traceback ...")
            self.cause = cause

    original = rd.RevisitedDataError("x.tar: unreadable or truncated tar")
    try:
        try:
            raise Wrapper(original)
        except Wrapper as wrapped:
            raise RuntimeError("UserCodeException") from wrapped
    except RuntimeError as outer:
        assert user_error(outer) is original
    assert user_error(RuntimeError("a bug")) is None


# ---------------------------------------------------------------- multi-scale descriptors


@pytest.fixture(scope="module")
def tiny_model():
    from ray_landmark.config import load_config
    from ray_landmark.models.factory import build_model

    cfg = load_config(REPO / "configs" / "tiny_dolg.yaml")
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.loss, 4, cfg.data.image_size).eval()


def test_multiscale_descriptors_average_the_scales_and_differ_from_single_scale(tiny_model):
    from ray_landmark.data.transforms import normalize_on_device
    from ray_landmark.infer.embed import embed_images
    from ray_landmark.infer.revisited import DEFAULT_SCALES

    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
              for shape in ((48, 64, 3), (64, 48, 3), (48, 64, 3))]

    def embed(images, scales, **kwargs):
        return embed_images(tiny_model, images, scales, batch_size=2, **kwargs)

    with torch.inference_mode():
        single = embed(images, (1.0,))
        plain = torch.cat([tiny_model.embed(normalize_on_device(i[None])) for i in images])
        assert torch.allclose(single, plain, atol=1e-5)  # scale 1 is the model's own embedding
        per_scale = [embed(images, (s,)) for s in DEFAULT_SCALES]
        multi = embed(images, DEFAULT_SCALES)
        one_by_one = torch.cat([embed([i], DEFAULT_SCALES) for i in images])
        # A batch of one shape (GLDv2's images) is the same as its images one by one.
        same_shape = [images[0], images[2]]
        assert torch.allclose(embed(torch.stack(same_shape), DEFAULT_SCALES), embed(same_shape, DEFAULT_SCALES))
        mirrored = embed([i.flip(1) for i in images], DEFAULT_SCALES)
        flip_tta = embed(images, DEFAULT_SCALES, flip=True)
    assert torch.allclose(multi, torch.nn.functional.normalize(sum(per_scale), dim=1), atol=1e-5)
    assert torch.allclose(multi, one_by_one, atol=1e-5)  # batching images by shape changes no descriptor
    assert torch.allclose(multi.norm(dim=1), torch.ones(3))
    assert (multi * single).sum(dim=1).max() < 0.9999  # the other scales do change the descriptor
    # Flip TTA: each scale's image and its mirror image, all unit embeddings summed, then normalised.
    per_view = sum(embed(views, (s,)) for views in (images, [i.flip(1) for i in images]) for s in DEFAULT_SCALES)
    assert torch.allclose(flip_tta, torch.nn.functional.normalize(per_view, dim=1), atol=1e-5)
    assert not torch.allclose(flip_tta, multi, atol=1e-3) and not torch.allclose(flip_tta, mirrored, atol=1e-3)


def test_the_embed_settings_of_a_run_default_to_the_protocols_scales_and_refuse_bad_ones_in_one_line():
    from ray_landmark.errors import ConfigError
    from ray_landmark.infer.revisited import DEFAULT_SCALES, embed_settings

    assert embed_settings({}).scales == list(DEFAULT_SCALES) and embed_settings({"scales": [1]}).scales == [1.0]
    assert embed_settings({"batch_size": 8}).batch_size == 8
    for tree, message in (({"scales": [1, 0]}, "key 'scales.1': Input should be greater than 0"),
                          ({"scales": []}, "key 'scales': List should have at least 1 item"),
                          ({"compile": True}, "key 'compile': Revisited's images come in many shapes")):
        with pytest.raises(ConfigError, match=rf"^jobs/eval_revisited.py arguments: {message}") as err:
            embed_settings(tree, "jobs/eval_revisited.py arguments")
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_on_the_synthetic_set_with_distractors_and_an_ensemble(ray_session, tiny_checkpoints,
                                                                          synthetic_revisited, tmp_path):
    from dataclasses import replace

    from ray_landmark.infer.config import EnsembleModel, Expansion
    from ray_landmark.infer.embed import EmbeddingError, read_embeddings
    from ray_landmark.infer.postprocess import augment_database, expand_queries
    from ray_landmark.infer.revisited import RevisitedRequest, embed_settings, rank, run_revisited

    def _embeddings_in_order(folder: Path, names: list[str]) -> np.ndarray:
        ids, vectors = read_embeddings(resolve(str(folder)))
        row = {image_id: n for n, image_id in enumerate(ids)}
        return vectors[[row[n] for n in names]].astype(np.float32)

    root, spec, summary = synthetic_revisited
    models = (EnsembleModel(name="dolg", checkpoint=tiny_checkpoints["dolg"], family="dolg"),
              EnsembleModel(name="effnet", checkpoint=tiny_checkpoints["effnet"], family="efficientnet"))
    request = RevisitedRequest("roxford5k", str(root / "data"), str(tmp_path / "out"), models,
                               distractors=str(root / "tars"), part_size=40, settings=embed_settings({"batch_size": 8}))
    lines = []
    results = run_revisited(request, printer=lambda line, transient=False: lines.append(line))
    assert results["database_images"] == summary["database"] + spec.distractors
    assert [s["what"] for s in results["stages"]] == ["dolg", "effnet", "ensemble (2 models)"]
    for stage in results["stages"]:
        assert stage["exact"] and stage["ranking_depth"] == results["database_images"]
        hard = stage["protocols"]["hard"]
        assert hard["skipped_without_positives"] == spec.queries_per_landmark  # the landmark with no hard image
        assert stage["protocols"]["easy"]["queries"] == summary["queries"]
    # The pipeline's numbers are those of a plain search over the files it wrote, in the ground truth's order.
    truth = rd.read_ground_truth(str(root / "data"), "roxford5k")
    embeddings = tmp_path / "out" / "embeddings" / "dolg"
    queries = _embeddings_in_order(embeddings / "roxford5k" / "queries", truth.qimlist)
    database = np.concatenate([_embeddings_in_order(embeddings / "roxford5k" / "database", truth.imlist),
                               read_embeddings(resolve(str(embeddings / "distractors")))[1].astype(np.float32)])
    rankings = np.argsort(-(queries @ database.T), axis=1, kind="stable")
    plain = evaluate(rankings, truth.gnd)
    for protocol in ("easy", "medium", "hard"):
        assert results["stages"][0]["protocols"][protocol]["mAP"] == pytest.approx(plain[protocol]["mAP"])
    # Views of buildings the model was trained on: better than random rankings of the same database.
    rng = np.random.default_rng(0)
    chance = np.mean([evaluate(np.stack([rng.permutation(len(database)) for _ in truth.gnd]), truth.gnd)["medium"][
        "mAP"] for _ in range(50)])
    assert results["stages"][0]["protocols"]["medium"]["mAP"] > 1.3 * chance
    saved = json.loads((tmp_path / "out" / "roxford5k+r1m" / "results.json").read_text())
    assert saved["stages"] == json.loads(json.dumps(results["stages"]))
    page = (tmp_path / "out" / "roxford5k+r1m" / "report.html").read_text()
    assert page.count('class="query"') == request.report_queries and "data:image/jpeg;base64," in page

    # A rerun embeds nothing and scores the same; other settings into the same folder are refused.
    rerun_lines = []
    again = run_revisited(request, printer=lambda line, transient=False: rerun_lines.append(line))
    assert not [line for line in rerun_lines if "embedding" in line] and any("embedding" in line for line in lines)
    assert again["stages"] == results["stages"]

    # --qe and --dba: the last stage again with each and both, from the same embeddings, the plain rows unchanged.
    both = {"qe": Expansion(enabled=True, k=3), "dba": Expansion(enabled=True, k=3)}
    expanded = run_revisited(replace(request, **both), printer=lambda *a, **k: None)
    assert expanded["stages"][:3] == results["stages"]
    assert [s["what"] for s in expanded["stages"][3:]] == [
        "ensemble (2 models) with alpha-QE (k 3, alpha 3)", "ensemble (2 models) with DBA (k 3, alpha 3)",
        "ensemble (2 models) with DBA (k 3, alpha 3) then alpha-QE (k 3, alpha 3)"]
    assert expanded["protocol"]["qe"] == {"enabled": True, "k": 3, "alpha": 3.0}
    ensemble = results["stages"][2]["protocols"]
    for stage in expanded["stages"][3:]:
        assert stage["exact"] and any(stage["protocols"][p]["mAP"] != ensemble[p]["mAP"] for p in ensemble)
    # One model with both: DBA on its database, then each query expanded over that, then the same exact search (the
    # augmented rows have near-ties that another product would order otherwise).
    alone = run_revisited(replace(request, models=models[:1], **both), printer=lambda *a, **k: None)
    augmented = augment_database(database, 3, 3.0)
    by_hand = evaluate(rank(expand_queries(queries, augmented, 3, 3.0), augmented, np.arange(len(database)),
                            len(database))[0], truth.gnd)
    assert alone["stages"][-1]["what"] == "dolg with DBA (k 3, alpha 3) then alpha-QE (k 3, alpha 3)"
    for protocol in ("easy", "medium", "hard"):
        assert alone["stages"][-1]["protocols"][protocol]["mAP"] == pytest.approx(by_hand[protocol]["mAP"])
    with pytest.raises(EmbeddingError, match="holds embeddings of"):
        run_revisited(replace(request, settings=embed_settings({"scales": [1.0]})), printer=lambda *a, **k: None)
    # A distractor tar that ends early, read in a Ray task, ends the run with its one line.
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "r1m_000.tar").write_bytes((root / "tars" / "distractors_000.tar").read_bytes()[:3000])
    with pytest.raises(rd.RevisitedDataError, match=r"^\S*r1m_000.tar: unreadable or truncated tar") as err:
        run_revisited(replace(request, models=models[:1], distractors=str(cut)), printer=lambda *a, **k: None)
    assert "\n" not in str(err.value)
