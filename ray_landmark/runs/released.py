"""The released 2021 models (the seed repository's GitHub release v0.0.1-alpha) as checkpoints of this project.

The original code names every tensor differently from ours; the architectures are the same (docs/method.md §2), so a
released state dict maps onto our model by name alone. Known differences, every dropped tensor named in the report:

* Hybrids: the original builds the whole EfficientNet feature extractor and runs the blocks after the token level
  without using their output; ours does not build them, so their tensors are dropped.
* Hybrids: timm 0.4.12 saved Swin's ``relative_position_index`` and ``attn_mask`` buffers, which timm 1.x rebuilds
  (non-persistent); and its ``layers.i.downsample`` (end of stage i) is timm 1.x's ``layers.{i+1}.downsample`` (start
  of the next stage), the same weights. timm's own ``swin_transformer.checkpoint_filter_fn`` converts both.
* Hybrids: the GeM exponent ``p`` is unused (the tokens are mean-pooled).

The class order of the head is the original's: GLDv2c landmark ids (``metadata/train_clean.csv``) sorted ascending
(docs/method.md §1), the order of this project's label maps too.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import torch
import yaml
from timm.models import clean_state_dict
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter
from torch import nn

from ray_landmark.config import Config, config_from_dict, parse_override, set_dotted
from ray_landmark.data import gldv2
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.storage import Location, StorageError, exists, read_bytes, resolve, write_bytes
from ray_landmark.errors import ConfigError, JobError
from ray_landmark.progress import Printer, say
from ray_landmark.runs.checkpoint import Progress, save_checkpoint

# Inside the run folder the converter writes: the checkpoint folder, and the conversion's report beside it.
CHECKPOINT_DIR = "checkpoint_released"
REPORT_FILE = "conversion.json"


class ReleasedCheckpointError(JobError, ValueError):
    """A released checkpoint file that cannot be converted; the message names the file or tensor and what to do."""


@dataclass(frozen=True)
class ReleasedModel:
    name: str  # the recipe that trained it: configs/recipes/<name>.yaml
    title: str  # its name in the published table (seed README)
    family: Literal["dolg", "hybrid"]
    stem_chs: int  # output channels of the EfficientNet's stem convolution: tells the backbones apart


RELEASED_MODELS = {
    m.name: m
    for m in (
        ReleasedModel("dolg_efficientnet_b5", "DOLG-EfficientNet-B5", "dolg", 48),
        ReleasedModel("dolg_efficientnet_b6", "DOLG-EfficientNet-B6", "dolg", 56),
        ReleasedModel("dolg_efficientnet_b7_step3", "DOLG-EfficientNet-B7", "dolg", 64),
        ReleasedModel("efficientnet_b3_swin_base_224", "EfficientNet-B3-Swin-Base-224", "hybrid", 40),
        ReleasedModel("efficientnet_b5_swin_base_224", "EfficientNet-B5-Swin-Base-224", "hybrid", 48),
        ReleasedModel("efficientnet_b6_swin_base_384", "EfficientNet-B6-Swin-Base-384", "hybrid", 56),
    )
}

_STEM_WEIGHT = {"dolg": "backbone.conv_stem.weight", "hybrid": "backbone.patch_embed.backbone.conv_stem.weight"}

# Original name -> ours, per family: the first pattern that matches the whole name wins.
_RENAMES: dict[str, list[tuple[re.Pattern, str]]] = {
    "dolg": [
        (re.compile(r"backbone\.(.+)"), r"encoder.backbone.\1"),
        (re.compile(r"mam\.d(\d)\.(.+)"), r"encoder.local_branch.0.branches.\1.\2"),
        (re.compile(r"mam\.conv1\.(.+)"), r"encoder.local_branch.0.proj.\1"),
        (re.compile(r"attention2d\.conv1\.(.+)"), r"encoder.local_branch.1.conv.\1"),
        (re.compile(r"attention2d\.bn\.(.+)"), r"encoder.local_branch.1.bn.\1"),
        (re.compile(r"attention2d\.conv2\.(.+)"), r"encoder.local_branch.1.score.\1"),
        (re.compile(r"conv_g\.(.+)"), r"encoder.global_branch.0.\1"),
        (re.compile(r"bn_g\.(.+)"), r"encoder.global_branch.1.\1"),
        (re.compile(r"global_pool\.p"), "encoder.global_branch.3.p"),
        (re.compile(r"neck\.(.+)"), r"encoder.neck.\1"),
        (re.compile(r"head\.weight"), "head.weight"),
    ],
    "hybrid": [  # the Swin's tensors are timm 1.x's names already (_swin_as_timm)
        (re.compile(r"backbone\.patch_embed\.backbone\.(.+)"), r"encoder.swin.patch_embed.cnn.\1"),
        (re.compile(r"backbone\.patch_embed\.proj\.(.+)"), r"encoder.swin.patch_embed.proj.\1"),
        (re.compile(r"backbone\.((?:layers|norm)\..+)"), r"encoder.swin.\1"),
        (re.compile(r"neck\.(.+)"), r"encoder.neck.\1"),
        (re.compile(r"head\.weight"), "head.weight"),
    ],
}

UNUSED_CNN_BLOCKS = "EfficientNet blocks after the token level (run by the original, their output unused)"
SWIN_BUFFERS = "timm 0.4.12 Swin buffers relative_position_index and attn_mask (timm 1.x rebuilds them)"
UNUSED_GEM = "GeM exponent p (unused by the hybrid: its tokens are mean-pooled)"
_CNN_BLOCK = re.compile(r"backbone\.patch_embed\.backbone\.blocks\.(\d+)\..+")
_SWIN = re.compile(r"backbone\.((?:layers|norm)\..+)")
_OUR_CNN_BLOCK = re.compile(r"encoder\.swin\.patch_embed\.cnn\.blocks\.(\d+)\..+")

# Keys under which a training script's checkpoint dict commonly holds the model's state dict, most likely first. Ours,
# not timm's load_state_dict: that one reads local files only, prefers EMA weights and takes the whole dict when no
# known key is there; a released file may be in a bucket, and a dict that holds no or several state dicts is an error.
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class OriginalStateDict:
    tensors: dict[str, torch.Tensor]
    container_key: str | None  # the key of the dict that held the state dict; None for a bare state dict
    stripped_prefix: bool  # names had a wrapper's prefix ('module.' of DistributedDataParallel), now removed


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj, source: str) -> OriginalStateDict:
    """The state dict in what ``torch.load`` returned: the object itself, or the one dict of tensors it holds
    (``model``, ``state_dict`` or ``model_state_dict`` first when there are several)."""
    if not isinstance(obj, Mapping):
        raise ReleasedCheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict or a dict holding one")
    if _is_state_dict(obj):
        tensors, key = dict(obj), None
    else:
        candidates = [k for k, v in obj.items() if _is_state_dict(v)]
        preferred = [k for k in STATE_DICT_KEYS if k in candidates]
        if not preferred and len(candidates) != 1:
            found = (f"several dicts of tensors ({', '.join(map(str, candidates))})" if candidates
                     else "no dict of tensors")
            raise ReleasedCheckpointError(
                f"{source}: expected a state dict or a dict holding one under {' / '.join(STATE_DICT_KEYS)}; found "
                f"{found} among its keys {_names([str(k) for k in obj], 10)}"
            )
        key = (preferred or candidates)[0]
        tensors = dict(obj[key])
    cleaned = clean_state_dict(tensors)
    return OriginalStateDict(cleaned, key, list(cleaned) != list(tensors))


def detect_released_model(tensors: Mapping[str, torch.Tensor]) -> ReleasedModel | None:
    """Which of the six released models a state dict is, from its family's tensors and its stem width."""
    for family, stem_weight in _STEM_WEIGHT.items():
        if stem_weight in tensors:
            width = tensors[stem_weight].shape[0]
            return next((m for m in RELEASED_MODELS.values() if (m.family, m.stem_chs) == (family, width)), None)
    return None


