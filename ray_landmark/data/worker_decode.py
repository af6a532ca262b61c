"""Decoding in the worker that trains or embeds (``data.decode: gpu`` or ``worker``).

The Ray Data stream stops after the read stage (id, JPEG bytes, label) and each worker turns its batches of JPEG bytes
into images on its own device: nvjpeg through ``torchvision.io.decode_jpeg`` on a GPU, libjpeg-turbo on the CPU; then
the resize of ``data.preprocessing`` and, for training, the train augmentation of ``transforms.TrainAugmentation``
with each image's own parameters, all on that device. A JPEG is ~100 KB where a decoded 768² image is 1.7 MB, so the
object store moves ~17× fewer bytes, and the decode tasks' CPUs are not needed.

Bad input loses nothing. ``decode_jpeg`` fails a whole list when one JPEG is bad, so such a batch is decoded again
image by image; an image the GPU's decoder rejects is retried on the CPU (libjpeg-turbo reads some JPEGs that nvjpeg
does not, such as CMYK ones), and only one that fails there too is skipped and counted as ``corrupt_jpeg``, as the Ray
Data decode tasks count what PIL cannot read. A train batch short of skipped images is topped up with copies of its
good images (each copy augmented anew), so that every rank takes the same number of steps of ``batch_size`` images:
DDP's ranks move in lockstep, and BatchNorm and compiled graphs see one shape.

Device memory, per worker (the batch being trained aside): one batch at a time is decoded, holding its full-size
images (N×H×W×3 bytes: 14 MB for 10 GLDv2 photos of 800×600) until they are resized to N×3×S×S uint8 (17 MB at
768 px); the augmentation adds N×4×S×S float32 for the affine step (94 MB for 10 images at 768 px); and the last good
train batch is kept (N×3×S×S) to stand in for a batch whose every JPEG is corrupt. The host holds the JPEG bytes of
``data.prefetch_batches`` batches (~100 KB an image).

Neither Ray nor the config classes are imported here: benchmarks/gpu_decode.py runs this on GPU machines without Ray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ray_landmark.data.jpeg import Preprocessing
from ray_landmark.data.transforms import TrainAugmentation, decode_on_device, resize_tensor


@dataclass(frozen=True)
class Decoded:
    """The decodable JPEGs of a batch, resized (not augmented), and what was skipped."""

    images: torch.Tensor  # uint8 N×3×S×S on the device
    kept: np.ndarray  # int64 [N]: positions in the input batch of ``images``
    corrupt: list[tuple[int, str]]  # (position in the input batch, the decoder's error) of each skipped JPEG


class WorkerDecoder:
    """Batches of JPEG bytes -> resized uint8 images on ``device``."""

    def __init__(self, image_size: int, preprocessing: Preprocessing, device: torch.device | str):
        self.size, self.preprocessing, self.device = image_size, preprocessing, torch.device(device)

    def decode(self, jpegs: Sequence[bytes]) -> Decoded:
        # decode_jpeg takes CPU tensors; a copy into a writable buffer (~100 KB) is cheap next to the decode.
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        images: list[torch.Tensor] = []
        kept: list[int] = []
        corrupt: list[tuple[int, str]] = []
        try:
            images = decode_on_device(encoded, self.device) if encoded else []
            kept = list(range(len(encoded)))
        except RuntimeError:  # one bad JPEG fails the list: find it, keep the others
            for position, data in enumerate(encoded):
                image, error = self._decode_one(data)
                if image is None:
                    corrupt.append((position, error))
                else:
                    images.append(image)
                    kept.append(position)
        resized = [resize_tensor(image, self.size, self.preprocessing) for image in images]
        return Decoded(
            images=torch.stack(resized) if resized else torch.empty(
                (0, 3, self.size, self.size), dtype=torch.uint8, device=self.device),
            kept=np.asarray(kept, dtype=np.int64),
            corrupt=corrupt,
        )

    def _decode_one(self, data: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        """One JPEG on the device, else on the CPU; (None, the error) when neither decoder can read it."""
        devices = [self.device] if self.device.type == "cpu" else [self.device, torch.device("cpu")]
        error = ""
        for device in devices:
            try:
                return decode_on_device([data], device)[0].to(self.device), ""
            except RuntimeError as err:  # "decode_jpeg, <source file>:<line>, <what>": keep what
                error = re.sub(r"^\w+, \S+:\d+, ", "", str(err).strip())
        return None, error


class TrainBatchDecoder:
    """Batches of JPEG bytes and labels -> exactly ``len(batch)`` augmented images and their labels on the device.

    Skipped JPEGs are replaced by copies of the batch's good images (augmented anew); a batch with no decodable JPEG is
    replaced by the previous good batch. Raises ``CorruptBatch`` when the very first batch has none."""

    def __init__(self, image_size: int, preprocessing: Preprocessing, device: torch.device | str, augment: bool,
                 seed: int | None = None):
        self.decoder = WorkerDecoder(image_size, preprocessing, device)
        self.augmentation = TrainAugmentation(seed) if augment else None
        self.previous: tuple[torch.Tensor, np.ndarray] | None = None  # the last good batch, resized, and its labels

    def __call__(self, jpegs: Sequence[bytes], labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, Decoded]:
        """(uint8 N×S×S×3 images, int64 labels, both on the device; what was decoded and skipped)."""
        decoded = self.decoder.decode(jpegs)
        if len(decoded.kept):
            images, good_labels = decoded.images, np.asarray(labels)[decoded.kept]
            self.previous = images, good_labels
        elif self.previous is not None:
            images, good_labels = self.previous
        else:
            raise CorruptBatch(f"none of the {len(jpegs)} JPEGs of the first train batch could be decoded")
        # Positions 0..k-1 repeated up to the batch size: every good image once, then copies in the same order.
        fill = np.resize(np.arange(len(good_labels)), len(jpegs))
        # index_select makes a new tensor: the augmentation below never changes ``previous``.
        batch = images.index_select(0, torch.from_numpy(fill).to(images.device))
        if self.augmentation is not None:
            batch = self.augmentation(batch)
        labels_out = torch.from_numpy(good_labels[fill]).to(images.device)
        return batch.permute(0, 2, 3, 1), labels_out, decoded


class CorruptBatch(ValueError):
    """A train batch with no decodable JPEG and no earlier batch to stand in for it."""
