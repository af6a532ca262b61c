"""JPEG bytes to an S×S RGB image on the CPU, with PIL and numpy. Two ways (``data.preprocessing``), at training and
evaluation alike:

* ``fast`` (default): let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= S (much cheaper than a full
  decode of a large photo), then resize bilinearly with antialiasing;
* ``original``: decode the full JPEG and resize bilinearly without antialiasing, as the 2021 solution did (OpenCV's
  imread and albumentations' Resize, INTER_LINEAR): the pixels the released weights were trained and evaluated on.

torch is imported only for ``original``'s resize: Ray Data's decode tasks that do not augment (every eval and
embedding stream) then run without it, and a fresh task process skips its import (seconds on a small CPU, and a few
hundred MB of memory each). The augmentation is ``data/transforms.py``'s.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image

Preprocessing = Literal["fast", "original"]


class CorruptImage(ValueError):
    """Bytes that are not a decodable JPEG."""


def decode_pil(data: bytes, size: int, preprocessing: Preprocessing = "fast") -> Image.Image:
    """Decode to RGB with PIL; ``fast`` lets libjpeg scale down by 1/2, 1/4 or 1/8 while both sides stay >= ``size``."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG":
            raise CorruptImage(f"not a JPEG ({img.format})")
        if preprocessing == "fast":
            img.draft("RGB", (size, size))
        return img.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImage(str(err)) from None


def decode_resized(data: bytes, size: int, preprocessing: Preprocessing = "fast") -> np.ndarray:
    """JPEG bytes -> uint8 S×S×3 (the aspect is not kept, as published). ``fast`` resizes with PIL (an antialiased
    bilinear filter); ``original`` with torch's bilinear interpolation without antialiasing."""
    img = decode_pil(data, size, preprocessing)
    if preprocessing == "fast":
        return np.asarray(img.resize((size, size), Image.BILINEAR))
    import torch

    from ray_landmark.data.transforms import resize_tensor

    chw = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return resize_tensor(chw, size, preprocessing).permute(1, 2, 0).numpy()
