"""Embeddings of GLDv2 splits with a trained checkpoint: a Ray Data batch job (docs/ray-notes.md §4).

    tar shards --read (CPU tasks)--> id, JPEG --decode + resize (CPU tasks, the validation transform)-->
    uint8 images --Embedder actors (the model; GPU when they have one, bf16/fp16)--> id, float16 unit embedding
    --> the driver groups rows by shard --> <out>/<split>/<shard>.parquet

The unit of work is a shard: its output file is written once every row of it has been embedded, so a rerun skips the
shards whose file exists and embeds the rest. Shards are embedded in passes of ``shards_per_pass``, which bounds what
the driver holds (about 1 KB per 512-d image). Every image of a split is embedded exactly once: the job compares what
it wrote with the split's list (``metadata/test.csv``, ``index.csv``, or the label view for train) and with what the
read tasks saw, and reports skipped images by reason.

How the images are embedded (batch size, flip TTA, actors, compile) is one ``infer.config.EmbedSettings``, from the
ensemble config's ``embed`` section or ``jobs/embed.py``'s arguments to each actor. On a GPU each actor compiles its
model's encoder (``embed.compile``, as ``train.compile``) and pads short batches to ``batch_size``, so it compiles once.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from ray_landmark.config import config_from_dict
from ray_landmark.data import gldv2
from ray_landmark.data.config import DataConfig, LabelView, StorageConfig
from ray_landmark.data.metadata import Manifest, open_manifest
from ray_landmark.errors import JobError
from ray_landmark.data.pipeline import (
    READ, SKIP_REASONS, decodes_in_worker, eval_stream, images_on_device, report_counts, shard_paths,
)
from ray_landmark.data.storage import Location, StorageError, exists, list_files, read_bytes, resolve, write_bytes
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.data.worker_decode import WorkerDecoder
from ray_landmark.infer.config import EmbedSettings
from ray_landmark.models.amp import MixedPrecision
from ray_landmark.models.torch_compile import compile_for_embedding, compile_wanted, pad_batch
from ray_landmark.progress import Printer, ProgressLine, say
from ray_landmark.runs.checkpoint import checkpoint_folder, load_model, read_checkpoint_config

INFO_FILE = "_embedding.json"


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
    service replica embeds its requests' images with it too (``serve.app``)."""

    def __init__(self, checkpoint: str, storage: StorageConfig, settings: EmbedSettings,
                 decode: DataConfig | None = None, counters: dict | None = None):
        """``settings``: its flip TTA and compile (a compiled model gets every batch padded to
        ``settings.batch_size``). ``decode``: the data config to decode JPEGs with on this actor's device
        (data.decode), reporting corrupt ones to ``counters`` (split -> its stream's SampleCounter); None when Ray
        Data tasks decode."""
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(checkpoint, storage).model.to(self.device, memory_format=torch.channels_last)
        self.pad_to = None
        if compile_wanted(settings.compile, self.device):
            compile_for_embedding(self.model, settings.compile_backend)
            self.pad_to = settings.batch_size
        self.flip_tta = settings.flip_tta
        self.precision = MixedPrecision(self.device)  # no autocast on the CPU: the model runs in float32 there
        self.decoder = WorkerDecoder(decode.image_size, decode.preprocessing, self.device) if decode else None
        self.counters = counters

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        splits = batch["split"]
        batch, corrupt = images_on_device(batch, self.device, self.decoder)
        for split, n in Counter(str(splits[position]) for position in corrupt).items():
            report_counts(self.counters[split], {"corrupt_jpeg": n})
        images = normalize_on_device(batch["image"])
        with self.precision.autocast():
            embeddings = self._embed(images)
            if self.flip_tta:
                embeddings = torch.nn.functional.normalize(embeddings + self._embed(images.flip(3)), dim=1)
        return {"id": batch["id"], "split": batch["split"], "shard": batch["shard"],
                "embedding": embeddings.float().cpu().numpy().astype(np.float16)}

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit embeddings of normalised images. A compiled model sees one shape only (one compile): a short batch
        (a block's last rows, or corrupt JPEGs dropped) is padded with zero images, whose rows are then dropped;
        in evaluation mode every image is embedded on its own, so the padding changes no other row."""
        rows = len(images)
        if self.pad_to:
            images = pad_batch(images, self.pad_to)
        return self.model.embed(images.contiguous(memory_format=torch.channels_last))[:rows]


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


def _check_info(folder: Location, info: dict) -> None:
    """A folder holds one checkpoint's embeddings of one selection of images: refuse to mix."""
    loc = folder.child(INFO_FILE)
    # A guard file with no embedding beside it (left by a run that failed before its first shard) guards nothing:
    # a correct rerun replaces it.
    if exists(loc) and _has_embeddings(folder):
        old = json.loads(read_bytes(loc))
        keys = ("checkpoint", "image_size", "flip_tta", "view")
        if any(old.get(k) != info.get(k) for k in keys):
            raise EmbeddingError(
                f"{folder.uri} holds embeddings of {', '.join(f'{k}={old.get(k)}' for k in keys)}; embed "
                f"{info['checkpoint']} into another folder, or delete this one"
            )
    else:
        write_bytes(loc, json.dumps(info, indent=2).encode())


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
                "flip_tta": request.settings.flip_tta, "view": request.view if split == "train" else None,
                "split": split}
        _check_info(out.child(split), info)
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
    settings = request.settings
    # JPEG bytes when the model actors decode them (data.decode), else decoded images.
    worker_decode = decodes_in_worker(data, settings.gpus_per_actor > 0,
                                      "embed.gpus_per_actor above 0, in jobs/embed.py --gpus-per-actor")
    streams = {split: eval_stream(data, split, selections[split], only_shards={sh for s, sh in group if s == split},
                                  worker_decode=worker_decode)
               for split in sorted({s for s, _ in group})}
    first, *others = [s.dataset for s in streams.values()]
    dataset = first.union(*others) if others else first
    dataset = dataset.map_batches(
        Embedder,
        # A URI, not the model: each actor loads it (docs/ray-notes.md §4). Ray Data keeps these small arguments in the
        # object store and logs a warning about restarts (ray#53727); they stay in scope for the whole pass.
        fn_constructor_kwargs={"checkpoint": request.checkpoint, "storage": request.storage, "settings": settings,
                               "decode": data if worker_decode else None,
                               "counters": {split: stream.counter for split, stream in streams.items()}},
        batch_size=settings.batch_size,
        batch_format="numpy",
        num_gpus=settings.gpus_per_actor or None,
        num_cpus=settings.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=settings.actors),
    )
    rows: dict[tuple[str, str], tuple[list, list]] = {key: ([], []) for key in group}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for split, shard, image_id, embedding in zip(batch["split"], batch["shard"], batch["id"], batch["embedding"]):
            ids, embeddings = rows[(str(split), str(shard))]
            ids.append(str(image_id))
            embeddings.append(embedding)
        line.update(len(batch["id"]))
    counts = {split: stream.counts() for split, stream in streams.items()}
    for split, split_counts in counts.items():
        received = sum(len(ids) for (s, _), (ids, _) in rows.items() if s == split)
        good = split_counts.get(READ, 0) - split_counts.get("corrupt_jpeg", 0)
        if received != good:  # every image the read tasks handed on is either embedded or counted as corrupt
            raise EmbeddingError(f"{split}: {received} images embedded but {good} were read and decodable; "
                                 f"rows were lost in the pipeline, rerun to embed those shards again")
    dim = next((len(e[0]) for _, e in rows.values() if e), 1)
    for (split, shard), (ids, embeddings) in rows.items():
        write_embeddings(_shard_file(out.child(split), shard), ids,
                       np.stack(embeddings) if embeddings else np.zeros((0, dim), np.float16))
    return counts


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
