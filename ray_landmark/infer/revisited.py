"""Revisited Oxford and Paris (+R1M) for a trained checkpoint or an ensemble: the literature's retrieval benchmark.

    parts (queries cropped to their boxes, database slices, distractor tars) --read (CPU tasks)--> id, JPEG, box
    --decode, crop, long side (CPU tasks)--> uint8 images of any shape --MultiScaleEmbedder actors (the model,
    GPU when they have one)--> id, float16 unit embedding --> <out>/embeddings/<model>/<dataset or distractors>/
    --> kNN (eval/search.py) of the queries over database + distractors --> eval/revisited.py: mAP and mP@1,5,10 for
    Easy, Medium and Hard --> <out>/<dataset>[+r1m]/results.json and report.html

A descriptor is the average of the image's unit embeddings at each scale (default 1/√2, 1, √2 of the long side),
L2-normalised again, as DELG and DOLG evaluate. A part's embeddings are written once it is complete and a rerun skips
the parts already written, so the R1M distractors are embedded once per model and settings, and an interrupted run
resumes; the distractor embeddings do not depend on the dataset and serve ROxf and RPar alike.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import ray
import ray.data
import torch
import torch.nn.functional as F

from ray_landmark.config import config_from_dict
from ray_landmark.data import revisited as rd
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.storage import Location, exists, read_bytes, resolve, write_bytes
from ray_landmark.data.transforms import CorruptImage, decode_pil, normalize_on_device
from ray_landmark.errors import JobError
from ray_landmark.eval.revisited import KAPPAS, PROTOCOLS, evaluate
from ray_landmark.eval.search import knn
from ray_landmark.infer.config import EmbedSettings, EnsembleConfig
from ray_landmark.infer.embed import EmbeddingError, Embedder, write_embeddings, read_embeddings
from ray_landmark.infer.postprocess import combine_families
from ray_landmark.infer.report import thumbnail_uri
from ray_landmark.models.amp import MixedPrecision
from ray_landmark.progress import Printer, ProgressLine, say
from ray_landmark.runs.checkpoint import checkpoint_folder, read_checkpoint_config

DEFAULT_SCALES = (1 / math.sqrt(2), 1.0, math.sqrt(2))
INFO_FILE = "_revisited.json"
READ_ROWS = 32  # rows per block a read task emits


@dataclass(frozen=True)
class EvalModel:
    name: str  # its embeddings folder and its row in the table
    checkpoint: str
    family: str  # models of one family are averaged before the families are concatenated (as the ensemble does)


@dataclass(frozen=True)
class RevisitedRequest:
    dataset: str  # roxford5k or rparis6k
    data: str  # the folder or bucket holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/
    out: str  # embeddings/, and <dataset>[+r1m]/results.json and report.html
    models: tuple[EvalModel, ...]
    distractors: str | None = None  # R1M: a folder of JPEGs or of tar shards
    storage: StorageConfig = field(default_factory=StorageConfig)
    long_side: int | None = None  # the image's long side at scale 1; None: each checkpoint's data.image_size
    scales: tuple[float, ...] = DEFAULT_SCALES
    square: bool = False  # squash to long_side² per scale, as the models were trained, instead of keeping the aspect
    ranking_depth: int = 10_000  # ranked images per query; exact when the database is not larger
    allow_missing: bool = False  # score although images of the ground truth are missing
    part_size: int = 2000
    parts_per_pass: int = 8
    batch_size: int = 16
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 2.0
    report_queries: int = 6
    report_results: int = 10

    @property
    def run_name(self) -> str:
        return self.dataset + ("+r1m" if self.distractors else "")


def models_from_checkpoint(checkpoint: str, storage: StorageConfig) -> tuple[EvalModel, ...]:
    cfg = read_checkpoint_config(checkpoint, storage)
    return (EvalModel(cfg["run"]["name"], checkpoint, cfg["model"]["arch"]),)


def models_from_ensemble(cfg: EnsembleConfig) -> tuple[EvalModel, ...]:
    """The ensemble's retrieval models."""
    return tuple(EvalModel(m.name, m.checkpoint, m.family) for m in cfg.models if "retrieval" in m.tasks)


# ---------------------------------------------------------------- multi-scale embedding


