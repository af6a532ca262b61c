"""What the service answers, from an ensemble run's embeddings: the glue between query embeddings and the batch
ensemble's post-processing (``infer/postprocess.py``) and search (``eval/search.knn``).

``load_served_index`` reads what an ensemble run wrote (every model's train, index and test embeddings, aligned by
``infer.ensemble.load_split``), the gallery's labels from the manifest, and precomputes what does not depend on the
query: the recognition gallery and non-landmark set N in the ensemble embedding, the gallery's non-landmark bias b_j
(``postprocess.nonlandmark_bias``), and each retrieval model's index labels (``postprocess.label_images``; under ``retrieval.labels: ensemble``
one labelling for every model, from the retrieval models' ensemble embedding). The sets
searched stay on the replica's device as torch tensors, made once here, so that no request copies them there.
``answer_recognition`` and ``answer_retrieval`` then call the same ``postprocess.recognize`` and
``postprocess.retrieve`` as the batch job: for a batch of query embeddings they do what ``infer.ensemble`` does for the
test split, row by row alike, so the service's answers are the submission rows of the same images.

The index is the run's embedded index images followed by the entries of its additions log (``infer.index_additions``,
which ``load_split`` reads); ``with_added_index_images`` extends a loaded index by the entries written since, in the
same order, so a replica that started before an addition and one that started after it search the same rows.

The non-landmark set N is the batch job's (``infer.ensemble.load_nonlandmark``), with one difference: under
``recognition.nonlandmark.source: cross_usage`` the batch job picks N by the query's Public/Private usage, which a
photo sent to the service does not have; the service then uses every non-landmark test image of both usages. A test
image that is itself in N is left out of its own evidence by the batch job; a photo sent to the service is taken as
no image of N.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from ray_landmark.data import gldv2
from ray_landmark.errors import JobError
from ray_landmark.infer import postprocess as pp
from ray_landmark.infer.config import EnsembleConfig, EnsembleModel
from ray_landmark.infer.index_additions import Addition
from ray_landmark.infer.ensemble import Stage, Tables, data_config, load_nonlandmark, load_split, own_rows
from ray_landmark.runs.folders import output_folder


@dataclass
class RetrievalModel:
    """One retrieval model's index and gallery (unit float32 rows on the search device) and its index images'
    labels."""

    model: EnsembleModel
    index: torch.Tensor  # [I, D], database-augmented under retrieval.dba
    train: torch.Tensor  # [G, D]
    index_labels: np.ndarray  # int64 [I]
    index_confidence: np.ndarray  # float32 [I]


@dataclass
class ServedIndex:
    cfg: EnsembleConfig
    device: str
    recognition_models: tuple[EnsembleModel, ...]
    gallery: torch.Tensor  # [G, D_ensemble] on the device: train images in the recognition models' ensemble embedding
    gallery_labels: np.ndarray  # int64 [G]
    bias: pp.NonLandmarkBias  # b_j of every gallery image, the gallery's own rows of N left out
    nonlandmark: torch.Tensor  # [N, D_ensemble] on the device
    nonlandmark_source: str
    retrieval: list[RetrievalModel]
    # retrieval.labels ensemble: the train images in the retrieval models' ensemble embedding, which labels queries
    # and index images for every model (None: each model labels with its own train rows)
    labelling_train: torch.Tensor | None
    index_ids: np.ndarray  # str [I]
    index_id_set: frozenset[str]  # the same ids, for the id checks of additions
    additions: int  # the entries of the run's index additions log that the index ends with
    dims: dict[str, int]  # model name -> embedding dimension of its files

    def summary(self) -> dict:
        return {"gallery_images": len(self.gallery_labels), "gallery_landmarks": int(len(set(self.gallery_labels))),
                "index_images": len(self.index_ids), "index_additions": self.additions,
                "nonlandmark_images": len(self.nonlandmark), "nonlandmark_source": self.nonlandmark_source,
                "search_device": self.device}


def load_served_index(cfg: EnsembleConfig, device: str) -> ServedIndex:
    """Everything the answers need that does not depend on the query; see the module doc."""
    tables = Tables.read(data_config(cfg), cfg.gallery_view)
    splits = {s: load_split(cfg, s) for s in gldv2.SPLITS}
    train_ids = splits["train"].ids
    known = pd.Index(train_ids).isin(tables.gallery_landmarks.index)
    if not known.all():
        raise JobError(f"{output_folder(cfg).uri}: the train embeddings hold images outside the {cfg.gallery_view} view "
                       f"(e.g. {train_ids[~known][0]}); rerun the ensemble")
    gallery_labels = tables.gallery_landmarks.loc[list(train_ids)].to_numpy(np.int64)
    rc, rt = cfg.recognition, cfg.retrieval

    used = tuple(m for m in cfg.models if "recognition" in m.tasks)
    stage = Stage("recognition", "ensemble", ("recognition",), used)
    # N as the batch job loads it; with cross_usage (N by the query's usage, which an online photo does not have)
    # the union of its groups: every Public and Private non-landmark test image.
    splits["nonlandmark"], groups = load_nonlandmark(cfg, tables, splits)
    members = np.unique(np.concatenate([g.members for g in groups]))
    if not len(members):
        raise JobError(f"{output_folder(cfg).uri}: the non-landmark set N has no embedded image")
    source = groups[0].description.split(": ", 1)[1] if len(groups) == 1 else (
        "every Public and Private non-landmark test image (cross_usage: a query's usage is unknown online)")
    gallery = _on_device(stage.embeddings(splits, "train"), device)
    nonlandmark = _on_device(stage.embeddings(splits, "nonlandmark")[members], device)
    gallery_rows = own_rows(train_ids, splits["nonlandmark"].ids[members])
    bias = pp.nonlandmark_bias(gallery, nonlandmark, rc.gallery_nonlandmark_k, gallery_rows=gallery_rows,
                               device=device)

    retrieval, labelling_train = [], None
    retrieval_models = tuple(m for m in cfg.models if "retrieval" in m.tasks)
    if rt.labels == "ensemble":
        ensemble = Stage("retrieval", "ensemble", ("retrieval",), retrieval_models)
        labelling_train = _on_device(ensemble.embeddings(splits, "train"), device)
        shared = pp.label_images(ensemble.embeddings(splits, "index"), labelling_train, gallery_labels, rt.label_k,
                                 device=device)
    for model in retrieval_models:
        single = Stage(model.name, "model", ("retrieval",), (model,))
        index, train = (_on_device(single.embeddings(splits, s), device) for s in ("index", "train"))
        labels, confidence = shared if labelling_train is not None else pp.label_images(
            index, train, gallery_labels, rt.label_k, device=device)
        if rt.dba.enabled:  # once here, as the batch job augments its index before searching it
            index = _on_device(pp.augment_database(index, rt.dba.k, rt.dba.alpha, device=device), device)
        retrieval.append(RetrievalModel(model, index, train, labels, confidence))
    return ServedIndex(
        cfg=cfg, device=device, recognition_models=used, gallery=gallery, gallery_labels=gallery_labels, bias=bias,
        nonlandmark=nonlandmark, nonlandmark_source=source, retrieval=retrieval, labelling_train=labelling_train,
        index_ids=splits["index"].ids, index_id_set=frozenset(splits["index"].ids),
        additions=splits["index"].additions,
        dims={name: e.shape[1] for name, e in splits["train"].by_model.items()},
    )


def _on_device(rows: np.ndarray, device: str) -> torch.Tensor:
    """Rows the answers search, on the search device once (``knn`` copies an array there on every search); on the
    CPU the array's own memory, so the search is the batch job's."""
    return torch.from_numpy(rows).to(device)


def _single(model: EnsembleModel, queries: dict[str, np.ndarray]) -> np.ndarray:
    """One model's query rows as unit float32, as ``Stage.embeddings`` makes them from the float16 files."""
    return pp.combine_families([(model.family, queries[model.name].astype(np.float32))])


