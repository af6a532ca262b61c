"""The inference half end to end on a real local Ray: embedding every image once, resuming, the ensemble's metrics,
submissions and report; and the bad inputs that must never give a silently wrong metric."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ray_landmark.config import config_from_dict
from ray_landmark.data import gldv2
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.storage import list_files, resolve
from ray_landmark.errors import JobError
from ray_landmark.infer.config import EmbedSettings, EnsembleConfig
from ray_landmark.infer.embed import EmbeddingError, EmbedRequest, write_embeddings, embed_splits, read_embeddings
from ray_landmark.infer.ensemble import load_split, run_ensemble
from ray_landmark.runs.checkpoint import CorruptCheckpoint, load_model, read_checkpoint_config


def _ensemble_config(tmp_path, runs, **extra) -> EnsembleConfig:
    tree = {"name": "ensemble", "output_dir": str(tmp_path), "report": {"queries": 6, "results": 5},
            "models": [{"name": "dolg", "checkpoint": runs["dolg"], "family": "dolg"},
                       {"name": "effnet", "checkpoint": runs["effnet"], "family": "efficientnet"}], **extra}
    return config_from_dict(tree, "test", EnsembleConfig)


@pytest.mark.slow
def test_embed_writes_every_image_of_each_split_once_and_a_rerun_embeds_only_missing_shards(
    tiny_checkpoints, gldv2_learnable, tmp_path
):
    request = EmbedRequest(checkpoint=tiny_checkpoints["dolg"], out=str(tmp_path / "emb"),
                           splits=("test", "index", "train"), settings=EmbedSettings(batch_size=16))
    lines: list[str] = []
    summary = embed_splits(request, printer=lambda line, transient=False: lines.append(line))

    manifest = open_manifest(config_from_dict(read_checkpoint_config(request.checkpoint), "ckpt").data)
    expected = {
        "test": set(manifest.test()["id"]),
        "index": set(manifest.index()["id"]),  # distractors without a landmark row included
        "train": set(gldv2.u64_to_ids(manifest.view_images("gldv2c")["id"])),
    }
    first = {}
    for split, ids in expected.items():
        got_ids, embeddings = read_embeddings(resolve(str(tmp_path / "emb" / split)))
        assert len(got_ids) == len(set(got_ids)) == len(ids) and set(got_ids) == ids
        assert embeddings.dtype == np.float16 and embeddings.shape[1] == 512
        assert np.allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1, atol=1e-2)
        assert summary[split]["embedded"] == len(ids) and summary[split]["listed_but_not_embedded"] == 0
        first[split] = dict(zip(got_ids, embeddings))

    # A half-done job: one index shard's output is gone; the rerun embeds that shard alone.
    index_files = list_files(resolve(str(tmp_path / "emb" / "index")), ".parquet")
    resolve(index_files[0]).fs.delete_file(index_files[0])
    lines.clear()
    embed_splits(request, printer=lambda line, transient=False: lines.append(line))
    assert any("1 shards to embed" in line for line in lines), lines
    got_ids, embeddings = read_embeddings(resolve(str(tmp_path / "emb" / "index")))
    assert set(got_ids) == expected["index"]
    # The same vectors up to float16 rounding (batches are composed differently in the two runs).
    assert all(np.allclose(first["index"][i], e, atol=2e-3) for i, e in zip(got_ids, embeddings))

    # Nothing left to do: no pipeline runs at all.
    lines.clear()
    embed_splits(request, printer=lambda line, transient=False: lines.append(line))
    assert not any("shards to embed" in line for line in lines)
    assert any(line.startswith("[embed] dolg: every shard of test, index, train was embedded earlier with ")
               and line.endswith("; reused") for line in lines), lines


@pytest.mark.slow
def test_ensemble_scores_every_stage_and_writes_submissions_report_and_summary(tiny_checkpoints, tmp_path):
    cfg = _ensemble_config(tmp_path, tiny_checkpoints)
    lines = []
    summary = run_ensemble(cfg, printer=lambda line, transient=False: lines.append(line))
    # How long the scoring took, and how much of it was exact search, in the summary and said.
    seconds = summary["seconds"]
    assert 0 < seconds["knn"] <= seconds["scoring"] and seconds["knn_searches"] > 0
    assert f"[ensemble] scored in {seconds['scoring']:.1f} s, {seconds['knn']:.1f} s of it in " in "\n".join(lines)

    out = tmp_path / "ensemble"
    stages = [row["what"] for row in summary["stages"]]
    assert stages[:2] == ["dolg (dolg)", "effnet (efficientnet)"] and stages[-1] == "ensemble with post-processing"
    # The headline: Private and Public apart at the top level; the pooled figures only under a name that says so.
    for key in ("gap_private", "gap_public", "map100_private", "map100_public"):
        assert -1 <= summary[key] <= 1 and summary["final"][key] == summary[key]
        assert all(key in summary["models"][m] for m in ("dolg", "effnet"))
    assert "gap" not in summary and "gap" not in summary["final"]
    assert {"gap_pooled", "map100_pooled", "top1_private", "mp10_private"} <= set(summary["final"])
    # The ablation: each recognition step alone, the score sum without the label re-rank, each open retrieval choice
    # and expansion flipped (labels, boost, qe, dba), per usage.
    ablation = {row["what"]: row for row in summary["stages"] if row["kind"] == "ablation"}
    assert set(ablation) == {"ensemble for recognition, b_j alone", "ensemble for recognition, query penalty alone",
                             "ensemble for retrieval, per-model score sum without label re-rank",
                             "ensemble for retrieval, labels from the ensemble embedding",
                             "ensemble for retrieval, c_j as a mean of cosines",
                             "ensemble for retrieval, with alpha-QE (k 10, alpha 3)",
                             "ensemble for retrieval, with DBA (k 10, alpha 3)"}
    assert all({"gap_private", "gap_public"} <= set(ablation[w]) for w in list(ablation)[:2])
    assert all({"map100_private", "map100_public"} <= set(ablation[w]) for w in list(ablation)[2:])
    # The default N: the test images without a landmark, of every usage; the queries among them leave themselves out.
    assert any("non-landmark test images of the manifest's recognition ground truth (Public, Private, Ignored)" in note
               for note in summary["notes"])
    assert any("are in the non-landmark set themselves" in note for note in summary["notes"])

    test_ids = pd.read_csv(out / "submission_recognition.csv", dtype=str, keep_default_na=False)
    listed = open_manifest(config_from_dict(read_checkpoint_config(cfg.models[0].checkpoint), "c").data).test()
    assert list(test_ids["id"]) == list(listed["id"])
    assert test_ids["landmarks"].str.fullmatch(r"\d+ -?[0-9.e-]+").all()
    retrieval = pd.read_csv(out / "submission_retrieval.csv", dtype=str, keep_default_na=False)
    assert list(retrieval["id"]) == list(listed["id"])
    assert retrieval["images"].str.split().str.len().between(1, 100).all()
    report = (out / "report.html").read_text()
    assert report.count('<div class="query">') == 6 and report.count("data:image/jpeg") >= 6 * 6
    assert "ensemble with post-processing" in report and "http://" not in report
    assert report.index("gap_private") < report.index("gap_public") < report.index("gap_pooled")


def test_embedding_files_with_a_duplicate_id_or_another_dimension_are_errors_naming_the_file(tmp_path):
    folder = resolve(str(tmp_path / "test"))
    unit = np.eye(4, dtype=np.float16)
    write_embeddings(folder.child("images_000.parquet"), ["a" * 16, "b" * 16], unit[:2])
    write_embeddings(folder.child("images_001.parquet"), ["c" * 16, "a" * 16], unit[2:])
    with pytest.raises(EmbeddingError, match=r"images_001.parquet: image aaaaaaaaaaaaaaaa is also in .*images_000"):
        read_embeddings(folder)
    write_embeddings(folder.child("images_001.parquet"), ["c" * 16], np.ones((1, 8), np.float16))
    with pytest.raises(EmbeddingError, match=r"images_001.parquet: 8-d embeddings where .* hold 4-d"):
        read_embeddings(folder)


def test_models_whose_ids_differ_are_an_error_and_invalid_rows_are_dropped_for_all_models_and_counted(tmp_path):
    runs = {"dolg": "unused", "effnet": "unused"}
    cfg = _ensemble_config(tmp_path, runs)
    emb = tmp_path / "ensemble" / "embeddings"
    ids = [f"{i:016x}" for i in range(4)]
    rng = np.random.default_rng(0)
    good = rng.normal(size=(4, 8)).astype(np.float16)
    bad = good.copy()
    bad[1] = 0  # a zero vector
    write_embeddings(resolve(str(emb / "dolg" / "test" / "images_000.parquet")), ids, good)
    write_embeddings(resolve(str(emb / "effnet" / "test" / "images_000.parquet")), ids, bad)
    split = load_split(cfg, "test")
    assert split.excluded == 1 and list(split.ids) == [ids[0], ids[2], ids[3]]
    assert all(len(e) == 3 for e in split.by_model.values())

    write_embeddings(resolve(str(emb / "effnet" / "test" / "images_000.parquet")), ids[:3], good[:3])
    with pytest.raises(EmbeddingError, match=r"embeddings/effnet/test: 1 image ids of split test differ"):
        load_split(cfg, "test")


@pytest.mark.slow
def test_a_checkpoint_whose_config_does_not_match_its_weights_is_an_error_naming_it(tiny_checkpoints, tmp_path):
    import json
    import shutil

    from ray_landmark.runs.checkpoint import CONFIG_FILE, META_FILE, checkpoint_folder

    source = checkpoint_folder(tiny_checkpoints["dolg"])
    copy = tmp_path / "ckpt"
    shutil.copytree(source.path, copy)
    config = json.loads((copy / CONFIG_FILE).read_text())
    config["model"]["embedding_dim"] = 256  # the weights are 512-d
    (copy / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    # a complete checkpoint whose config is wrong, not an interrupted write: meta.json records the config's size
    meta = json.loads((copy / META_FILE).read_text())
    meta["sizes"][CONFIG_FILE] = (copy / CONFIG_FILE).stat().st_size
    (copy / META_FILE).write_text(json.dumps(meta, indent=2))
    with pytest.raises(CorruptCheckpoint, match=rf"checkpoint {copy}: its weights do not fit the model"):
        load_model(str(copy))


def _nonlandmark_case(tmp_path, recognition: dict):
    """An ensemble config, its ground truth and the test/train embeddings of two models written to its folder: test
    images t0..t5 (t0, t1 landmark 1; t2..t5 non-landmarks), train images g0..g3."""
    from ray_landmark.infer.ensemble import Tables

    cfg = _ensemble_config(tmp_path, {"dolg": "x", "effnet": "y"}, recognition=recognition)
    rng = np.random.default_rng(0)
    ids = {"test": [f"t{i}" for i in range(6)], "train": [f"g{i}" for i in range(4)]}
    for model in ("dolg", "effnet"):
        for split, split_ids in ids.items():
            write_embeddings(resolve(str(tmp_path / "ensemble" / "embeddings" / model / split / "images_000.parquet")),
                           split_ids, rng.normal(size=(len(split_ids), 8)).astype(np.float16))
    truth = pd.DataFrame({"id": ids["test"], "landmarks": ["1", "1", "", "", "", ""],
                          "usage": ["Public", "Private", "Public", "Private", "Ignored", "Private"]})
    tables = Tables(truth, pd.DataFrame(), ids["test"], pd.Series([1, 1, 2, 2], index=ids["train"]))
    return cfg, tables


def test_n_is_the_ground_truths_non_landmarks_and_every_bad_n_is_one_line_naming_its_setting(tmp_path):
    from ray_landmark.infer.ensemble import load_nonlandmark, load_split

    cfg, tables = _nonlandmark_case(tmp_path, {})
    splits = {s: load_split(cfg, s) for s in ("test", "train")}
    n, groups = load_nonlandmark(cfg, tables, splits)
    assert list(n.ids) == ["t2", "t3", "t4", "t5"] and len(groups) == 1 and len(groups[0].queries) == 6
    cfg, _ = _nonlandmark_case(tmp_path, {"nonlandmark": {"usages": ["Private"]}})
    assert list(load_nonlandmark(cfg, tables, splits)[0].ids) == ["t3", "t5"]

    no_rows = tmp_path / "truth.csv"
    no_rows.write_text("id,landmarks,Usage\nt0,1,Public\n")
    cfg, _ = _nonlandmark_case(tmp_path, {"nonlandmark": {"ground_truth": str(no_rows)}})
    with pytest.raises(JobError, match=rf"recognition.nonlandmark: {no_rows} has no non-landmark rows"):
        load_nonlandmark(cfg, tables, splits)

    listed = tmp_path / "n.csv"
    listed.write_text("id\ng1\nffffffffffffffff\n")
    cfg, _ = _nonlandmark_case(tmp_path, {"nonlandmark": {"source": "ids", "ids": str(listed), "ids_split": "train"}})
    with pytest.raises(JobError, match=r"recognition.nonlandmark.ids: 1 of the 2 images of N have no embedding "
                                       r"\(e.g. ffffffffffffffff\)"):
        load_nonlandmark(cfg, tables, splits)
    outside = tmp_path / "outside"
    write_embeddings(resolve(str(outside / "dolg" / "images_000.parquet")), ["x0", "x1"], np.ones((2, 8), np.float16))
    listed.write_text("id\nx0\nx1\n")
    cfg, _ = _nonlandmark_case(tmp_path, {"nonlandmark": {"source": "ids", "ids": str(listed),
                                                          "embeddings": str(outside)}})
    with pytest.raises(JobError, match=r"recognition.nonlandmark.embeddings: .*outside/effnet.*embed N with each"):
        load_nonlandmark(cfg, tables, splits)


def test_every_ablation_step_is_scored_and_an_n_no_larger_than_k_is_refused(tmp_path):
    from ray_landmark.infer.ensemble import (RECOGNITION_ABLATION, load_nonlandmark, load_split,
                                             recognize_with_reranking, stages)

    cfg, tables = _nonlandmark_case(tmp_path, {"gallery_nonlandmark_k": 2, "query_nonlandmark_k": 3})
    splits = {s: load_split(cfg, s) for s in ("test", "train")}
    splits["nonlandmark"], groups = load_nonlandmark(cfg, tables, splits)
    ensemble = [s for s in stages(cfg) if s.kind == "ensemble" and "recognition" in s.tasks][0]
    rows = [ensemble.embeddings(splits, s) for s in ("test", "train", "nonlandmark")]
    labels = np.array([1, 1, 2, 2])
    by_steps = recognize_with_reranking(cfg, *rows, splits, groups, labels, "cpu")
    assert set(by_steps) == set(RECOGNITION_ABLATION)
    (_, bias_alone), (_, penalty_alone), (_, both) = (by_steps[s] for s in RECOGNITION_ABLATION)
    assert len(both) == 6 and not np.allclose(bias_alone, both) and not np.allclose(penalty_alone, both)

    # |N| = 4 is not more than query_nonlandmark_k 4; under cross_usage each usage's N has 1 or 2 images.
    cfg, _ = _nonlandmark_case(tmp_path, {"gallery_nonlandmark_k": 2, "query_nonlandmark_k": 4})
    with pytest.raises(JobError, match=r"recognition.nonlandmark \(source split\): 4 non-landmark images for all "
                                       r"queries; .* need more than 4"):
        recognize_with_reranking(cfg, *rows, splits, groups, labels, "cpu")
    cfg, _ = _nonlandmark_case(tmp_path, {"nonlandmark": {"source": "cross_usage"}})
    splits["nonlandmark"], groups = load_nonlandmark(cfg, tables, splits)
    rows[2] = ensemble.embeddings(splits, "nonlandmark")
    with pytest.raises(JobError, match=r"\(source cross_usage\): 1 non-landmark images for Private queries"):
        recognize_with_reranking(cfg, *rows, splits, groups, labels, "cpu")


def test_the_table_leads_with_private_and_pooled_metrics_say_so():
    from ray_landmark.infer.ensemble import headline_metrics, headline_text, metrics_text

    row = {"what": "final", **headline_metrics({"gap": 0.5, "gap_public": 0.25, "gap_private": 0.75, "map100": 0.5,
                                         "map100_private": 0.125, "top1": 0.5})}
    assert set(row) == {"what", "gap_pooled", "gap_public", "gap_private", "map100_pooled", "map100_private",
                        "top1_pooled"}
    header, line = metrics_text([row]).splitlines()
    assert header.split()[:4] == ["gap_private", "gap_public", "map100_private", "map100_public"]
    assert line.split()[1:5] == ["0.7500", "0.2500", "0.1250", "-"]
    assert headline_text(row) == "gap_private 0.7500, gap_public 0.2500, map100_private 0.1250"


def test_each_task_compares_models_families_of_several_models_and_the_ensemble_of_that_tasks_models(tmp_path):
    from ray_landmark.infer.ensemble import SplitEmbeddings, stages

    tree = {"name": "t", "output_dir": str(tmp_path), "models": [
        {"name": "d1", "checkpoint": "x", "family": "dolg"},
        {"name": "d2", "checkpoint": "x", "family": "dolg"},
        {"name": "e1", "checkpoint": "x", "family": "effnet", "tasks": ["recognition"]},
        {"name": "e2", "checkpoint": "x", "family": "effnet", "tasks": ["retrieval"]},
    ]}
    cfg = config_from_dict(tree, "t", EnsembleConfig)
    rng = np.random.default_rng(0)
    models = ("d1", "d2", "e1", "e2")
    splits = {s: SplitEmbeddings(np.arange(5).astype(str), {m: rng.normal(size=(5, 4)) for m in models}, 0)
              for s in ("test", "index", "train")}
    rows = {stage.what: stage for stage in stages(cfg)}
    assert set(rows) == {
        "d1 (dolg)", "d2 (dolg)", "e1 (effnet)", "e2 (effnet)",
        "family dolg for recognition (2 models)", "family dolg for retrieval (2 models)",
        "ensemble for recognition, no post-processing (3 models)",
        "ensemble for retrieval, no post-processing (3 models)",
    }
    assert rows["e1 (effnet)"].tasks == ("recognition",)
    assert [m.name for m in rows["ensemble for retrieval, no post-processing (3 models)"].members] == ["d1", "d2", "e2"]
    test = rows["ensemble for recognition, no post-processing (3 models)"].embeddings(splits, "test")
    assert test.shape == (5, 8) and np.allclose(np.linalg.norm(test, axis=1), 1, atol=1e-5)


def test_an_expansion_whose_k_the_index_cannot_give_is_one_line_naming_the_key_and_no_ablation_row():
    from ray_landmark.infer.config import RetrievalSettings
    from ray_landmark.infer.ensemble import check_expansions, retrieval_alternatives

    settings = RetrievalSettings(dba={"enabled": True, "k": 5})
    with pytest.raises(JobError, match=r"retrieval\.dba\.k 5 is larger than the index allows \(5 images, each with "
                                       r"itself left out\); lower it"):
        check_expansions(settings, 5)
    check_expansions(settings, 6)
    rows = [what for what, _ in retrieval_alternatives(RetrievalSettings(), 10)]  # qe's k 10 fits, dba's does not
    assert rows == ["ensemble for retrieval, labels from the ensemble embedding",
                    "ensemble for retrieval, c_j as a mean of cosines",
                    "ensemble for retrieval, with alpha-QE (k 10, alpha 3)"]


def test_dba_over_an_index_whose_embeddings_are_missing_for_a_model_is_one_line_naming_its_folder(tmp_path):
    from ray_landmark.data.storage import StorageError

    cfg = _ensemble_config(tmp_path, {"dolg": "unused", "effnet": "unused"},
                           retrieval={"dba": {"enabled": True, "k": 2}})
    emb = tmp_path / "ensemble" / "embeddings"
    ids = [f"{i:016x}" for i in range(4)]
    rows = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float16)
    write_embeddings(resolve(str(emb / "dolg" / "index" / "images_000.parquet")), ids, rows)
    with pytest.raises(StorageError, match=rf"{emb / 'effnet' / 'index'} does not exist"):
        load_split(cfg, "index")
