"""The baseline the data benchmarks set the pipelines against: a torch DataLoader's dataset decoding, resizing and
augmenting one JPEG per item with PIL, as the published solution's loaders do. Needs neither Ray nor pydantic (the GPU
machine has neither)."""

from __future__ import annotations

import numpy as np

from ray_landmark.data.jpeg import decode_resized
from ray_landmark.data.transforms import TrainAugmentation, augment_hwc


class OneByOne:
    """bytes -> uint8 S×S×3: decode and resize one JPEG (fast preprocessing), then augment it alone."""

    def __init__(self, size: int):
        self.size, self.augmentation = size, TrainAugmentation()

    def __call__(self, data: bytes) -> np.ndarray:
        return augment_hwc(decode_resized(data, self.size)[None], self.augmentation)[0]
