"""Training checkpoints: what is saved, how a damaged one is detected, and loading a model from one alone.

A checkpoint folder holds ``state.pt`` (model, optimizer, grad scaler, scheduler, counters, the view's landmark ids),
``config.json`` (the full resolved run config) and ``meta.json`` (epoch, step and the SHA-256 of ``state.pt``, so that
a truncated or altered file is caught before torch reads it).

The model's state dict is the same with and without ``train.compile`` (the model is compiled in place, so no key
carries a ``_orig_mod.`` prefix): a checkpoint resumes, warm-starts or loads whichever way it was written.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch

from ray_landmark.config_base import JobError
from ray_landmark.data.storage import Location, resolve
from ray_landmark.progress import Printer, say


STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"


class CorruptCheckpoint(JobError, RuntimeError):
    """A checkpoint folder that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Progress:
    """Where training stands: ``epoch`` epochs are complete, plus ``epoch_step`` optimizer steps of the next one."""

    epoch: int
    step: int
    epoch_step: int
    steps_per_epoch: int = 0  # of the run that saved it (0: not recorded); a resume with another count rescales


@dataclass(frozen=True)
class LoadedCheckpoint:
    state: dict  # model, optimizer, scheduler, scaler state dicts and the view's landmark ids
    config: dict  # the run's full resolved config, as saved
    progress: Progress
    name: str  # its URI, for messages


@dataclass(frozen=True)
class TrainedModel:
    model: torch.nn.Module  # in eval mode
    config: "Config"  # noqa: F821 (imported lazily: loading a config must not import torch models)
    landmark_ids: torch.Tensor  # class index -> GLDv2 landmark id


def run_location(run_config) -> Location:
    """``<run.output_dir>/<run.name>``: a run's checkpoints (Ray Train's) and ``logs/`` (metrics, TensorBoard)."""
    return resolve(run_config.output_dir, run_config.storage).child(run_config.name)


def run_logs(run_config) -> Location:
    """``<run.output_dir>/<run.name>/logs``: metrics.jsonl and TensorBoard event files."""
    return run_location(run_config).child("logs")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(folder: Path, *, state: dict, config: dict, progress: Progress) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / STATE_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    meta = {**progress.__dict__, "sha256": _sha256(folder / STATE_FILE)}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def read_checkpoint(folder: Path, name: str, map_location="cpu") -> LoadedCheckpoint:
    """The checkpoint in ``folder``; ``name`` (its URI) is what errors report."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if _sha256(folder / STATE_FILE) != meta["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {name}: {STATE_FILE} does not match the checksum in {META_FILE}")
        state = torch.load(folder / STATE_FILE, map_location=map_location, weights_only=True)
        config = json.loads((folder / CONFIG_FILE).read_text())
    except CorruptCheckpoint:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CorruptCheckpoint(f"checkpoint {name}: unreadable ({type(err).__name__}: {err})") from None
    progress = Progress(meta["epoch"], meta["step"], meta["epoch_step"], meta.get("steps_per_epoch", 0))
    return LoadedCheckpoint(state, config, progress, name)


def load_latest_good(checkpoints, printer: Printer = say) -> LoadedCheckpoint | None:
    """The newest readable checkpoint among ``ray.train.Checkpoint`` objects; each damaged one is reported by name and
    skipped, so resuming falls back to the previous good one. None when there is none."""
    def step_of(ckpt) -> int:
        return int(ckpt.get_metadata().get("step", -1))

    for ckpt in sorted(checkpoints, key=step_of, reverse=True):
        name = f"s3://{ckpt.path}" if isinstance(ckpt.filesystem, pafs.S3FileSystem) else ckpt.path
        try:
            with ckpt.as_directory() as folder:
                return read_checkpoint(Path(folder), name)
        except CorruptCheckpoint as err:
            printer(f"[train] WARNING {err}; falling back to the previous checkpoint")
    return None


def checkpoint_folder(uri: str, storage=None) -> Location:
    """A checkpoint folder as given, or the newest checkpoint of a run folder (``<output_dir>/<name>``)."""
    loc = resolve(uri, storage)
    if loc.fs.get_file_info(loc.child(STATE_FILE).path).type != pafs.FileType.NotFound:
        return loc
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.NotFound:
        raise CorruptCheckpoint(f"{loc.uri}: no such checkpoint or run folder")
    return _latest_checkpoint_folder(loc)


def _latest_checkpoint_folder(run: Location) -> Location:
    metas = [
        f.path for f in run.fs.get_file_info(pafs.FileSelector(run.path, recursive=True))
        if f.is_file and f.path.endswith("/" + META_FILE)
    ]
    if not metas:
        raise CorruptCheckpoint(f"{run.uri}: neither a checkpoint folder ({STATE_FILE}) nor a run with checkpoints")

    def step(meta_path: str) -> int:
        with run.fs.open_input_stream(meta_path) as f:
            return json.loads(f.read())["step"]

    newest = max(metas, key=step).rsplit("/", 1)[0]
    return run.child(newest[len(run.path):].strip("/"))


def read_checkpoint_at(uri: str, storage=None, map_location="cpu") -> LoadedCheckpoint:
    """``read_checkpoint`` of a checkpoint folder given as a path or bucket URI; a run folder means its latest
    checkpoint (what a recipe step's train.init_from names)."""
    loc = checkpoint_folder(uri, storage)
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(loc.path, tmp, source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem())
        return read_checkpoint(Path(tmp), loc.uri, map_location)


def load_model(uri: str, storage=None, map_location="cpu") -> TrainedModel:
    """The model (eval mode), its config and label map from a checkpoint folder or URI alone."""
    from ray_landmark.config import config_from_dict
    from ray_landmark.models.factory import build_model

    checkpoint = read_checkpoint_at(uri, storage, map_location)
    cfg = config_from_dict(checkpoint.config, f"{checkpoint.name}/{CONFIG_FILE}")
    landmark_ids = checkpoint.state["landmark_ids"]
    # The checkpoint holds every weight: no ImageNet download (that needs internet) for weights overwritten at once.
    model = build_model(cfg.model.model_copy(update={"pretrained": False}), cfg.loss, len(landmark_ids),
                        cfg.data.image_size)
    try:
        model.load_state_dict(checkpoint.state["model"])
    except RuntimeError as err:  # names every missing, unexpected or misshapen tensor
        first = str(err).strip().splitlines()
        raise CorruptCheckpoint(
            f"checkpoint {checkpoint.name}: its weights do not fit the model its {CONFIG_FILE} describes "
            f"({cfg.model.arch}, {cfg.model.backbone}): {' '.join(first[:3])[:400]}"
        ) from None
    return TrainedModel(model.eval(), cfg, landmark_ids)


def read_checkpoint_config(uri: str, storage=None) -> dict:
    """Only the resolved config of a checkpoint folder or run folder (its latest checkpoint): no weights are read."""
    loc = checkpoint_folder(uri, storage)
    try:
        with loc.fs.open_input_stream(loc.child(CONFIG_FILE).path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"checkpoint {loc.uri}: {CONFIG_FILE} unreadable ({err})") from None


def finished_epochs(run_config) -> int:
    """Epochs completed by a run (``<run.output_dir>/<run.name>``) per its latest checkpoint; 0 when it has none."""
    run = run_location(run_config)
    if run.fs.get_file_info(run.path).type == pafs.FileType.NotFound:
        return 0
    try:
        latest = _latest_checkpoint_folder(run)
    except CorruptCheckpoint:  # a run folder without checkpoints yet
        return 0
    with latest.fs.open_input_stream(latest.child(META_FILE).path) as f:
        return int(json.loads(f.read())["epoch"])
