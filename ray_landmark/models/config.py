"""The ``model`` and ``loss`` sections (docs/method.md §2 and §3).

``model`` is one of three families, chosen by ``arch``; each family accepts only its own keys. The image size is not
here: it is ``data.image_size`` and the builder takes it as an argument.

The model classes take these keys as plain keyword arguments (``factory.py`` passes them), with the same defaults as
here (tests/test_models_without_pydantic.py checks that they agree).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Field, model_validator

from ray_landmark.config_base import Section

# EfficientNet feature levels, named by their stride with the standard stride-2 stem.
LevelStride = Literal[2, 4, 8, 16, 32]


def _check_timm_name(name: str) -> str:
    """Unknown timm models fail at config load, before any cluster resource is requested."""
    import timm  # imported here: loading a config should not pay for timm unless a model section is present

    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        raise ValueError(f"unknown timm model '{base}'")
    if tag and name not in timm.list_pretrained(base + ".*"):
        raise ValueError(f"timm has no pretrained tag '{tag}' for '{base}' (see timm.list_pretrained('{base}.*'))")
    return name


TimmModelName = Annotated[str, AfterValidator(_check_timm_name)]


class _EfficientNetBased(Section):
    # A timm EfficientNet, optionally with a pretrained tag, e.g. tf_efficientnet_b5.ns_jft_in1k.
    backbone: TimmModelName
    # timm's ImageNet weights (downloaded on first use); tests and tiny configs use false (no internet there).
    pretrained: bool = True
    # Stride of the stem convolution: 1 doubles every feature map (the published alternative to larger images).
    stem_stride: Literal[1, 2] = 2
    embedding_dim: int = Field(512, gt=0)


class DolgConfig(_EfficientNetBased):
    """DOLG-EfficientNet (docs/method.md §2.1)."""

    arch: Literal["dolg"]
    # Dilations of the three parallel 3x3 convolutions of the local branch: B5 (6, 12, 18); B6 and B7 (3, 6, 9).
    dilations: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]
    # exact: f_l minus its projection on f_g (divides by |f_g|^2); published: divides by |f_g| as the released code.
    fusion: Literal["exact", "published"] = "exact"
    # Width C of the local and global branches (each dilated conv has C / 2): 1024 as published. The tiny configs
    # shrink it, as they shrink the hybrid's Swin: on a CPU a 1024-wide head costs more than the tiny backbone.
    channels: int = Field(1024, ge=2, multiple_of=2)


class HybridSwinConfig(_EfficientNetBased):
    """EfficientNet feature map as the token embedding of a Swin transformer (docs/method.md §2.2)."""

    arch: Literal["hybrid_swin"]
    swin: TimmModelName
    # Extra keyword arguments for timm.create_model of the Swin (the tiny configs shrink it with these).
    swin_kwargs: dict[str, Any] = {}
    # The EfficientNet level whose map becomes the tokens, named by its stride with a stride-2 stem; null keeps
    # Swin's own 4x4 patch embedding (recipe step 1, plain Swin), and then there is no backbone.
    # The EfficientNet's blocks after that level are not built.
    cnn_level: LevelStride | None
    backbone: TimmModelName | None = None

    @model_validator(mode="after")
    def _backbone_iff_cnn_level(self):
        if self.cnn_level is not None and self.backbone is None:
            raise ValueError("model.backbone (an EfficientNet) is required when model.cnn_level is set")
        if self.cnn_level is None and self.backbone is not None:
            raise ValueError("model.backbone is unused when model.cnn_level is null (plain Swin); remove it")
        return self


class EfficientNetConfig(_EfficientNetBased):
    """Plain EfficientNet with a small neck (docs/method.md §2.3)."""

    arch: Literal["efficientnet"]
    # Pooling of the backbone's final (conv_head) features: avg as the 2020 3rd place, gem as the 2020 2nd place.
    pool: Literal["avg", "gem"] = "avg"
    # Whether GeM's exponent p (initialised 3) is learnt; the 2020 2nd-place B5 keeps it fixed.
    gem_trainable: bool = True
    # linear_swish: Linear -> SiLU (2020 3rd place); linear_bn: Linear -> BatchNorm1d (2020 2nd place);
    # linear_bn_prelu: Linear -> BatchNorm1d -> PReLU (the 2021 "option-D" neck).
    neck: Literal["linear_swish", "linear_bn", "linear_bn_prelu"] = "linear_swish"


ModelConfig = Annotated[Union[DolgConfig, HybridSwinConfig, EfficientNetConfig], Field(discriminator="arch")]


class LossConfig(Section):
    """Sub-center ArcFace on the embedding, with per-class (dynamic) or fixed margins."""

    # Sub-centres per class; 1 is plain ArcFace.
    subcenters: int = Field(3, ge=1)
    # Logit scale s: 45 for the 2021 models, 80 and 30 for the 2020 recipes.
    scale: float = Field(45.0, gt=0)
    # One margin for every class; null derives per-class margins from the training set's class counts:
    # m_c = margin_a * minmax(n_c ** -margin_power) + margin_b (rare classes get the largest margins).
    margin: float | None = Field(None, ge=0)
    margin_a: float = Field(0.45, ge=0)
    margin_b: float = Field(0.05, ge=0)
    margin_power: float = Field(0.25, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
