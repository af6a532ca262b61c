"""Hybrid EfficientNet + Swin transformer (docs/method.md §2.2).

Swin's 4x4 patch embedding is replaced by an EfficientNet truncated at one feature level and a 1x1 projection to
Swin's width; the level's map (one token per position) goes through all Swin stages, the final norm, a mean over
tokens and the neck (Linear -> BN1d -> PReLU). Swin's stages are built for a fixed token grid, so image size / CNN
stride must equal that grid; construction checks it.

With ``cnn_level: null`` the model keeps Swin's own patch embedding: the plain Swin of the recipe's first step,
whose weights (all keys outside ``encoder.swin.patch_embed``) carry over to the hybrid.

The published models hold the whole EfficientNet feature extractor (through the stride-32 level), although only one
level feeds the tokens; here the blocks after that level are not built. Outputs are identical; parameter counts are
lower by those blocks (tests/test_models.py checks both numbers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import nn

from ray_landmark.errors import ConfigError
from ray_landmark.models.efficientnet import create_efficientnet, effective_stride, level_index
from ray_landmark.models.layers import make_neck


class CnnPatchEmbed(nn.Module):
    """EfficientNet (truncated) -> 1x1 conv to the Swin width -> tokens as B x H x W x C, the layout timm's Swin
    stages take."""

    def __init__(self, cnn: nn.Module, cnn_chs: int, embed_dim: int):
        super().__init__()
        self.cnn = cnn
        self.proj = nn.Conv2d(cnn_chs, embed_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.cnn.forward_features(images)).permute(0, 2, 3, 1)


class HybridSwinEmbedder(nn.Module):
    """The arguments are the ``model`` section's keys (models/config.py says what each means) and the image size
    (``data.image_size``), which the token grid must fit."""

    def __init__(self, swin: str, cnn_level: int | None, image_size: int, backbone: str | None = None,
                 pretrained: bool = True, stem_stride: int = 2, swin_kwargs: Mapping[str, Any] | None = None,
                 embedding_dim: int = 512):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.swin = timm.create_model(swin, pretrained=pretrained, num_classes=0, **(swin_kwargs or {}))
        grid = tuple(self.swin.patch_embed.grid_size)
        embed_dim = self.swin.patch_embed.proj.out_channels
        if cnn_level is None:
            token_stride, source = self.swin.patch_embed.patch_size[0], "Swin's patch embedding"
        else:
            cnn = create_efficientnet(backbone, pretrained, stem_stride)
            index = level_index(cnn, cnn_level, "model.cnn_level")
            cnn.prune_intermediate_layers([index])
            token_stride = effective_stride(cnn_level, stem_stride)
            source = f"CNN stride {token_stride} (level {cnn_level}, stem stride {stem_stride})"
            self.swin.patch_embed = CnnPatchEmbed(cnn, cnn.feature_info[index]["num_chs"], embed_dim)
        tokens = image_size // token_stride
        if image_size % token_stride or (tokens, tokens) != grid:
            raise ConfigError(
                f"model: image size {image_size} / {source} = {image_size / token_stride:g} tokens per side, but "
                f"{swin} is built for a {grid[0]}x{grid[1]} token grid; data.image_size={grid[0] * token_stride} "
                f"fits (or change model.cnn_level / model.stem_stride)"
            )
        self.neck = make_neck(self.swin.num_features, embedding_dim, "linear_bn_prelu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.swin.forward_features(images)  # B x H x W x C after the final norm
        return self.neck(tokens.mean(dim=(1, 2)))
