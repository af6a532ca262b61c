"""The training loop that every Ray Train worker runs: one readable loop, DDP through ``prepare_model``.

Per step: uint8 images from the data shard -> normalised on the device -> model under autocast -> ArcFace loss in fp32
-> (scaled) backward -> every ``grad_accum`` micro-batches an optimizer step and a per-step cosine/warm-up lr.
Per epoch (and every ``checkpoint_every_steps`` steps): validation, metrics and a checkpoint through
``ray.train.report``, which every rank calls, so all ranks move in lockstep.

With ``train.compile`` the model is compiled before the DDP wrapper (``train/torch_compile.py``); the first training
step and the first validation each compile a graph, and the progress output says so.

Resuming: the latest good checkpoint gives the finished epochs and the optimizer steps already taken in the current
one; that epoch then runs only its remaining steps, so no epoch is trained twice or skipped.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from ray_landmark.config import Config
from ray_landmark.data.pipeline import BYTES_READ, READ, SKIP_REASONS, counts_since, train_batches
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.models.factory import build_model
from ray_landmark.models.transfer import freeze_except, warm_start
from ray_landmark.progress import ProgressLine, relay_printer
from ray_landmark.train.checkpoint import Progress, load_latest_good, read_checkpoint_at, run_logs, save_checkpoint
from ray_landmark.train.metrics_log import MetricsLog
from ray_landmark.train.optim import build_optimizer, build_scheduler, resume_schedule
from ray_landmark.train.torch_compile import compile_for_training, compile_wanted
from ray_landmark.train.validate import validate


@dataclass(frozen=True)
class Worker:
    """What one training worker holds for the whole run: made once, handed to validation and checkpointing."""

    inputs: "WorkerInputs"  # noqa: F821 (ray_landmark.train.trainer; importing it here would be circular)
    rank: int
    world: int
    device: torch.device
    autocast: contextlib.AbstractContextManager  # reusable: torch.autocast, or a no-op on CPU / with amp off
    memory_format: torch.memory_format
    raw_model: torch.nn.Module  # the model without its DDP wrapper: state dicts, evaluation
    compiled: bool  # torch.compile'd (train.compile): validation pads its short batches to one shape

    @property
    def cfg(self) -> Config:
        return self.inputs.config


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 (with a grad scaler) on older GPUs such as V100, off on CPU."""
    if not cfg.train.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class CompileNotices:
    """Progress lines of a compiled model: before the first training step and the first validation, each of which
    compiles a graph (training and evaluation mode differ), that compiling is under way; after it, how long it took."""

    def __init__(self, say, device: torch.device, backend: str | None):
        self.say, self.device, self.backend = say, device, backend
        self.pending = {"training step", "validation"} if backend else set()

    @contextlib.contextmanager
    def first(self, what: str):
        if what not in self.pending:
            yield
            return
        self.pending.remove(what)
        self.say(f"[train] torch.compile ({self.backend}) compiles the model during the first {what}: it takes longer")
        started = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.say(f"[train] the first {what} took {time.perf_counter() - started:.1f} s, compiling included")


