"""Training checkpoints: what is saved, how a damaged one is detected, and loading a model from one alone.

A checkpoint folder holds ``state.pt`` (model, optimizer, grad scaler, scheduler, counters, the view's landmark ids),
``config.json`` (the full resolved run config) and ``meta.json`` (epoch, step, the size of each file and the SHA-256 of
``state.pt``, so that a truncated, missing or altered file is caught before torch reads it). ``meta.json`` is written
last, but an upload to object storage can land its files in any order, so a checkpoint counts only once every file it
lists is there at its size (``complete``) and ``state.pt`` hashes to its checksum (``verified``):
``latest_checkpoint`` picks the newest such one for every consumer (resume, ``init_from``, chain skipping, embedding,
the ensemble), naming each one it passes over.

Retention is ours, not Ray Train's (whose ``CheckpointConfig(num_to_keep)`` prunes by the order it reported them and
cannot know that one was damaged since): ``prune_checkpoints`` keeps the ``train.keep_checkpoints`` newest verified
checkpoints, deletes the older ones, and names and deletes each damaged one, so a damaged checkpoint never takes a
good one's place. A checkpoint that could not be read (an I/O error that may pass) is neither counted nor deleted.
With ``train.keep_epoch_checkpoints`` it keeps every epoch-end checkpoint besides the ``train.keep_checkpoints``
newest verified mid-epoch ones (off by default: a run's folder would grow by a checkpoint per epoch, 1.9 GB for
DOLG-B5 with its optimizer state).

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

from ray_landmark.data.storage import Location, resolve
from ray_landmark.errors import JobError
from ray_landmark.progress import Printer, say


STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"


class CorruptCheckpoint(JobError, RuntimeError):
    """A checkpoint folder that cannot be used; the message names it and says why."""


class UnreadableCheckpoint(CorruptCheckpoint):
    """A checkpoint whose files could not be read (an I/O error, which may pass): not used, but never deleted."""


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


def _sha256(f) -> str:
    """SHA-256 of a binary file object, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(folder: Path, *, state: dict, config: dict, progress: Progress) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / STATE_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    with open(folder / STATE_FILE, "rb") as f:
        checksum = _sha256(f)
    sizes = {name: (folder / name).stat().st_size for name in (STATE_FILE, CONFIG_FILE)}
    meta = {**progress.__dict__, "sha256": checksum, "sizes": sizes}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def _check_size(checkpoint: str, name: str, size: int, meta: dict) -> None:
    expected = meta.get("sizes", {}).get(name)  # checkpoints of before sizes were recorded have none
    if expected is not None and size != expected:
        raise CorruptCheckpoint(f"checkpoint {checkpoint}: {name} has {size} bytes, not the {expected} recorded in "
                                f"{META_FILE} (an interrupted write)")


def read_checkpoint(folder: Path, name: str, map_location="cpu") -> LoadedCheckpoint:
    """The checkpoint in ``folder``; ``name`` (its URI) is what errors report."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        for file in (STATE_FILE, CONFIG_FILE):
            if not (folder / file).is_file():
                raise CorruptCheckpoint(f"checkpoint {name}: {file} is missing (an interrupted write)")
            _check_size(name, file, (folder / file).stat().st_size, meta)
        with open(folder / STATE_FILE, "rb") as f:
            checksum = _sha256(f)
        if checksum != meta["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {name}: {STATE_FILE} does not match the checksum in {META_FILE}")
        state = torch.load(folder / STATE_FILE, map_location=map_location, weights_only=True)
        config = json.loads((folder / CONFIG_FILE).read_text())
    except CorruptCheckpoint:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CorruptCheckpoint(f"checkpoint {name}: unreadable ({type(err).__name__}: {err})") from None
    progress = Progress(meta["epoch"], meta["step"], meta["epoch_step"], meta.get("steps_per_epoch", 0))
    return LoadedCheckpoint(state, config, progress, name)


def checkpoint_folder(uri: str, storage=None, printer: Printer = say) -> Location:
    """A checkpoint folder as given, verified as a run folder's are (complete, its state matching its checksum: a
    CorruptCheckpoint naming it, before anything is built on it), or the newest complete, verified checkpoint of a
    run folder (``<output_dir>/<name>``)."""
    loc = resolve(uri, storage)
    if loc.fs.get_file_info(loc.child(STATE_FILE).path).type != pafs.FileType.NotFound:
        _check(loc)
        return loc
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.NotFound:
        raise CorruptCheckpoint(f"{loc.uri}: no such checkpoint or run folder")
    latest = latest_checkpoint(loc, printer)
    if latest is None:
        raise CorruptCheckpoint(f"{loc.uri}: neither a checkpoint folder ({STATE_FILE}) nor a run with a complete "
                                f"checkpoint")
    return latest.folder


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint folder whose files are all there and whose state matches its checksum; what it says without its
    weights."""

    folder: Location
    progress: Progress
    config: dict


