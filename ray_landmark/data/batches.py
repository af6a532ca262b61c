"""A training or validation worker's batches from its shard of a stream (``data/pipeline.py``), on its device: as
Ray Data decoded them, or decoded by the worker itself from the stream's JPEG bytes (``data.decode``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from ray_landmark.data.config import DataConfig
from ray_landmark.data.worker_decode import CorruptBatch, TrainBatchDecoder, WorkerDecoder
from ray_landmark.errors import JobError

log = logging.getLogger(__name__)


def _log_corrupt(ids: np.ndarray, corrupt: list[tuple[int, str]]) -> None:
    for position, error in corrupt:
        log.warning("skipped %s: corrupt_jpeg %s", ids[position], error)


def train_batches(
    shard, cfg: DataConfig, *, batch_size: int, device: torch.device, counter, worker_decode: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """A training worker's batches from its dataset shard (a ``DataIterator``): ``image`` uint8 N×S×S×3 and ``label``
    int64 on ``device`` (and the images' ``row`` among the train ids, where the stream has it), N = ``batch_size``,
    the last partial batch dropped. With ``worker_decode`` (the stream carries
    JPEGs: ``decodes_in_worker``, decided where the stream was made) they are decoded and augmented on ``device`` and
    the corrupt ones reported to ``counter`` (the stream's ``StreamCounter``)."""
    if not worker_decode:
        yield from shard.iter_torch_batches(
            batch_size=batch_size, prefetch_batches=cfg.prefetch_batches, drop_last=True, device=device
        )
        return
    decoder = TrainBatchDecoder(cfg.image_size, cfg.preprocessing, device, augment=cfg.augment)
    for batch in shard.iter_batches(
        batch_size=batch_size, prefetch_batches=cfg.prefetch_batches, drop_last=True, batch_format="numpy"
    ):
        try:
            images, labels, decoded = decoder(batch["jpeg"], batch["label"])
        except CorruptBatch as err:
            raise JobError(f"{err} (images {', '.join(batch['id'][:3])}, ...): check the train shards under "
                           f"{cfg.root}") from None
        _log_corrupt(batch["id"], decoded.corrupt)
        if decoded.corrupt:
            counter.add({"corrupt_jpeg": len(decoded.corrupt)})
        rows = {"row": torch.from_numpy(batch["row"][decoded.kept])} if "row" in batch else {}
        yield {"image": images, "label": labels, **rows}


def images_on_device(
    batch: dict[str, np.ndarray], device: torch.device, decoder: WorkerDecoder | None
) -> tuple[dict, list[int]]:
    """An eval batch (numpy columns) with its ``image`` as uint8 N×S×S×3 on ``device``: decoded by Ray Data and moved
    there, or with a ``decoder`` decoded there from ``jpeg``, the rows of corrupt JPEGs dropped and logged. Also the
    positions of those rows in the input batch, for the caller to count."""
    if decoder is None:
        return {**batch, "image": torch.from_numpy(batch["image"]).to(device)}, []
    decoded = decoder.decode(batch["jpeg"])
    _log_corrupt(batch["id"], decoded.corrupt)
    rows = {key: np.asarray(values)[decoded.kept] for key, values in batch.items() if key != "jpeg"}
    return {**rows, "image": decoded.images.permute(0, 2, 3, 1)}, [position for position, _ in decoded.corrupt]


def eval_batches(
    shard, cfg: DataConfig, *, batch_size: int, device: torch.device, worker_decode: bool
) -> Iterator[dict]:
    """A worker's eval batches (``images_on_device``) from its dataset shard, decoded here with ``worker_decode`` (as
    in ``train_batches``); corrupt JPEGs are logged (the Ray Data decode tasks count theirs in a counter that training
    does not read, so neither path counts them)."""
    decoder = WorkerDecoder(cfg.image_size, cfg.preprocessing, device) if worker_decode else None
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield images_on_device(batch, device, decoder)[0]
