"""The training loop that every Ray Train worker runs, in the shape of Ray's examples: per epoch a train phase, an
eval phase and ``ray.train.report``; DDP through ``prepare_model``.

Per step: uint8 images from the data shard -> normalised on the device -> model under autocast -> ArcFace loss in fp32
-> (scaled) backward -> every ``grad_accum`` micro-batches an optimizer step and a per-step cosine/warm-up lr
(``models/amp.py``). Per epoch: validation, metrics and a checkpoint through ``ray.train.report``, which every rank
calls, so all ranks move in lockstep. Mid-epoch checkpoints (no validation) come every ``checkpoint_every_steps``
steps and/or every ``checkpoint_every_minutes`` minutes: rank 0's clock decides, and every rank learns its answer after
each step (``train/checkpoint_clock.py``), so all ranks report at the same step.

With ``train.compile`` the model is compiled before the DDP wrapper (``models/torch_compile.py``); the first training
step and the first validation each compile a graph, and the progress output says so.

Resuming (``restore``): the newest checkpoint of the run folder that verifies (``runs/checkpoint.py``; after a worker
failure or a rerun alike) gives the finished epochs and the optimizer steps already taken in the current one; that
epoch then runs only its remaining number of steps, so the epochs' step counts and the learning-rate schedule are
exact. So are its images: every rank tells the train stream's ledger (``data/epoch_rows.py``) which rows its
optimizer steps trained before each checkpoint; a mid-epoch checkpoint saves the epoch's bitmap, and a resume from it
streams only the rows it lacks, in a fresh shuffle. Across any number of resumes, each image of the view is trained
once per epoch, apart from those no step took (each rank's last partial batch and what the equal split leaves over),
which the epoch line counts, as it counts any image trained twice. With the same number of workers, that is; a resume
with fewer or more of them streams the same rest, and runs out of it or leaves more over. After each checkpoint, rank
0 keeps the ``train.keep_checkpoints`` newest verified ones (mid-epoch ones only, besides every epoch-end one, with
``train.keep_epoch_checkpoints``) and deletes the rest (``prune_checkpoints``).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ray_landmark.config import Config
from ray_landmark.data.counts import counts_since
from ray_landmark.data.epoch_rows import EpochLedger
from ray_landmark.data.batches import train_batches
from ray_landmark.data.pipeline import BYTES_READ, READ, SKIP_REASONS
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.errors import JobError
from ray_landmark.models.amp import MixedPrecision
from ray_landmark.models.factory import build_model
from ray_landmark.models.torch_compile import compile_for_training, compile_wanted
from ray_landmark.models.transfer import freeze_except, warm_start
from ray_landmark.progress import Printer, ProgressLine, relay_printer
from ray_landmark.runs.checkpoint import (
    CorruptCheckpoint, LoadedCheckpoint, Progress, load_latest, prune_checkpoints, read_checkpoint_at, save_checkpoint,
)
from ray_landmark.runs.folders import output_folder, run_logs
from ray_landmark.train.checkpoint_clock import CheckpointClock
from ray_landmark.train.metrics_log import MetricsLog
from ray_landmark.train.optim import build_optimizer, build_scheduler, resume_schedule
from ray_landmark.train.validate import validate
from ray_landmark.train.worker_entry import WorkerInputs


class NoTrainingData(JobError, RuntimeError):
    """An epoch whose stream gave no full batch: the job fails instead of saying it finished."""


@dataclass(frozen=True)
class Worker:
    """Where one training worker runs and how it computes, for the whole run."""

    inputs: WorkerInputs
    rank: int
    world: int
    device: torch.device
    precision: MixedPrecision  # autocast and the grad scaler (fp16 only), or neither (CPU, train.amp off)
    memory_format: torch.memory_format
    say: Printer  # rank 0: to the driver's console; other ranks: nowhere
    checkpoint_clock: CheckpointClock  # train.checkpoint_every_minutes on rank 0's clock; restarted by each report

    @property
    def cfg(self) -> Config:
        return self.inputs.config


@dataclass
class Training:
    """What a checkpoint saves and ``restore`` brings back (with ``Worker.precision``'s grad scaler), and where
    training stands."""

    raw_model: torch.nn.Module  # the model without its DDP wrapper: state dicts, evaluation
    model: torch.nn.Module  # wrapped for DDP by prepare_model: the training steps
    compiled: bool  # torch.compile'd (train.compile): validation pads its short batches to one shape
    params: list[torch.nn.Parameter]  # those that train (train.trainable)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    progress: Progress  # finished epochs, optimizer steps in all and in the current epoch
    resumed: bool
    notices: "CompileNotices"
    # The train rows of this rank's optimizer steps since the last report, on the device: the stream's ledger learns
    # them then.
    trained_rows: list[torch.Tensor] = field(default_factory=list)


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


def train_worker(inputs: WorkerInputs) -> dict:
    """What each Ray Train worker runs (``train/worker_entry.py`` calls it): restore, then per epoch a train phase, an
    eval phase and a report with its checkpoint. Returns the last epoch's metrics."""
    worker = _start(inputs)
    training = restore(worker)
    cfg, tc, rank = worker.cfg, worker.cfg.train, worker.rank
    counter = worker.inputs.skip_counter
    log = MetricsLog(run_logs(cfg.run)) if rank == 0 else None
    train_shard = ray.train.get_dataset_shard("train")
    if tc.validate_before_training and not training.resumed:
        with training.notices.first("validation"):
            baseline = {"epoch": 0, "step": 0, **validate(worker, training.raw_model, training.compiled)}
        if log:
            log.write(baseline, step=0)
            worker.say(epoch_summary(baseline))
    metrics: dict = {}
    worker.checkpoint_clock.restart()  # the minutes count training only: a restart's setup risks no progress
    for epoch in range(training.progress.epoch, tc.last_epoch):
        skipped_before = counter.totals() if rank == 0 else {}
        metrics = train_epoch(worker, training, train_shard, epoch)
        metrics.update(_end_epoch_rows(worker, training))
        if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.last_epoch:
            with training.notices.first("validation"):
                metrics.update(validate(worker, training.raw_model, training.compiled))
        if log:
            skipped = counts_since(skipped_before, counter.totals())
            metrics.update({f"skipped_{r}": skipped.get(r, 0) for r in SKIP_REASONS})
            # What the epoch cost in storage reads: with the shard index only the view's images are fetched.
            metrics.update(bytes_read=skipped.get(BYTES_READ, 0),
                           images_delivered=skipped.get(READ, 0) - skipped.get("corrupt_jpeg", 0),
                           shards_skipped=len(worker.inputs.skipped_shards or {}))
            log.write(metrics, step=training.progress.step)
            worker.say(epoch_summary(metrics, worker.inputs.skipped_shards))
        training.progress = Progress(epoch + 1, training.progress.step, 0, training.steps_per_epoch)
        _report(worker, training, metrics)
    return metrics


def _start(inputs: WorkerInputs) -> Worker:
    tc = inputs.config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed + rank)
    return Worker(
        inputs, rank, world, device, MixedPrecision(device, enabled=tc.amp),
        memory_format=torch.channels_last if tc.channels_last else torch.contiguous_format,
        say=relay_printer(inputs.console) if rank == 0 else (lambda line, transient=False: None),
        checkpoint_clock=CheckpointClock(tc.checkpoint_every_minutes, world),
    )


