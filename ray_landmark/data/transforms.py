"""The train augmentation of docs/method.md §1, resizing a tensor on any device, and decoding JPEGs on a device.
The CPU decode of a JPEG to an S×S image is ``data/jpeg.py``'s (PIL and numpy, no torch).

The published augmentation order is flip, JPEG re-compression, shift/scale/rotate, resize to S×S, cutout. We resize
first: every later step then works on S×S pixels instead of the full photo, which is most of the CPU cost. Flip and
re-compression commute with the resize; shift/scale/rotate on the squashed S×S image differs only in that a rotation
is applied after, not before, the aspect change.

The augmentation works on a batch of uint8 N×3×S×S tensors on any device, each image with its own random parameters:
the Ray Data decode tasks run it on the CPU, the workers that decode their own batches (``data.decode: gpu`` or
``worker``) on their device, so both paths augment alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ray_landmark.data.jpeg import Preprocessing

# torchvision is imported where it is used: its import pulls in torch._dynamo (about a second on a small CPU), and
# every Ray Data read and decode task, split coordinator and Train controller that unpickles this package's functions
# would pay it without needing it.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# docs/method.md §1: probabilities and ranges of the train augmentation.
FLIP_P = 0.5
JPEG_P, JPEG_QUALITIES = 0.5, (99, 100)
AFFINE_P, MAX_SHIFT, MAX_SCALE_CHANGE, MAX_ROTATION_DEG = 0.7, 0.2, 0.2, 10.0
CUTOUT_P, CUTOUT_FRACTION = 0.5, 0.4


def resize_tensor(image: torch.Tensor, size: int, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 3×H×W (any device) -> 3×S×S, bilinear; antialiased for ``fast``, not for ``original`` (as cv2.resize)."""
    import torchvision.transforms.v2.functional as TF
    return TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BILINEAR,
                     antialias=preprocessing == "fast")


