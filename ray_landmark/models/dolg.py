"""DOLG-EfficientNet (docs/method.md §2.1).

EfficientNet levels at stride 16 (local branch) and 32 (global branch); the network's own conv_head is not built.
local:  multi-atrous (3 dilated 3x3 convs -> 1x1 -> ReLU) -> spatial attention          -> f_l  B x C x H x W
global: 1x1 conv -> BN (eps 1e-3) -> SiLU -> GeM                                          -> f_g  B x C
fusion: [mean over positions of (f_l orthogonal to f_g), f_g] -> neck (Linear -> BN1d -> PReLU) -> embedding
C is ``channels``, 1024 as published, and each dilated conv has C / 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ray_landmark.models.efficientnet import create_efficientnet, level_index
from ray_landmark.models.layers import FusionMode, GeM, MultiAtrous, OrthogonalFusion, SpatialAttention, make_neck


class DolgEmbedder(nn.Module):
    """The arguments are the ``model`` section's keys (models/config.py says what each means)."""

    def __init__(self, backbone: str, dilations: Sequence[int], pretrained: bool = True, stem_stride: int = 2,
                 fusion: FusionMode = "exact", embedding_dim: int = 512, channels: int = 1024):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.backbone = create_efficientnet(backbone, pretrained, stem_stride)
        self.level_indices = [
            level_index(self.backbone, 16, "model.backbone"),
            level_index(self.backbone, 32, "model.backbone"),
        ]
        self.backbone.prune_intermediate_layers(self.level_indices)  # drops conv_head/bn2, unused by DOLG
        local_chs, global_chs = (self.backbone.feature_info[i]["num_chs"] for i in self.level_indices)

        self.local_branch = nn.Sequential(
            MultiAtrous(local_chs, tuple(dilations), branch_chs=channels // 2, out_chs=channels),
            SpatialAttention(channels),
        )
        self.global_branch = nn.Sequential(
            nn.Conv2d(global_chs, channels, 1),
            nn.BatchNorm2d(channels, eps=1e-3),
            nn.SiLU(inplace=True),
            GeM(),
        )
        self.fusion = OrthogonalFusion(fusion)
        self.neck = make_neck(2 * channels, embedding_dim, "linear_bn_prelu")

    def feature_levels(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's stride-16 and stride-32 maps (halved strides with a stride-1 stem)."""
        local_map, global_map = self.backbone.forward_intermediates(
            images, indices=self.level_indices, intermediates_only=True, stop_early=True
        )
        return local_map, global_map

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        local_map, global_map = self.feature_levels(images)
        fused = self.fusion(self.local_branch(local_map), self.global_branch(global_map))
        return self.neck(fused)
