"""Sub-center ArcFace head and loss with dynamic margins (docs/method.md §2 "Head" and §3).

The head holds the class weights (C·k x D, the k sub-centres of class c in rows c·k .. c·k+k-1) and returns one
cosine per class, the max over its sub-centres. The loss adds the additive angular margin of the target class and
applies softmax cross-entropy. Both run in fp32 with autocast disabled, whatever the caller's precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ray_landmark.errors import ConfigError


class SubCenterArcFaceHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, subcenters: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.subcenters = subcenters
        self.weight = nn.Parameter(torch.empty(num_classes * subcenters, in_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """B x D embeddings (any dtype) -> B x C cosines in fp32."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cosine = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
            if self.subcenters > 1:
                cosine = cosine.view(-1, self.num_classes, self.subcenters).amax(dim=2)
            return cosine

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, num_classes={self.num_classes}, subcenters={self.subcenters}"


def dynamic_margins(class_counts: Sequence[int] | torch.Tensor, a: float = 0.45, b: float = 0.05,
                    power: float = 0.25) -> torch.Tensor:
    """Per-class margins ``a * minmax(n_c ** -power) + b``: b for the most frequent class, a + b for the rarest.

    Every class must occur (n_c >= 1). When all classes are equally frequent none is rarer than another and every
    class gets the middle of the range, b + a / 2.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ConfigError(f"class_counts: expected one count per class, got shape {tuple(counts.shape)}")
    if (counts < 1).any():
        missing = torch.nonzero(counts < 1).flatten()[:10].tolist()
        raise ConfigError(f"class_counts: every class must occur in the training set; no images for class ids "
                          f"{missing}{' ...' if (counts < 1).sum() > 10 else ''}")
    t = counts.pow(-power)
    spread = t.max() - t.min()
    if spread == 0:
        return torch.full_like(t, b + a / 2).float()
    return (a * (t - t.min()) / spread + b).float()


class ArcFaceLoss(nn.Module):
    """Cross-entropy on ``s · cos(θ + m_y)`` for the target class y and ``s · cos θ`` for the others.

    ``cos(θ + m)`` is used while θ + m <= π; past that, where it would stop decreasing, ``cos θ - m·sin m``.
    Margins are a non-persistent buffer: they come from the current run's class counts, not from a checkpoint.
    """

    def __init__(self, margins: torch.Tensor, scale: float, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("margins", margins.float(), persistent=False)
        self.scale = float(scale)  # a config read without validation may give an int
        self.label_smoothing = float(label_smoothing)

    def logits(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """B x C fp32 cosines and B labels -> B x C logits with the target's margin applied."""
        cosine = cosine.float()
        m = self.margins[labels]
        target = labels[:, None]
        cos_t = cosine.gather(1, target).squeeze(1)
        # The clamp keeps sqrt's gradient finite when an embedding coincides with its class centre.
        sin_t = (1.0 - cos_t.square()).clamp(min=1e-7).sqrt()
        phi = cos_t * torch.cos(m) - sin_t * torch.sin(m)
        phi = torch.where(cos_t > torch.cos(math.pi - m), phi, cos_t - m * torch.sin(m))
        return cosine.scatter(1, target, phi[:, None]) * self.scale

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=cosine.device.type, enabled=False):
            return F.cross_entropy(self.logits(cosine, labels), labels, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"classes={self.margins.numel()}, scale={self.scale}, label_smoothing={self.label_smoothing}"