def decode_on_device(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes (1-d uint8 CPU tensors) -> RGB uint8 3×H×W tensors on ``device`` (nvjpeg on a GPU, libjpeg-turbo on
    the CPU). Raises RuntimeError if any of them cannot be decoded."""
    from torchvision.io import ImageReadMode, decode_jpeg
    return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)


@dataclass(frozen=True)
class AugmentParams:
    """Each image's draw of the train augmentation; a step an image skips has its flag off."""

    flip: np.ndarray  # bool [N]
    jpeg_quality: np.ndarray  # int [N]: 0 = not re-compressed
    affine: np.ndarray  # bool [N]
    angle_deg: np.ndarray  # float [N], torchvision's sign convention
    shift_px: np.ndarray  # int [N, 2]: (x, y), whole pixels as torchvision's RandomAffine
    scale: np.ndarray  # float [N]
    cutout: np.ndarray  # bool [N]
    cutout_centre: np.ndarray  # int [N, 2]: (y, x), each in 0..side inclusive, as albumentations 1.0


class TrainAugmentation:
    """docs/method.md §1 after the resize: flip p=.5; JPEG re-compression at quality 99 or 100 p=.5; shift ±0.2,
    scale ±0.2, rotate ±10° with a black border p=.7 (the distribution of torchvision's RandomAffine); one cutout hole
    of 0.4·S × 0.4·S zeros p=.5, as albumentations 1.0's Cutout: its centre is uniform over the image and the hole is
    cut off where it crosses the bottom or right edge (at the top and left edges the hole is shifted inside instead).

    ``__call__`` augments uint8 N×3×H×W tensors in place on their device; parameters are drawn on the host from
    ``seed``, or when None from fresh OS entropy in each process (a DataLoader's forked workers draw alike otherwise)."""

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.pid = os.getpid()

    def sample(self, n: int, height: int, width: int) -> AugmentParams:
        if self.seed is None and self.pid != os.getpid():
            self.rng, self.pid = np.random.default_rng(), os.getpid()
        rng = self.rng
        jpeg = rng.random(n) < JPEG_P
        return AugmentParams(
            flip=rng.random(n) < FLIP_P,
            jpeg_quality=np.where(jpeg, rng.integers(JPEG_QUALITIES[0], JPEG_QUALITIES[1] + 1, n), 0),
            affine=rng.random(n) < AFFINE_P,
            angle_deg=rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n),
            shift_px=np.round(rng.uniform(-1, 1, (n, 2)) * MAX_SHIFT * np.array([width, height])).astype(int),
            scale=rng.uniform(1 - MAX_SCALE_CHANGE, 1 + MAX_SCALE_CHANGE, n),
            cutout=rng.random(n) < CUTOUT_P,
            cutout_centre=np.stack([rng.integers(0, height + 1, n), rng.integers(0, width + 1, n)], axis=1),
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.sample(len(images), *images.shape[-2:]))

    @staticmethod
    def apply(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        def chosen(flags: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.flatnonzero(flags)).to(images.device)

        if params.flip.any():
            picked = chosen(params.flip)
            images[picked] = images[picked].flip(-1)
        for quality in JPEG_QUALITIES:
            if (params.jpeg_quality == quality).any():
                picked = chosen(params.jpeg_quality == quality)
                images[picked] = recompress_jpeg(images[picked], quality)
        if params.affine.any():
            picked = chosen(params.affine)
            a = params.affine
            images[picked] = affine(images[picked], params.angle_deg[a], params.shift_px[a], params.scale[a])
        if params.cutout.any():
            picked = chosen(params.cutout)
            images[picked] = cutout(images[picked], params.cutout_centre[params.cutout])
        return images


def recompress_jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode uint8 N×3×H×W at one quality, on the images' device (nvjpeg's encoder on a GPU)."""
    from torchvision.io import encode_jpeg
    encoded = encode_jpeg(list(images), quality=quality)
    return torch.stack(decode_on_device([e.cpu() for e in encoded], images.device))


def affine(images: torch.Tensor, angle_deg: np.ndarray, shift_px: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """Rotate about the centre, scale and shift each of uint8 N×3×H×W by its own parameters, bilinear, black outside:
    the same pixels as torchvision's ``affine`` image by image (its inverse matrix, grid and fill), in one
    ``grid_sample``."""
    n, _, height, width = images.shape
    device = images.device
    rot = np.radians(angle_deg)
    # The inverse map (output pixel -> input pixel) about the image centre: R(-angle) / scale applied to (p - shift).
    cos, sin = np.cos(rot) / scale, np.sin(rot) / scale
    tx, ty = shift_px[:, 0], shift_px[:, 1]
    theta = np.stack([
        np.stack([cos, sin, -cos * tx - sin * ty], axis=1),
        np.stack([-sin, cos, sin * tx - cos * ty], axis=1),
    ], axis=1)  # N×2×3, in pixels from the centre
    theta = torch.from_numpy(theta).to(device, torch.float32)
    # Output pixel centres in pixels from the image centre; the map's result normalised to grid_sample's [-1, 1].
    xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width, device=device)
    ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height, device=device)
    base = torch.stack([xs.expand(height, width), ys[:, None].expand(height, width),
                        torch.ones(height, width, device=device)], dim=-1).reshape(1, height * width, 3)
    to_unit = torch.tensor([0.5 * width, 0.5 * height], device=device)
    grid = base.expand(n, -1, -1).bmm(theta.transpose(1, 2) / to_unit).reshape(n, height, width, 2)
    # A channel of ones, sampled alike, says how much of each output pixel lies inside the image: multiplying by it
    # fades the border to black exactly as torchvision's fill does.
    planes = torch.cat([images.float(), torch.ones(n, 1, height, width, device=device)], dim=1)
    sampled = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (sampled[:, :3] * sampled[:, 3:]).round_().to(torch.uint8)


def cutout(images: torch.Tensor, centres: np.ndarray) -> torch.Tensor:
    """One hole of zeros per image of uint8 N×3×H×W, ``CUTOUT_FRACTION`` of each side, placed as albumentations
    1.0's Cutout does: top = clip(cy - h // 2, 0, H), bottom = clip(top + h, 0, H), the same across."""
    _, _, height, width = images.shape
    hole_h, hole_w = int(CUTOUT_FRACTION * height), int(CUTOUT_FRACTION * width)
    top = np.clip(centres[:, 0] - hole_h // 2, 0, height)
    left = np.clip(centres[:, 1] - hole_w // 2, 0, width)
    bottom, right = np.clip(top + hole_h, 0, height), np.clip(left + hole_w, 0, width)

    def inside(low: np.ndarray, high: np.ndarray, side: int) -> torch.Tensor:
        pos = torch.arange(side, device=images.device)
        low_t, high_t = (torch.from_numpy(v).to(images.device)[:, None] for v in (low, high))
        return (pos >= low_t) & (pos < high_t)

    hole = inside(top, bottom, height)[:, :, None] & inside(left, right, width)[:, None, :]
    return images.masked_fill(hole[:, None], 0)


# Images augmented together on the CPU: a few at a time keep the warp and the copies in the cache; a whole batch of
# 32 at 448 px costs 1.5x the CPU time per image (benchmarks/data_pipeline.py, "augmentation chunk").
AUGMENT_CHUNK = 4


def augment_hwc(images: np.ndarray, augmentation: TrainAugmentation) -> np.ndarray:
    """The augmentation on a uint8 N×S×S×3 numpy batch (the Ray Data decode tasks' layout), ``AUGMENT_CHUNK`` images
    at a time."""
    out = np.empty_like(images)
    for start in range(0, len(images), AUGMENT_CHUNK):
        part = slice(start, start + AUGMENT_CHUNK)
        chw = torch.from_numpy(images[part].transpose(0, 3, 1, 2).copy())  # the copy: writable, NCHW-contiguous
        out[part] = augmentation(chw).permute(0, 2, 3, 1).numpy()
    return out


def normalize_on_device(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW; done on the training device so 4× fewer bytes cross the pipeline."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (images.permute(0, 3, 1, 2).to(dtype) - mean) / std
