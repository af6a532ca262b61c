"""Small building blocks shared by the model families: GeM pooling, the necks, DOLG's multi-atrous block, spatial
attention and orthogonal fusion (docs/method.md §2)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """Generalised mean pooling over H and W: ``mean(clamp(x, eps) ** p) ** (1 / p)``, NCHW -> NC.

    Computed in fp32: the cube of fp16 activations overflows easily under mixed precision.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, trainable: bool = True):
        super().__init__()
        p_tensor = torch.full((1,), float(p))
        if trainable:
            self.p = nn.Parameter(p_tensor)
        else:
            self.register_buffer("p", p_tensor)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        return x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, trainable={isinstance(self.p, nn.Parameter)}"


NeckKind = Literal["linear_bn_prelu", "linear_swish", "linear_bn"]


def make_neck(in_features: int, out_features: int, kind: NeckKind = "linear_bn_prelu") -> nn.Sequential:
    """Linear projection to the embedding size followed by the recipe's normalisation/activation."""
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    if kind == "linear_bn_prelu":  # the 2021 models' "option-D"
        layers += [nn.BatchNorm1d(out_features), nn.PReLU()]
    elif kind == "linear_swish":
        layers += [nn.SiLU()]
    elif kind == "linear_bn":
        layers += [nn.BatchNorm1d(out_features)]
    else:
        raise ValueError(f"unknown neck '{kind}'")
    return nn.Sequential(*layers)


class MultiAtrous(nn.Module):
    """Parallel dilated 3x3 convolutions (with bias, no BN), concatenated, then 1x1 -> ReLU.

    Unlike the DOLG paper there is no image-pooling branch, as in the published model.
    """

    def __init__(self, in_chs: int, dilations: tuple[int, ...], branch_chs: int = 512, out_chs: int = 1024):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_chs, branch_chs, 3, padding=d, dilation=d) for d in dilations  # padding=d keeps H x W
        )
        self.proj = nn.Conv2d(branch_chs * len(dilations), out_chs, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(torch.cat([branch(x) for branch in self.branches], dim=1)))


class SpatialAttention(nn.Module):
    """DOLG's local attention: the channel-normalised features weighted by a Softplus score per position."""

    def __init__(self, chs: int = 1024):
        super().__init__()
        self.conv = nn.Conv2d(chs, chs, 1)
        self.bn = nn.BatchNorm2d(chs)
        self.act = nn.ReLU()
        self.score = nn.Conv2d(chs, 1, 1)
        self.softplus = nn.Softplus()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        features = F.normalize(x, p=2, dim=1)
        attention = self.softplus(self.score(self.act(x)))
        return attention * features


FusionMode = Literal["exact", "published"]


def orthogonal_component(f_local: torch.Tensor, f_global: torch.Tensor, mode: FusionMode = "exact") -> torch.Tensor:
    """``f_l - (<f_l, f_g> / d) f_g`` at every position of f_l (B x C x H x W), with f_g of shape B x C.

    ``exact``: d = |f_g|^2, the orthogonal projection. ``published``: d = |f_g|, as the released DOLG-EfficientNet
    code, which is orthogonal only when |f_g| = 1.
    """
    f_global = f_global.float()
    f_local = f_local.float()
    norm = f_global.norm(p=2, dim=1)
    denominator = norm.square() if mode == "exact" else norm
    dot = torch.einsum("bchw,bc->bhw", f_local, f_global)
    coefficient = dot / denominator[:, None, None]
    return f_local - coefficient[:, None] * f_global[:, :, None, None]


class OrthogonalFusion(nn.Module):
    """Concatenate the orthogonal local part with f_g and average over positions: B x 2C.

    Averaging commutes with the concatenation, so f_g is concatenated after pooling instead of being broadcast to
    every position first (same result, without the B x 2C x H x W tensor). Runs in fp32: |f_g|^2 overflows fp16.
    """

    def __init__(self, mode: FusionMode = "exact"):
        super().__init__()
        self.mode = mode

    def forward(self, f_local: torch.Tensor, f_global: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=f_local.device.type, enabled=False):
            f_orth = orthogonal_component(f_local, f_global, self.mode)
            return torch.cat([f_orth.mean(dim=(2, 3)), f_global.float()], dim=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"
