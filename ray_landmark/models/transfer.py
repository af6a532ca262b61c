"""Passing weights between recipe steps (docs/method.md §2.2, §4).

``warm_start`` loads another step's state dict non-strictly, dropping named tensors (hybrid step 4 drops the 1x1
projection, whose input channels change) and skipping shape mismatches; the report names every key that was not
loaded. ``freeze_except`` trains only the parameters matching given patterns (hybrid step 2 trains the CNN
embedder alone).

Patterns are shell-style globs matched against full names (``fnmatch``), e.g. ``encoder.swin.patch_embed.*``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn

from ray_landmark.errors import ConfigError


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _check_patterns_used(patterns: Sequence[str], names: Sequence[str], field_name: str) -> None:
    # A pattern that matches nothing is almost always a typo, which would otherwise silently train/load everything.
    unused = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if unused:
        example = f" (names look like {names[0]!r})" if names else ""
        raise ConfigError(f"{field_name}: pattern(s) {unused} match no tensor name{example}")


def freeze_except(model: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Set ``requires_grad`` to train only parameters matching ``trainable`` (all of them when empty); returns
    the names of the trainable parameters. Frozen BatchNorm layers still update their running statistics in train
    mode."""
    names = [name for name, _ in model.named_parameters()]
    _check_patterns_used(trainable, names, "train.trainable")
    kept = []
    for name, param in model.named_parameters():
        param.requires_grad_(not trainable or _matches(name, trainable))
        if param.requires_grad:
            kept.append(name)
    return kept


@dataclass
class TransferReport:
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # in the checkpoint, matched a drop pattern
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint: keep their init
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    shape_mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, checkpoint, model)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for label, names in (("dropped", self.dropped), ("missing (kept initial values)", self.missing),
                             ("unexpected (ignored)", self.unexpected)):
            if names:
                lines.append(f"{label}: {', '.join(names)}")
        if self.shape_mismatched:
            lines.append("shape mismatch (kept initial values): " + ", ".join(
                f"{name} {list(src)} -> {list(dst)}" for name, src, dst in self.shape_mismatched))
        return "\n".join(lines)


def warm_start(model: nn.Module, state_dict: Mapping[str, torch.Tensor], drop: Sequence[str] = ()) -> TransferReport:
    """Load ``state_dict`` into ``model`` non-strictly: tensors matching ``drop`` and tensors whose shape differs
    are skipped; every key not loaded is reported by name."""
    _check_patterns_used(drop, list(state_dict), "train.drop_keys")
    own = model.state_dict()
    report = TransferReport()
    to_load = {}
    for name, tensor in state_dict.items():
        if _matches(name, drop):
            report.dropped.append(name)
        elif name not in own:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(own[name].shape):
            report.shape_mismatched.append((name, tuple(tensor.shape), tuple(own[name].shape)))
        else:
            to_load[name] = tensor
    result = model.load_state_dict(to_load, strict=False)
    report.loaded = list(to_load)
    report.missing = [name for name in result.missing_keys if name not in state_dict]
    return report