def answer_recognition(served: ServedIndex, queries: dict[str, np.ndarray]) -> list[dict]:
    """Per query row: the landmark and confidence of the ensemble's recognition submission, and its parts.

    ``queries``: model name -> float16 [Q, D] embeddings (rounded as the embedding job writes them). The confidence
    is ``pp.recognize``'s (b_j and the query penalty, as the batch job); ``landmark_score`` is the vote before the
    query's penalty ``nonlandmark_score`` (the mean of its top query_nonlandmark_k similarities to N). A photo sent
    to the service is no image of N, so nothing is left out of its own evidence.
    """
    rc = served.cfg.recognition
    combined = pp.combine_families([(m.family, queries[m.name].astype(np.float32))
                                    for m in served.recognition_models],
                                   [m.weight for m in served.recognition_models])
    penalty = pp.query_penalty(combined, served.nonlandmark, rc.query_nonlandmark_k, device=served.device)
    landmarks, confidence = pp.recognize(combined, served.gallery, served.gallery_labels, rc, bias=served.bias,
                                         penalty=penalty, device=served.device)
    return [{"landmark_id": int(lm), "confidence": float(c), "landmark_score": float(c + p),
             "nonlandmark_score": float(p)} for lm, c, p in zip(landmarks, confidence, penalty)]


