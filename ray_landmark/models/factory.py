"""Build a landmark model from the ``model`` and ``loss`` config sections: the one place where config becomes the
model classes' keyword arguments (the classes take plain arguments, as timm's do, and need torch and timm alone).

Interface (what the training loop and ``runs/checkpoint.py``'s loader, hence embedding, export and serving, use):

* ``model = build_model(cfg.model, cfg.loss, num_classes, cfg.data.image_size, class_counts)``. The sections may also
  be plain dicts with the same keys, e.g. a config file's ``model`` and ``loss`` read with PyYAML where pydantic is not
  installed (the GPU benchmarks); those are not validated (``load_config`` validates), and a key left out takes the
  default of the argument it fills.
* Inputs are float NCHW images (3 x S x S), already normalised with ImageNet mean/std (the training loop converts
  uint8 and normalises on the device); ``channels_last`` memory format is fine.
* ``model(images, labels)`` -> ``{"embeddings": B x 512 neck output (not normalised), "cosine": B x C fp32,
  "loss": fp32 scalar}``; without labels there is no "loss". Call it under ``torch.autocast``: the backbone runs in
  reduced precision, the head's cosines and the ArcFace loss run in fp32.
* ``model.embed(images)`` -> B x 512 L2-normalised fp32 embeddings, without the head.
* ``class_counts`` (images per class id in the training set) is needed for the loss with dynamic margins; without
  it the model embeds and classifies but ``model(images, labels)`` raises.

State-dict keys: ``encoder.*`` (the family's network up to the neck), ``head.weight`` (C·k x 512). Transfer between
recipe steps lives in ``transfer.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ray_landmark.errors import ConfigError
from ray_landmark.models.arcface import ArcFaceLoss, SubCenterArcFaceHead, dynamic_margins
from ray_landmark.models.dolg import DolgEmbedder
from ray_landmark.models.efficientnet import EfficientNetEmbedder
from ray_landmark.models.hybrid_swin import HybridSwinEmbedder

if TYPE_CHECKING:  # only for the annotations: building a model must not need pydantic
    from ray_landmark.models.config import LossConfig, ModelConfig


class LandmarkModel(nn.Module):
    def __init__(self, encoder: nn.Module, head: SubCenterArcFaceHead, loss: ArcFaceLoss | None):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.loss = loss

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of ``images`` (normalised float NCHW), skipping the ArcFace head."""
        return F.normalize(self.encoder(images).float(), dim=1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        embeddings = self.encoder(images)
        out = {"embeddings": embeddings, "cosine": self.head(embeddings)}
        if labels is not None:
            if self.loss is None:
                raise RuntimeError("this model has no loss: dynamic margins need class_counts in build_model")
            out["loss"] = self.loss(out["cosine"], labels)
        return out


def build_encoder(model: ModelConfig | Mapping[str, Any], image_size: int) -> nn.Module:
    """The family named by ``arch``, from images to the (un-normalised) embedding."""
    kwargs = dict(model)  # a section's fields or the dict's keys: the class's keyword arguments, and arch
    arch = kwargs.pop("arch", None)
    if arch == "dolg":
        return DolgEmbedder(**kwargs)
    if arch == "hybrid_swin":
        return HybridSwinEmbedder(image_size=image_size, **kwargs)
    if arch == "efficientnet":
        return EfficientNetEmbedder(**kwargs)
    raise ConfigError(f"model.arch: '{arch}' is not one of dolg, hybrid_swin, efficientnet")


def build_arcface(in_features: int, num_classes: int, class_counts: Sequence[int] | torch.Tensor | None = None, *,
                  subcenters: int = 3, scale: float = 45.0, margin: float | None = None, margin_a: float = 0.45,
                  margin_b: float = 0.05, margin_power: float = 0.25,
                  label_smoothing: float = 0.0) -> tuple[SubCenterArcFaceHead, ArcFaceLoss | None]:
    """The head and the loss; the keyword arguments are the ``loss`` section's keys (models/config.py says what each
    means). No loss when the margins are dynamic and ``class_counts`` is None."""
    head = SubCenterArcFaceHead(in_features, num_classes, subcenters)
    if margin is not None:
        margins = torch.full((num_classes,), margin)
    elif class_counts is None:
        return head, None
    else:
        margins = dynamic_margins(class_counts, margin_a, margin_b, margin_power)
        if margins.numel() != num_classes:
            raise ConfigError(f"class_counts: {margins.numel()} counts for num_classes={num_classes}")
    return head, ArcFaceLoss(margins, scale, label_smoothing)


def build_model(model: ModelConfig | Mapping[str, Any], loss: LossConfig | Mapping[str, Any], num_classes: int,
                image_size: int, class_counts: Sequence[int] | torch.Tensor | None = None) -> LandmarkModel:
    if num_classes < 1:
        raise ConfigError(f"num_classes: must be at least 1 (got {num_classes})")
    encoder = build_encoder(model, image_size)
    head, arcface_loss = build_arcface(encoder.embedding_dim, num_classes, class_counts, **dict(loss))
    return LandmarkModel(encoder, head, arcface_loss)