def train_loop_per_worker(loop_config: dict) -> dict:
    inputs = loop_config["inputs"]
    cfg: Config = inputs.config
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed + rank)
    say = relay_printer(inputs.console) if rank == 0 else (lambda line, transient=False: None)

    model = build_model(cfg.model, cfg.loss, len(inputs.class_counts), cfg.data.image_size, inputs.class_counts)
    resume = load_latest_good(_reported_checkpoints(), printer=say)
    if resume is None and tc.init_from:
        report = warm_start(model, read_checkpoint_at(tc.init_from, cfg.run.storage).state["model"], tc.drop_keys)
        say(f"[train] warm start from {tc.init_from}: {report.summary()}")
    freeze_except(model, tc.trainable)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    raw_model = model.to(device=device, memory_format=memory_format)
    compiling = compile_wanted(tc.compile, device)
    if compiling:  # before the DDP wrapper: see train/torch_compile.py
        compile_for_training(raw_model, tc.compile_backend)
    notices = CompileNotices(say, device, tc.compile_backend if compiling else None)
    model = ray.train.torch.prepare_model(raw_model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    # Equal shards: each rank sees train_images // world rows and drops its last partial batch.
    batches_per_epoch = inputs.train_images // world // tc.batch_size
    steps_per_epoch = max(1, batches_per_epoch // tc.grad_accum)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch)
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    worker = Worker(inputs, rank, world, device, autocast, memory_format, raw_model, compiling)

    progress = Progress(epoch=0, step=0, epoch_step=0)
    if resume is not None:
        progress = resume.progress
        raw_model.load_state_dict(resume.state["model"])
        optimizer.load_state_dict(resume.state["optimizer"])
        scheduler.load_state_dict(resume.state["scheduler"])
        scaler.load_state_dict(resume.state["scaler"])
        say(f"[train] resumed from {resume.name}: epoch {progress.epoch + 1}, step {progress.step}")
        if progress.steps_per_epoch not in (0, steps_per_epoch):
            say(f"[train] {steps_per_epoch} steps per epoch now, {progress.steps_per_epoch} when it was saved: "
                f"the learning-rate schedule continues at the same point of its epochs")
        progress = replace(progress, epoch_step=resume_schedule(
            scheduler, progress.epoch, progress.epoch_step, progress.steps_per_epoch, steps_per_epoch))

    def report(progress: Progress, metrics: dict) -> None:
        _report(worker, {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}, progress, metrics)

    train_shard = ray.train.get_dataset_shard("train")
    last_epoch = tc.last_epoch
    step = progress.step
    log = MetricsLog(run_logs(cfg.run)) if rank == 0 else None
    if tc.validate_before_training and resume is None:
        with notices.first("validation"):
            baseline = {"epoch": 0, "step": 0, **validate(worker)}
        if log:
            log.write(baseline, step=0)
            say(epoch_summary(baseline))
    metrics: dict = {}
    for epoch in range(progress.epoch, last_epoch):
        model.train()
        skipped_before = ray.get(inputs.skip_counter.totals.remote()) if rank == 0 else {}
        epoch_step = progress.epoch_step if epoch == progress.epoch else 0
        line = ProgressLine(
            f"[train] epoch {epoch + 1}/{last_epoch}",
            total=(steps_per_epoch - epoch_step) * tc.batch_size * tc.grad_accum * world,
            printer=say, interactive_console=inputs.interactive_console,
        )
        losses: list[torch.Tensor] = []  # kept on the device: .item() every step would stall the GPU
        micro = 0
        # uint8 images on the device, decoded by Ray Data or here (data.decode), with corrupt JPEGs counted.
        for batch in train_batches(
            train_shard, cfg.data, batch_size=tc.batch_size, device=device, counter=inputs.skip_counter
        ):
            if epoch_step >= steps_per_epoch:
                break
            micro += 1
            images = normalize_on_device(batch["image"]).contiguous(memory_format=memory_format)
            # Gradients are all-reduced once per optimizer step, not once per micro-batch.
            accumulating = micro % tc.grad_accum != 0 and hasattr(model, "no_sync")
            with model.no_sync() if accumulating else contextlib.nullcontext(), notices.first("training step"):
                with autocast:
                    loss = model(images, batch["label"])["loss"]
                scaler.scale(loss / tc.grad_accum).backward()
            losses.append(loss.detach())
            if micro % tc.grad_accum:
                continue
            if tc.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            epoch_step += 1
            line.update(len(images) * tc.grad_accum * world,
                        lambda: f"loss {_mean(losses[-20:]):.3f} | lr {scheduler.get_last_lr()[0]:.2e}")
            if inputs.on_step is not None:
                inputs.on_step(rank=rank, epoch=epoch, step=step)
            if tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0 and epoch_step < steps_per_epoch:
                report(Progress(epoch, step, epoch_step, steps_per_epoch),
                       {"epoch": epoch, "step": step, "loss": _mean(losses)})
        line.close(f"loss {_mean(losses):.3f}")

        metrics = {"epoch": epoch + 1, "step": step, "loss": _mean(losses),
                   "lr": scheduler.get_last_lr()[0], "images_per_s": round(line.rate, 1)}
        if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == last_epoch:
            with notices.first("validation"):
                metrics.update(validate(worker))
        if log:
            skipped = counts_since(skipped_before, ray.get(inputs.skip_counter.totals.remote()))
            metrics.update({f"skipped_{r}": skipped.get(r, 0) for r in SKIP_REASONS})
            # What the epoch cost in storage reads: with the shard index only the view's images are fetched.
            metrics.update(bytes_read=skipped.get(BYTES_READ, 0),
                           images_delivered=skipped.get(READ, 0) - skipped.get("corrupt_jpeg", 0))
            log.write(metrics, step=step)
            say(epoch_summary(metrics))
        report(Progress(epoch + 1, step, 0, steps_per_epoch), metrics)
    return metrics


def _mean(losses: list[torch.Tensor]) -> float:
    return torch.stack(losses).float().mean().item() if losses else float("nan")


def _reported_checkpoints() -> list:
    try:
        return [c.checkpoint for c in ray.train.get_all_reported_checkpoints()]
    except (RuntimeError, NotImplementedError, AttributeError):
        # Local mode (num_workers=0) keeps no checkpoint history; resuming there only uses the latest.
        latest = ray.train.get_checkpoint()
        return [latest] if latest else []


def _report(worker: Worker, state: dict, progress: Progress, metrics: dict) -> None:
    """Every rank reports (ray.train.report is a barrier); rank 0 attaches the checkpoint."""
    if worker.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        state["landmark_ids"] = torch.as_tensor(worker.inputs.landmark_ids, dtype=torch.int64)
        save_checkpoint(Path(tmp), state=state, config=worker.cfg.model_dump(mode="json"), progress=progress)
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        checkpoint.set_metadata({"epoch": progress.epoch, "step": progress.step})
        ray.train.report(metrics, checkpoint=checkpoint)


def epoch_summary(metrics: dict) -> str:
    """One line a person can read: ``[train] epoch 3 done: loss 2.314 | lr 2.50e-04 | val GAP 0.412 ...``."""
    formats = [("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("images_per_s", "{:.1f} img/s"),
               ("val_gap", "val GAP {:.4f}"), ("val_map100", "val mAP@100 {:.4f}"),
               ("val_queries", "{:,} queries"), ("val_index", "{:,} index images"),
               ("images_delivered", "{:,} images delivered"), ("bytes_read", "{:,} bytes read")]
    parts = [fmt.format(metrics[key]) for key, fmt in formats if key in metrics]
    skipped = {k.removeprefix("skipped_"): v for k, v in metrics.items() if k.startswith("skipped_") and v}
    if skipped:
        parts.append("skipped " + ", ".join(f"{n} {reason}" for reason, n in skipped.items()))
    state = "done" if metrics["epoch"] else "(before training)"
    return f"[train] epoch {metrics['epoch']} {state}: " + " | ".join(parts)
