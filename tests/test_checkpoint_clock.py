"""``train.checkpoint_every_minutes``'s clock, driven by a fake clock; the ranks' agreement is checked by a real run
(tests/test_training.py), where rank 0 alone is slow at one step and both ranks report there."""

from __future__ import annotations

from ray_landmark.train.checkpoint_clock import CheckpointClock


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_clock_is_due_once_its_minutes_have_passed_since_the_last_checkpoint():
    fake = FakeClock()
    clock = CheckpointClock(0.5, world=1, clock=fake)
    fake.now += 29.9
    assert not clock.due()
    fake.now += 0.1
    assert clock.due() and clock.due()  # due until a checkpoint restarts it
    clock.restart()
    fake.now += 29
    assert not clock.due()
    fake.now += 1
    assert clock.due()


def test_without_minutes_the_clock_is_never_due_and_takes_no_part_in_collectives():
    # Eight ranks, but no process group exists here: a broadcast, or making the flag's group, would raise.
    fake = FakeClock()
    clock = CheckpointClock(None, world=8, clock=fake)
    fake.now += 1e9
    assert not clock.due()
