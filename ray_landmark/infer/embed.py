"""Embeddings with a trained checkpoint: one Ray Data batch pipeline for GLDv2 splits and Revisited Oxford and Paris
(``infer.revisited``) alike (docs/ray-notes.md §4).

    rows of images --Embedder actors (the model; GPU when they have one, bf16/fp16)--> id, float16 unit embedding
    --> the driver groups rows by unit of work --> one parquet file per unit

For GLDv2 the rows come from tar shards (read, decode + resize in CPU tasks, the validation transform) and the unit
is a shard: ``<out>/<split>/<shard>.parquet``. A unit's file is written once every row of it has been embedded, so a
rerun skips the units whose file exists and embeds the rest; each folder's ``_embedding.json`` says what its files
were embedded with, and other settings are refused. Units are embedded in passes of ``shards_per_pass``, which
bounds what the driver holds (about 1 KB per 512-d image). Every image of a split is embedded exactly once: the job
compares what it wrote with the split's list (``metadata/test.csv``, ``index.csv``, or the label view for train) and
with what the read tasks saw, and reports skipped images by reason.

How the images are embedded (batch size, flip TTA, scales, actors, compile) is one ``infer.config.EmbedSettings``,
from the ensemble config's ``embed`` section or a job's arguments to each actor. Images of one shape are embedded
together; at several scales each image's unit embeddings (and its mirror's, with flip TTA) are summed and
L2-normalised. On a GPU each actor compiles its model's encoder (``embed.compile``, as ``train.compile``) and pads
short batches to ``batch_size``, so it compiles once per image shape.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
import torch.nn.functional as F

from ray_landmark.config import config_from_dict
from ray_landmark.data import gldv2
from ray_landmark.data.config import DataConfig, LabelView, StorageConfig
from ray_landmark.data.metadata import Manifest, open_manifest
from ray_landmark.errors import JobError, user_error
from ray_landmark.data.batches import images_on_device
from ray_landmark.data.pipeline import READ, SKIP_REASONS, decodes_in_worker, eval_stream, shard_paths
from ray_landmark.data.storage import Location, StorageError, exists, list_files, read_bytes, resolve, write_bytes
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.data.worker_decode import WorkerDecoder
from ray_landmark.infer.onnx_runtime import OnnxEmbedding
from ray_landmark.infer.config import EmbedSettings
from ray_landmark.models.amp import MixedPrecision
from ray_landmark.models.torch_compile import compile_for_embedding, compile_wanted, pad_batch
from ray_landmark.progress import Printer, ProgressLine, say
from ray_landmark.runs.checkpoint import checkpoint_folder, load_model, read_checkpoint_config

INFO_FILE = "_embedding.json"
UNRECORDED = {"scales": [1.0]}  # what an _embedding.json written before a setting existed was embedded with


class EmbeddingError(JobError, ValueError):
    """Embedding files that cannot be used as they are; the message names the file or folder."""


@dataclass(frozen=True)
class EmbedRequest:
    """What to embed with which checkpoint, where the parquet files go (``<out>/<split>/``), and how (``settings``)."""

    checkpoint: str
    out: str
    splits: tuple[str, ...]
    name: str | None = None  # in progress lines; default: the checkpoint's run name
    view: LabelView = "gldv2c"  # the train images to embed (the kNN gallery)
    # Where the data lives; default: the checkpoint's own data section. The image size and preprocessing are always
    # the checkpoint's: the pixels its model was trained on.
    data: DataConfig | None = None
    storage: StorageConfig = field(default_factory=StorageConfig)  # how to reach the checkpoint and ``out``
    settings: EmbedSettings = field(default_factory=EmbedSettings)


class Embedder:
    """map_batches UDF: one model per actor, loaded from the checkpoint URI in the actor (not shipped by value). A
    service replica embeds its requests' images with it too (``serve.app``).

    A batch's ``image`` is uint8 N×S×S×3, or an object array of uint8 H×W×3 images of any shapes; with ``decode``,
    ``jpeg`` bytes instead. Rows whose ``status`` is not "ok" (an image a Ray Data task could not use, passed on so
    that the driver can name it) get a zero embedding; every column but the image is passed through."""

    def __init__(self, checkpoint: str, storage: StorageConfig, settings: EmbedSettings,
                 decode: DataConfig | None = None, counters: dict | None = None, onnx: str | None = None):
        """``settings``: its scales, flip TTA and compile (a compiled model gets every batch padded to
        ``settings.batch_size``). ``decode``: the data config to decode JPEGs with on this actor's device
        (data.decode), reporting corrupt ones to ``counters`` (split -> its stream's ``StreamCounter``); None when Ray
        Data tasks decode. ``onnx``: the checkpoint's exported model.onnx (``infer/onnx_runtime.py``), run by
        onnxruntime instead of the PyTorch model (a service's ``backend: onnxruntime``)."""
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pad_to = None
        if onnx:
            self.model = OnnxEmbedding(onnx, self.device, threads=torch.get_num_threads())
            self.dim = self.model.dim
        else:
            self.model = load_model(checkpoint, storage).model.to(self.device, memory_format=torch.channels_last)
            if compile_wanted(settings.compile, self.device):
                compile_for_embedding(self.model, settings.compile_backend)
                self.pad_to = settings.batch_size
            self.dim = self.model.head.weight.shape[1]
        self.settings = settings
        self.precision = MixedPrecision(self.device)  # no autocast on the CPU: the model runs in float32 there
        self.decoder = WorkerDecoder(decode.image_size, decode.preprocessing, self.device) if decode else None
        self.counters = counters

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.decoder is not None:
            splits = batch["split"]
            batch, corrupt = images_on_device(batch, self.device, self.decoder)
            for split, n in Counter(str(splits[position]) for position in corrupt).items():
                self.counters[split].add({"corrupt_jpeg": n})
        rows = np.flatnonzero(batch["status"] == "ok") if "status" in batch else np.arange(len(batch["id"]))
        embeddings = np.zeros((len(batch["id"]), self.dim), np.float16)
        if len(rows):
            embeddings[rows] = embed_images(
                self.model, self._pixels(batch["image"], rows), self.settings.scales, self.settings.batch_size,
                self.settings.flip_tta, self.pad_to, self.precision).cpu().numpy().astype(np.float16)
        passed = {key: values for key, values in batch.items() if key not in ("image", "jpeg")}
        return passed | {"embedding": embeddings}

    def _pixels(self, images: np.ndarray | torch.Tensor, rows: np.ndarray) -> torch.Tensor | list[torch.Tensor]:
        """The rows' uint8 images on the device: one N×S×S×3 tensor, or H×W×3 tensors of any shapes."""
        if isinstance(images, np.ndarray) and images.dtype == object:
            return [torch.from_numpy(np.ascontiguousarray(images[i])).to(self.device) for i in rows]
        images = images if len(rows) == len(images) else images[rows]
        return images if isinstance(images, torch.Tensor) else torch.from_numpy(images).to(self.device)


def embed_images(model: torch.nn.Module, images: torch.Tensor | Sequence[torch.Tensor], scales: Sequence[float],
                 batch_size: int, flip: bool = False, pad_to: int | None = None,
                 precision: MixedPrecision | None = None) -> torch.Tensor:
    """float32 [N, D] unit descriptors of uint8 images on the model's device (an N×H×W×3 batch, or H×W×3 images of
    any shapes), those of one shape embedded together in batches of ``batch_size``. At each scale an image is resized
    (bilinear, antialiased when shrinking) and embedded, with ``flip`` its mirror image too; its unit embeddings are
    summed and L2-normalised. ``pad_to``: a compiled model's one batch size; ``precision``: the autocast to run the
    model under (none by default)."""
    total = None
    for positions, batch in _by_shape(images):
        normalized = normalize_on_device(batch)
        for scale in scales:
            resized = _rescaled(normalized, scale)
            for start in range(0, len(positions), batch_size):
                chunk = resized[start:start + batch_size]
                embedded = sum(_embed(model, view, pad_to, precision) for view in
                               ((chunk, chunk.flip(3)) if flip else (chunk,)))
                if total is None:
                    total = torch.zeros((len(images), embedded.shape[1]), device=embedded.device)
                total[positions[start:start + batch_size]] += embedded
    return F.normalize(total, dim=1)


def _by_shape(images: torch.Tensor | Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """(positions, N×H×W×3 batch) per image shape: a batch is one group already."""
    if isinstance(images, torch.Tensor):
        return [(list(range(len(images))), images)]
    groups: dict[tuple, list[int]] = {}
    for position, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(position)
    return [(positions, torch.stack([images[p] for p in positions])) for positions in groups.values()]


def _rescaled(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Normalised NCHW images with their sides times ``scale``. Resizing commutes with the normalisation (an affine
    map per channel; the interpolation weights sum to 1), so the uint8 image is normalised once for every scale."""
    if scale == 1:
        return images
    height, width = images.shape[2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)


def _embed(model: torch.nn.Module, images: torch.Tensor, pad_to: int | None,
           precision: MixedPrecision | None) -> torch.Tensor:
    """float32 unit embeddings of normalised images. A compiled model sees one shape only (one compile): a short
    batch (a block's last rows, or corrupt JPEGs dropped) is padded with zero images, whose rows are then dropped;
    in evaluation mode every image is embedded on its own, so the padding changes no other row."""
    rows = len(images)
    if pad_to:
        images = pad_batch(images, pad_to)
    with precision.autocast() if precision else contextlib.nullcontext():
        return model.embed(images.contiguous(memory_format=torch.channels_last))[:rows].float()


def split_image_ids(manifest: Manifest, split: str, view: LabelView) -> set[str]:
    """The ids a split's embeddings must cover: the CSV lists for test and index, the label view for train."""
    if split == "train":
        return set(gldv2.u64_to_ids(manifest.view_images(view)["id"].to_numpy(np.uint64)))
    return set(manifest.test()["id"] if split == "test" else manifest.index()["id"])


def _shard_file(folder: Location, shard: str) -> Location:
    return folder.child(shard.removesuffix(".tar") + ".parquet")


def write_embeddings(loc: Location, ids: list[str], embeddings: np.ndarray) -> None:
    """One shard's rows, written in one piece (``write_bytes``): a file that exists is complete."""
    flat = pa.array(embeddings.reshape(-1), pa.float16())
    table = pa.table({"id": pa.array(ids, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1])})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(loc, buf.getvalue())


def _rows(loc: Location) -> int:
    """Rows of a parquet file, from its footer."""
    with loc.fs.open_input_file(loc.path) as f:
        return pq.read_metadata(f).num_rows


def _tables(folder: Location, columns: list[str] | None = None):
    """(uri, table) of each parquet file of a split's folder, ``columns`` only."""
    for path in list_files(folder, ".parquet"):
        uri = folder.uri_of(path)
        yield uri, pq.read_table(io.BytesIO(read_bytes(Location(uri, folder.fs, path))), columns=columns)


def _unique_ids(tables) -> tuple[np.ndarray, list]:
    """The ids of (uri, table) pairs, an id in two files being an error naming both; also the tables."""
    ids, seen, kept = [], {}, []
    for uri, table in tables:
        for image_id in table.column("id").to_pylist():
            if image_id in seen:
                raise EmbeddingError(f"{uri}: image {image_id} is also in {seen[image_id]}")
            seen[image_id] = uri
            ids.append(image_id)
        kept.append((uri, table))
    return np.asarray(ids, dtype=object), kept


def read_ids(folder: Location) -> np.ndarray:
    """The image ids of one split's folder (the embeddings are not read)."""
    return _unique_ids(_tables(folder, ["id"]))[0]


def read_embeddings(folder: Location) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N] str, embeddings [N, D] float16) of one split's folder; a file of another dimension or an id in two
    files is an error naming the file."""
    ids, tables = _unique_ids(_tables(folder))
    parts, dim = [], None
    for uri, table in tables:
        if not len(table):
            continue  # a shard with no image of the split
        width = table.schema.field("embedding").type.list_size
        if dim is not None and width != dim:
            raise EmbeddingError(f"{uri}: {width}-d embeddings where the other files of {folder.uri} hold {dim}-d")
        dim = width
        values = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        parts.append(values.reshape(len(table), width).astype(np.float16, copy=False))
    return ids, (np.concatenate(parts) if parts else np.zeros((0, dim or 0), np.float16))


def _has_embeddings(folder: Location) -> bool:
    try:
        list_files(folder, ".parquet")
    except StorageError:  # no parquet file there (or no folder)
        return False
    return True


def read_info(folder: Location) -> dict | None:
    """What a folder's embeddings were made with (its ``_embedding.json``); None when it has none yet."""
    loc = folder.child(INFO_FILE)
    return UNRECORDED | json.loads(read_bytes(loc)) if exists(loc) else None


def check_info(folder: Location, info: dict) -> None:
    """A folder holds embeddings made one way (``info``: the checkpoint, image size, scales, ...): refuse to mix. A
    new folder gets ``info`` written."""
    old = read_info(folder)
    # A guard file with no embedding beside it (left by a run that failed before its first file) guards nothing: a
    # correct rerun replaces it.
    if old is None or not _has_embeddings(folder):
        write_bytes(folder.child(INFO_FILE), json.dumps(info, indent=2).encode())
        return
    differ = [key for key, value in info.items() if old.get(key) != value]
    if differ:
        raise EmbeddingError(
            f"{folder.uri} holds embeddings of {', '.join(f'{k}={old.get(k)}' for k in differ)}, not "
            f"{', '.join(f'{k}={info[k]}' for k in differ)}; embed into another folder, or delete this one")


def embed_splits(request: EmbedRequest, printer: Printer = say) -> dict[str, dict]:
    """Embed every image of ``request.splits`` that has no output yet; returns a summary per split."""
    # A run folder means its newest checkpoint: resolved once, so that every actor and pass (and a rerun, through
    # the folder's _embedding.json) embeds with the same one, even while training writes newer ones.
    request = replace(request, checkpoint=checkpoint_folder(request.checkpoint, request.storage).uri)
    cfg = config_from_dict(read_checkpoint_config(request.checkpoint, request.storage), f"{request.checkpoint}")
    data = (request.data or cfg.data).model_copy(
        update={"image_size": cfg.data.image_size, "preprocessing": cfg.data.preprocessing})
    manifest = open_manifest(data)
    out = resolve(request.out, request.storage)
    name = request.name or cfg.run.name

    pending: list[tuple[str, str]] = []  # (split, shard)
    expected = {split: split_image_ids(manifest, split, request.view) for split in request.splits}
    # Train rows are those of the view (read once: 12 bytes for each of GLDv2's 4.1 M train ids); test and index
    # rows are every member of their shards.
    selections = {split: manifest.label_lookup(request.view) if split == "train" else None
                  for split in request.splits}
    remaining = 0  # images still to embed, for the ETA: listed minus those in the files already written
    for split in request.splits:
        info = {"checkpoint": request.checkpoint, "arch": cfg.model.arch, "image_size": data.image_size,
                "flip_tta": request.settings.flip_tta, "scales": request.settings.scales,
                "view": request.view if split == "train" else None, "split": split}
        check_info(out.child(split), info)
        _, paths = shard_paths(data, split)
        files = {os.path.basename(p): _shard_file(out.child(split), os.path.basename(p)) for p in paths}
        done = {shard for shard, file in files.items() if exists(file)}
        pending += [(split, shard) for shard in files if shard not in done]
        remaining += max(0, len(expected[split]) - sum(_rows(files[shard]) for shard in done))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # split -> reason -> images
    if pending:
        printer(f"[embed] {name}: {len(pending)} shards to embed ({', '.join(request.splits)}), "
                f"{request.settings.actors} model actor(s), image size {data.image_size}")
        line = ProgressLine(f"[embed] {name}", total=remaining or None, printer=printer)
        for start in range(0, len(pending), request.settings.shards_per_pass):
            group = pending[start:start + request.settings.shards_per_pass]
            for split, split_counts in _embed_pass(request, data, selections, out, group, line).items():
                for key, n in split_counts.items():
                    counts[split][key] += n
        line.close()
    else:
        printer(f"[embed] {name}: every shard of {', '.join(request.splits)} was embedded earlier with "
                f"{request.checkpoint}; reused")
    return {split: _verify(out.child(split), expected[split], counts[split], split, printer)
            for split in request.splits}


def _embed_pass(request: EmbedRequest, data: DataConfig, selections: dict, out: Location,
                group: list[tuple[str, str]], line: ProgressLine) -> dict[str, dict[str, int]]:
    """Embed the shards of ``group`` in one Ray Data pipeline, then write one file per shard; returns the read
    tasks' counts per split."""
    # JPEG bytes when the model actors decode them (data.decode), else decoded images.
    worker_decode = decodes_in_worker(data, request.settings.gpus_per_actor > 0,
                                      "embed.gpus_per_actor above 0, in jobs/embed.py --gpus-per-actor")
    streams = {split: eval_stream(data, split, selections[split], only_shards={sh for s, sh in group if s == split},
                                  worker_decode=worker_decode)
               for split in sorted({s for s, _ in group})}
    first, *others = [s.dataset for s in streams.values()]
    found = embed_units(first.union(*others) if others else first, ("split", "shard"), group, request.checkpoint,
                        request.storage, request.settings, line, decode=data if worker_decode else None,
                        counters={split: stream.counter for split, stream in streams.items()})
    counts = {split: stream.counts() for split, stream in streams.items()}
    for split, split_counts in counts.items():
        received = sum(len(rows.ids) for (s, _), rows in found.items() if s == split)
        good = split_counts.get(READ, 0) - split_counts.get("corrupt_jpeg", 0)
        if received != good:  # every image the read tasks handed on is either embedded or counted as corrupt
            raise EmbeddingError(f"{split}: {received} images embedded but {good} were read and decodable; "
                                 f"rows were lost in the pipeline, rerun to embed those shards again")
    write_units({(split, shard): _shard_file(out.child(split), shard) for split, shard in group}, found)
    return counts


@dataclass
class UnitRows:
    """A unit's rows from one pass: those embedded (ids, embeddings, and the other columns they carried), and the
    ids of those that were not, by their ``status``."""

    ids: list[str] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    columns: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    not_embedded: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))


