"""What the service answers, from an ensemble run's embeddings: the glue between query embeddings and the batch
ensemble's post-processing (``infer/postprocess.py``) and search (``infer/search.knn``).

``load_served_index`` reads what an ensemble run wrote (every model's train, index and test embeddings, aligned by
``infer.ensemble.load_split``), the gallery's labels from the manifest, and precomputes what does not depend on the
query: the recognition gallery and non-landmark set N in the ensemble embedding, the gallery's non-landmark bias b_j,
and each retrieval model's index labels and confidences. ``answer_recognition`` and ``answer_retrieval`` then do, for a
batch of query embeddings, what ``infer.ensemble`` does for the test split, row by row alike, so the service's answers
are the submission rows of the same images.

One difference: the batch job's default non-landmark set (``recognition.nonlandmark.source: cross_usage``) picks N by
the query's Public/Private usage, which a photo sent to the service does not have; the service then uses every
non-landmark test image of both usages. With ``source: ids`` both use the same N.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from ray_landmark.config_base import JobError
from ray_landmark.data.storage import read_bytes, resolve
from ray_landmark.infer import postprocess as pp
from ray_landmark.infer.config import EnsembleConfig, EnsembleModel
from ray_landmark.infer.ensemble import SPLITS, Stage, Tables, data_config, load_split
from ray_landmark.infer.search import knn


@dataclass
class RetrievalModel:
    """One retrieval model's index and gallery, unit rows on the search device, and its index images' labels."""

    model: EnsembleModel
    index: torch.Tensor  # [I, D]
    train: torch.Tensor  # [G, D]
    index_labels: np.ndarray  # int64 [I]
    index_confidence: np.ndarray  # float32 [I]


@dataclass
class ServedIndex:
    cfg: EnsembleConfig
    device: str
    recognition_models: tuple[EnsembleModel, ...]
    gallery: torch.Tensor  # [G, D_ensemble]: train images in the recognition models' ensemble embedding
    gallery_labels: np.ndarray  # int64 [G]
    gallery_bias: np.ndarray  # float32 [G]: b_j, the mean of train image j's top-k similarities to N
    nonlandmark: torch.Tensor  # [N, D_ensemble]
    nonlandmark_source: str
    retrieval: list[RetrievalModel]
    index_ids: np.ndarray  # str [I]
    dims: dict[str, int]  # model name -> embedding dimension of its files

    def summary(self) -> dict:
        return {"gallery_images": len(self.gallery_labels), "gallery_landmarks": int(len(set(self.gallery_labels))),
                "index_images": len(self.index_ids), "nonlandmark_images": len(self.nonlandmark),
                "nonlandmark_source": self.nonlandmark_source, "search_device": self.device}


def _on_device(embeddings: np.ndarray, device: str) -> torch.Tensor:
    """Unit rows kept where the search runs: float16 on a GPU (what knn computes in there), float32 on the CPU."""
    return torch.from_numpy(embeddings).to(device, torch.float16 if device == "cuda" else torch.float32)


def nonlandmark_rows(cfg: EnsembleConfig, tables: Tables, test_ids: np.ndarray) -> tuple[np.ndarray, str]:
    """Rows of ``test_ids`` that are the non-landmark set N for a query of unknown usage, and what N is."""
    settings = cfg.recognition.nonlandmark
    position = pd.Series(np.arange(len(test_ids)), index=test_ids)
    if settings.source == "ids":
        try:
            listed = pd.read_csv(io.BytesIO(read_bytes(resolve(settings.ids, cfg.storage))), dtype=str)["id"]
        except (KeyError, ValueError) as err:
            raise JobError(f"recognition.nonlandmark.ids {settings.ids}: expected a CSV with an 'id' column "
                           f"({err})") from None
        rows = position.reindex(listed).dropna().to_numpy(np.int64)
        what = f"the test images listed in {settings.ids}"
    else:
        truth = tables.recognition.set_index("id")
        scored = truth["usage"].isin(["Public", "Private"]) & (truth["landmarks"].fillna("") == "")
        rows = position.reindex(truth.index[scored]).dropna().to_numpy(np.int64)
        what = "every Public and Private non-landmark test image (cross_usage: a query's usage is unknown online)"
    if not len(rows):
        raise JobError(f"{cfg.output_dir}: the non-landmark set N ({what}) has no embedded test image")
    return np.sort(rows), what


def load_served_index(cfg: EnsembleConfig, device: str) -> ServedIndex:
    """Everything the answers need that does not depend on the query; see the module doc."""
    tables = Tables.read(data_config(cfg), cfg.gallery_view)
    splits = {s: load_split(cfg, s) for s in SPLITS}
    train_ids = splits["train"].ids
    known = pd.Index(train_ids).isin(tables.gallery_landmarks.index)
    if not known.all():
        raise JobError(f"{cfg.output_dir}: the train embeddings hold images outside the {cfg.gallery_view} view "
                       f"(e.g. {train_ids[~known][0]}); rerun the ensemble")
    gallery_labels = tables.gallery_landmarks.loc[list(train_ids)].to_numpy(np.int64)
    rc, rt = cfg.recognition, cfg.retrieval

    used = tuple(m for m in cfg.models if "recognition" in m.tasks)
    stage = Stage("recognition", "ensemble", ("recognition",), used)
    gallery, test = stage.embeddings(splits, "train"), stage.embeddings(splits, "test")
    rows, source = nonlandmark_rows(cfg, tables, splits["test"].ids)
    nonlandmark = test[rows]
    bias = pp.nonlandmark_bias(knn(gallery, nonlandmark, rc.gallery_nonlandmark_k, device=device)[0],
                               rc.gallery_nonlandmark_k)

    retrieval = []
    for model in (m for m in cfg.models if "retrieval" in m.tasks):
        single = Stage(model.name, "model", ("retrieval",), (model,))
        index, train = single.embeddings(splits, "index"), single.embeddings(splits, "train")
        labels, confidence = pp.label_by_neighbours(*knn(index, train, rt.label_k, device=device), gallery_labels,
                                                    top_k=rt.label_k)
        retrieval.append(RetrievalModel(model, _on_device(index, device), _on_device(train, device), labels,
                                        confidence))
    return ServedIndex(
        cfg=cfg, device=device, recognition_models=used, gallery=_on_device(gallery, device),
        gallery_labels=gallery_labels, gallery_bias=bias, nonlandmark=_on_device(nonlandmark, device),
        nonlandmark_source=source, retrieval=retrieval, index_ids=splits["index"].ids,
        dims={name: e.shape[1] for name, e in splits["train"].by_model.items()},
    )


def _single(model: EnsembleModel, queries: dict[str, np.ndarray]) -> np.ndarray:
    """One model's query rows as unit float32, as ``Stage.embeddings`` makes them from the float16 files."""
    return pp.combine_families([(model.family, queries[model.name].astype(np.float32))])


