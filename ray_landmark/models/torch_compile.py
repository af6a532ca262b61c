"""torch.compile in training (``train.compile``) and in the embedding job (``embed.compile``), done one way for both.

* In place (``nn.Module.compile``): the model keeps its class and parameter names, so state-dict keys never carry the
  ``_orig_mod.`` prefix of a ``torch.compile(model)`` wrapper. A checkpoint is the same with and without compile, and
  resuming or warm starting (``train.init_from``) works across the setting.
* Training compiles the whole model, the ArcFace head and loss with the encoder. Measured on the CPU (tiny DOLG,
  81,313 classes; BENCHMARKS.md) that ran at 2.2x the images/s of compiling the encoder alone, which was no faster
  than eager there: inductor fuses the normalisation of the head's large weight matrix and the loss around the
  matrix product. On a GPU at the recipes' sizes the head is a smaller share of the step;
  ``benchmarks/gpu_compile.py --scopes model,encoder`` compares the two there. Validation calls the same model, in
  evaluation mode.
* The embedding job runs ``model.embed``, the encoder alone, and compiles just that.
* Compiled before DDP wraps the model: DDP then calls the compiled model inside its forward, where dynamo splits the
  graph at DDP's gradient buckets (its DDPOptimizer), so the all-reduce still overlaps the backward. ``no_sync``
  under gradient accumulation, the grad scaler and the autocast around the call stay outside the graph; parameters
  frozen by ``train.trainable`` are frozen before the first call traces the graph.
* Shapes are fixed: training batches are all full (drop_last), and validation and the embedding job pad their short
  batches (``pad_batch``), so a run compiles once for training and once for evaluation mode.

Neither Ray nor the config classes are imported here: benchmarks/gpu_compile.py compiles through this module on GPU
machines that have neither.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_wanted(setting: bool | str, device: torch.device) -> bool:
    """``true``, ``false``, or ``auto``: on where the worker has a GPU. On the CPU a cold compile takes one to two
    minutes per tiny model on 2 cores (BENCHMARKS.md), longer than the CPU runs (tests, the quickstart) train."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def compile_for_training(model: nn.Module, backend: str = "inductor") -> None:
    """Compile a ``LandmarkModel`` in place: encoder, head and loss, what training and validation call.

    ``backend``: ``inductor`` generates the fused kernels that give the speed-up; ``aot_eager`` traces the same
    forward and backward graphs but runs them with PyTorch's own kernels (no code generation, no speed-up): for tests
    on the CPU and for telling an inductor problem from a tracing one."""
    model.compile(backend=backend)


def compile_for_embedding(model: nn.Module, backend: str = "inductor") -> None:
    """Compile a ``LandmarkModel``'s encoder in place: all that ``model.embed`` runs."""
    model.encoder.compile(backend=backend)


def pad_batch(images: torch.Tensor, rows: int) -> torch.Tensor:
    """``images`` with zero images appended up to ``rows``, so that a compiled model sees one batch shape (another
    shape would compile another graph). In evaluation mode every image is processed on its own, so the padding
    changes no real row; the caller drops the rows it added."""
    if len(images) >= rows:
        return images
    return torch.cat([images, images.new_zeros((rows - len(images), *images.shape[1:]))])
