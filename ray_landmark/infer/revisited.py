"""Revisited Oxford and Paris (+R1M) for a trained checkpoint or an ensemble: the literature's retrieval benchmark.

    parts (queries cropped to their boxes, database slices, distractor tars) --read (CPU tasks)--> id, JPEG, box
    --decode, crop, long side (CPU tasks)--> uint8 images of any shape --infer.embed's pipeline (Embedder actors, at
    each of embed.scales)--> id, float16 unit embedding --> <out>/embeddings/<model>/<dataset or distractors>/
    --> kNN (eval/search.py) of the queries over database + distractors --> eval/revisited.py: mAP and mP@1,5,10 for
    Easy, Medium and Hard --> <out>/<dataset>[+r1m]/results.json and report.html

With ``--qe`` / ``--dba`` the last stage (the model, or the ensemble) is scored again with alpha-QE alone, DBA alone
and both (those asked), as the ensemble's retrieval applies them: DBA on the database descriptors, then each query
expanded over that database, before the ranking.

A part is the embedding pipeline's unit of work. A descriptor is the average of the image's unit embeddings at each
scale (by default here 1/√2, 1, √2 of the long side), L2-normalised again, as DELG and DOLG evaluate. A part's
embeddings are written once it is complete and a rerun skips the parts already written, so the R1M distractors are
embedded once per model and settings, and an interrupted run resumes; the distractor embeddings do not depend on the
dataset and serve ROxf and RPar alike.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import ray.data

from ray_landmark.config import config_from_dict
from ray_landmark.data import revisited as rd
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.storage import Location, exists, read_bytes, resolve, write_bytes
from ray_landmark.data.jpeg import CorruptImage, decode_pil
from ray_landmark.errors import ConfigError, JobError
from ray_landmark.eval.revisited import KAPPAS, PROTOCOLS, evaluate
from ray_landmark.eval.search import knn
from ray_landmark.infer.config import EmbedSettings, EnsembleConfig, EnsembleModel, Expansion
from ray_landmark.infer.embed import EmbeddingError, check_info, embed_units, read_embeddings, write_units
from ray_landmark.infer.ensemble import check_expansions, expansion_text, search_device
from ray_landmark.infer.postprocess import augment_database, combine_families, expand_queries
from ray_landmark.infer.report import GalleryEntry, RetrievedImage, write_report
from ray_landmark.progress import Printer, ProgressLine, say
from ray_landmark.runs.checkpoint import checkpoint_folder, read_checkpoint_config

DEFAULT_SCALES = (1 / math.sqrt(2), 1.0, math.sqrt(2))
READ_ROWS = 32  # rows per block a read task emits
EXPANSION_FLAGS = {"qe": "--qe", "dba": "--dba"}


def embed_settings(tree: dict, source: str = "embed settings") -> EmbedSettings:
    """``tree``'s embed.* keys over EmbedSettings' defaults, with this protocol's scales unless it sets them."""
    settings = config_from_dict({"scales": list(DEFAULT_SCALES)} | tree, source, EmbedSettings)
    if settings.compile is True:
        raise ConfigError(f"{source}: key 'compile': Revisited's images come in many shapes and a compiled model "
                          f"compiles once per shape; leave it auto (off here) or false")
    return settings


def expansion_flags(qe: int | None, dba: int | None, alpha: float | None) -> dict[str, Expansion]:
    """``--qe K``, ``--dba K`` and ``--alpha A`` (default 3) as the request's ``qe`` and ``dba`` (those given, enabled);
    a bad value is one line naming its flag."""
    if alpha is not None and qe is None and dba is None:
        raise JobError(f"--alpha {alpha:g}: it weighs the neighbours of --qe and --dba; give one of them")
    alpha = Expansion().alpha if alpha is None else alpha
    if not alpha >= 0 or math.isinf(alpha):  # NaN fails the comparison
        raise JobError(f"--alpha {alpha:g}: the power of the neighbours' similarities must be a number >= 0")
    expansions = {}
    for key, k in (("qe", qe), ("dba", dba)):
        if k is not None and k < 1:
            raise JobError(f"{EXPANSION_FLAGS[key]} {k}: the neighbours summed must be at least 1")
        if k is not None:
            expansions[key] = Expansion(enabled=True, k=k, alpha=alpha)
    return expansions


