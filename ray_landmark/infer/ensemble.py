"""The ensemble job: embeddings of every model -> kNN -> the 2021 method's post-processing (arXiv 2110.03786, in
``infer.postprocess``) -> official metrics, Kaggle submissions, ``report.html`` and ``summary.json``.

    1. embed: each model's test, index and train (gallery view) images, reusing the shards already embedded;
    2. score (a Ray task: on a GPU when ``score_gpus`` asks for one): align the models' rows by image id, drop and count
       invalid rows, then for each model alone, each family and the ensemble: recognition by train kNN and retrieval
       by index kNN; then each post-processing step alone and all together (non-landmark bias b_j, query penalty;
       per-model score sum, label-aware soft re-ranking); metrics per stage, Private and Public apart; the two
       submission files;
    3. report: the metrics table and a gallery of sampled queries with thumbnails read from the shards.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import ray
import torch

from ray_landmark.config import config_from_dict
from ray_landmark.data import gldv2
from ray_landmark.data.config import DataConfig
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.storage import Location, StorageError, check_writable, read_bytes, resolve, write_bytes
from ray_landmark.errors import JobError
from ray_landmark.eval.metrics import recognition_metrics, retrieval_metrics
from ray_landmark.eval.search import knn, knn_clock
from ray_landmark.infer import postprocess as pp
from ray_landmark.infer.config import EnsembleConfig, EnsembleModel, Expansion, RetrievalSettings
from ray_landmark.infer.embed import EmbeddingError, EmbedRequest, embed_splits, read_embeddings, read_info
from ray_landmark.infer.index_additions import check_additions, read_additions
from ray_landmark.infer.report import GalleryEntry, RetrievedImage, read_jpegs, write_report
from ray_landmark.infer.submission import recognition_submission, retrieval_submission
from ray_landmark.progress import Printer, say
from ray_landmark.runs.checkpoint import checkpoint_folder, read_checkpoint_config
from ray_landmark.runs.folders import output_folder

# gldv2.SPLITS in the order they are embedded and checked: the small test split first, so that its embeddings, and any
# problem in the pipeline, come in minutes, not after the train split's hours.
EMBED_ORDER = ("test", "index", "train")


def data_config(cfg: EnsembleConfig) -> DataConfig:
    """Where GLDv2 lives: the ensemble's data section, else the first model's training config."""
    if cfg.data is not None:
        return cfg.data
    first = cfg.models[0].checkpoint
    return config_from_dict(read_checkpoint_config(first, cfg.storage)["data"], f"{first} (data)", DataConfig)


def check_models(cfg: EnsembleConfig, printer: Printer = say) -> dict[str, str]:
    """Every model's checkpoint (a run folder's newest verified one, or a checkpoint folder, verified) and its config,
    and the output folder, checked before the first model is embedded: model name -> its checkpoint's URI. A
    missing or damaged checkpoint of the ninth model fails here, not after eight models' embeddings."""
    check_writable(output_folder(cfg), "output_dir")
    resolved = {}
    for model in cfg.models:
        try:
            folder = checkpoint_folder(model.checkpoint, cfg.storage, printer)
            config_from_dict(read_checkpoint_config(folder.uri, cfg.storage), f"{folder.uri} (config.json)")
        except JobError as err:
            raise JobError(f"models[{model.name}].checkpoint: {err}") from None
        resolved[model.name] = folder.uri
    return resolved


def embeddings_folder(cfg: EnsembleConfig, model: EnsembleModel) -> Location:
    return output_folder(cfg).child("embeddings", model.name)


