"""The ensemble job: embeddings of every model -> kNN -> solution.md §5's post-processing -> official metrics,
Kaggle submissions, ``report.html`` and ``summary.json``.

    1. embed: each model's test, index and train (gallery view) images, reusing the shards already embedded;
    2. score (a Ray task: on a GPU when ``score_gpus`` asks for one): align the models' rows by image id, drop and count
       invalid rows, then for each model alone, each family and the ensemble: recognition by train kNN and retrieval
       by index kNN; then the ensemble with post-processing (non-landmark re-ranking, label-aware soft re-ranking and
       score summing); metrics per stage, Public and Private apart; the two submission files;
    3. report: the metrics table and a gallery of sampled queries with thumbnails read from the shards.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray
import torch

from ray_landmark.config import config_from_dict
from ray_landmark.config_base import JobError
from ray_landmark.data import gldv2
from ray_landmark.data.config import DataConfig
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.storage import Location, read_bytes, resolve, write_bytes
from ray_landmark.eval.metrics import recognition_metrics, retrieval_metrics
from ray_landmark.infer import postprocess as pp
from ray_landmark.infer.config import EnsembleConfig, EnsembleModel
from ray_landmark.infer.embed import EmbeddingError, EmbedRequest, embed_splits, read_embeddings
from ray_landmark.infer.report import GalleryEntry, RetrievedImage, read_jpegs, write_report
from ray_landmark.infer.search import knn
from ray_landmark.infer.submission import recognition_submission, retrieval_submission
from ray_landmark.progress import Printer, say
from ray_landmark.train.checkpoint import read_checkpoint_config

SPLITS = ("test", "index", "train")


def data_config(cfg: EnsembleConfig) -> DataConfig:
    """Where GLDv2 lives: the ensemble's data section, else the first model's training config."""
    if cfg.data is not None:
        return cfg.data
    first = cfg.models[0].checkpoint
    return config_from_dict(read_checkpoint_config(first, cfg.storage)["data"], f"{first} (data)", DataConfig)


def embeddings_folder(cfg: EnsembleConfig, model: EnsembleModel) -> Location:
    return resolve(cfg.output_dir, cfg.storage).child("embeddings", model.name)


def embed_models(cfg: EnsembleConfig, data: DataConfig, printer: Printer = say) -> dict[str, dict]:
    """Every model's embeddings of the three splits; shards embedded before are reused."""
    return {
        model.name: embed_splits(
            EmbedRequest(checkpoint=model.checkpoint, out=embeddings_folder(cfg, model).uri, splits=SPLITS,
                         name=model.name, view=cfg.gallery_view, data=data, storage=cfg.storage,
                         **cfg.embed.model_dump()),
            printer,
        )
        for model in cfg.models
    }


# ---------------------------------------------------------------- aligned embeddings


@dataclass
class SplitEmbeddings:
    """One split's rows, the same order for every model: ``ids[i]`` is row i of each ``by_model[name]``."""

    ids: np.ndarray
    by_model: dict[str, np.ndarray]  # float16 [N, D_model]
    excluded: int  # rows dropped because a model's embedding was NaN, infinite or zero


def load_split(cfg: EnsembleConfig, split: str) -> SplitEmbeddings:
    """Align the models' embeddings of one split by image id; a model lacking images the others have is an error
    naming its folder, and a row that is invalid in any model is dropped for all and counted."""
    loaded = {}  # name -> (folder, id -> row, embeddings)
    for model in cfg.models:
        folder = embeddings_folder(cfg, model).child(split)
        ids, embeddings = read_embeddings(folder)
        loaded[model.name] = (folder, pd.Series(np.arange(len(ids)), index=ids), embeddings)
    reference = set(next(iter(loaded.values()))[1].index)
    for folder, position, _ in loaded.values():
        if set(position.index) != reference:
            differ = sorted(set(position.index) ^ reference)
            raise EmbeddingError(f"{folder.uri}: {len(differ)} image ids of split {split} differ from the other "
                                 f"models' (e.g. {differ[0]}); rerun the ensemble to embed the missing shards")
    ids = np.asarray(sorted(reference), dtype=object)
    order = {name: position.loc[ids].to_numpy() for name, (_, position, _) in loaded.items()}
    bad = np.zeros(len(ids), bool)
    for name, (_, _, embeddings) in loaded.items():
        bad |= _invalid_rows(embeddings)[order[name]]
    # One reordered copy per model, bad rows left out.
    by_model = {name: embeddings[order[name][~bad]] for name, (_, _, embeddings) in loaded.items()}
    return SplitEmbeddings(ids[~bad], by_model, int(bad.sum()))


