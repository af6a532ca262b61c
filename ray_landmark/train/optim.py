"""The optimizer and the per-step learning-rate schedule a ``train`` section describes (docs/method.md §4).

The 2021 models: Adam, one warm-up epoch from ~0, then cosine decay to 0 over ``epochs``. The 2020 3rd-place
EfficientNets warm up from a tenth of the peak (``warmup_start: 0.1``); the 2020 2nd-place B5 runs SGD with momentum
at a constant rate (``optimizer: sgd``, ``schedule: constant``).
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import torch

from ray_landmark.train.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    optimizer_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return optimizer_cls(params, lr=tc.lr, weight_decay=tc.weight_decay)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: str, warmup_start: float) -> float:
    """The lr at optimizer step ``step`` as a fraction of ``train.lr``: linear warm-up from ``warmup_start`` to 1,
    then cosine decay to 0 at ``total_steps`` or constant."""
    if step < warmup_steps:
        return warmup_start + (1 - warmup_start) * (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig, steps_per_epoch: int):
    """Stepped once per optimizer step; its state (the step count) is saved with each checkpoint."""
    multiplier = functools.partial(
        lr_multiplier, warmup_steps=round(tc.warmup_epochs * steps_per_epoch), total_steps=tc.epochs * steps_per_epoch,
        schedule=tc.schedule, warmup_start=tc.warmup_start,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, epoch: int, epoch_step: int,
                    saved_steps_per_epoch: int, steps_per_epoch: int) -> int:
    """After loading a scheduler saved at ``saved_steps_per_epoch`` optimizer steps per epoch into a run that takes
    ``steps_per_epoch`` (another worker count, batch size or ``grad_accum``): move it, and its optimizer's lr, to the
    same point of its epochs; otherwise the cosine would be read at the wrong step and miss 0 at the last epoch.
    Returns the steps of the current epoch already done, in the new steps. ``saved_steps_per_epoch`` 0 (not recorded)
    or equal: nothing changes."""
    if saved_steps_per_epoch in (0, steps_per_epoch):
        return epoch_step
    epoch_step = min(steps_per_epoch - 1, round(epoch_step * steps_per_epoch / saved_steps_per_epoch))
    position = epoch * steps_per_epoch + epoch_step
    scheduler.last_epoch = position
    for group, base_lr, multiplier in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(position)  # what the next optimizer step uses, as in a run without a break
    return epoch_step
