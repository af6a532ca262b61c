"""Mixed precision in one place: which autocast dtype a device gets, and the scaled optimizer step.

The training loop, validation, the embedding job and the GPU benchmarks all use it, so that what a benchmark times is
the step the loop runs. Needs torch alone (the GPU machine has no Ray and no pydantic).

    precision = MixedPrecision(device, enabled=cfg.train.amp)
    with precision.autocast():
        loss = model(images, labels)["loss"]
    precision.backward(loss, accumulation=grad_accum)
    precision.step(optimizer, params, grad_clip)      # every grad_accum micro-batches
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 (with a grad scaler) on older GPUs such as V100; none on the CPU, where
    the models run in fp32."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class MixedPrecision:
    """Autocast plus, for fp16 only, a GradScaler (bf16 has fp32's range and needs none)."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device_type = device.type
        self.dtype = autocast_dtype(device, enabled)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, accumulation: int = 1) -> None:
        """Gradients of ``loss`` (one of ``accumulation`` micro-batches of a step), scaled under fp16."""
        self.scaler.scale(loss / accumulation).backward()

    def step(self, optimizer: torch.optim.Optimizer, params=(), grad_clip: float = 0.0) -> None:
        """One optimizer step on the accumulated gradients (clipped to ``grad_clip`` when set), then zeroes them.
        Under fp16 a step whose gradients overflowed is skipped and the scale lowered."""
        if grad_clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