def multiscale_embed(model: torch.nn.Module, images: Sequence[np.ndarray], scales: Sequence[float],
                     device: torch.device, batch_size: int = 16, precision: MixedPrecision | None = None) -> torch.Tensor:
    """float32 [N, D] unit descriptors of uint8 H×W×3 images of any shapes: at each scale the image is resized
    (bilinear; antialiased when shrinking) and embedded, images of one shape in batches of ``batch_size``; the unit
    embeddings are summed over the scales and L2-normalised. ``precision``: the autocast to run the model under
    (none by default)."""
    total = None
    for scale in scales:
        resized = [_rescaled(torch.from_numpy(np.ascontiguousarray(image)).to(device), scale) for image in images]
        by_shape: dict[tuple, list[int]] = {}
        for position, image in enumerate(resized):
            by_shape.setdefault(tuple(image.shape), []).append(position)
        embeddings = None
        for positions in by_shape.values():
            for start in range(0, len(positions), batch_size):
                chunk = positions[start:start + batch_size]
                batch = normalize_on_device(torch.stack([resized[p] for p in chunk]).permute(0, 2, 3, 1))
                with precision.autocast() if precision else contextlib.nullcontext():
                    out = model.embed(batch.contiguous(memory_format=torch.channels_last)).float()
                if embeddings is None:
                    embeddings = torch.zeros((len(images), out.shape[1]), device=device)
                embeddings[chunk] = out
        total = embeddings if total is None else total + embeddings
    return F.normalize(total, dim=1)