def choose_released_model(tensors: Mapping[str, torch.Tensor], name: str | None, source: str) -> ReleasedModel:
    """The model ``name`` (checked against the tensors' shapes), or the one the shapes say when ``name`` is None."""
    if name is not None and name not in RELEASED_MODELS:
        raise ReleasedCheckpointError(
            f"--model {name}: not a released model; choose one of {', '.join(RELEASED_MODELS)}")
    detected = detect_released_model(tensors)
    if name is None:
        if detected is None:
            raise ReleasedCheckpointError(
                f"{source}: cannot tell which released model this is (no {' or '.join(_STEM_WEIGHT.values())} of a "
                f"known width); name it with --model, one of {', '.join(RELEASED_MODELS)}"
            )
        return detected
    if detected is not None and detected.name != name:
        raise ReleasedCheckpointError(
            f"{source}: its tensor shapes are those of {detected.name} ({detected.title}), not --model {name}"
        )
    return RELEASED_MODELS[name]


@dataclass
class MappedStateDict:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # our names -> the original tensors (not copies)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # why -> original names


def _swin_as_timm(tensors: Mapping[str, torch.Tensor], swin: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The original's tensors with its Swin's renamed as timm 1.x names them, by timm's own converter of the original
    Swin checkpoints; and the original names of the tensors that converter drops (the buffers timm 1.x rebuilds)."""
    theirs = {m[1]: tensor for name, tensor in tensors.items() if (m := _SWIN.fullmatch(name))}
    converted = swin_checkpoint_filter(theirs, swin)
    timm_name = {id(tensor): name for name, tensor in converted.items()}
    originals = {id(tensor) for tensor in theirs.values()}
    resized = [name for name, tensor in converted.items() if id(tensor) not in originals]
    if resized:  # timm resizes a relative position table of another window size: here that is another model
        raise ReleasedCheckpointError(f"tensor(s) {_names(resized)}: shapes differ from our Swin's; is the file that "
                                      "model?")
    renamed, dropped = {}, []
    for name, tensor in tensors.items():
        if not _SWIN.fullmatch(name):
            renamed[name] = tensor
        elif id(tensor) in timm_name:
            renamed[f"backbone.{timm_name[id(tensor)]}"] = tensor
        else:
            dropped.append(name)
    return renamed, dropped


def _drop_reason(name: str, family: str, last_cnn_stage: int | None) -> str | None:
    if family != "hybrid":
        return None
    if block := _CNN_BLOCK.fullmatch(name):
        return UNUSED_CNN_BLOCKS if int(block[1]) > last_cnn_stage else None
    return UNUSED_GEM if name == "global_pool.p" else None


def _our_name(name: str, family: str) -> str | None:
    for pattern, replacement in _RENAMES[family]:
        if match := pattern.fullmatch(name):
            return match.expand(replacement)
    return None


def map_state_dict(tensors: Mapping[str, torch.Tensor], released: ReleasedModel, model: nn.Module) -> MappedStateDict:
    """Rename the original tensors to ours. ``model`` is our model (on the meta device will do): every tensor of its
    state dict must be filled with the same shape, and every original tensor must map onto one of them or be one of
    the known unused tensors; anything else is an error naming the tensors."""
    target = model.state_dict()
    # The hybrid's CNN is built up to its token level: the stages of the original beyond our last are unused.
    our_stages = [int(m[1]) for name in target if (m := _OUR_CNN_BLOCK.fullmatch(name))]
    last_cnn_stage = max(our_stages) if our_stages else None
    mapped = MappedStateDict()
    if released.family == "hybrid":
        tensors, swin_buffers = _swin_as_timm(tensors, model.encoder.swin)
        if swin_buffers:
            mapped.dropped[SWIN_BUFFERS] = swin_buffers
    unmapped, unknown, misshapen = [], [], []
    for name, tensor in tensors.items():
        if reason := _drop_reason(name, released.family, last_cnn_stage):
            mapped.dropped.setdefault(reason, []).append(name)
        elif (ours := _our_name(name, released.family)) is None:
            unmapped.append(name)
        elif ours not in target:
            unknown.append(f"{name} -> {ours}")
        elif tuple(tensor.shape) != tuple(target[ours].shape):
            misshapen.append(f"{name} {list(tensor.shape)} -> {ours} {list(target[ours].shape)}")
        else:
            mapped.tensors[ours] = tensor
    what = f"a {released.title} ({released.name})"
    if unmapped:
        raise ReleasedCheckpointError(
            f"tensor(s) {_names(unmapped)} of the file have no counterpart in {what}; is the file that model?")
    if unknown:
        raise ReleasedCheckpointError(f"tensor(s) {_names(unknown)}: our {released.name} model has no such tensor")
    if misshapen:
        raise ReleasedCheckpointError(
            f"tensor(s) {_names(misshapen)}: shapes differ; the file is not {what}, or its recipe changed")
    missing = [name for name in target if name not in mapped.tensors]
    if missing:
        raise ReleasedCheckpointError(f"our {released.name} model's {_names(missing)}: not in the file")
    return mapped


def released_config_tree(released: ReleasedModel, recipe_tree: dict) -> dict:
    """The recipe's config as the released weights need it: the original's preprocessing and, for DOLG, its fusion;
    no ImageNet weights (the file holds every weight, and loading the checkpoint must not download anything)."""
    tree = copy.deepcopy(recipe_tree)
    set_dotted(tree, "model.pretrained", False, released.name)
    set_dotted(tree, "data.preprocessing", "original", released.name)
    if released.family == "dolg":
        set_dotted(tree, "model.fusion", "published", released.name)
    return tree


def landmark_ids_from_train_clean(csv: bytes, uri: str) -> np.ndarray:
    """Class index -> landmark id of the original head: the GLDv2c landmark ids, sorted ascending."""
    try:
        landmarks = pd.read_csv(io.BytesIO(csv), usecols=["landmark_id"])["landmark_id"]
    except ValueError as err:
        raise ReleasedCheckpointError(f"{uri}: not GLDv2's train_clean.csv (landmark_id,images): {err}") from None
    return np.unique(landmarks.to_numpy(np.int64))


def _read_landmark_ids(root: Location) -> np.ndarray:
    loc = root.child(gldv2.TRAIN_CLEAN_CSV)
    if not exists(loc):
        raise ReleasedCheckpointError(
            f"{loc.uri} not found: the label map comes from GLDv2's {gldv2.TRAIN_CLEAN_CSV}; pass --data-root <the "
            "GLDv2 root that holds it> (GLDv2's own bucket: --data-root s3://google-landmark --anonymous)"
        )
    return landmark_ids_from_train_clean(read_bytes(loc), loc.uri)


def read_original(source: Location, allow_pickle: bool) -> OriginalStateDict:
    """The state dict of a released file (a local path or bucket URI)."""
    data = source.path if not source.is_s3 else io.BytesIO(read_bytes(source))
    try:
        obj = torch.load(data, map_location="cpu", weights_only=not allow_pickle)
    except FileNotFoundError:
        raise StorageError(f"{source.uri}: no such file") from None
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or ValueError for what it cannot read
        if not allow_pickle and "Unsupported global" in str(err):
            raise ReleasedCheckpointError(
                f"{source.uri}: holds Python objects besides tensors, which torch.load refuses by default; if you "
                "trust where the file comes from, rerun with --allow-pickle"
            ) from None
        # The weights-only unpickler's message is a page about weights_only, misleading for a file that is not one.
        first_line = next(iter(str(err).strip().splitlines()), "")
        why = "" if isinstance(err, pickle.UnpicklingError) or not first_line else f": {first_line}"
        raise ReleasedCheckpointError(f"{source.uri}: not a torch checkpoint file ({type(err).__name__}{why})") from None
    return unwrap_state_dict(obj, source.uri)


def _released_config(released: ReleasedModel, recipe: Path, out: Location, storage: StorageConfig,
                     data_root: str | None, data_storage: StorageConfig, overrides: list[str]) -> Config:
    try:
        tree = yaml.safe_load(recipe.read_text())
    except OSError as err:
        raise ConfigError(f"{recipe}: the recipe of {released.name} cannot be read ({err})") from None
    tree = released_config_tree(released, tree)
    # The config says where the run is, so that later jobs (embed, init_from) find it as its own.
    output_dir, _, name = out.uri.rpartition("/")
    set_dotted(tree, "run.name", name, str(recipe))
    set_dotted(tree, "run.output_dir", output_dir, str(recipe))
    set_dotted(tree, "run.storage", storage.model_dump(mode="json"), str(recipe))
    if data_root is not None:
        set_dotted(tree, "data.root", data_root, str(recipe))
        set_dotted(tree, "data.storage", data_storage.model_dump(mode="json"), str(recipe))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value, str(recipe))
    return config_from_dict(tree, f"{recipe} (as converted)")


def _absent_or_empty(loc: Location) -> bool:
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        return True
    return info.type == pafs.FileType.Directory and not loc.fs.get_file_info(pafs.FileSelector(loc.path))


@dataclass(frozen=True)
class ConversionReport:
    model: ReleasedModel
    detected: bool  # named by its tensor shapes, not by --model
    container_key: str | None
    stripped_prefix: bool
    mapped: int
    dropped: dict[str, list[str]]
    classes: int
    checkpoint: str  # the URI of the checkpoint folder written

    def summary(self) -> str:
        how = "detected from its tensor shapes" if self.detected else "as named"
        held = f"the state dict under key '{self.container_key}'" if self.container_key else "a bare state dict"
        prefix = ", 'module.' prefixes stripped" if self.stripped_prefix else ""
        lines = [
            f"[convert] {self.model.title} ({self.model.name}, {how}): {held}{prefix}",
            f"[convert] mapped {self.mapped} tensors; dropped {sum(map(len, self.dropped.values()))}",
            *(f"[convert]   {len(names)}: {reason}" for reason, names in self.dropped.items()),
            f"[convert] label map: {self.classes:,} GLDv2c classes; wrote {self.checkpoint}",
        ]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"model": self.model.name, "detected": self.detected, "container_key": self.container_key,
                "stripped_module_prefix": self.stripped_prefix, "mapped": self.mapped, "dropped": self.dropped,
                "classes": self.classes, "checkpoint": self.checkpoint}


def convert_released(source: str, out: str, *, recipes: Path, model_name: str | None = None,
                     storage: StorageConfig = StorageConfig(), data_root: str | None = None,
                     data_storage: StorageConfig = StorageConfig(), overrides: list[str] = (),
                     allow_pickle: bool = False, printer: Printer = say) -> ConversionReport:
    """Turn a released 2021 checkpoint file into a run folder of this project at ``out``: ``<out>/checkpoint_released``
    (weights loaded strictly into our model, the recipe's config, the GLDv2c label map) and ``<out>/conversion.json``.

    ``source`` and ``out`` are reached with ``storage``; the label map is read from ``<data.root>/metadata/
    train_clean.csv``, data.root being ``data_root`` (reached with ``data_storage``) or the recipe's own.
    """
    from ray_landmark.models.factory import build_model  # imported here: it imports every model family

    out_loc = resolve(out, storage)
    if not _absent_or_empty(out_loc):
        raise ReleasedCheckpointError(f"{out_loc.uri}: already exists and is not empty; choose another --out")
    source_loc = resolve(source, storage)
    printer(f"[convert] reading {source_loc.uri}")
    original = read_original(source_loc, allow_pickle)
    released = choose_released_model(original.tensors, model_name, source_loc.uri)
    cfg = _released_config(released, recipes / f"{released.name}.yaml", out_loc, storage, data_root, data_storage,
                           list(overrides))
    landmark_ids = _read_landmark_ids(resolve(cfg.data.root, cfg.data.storage))
    head = original.tensors.get("head.weight")
    if head is not None and head.shape[0] != cfg.loss.subcenters * len(landmark_ids):
        raise ReleasedCheckpointError(
            f"{source_loc.uri}: head.weight has {head.shape[0]:,} rows, but {cfg.loss.subcenters} sub-centres x "
            f"{len(landmark_ids):,} landmarks of {cfg.data.root}/{gldv2.TRAIN_CLEAN_CSV} make "
            f"{cfg.loss.subcenters * len(landmark_ids):,}; pass the --data-root of GLDv2 itself (81,313 landmarks)"
        )

    model = build_model(cfg.model, cfg.loss, len(landmark_ids), cfg.data.image_size)
    mapped = map_state_dict(original.tensors, released, model)
    model.load_state_dict(mapped.tensors, strict=True)
    state = {"model": model.state_dict(), "landmark_ids": torch.as_tensor(landmark_ids, dtype=torch.int64)}

    checkpoint = out_loc.child(CHECKPOINT_DIR)
    report = ConversionReport(released, model_name is None, original.container_key, original.stripped_prefix,
                              len(mapped.tensors), mapped.dropped, len(landmark_ids), checkpoint.uri)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), state=state, config=cfg.model_dump(mode="json"), progress=Progress(0, 0, 0))
        if not checkpoint.is_s3:
            out_loc.fs.create_dir(checkpoint.path, recursive=True)
        pafs.copy_files(tmp, checkpoint.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=out_loc.fs)
    report_json = {"source": source_loc.uri, **report.to_json()}
    write_bytes(out_loc.child(REPORT_FILE), json.dumps(report_json, indent=2).encode())
    return report
