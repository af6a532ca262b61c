"""Build a landmark model from the ``model`` and ``loss`` config sections.

Interface (what the training loop, the batch embedding job and export use):

* ``model = build_model(cfg.model, cfg.loss, num_classes, cfg.data.image_size, class_counts)``
* Inputs are float NCHW images (3 x S x S), already normalised with ImageNet mean/std (the training loop converts
  uint8 and normalises on the device); ``channels_last`` memory format is fine.
* ``model(images, labels)`` -> ``{"embeddings": B x 512 neck output (not normalised), "cosine": B x C fp32,
  "loss": fp32 scalar}``; without labels there is no "loss". Call it under ``torch.autocast``: the backbone runs in
  reduced precision, the head's cosines and the ArcFace loss run in fp32.
* ``embed(model, images)`` -> B x 512 L2-normalised fp32 embeddings, without the head (also through a
  DistributedDataParallel wrapper).
* ``class_counts`` (images per class id in the training set) is needed for the loss with dynamic margins; without
  it the model embeds and classifies but ``model(images, labels)`` raises.

State-dict keys: ``encoder.*`` (the family's network up to the neck), ``head.weight`` (C·k x 512). Transfer between
recipe steps lives in ``transfer.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ray_landmark.config_base import ConfigError
from ray_landmark.models.arcface import ArcFaceLoss, SubCenterArcFaceHead, dynamic_margins
from ray_landmark.models.config import DolgConfig, EfficientNetConfig, HybridSwinConfig, LossConfig, ModelConfig
from ray_landmark.models.dolg import DolgEmbedder
from ray_landmark.models.efficientnet import EfficientNetEmbedder
from ray_landmark.models.hybrid_swin import HybridSwinEmbedder


class LandmarkModel(nn.Module):
    def __init__(self, encoder: nn.Module, head: SubCenterArcFaceHead, loss: ArcFaceLoss | None):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.loss = loss

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(images).float(), dim=1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        embeddings = self.encoder(images)
        out = {"embeddings": embeddings, "cosine": self.head(embeddings)}
        if labels is not None:
            if self.loss is None:
                raise RuntimeError("this model has no loss: dynamic margins need class_counts in build_model")
            out["loss"] = self.loss(out["cosine"], labels)
        return out


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised embeddings of ``images`` (normalised float NCHW), skipping the ArcFace head."""
    return getattr(model, "module", model).embed(images)


def build_encoder(cfg: ModelConfig, image_size: int) -> nn.Module:
    """The family's network from images to the (un-normalised) embedding."""
    if isinstance(cfg, DolgConfig):
        return DolgEmbedder(cfg)
    if isinstance(cfg, HybridSwinConfig):
        return HybridSwinEmbedder(cfg, image_size)
    if isinstance(cfg, EfficientNetConfig):
        return EfficientNetEmbedder(cfg)
    raise ConfigError(f"model.arch: no builder for {type(cfg).__name__}")


def build_loss(cfg: LossConfig, num_classes: int,
               class_counts: Sequence[int] | torch.Tensor | None) -> ArcFaceLoss | None:
    if cfg.margin is not None:
        margins = torch.full((num_classes,), cfg.margin)
    elif class_counts is None:
        return None
    else:
        margins = dynamic_margins(class_counts, cfg.margin_a, cfg.margin_b, cfg.margin_power)
        if margins.numel() != num_classes:
            raise ConfigError(f"class_counts: {margins.numel()} counts for num_classes={num_classes}")
    return ArcFaceLoss(margins, cfg.scale, cfg.label_smoothing)


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig, num_classes: int, image_size: int,
                class_counts: Sequence[int] | torch.Tensor | None = None) -> LandmarkModel:
    if num_classes < 1:
        raise ConfigError(f"num_classes: must be at least 1 (got {num_classes})")
    encoder = build_encoder(model_cfg, image_size)
    head = SubCenterArcFaceHead(model_cfg.embedding_dim, num_classes, loss_cfg.subcenters)
    return LandmarkModel(encoder, head, build_loss(loss_cfg, num_classes, class_counts))
