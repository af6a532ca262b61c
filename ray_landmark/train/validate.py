"""Per-epoch validation inside the training workers (solution.md §1: GAP and mAP@100 every epoch).

Every rank embeds its share of the eval dataset, test queries and index images together (so all ranks keep iterating
their shards in lockstep); the shares are gathered on rank 0, and rank 0 scores:

* ``val_gap``: GAP of the classifier head (arg-max sub-center ArcFace cosine as landmark and confidence) on the
  recognition ground truth, non-landmark test images included;
* ``val_map100``: mAP@100 of inner-product kNN from the test queries to the index images.

Only the images that reached the workers are scored (``val_queries`` says how many), since Ray Train's equal
split may drop up to world_size - 1 rows of each eval set.
"""

from __future__ import annotations

import functools

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ray_landmark.config import Config
from ray_landmark.data.config import DataConfig
from ray_landmark.data.metadata import EVAL_QUERY, open_manifest
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.eval.metrics import (
    global_average_precision,
    mean_average_precision,
    recognition_solution,
    retrieval_solution,
)


@torch.no_grad()
def _embed_shard(model, batch_size: int, device, amp_dtype, memory_format) -> dict[str, np.ndarray]:
    """This rank's share of the eval dataset: ids, split labels, unit embeddings, arg-max class and its cosine."""
    parts = {"id": [], "split": [], "embedding": [], "class": [], "score": []}
    for batch in ray.train.get_dataset_shard("eval").iter_batches(batch_size=batch_size, batch_format="numpy"):
        images = normalize_on_device(torch.from_numpy(batch["image"]).to(device)).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(images)
        score, cls = out["cosine"].float().max(dim=1)
        parts["id"].append(batch["id"].astype(str))
        parts["split"].append(batch["label"])
        parts["embedding"].append(F.normalize(out["embeddings"].float(), dim=1).cpu().numpy())
        parts["class"].append(cls.cpu().numpy())
        parts["score"].append(score.cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def _gather(part: dict[str, np.ndarray], world: int) -> dict[str, np.ndarray]:
    if world == 1:
        return part
    parts = [None] * world
    dist.all_gather_object(parts, part)
    return {k: np.concatenate([p[k] for p in parts if len(p["id"])]) for k in part}


@functools.lru_cache(maxsize=1)
def _solutions(data: DataConfig) -> tuple[dict, dict]:
    """The scored ground truth, read from the manifest once per worker process rather than every epoch."""
    manifest = open_manifest(data)
    return recognition_solution(manifest.recognition()), retrieval_solution(manifest.retrieval())


def validate(model, cfg: Config, loop_config: dict, rank: int, world: int, device, amp_dtype, memory_format) -> dict:
    """Validation metrics on rank 0 (an empty dict on the other ranks)."""
    net = getattr(model, "module", model)  # no DDP collectives in eval: ranks may hold different batch counts
    was_training = net.training
    net.eval()
    rows = _gather(_embed_shard(net, 2 * cfg.train.batch_size, device, amp_dtype, memory_format), world)
    net.train(was_training)
    if rank != 0:
        return {}

    all_recognition, all_retrieval = _solutions(cfg.data)
    is_query = rows["split"] == EVAL_QUERY
    query_ids, index_ids = rows["id"][is_query].tolist(), rows["id"][~is_query].tolist()
    seen_queries = set(query_ids)
    recognition = {i: lm for i, lm in all_recognition.items() if i in seen_queries}
    landmark_ids = np.asarray(loop_config["landmark_ids"])
    predictions = {
        i: (int(landmark_ids[c]), float(s))
        for i, c, s in zip(query_ids, rows["class"][is_query].astype(int), rows["score"][is_query])
    }
    metrics = {"val_queries": len(recognition)}
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
        index_embeddings = torch.from_numpy(rows["embedding"][~is_query])
        top = (q @ index_embeddings.T).topk(min(100, len(index_ids)), dim=1).indices.tolist()
        ranked = {qid: [index_ids[j] for j in row] for qid, row in zip(queries, top)}
        metrics["val_map100"] = mean_average_precision(ranked, retrieval)
    return metrics
