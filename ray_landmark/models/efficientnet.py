"""timm EfficientNet backbones (stem stride, truncation at a feature level) and the plain EfficientNet model
(docs/method.md §2.3): pooled conv_head features -> neck -> embedding."""

from __future__ import annotations

from typing import Literal

import timm
import torch
from timm.models.efficientnet import EfficientNet
from torch import nn

from ray_landmark.errors import ConfigError
from ray_landmark.models.layers import GeM, NeckKind, make_neck


def create_efficientnet(name: str, pretrained: bool, stem_stride: int, field: str = "model.backbone") -> EfficientNet:
    """A timm EfficientNet without classifier, its stem convolution set to ``stem_stride``.

    Changing the stride after construction keeps the pretrained weights; timm's TF-style 'same' padding is computed
    from the stride at every call, and the symmetric padding of the PyTorch variants is 'same' at stride 1 too.
    """
    model = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")
    if not isinstance(model, EfficientNet):
        raise ConfigError(f"{field}: '{name}' is a {type(model).__name__}, not a timm EfficientNet")
    model.conv_stem.stride = (stem_stride, stem_stride)
    return model


def level_index(model: EfficientNet, level_stride: int, field: str) -> int:
    """Index in ``feature_info`` of the level whose stride (with a stride-2 stem) is ``level_stride``."""
    strides = [info["reduction"] for info in model.feature_info]
    if level_stride not in strides:
        raise ConfigError(f"{field}: the backbone has no stride-{level_stride} level (levels: {strides})")
    return strides.index(level_stride)


def effective_stride(level_stride: int, stem_stride: int) -> int:
    """Stride of a level relative to the input once the stem stride is changed from 2."""
    return level_stride * stem_stride // 2


class EfficientNetEmbedder(nn.Module):
    """Backbone (with its conv_head) -> avg or GeM pooling -> neck. The arguments are the ``model`` section's keys
    (models/config.py says what each means)."""

    def __init__(self, backbone: str, pretrained: bool = True, stem_stride: int = 2,
                 pool: Literal["avg", "gem"] = "avg", gem_trainable: bool = True, neck: NeckKind = "linear_swish",
                 embedding_dim: int = 512):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.backbone = create_efficientnet(backbone, pretrained, stem_stride)
        self.pool = GeM(trainable=gem_trainable) if pool == "gem" else nn.AdaptiveAvgPool2d(1)
        self.neck = make_neck(self.backbone.num_features, embedding_dim, neck)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.backbone.forward_features(images)).flatten(1)
        return self.neck(pooled)