def _invalid_rows(embeddings: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """pp.invalid_rows over float32 chunks, not a float32 copy of the whole split."""
    return np.concatenate([pp.invalid_rows(embeddings[i:i + chunk].astype(np.float32))
                           for i in range(0, len(embeddings), chunk)] or [np.zeros(0, bool)])


# ---------------------------------------------------------------- scoring


TASKS = ("recognition", "retrieval")
TASK_SPLITS = {"recognition": ("test", "train"), "retrieval": ("test", "index")}


@dataclass(frozen=True)
class Stage:
    """A row of the metrics table: one model, one family of several models or the ensemble, for its tasks."""

    what: str
    kind: str  # model, family, ensemble
    tasks: tuple[str, ...]
    members: tuple[EnsembleModel, ...]

    def embeddings(self, splits: dict[str, SplitEmbeddings], split: str) -> np.ndarray:
        """Unit rows of one split: the model's own, or the family-averaged concatenation (§5 step 1). Built when
        needed and dropped after: at GLDv2 scale one stage's train matrix is gigabytes."""
        return pp.combine_families([(m.family, splits[split].by_model[m.name].astype(np.float32))
                                    for m in self.members])


def stages(cfg: EnsembleConfig) -> list[Stage]:
    """Each model alone, each family of several models and the ensemble: the stages the metrics table compares.
    A family or ensemble row of a task combines only the models used for that task."""
    rows = [Stage(f"{m.name} ({m.family})", "model", tuple(m.tasks), (m,)) for m in cfg.models]
    for task in TASKS:
        used = tuple(m for m in cfg.models if task in m.tasks)
        for family in sorted({m.family for m in used}):
            members = tuple(m for m in used if m.family == family)
            if len(members) > 1:
                rows.append(Stage(f"family {family} for {task} ({len(members)} models)", "family", (task,), members))
        rows.append(Stage(f"ensemble for {task}, no post-processing ({len(used)} models)", "ensemble", (task,), used))
    return rows


@dataclass
class Tables:
    """The ground truth and the id lists the scoring needs, read from the manifest."""

    recognition: pd.DataFrame
    retrieval: pd.DataFrame
    test_ids: list[str]
    gallery_landmarks: pd.Series  # train id -> landmark id

    @classmethod
    def read(cls, data: DataConfig, view: str) -> "Tables":
        manifest = open_manifest(data)
        images = manifest.view_images(view)
        landmarks = pd.Series(images["landmark_id"].to_numpy(), index=gldv2.u64_to_ids(images["id"]))
        return cls(manifest.recognition(), manifest.retrieval(), manifest.test()["id"].tolist(), landmarks)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _recognition_predictions(test_ids, landmarks, confidence) -> dict[str, tuple[int, float]]:
    return {i: (int(lm), float(c)) for i, lm, c in zip(test_ids, landmarks, confidence)}


def _read_id_list(uri: str, cfg: EnsembleConfig) -> list[str]:
    try:
        return pd.read_csv(io.BytesIO(read_bytes(resolve(uri, cfg.storage))), dtype=str)["id"].tolist()
    except (KeyError, ValueError) as err:
        raise JobError(f"recognition.nonlandmark.ids {uri}: expected a CSV with an 'id' column ({err})") from None


def _nonlandmark_groups(cfg: EnsembleConfig, tables: Tables, test_ids: np.ndarray) -> list[tuple[str, np.ndarray,
                                                                                                 np.ndarray]]:
    """(what N is, query rows, N rows) per group of test queries; rows index ``test_ids`` (see NonLandmarkSet)."""
    position = {i: n for n, i in enumerate(test_ids)}
    settings = cfg.recognition.nonlandmark
    if settings.source == "ids":
        rows = np.asarray([position[i] for i in _read_id_list(settings.ids, cfg) if i in position], dtype=np.int64)
        if not len(rows):
            raise JobError(f"recognition.nonlandmark.ids {settings.ids}: none of its ids is an embedded test image")
        return [(f"all queries: the {len(rows)} test images listed in {settings.ids}", np.arange(len(test_ids)),
                 rows)]
    truth = tables.recognition.set_index("id")
    usage = truth["usage"].reindex(list(test_ids)).fillna("Ignored").to_numpy()
    is_non_landmark = (truth["landmarks"].fillna("") == "").reindex(list(test_ids)).fillna(False).to_numpy(bool)
    groups = []
    # Private queries are re-ranked with Public's non-landmark images; Public (and unscored) ones with Private's.
    for queries, evidence in ((usage == "Private", "Public"), (usage != "Private", "Private")):
        n_rows = np.flatnonzero(is_non_landmark & (usage == evidence))
        if not len(n_rows):
            raise JobError(f"recognition.nonlandmark: the {evidence} split has no embedded non-landmark test image; "
                           "set recognition.nonlandmark.source: ids and list some")
        scored = "Private" if evidence == "Public" else "Public and Ignored"
        groups.append((f"{scored} queries: the {len(n_rows)} {evidence} non-landmark test images",
                       np.flatnonzero(queries), n_rows))
    return groups


def recognize_with_reranking(cfg: EnsembleConfig, tables: Tables, test: np.ndarray, train: np.ndarray,
                             test_ids: np.ndarray, gallery_labels: np.ndarray, device: str) -> tuple[dict, list[str]]:
    """solution.md §5 recognition step 3 on the ensemble embedding (``test``, ``train``: its unit rows); returns the
    predictions and what N was."""
    rc = cfg.recognition
    scores, indices = knn(test, train, rc.neighbours, device=device)
    landmarks = np.zeros(len(test_ids), np.int64)
    confidence = np.zeros(len(test_ids), np.float32)
    notes = []
    for description, queries, n_rows in _nonlandmark_groups(cfg, tables, test_ids):
        if not len(queries):
            continue
        n_embeddings = test[n_rows]
        bias = pp.nonlandmark_bias(knn(train, n_embeddings, rc.gallery_nonlandmark_k, device=device)[0],
                                   rc.gallery_nonlandmark_k)
        query_n, _ = knn(test[queries], n_embeddings, rc.query_nonlandmark_k, device=device)
        landmarks[queries], confidence[queries] = pp.recognize(
            scores[queries], indices[queries], gallery_labels, bias, query_n, rc.top_k, rc.query_nonlandmark_k)
        notes.append(f"non-landmark set for {description}")
    if len(notes) > 1:
        notes.append("Public and Private confidences are lowered by different non-landmark sets, so the combined GAP "
                     "mixes two scales; Kaggle scores them apart (gap_public, gap_private)")
    return _recognition_predictions(test_ids, landmarks, confidence), notes


def retrieve_with_reranking(cfg: EnsembleConfig, splits: dict[str, SplitEmbeddings], gallery_labels: np.ndarray,
                            device: str) -> tuple[np.ndarray, np.ndarray]:
    """solution.md §5 retrieval steps 1-4: per model, the query's ``rerank_pool`` nearest index images are soft
    re-ranked by the labels of the query and the index images (top label_k train neighbours) and cut to per_model;
    weighted, summed over models, top out_k. The pool is wider than per_model so that a same-label image just below
    the cut can move up into it (c_j adds up to label_k)."""
    rt = cfg.retrieval
    reranked = []
    for model in (m for m in cfg.models if "retrieval" in m.tasks):
        stage = Stage(model.name, "model", ("retrieval",), (model,))
        test, index, train = (stage.embeddings(splits, s) for s in ("test", "index", "train"))
        scores, indices = knn(test, index, max(rt.rerank_pool, rt.per_model), device=device)
        query_labels, _ = pp.label_by_neighbours(*knn(test, train, rt.label_k, device=device),
                                                 gallery_labels, top_k=rt.label_k)
        index_labels, index_confidence = pp.label_by_neighbours(
            *knn(index, train, rt.label_k, device=device), gallery_labels, top_k=rt.label_k)
        del train
        scores, indices = pp.soft_rerank(scores, indices, query_labels, index_labels, index_confidence,
                                         rt.same_factor, rt.other_factor)
        reranked.append((scores[:, :rt.per_model] * model.weight, indices[:, :rt.per_model]))
    return pp.fuse_models(reranked, rt.per_model, rt.out_k)


def _use_cpus(cpus: int) -> None:
    """Ray sets one thread for a 1-CPU task: let torch and faiss use the CPUs the task holds."""
    torch.set_num_threads(cpus)
    try:
        import faiss

        faiss.omp_set_num_threads(cpus)
    except ImportError:
        pass  # the torch backend needs nothing else


def score(cfg: EnsembleConfig, data: DataConfig) -> dict:
    """Everything after the embeddings: metrics per stage, predictions, submissions. Runs where it is called (a Ray
    task in ``run_ensemble``); writes the submissions and returns what the report needs. Each stage's embeddings are
    built when its metrics are computed and dropped after, so memory holds the models' float16 rows and one stage."""
    device = _device()
    _use_cpus(max(1, int(cfg.score_cpus)))
    tables = Tables.read(data, cfg.gallery_view)
    splits = {s: load_split(cfg, s) for s in SPLITS}
    test_ids, index_ids, train_ids = (splits[s].ids for s in SPLITS)
    known = tables.gallery_landmarks.index
    outside = ~pd.Index(train_ids).isin(known)
    if outside.any():
        raise EmbeddingError(f"train embeddings hold {int(outside.sum())} images outside the {cfg.gallery_view} view "
                             f"(e.g. {train_ids[outside][0]}): embed the train split with view {cfg.gallery_view}")
    gallery_labels = tables.gallery_landmarks.loc[list(train_ids)].to_numpy(np.int64)

    rows: list[dict] = []
    for stage in stages(cfg):
        row: dict = {"what": stage.what, "kind": stage.kind}
        if "recognition" in stage.tasks:
            test, train = (stage.embeddings(splits, s) for s in TASK_SPLITS["recognition"])
            s, i = knn(test, train, cfg.recognition.neighbours, device=device)
            landmarks, confidence = pp.recognize(s, i, gallery_labels, top_k=cfg.recognition.top_k)
            row.update(recognition_metrics(_recognition_predictions(test_ids, landmarks, confidence),
                                           tables.recognition))
            if stage.kind == "ensemble":
                recognized, notes = recognize_with_reranking(cfg, tables, test, train, test_ids, gallery_labels,
                                                             device)
            del train
        if "retrieval" in stage.tasks:
            test, index = (stage.embeddings(splits, s) for s in TASK_SPLITS["retrieval"])
            _, i = knn(test, index, cfg.retrieval.out_k, device=device)
            row.update(retrieval_metrics(dict(zip(test_ids, pp.ranked_ids(i, index_ids))), tables.retrieval))
        rows.append(row)

    _, fused = retrieve_with_reranking(cfg, splits, gallery_labels, device)
    retrieved = dict(zip(test_ids, pp.ranked_ids(fused, index_ids)))
    final = {"what": "ensemble with post-processing", "kind": "final",
             **recognition_metrics(recognized, tables.recognition), **retrieval_metrics(retrieved, tables.retrieval)}
    rows.append(final)

    out = resolve(cfg.output_dir, cfg.storage)
    recognition_submission(tables.test_ids, recognized, out.child("submission_recognition.csv"))
    retrieval_submission(tables.test_ids, retrieved, out.child("submission_retrieval.csv"))
    excluded = {s: splits[s].excluded for s in SPLITS if splits[s].excluded}
    if excluded:
        notes.append(f"images excluded because a model's embedding was NaN, infinite or zero: {excluded}")
    missing = len(set(tables.test_ids) - set(test_ids))
    if missing:
        notes.append(f"{missing} test images have no embedding: they get no prediction (and count as misses)")
    notes.append(f"search on {device}; gallery: {len(train_ids):,} {cfg.gallery_view} train images; "
                 f"index: {len(index_ids):,}; queries: {len(test_ids):,}")
    return {"rows": rows, "notes": notes, "recognized": recognized,
            "retrieved": {q: r[:cfg.report.results] for q, r in retrieved.items()}}


# ---------------------------------------------------------------- the job


TABLE_COLUMNS = ("gap", "gap_public", "gap_private", "top1", "map100", "map100_public", "map100_private", "mp10")


def metrics_text(rows: list[dict]) -> str:
    """The metrics table for a terminal: one line per stage, a dash where a stage has no such metric."""
    width = max(len(r["what"]) for r in rows)
    lines = [f"{'':<{width}}  " + " ".join(f"{c:>14}" for c in TABLE_COLUMNS)]
    for r in rows:
        cells = (f"{r[c]:>14.4f}" if r.get(c) is not None else f"{'-':>14}" for c in TABLE_COLUMNS)
        lines.append(f"{r['what']:<{width}}  " + " ".join(cells))
    return "\n".join(lines)


def _gallery(cfg: EnsembleConfig, data: DataConfig, scored: dict) -> list[GalleryEntry]:
    """Sampled scored test queries, landmark and non-landmark alike, with their thumbnails."""
    manifest = open_manifest(data)
    recognition = manifest.recognition()
    truth = recognition[recognition["usage"] != "Ignored"].set_index("id")
    relevant = manifest.retrieval().set_index("id")["images"].fillna("").str.split()
    chosen = [i for i in truth.index if i in scored["recognized"]]
    rng = np.random.default_rng(cfg.report.seed)
    chosen = sorted(rng.choice(chosen, size=min(cfg.report.queries, len(chosen)), replace=False).tolist())
    shown = {q: scored["retrieved"].get(q, []) for q in chosen}
    root = resolve(data.root, data.storage)
    queries = read_jpegs(root.child("test"), chosen)
    index = read_jpegs(root.child("index"), {i for r in shown.values() for i in r})
    entries = []
    for q in chosen:
        landmark, confidence = scored["recognized"][q]
        truth_landmarks = tuple(int(x) for x in str(truth.at[q, "landmarks"] or "").split())
        relevant_q = set(relevant.get(q, []) or [])
        entries.append(GalleryEntry(
            query_id=q, usage=str(truth.at[q, "usage"]), true_landmarks=truth_landmarks,
            predicted_landmark=landmark, confidence=confidence, query_jpeg=queries.get(q),
            retrieved=[RetrievedImage(i, i in relevant_q, index.get(i)) for i in shown[q]],
        ))
    return entries


def run_ensemble(cfg: EnsembleConfig, printer: Printer = say) -> dict:
    """Embed, score, write the submissions, ``report.html`` and ``summary.json`` under ``cfg.output_dir``."""
    data = data_config(cfg)
    embedded = embed_models(cfg, data, printer)
    printer(f"[ensemble] scoring {len(cfg.models)} models" + (" on a GPU" if cfg.score_gpus else ""))
    task = ray.remote(score).options(num_gpus=cfg.score_gpus, num_cpus=cfg.score_cpus, max_retries=0)
    scored = ray.get(task.remote(cfg, data))
    out = resolve(cfg.output_dir, cfg.storage)
    report = out.child("report.html")
    metric_rows = [{"what": r["what"], **{c: r.get(c) for c in TABLE_COLUMNS}} for r in scored["rows"]]
    write_report(report, title=f"Ensemble {cfg.name}", metrics=metric_rows, notes=scored["notes"],
                 gallery=_gallery(cfg, data, scored),
                 info={"output": out.uri, "models": ", ".join(m.name for m in cfg.models)})
    final = scored["rows"][-1]
    summary = {
        "name": cfg.name,
        "gap": final.get("gap"), "map100": final.get("map100"),
        "final": final,
        "models": {m.name: row for m, row in zip(cfg.models, (r for r in scored["rows"] if r["kind"] == "model"))},
        "stages": scored["rows"],
        "notes": scored["notes"],
        "embeddings": embedded,
        "report": report.uri,
        "submissions": [out.child("submission_recognition.csv").uri, out.child("submission_retrieval.csv").uri],
    }
    write_bytes(out.child("summary.json"), json.dumps(summary, indent=2, default=str).encode())
    return summary