def restore(worker: Worker) -> Training:
    """The model, optimizer, schedule and grad scaler: those of the run's latest good checkpoint (a resume), else new,
    warm-started from ``train.init_from`` when set; the model compiled (train.compile) and wrapped for DDP."""
    cfg, say = worker.cfg, worker.say
    tc = cfg.train
    inputs = worker.inputs
    model = build_model(cfg.model, cfg.loss, len(inputs.class_counts), cfg.data.image_size, inputs.class_counts)
    # The run folder itself, not Ray Train's list of reported checkpoints: that list cannot know that one of them was
    # damaged since, and our retention deletes checkpoints it still lists.
    resume = load_latest(output_folder(cfg.run), printer=say)
    if resume is None and tc.init_from:
        report = warm_start(model, read_checkpoint_at(tc.init_from, cfg.run.storage).state["model"], tc.drop_keys)
        say(f"[train] warm start from {tc.init_from}: {report.summary()}")
    freeze_except(model, tc.trainable)
    raw_model = model.to(device=worker.device, memory_format=worker.memory_format)
    compiled = compile_wanted(tc.compile, worker.device)
    if compiled:  # before the DDP wrapper: see models/torch_compile.py
        compile_for_training(raw_model, tc.compile_backend)
    model = ray.train.torch.prepare_model(raw_model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    # Equal shards: each rank sees train_images // world rows and drops its last partial batch.
    steps_per_epoch = max(1, inputs.train_images // worker.world // tc.batch_size // tc.grad_accum)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch)
    notices = CompileNotices(say, worker.device, tc.compile_backend if compiled else None)
    training = Training(raw_model, model, compiled, params, optimizer, scheduler, steps_per_epoch,
                        Progress(epoch=0, step=0, epoch_step=0), resumed=resume is not None, notices=notices)
    if resume is None:
        start_epoch_rows(worker, None)
        return training
    progress = resume.progress
    raw_model.load_state_dict(resume.state["model"])
    optimizer.load_state_dict(resume.state["optimizer"])
    scheduler.load_state_dict(resume.state["scheduler"])
    worker.precision.scaler.load_state_dict(resume.state["scaler"])
    say(f"[train] resumed from {resume.name}: epoch {progress.epoch + 1}, step {progress.step}")
    if progress.steps_per_epoch not in (0, steps_per_epoch):
        say(f"[train] {steps_per_epoch} steps per epoch now, {progress.steps_per_epoch} when it was saved: "
            f"the learning-rate schedule continues at the same point of its epochs")
    training.progress = replace(progress, epoch_step=resume_schedule(
        scheduler, progress.epoch, progress.epoch_step, progress.steps_per_epoch, steps_per_epoch))
    start_epoch_rows(worker, resume if progress.epoch_step else None)
    return training


def start_epoch_rows(worker: Worker, resume: LoadedCheckpoint | None) -> None:
    """Rank 0 sets the train stream's ledger to what ``resume`` (a mid-epoch checkpoint) says its epoch trained, or to
    a new epoch; every rank waits for it, as no worker may read the train stream before it is set."""
    epoch_rows = worker.inputs.epoch_rows
    if epoch_rows is None:
        return
    if worker.rank == 0:
        state = resume.state.get("epoch_ledger") if resume is not None else None
        if resume is not None and state is None:
            worker.say(f"[train] {resume.name} does not record which images its epoch trained (a checkpoint of "
                       f"before that was saved): the rest of the epoch is drawn from all of them")
        mismatch = epoch_rows.start_epoch(EpochLedger.of(state) if state is not None else None)
        if mismatch:
            raise CorruptCheckpoint(f"{resume.name}: {mismatch}; it belongs to another view or manifest of "
                                    f"data.root: train with train.restart (a new run) or the data it was made with")
        if state is not None:
            trained = epoch_rows.totals()["trained"]
            worker.say(f"[train] {trained:,} images of epoch {resume.progress.epoch + 1} were trained before "
                       f"{resume.name}: its rest streams without them")
    _barrier()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _tell_epoch_rows(worker: Worker, training: Training) -> None:
    """Every rank hands the rows its steps trained since the last report to the stream's ledger, and waits for all
    ranks to have done so: after this, rank 0's ledger is complete."""
    epoch_rows = worker.inputs.epoch_rows
    if epoch_rows is None:
        return
    rows = torch.cat(training.trained_rows).cpu().numpy() if training.trained_rows else None
    training.trained_rows.clear()
    if rows is not None:
        epoch_rows.add(rows)
    _barrier()


def _end_epoch_rows(worker: Worker, training: Training) -> dict:
    """At an epoch's end: rank 0's count of the images it trained (from every rank), twice (0 when training is right)
    and not at all, and the ledger cleared for the next epoch."""
    epoch_rows = worker.inputs.epoch_rows
    if epoch_rows is None:
        return {}
    _tell_epoch_rows(worker, training)
    if worker.rank != 0:
        return {}
    totals = epoch_rows.totals()
    epoch_rows.start_epoch(None)  # before this report: no rank reads the next epoch until it is past
    return {"images_trained": totals["trained"], "images_trained_twice": totals["trained_twice"],
            "images_not_trained": worker.inputs.train_images - totals["trained"]}


def train_epoch(worker: Worker, training: Training, shard, epoch: int) -> dict:
    """One epoch of training (its remaining steps, after a resume inside it) on this worker's ``shard``: its loss,
    last learning rate and throughput. Reports a mid-epoch checkpoint every ``train.checkpoint_every_steps`` steps
    and whenever ``train.checkpoint_every_minutes`` have passed on rank 0's clock since the last checkpoint."""
    tc, inputs, precision = worker.cfg.train, worker.inputs, worker.precision
    model, optimizer, scheduler = training.model, training.optimizer, training.scheduler
    steps_per_epoch = training.steps_per_epoch
    step = training.progress.step
    epoch_step = training.progress.epoch_step if epoch == training.progress.epoch else 0
    first_step = epoch_step
    model.train()
    line = ProgressLine(
        f"[train] epoch {epoch + 1}/{tc.last_epoch}",
        total=(steps_per_epoch - epoch_step) * tc.batch_size * tc.grad_accum * worker.world,
        printer=worker.say, interactive_console=inputs.interactive_console,
    )
    losses: list[torch.Tensor] = []  # kept on the device: .item() every step would stall the GPU
    step_rows: list[torch.Tensor] = []  # of the micro-batches of the step under way
    micro = 0
    # uint8 images on the device, decoded by Ray Data or here (data.decode), with corrupt JPEGs counted.
    for batch in train_batches(shard, worker.cfg.data, batch_size=tc.batch_size, device=worker.device,
                               counter=inputs.skip_counter, worker_decode=inputs.worker_decode):
        if epoch_step >= steps_per_epoch:
            break
        micro += 1
        images = normalize_on_device(batch["image"]).contiguous(memory_format=worker.memory_format)
        if "row" in batch:
            step_rows.append(batch["row"])
        # Gradients are all-reduced once per optimizer step, not once per micro-batch.
        accumulating = micro % tc.grad_accum != 0 and hasattr(model, "no_sync")
        with model.no_sync() if accumulating else contextlib.nullcontext(), training.notices.first("training step"):
            with precision.autocast():
                loss = model(images, batch["label"])["loss"]
            precision.backward(loss, accumulation=tc.grad_accum)
        losses.append(loss.detach())
        if micro % tc.grad_accum:
            continue
        precision.step(optimizer, training.params, tc.grad_clip)
        scheduler.step()
        step += 1
        epoch_step += 1
        training.trained_rows.extend(step_rows)
        line.update(len(images) * tc.grad_accum * worker.world,
                    lambda: f"loss {_mean(losses[-20:]):.3f} | lr {scheduler.get_last_lr()[0]:.2e}")
        if inputs.on_step is not None:
            inputs.on_step(rank=worker.rank, epoch=epoch, step=step,
                           rows=torch.cat(step_rows).cpu().numpy() if step_rows else None)
        step_rows = []
        # Every rank asks the clock after every step, whatever the other conditions say: it is a collective.
        by_clock = worker.checkpoint_clock.due()
        by_steps = bool(tc.checkpoint_every_steps) and step % tc.checkpoint_every_steps == 0
        if (by_clock or by_steps) and epoch_step < steps_per_epoch:  # the epoch's last step: its own checkpoint follows
            training.progress = Progress(epoch, step, epoch_step, steps_per_epoch)
            _report(worker, training, {"epoch": epoch, "step": step, "loss": _mean(losses)})
    line.close(f"loss {_mean(losses):.3f}")
    if epoch_step == first_step < steps_per_epoch:
        read = inputs.skip_counter.totals()
        dropped = ", ".join(f"{read[r]} {r}" for r in SKIP_REASONS if read.get(r)) or "none"
        raise NoTrainingData(
            f"epoch {epoch + 1} trained no step: the train stream of {worker.cfg.data.root} gave this worker fewer "
            f"than the {tc.batch_size * tc.grad_accum} images one step needs (the stream so far: {read.get(READ, 0)} "
            f"images read, dropped: {dropped}); check its train shards and data.view, or lower train.batch_size")
    training.progress = Progress(epoch, step, epoch_step, steps_per_epoch)
    return {"epoch": epoch + 1, "step": step, "loss": _mean(losses), "lr": scheduler.get_last_lr()[0],
            "images_per_s": round(line.rate, 1)}


def _mean(losses: list[torch.Tensor]) -> float:
    return torch.stack(losses).float().mean().item() if losses else float("nan")


def _report(worker: Worker, training: Training, metrics: dict) -> None:
    """Every rank reports (ray.train.report is a barrier); rank 0 attaches the checkpoint of ``training.progress``,
    with the epoch's ledger of trained rows when it is a mid-epoch one. The minutes to the next checkpoint count from
    here."""
    if training.progress.epoch_step:
        _tell_epoch_rows(worker, training)
    if worker.rank == 0:
        _report_checkpoint(worker, training, metrics)
    else:
        ray.train.report(metrics)
    worker.checkpoint_clock.restart()


def _report_checkpoint(worker: Worker, training: Training, metrics: dict) -> None:
    """Rank 0's report: the checkpoint of ``training.progress``, then retention (``train.keep_checkpoints``)."""
    progress = training.progress
    state = {"model": training.raw_model.state_dict(), "optimizer": training.optimizer.state_dict(),
             "scheduler": training.scheduler.state_dict(), "scaler": worker.precision.scaler.state_dict(),
             "landmark_ids": torch.as_tensor(worker.inputs.landmark_ids, dtype=torch.int64)}
    if progress.epoch_step and worker.inputs.epoch_rows is not None:
        ledger = worker.inputs.epoch_rows.ledger().state()
        state["epoch_ledger"] = {**ledger, "trained": torch.from_numpy(ledger["trained"])}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), state=state, config=worker.cfg.model_dump(mode="json"), progress=progress)
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        checkpoint.set_metadata({"epoch": progress.epoch, "step": progress.step})
        ray.train.report(metrics, checkpoint=checkpoint)  # uploaded when it returns (the synchronous mode)
    try:
        prune_checkpoints(output_folder(worker.cfg.run), worker.cfg.train.keep_checkpoints, printer=worker.say,
                          every_epoch_end=worker.cfg.train.keep_epoch_checkpoints)
    except (CorruptCheckpoint, OSError) as err:  # the store did not answer: training goes on
        worker.say(f"[checkpoint] WARNING {err}; no checkpoint deleted this time")