@dataclass(frozen=True)
class RevisitedRequest:
    dataset: str  # roxford5k or rparis6k
    data: str  # the folder or bucket holding <dataset>/gnd_<dataset>.pkl and <dataset>/jpg/
    out: str  # embeddings/, and <dataset>[+r1m]/results.json and report.html
    models: tuple[EnsembleModel, ...]
    distractors: str | None = None  # R1M: a folder of JPEGs or of tar shards
    storage: StorageConfig = field(default_factory=StorageConfig)
    long_side: int | None = None  # the image's long side at scale 1; None: each checkpoint's data.image_size
    square: bool = False  # squash to long_side² per scale, as the models were trained, instead of keeping the aspect
    settings: EmbedSettings = field(default_factory=lambda: embed_settings({}))  # scales, batch size, actors, ...
    ranking_depth: int = 10_000  # ranked images per query; exact when the database is not larger
    allow_missing: bool = False  # score although images of the ground truth are missing
    part_size: int = 2000
    # alpha-QE and DBA (expansion_flags): rows of the last stage with each and both, beside its plain row
    qe: Expansion = field(default_factory=Expansion)
    dba: Expansion = field(default_factory=Expansion)
    report_queries: int = 6
    report_results: int = 10

    @property
    def run_name(self) -> str:
        return self.dataset + ("+r1m" if self.distractors else "")


def models_from_checkpoint(checkpoint: str, storage: StorageConfig) -> tuple[EnsembleModel, ...]:
    cfg = read_checkpoint_config(checkpoint, storage)
    return (config_from_dict({"name": cfg["run"]["name"], "checkpoint": checkpoint, "family": cfg["model"]["arch"]},
                             f"{checkpoint} (its run.name)", EnsembleModel),)


def models_from_ensemble(cfg: EnsembleConfig) -> tuple[EnsembleModel, ...]:
    """The ensemble's retrieval models."""
    return tuple(m for m in cfg.models if "retrieval" in m.tasks)


# ---------------------------------------------------------------- the parts' images


def _read_rows(batch: dict[str, np.ndarray], parts: list[rd.Part], storage: StorageConfig):
    """map_batches UDF (a generator): the parts named by ``batch["part"]`` as blocks of (id, part, JPEG, box)."""
    for index in batch["part"]:
        part = parts[int(index)]
        rows = rd.read_part(part, storage, storage.retries)
        while block := list(itertools.islice(rows, READ_ROWS)):
            jpegs = np.empty(len(block), dtype=object)  # bytes objects as they are, not a fixed-width array
            jpegs[:] = [data for _, data, _ in block]
            yield {"id": np.array([i for i, _, _ in block], dtype=object), "jpeg": jpegs,
                   "part": np.full(len(block), part.name, dtype=object),
                   "box": np.array([box or (np.nan,) * 4 for _, _, box in block], dtype=np.float64).reshape(-1, 4)}


def prepare_images(batch: dict[str, np.ndarray], long_side: int, square: bool) -> dict[str, np.ndarray]:
    """map_batches UDF: decode, crop each query to its box (clipped to the image), resize the long side. ``status``
    says whether the JPEG decoded (the Embedder skips the others); ``box`` whether a box was clipped ("clipped") or
    lay outside the image ("outside": the whole image is used)."""
    images = np.empty(len(batch["id"]), dtype=object)
    status, notes = np.full(len(images), "ok", dtype=object), np.full(len(images), "", dtype=object)
    for i, (data, box) in enumerate(zip(batch["jpeg"], batch["box"])):
        try:
            image = decode_pil(bytes(data), long_side, "original")
        except CorruptImage:
            images[i], status[i] = np.zeros((1, 1, 3), np.uint8), "corrupt_jpeg"
            continue
        if not np.isnan(box).any():
            pixels, clipped = rd.crop_box(image.size, box)
            notes[i] = "outside" if pixels is None else "clipped" if clipped else ""
            image = image if pixels is None else image.crop(pixels)
        images[i] = rd.resize_long_side(image, long_side, square)
    return {"id": batch["id"], "part": batch["part"], "image": images, "status": status, "box": notes}


# ---------------------------------------------------------------- embedding the parts


