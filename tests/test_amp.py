"""The one mixed-precision step (models/amp.py) that the loop and the GPU benchmarks share."""

import torch

from ray_landmark.models.amp import MixedPrecision, autocast_dtype


def test_no_autocast_on_cpu_or_when_off():
    assert autocast_dtype(torch.device("cpu")) is None
    assert autocast_dtype(torch.device("cuda"), enabled=False) is None
    precision = MixedPrecision(torch.device("cpu"))
    assert precision.dtype is None and not precision.scaler.is_enabled()


def test_accumulated_clipped_step_equals_the_plain_one():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    nets = [torch.nn.Linear(4, 1) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.SGD(net.parameters(), lr=0.1) for net in nets]

    # Plain: the whole batch at once, clipped by hand.
    torch.nn.functional.mse_loss(nets[0](x), y).backward()
    torch.nn.utils.clip_grad_norm_(nets[0].parameters(), 0.05)
    opts[0].step()

    # MixedPrecision: two micro-batches of four, then one clipped step.
    precision = MixedPrecision(torch.device("cpu"))
    for half in (slice(0, 4), slice(4, 8)):
        with precision.autocast():
            loss = torch.nn.functional.mse_loss(nets[1](x[half]), y[half])
        precision.backward(loss, accumulation=2)
    precision.step(opts[1], list(nets[1].parameters()), grad_clip=0.05)

    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b)
        assert b.grad is None  # zeroed (set to None) after the step