def with_added_index_images(served: ServedIndex, additions: list[Addition]) -> ServedIndex:
    """A copy of ``served`` whose retrieval index also holds these entries of the run's additions log (the next ones
    after ``served.additions``, in order, checked by ``index_additions.check_additions``), each image labelled by
    its train neighbours as the ensemble labels index images; ``served`` itself is not changed, so answers in
    progress keep a consistent index."""
    rt = served.cfg.retrieval
    if rt.dba.enabled:
        raise JobError("retrieval.dba: adding index images is refused while DBA is on (it would change every index "
                       "image's neighbours); rerun jobs/ensemble.py with the new images instead")
    if additions[0].number != served.additions + 1:
        raise JobError(f"index additions log: entry {additions[0].number} follows entry {served.additions}")
    ids = [i for a in additions for i in a.ids]
    queries = {name: np.concatenate([a.by_model[name] for a in additions]) for name in additions[0].by_model}
    shared = _ensemble_labels(served, queries)
    retrieval = []
    for entry in served.retrieval:
        rows = _single(entry.model, queries)
        labels, confidence = shared or pp.label_images(rows, entry.train, served.gallery_labels, rt.label_k,
                                                       device=served.device)
        retrieval.append(replace(entry, index=torch.cat([entry.index, _on_device(rows, served.device)]),
                                 index_labels=np.concatenate([entry.index_labels, labels]),
                                 index_confidence=np.concatenate([entry.index_confidence, confidence])))
    return replace(served, retrieval=retrieval,
                   index_ids=np.concatenate([served.index_ids, np.asarray(ids, dtype=object)]),
                   index_id_set=served.index_id_set | set(ids), additions=additions[-1].number)


def answer_retrieval(served: ServedIndex, queries: dict[str, np.ndarray], k: int) -> list[dict]:
    """Per query row: the ``k`` best index ids and fused scores of the ensemble's retrieval submission."""
    shared = _ensemble_labels(served, queries)
    query_labels = shared[0] if shared else None
    models = (pp.RetrievalModel(_single(e.model, queries), e.index, e.train, weight=e.model.weight,
                                index_labels=(e.index_labels, e.index_confidence), query_labels=query_labels,
                                augmented=served.cfg.retrieval.dba.enabled)
              for e in served.retrieval)
    fused_scores, fused = pp.retrieve(models, served.gallery_labels, served.cfg.retrieval, device=served.device)
    return [{"ids": ids[:k], "scores": [float(s) for s in row[:len(ids[:k])]]}
            for ids, row in zip(pp.ranked_ids(fused, served.index_ids), fused_scores)]


def _ensemble_labels(served: ServedIndex, queries: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """Under ``retrieval.labels: ensemble``: the query rows' labels and confidences by the train neighbours of the
    retrieval models' ensemble embedding, as the batch job labels its test and index images; None otherwise."""
    if served.labelling_train is None:
        return None
    models = [e.model for e in served.retrieval]
    combined = pp.combine_families([(m.family, queries[m.name].astype(np.float32)) for m in models],
                                   [m.weight for m in models])
    return pp.label_images(combined, served.labelling_train, served.gallery_labels, served.cfg.retrieval.label_k,
                           device=served.device)