def _read_json(loc: Location) -> dict:
    with loc.fs.open_input_stream(loc.path) as f:
        return json.loads(f.read())


def _check(folder: Location) -> CheckpointInfo:
    """``folder``'s checkpoint if it is complete and verified; else CorruptCheckpoint saying why, in one line."""
    try:
        meta = _read_json(folder.child(META_FILE))
        progress = Progress(int(meta["epoch"]), int(meta["step"]), int(meta["epoch_step"]),
                            int(meta.get("steps_per_epoch", 0)))
        infos = {info.base_name: info for info in folder.fs.get_file_info(
            [folder.child(name).path for name in (STATE_FILE, CONFIG_FILE)])}
        for name, info in infos.items():
            if info.type == pafs.FileType.NotFound:
                raise CorruptCheckpoint(f"checkpoint {folder.uri}: {name} is missing (an interrupted write)")
            _check_size(folder.uri, name, info.size, meta)
        with folder.fs.open_input_stream(folder.child(STATE_FILE).path) as f:
            if _sha256(f) != meta["sha256"]:
                raise CorruptCheckpoint(f"checkpoint {folder.uri}: {STATE_FILE} does not match the checksum in "
                                        f"{META_FILE}")
        config = _read_json(folder.child(CONFIG_FILE))
    except CorruptCheckpoint:
        raise
    except FileNotFoundError as err:
        raise CorruptCheckpoint(f"checkpoint {folder.uri}: a file is missing ({err})") from None
    except OSError as err:  # the store did not answer: the checkpoint may be fine
        raise UnreadableCheckpoint(f"checkpoint {folder.uri}: could not be read ({type(err).__name__}: {err})") \
            from None
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpoint(f"checkpoint {folder.uri}: unreadable ({type(err).__name__}: {err})") from None
    return CheckpointInfo(folder, progress, config)


