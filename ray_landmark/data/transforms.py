"""JPEG decode and the train augmentation of solution.md §1, on one image at a time.

The published order is flip, JPEG re-compression, shift/scale/rotate, resize to S×S, cutout. We resize first: every
later step then works on S×S pixels instead of the full photo, which is most of the CPU cost. Flip and re-compression
commute with the resize; shift/scale/rotate on the squashed S×S image differs only in that a rotation is applied
after, not before, the aspect change.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CorruptImage(ValueError):
    """Bytes that are not a decodable JPEG."""


def decode_jpeg(data: bytes, size: int) -> Image.Image:
    """Decode to RGB, letting libjpeg scale by 1/2, 1/4 or 1/8 while both sides stay >= ``size`` (much cheaper than a
    full decode of a large photo followed by a resize)."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG":
            raise CorruptImage(f"not a JPEG ({img.format})")
        img.draft("RGB", (size, size))
        return img.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImage(str(err)) from None


def train_augmentation() -> T.Compose:
    """solution.md §1 after the resize: flip p=.5, JPEG q99-100 p=.5, shift .2/scale .2/rotate 10° p=.7 (black
    border), one 0.4S×0.4S hole of zeros p=.5. Works on uint8 CHW tensors."""
    return T.Compose(
        [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.JPEG(quality=(99, 100))], p=0.5),
            T.RandomApply(
                [T.RandomAffine(degrees=10, translate=(0.2, 0.2), scale=(0.8, 1.2), interpolation=T.InterpolationMode.BILINEAR, fill=0)],
                p=0.7,
            ),
            T.RandomErasing(p=0.5, scale=(0.16, 0.16), ratio=(1.0, 1.0), value=0),
        ]
    )


class ImageTransform:
    """bytes -> uint8 array S×S×3: decode, resize (aspect not kept, as published), then augment when training."""

    def __init__(self, size: int, augment: bool):
        self.size = size
        self.augment = train_augmentation() if augment else None

    def __call__(self, data: bytes) -> np.ndarray:
        img = decode_jpeg(data, self.size).resize((self.size, self.size), Image.BILINEAR)
        if self.augment is None:
            return np.asarray(img)
        chw = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
        return self.augment(chw).permute(1, 2, 0).numpy()


def normalize_on_device(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW; done on the training device so 4× fewer bytes cross the pipeline."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (images.permute(0, 3, 1, 2).to(dtype) - mean) / std