def embed_models(cfg: EnsembleConfig, data: DataConfig, printer: Printer = say) -> dict[str, dict]:
    """Every model's embeddings of the three splits; shards embedded before are reused."""
    return {
        model.name: embed_splits(
            EmbedRequest(checkpoint=model.checkpoint, out=embeddings_folder(cfg, model).uri, splits=EMBED_ORDER,
                         name=model.name, view=cfg.gallery_view, data=data, storage=cfg.storage, settings=cfg.embed),
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
    excluded_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    additions: int = 0  # index split: the entries of the service's additions log its last rows are


def load_split(cfg: EnsembleConfig, split: str) -> SplitEmbeddings:
    """Align the models' embeddings of one split by image id; a model lacking images the others have is an error
    naming its folder, and a row that is invalid in any model is dropped for all and counted. The index split ends
    with the images the service added after the run (``infer.index_additions``), in the order they were added."""
    folders = {m.name: embeddings_folder(cfg, m).child(split) for m in cfg.models}
    rows = load_aligned(folders, f"split {split}")
    if split != "index":
        return rows
    additions = read_additions(cfg)
    if not additions:
        return rows
    check_additions(cfg, additions, {name: read_info(folder)["checkpoint"] for name, folder in folders.items()},
                    set(rows.ids))
    return replace(rows, ids=np.concatenate([rows.ids, *(np.asarray(a.ids, dtype=object) for a in additions)]),
                   by_model={name: np.concatenate([e, *(a.by_model[name] for a in additions)])
                             for name, e in rows.by_model.items()},
                   additions=additions[-1].number)


def load_aligned(folders: dict[str, Location], what: str) -> SplitEmbeddings:
    """:func:`load_split` for any folders, one per model name: rows aligned by image id, invalid rows dropped."""
    loaded = {}  # name -> (folder, id -> row, embeddings)
    for name, folder in folders.items():
        ids, embeddings = read_embeddings(folder)
        loaded[name] = (folder, pd.Series(np.arange(len(ids)), index=ids), embeddings)
    reference = set(next(iter(loaded.values()))[1].index)
    for folder, position, _ in loaded.values():
        if set(position.index) != reference:
            differ = sorted(set(position.index) ^ reference)
            raise EmbeddingError(f"{folder.uri}: {len(differ)} image ids of {what} differ from the other "
                                 f"models' (e.g. {differ[0]}); rerun the ensemble to embed the missing shards")
    ids = np.asarray(sorted(reference), dtype=object)
    order = {name: position.loc[ids].to_numpy() for name, (_, position, _) in loaded.items()}
    bad = np.zeros(len(ids), bool)
    for name, (_, _, embeddings) in loaded.items():
        bad |= _invalid_rows(embeddings)[order[name]]
    # One reordered copy per model, bad rows left out.
    by_model = {name: embeddings[order[name][~bad]] for name, (_, _, embeddings) in loaded.items()}
    return SplitEmbeddings(ids[~bad], by_model, int(bad.sum()), ids[bad])


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
        """Unit rows of one split: the model's own, or the weighted family-averaged concatenation (step 1 of the
        method's recognition). Built when needed and dropped after: at GLDv2 scale one stage's train matrix is
        gigabytes."""
        return pp.combine_families([(m.family, splits[split].by_model[m.name].astype(np.float32))
                                    for m in self.members], [m.weight for m in self.members])


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


def search_device() -> str:
    """Where the searches run: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _recognition_predictions(test_ids, landmarks, confidence) -> dict[str, tuple[int, float]]:
    return {i: (int(lm), float(c)) for i, lm, c in zip(test_ids, landmarks, confidence)}


def _read_csv(uri: str, cfg: EnsembleConfig, key: str, columns: tuple[str, ...]) -> pd.DataFrame:
    try:
        table = pd.read_csv(io.BytesIO(read_bytes(resolve(uri, cfg.storage))), dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise JobError(f"recognition.nonlandmark.{key} {uri}: cannot read it as a CSV ({err})") from None
    table.columns = [c.lower() for c in table.columns]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise JobError(f"recognition.nonlandmark.{key} {uri}: no column {', '.join(missing)} (has "
                       f"{', '.join(table.columns)})")
    return table


@dataclass
class NonLandmarkGroup:
    """Test queries re-ranked with one non-landmark set: ``queries`` rows of the test split, ``members`` rows of the
    loaded N (:func:`load_nonlandmark`)."""

    description: str
    queries: np.ndarray
    members: np.ndarray


def _nonlandmark_ids(cfg: EnsembleConfig, tables: Tables) -> tuple[list[str], str]:
    """The ids of N and a description, for the ``split`` and ``ids`` sources."""
    settings = cfg.recognition.nonlandmark
    if settings.source == "ids":
        ids = _read_csv(settings.ids, cfg, "ids", ("id",))["id"].tolist()
        if not ids:
            raise JobError(f"recognition.nonlandmark.ids {settings.ids}: the list is empty")
        where = settings.embeddings or f"the {settings.ids_split} split"
        return ids, f"the {len(ids):,} images listed in {settings.ids} (embeddings: {where})"
    if settings.ground_truth:
        truth, name = _read_csv(settings.ground_truth, cfg, "ground_truth", ("id", "landmarks", "usage")), \
            settings.ground_truth
    else:
        truth, name = tables.recognition, "the manifest's recognition ground truth"
    rows = truth[(truth["landmarks"].fillna("").astype(str).str.strip() == "") & truth["usage"].isin(settings.usages)]
    if not len(rows):
        raise JobError(f"recognition.nonlandmark: {name} has no non-landmark rows of usage "
                       f"{', '.join(settings.usages)}; set recognition.nonlandmark.source: ids and list some")
    return rows["id"].astype(str).tolist(), (f"the {len(rows):,} non-landmark test images of {name} "
                                            f"({', '.join(settings.usages)})")


def load_nonlandmark(cfg: EnsembleConfig, tables: Tables,
                     splits: dict[str, SplitEmbeddings]) -> tuple[SplitEmbeddings, list[NonLandmarkGroup]]:
    """Every model's rows of the non-landmark set N (see ``NonLandmarkSet``) and the groups of test queries they
    re-rank. A listed image without an embedding is an error, never a silently smaller N."""
    settings = cfg.recognition.nonlandmark
    test_ids = splits["test"].ids
    if settings.source == "cross_usage":
        truth = tables.recognition.set_index("id")
        usage = truth["usage"].reindex(list(test_ids)).fillna("Ignored").to_numpy()
        non_landmark = (truth["landmarks"].fillna("") == "").reindex(list(test_ids)).fillna(False).to_numpy(bool)
        source, groups = splits["test"], []
        # Private queries are re-ranked with Public's non-landmark images; Public (and unscored) ones with Private's.
        for queries, evidence in ((usage == "Private", "Public"), (usage != "Private", "Private")):
            members = np.flatnonzero(non_landmark & (usage == evidence))
            scored = "Private" if evidence == "Public" else "Public and Ignored"
            groups.append(NonLandmarkGroup(f"{scored} queries: the {len(members):,} {evidence} non-landmark test "
                                           "images (cross_usage)", np.flatnonzero(queries), members))
        return source, [g for g in groups if len(g.queries)]
    ids, description = _nonlandmark_ids(cfg, tables)
    if settings.source == "ids" and settings.embeddings:
        root = resolve(settings.embeddings, cfg.storage)
        try:
            source = load_aligned({m.name: root.child(m.name) for m in cfg.models}, "the non-landmark set")
        except StorageError as err:
            raise JobError(f"recognition.nonlandmark.embeddings: {err}; embed N with each model into "
                           f"{root.uri}/<model name>") from None
    else:
        source = splits[settings.ids_split if settings.source == "ids" else "test"]
    position = pd.Series(np.arange(len(source.ids)), index=source.ids)
    # An image whose embedding was invalid is already dropped and counted; one never embedded is an error.
    ids = pd.Index(ids).difference(source.excluded_ids, sort=False)
    unknown = ids.difference(position.index)
    if len(unknown):
        key = "embeddings" if settings.embeddings else ("ids" if settings.source == "ids" else "source")
        raise JobError(f"recognition.nonlandmark.{key}: {len(unknown):,} of the {len(ids):,} images of N have no "
                       f"embedding (e.g. {unknown[0]}); embed them, or drop them from the list")
    rows = np.sort(position.loc[ids.unique()].to_numpy())
    nonlandmark = SplitEmbeddings(source.ids[rows], {name: e[rows] for name, e in source.by_model.items()}, 0)
    return nonlandmark, [NonLandmarkGroup(f"all queries: {description}", np.arange(len(test_ids)),
                                          np.arange(len(rows)))]


def own_rows(ids: np.ndarray, members: np.ndarray) -> np.ndarray:
    """int64 [len(ids)]: the position in ``members`` (ids of N) of each image that is itself in N, -1 elsewhere."""
    position = pd.Series(np.arange(len(members)), index=members)
    return position.reindex(list(ids)).fillna(-1).to_numpy(np.int64)


def _check_nonlandmark_size(cfg: EnsembleConfig, group: NonLandmarkGroup, self_excluded: bool) -> None:
    """N must outnumber every k (by one more when gallery images are in N), so that no mean is over fewer images
    than k and none degenerates into the mean of all of N."""
    rc = cfg.recognition
    need = max(rc.gallery_nonlandmark_k, rc.query_nonlandmark_k) + self_excluded
    if len(group.members) <= need:
        raise JobError(
            f"recognition.nonlandmark (source {rc.nonlandmark.source}): {len(group.members)} non-landmark images for "
            f"{group.description.split(':')[0]}; b_j and the query penalty need more than {need} "
            f"(gallery_nonlandmark_k {rc.gallery_nonlandmark_k}, query_nonlandmark_k {rc.query_nonlandmark_k}"
            + (", +1 for the image left out when a gallery image is in N)" if self_excluded else ")")
            + "; use a larger N or smaller k")


# The recognition ablation: each post-processing step alone, then both (the method).
RECOGNITION_ABLATION = (("bias",), ("penalty",), ("bias", "penalty"))
STEP_NAMES = {"bias": "b_j", "penalty": "query penalty"}


def recognize_with_reranking(cfg: EnsembleConfig, test: np.ndarray, train: np.ndarray, nonlandmark: np.ndarray,
                             splits: dict[str, SplitEmbeddings], groups: list[NonLandmarkGroup],
                             gallery_labels: np.ndarray,
                             device: str) -> dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]]:
    """The ensemble's recognition with each step set of :data:`RECOGNITION_ABLATION`: steps -> (landmarks,
    confidence) per test row. ``test``, ``train``, ``nonlandmark``: the ensemble stage's unit rows of the test split,
    the gallery and N. Each group's b_j and penalties are computed once and shared by the step sets."""
    n_test = len(test)
    out = {steps: (np.zeros(n_test, np.int64), np.zeros(n_test, np.float32)) for steps in RECOGNITION_ABLATION}
    for group in groups:
        members = splits["nonlandmark"].ids[group.members]
        query_rows = own_rows(splits["test"].ids[group.queries], members)
        gallery_rows = own_rows(splits["train"].ids, members)
        _check_nonlandmark_size(cfg, group, bool((gallery_rows >= 0).any()))
        n = nonlandmark[group.members]
        queries = test[group.queries]
        rc = cfg.recognition
        bias = pp.nonlandmark_bias(train, n, rc.gallery_nonlandmark_k, gallery_rows=gallery_rows, device=device)
        penalty = pp.query_penalty(queries, n, rc.query_nonlandmark_k, query_rows=query_rows, device=device)
        for steps in RECOGNITION_ABLATION:
            landmarks, confidence = out[steps]
            landmarks[group.queries], confidence[group.queries] = pp.recognize(
                queries, train, gallery_labels, rc, bias=bias, penalty=penalty, query_rows=query_rows, steps=steps,
                device=device)
    return out


def retrieve_with_reranking(cfg: EnsembleConfig, splits: dict[str, SplitEmbeddings], gallery_labels: np.ndarray,
                            device: str, rerank: bool = True, settings: RetrievalSettings | None = None,
                            labelled: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The method's retrieval by :func:`postprocess.retrieve` over the retrieval models, one model's rows in memory
    at a time; ``rerank`` False: the weighted score sum alone. ``settings``: the config's retrieval section unless
    an ablation flips one of its choices. ``labelled``: a dict the caller keeps across calls, in which each labelling
    of the queries and the index (the ensemble embedding's, each model's own) is computed once: the labels depend on
    neither the expansions nor the boost, so the report's ablations re-rank with the same ones."""
    settings = settings or cfg.retrieval
    used = tuple(m for m in cfg.models if "retrieval" in m.tasks)
    labelled = {} if labelled is None else labelled

    def rows_of(stage: Stage) -> tuple[np.ndarray, ...]:
        return tuple(stage.embeddings(splits, s) for s in ("test", "index", "train"))

    def labels(stage: Stage, rows: tuple[np.ndarray, ...] | None = None):
        """The stage's labelling, computed from its (test, index, train) rows (``rows`` where built already) on the
        first call of its key."""
        key = (stage.kind, stage.what, settings.label_k)
        if key not in labelled:
            labelled[key] = pp.query_and_index_labels(*(rows or rows_of(stage)), gallery_labels, settings.label_k,
                                                      device=device)
        return labelled[key]

    shared = None
    if rerank and settings.labels == "ensemble":
        shared = labels(Stage("ensemble", "ensemble", ("retrieval",), used))

    def models():
        for model in used:
            stage = Stage(model.name, "model", ("retrieval",), (model,))
            rows = rows_of(stage)
            query_labels, index_labels = (shared or labels(stage, rows)) if rerank else (None, None)
            yield pp.RetrievalModel(*rows, weight=model.weight, index_labels=index_labels, query_labels=query_labels)

    return pp.retrieve(models(), gallery_labels, settings, rerank=rerank, device=device)


def retrieval_alternatives(settings: RetrievalSettings, index_size: int) -> list[tuple[str, RetrievalSettings]]:
    """The report's retrieval ablation: each open choice of the method, and each expansion, flipped alone (row name,
    settings). An expansion whose k does not fit the index is left out."""
    flips = [("labels", {"model": "ensemble", "ensemble": "model"},
              {"model": "each model's own labels", "ensemble": "labels from the ensemble embedding"}),
             ("boost", {"sum": "mean", "mean": "sum"},
              {"sum": "c_j as a sum of cosines", "mean": "c_j as a mean of cosines"})]
    rows = [(f"ensemble for retrieval, {names[flip[getattr(settings, key)]]}",
             settings.model_copy(update={key: flip[getattr(settings, key)]})) for key, flip, names in flips]
    for key in ("qe", "dba"):
        expansion = getattr(settings, key)
        flipped = expansion.model_copy(update={"enabled": not expansion.enabled})
        if flipped.enabled and not expansion_fits(key, flipped.k, index_size):
            continue
        what = f"with {expansion_text(key, flipped)}" if flipped.enabled else f"without {EXPANSION_NAMES[key]}"
        rows.append((f"ensemble for retrieval, {what}", settings.model_copy(update={key: flipped})))
    return rows


# The expansions by their settings' key, as report rows name them.
EXPANSION_NAMES = {"qe": "alpha-QE", "dba": "DBA"}


def expansion_text(key: str, expansion: Expansion) -> str:
    """An enabled expansion as report rows name it: ``alpha-QE (k 10, alpha 3)``."""
    return f"{EXPANSION_NAMES[key]} (k {expansion.k}, alpha {expansion.alpha:g})"


def expansion_fits(key: str, k: int, index_size: int) -> bool:
    """Whether retrieval.qe or retrieval.dba can take k neighbours (DBA's are other index images than itself)."""
    return k + (key == "dba") <= index_size


def check_expansions(settings, index_size: int, names: dict[str, str] | None = None, index: str = "the index") -> None:
    """An enabled ``settings.qe`` or ``settings.dba`` whose k the index cannot give: one line naming what set it
    (``names``: key -> that name; default the ensemble config's keys, retrieval.qe.k and retrieval.dba.k)."""
    for key in ("qe", "dba"):
        expansion = getattr(settings, key)
        if expansion.enabled and not expansion_fits(key, expansion.k, index_size):
            name = names[key] if names else f"retrieval.{key}.k"
            raise JobError(f"{name} {expansion.k} is larger than {index} allows ({index_size:,} images"
                           + (", each with itself left out" if key == "dba" else "") + "); lower it")


def use_cpus(cpus: int) -> None:
    """Ray sets one thread for a 1-CPU task: let torch and faiss use the CPUs the task holds."""
    torch.set_num_threads(cpus)
    try:
        import faiss

        faiss.omp_set_num_threads(cpus)
    except ImportError:
        pass  # the torch backend needs nothing else


def score(cfg: EnsembleConfig, data: DataConfig) -> dict:
    """Everything after the embeddings: metrics per stage and per post-processing step, predictions, submissions.
    Runs where it is called (a Ray task in ``run_ensemble``); writes the submissions and returns what the report
    needs. Each stage's embeddings are built when its metrics are computed and dropped after, so memory holds the
    models' float16 rows and one stage. Its ``seconds``: the scoring's wall time and how much of it was exact
    search (every kNN of the metrics, the post-processing and the ablations)."""
    started, searched = time.perf_counter(), knn_clock()
    device = search_device()
    use_cpus(max(1, int(cfg.score_cpus)))
    tables = Tables.read(data, cfg.gallery_view)
    splits = {s: load_split(cfg, s) for s in gldv2.SPLITS}
    test_ids, index_ids, train_ids = splits["test"].ids, splits["index"].ids, splits["train"].ids
    check_expansions(cfg.retrieval, len(index_ids))
    known = tables.gallery_landmarks.index
    outside = ~pd.Index(train_ids).isin(known)
    if outside.any():
        raise EmbeddingError(f"train embeddings hold {int(outside.sum())} images outside the {cfg.gallery_view} view "
                             f"(e.g. {train_ids[outside][0]}): embed the train split with view {cfg.gallery_view}")
    gallery_labels = tables.gallery_landmarks.loc[list(train_ids)].to_numpy(np.int64)
    splits["nonlandmark"], groups = load_nonlandmark(cfg, tables, splits)

    def recognition_row(landmarks, confidence) -> dict:
        return headline_metrics(recognition_metrics(_recognition_predictions(test_ids, landmarks, confidence),
                                             tables.recognition))

    def retrieval_row(indices) -> dict:
        return headline_metrics(retrieval_metrics(dict(zip(test_ids, pp.ranked_ids(indices, index_ids))), tables.retrieval))

    compared = stages(cfg)
    ensemble_recognition = next(s for s in compared if s.kind == "ensemble" and "recognition" in s.tasks)
    # steps -> (landmarks, confidence): the ensemble's recognition re-ranked with each step set of the ablation,
    # computed in the loop below while that stage's test and gallery rows are in memory.
    reranked: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
    rows: list[dict] = []
    for stage in compared:
        row: dict = {"what": stage.what, "kind": stage.kind}
        if "recognition" in stage.tasks:
            test, train = (stage.embeddings(splits, s) for s in TASK_SPLITS["recognition"])
            row.update(recognition_row(*pp.recognize(test, train, gallery_labels, cfg.recognition, steps=(),
                                                     device=device)))
            if stage is ensemble_recognition:
                reranked = recognize_with_reranking(
                    cfg, test, train, stage.embeddings(splits, "nonlandmark"), splits, groups, gallery_labels, device)
            del test, train
        if "retrieval" in stage.tasks:
            test, index = (stage.embeddings(splits, s) for s in TASK_SPLITS["retrieval"])
            row.update(retrieval_row(knn(test, index, cfg.retrieval.out_k, device=device)[1]))
        rows.append(row)

    for steps in RECOGNITION_ABLATION[:-1]:  # the last, every step, is the final row
        rows.append({"what": f"ensemble for recognition, {STEP_NAMES[steps[0]]} alone", "kind": "ablation",
                     **recognition_row(*reranked[steps])})
    rows.append({"what": "ensemble for retrieval, per-model score sum without label re-rank", "kind": "ablation",
                 **retrieval_row(retrieve_with_reranking(cfg, splits, gallery_labels, device, rerank=False)[1])})
    labelled: dict = {}  # each labelling of the queries and the index, computed once for every re-ranked retrieval
    for what, settings in retrieval_alternatives(cfg.retrieval, len(index_ids)) if cfg.retrieval.ablations else ():
        rows.append({"what": what, "kind": "ablation", **retrieval_row(
            retrieve_with_reranking(cfg, splits, gallery_labels, device, settings=settings, labelled=labelled)[1])})
    _, fused = retrieve_with_reranking(cfg, splits, gallery_labels, device, labelled=labelled)
    landmarks, confidence = reranked[RECOGNITION_ABLATION[-1]]
    recognized = _recognition_predictions(test_ids, landmarks, confidence)
    retrieved = dict(zip(test_ids, pp.ranked_ids(fused, index_ids)))
    rows.append({"what": "ensemble with post-processing", "kind": "final", **recognition_row(landmarks, confidence),
                 **retrieval_row(fused)})

    out = output_folder(cfg)
    recognition_submission(tables.test_ids, recognized, out.child("submission_recognition.csv"))
    retrieval_submission(tables.test_ids, retrieved, out.child("submission_retrieval.csv"))
    notes = [f"non-landmark set for {g.description}" for g in groups]
    in_n = sum(int(np.isin(test_ids[g.queries], splits["nonlandmark"].ids[g.members]).sum()) for g in groups)
    if in_n:
        notes.append(f"{in_n:,} test queries are in the non-landmark set themselves: each is left out of its own "
                     "penalty and of the b_j it meets, so no query is its own evidence")
    notes.append("Kaggle scores Public and Private apart, and Private is the score that counts; *_pooled scores both "
                 "usages together" + (", whose confidences were lowered by different non-landmark sets, so pooled "
                                      "GAP mixes two scales" if len(groups) > 1 else ""))
    excluded = {s: splits[s].excluded for s in gldv2.SPLITS if splits[s].excluded}
    if excluded:
        notes.append(f"images excluded because a model's embedding was NaN, infinite or zero: {excluded}")
    missing = len(set(tables.test_ids) - set(test_ids))
    if missing:
        notes.append(f"{missing} test images have no embedding: they get no prediction (and count as misses)")
    notes.append(f"search on {device}; gallery: {len(train_ids):,} {cfg.gallery_view} train images; "
                 f"index: {len(index_ids):,}; queries: {len(test_ids):,}; recognition's top {cfg.recognition.top_k} "
                 "after the non-landmark adjustment are exact over the whole gallery")
    now = knn_clock()
    seconds = {"scoring": round(time.perf_counter() - started, 2),
               "knn": round(now["seconds"] - searched["seconds"], 2),
               "knn_searches": now["searches"] - searched["searches"]}
    return {"rows": rows, "notes": notes, "recognized": recognized, "seconds": seconds,
            "retrieved": {q: r[:cfg.report.results] for q, r in retrieved.items()}}


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics with the usages pooled renamed ``*_pooled``: the plain names would read as the score."""
    return {(f"{k}_pooled" if k in POOLED else k): v for k, v in metrics.items()}


# ---------------------------------------------------------------- the job


POOLED = ("gap", "top1", "map100", "mp5", "mp10")
# Private first: it is the score that counts on Kaggle; the pooled figures last.
TABLE_COLUMNS = ("gap_private", "gap_public", "map100_private", "map100_public", "top1_private", "mp10_private",
                 "gap_pooled", "map100_pooled")
HEADLINE = ("gap_private", "gap_public", "map100_private", "map100_public")


def headline_text(row: dict) -> str:
    """One line of a row's headline metrics, Private first."""
    return ", ".join(f"{key} {row[key]:.4f}" for key in HEADLINE if row.get(key) is not None)


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


def run_ensemble(cfg: EnsembleConfig, printer: Printer = say, models_checked: bool = False) -> dict:
    """Embed, score, write the submissions, ``report.html`` and ``summary.json`` under ``<output_dir>/<name>``;
    every model is checked first (``check_models``) unless the caller did (``models_checked``)."""
    if not models_checked:
        check_models(cfg, printer)
    data = data_config(cfg)
    check_expansions(cfg.retrieval, len(open_manifest(data).index()))  # before embedding: the index.csv rows
    embedded = embed_models(cfg, data, printer)
    printer(f"[ensemble] scoring {len(cfg.models)} models" + (" on a GPU" if cfg.score_gpus else ""))
    task = ray.remote(score).options(num_gpus=cfg.score_gpus, num_cpus=cfg.score_cpus, max_retries=0)
    scored = ray.get(task.remote(cfg, data))
    seconds = scored["seconds"]
    printer(f"[ensemble] scored in {seconds['scoring']:.1f} s, {seconds['knn']:.1f} s of it in "
            f"{seconds['knn_searches']} exact kNN searches")
    out = output_folder(cfg)
    report = out.child("report.html")
    metric_rows = [{"what": r["what"], **{c: r.get(c) for c in TABLE_COLUMNS}} for r in scored["rows"]]
    final = scored["rows"][-1]
    write_report(report, title=f"Ensemble {cfg.name}", metrics=metric_rows, notes=scored["notes"],
                 gallery=_gallery(cfg, data, scored),
                 info={"score": headline_text(final), "output": out.uri,
                       "models": ", ".join(m.name for m in cfg.models)})
    summary = {
        "name": cfg.name,
        **{key: final.get(key) for key in HEADLINE},
        "final": final,
        "models": {m.name: row for m, row in zip(cfg.models, (r for r in scored["rows"] if r["kind"] == "model"))},
        "stages": scored["rows"],
        "notes": scored["notes"],
        "seconds": seconds,
        "embeddings": embedded,
        "report": report.uri,
        "submissions": [out.child("submission_recognition.csv").uri, out.child("submission_retrieval.csv").uri],
    }
    write_bytes(out.child("summary.json"), json.dumps(summary, indent=2, default=str).encode())
    return summary