def embed_units(dataset: ray.data.Dataset, keys: tuple[str, ...], units: Iterable[tuple[str, ...]], checkpoint: str,
                storage: StorageConfig, settings: EmbedSettings, line: ProgressLine, decode: DataConfig | None = None,
                counters: dict | None = None) -> dict[tuple[str, ...], UnitRows]:
    """The dataset's rows embedded by a pool of ``Embedder`` actors (``decode`` and ``counters`` go to each), grouped
    by unit: the values of their ``keys`` columns. Every unit of ``units`` is in the result, rows or none."""
    dataset = dataset.map_batches(
        Embedder,
        # A URI, not the model: each actor loads it (docs/ray-notes.md §4). Ray Data keeps these small arguments in the
        # object store and logs a warning about restarts (ray#53727); they stay in scope for the whole pass.
        fn_constructor_kwargs={"checkpoint": checkpoint, "storage": storage, "settings": settings, "decode": decode,
                               "counters": counters},
        batch_size=settings.batch_size,
        batch_format="numpy",
        num_gpus=settings.gpus_per_actor or None,
        num_cpus=settings.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=settings.actors),
    )
    found = {tuple(unit): UnitRows() for unit in units}
    for batch in _batches(dataset):
        carried = [c for c in batch if c not in (*keys, "id", "status", "embedding")]
        # A copy: the batch's arrays are views of its block in the object store, and a row kept as such a view would
        # keep the whole block there until the pass ends (at GLDv2's size, a pass's embeddings).
        embeddings = np.array(batch["embedding"])
        for i, unit in enumerate(zip(*(batch[k] for k in keys))):
            rows, image_id = found[tuple(str(v) for v in unit)], str(batch["id"][i])
            status = str(batch["status"][i]) if "status" in batch else "ok"
            if status != "ok":
                rows.not_embedded[status].append(image_id)
                continue
            rows.ids.append(image_id)
            rows.embeddings.append(embeddings[i])
            for column in carried:
                rows.columns[column].append(batch[column][i])
        line.update(len(batch["id"]))
    return found