def _newest_first(run: Location, printer: Printer) -> list[Location]:
    """The checkpoint folders of a run folder (each holds a ``meta.json``), newest first by the step their
    ``meta.json`` records (Ray Train names folders by time; a tie goes to the later name); one whose ``meta.json`` is
    unreadable is named and left out."""
    try:
        entries = run.fs.get_file_info(pafs.FileSelector(run.path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise CorruptCheckpoint(f"{run.uri}: cannot list its checkpoints ({err})") from None
    folders = [run.child(f.path[len(run.path):].strip("/").rsplit("/", 1)[0])
               for f in entries if f.is_file and f.path.endswith("/" + META_FILE)]
    by_step = []
    for folder in folders:
        try:
            by_step.append((int(_read_json(folder.child(META_FILE))["step"]), folder.path, folder))
        except (OSError, ValueError, KeyError, TypeError) as err:
            printer(f"[checkpoint] WARNING checkpoint {folder.uri}: {META_FILE} unreadable ({type(err).__name__}: "
                    f"{err}); passed over")
    return [folder for _, _, folder in sorted(by_step, key=lambda entry: entry[:2], reverse=True)]


def latest_checkpoint(run: Location, printer: Printer = say) -> CheckpointInfo | None:
    """The newest complete, verified checkpoint of a run folder; None when it has none. Each partial or corrupt one
    newer than it is named in one line and passed over, so every consumer falls back to the previous good one."""
    for folder in _newest_first(run, printer):
        try:
            return _check(folder)
        except CorruptCheckpoint as err:
            printer(f"[checkpoint] WARNING {err}; passed over")
    return None


def load_latest(run: Location, printer: Printer = say, map_location="cpu") -> LoadedCheckpoint | None:
    """The newest checkpoint of a run folder that reads and verifies, loaded (what a resume continues from); each
    damaged one newer than it is named and passed over. None when there is none."""
    for folder in _newest_first(run, printer):
        try:
            return load_checkpoint(folder, map_location)
        except CorruptCheckpoint as err:
            printer(f"[checkpoint] WARNING {err}; passed over")
    return None


def load_checkpoint(folder: Location, map_location="cpu") -> LoadedCheckpoint:
    """``read_checkpoint`` of a checkpoint folder on any filesystem (copied to a temporary folder first)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pafs.copy_files(folder.path, tmp, source_filesystem=folder.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except FileNotFoundError as err:
            raise CorruptCheckpoint(f"checkpoint {folder.uri}: a file is missing ({err})") from None
        except OSError as err:
            raise UnreadableCheckpoint(f"checkpoint {folder.uri}: could not be read ({err})") from None
        return read_checkpoint(Path(tmp), folder.uri, map_location)


@dataclass(frozen=True)
class Pruned:
    """What ``prune_checkpoints`` did: the checkpoints kept (newest first) and those it deleted."""

    kept: list[str]
    deleted_damaged: list[str]
    deleted_old: list[str]


def prune_checkpoints(run: Location, keep: int, printer: Printer = say, every_epoch_end: bool = False) -> Pruned:
    """Keep the ``keep`` newest complete, verified checkpoints of a run folder and delete every checkpoint folder
    older than the last of them, and every damaged one (named in one line, with why) wherever it is: a damaged
    checkpoint is never counted, so it never takes a good one's place. Only the run's own checkpoint folders count
    (directly in it, where Ray Train writes them); one without a ``meta.json`` is an interrupted write. Nothing is
    deleted while no checkpoint verifies, nor one that could not be read (the store may answer next time).

    With ``every_epoch_end`` (train.keep_epoch_checkpoints), ``keep`` counts mid-epoch checkpoints only and every
    epoch-end checkpoint is kept too. Of those, only the newest ones down to the first that verifies are read and
    verified, not every one each time: each older one was verified while it was the newest, and whoever loads one
    verifies it again."""
    try:
        entries = run.fs.get_file_info(pafs.FileSelector(run.path, recursive=True, allow_not_found=True))
    except OSError as err:
        raise UnreadableCheckpoint(f"{run.uri}: cannot list its checkpoints ({err})") from None
    files: dict[str, set[str]] = {}
    for f in entries:
        parts = f.path[len(run.path):].strip("/").split("/")
        if f.is_file and len(parts) == 2 and parts[1] in (STATE_FILE, CONFIG_FILE, META_FILE):
            files.setdefault(parts[0], set()).add(parts[1])
    damaged: dict[str, tuple[Location, str]] = {}
    by_step = []
    for name, held in sorted(files.items()):
        folder = run.child(name)
        if META_FILE not in held:
            damaged[folder.uri] = (folder, f"checkpoint {folder.uri}: {META_FILE} is missing (an interrupted write)")
            continue
        try:
            meta = _read_json(folder.child(META_FILE))
            by_step.append((int(meta["step"]), folder.path, folder, int(meta["epoch_step"]) == 0))
        except FileNotFoundError:
            continue  # gone since the listing
        except OSError as err:
            printer(f"[checkpoint] WARNING checkpoint {folder.uri}: {META_FILE} could not be read ({err}); not "
                    f"counted, kept")
        except (ValueError, KeyError, TypeError) as err:
            damaged[folder.uri] = (folder, f"checkpoint {folder.uri}: {META_FILE} unreadable ({type(err).__name__}: "
                                           f"{err})")
    kept, old = [], []
    counted, epoch_end_verified = 0, False
    for _, _, folder, epoch_end in sorted(by_step, key=lambda entry: entry[:2], reverse=True):
        spared = every_epoch_end and epoch_end
        if spared and epoch_end_verified:
            kept.append(folder)
            continue
        if not spared and counted >= keep:
            old.append(folder)
            continue
        try:
            _check(folder)
        except UnreadableCheckpoint as err:
            printer(f"[checkpoint] WARNING {err}; not counted, kept")
            continue
        except CorruptCheckpoint as err:
            damaged[folder.uri] = (folder, str(err))
            continue
        kept.append(folder)
        if spared:
            epoch_end_verified = True
        else:
            counted += 1
    if not kept:  # none verified (an epoch-end one is kept unread only after a newer one verified)
        return Pruned([], [], [])
    for folder, why in damaged.values():
        printer(f"[checkpoint] WARNING {why}; deleted (damaged; the run keeps its newest verified checkpoints)")
        folder.fs.delete_dir(folder.path)
    for folder in old:
        folder.fs.delete_dir(folder.path)
    return Pruned([f.uri for f in kept], sorted(damaged), [f.uri for f in old])


def read_checkpoint_at(uri: str, storage=None, map_location="cpu") -> LoadedCheckpoint:
    """``read_checkpoint`` of a checkpoint folder given as a path or bucket URI; a run folder means its latest
    checkpoint (what a recipe step's train.init_from names)."""
    return load_checkpoint(checkpoint_folder(uri, storage), map_location)


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
    """Only the resolved config of a checkpoint folder or run folder (its newest complete, verified checkpoint): the
    weights are hashed, not loaded."""
    loc = checkpoint_folder(uri, storage)
    try:
        return _read_json(loc.child(CONFIG_FILE))
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"checkpoint {loc.uri}: {CONFIG_FILE} unreadable ({err})") from None