def epoch_summary(metrics: dict, skipped_shards: dict | None = None) -> str:
    """One line a person can read: ``[train] epoch 3 done: loss 2.314 | lr 2.50e-04 | val GAP 0.412 ...``; train
    shards left out (``data.missing_shards: skip``) are named at its end."""
    formats = [("loss", "loss {:.4f}"), ("lr", "lr {:.2e}"), ("images_per_s", "{:.1f} img/s"),
               ("val_gap", "val GAP {:.4f}"), ("val_map100", "val mAP@100 {:.4f}"),
               ("val_queries", "{:,} queries"), ("val_index", "{:,} index images"),
               ("images_delivered", "{:,} images delivered"), ("bytes_read", "{:,} bytes read"),
               ("images_not_trained", "{:,} images not trained (partial last batches)")]
    parts = [fmt.format(metrics[key]) for key, fmt in formats if key in metrics]
    if metrics.get("images_trained_twice"):
        parts.append(f"WARNING {metrics['images_trained_twice']:,} images trained twice")
    skipped = {k.removeprefix("skipped_"): v for k, v in metrics.items() if k.startswith("skipped_") and v}
    if skipped:
        parts.append("skipped " + ", ".join(f"{n} {reason}" for reason, n in skipped.items()))
    if skipped_shards:
        parts.append(f"{len(skipped_shards)} train shard(s) skipped: " +
                     ", ".join(f"{name} ({why})" for name, why in sorted(skipped_shards.items())))
    state = "done" if metrics["epoch"] else "(before training)"
    return f"[train] epoch {metrics['epoch']} {state}: " + " | ".join(parts)
