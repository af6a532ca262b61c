"""Run identity: what a rerun of a run folder may change, and what makes it another run.

A run folder (``<run.output_dir>/<run.name>``) is one training: its checkpoints record the full config that made them.
Rerunning the same name resumes it. A rerun whose config differs only in keys that say *how* or *how long* to train
(more epochs, another worker count or batch size, whose schedule the loop rescales, compile, where the data is,
checkpoint and log settings) resumes and says which keys changed. Any other difference (model, loss, label view,
image size, preprocessing, optimizer, schedule shape, ...) would train one model under two configs: it is refused in
one line naming the keys, unless ``--restart`` moves the old run aside (never deleting it) and starts afresh.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from ray_landmark.data.storage import Location
from ray_landmark.errors import JobError
from ray_landmark.progress import Printer, say
from ray_landmark.runs.checkpoint import latest_checkpoint
from ray_landmark.runs.folders import output_folder

if TYPE_CHECKING:
    from ray_landmark.config import Config

# Dotted keys (or key prefixes ending in ".") that a resume may change.
RESUMABLE = (
    "run.",  # where the run folder is and how to reach it (a run copied or moved elsewhere resumes there)
    "data.root", "data.manifest", "data.storage.", "data.manifest_storage.",  # where the same data lives
    "data.decode", "data.decode_batch_size", "data.read_cpus", "data.decode_cpus", "data.prefetch_batches",
    "data.shuffle_buffer", "data.eval_queries", "data.eval_index", "data.missing_shards",
    "train.epochs", "train.stop_at", "train.num_workers", "train.batch_size", "train.grad_accum", "train.use_gpu",
    "train.cpus_per_worker", "train.amp", "train.channels_last", "train.compile", "train.compile_backend",
    "train.max_failures", "train.checkpoint_every_steps", "train.checkpoint_every_minutes", "train.keep_checkpoints",
    "train.keep_epoch_checkpoints", "train.eval_every", "train.validate_before_training",
)


class RunConflict(JobError, ValueError):
    """A rerun whose config would make the run folder hold another training; the message says what to do."""


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat or {prefix: {}}


def config_differences(saved: dict, wanted: dict, resumable_keys=RESUMABLE) -> tuple[list[str], list[str]]:
    """(resumable, breaking) dotted keys whose values differ between a run's saved config and a rerun's."""
    old, new = _flatten(saved), _flatten(wanted)
    changed = sorted(k.rstrip(".") for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    resumable = [k for k in changed if any(k == r or k.startswith(r) for r in resumable_keys)]
    return resumable, [k for k in changed if k not in resumable]


def describe(keys: list[str], saved: dict, wanted: dict, limit: int = 6) -> str:
    """``data.image_size 64 -> 96, model.dilations [1, 2, 3] -> [2, 4, 6]``, at most ``limit`` keys."""
    old, new = _flatten(saved), _flatten(wanted)
    parts = [f"{k} {old.get(k, old.get(k + '.', '(unset)'))!r} -> {new.get(k, new.get(k + '.', '(unset)'))!r}"
             for k in keys[:limit]]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def run_state(cfg: Config) -> tuple[int, list[str]]:
    """What the run folder of training config ``cfg`` holds: (the epochs of its newest good checkpoint, the
    keys its saved config differs in beyond what a resume may change); (0, []) for a run not started."""
    latest = latest_checkpoint(output_folder(cfg.run))
    if latest is None:
        return 0, []
    return latest.progress.epoch, config_differences(latest.config, cfg.model_dump(mode="json"))[1]


def check_rerun(run: Location, saved: dict | None, wanted: dict, *, restart: bool, resumable_keys=RESUMABLE,
                name_key: str = "run.name", printer: Printer = say) -> None:
    """Decide what a rerun of ``run`` does: nothing to say (new, or the same config), one line listing resumable
    changes, or RunConflict naming the breaking ones; with ``restart``, a run with breaking changes is moved aside."""
    if saved is None:
        return
    resumable, breaking = config_differences(saved, wanted, resumable_keys)
    if breaking and restart:
        aside = move_aside(run)
        printer(f"[run] --restart: {run.uri} moved to {aside.uri}; starting afresh")
        return
    if breaking:
        raise RunConflict(
            f"{run.uri} was made with another config ({describe(breaking, saved, wanted)}); resuming it would mix "
            f"two configs: choose a new {name_key}, or pass --restart to move the old one aside"
        )
    if resumable:
        printer(f"[run] resuming {run.uri} with changed settings: {describe(resumable, saved, wanted)}")


def move_aside(run: Location) -> Location:
    """Move a run folder to ``<name>.replaced-<UTC time>`` beside it; nothing is deleted before it is copied."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    new_name = f"{run.path.rstrip('/').rsplit('/', 1)[1]}.replaced-{stamp}"
    aside = Location(f"{run.uri.rstrip('/').rsplit('/', 1)[0]}/{new_name}", run.fs,
                     f"{run.path.rstrip('/').rsplit('/', 1)[0]}/{new_name}")
    if isinstance(run.fs, pafs.LocalFileSystem):
        run.fs.move(run.path, aside.path)
    else:  # object stores have no directory rename: copy every object, then delete the originals
        pafs.copy_files(run.path, aside.path, source_filesystem=run.fs, destination_filesystem=run.fs)
        run.fs.delete_dir(run.path)
    return aside
