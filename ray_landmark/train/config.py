"""The ``train`` section: the optimisation recipe and the Ray Train resources (docs/method.md §4)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_landmark.config_base import Section


class TrainConfig(Section):
    # Length of the cosine schedule; stop_at ends training earlier (the published "40 (29)").
    epochs: int = Field(gt=0)
    stop_at: int | None = Field(None, gt=0)
    batch_size: int = Field(gt=0, description="images per worker per step")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # adam (the 2021 models; coupled weight decay), adamw (decoupled) or sgd with momentum (2020 2nd-place B5).
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    # After the linear warm-up: cosine decay to 0 over `epochs`, or the constant lr (2020 2nd-place B5).
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    # The warm-up's first lr as a fraction of lr: ~0 for the 2021 models, 0.1 for the 2020 3rd-place recipe (its
    # warm-up ends at 10x its base lr, so lr here is that peak).
    warmup_start: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    # torch.compile of the model (models/torch_compile.py): auto = on when the worker has a GPU. compile_backend
    # aot_eager traces the same graphs without generating code (CPU tests, telling inductor problems apart).
    compile: Literal["auto"] | bool = "auto"
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    # Ray Train resources: the published recipes use 8 GPU workers. At least one: Ray Train's local mode (0) trains in
    # the driver and keeps its checkpoints in a temporary folder, which is gone when the job ends.
    num_workers: int = Field(8, ge=1)
    use_gpu: bool = True
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(3, ge=0)
    # Checkpointing: every epoch, and mid-epoch every N steps and/or every M minutes on rank 0's clock when set
    # (train/checkpoint_clock.py); keep the last K, and with keep_epoch_checkpoints every epoch-end one besides the
    # last K mid-epoch ones (runs/checkpoint.prune_checkpoints).
    checkpoint_every_steps: int | None = Field(None, gt=0)
    checkpoint_every_minutes: float | None = Field(None, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    keep_epoch_checkpoints: bool = False
    eval_every: int = Field(1, ge=1)
    # Validate the untrained (or warm-started) model first: the baseline every later epoch is compared against.
    validate_before_training: bool = False
    # Transfer between recipe steps: start from another run's checkpoint (folder or URI), dropping tensors whose
    # names match drop_keys, and train only parameters matching trainable (all when empty).
    init_from: str | None = None
    drop_keys: list[str] = []
    trainable: list[str] = []

    @property
    def last_epoch(self) -> int:
        """The epoch training ends after: ``stop_at`` if set, else ``epochs``."""
        return self.stop_at or self.epochs

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers_not_local_mode(cls, value):
        if value == 0:
            raise ValueError("0 (Ray Train's local mode, in the driver) keeps no checkpoint once the job ends; use 1 "
                             "or more workers (1 trains in one worker process)")
        return value

    @model_validator(mode="after")
    def _stop_within_schedule(self):
        if self.stop_at is not None and self.stop_at > self.epochs:
            raise ValueError(f"train.stop_at ({self.stop_at}) is past train.epochs ({self.epochs})")
        return self