def _rescaled(image: torch.Tensor, scale: float) -> torch.Tensor:
    """float 3×H'×W' of a uint8 H×W×3 image, its sides times ``scale``."""
    chw = image.permute(2, 0, 1).float()
    if scale == 1.0:
        return chw
    height, width = chw.shape[1:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(chw[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]


class MultiScaleEmbedder(Embedder):
    """map_batches UDF: ``Embedder``'s model on this actor, applied at several scales to images of any shape. Rows
    whose image could not be decoded pass through with a zero embedding and their status."""

    def __init__(self, checkpoint: str, storage: StorageConfig, scales: tuple[float, ...], batch_size: int):
        # Images of many shapes: no compile (one graph per shape) and no flip.
        super().__init__(checkpoint, storage, EmbedSettings(batch_size=batch_size, flip_tta=False, compile=False))
        self.scales, self.batch_size = scales, batch_size
        self.dim = self.model.head.weight.shape[1]

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.flatnonzero(batch["status"] == "ok")
        embeddings = np.zeros((len(batch["id"]), self.dim), np.float16)
        if len(good):
            images = [batch["image"][i] for i in good]
            embeddings[good] = multiscale_embed(self.model, images, self.scales, self.device, self.batch_size,
                                                self.precision).cpu().numpy().astype(np.float16)
        return {key: batch[key] for key in ("id", "part", "status", "box")} | {"embedding": embeddings}


# ---------------------------------------------------------------- the Ray Data stages


def _read_rows(batch: dict[str, np.ndarray], parts: list[rd.Part], storage: StorageConfig):
    """map_batches UDF (a generator): the parts named by ``batch["part"]`` as blocks of (id, part, JPEG, box)."""
    for index in batch["part"]:
        part = parts[int(index)]
        rows = []
        for row in rd.read_part(part, storage, storage.retries):
            rows.append(row)
            if len(rows) == READ_ROWS:
                yield _row_block(rows, part.name)
                rows = []
        if rows:
            yield _row_block(rows, part.name)


def _row_block(rows: list, part: str) -> dict[str, np.ndarray]:
    jpegs = np.empty(len(rows), dtype=object)
    jpegs[:] = [data for _, data, _ in rows]
    boxes = np.array([box if box is not None else (np.nan,) * 4 for _, _, box in rows], dtype=np.float64)
    return {"id": np.array([i for i, _, _ in rows], dtype=object), "part": np.array([part] * len(rows), dtype=object),
            "jpeg": jpegs, "box": boxes.reshape(len(rows), 4)}


def prepare_images(batch: dict[str, np.ndarray], long_side: int, square: bool) -> dict[str, np.ndarray]:
    """map_batches UDF: decode, crop each query to its box (clipped to the image), resize the long side. ``status``
    says whether the JPEG decoded; ``box`` whether a box was clipped ("clipped") or lay outside the image
    ("outside": the whole image is used)."""
    images = np.empty(len(batch["id"]), dtype=object)
    status, box_notes = [], []
    for i, (data, box) in enumerate(zip(batch["jpeg"], batch["box"])):
        note = ""
        try:
            image = decode_pil(bytes(data), long_side, "original")
        except CorruptImage:
            images[i] = np.zeros((1, 1, 3), np.uint8)
            status.append("corrupt_jpeg")
            box_notes.append(note)
            continue
        if not np.isnan(box).any():
            pixels, clipped = rd.crop_box(image.size, box)
            note = "outside" if pixels is None else "clipped" if clipped else ""
            if pixels is not None:
                image = image.crop(pixels)
        images[i] = rd.resize_long_side(image, long_side, square)
        status.append("ok")
        box_notes.append(note)
    return {"id": batch["id"], "part": batch["part"], "image": images,
            "status": np.array(status, dtype=object), "box": np.array(box_notes, dtype=object)}


# ---------------------------------------------------------------- embedding the parts


@dataclass(frozen=True)
class Settings:
    """What a model's embeddings depend on; a folder holds embeddings of one such setting only."""

    checkpoint: str
    long_side: int
    scales: tuple[float, ...]
    square: bool

    def check(self, folder: Location) -> None:
        loc = folder.child(INFO_FILE)
        mine = {"checkpoint": self.checkpoint, "long_side": self.long_side, "scales": list(self.scales),
                "square": self.square}
        if exists(loc):
            theirs = json.loads(read_bytes(loc))
            if theirs != mine:
                raise EmbeddingError(f"{folder.uri} holds embeddings of {theirs}, not {mine}; use another --out, "
                                     f"or delete that folder")
        else:
            write_bytes(loc, json.dumps(mine, indent=2).encode())


def model_settings(model: EvalModel, request: RevisitedRequest) -> Settings:
    """The checkpoint (a run folder's newest, resolved once) and the long side; a model that takes one input size
    only refuses other sizes."""
    checkpoint = checkpoint_folder(model.checkpoint, request.storage).uri
    cfg = config_from_dict(read_checkpoint_config(checkpoint, request.storage), checkpoint)
    long_side = request.long_side or cfg.data.image_size
    if cfg.model.arch == "hybrid_swin" and (not request.square or tuple(request.scales) != (1.0,)
                                            or long_side != cfg.data.image_size):
        raise rd.RevisitedDataError(
            f"{model.name}: a hybrid Swin takes its training size only ({cfg.data.image_size}²): evaluate it with "
            f"--square --scales 1 --long-side {cfg.data.image_size}")
    return Settings(checkpoint, long_side, tuple(request.scales), request.square)


def embed_parts(model: EvalModel, settings: Settings, request: RevisitedRequest,
                placed: list[tuple[rd.Part, Location]], printer: Printer = say) -> None:
    """Embed each (part, folder) whose folder has no file of the part yet, ``parts_per_pass`` parts per Ray Data
    pipeline (queries, database and distractors alike: the model actors start once per pass)."""
    for folder in {folder.uri: folder for _, folder in placed}.values():
        settings.check(folder)
    pending = [(part, folder) for part, folder in placed if not exists(folder.child(part.name + ".parquet"))]
    if not pending:
        return
    listed = sum(len(part.files) for part, _ in pending)
    printer(f"[revisited] {model.name}: embedding {len(pending)} parts, long side {settings.long_side}, "
            f"scales {', '.join(f'{s:.3g}' for s in settings.scales)}")
    line = ProgressLine(f"[revisited] {model.name}", total=None if any(p.tar for p, _ in pending) else listed,
                        printer=printer)
    for start in range(0, len(pending), request.parts_per_pass):
        _embed_pass(settings, request, pending[start:start + request.parts_per_pass], line)
    line.close()


def _embed_pass(settings: Settings, request: RevisitedRequest, group: list[tuple[rd.Part, Location]],
                line: ProgressLine) -> None:
    parts = [part for part, _ in group]
    dataset = ray.data.from_items([{"part": i} for i in range(len(parts))])
    dataset = dataset.map_batches(_read_rows, fn_kwargs={"parts": parts, "storage": request.storage}, batch_size=1,
                                  batch_format="numpy", num_cpus=0.25)
    dataset = dataset.map_batches(prepare_images, fn_kwargs={"long_side": settings.long_side,
                                                             "square": settings.square},
                                  batch_size=8, batch_format="numpy", num_cpus=1)
    dataset = dataset.map_batches(
        MultiScaleEmbedder,
        fn_constructor_kwargs={"checkpoint": settings.checkpoint, "storage": request.storage,
                               "scales": settings.scales, "batch_size": request.batch_size},
        batch_size=request.batch_size, batch_format="numpy", num_gpus=request.gpus_per_actor or None,
        num_cpus=request.cpus_per_actor, compute=ray.data.ActorPoolStrategy(size=request.actors))
    found = {p.name: {"ids": [], "embeddings": [], "corrupt_jpeg": [], "box_clipped": [], "box_outside": []}
             for p in parts}
    for batch in _batches_or_user_error(dataset):
        for image_id, part, status, box, embedding in zip(batch["id"], batch["part"], batch["status"], batch["box"],
                                                          batch["embedding"]):
            rows = found[str(part)]
            if status != "ok":
                rows["corrupt_jpeg"].append(str(image_id))
                continue
            rows["ids"].append(str(image_id))
            rows["embeddings"].append(embedding)
            if box:
                rows[f"box_{box}"].append(str(image_id))
        line.update(len(batch["id"]))
    dim = next((len(r["embeddings"][0]) for r in found.values() if r["embeddings"]), 1)
    for part, folder in group:
        rows = found[part.name]
        # The counts first, then the embeddings: an existing parquet file marks a complete part.
        write_bytes(folder.child(part.name + ".json"), json.dumps(
            {k: v for k, v in rows.items() if k != "embeddings"} | {"ids": len(rows["ids"])}).encode())
        write_embeddings(folder.child(part.name + ".parquet"), rows["ids"],
                       np.stack(rows["embeddings"]) if rows["embeddings"] else np.zeros((0, dim), np.float16))


def _batches_or_user_error(dataset: ray.data.Dataset):
    """The dataset's batches; a problem a user can fix raised in a Ray task (an unreadable tar, a missing file)
    comes out as that error alone, not wrapped in Ray's exceptions with their tracebacks."""
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        # Our messages are one line; Ray Data appends its retry advice to the exception's message.
        raise type(found)(str(found).splitlines()[0]) from None


def user_error(err: BaseException | None) -> JobError | None:
    """The ``JobError`` behind an exception, following Ray's wrappers (``cause``) and Python's chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # a RayTaskError's original exception
        if isinstance(cause, BaseException):
            err = cause
            continue
        if isinstance(err, JobError):
            return err
        err = err.__cause__ or err.__context__
    return None


def part_problems(folder: Location, parts: list[rd.Part]) -> dict[str, list[str]]:
    """Image names by problem (corrupt_jpeg, box_clipped, box_outside), over the parts' count files."""
    problems: dict[str, list[str]] = {}
    for part in parts:
        counts = json.loads(read_bytes(folder.child(part.name + ".json")))
        for key in ("corrupt_jpeg", "box_clipped", "box_outside"):
            problems.setdefault(key, []).extend(counts.get(key, []))
    return {k: sorted(v) for k, v in problems.items() if v}


# ---------------------------------------------------------------- search and evaluation


@dataclass
class Embedded:
    """One model's descriptors: queries in qimlist order, database in imlist order, then the distractors."""

    query_names: list[str]
    queries: np.ndarray
    database_positions: np.ndarray  # int64: the imlist position of each database row; distractors: len(imlist) + j
    database: np.ndarray
    database_ids: list[str]  # the name of each database row


def load_embedded(truth: rd.GroundTruth, folder: Location, distractor_folder: Location | None) -> Embedded:
    """A model's descriptors from ``folder``'s queries/ and database/ (and the distractors), in the ground truth's
    order; images that were not embedded (missing, undecodable) are left out."""
    query_ids, query_embeddings = read_embeddings(folder.child("queries"))
    database_ids, database_embeddings = read_embeddings(folder.child("database"))
    query_row = {image_id: n for n, image_id in enumerate(query_ids)}
    database_row = {image_id: n for n, image_id in enumerate(database_ids)}
    query_names = [n for n in truth.qimlist if n in query_row]
    database_names = [n for n in truth.imlist if n in database_row]
    position = {n: i for i, n in enumerate(truth.imlist)}
    blocks = [database_embeddings[[database_row[n] for n in database_names]]]
    positions = [np.array([position[n] for n in database_names], dtype=np.int64)]
    names = list(database_names)
    if distractor_folder is not None:
        distractor_ids, distractors = read_embeddings(distractor_folder)
        blocks.append(distractors)
        positions.append(len(truth.imlist) + np.arange(len(distractor_ids), dtype=np.int64))
        names += [str(i) for i in distractor_ids]
    return Embedded(query_names, query_embeddings[[query_row[n] for n in query_names]],
                    np.concatenate(positions), np.concatenate(blocks), names)


def rank(queries: np.ndarray, database: np.ndarray, positions: np.ndarray, depth: int) -> tuple[np.ndarray, bool]:
    """[Q, k] database positions of each query's k = min(depth, N) nearest images, best first; and whether the
    ranking covers the whole database (exact AP)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    k = min(depth, len(database))
    _, indices = knn(queries.astype(np.float32), database.astype(np.float32), k, device=device)
    return positions[indices], k == len(database)


def score_stage(name: str, truth: rd.GroundTruth, query_names: list[str], queries: np.ndarray,
                database: np.ndarray, positions: np.ndarray, depth: int) -> dict:
    """One table row: each protocol's metrics for one model or the ensemble; with the rankings for the report."""
    rankings, exact = rank(queries, database, positions, depth)
    gnd_of = dict(zip(truth.qimlist, truth.gnd))
    metrics = evaluate(rankings, [gnd_of[n] for n in query_names])
    return {"what": name, "exact": exact, "ranking_depth": rankings.shape[1], "protocols": metrics,
            "rankings": rankings}


# ---------------------------------------------------------------- the job


@dataclass(frozen=True)
class Inputs:
    """The checked ground truth and where its images are."""

    truth: rd.GroundTruth
    images: Location
    missing: list[str]  # names of the ground truth without a JPEG


def check_inputs(request: RevisitedRequest) -> Inputs:
    """Read and check the ground truth and that its images exist, before any model or Ray is involved: missing
    images are named and refused unless ``allow_missing``."""
    truth = rd.read_ground_truth(request.data, request.dataset, request.storage)
    images = rd.image_folder(request.data, request.dataset, request.storage)
    missing = rd.missing_images(truth, images)
    if missing and not request.allow_missing:
        raise rd.RevisitedDataError(f"{_missing_text(truth, images, missing)}; a missing image changes mAP, so "
                                    f"nothing was scored: restore them, or pass --allow-missing to score without them")
    return Inputs(truth, images, missing)


def _missing_text(truth: rd.GroundTruth, images: Location, missing: list[str]) -> str:
    return (f"{len(missing)} of the {len(set(truth.imlist + truth.qimlist))} images listed in {truth.uri} are "
            f"missing from {images.uri}: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")


def run_revisited(request: RevisitedRequest, inputs: Inputs | None = None, printer: Printer = say) -> dict:
    """Embed what is missing, rank, score; write results.json and report.html; return the results."""
    started = time.perf_counter()
    inputs = inputs or check_inputs(request)
    truth, images, missing = inputs.truth, inputs.images, inputs.missing
    notes = []
    if missing:
        message = _missing_text(truth, images, missing)
        printer(f"[revisited] WARNING {message}; scored without them (--allow-missing)")
        notes.append(f"{message}; scored without them: mAP is not comparable with published numbers")
    query_parts, database_parts = rd.dataset_parts(truth, images, request.part_size, set(missing))
    distractor_parts = (rd.distractor_parts(request.distractors, request.storage, request.part_size)
                        if request.distractors else [])
    out = resolve(request.out, request.storage)
    printer(f"[revisited] {request.run_name}: {len(truth.qimlist)} queries, {len(truth.imlist)} database images"
            + (f", distractors from {request.distractors} ({len(distractor_parts)} parts)" if distractor_parts else ""))

    embedded, problems, long_sides = {}, {}, {}
    for model in request.models:
        settings = model_settings(model, request)
        long_sides[model.name] = settings.long_side
        folder = out.child("embeddings", model.name, request.dataset)
        kinds = [("queries", query_parts, folder.child("queries")),
                 ("database", database_parts, folder.child("database"))]
        distractor_folder = out.child("embeddings", model.name, "distractors") if distractor_parts else None
        if distractor_folder is not None:
            kinds.append(("distractors", distractor_parts, distractor_folder))
        embed_parts(model, settings, request, [(p, where) for _, parts, where in kinds for p in parts], printer)
        problems[model.name] = {f"{what}_{k}": v for what, parts, where in kinds
                                for k, v in part_problems(where, parts).items()}
        embedded[model.name] = load_embedded(truth, folder, distractor_folder)
    notes += _problem_notes(problems, printer)

    rows = [score_stage(m.name, truth, embedded[m.name].query_names, embedded[m.name].queries,
                        embedded[m.name].database, embedded[m.name].database_positions, request.ranking_depth)
            for m in request.models]
    if len(request.models) > 1:
        rows.append(_ensemble_row(request, truth, embedded))
    final = rows[-1]
    first = embedded[request.models[0].name]
    if not final["exact"]:
        notes.append(f"rankings stop at {final['ranking_depth']:,} of {len(first.database):,} images: a positive "
                     f"below that counts as not retrieved (raise --ranking-depth for the exact mAP)")
    results = {
        "dataset": request.dataset, "distractors": request.distractors,
        "database_images": len(first.database), "queries": len(first.query_names),
        "protocol": {"long_side": long_sides,
                     "scales": list(request.scales), "square": request.square, "query_crop": True,
                     "ranking_depth": request.ranking_depth, "metrics": "percent"},
        "stages": [{k: v for k, v in row.items() if k != "rankings"} for row in rows],
        "problems": problems, "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    run_folder = out.child(request.run_name)
    write_bytes(run_folder.child("results.json"), json.dumps(results, indent=2).encode())
    report = run_folder.child("report.html")
    write_bytes(report, render_report(request, truth, results, final["rankings"], first).encode())
    results["report"] = report.uri
    results["results"] = run_folder.child("results.json").uri
    return results


def _ensemble_row(request: RevisitedRequest, truth: rd.GroundTruth, embedded: dict[str, Embedded]) -> dict:
    """The models' descriptors combined as the ensemble combines them (family averages, concatenated)."""
    reference = embedded[request.models[0].name]
    for model in request.models[1:]:
        other = embedded[model.name]
        if other.database_ids != reference.database_ids or other.query_names != reference.query_names:
            raise EmbeddingError(f"{model.name}: its embedded images differ from {request.models[0].name}'s (a JPEG "
                                 f"that one decoded and the other not?); the ensemble needs the same images")

    def combined(attribute: str) -> np.ndarray:
        return combine_families([(m.family, getattr(embedded[m.name], attribute).astype(np.float32))
                                 for m in request.models])

    return score_stage(f"ensemble ({len(request.models)} models)", truth, reference.query_names,
                       combined("queries"), combined("database"), reference.database_positions,
                       request.ranking_depth)


_PROBLEMS = {"corrupt_jpeg": "images could not be decoded and were left out",
             "box_clipped": "query boxes reached outside their image and were clipped to it",
             "box_outside": "query boxes lay wholly outside their image: the whole image was used"}


def _problem_notes(problems: dict[str, dict[str, list[str]]], printer: Printer) -> list[str]:
    """One warning line per model and kind of problem, naming the first images."""
    notes = []
    for model, found in problems.items():
        for key, names in found.items():
            where, _, problem = key.partition("_")
            text = (f"{model}: {len(names)} {where} {_PROBLEMS[problem]}: {', '.join(names[:5])}"
                    f"{', ...' if len(names) > 5 else ''}")
            printer(f"[revisited] WARNING {text}")
            notes.append(text)
    return notes


def results_text(results: dict) -> str:
    """The table for a terminal: mAP and mP@1,5,10 per protocol and stage, in percent."""
    kappas = ",".join(str(k) for k in KAPPAS)
    width = max(len(s["what"]) for s in results["stages"]) + 2
    header = f"{'':<{width}}" + "".join(f"{p + ' mAP':>11}{p + ' mP@' + kappas:>22}" for p in PROTOCOLS)
    lines = [f"{results['dataset']}" + (" + R1M distractors" if results["distractors"] else "")
             + f": {results['queries']} queries, {results['database_images']:,} database images", header]
    for stage in results["stages"]:
        metrics = stage["protocols"]
        lines.append(f"{stage['what']:<{width}}" + "".join(
            f"{metrics[p]['mAP']:>11.2f}{' '.join(f'{metrics[p][k]:.2f}' for k in (f'mP@{k}' for k in KAPPAS)):>22}"
            for p in PROTOCOLS))
    return "\n".join(lines)


# ---------------------------------------------------------------- the report


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 20px; color: #222; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
td:first-child { text-align: left; }
.row { display: flex; gap: 8px; align-items: flex-start; padding: 8px 0; border-bottom: 1px solid #e5e5e5; }
figure { margin: 0; width: 104px; font: 10px monospace; text-align: center; word-break: break-all; }
img, .none { width: 98px; height: 76px; object-fit: contain; background: #f0f0f0; border: 3px solid #ccc; }
.query img { border-color: #3b6fd8; } .easy img, .hard img { border-color: #1e8e3e; }
.hard img { border-style: dashed; } .junk img { border-color: #999; }
.negative img, .negative .none { border-color: #d93025; }
"""


def render_report(request: RevisitedRequest, truth: rd.GroundTruth, results: dict, rankings: np.ndarray,
                  embedded: Embedded) -> str:
    """A self-contained HTML page: the table, the notes, and the first queries with their top results marked easy
    (green), hard (green, dashed), junk (grey) or negative (red), as the Medium protocol counts them."""
    shown = min(request.report_queries, len(embedded.query_names))
    top = rankings[:shown, :request.report_results]
    names = [embedded.query_names[q] for q in range(shown)]
    wanted_database = {truth.imlist[p] for p in top.ravel() if p < len(truth.imlist)}
    images = rd.image_folder(request.data, request.dataset, request.storage)
    jpegs = {n: read_bytes(images.child(n + rd.JPEG_SUFFIX)) for n in set(names) | wanted_database}
    distractor_names = {p: embedded.database_ids[np.flatnonzero(embedded.database_positions == p)[0]]
                        for p in top.ravel() if p >= len(truth.imlist)}
    if distractor_names:
        jpegs |= _distractor_jpegs(request, set(distractor_names.values()))

    def figure(name: str, kind: str) -> str:
        uri = thumbnail_uri(jpegs[name]) if name in jpegs else None
        picture = f'<img src="{uri}" alt="">' if uri else '<div class="none"></div>'
        return f'<figure class="{kind}">{picture}<br>{html.escape(name)} ({kind})</figure>'

    gnd_of = dict(zip(truth.qimlist, truth.gnd))
    rows_html = []
    for name, ranked in zip(names, top):
        kinds = {i: k for k in ("easy", "hard", "junk") for i in gnd_of[name][k]}
        figures = [figure(name, "query")]
        for p in ranked:
            if p < len(truth.imlist):
                figures.append(figure(truth.imlist[p], kinds.get(int(p), "negative")))
            else:
                figures.append(figure(distractor_names[p], "negative"))
        rows_html.append(f'<div class="row">{"".join(figures)}</div>')

    header = "".join(f"<th>{p} mAP</th>" + "".join(f"<th>{p} mP@{k}</th>" for k in KAPPAS) for p in PROTOCOLS)
    table = "".join(
        f"<tr><td>{html.escape(s['what'])}</td>" + "".join(
            f"<td>{s['protocols'][p]['mAP']:.2f}</td>" + "".join(f"<td>{s['protocols'][p][f'mP@{k}']:.2f}</td>"
                                                                 for k in KAPPAS) for p in PROTOCOLS) + "</tr>"
        for s in results["stages"])
    protocol = results["protocol"]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in results["notes"]) or "<li>none</li>"
    title = f"Revisited {request.run_name}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{results['queries']} queries (cropped to their boxes), {results['database_images']:,} database "
            f"images; long side {', '.join(f'{v} ({k})' for k, v in protocol['long_side'].items())}, "
            f"scales {', '.join(f'{s:.3g}' for s in protocol['scales'])}"
            f"{', squashed square' if protocol['square'] else ''}; metrics in percent.</p>"
            f"<table><tr><th></th>{header}</tr>{table}</table><h2>Notes</h2><ul>{notes}</ul>"
            f"<h2>The first {shown} queries: top {top.shape[1]} of {html.escape(results['stages'][-1]['what'])}</h2>"
            + "\n".join(rows_html) + "</body></html>\n")


def _distractor_jpegs(request: RevisitedRequest, ids: set[str]) -> dict[str, bytes]:
    """The report's distractor thumbnails when the distractors are a folder; from tar shards none (finding a few
    images would mean streaming gigabytes), and the report shows their names."""
    folder = resolve(request.distractors, request.storage)
    if rd.distractor_parts(request.distractors, request.storage, request.part_size)[0].tar is not None:
        return {}
    return {i: read_bytes(folder.child(i + rd.JPEG_SUFFIX)) for i in ids}