def model_info(model: EnsembleModel, request: RevisitedRequest) -> dict:
    """What a model's embeddings depend on, for its folders' ``_embedding.json``: the checkpoint (a run folder's
    newest, resolved once), the long side, square, scales and flip. A model that takes one input size only refuses
    other sizes."""
    checkpoint = checkpoint_folder(model.checkpoint, request.storage).uri
    cfg = config_from_dict(read_checkpoint_config(checkpoint, request.storage), checkpoint)
    long_side = request.long_side or cfg.data.image_size
    if cfg.model.arch == "hybrid_swin" and (not request.square or request.settings.scales != [1.0]
                                            or long_side != cfg.data.image_size):
        raise rd.RevisitedDataError(
            f"{model.name}: a hybrid Swin takes its training size only ({cfg.data.image_size}²): evaluate it with "
            f"--square --scales 1 --long-side {cfg.data.image_size}")
    return {"checkpoint": checkpoint, "arch": cfg.model.arch, "image_size": long_side, "square": request.square,
            "flip_tta": request.settings.flip_tta, "scales": request.settings.scales}


def embed_parts(model: EnsembleModel, info: dict, request: RevisitedRequest,
                placed: list[tuple[rd.Part, Location]], printer: Printer = say) -> None:
    """Embed each (part, folder) whose folder has no file of the part yet, ``embed.shards_per_pass`` parts per Ray
    Data pipeline (queries, database and distractors alike: the model actors start once per pass)."""
    for folder in {folder.uri: folder for _, folder in placed}.values():
        check_info(folder, info)
    pending = [(part, folder) for part, folder in placed if not exists(folder.child(part.name + ".parquet"))]
    if not pending:
        return
    # Images of many shapes: compiled, the model would compile once per shape.
    settings = request.settings.model_copy(update={"compile": False})
    printer(f"[revisited] {model.name}: embedding {len(pending)} parts, long side {info['image_size']}, "
            f"scales {', '.join(f'{s:.3g}' for s in settings.scales)}")
    line = ProgressLine(f"[revisited] {model.name}", printer=printer,
                        total=None if any(p.tar for p, _ in pending) else sum(len(p.files) for p, _ in pending))
    for start in range(0, len(pending), settings.shards_per_pass):
        group = pending[start:start + settings.shards_per_pass]
        parts = [part for part, _ in group]
        dataset = ray.data.from_items([{"part": i} for i in range(len(parts))])
        dataset = dataset.map_batches(_read_rows, fn_kwargs={"parts": parts, "storage": request.storage},
                                      batch_size=1, batch_format="numpy", num_cpus=0.25)
        dataset = dataset.map_batches(prepare_images, fn_kwargs={"long_side": info["image_size"],
                                                                 "square": request.square},
                                      batch_size=8, batch_format="numpy", num_cpus=1)
        found = embed_units(dataset, ("part",), [(p.name,) for p in parts], info["checkpoint"], request.storage,
                            settings, line)
        for part, folder in group:
            rows = found[(part.name,)]
            notes = rows.columns.get("box", [])
            # The problems first, then the embeddings: an existing parquet file marks a complete part.
            write_bytes(folder.child(part.name + ".json"), json.dumps(
                {"ids": len(rows.ids), "corrupt_jpeg": rows.not_embedded.get("corrupt_jpeg", [])}
                | {f"box_{kind}": [i for i, note in zip(rows.ids, notes) if note == kind]
                   for kind in ("clipped", "outside")}).encode())
        write_units({(p.name,): folder.child(p.name + ".parquet") for p, folder in group}, found)
    line.close()


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
    query_names, queries = _in_order(folder.child("queries"), truth.qimlist)
    names, database = _in_order(folder.child("database"), truth.imlist)
    position = {n: i for i, n in enumerate(truth.imlist)}
    positions = [position[n] for n in names]
    if distractor_folder is not None:
        distractor_ids, distractors = read_embeddings(distractor_folder)
        database = np.concatenate([database, distractors])
        positions += range(len(truth.imlist), len(truth.imlist) + len(distractor_ids))
        names += [str(i) for i in distractor_ids]
    return Embedded(query_names, queries, np.array(positions, dtype=np.int64), database, names)


def _in_order(folder: Location, names: list[str]) -> tuple[list[str], np.ndarray]:
    """Those of ``names`` that ``folder`` holds, in that order, and their embeddings."""
    ids, embeddings = read_embeddings(folder)
    row = {image_id: n for n, image_id in enumerate(ids)}
    kept = [n for n in names if n in row]
    return kept, embeddings[[row[n] for n in kept]]


