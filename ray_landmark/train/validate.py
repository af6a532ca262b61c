"""Per-epoch validation inside the training workers (docs/method.md §1: GAP and mAP@100 every epoch).

Every rank embeds its part of the eval dataset, test queries and index images together (so all ranks keep iterating
their shards in lockstep); the parts are gathered on rank 0, and rank 0 scores:

* ``val_gap``: GAP of the classifier head (arg-max sub-center ArcFace cosine as landmark and confidence) on the
  recognition ground truth, non-landmark test images included;
* ``val_map100``: mAP@100 of exact inner-product kNN (``eval.search.knn``, on the worker's device, in bounded
  memory) from the test queries to the index images, distractors included.

The eval dataset is split among ranks without dropping rows (``eval_split.CompleteEvalSplit``), so every epoch scores the
same complete set: ``val_queries`` and ``val_index`` count the images scored.
"""

from __future__ import annotations

import functools

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ray_landmark.data.config import DataConfig
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.batches import eval_batches
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.eval.metrics import (
    global_average_precision,
    mean_average_precision,
    recognition_solution,
    retrieval_solution,
)
from ray_landmark.eval.search import knn
from ray_landmark.models.torch_compile import pad_batch


@torch.no_grad()
def embed_and_classify(
    net: torch.nn.Module, images: torch.Tensor, autocast, memory_format: torch.memory_format, pad_to: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit embeddings, arg-max class and its cosine of normalised images, by a model in evaluation mode. With
    ``pad_to`` (a compiled model) a short batch is padded to that many rows, so that validation compiles one graph."""
    rows = len(images)
    if pad_to:
        images = pad_batch(images, pad_to)
    with autocast:
        out = net(images.contiguous(memory_format=memory_format))
    score, cls = out["cosine"][:rows].float().max(dim=1)
    return F.normalize(out["embeddings"][:rows].float(), dim=1), cls, score


def _embed_shard(worker, net: torch.nn.Module, compiled: bool) -> dict[str, np.ndarray]:
    """This rank's part of the eval dataset: ids, splits, unit embeddings, arg-max class and its cosine."""
    parts = {"id": [], "split": [], "embedding": [], "class": [], "score": []}
    batch_size = 2 * worker.cfg.train.batch_size
    shard = ray.train.get_dataset_shard("eval")
    for batch in eval_batches(shard, worker.cfg.data, batch_size=batch_size, device=worker.device,
                              worker_decode=worker.inputs.worker_decode):
        embeddings, cls, score = embed_and_classify(
            net, normalize_on_device(batch["image"]), worker.precision.autocast(), worker.memory_format,
            pad_to=batch_size if compiled else None,
        )
        parts["id"].append(batch["id"].astype(str))
        parts["split"].append(batch["split"].astype(str))
        parts["embedding"].append(embeddings.cpu().numpy())
        parts["class"].append(cls.cpu().numpy())
        parts["score"].append(score.cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def _gather(part: dict[str, np.ndarray], world: int) -> dict[str, np.ndarray]:
    """All ranks' rows, sorted by image id: the same order every epoch, whichever rank embedded which row."""
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, part)
        part = {k: np.concatenate([p[k] for p in parts if len(p["id"])]) for k in part}
    order = np.argsort(part["id"], kind="stable")
    return {k: v[order] for k, v in part.items()}


@functools.lru_cache(maxsize=1)
def _solutions(data: DataConfig) -> tuple[dict, dict]:
    """The scored ground truth, read from the manifest once per worker process rather than every epoch."""
    manifest = open_manifest(data)
    return recognition_solution(manifest.recognition()), retrieval_solution(manifest.retrieval())


def validate(worker, net: torch.nn.Module, compiled: bool) -> dict:
    """Validation metrics of ``net`` on rank 0 (an empty dict on the other ranks). ``worker``: ``loop.Worker``;
    ``net``: the model without its DDP wrapper (no DDP collectives in eval: ranks may hold different batch counts);
    ``compiled``: torch.compile'd, so short batches are padded to one shape."""
    was_training = net.training
    net.eval()
    rows = _gather(_embed_shard(worker, net, compiled), worker.world)
    net.train(was_training)
    if worker.rank != 0:
        return {}

    all_recognition, all_retrieval = _solutions(worker.cfg.data)
    is_query = rows["split"] == "test"
    query_ids, index_ids = rows["id"][is_query].tolist(), rows["id"][~is_query].tolist()
    seen_queries = set(query_ids)
    recognition = {i: lm for i, lm in all_recognition.items() if i in seen_queries}
    landmark_ids = np.asarray(worker.inputs.landmark_ids)
    predictions = {
        i: (int(landmark_ids[c]), float(s))
        for i, c, s in zip(query_ids, rows["class"][is_query].astype(int), rows["score"][is_query])
    }
    metrics = {"val_queries": len(recognition), "val_index": len(index_ids)}
    if any(recognition.values()):
        metrics["val_gap"] = global_average_precision(predictions, recognition)

    seen_index = set(index_ids)
    retrieval = {
        q: relevant & seen_index
        for q, relevant in all_retrieval.items()
        if q in recognition and relevant & seen_index
    }
    if retrieval:
        position = {i: n for n, i in enumerate(query_ids)}
        queries = list(retrieval)
        q = torch.from_numpy(rows["embedding"][is_query][[position[i] for i in queries]])
        _, top = knn(q.to(worker.device), torch.from_numpy(rows["embedding"][~is_query]), 100)
        ranked = {qid: [index_ids[j] for j in row] for qid, row in zip(queries, top)}
        metrics["val_map100"] = mean_average_precision(ranked, retrieval)
    return metrics
