"""Training checkpoints: what is saved, how a damaged one is detected, and loading a model from one alone.

A checkpoint folder holds ``state.pt`` (model, optimizer, grad scaler, scheduler, counters, the view's landmark ids),
``config.json`` (the full resolved run config) and ``meta.json`` (epoch, step and the SHA-256 of ``state.pt``, so that
a truncated or altered file is caught before torch reads it).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch

from ray_landmark.data.storage import resolve
from ray_landmark.progress import say


STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint folder that cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Progress:
    """Where training stands: ``epoch`` epochs are complete, plus ``epoch_step`` optimizer steps of the next one."""

    epoch: int
    step: int
    epoch_step: int


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


def read_checkpoint(folder: Path, name: str, map_location="cpu") -> tuple[dict, dict, Progress]:
    """(state, config, progress) of a checkpoint folder; ``name`` (its URI) is what errors report."""
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
    return state, config, Progress(meta["epoch"], meta["step"], meta["epoch_step"])


def load_latest_good(checkpoints) -> tuple[dict, dict, Progress, str] | None:
    """The newest readable checkpoint among ``ray.train.Checkpoint`` objects; each damaged one is logged by name and
    skipped, so resuming falls back to the previous good one. None when there is none."""
    def step_of(ckpt) -> int:
        return int(ckpt.get_metadata().get("step", -1))

    for ckpt in sorted(checkpoints, key=step_of, reverse=True):
        name = f"s3://{ckpt.path}" if isinstance(ckpt.filesystem, pafs.S3FileSystem) else ckpt.path
        try:
            with ckpt.as_directory() as folder:
                state, config, progress = read_checkpoint(Path(folder), name)
            return state, config, progress, name
        except CorruptCheckpoint as err:
            say(f"[train] {err}; falling back to the previous checkpoint")
    return None


def _latest_checkpoint_folder(run):
    """The checkpoint folder of a run folder (``<output_dir>/<name>``) with the most steps."""
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


def read_checkpoint_at(uri: str, storage=None, map_location="cpu") -> tuple[dict, dict, Progress]:
    """``read_checkpoint`` of a checkpoint folder given as a path or bucket URI; a run folder means its latest
    checkpoint (what a recipe step's train.init_from names)."""
    loc = resolve(uri, storage)
    if loc.fs.get_file_info(loc.child(STATE_FILE).path).type == pafs.FileType.NotFound:
        loc = _latest_checkpoint_folder(loc)
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(loc.path, tmp, source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem())
        return read_checkpoint(Path(tmp), loc.uri, map_location)


def load_model(uri: str, storage=None, map_location="cpu"):
    """(model in eval mode, Config, landmark ids) from a checkpoint folder or URI alone: what the embedding job uses."""
    from ray_landmark.config import config_from_dict
    from ray_landmark.models.factory import build_model

    state, config, _ = read_checkpoint_at(uri, storage, map_location)
    cfg = config_from_dict(config, f"{uri}/{CONFIG_FILE}")
    landmark_ids = state["landmark_ids"]
    model = build_model(cfg.model, cfg.loss, len(landmark_ids), cfg.data.image_size)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, landmark_ids