def rank(queries: np.ndarray, database: np.ndarray, positions: np.ndarray, depth: int) -> tuple[np.ndarray, bool]:
    """[Q, k] database positions of each query's k = min(depth, N) nearest images, best first; and whether the
    ranking covers the whole database (exact AP)."""
    k = min(depth, len(database))
    _, indices = knn(queries.astype(np.float32), database.astype(np.float32), k, device=search_device())
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
    if not request.distractors:  # distractors only add to the database, and are counted once embedded
        check_expansions(request, len(set(truth.imlist) - set(missing)), EXPANSION_FLAGS, "the database")
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
        info = model_info(model, request)
        long_sides[model.name] = info["image_size"]
        folder = out.child("embeddings", model.name, request.dataset)
        kinds = [("queries", query_parts, folder.child("queries")),
                 ("database", database_parts, folder.child("database"))]
        distractor_folder = out.child("embeddings", model.name, "distractors") if distractor_parts else None
        if distractor_folder is not None:
            kinds.append(("distractors", distractor_parts, distractor_folder))
        embed_parts(model, info, request, [(p, where) for _, parts, where in kinds for p in parts], printer)
        problems[model.name] = {f"{what}_{k}": v for what, parts, where in kinds
                                for k, v in part_problems(where, parts).items()}
        embedded[model.name] = load_embedded(truth, folder, distractor_folder)
    notes += _problem_notes(problems, printer)

    first = embedded[request.models[0].name]
    check_expansions(request, len(first.database), EXPANSION_FLAGS, "the database")
    rows = [score_stage(m.name, truth, embedded[m.name].query_names, embedded[m.name].queries,
                        embedded[m.name].database, embedded[m.name].database_positions, request.ranking_depth)
            for m in request.models]
    last = rows[-1]["what"], first.queries, first.database
    if len(request.models) > 1:
        last = f"ensemble ({len(request.models)} models)", *_ensemble_descriptors(request, embedded)
        rows.append(score_stage(last[0], truth, first.query_names, last[1], last[2], first.database_positions,
                                request.ranking_depth))
    rows += expansion_rows(request, truth, *last, first.query_names, first.database_positions)
    final = rows[-1]
    if not final["exact"]:
        notes.append(f"rankings stop at {final['ranking_depth']:,} of {len(first.database):,} images: a positive "
                     f"below that counts as not retrieved (raise --ranking-depth for the exact mAP)")
    results = {
        "dataset": request.dataset, "distractors": request.distractors,
        "database_images": len(first.database), "queries": len(first.query_names),
        "protocol": {"long_side": long_sides, "scales": request.settings.scales, "square": request.square,
                     "flip_tta": request.settings.flip_tta, "query_crop": True,
                     "ranking_depth": request.ranking_depth, "metrics": "percent",
                     **{key: getattr(request, key).model_dump() if getattr(request, key).enabled else None
                        for key in EXPANSION_FLAGS}},
        "stages": [{k: v for k, v in row.items() if k != "rankings"} for row in rows],
        "problems": problems, "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    run_folder = out.child(request.run_name)
    write_bytes(run_folder.child("results.json"), json.dumps(results, indent=2).encode())
    report = _write_report(run_folder.child("report.html"), request, truth, results, final["rankings"], first)
    results["report"] = report.uri
    results["results"] = run_folder.child("results.json").uri
    return results


def _ensemble_descriptors(request: RevisitedRequest, embedded: dict[str, Embedded]) -> tuple[np.ndarray, np.ndarray]:
    """The models' query and database descriptors combined as the ensemble combines them (weighted family averages,
    concatenated)."""
    reference = embedded[request.models[0].name]
    for model in request.models[1:]:
        other = embedded[model.name]
        if other.database_ids != reference.database_ids or other.query_names != reference.query_names:
            raise EmbeddingError(f"{model.name}: its embedded images differ from {request.models[0].name}'s (a JPEG "
                                 f"that one decoded and the other not?); the ensemble needs the same images")

    def combined(attribute: str) -> np.ndarray:
        return combine_families([(m.family, getattr(embedded[m.name], attribute).astype(np.float32))
                                 for m in request.models], [m.weight for m in request.models])

    return combined("queries"), combined("database")


def expansion_rows(request: RevisitedRequest, truth: rd.GroundTruth, what: str, queries: np.ndarray,
                   database: np.ndarray, query_names: list[str], positions: np.ndarray) -> list[dict]:
    """The stage ``what`` scored again with the expansions the request asks for: alpha-QE alone, DBA alone and, when
    both are asked, both (the last row). As the ensemble's retrieval (postprocess.retrieve): DBA on the database
    descriptors first, then each query expanded over that (augmented) database, which is the one searched."""
    asked = [key for key in EXPANSION_FLAGS if getattr(request, key).enabled]
    if not asked:
        return []
    device = search_device()
    queries, database = queries.astype(np.float32), database.astype(np.float32)
    augmented = (augment_database(database, request.dba.k, request.dba.alpha, device=device)
                 if request.dba.enabled else None)
    rows = []
    for case in [(key,) for key in asked] + ([tuple(asked)] if len(asked) > 1 else []):
        searched = augmented if "dba" in case else database
        expanded = (expand_queries(queries, searched, request.qe.k, request.qe.alpha, device=device)
                    if "qe" in case else queries)
        name = " then ".join(expansion_text(key, getattr(request, key)) for key in ("dba", "qe") if key in case)
        rows.append(score_stage(f"{what} with {name}", truth, query_names, expanded, searched, positions,
                                request.ranking_depth))
    return rows


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


def _write_report(loc: Location, request: RevisitedRequest, truth: rd.GroundTruth, results: dict,
                  rankings: np.ndarray, embedded: Embedded) -> Location:
    """report.html: the table (percent), the notes, and the first queries with their top results."""
    protocol = results["protocol"]
    gallery = _gallery(request, truth, rankings, embedded)
    return write_report(
        loc, title=f"Revisited {request.run_name}", notes=results["notes"], gallery=gallery,
        metrics=[{"what": stage["what"], **{f"{p} {metric}": stage["protocols"][p][metric] for p in PROTOCOLS
                                            for metric in ("mAP", *(f"mP@{k}" for k in KAPPAS))}}
                 for stage in results["stages"]],
        info={"images": f"{results['queries']} queries (cropped to their boxes), "
                        f"{results['database_images']:,} database images",
              "long side": ", ".join(f"{v} ({k})" for k, v in protocol["long_side"].items()),
              "scales": ", ".join(f"{s:.3g}" for s in protocol["scales"]) + ", mirrored too" * protocol["flip_tta"]
              + ", squashed square" * protocol["square"]},
        gallery_title=f"The first {len(gallery)} queries: top {request.report_results} of "
                      f"{results['stages'][-1]['what']}",
        legend="Each row: the query, then its top results in rank order, marked as the Medium protocol counts them: "
               "green border: positive (easy or hard), grey: junk (ignored), red: negative.")


def _gallery(request: RevisitedRequest, truth: rd.GroundTruth, rankings: np.ndarray,
             embedded: Embedded) -> list[GalleryEntry]:
    """The report's first queries with their top results, each of the ground truth's kind for that query."""
    top = rankings[:request.report_queries, :request.report_results]
    names = embedded.query_names[:len(top)]
    images = rd.image_folder(request.data, request.dataset, request.storage)
    database = {truth.imlist[p] for p in top.ravel() if p < len(truth.imlist)}
    jpegs = {n: read_bytes(images.child(n + rd.JPEG_SUFFIX)) for n in set(names) | database}
    distractors = {p: embedded.database_ids[np.flatnonzero(embedded.database_positions == p)[0]]
                   for p in top.ravel() if p >= len(truth.imlist)}
    if distractors:
        jpegs |= _distractor_jpegs(request, set(distractors.values()))
    entries = []
    for name, ranked, gnd in zip(names, top, (dict(zip(truth.qimlist, truth.gnd))[n] for n in names)):
        kinds = {i: kind for kind in ("easy", "hard", "junk") for i in gnd[kind]}
        retrieved = []
        for p in ranked:
            image_id = truth.imlist[p] if p < len(truth.imlist) else distractors[p]
            kind = kinds.get(int(p), "negative")
            retrieved.append(RetrievedImage(image_id, None if kind == "junk" else kind != "negative",
                                            jpegs.get(image_id), kind))
        entries.append(GalleryEntry(name, request.dataset, None, retrieved=retrieved, query_jpeg=jpegs.get(name)))
    return entries


def _distractor_jpegs(request: RevisitedRequest, ids: set[str]) -> dict[str, bytes]:
    """The report's distractor thumbnails when the distractors are a folder; from tar shards none (finding a few
    images would mean streaming gigabytes), and the report shows their names."""
    folder = resolve(request.distractors, request.storage)
    if rd.distractor_parts(request.distractors, request.storage, request.part_size)[0].tar is not None:
        return {}
    return {i: read_bytes(folder.child(i + rd.JPEG_SUFFIX)) for i in ids}