def _batches(dataset: ray.data.Dataset):
    """The dataset's batches; a problem a user can fix raised in a Ray task (an unreadable tar, a missing file) comes
    out as that error alone, not wrapped in Ray's exceptions with their tracebacks."""
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        # Our messages are one line; Ray Data appends its retry advice to the exception's message.
        raise type(found)(str(found).splitlines()[0]) from None


def write_units(files: dict[tuple[str, ...], Location], found: dict[tuple[str, ...], UnitRows]) -> None:
    """Each unit's embedded rows to its file (``write_embeddings``: a file that exists is complete)."""
    dim = next((len(rows.embeddings[0]) for rows in found.values() if rows.embeddings), 1)
    for unit, rows in found.items():
        write_embeddings(files[unit], rows.ids,
                         np.stack(rows.embeddings) if rows.embeddings else np.zeros((0, dim), np.float16))


def _verify(folder: Location, expected: set[str], counts: dict[str, int], split: str, printer: Printer) -> dict:
    """Compare what the split's folder holds with the images it must cover; report by reason."""
    ids = read_ids(folder)
    embedded = set(ids)
    missing, unlisted = expected - embedded, embedded - expected
    skipped = {r: counts.get(r, 0) for r in SKIP_REASONS if counts.get(r, 0)}
    summary = {"split": split, "folder": folder.uri, "embedded": len(ids), "listed": len(expected),
               "listed_but_not_embedded": len(missing), "embedded_but_not_listed": len(unlisted),
               "skipped_this_run": skipped,
               "read_this_run": counts.get(READ, 0)}
    printer(f"[embed] {split}: {len(ids):,} images embedded of {len(expected):,} listed"
            + (f"; {len(missing):,} listed images not in the shards or unreadable, e.g. {min(missing)}" if missing
               else "")
            + (f"; skipped {skipped}" if skipped else "") + f" -> {folder.uri}")
    return summary
