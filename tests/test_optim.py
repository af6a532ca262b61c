"""The optimizer and the learning-rate schedule of a ``train`` section (train/optim.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_landmark.config import load_config
from ray_landmark.train.optim import build_optimizer, build_scheduler, lr_multiplier, resume_schedule

REPO = Path(__file__).resolve().parents[1]


def test_warm_up_from_a_fraction_of_the_peak_then_cosine_or_constant():
    def lrs(**kw):
        return [lr_multiplier(s, warmup_steps=2, total_steps=6, **kw) for s in range(7)]

    assert lrs(schedule="cosine", warmup_start=0.0) == pytest.approx([0.5, 1, 1, 0.8536, 0.5, 0.1464, 0], abs=1e-4)
    assert lrs(schedule="cosine", warmup_start=0.1)[:2] == pytest.approx([0.55, 1.0])
    assert lrs(schedule="constant", warmup_start=0.0)[2:] == [1.0] * 5


def test_sgd_takes_the_recipe_momentum_and_weight_decay():
    tc = load_config(REPO / "configs" / "recipes" / "efficientnet_b5.yaml").train
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], tc)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 1e-5


def _run(tc, steps_per_epoch: int):
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], tc)
    return optimizer, build_scheduler(optimizer, tc, steps_per_epoch)


def test_a_resume_with_other_steps_per_epoch_continues_the_schedule_at_the_same_point_of_its_epochs():
    tc = load_config(REPO / "configs" / "tiny_dolg.yaml", ["train.epochs=4", "train.warmup_epochs=1"]).train
    # Saved in the middle of epoch 2 by a run of 10 steps an epoch (15 steps done: 1.5 of 4 epochs)...
    optimizer, scheduler = _run(tc, 10)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
    lr_when_saved = optimizer.param_groups[0]["lr"]
    saved = optimizer.state_dict(), scheduler.state_dict()
    # ... resumed by one of 4 steps an epoch (more workers, or grad_accum): 1.5 epochs are 6 of its 16 steps.
    optimizer, scheduler = _run(tc, 4)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert resume_schedule(scheduler, epoch=1, epoch_step=5, saved_steps_per_epoch=10, steps_per_epoch=4) == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_when_saved) and lr_when_saved > 0.5 * tc.lr
    for _ in range(16 - 6):  # the rest of the run: the cosine reaches 0 at its last step, not before
        assert optimizer.param_groups[0]["lr"] > 0
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0, abs=1e-12)
    # The same steps per epoch, or a checkpoint that did not record them: nothing moves.
    assert resume_schedule(scheduler, epoch=1, epoch_step=5, saved_steps_per_epoch=4, steps_per_epoch=4) == 5
    assert resume_schedule(scheduler, epoch=1, epoch_step=5, saved_steps_per_epoch=0, steps_per_epoch=4) == 5
    assert scheduler.last_epoch == 16