def answer_recognition(served: ServedIndex, queries: dict[str, np.ndarray]) -> list[dict]:
    """Per query row: the landmark and confidence of the ensemble's recognition submission, and its parts.

    ``queries``: model name -> float16 [Q, D] embeddings (rounded as the embedding job writes them). The
    confidence is ``pp.recognize``'s (non-landmark re-ranking on); ``landmark_score`` is the vote before the query's
    penalty ``nonlandmark_score`` (the mean of its top query_nonlandmark_k similarities to N).
    """
    rc = served.cfg.recognition
    combined = pp.combine_families([(m.family, queries[m.name].astype(np.float32))
                                    for m in served.recognition_models])
    scores, indices = knn(combined, served.gallery, rc.neighbours, device=served.device)
    query_n, _ = knn(combined, served.nonlandmark, rc.query_nonlandmark_k, device=served.device)
    landmarks, confidence = pp.recognize(scores, indices, served.gallery_labels, served.gallery_bias, query_n,
                                         rc.top_k, rc.query_nonlandmark_k)
    penalty = pp.nonlandmark_bias(query_n, rc.query_nonlandmark_k)
    return [{"landmark_id": int(lm), "confidence": float(c), "landmark_score": float(c + p),
             "nonlandmark_score": float(p)} for lm, c, p in zip(landmarks, confidence, penalty)]


def with_added_index_images(served: ServedIndex, ids: list[str], queries: dict[str, np.ndarray]) -> ServedIndex:
    """A copy of ``served`` whose retrieval index also holds these images (ids and float16 embeddings per model),
    each labelled by its train neighbours as the ensemble labels index images; ``served`` itself is not changed, so
    answers in progress keep a consistent index."""
    rt = served.cfg.retrieval
    retrieval = []
    for entry in served.retrieval:
        rows = _single(entry.model, queries)
        labels, confidence = pp.label_by_neighbours(*knn(rows, entry.train, rt.label_k, device=served.device),
                                                    served.gallery_labels, top_k=rt.label_k)
        retrieval.append(replace(entry, index=torch.cat([entry.index, _on_device(rows, served.device)]),
                                 index_labels=np.concatenate([entry.index_labels, labels]),
                                 index_confidence=np.concatenate([entry.index_confidence, confidence])))
    return replace(served, retrieval=retrieval,
                   index_ids=np.concatenate([served.index_ids, np.asarray(ids, dtype=object)]))


def answer_retrieval(served: ServedIndex, queries: dict[str, np.ndarray], k: int) -> list[dict]:
    """Per query row: the ``k`` best index ids and fused scores of the ensemble's retrieval submission."""
    rt, device = served.cfg.retrieval, served.device
    reranked = []
    for entry in served.retrieval:
        query = _single(entry.model, queries)
        scores, indices = knn(query, entry.index, max(rt.rerank_pool, rt.per_model), device=device)
        query_labels, _ = pp.label_by_neighbours(*knn(query, entry.train, rt.label_k, device=device),
                                                 served.gallery_labels, top_k=rt.label_k)
        scores, indices = pp.soft_rerank(scores, indices, query_labels, entry.index_labels, entry.index_confidence,
                                         rt.same_factor, rt.other_factor)
        reranked.append((scores[:, :rt.per_model] * entry.model.weight, indices[:, :rt.per_model]))
    fused_scores, fused = pp.fuse_models(reranked, rt.per_model, rt.out_k)
    return [{"ids": ids[:k], "scores": [float(s) for s in row[:len(ids[:k])]]}
            for ids, row in zip(pp.ranked_ids(fused, served.index_ids), fused_scores)]
