"""The Ray Serve application: JPEGs in, the batch ensemble's answers out.

    POST /recognize       one JPEG as the body (Content-Type: image/jpeg), or several as multipart form files
                          -> {"results": [{"landmark_id", "confidence", "landmark_score", "nonlandmark_score"}, ...]}
    POST /retrieve?k=10   the same inputs -> {"results": [{"ids": [...], "scores": [...]}, ...]}
    GET  /healthz         -> {"status": "ok"}
    GET  /metadata        the models, their input size and preprocessing, the gallery, index and non-landmark set
    POST /index/add       multipart JPEG files named <new id>.jpg -> embedded and appended to the retrieval index of
                          every replica (``allow_index_add: true`` only)

Each replica holds every model of the ensemble and the embeddings its run wrote (``answers.load_served_index``).
The retrieval index is shared: an addition is the next entry of the run's additions log (``infer.index_additions``),
appended by whichever replica took it, and every replica applies the entries it has not seen before it answers a
/retrieve or /metadata request, looking at most once every ``index_refresh_s``: an image acknowledged by /index/add is
searched by every replica for every request that arrives ``index_refresh_s`` or more later. Answers carry the id of
the replica that gave them (``replica``).
An image is checked (JPEG, size) and decoded exactly as the embedding job decodes it: by ``decode_resized`` where
the embedding job's Ray Data tasks decode (``data.decode: cpu``), else by the worker decoder on the replica's device
(nvjpeg on a GPU), the same ``data.decode`` rule as ``infer.embed``. Images of concurrent requests are embedded
together (``@serve.batch``) by ``infer.embed.Embedder``, the batch job's own model wrapper (its autocast, flip TTA,
scales, compile and float16 rounding), with the PyTorch model or, with ``backend: onnxruntime``, the checkpoint's ONNX
export (``infer/onnx_runtime.py``), then each request is answered by ``answers``.

Bad input (not a JPEG, empty, too large, truncated, a header claiming too many pixels, any image the decoder cannot
read, too many images, a body of another content type) gets a 4xx with ``{"error": "<one line>"}`` and the replica
keeps serving.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at runtime.
import asyncio
import io
import logging
import os
import re
import time
import uuid

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from ray import serve
from ray.serve import Application

from ray_landmark.config import Config, config_from_dict, load_config
from ray_landmark.data.pipeline import decodes_in_worker
from ray_landmark.data.jpeg import CorruptImage, decode_resized
from ray_landmark.data.worker_decode import WorkerDecoder
from ray_landmark.errors import JobError
from ray_landmark.infer.config import EnsembleConfig
from ray_landmark.infer.embed import INFO_FILE, Embedder, read_info
from ray_landmark.infer.index_additions import Addition, append_addition, check_additions, read_additions
from ray_landmark.infer.onnx_runtime import exported_onnx
from ray_landmark.infer.ensemble import EMBED_ORDER, use_cpus, data_config, embeddings_folder
from ray_landmark.serve.answers import (
    ServedIndex, answer_recognition, answer_retrieval, load_served_index, with_added_index_images,
)
from ray_landmark.runs.checkpoint import checkpoint_folder, read_checkpoint_config
from ray_landmark.serve.config import ServeSettings

IMAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
api = FastAPI(title="ray_landmark", docs_url=None, redoc_url=None)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Unavailable(Exception):
    """The run's index additions log cannot be read or written: a 503, as the shared index's bound cannot be kept."""

    status = 503


# Tries to append to the additions log: each refused try means another writer appended in between.
APPEND_TRIES = 20


def served_checkpoints(cfg: EnsembleConfig) -> dict[str, tuple[str, Config]]:
    """model name -> (the checkpoint its embeddings were written with, its config); refuses, with one line, an
    ensemble whose embeddings are missing or were written by another checkpoint, size, TTA or scales than the
    model's."""
    checkpoints = {}
    for model in cfg.models:
        resolved = checkpoint_folder(model.checkpoint, cfg.storage).uri
        model_cfg = config_from_dict(read_checkpoint_config(resolved, cfg.storage), resolved)
        for split in EMBED_ORDER:
            folder = embeddings_folder(cfg, model).child(split)
            info_file, info = folder.child(INFO_FILE), read_info(folder)
            if info is None:
                raise JobError(f"{info_file.uri}: no embeddings of model {model.name}; run jobs/ensemble.py with "
                               "this ensemble config first")
            if info["checkpoint"] != resolved:
                raise JobError(f"model {model.name}: its checkpoint is {resolved} but {info_file.uri} holds "
                               f"embeddings of {info['checkpoint']}; rerun jobs/ensemble.py, or point "
                               f"models[{model.name}].checkpoint at the embedded checkpoint")
            served = {"image_size": model_cfg.data.image_size, "flip_tta": cfg.embed.flip_tta,
                      "scales": cfg.embed.scales}
            if any(info[key] != value for key, value in served.items()):
                raise JobError(f"model {model.name}: {info_file.uri} holds embeddings of "
                               f"{', '.join(f'{k} {info[k]}' for k in served)}; the service would embed with "
                               f"{', '.join(f'{k} {v}' for k, v in served.items())}; rerun jobs/ensemble.py")
        checkpoints[model.name] = resolved, model_cfg
    return checkpoints


# Bodies the service reads as one image (an absent Content-Type too); multipart/form-data carries files. Any other
# type (curl -d's application/x-www-form-urlencoded, text/plain, JSON) is refused with 415.
BODY_TYPES = ("image/", "application/octet-stream")
MULTIPART = "multipart/form-data"


def check_content_type(content_type: str) -> None:
    """415 for a body of a type the service does not take."""
    media = content_type.split(";")[0].strip().lower()
    if media and media != MULTIPART and not media.startswith(BODY_TYPES):
        raise BadRequest(415, f"Content-Type {media} is not taken: send one JPEG as the body with Content-Type "
                              f"image/jpeg (curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg'), or "
                              f"several as multipart/form-data files (curl -F image=@photo.jpg)")


def check_image(data: bytes, limits) -> None:
    """Refuse what the decoder must not see: empty, not a JPEG, too many bytes or pixels (read from the header).
    Whatever PIL cannot make of the header is the sender's: a 4xx, never a 500."""
    if not data:
        raise BadRequest(400, "an empty image: send JPEG bytes")
    if len(data) > limits.max_image_bytes:
        raise BadRequest(413, f"an image of {len(data):,} bytes; the limit is {limits.max_image_bytes:,}")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # the header claims more pixels than PIL will ever decode
        raise BadRequest(413, f"an image whose header claims too many pixels ({err}); the limit is "
                              f"{limits.max_pixels / 1e6:g} megapixels") from None
    except (UnidentifiedImageError, OSError):
        raise BadRequest(415, "not an image: send a JPEG") from None
    except Exception as err:  # noqa: BLE001 (a malformed header: PIL raises SyntaxError, ValueError, struct.error)
        raise BadRequest(400, f"an image header that cannot be read ({type(err).__name__}: {err}): send a JPEG") \
            from None
    if image.format != "JPEG":
        raise BadRequest(415, f"a {image.format} image: only JPEG is accepted (the models were evaluated on JPEG "
                              "decodes); convert it to JPEG")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise BadRequest(413, f"an image of {width}x{height} = {width * height / 1e6:.1f} megapixels; the limit "
                              f"is {limits.max_pixels / 1e6:g} megapixels")


def refuse_taken_ids(ids: list[str], served: ServedIndex) -> None:
    """409 for an id already in the index, or twice in the request."""
    taken = sorted(set(ids) & served.index_id_set) or sorted({i for i in ids if ids.count(i) > 1})
    if taken:
        raise BadRequest(409, f"image id {taken[0]} is already in the index (or twice in the request)")


def backend_of(settings: ServeSettings, model: str) -> str:
    return settings.model_backends.get(model, settings.backend)


def check_backends(settings: ServeSettings, ensemble: EnsembleConfig) -> None:
    """``model_backends`` names models of the ensemble, and onnxruntime serves only what its graph takes: S×S images,
    so one embedding scale."""
    names = [m.name for m in ensemble.models]
    unknown = sorted(set(settings.model_backends) - set(names))
    if unknown:
        raise JobError(f"model_backends: {unknown[0]} is not a model of ensemble {ensemble.name} "
                       f"({', '.join(names)})")
    onnx = [n for n in names if backend_of(settings, n) == "onnxruntime"]
    if onnx and ensemble.embed.scales != [1.0]:
        raise JobError(f"backend onnxruntime (models {', '.join(onnx)}): the exported graph takes images of the "
                       f"model's size only, and embed.scales is {ensemble.embed.scales}; serve them with torch")


class ReplicaModels:
    """A replica's work on images, Ray Serve aside: every model of the ensemble (torch or its ONNX export) and the
    decoders, for ``decode`` of one checked JPEG and ``embed_batch`` of decoded images. The service's replicas hold
    one; ``benchmarks/serve.py`` runs one in a plain loop to measure what Serve adds."""

    def __init__(self, settings: ServeSettings, ensemble: EnsembleConfig):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        use_cpus(max(1, int(settings.replicas.num_cpus)))  # torch and faiss threads: what the replica holds
        data = data_config(ensemble)
        worker_decode = decodes_in_worker(data, self.device.type == "cuda", "a GPU replica")
        self.models = {}
        for name, (checkpoint, model_cfg) in served_checkpoints(ensemble).items():
            pixels = (model_cfg.data.image_size, model_cfg.data.preprocessing)
            onnx = None
            if backend_of(settings, name) == "onnxruntime":
                folder = os.path.join(os.path.expanduser(settings.onnx_dir), ensemble.name, name)
                onnx = exported_onnx(checkpoint, folder, pixels[0], ensemble.storage, data)
            embedder = Embedder(checkpoint, ensemble.storage, ensemble.embed, onnx=onnx)
            self.models[name] = {"pixels": pixels, "embedder": embedder, "config": model_cfg,
                                 "checkpoint": checkpoint, "backend": backend_of(settings, name),
                                 "provider": getattr(embedder.model, "provider", None)}
        self.decoders = {pixels: WorkerDecoder(*pixels, self.device) if worker_decode else None
                         for pixels in {m["pixels"] for m in self.models.values()}}

    def decode(self, data: bytes) -> dict[tuple, np.ndarray]:
        """One checked JPEG -> uint8 S×S×3 per distinct (image size, preprocessing) of the models."""
        decoded = {}
        for (size, preprocessing), decoder in self.decoders.items():
            if decoder is None:
                try:
                    decoded[size, preprocessing] = decode_resized(data, size, preprocessing)
                except CorruptImage as err:
                    raise BadRequest(400, f"a corrupt or truncated JPEG: {err}") from None
                except Exception as err:  # noqa: BLE001 (the sender's bytes, whatever the decoder trips on)
                    raise BadRequest(400, f"a JPEG that cannot be decoded ({type(err).__name__}: {err})") from None
            else:
                result = decoder.decode([data])
                if result.corrupt:
                    raise BadRequest(400, f"a corrupt or truncated JPEG: {result.corrupt[0][1]}")
                decoded[size, preprocessing] = result.images.permute(0, 2, 3, 1)[0].cpu().numpy()
        return decoded

    def embed_batch(self, images: list[dict[tuple, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Each image's float16 row per model, and the batch size (``batch``)."""
        n = len(images)
        rows = {}
        for name, entry in self.models.items():
            # The Ray Data batch the embedding job's Embedder takes; it passes id, split and shard through.
            batch = {"image": np.stack([image[entry["pixels"]] for image in images]),
                     "id": np.arange(n), "split": np.full(n, "query"), "shard": np.full(n, "query")}
            rows[name] = entry["embedder"](batch)["embedding"]
        return [{name: rows[name][i] for name in rows} | {"batch": n} for i in range(n)]


@serve.deployment
@serve.ingress(api)
class LandmarkService:
    def __init__(self, settings: ServeSettings, ensemble: EnsembleConfig):
        self.settings, self.cfg = settings, ensemble
        if settings.allow_index_add and ensemble.retrieval.dba.enabled:
            raise JobError("allow_index_add: the ensemble's retrieval.dba is on, and an added image would change "
                           "every index image's neighbours; turn one of them off")
        self.work = ReplicaModels(settings, ensemble)
        self.models = self.work.models
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.checkpoints = {name: m["checkpoint"] for name, m in self.models.items()}
        self.index_checked_at = time.monotonic()  # taken before the load, which reads the additions log
        self.served = load_served_index(ensemble, self.work.device.type)
        self.index_lock = asyncio.Lock()  # one reader or writer of the additions log at a time
        self.embed_image.set_max_batch_size(settings.replicas.max_batch_size)
        self.embed_image.set_batch_wait_timeout_s(settings.replicas.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed_image(self, images: list[dict[tuple, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Images of concurrent requests embedded together; each image's float16 row per model, and the batch size."""
        return await asyncio.to_thread(self.work.embed_batch, images)

    async def _read_images(self, request: Request) -> list[tuple[str | None, bytes]]:
        """(file name, bytes) of each image: the body, or each multipart file; checked (``check_image``)."""
        limits = self.settings.limits
        content_type = request.headers.get("content-type", "")
        check_content_type(content_type)
        if content_type.lower().startswith(MULTIPART):
            parts = (await request.form()).multi_items()
            if len(parts) > limits.max_images:
                raise BadRequest(413, f"more than {limits.max_images} images in one request; send them in several")
            images = []
            for field, value in parts:
                if isinstance(value, str):
                    raise BadRequest(400, f"form field {field!r} is not a file: send images as files (curl -F)")
                images.append((value.filename, await value.read()))
        else:
            images = [(None, await request.body())]
        if not images or images == [(None, b"")]:
            raise BadRequest(400, "an empty request: POST a JPEG (Content-Type: image/jpeg) or multipart files")
        for _, data in images:
            check_image(data, limits)
        return images

    async def _embed(self, images: list[bytes]) -> tuple[dict[str, np.ndarray], list[int]]:
        """float16 embeddings per model (rows in order) and the batch size each image was embedded in."""
        decoded = [await asyncio.to_thread(self.work.decode, data) for data in images]
        embedded = await asyncio.gather(*(self.embed_image(image) for image in decoded))
        return {name: np.stack([e[name] for e in embedded]) for name in self.models}, [e["batch"] for e in embedded]

    async def _answer(self, request: Request, answer, searches_index: bool = False) -> JSONResponse:
        """``answer(served index, query embeddings)``; ``searches_index``: with every addition due by now."""
        try:
            queries, batches = await self._embed([data for _, data in await self._read_images(request)])
            served = await self._current_index() if searches_index else self.served
            results = await asyncio.to_thread(answer, served, queries)
        except (BadRequest, Unavailable) as err:
            return JSONResponse({"error": " ".join(str(err).split())}, status_code=err.status)
        except Exception as err:  # a multipart body that does not parse, or too many form parts
            if getattr(err, "status_code", 500) < 500:
                return JSONResponse({"error": f"a request that cannot be read: {getattr(err, 'detail', err)}"},
                                    status_code=err.status_code)
            raise
        return JSONResponse({"results": results, "model_batch_sizes": batches, "replica": self.replica})

    # ------------------------------------------------------------ the shared index

    async def _catch_up(self, force: bool = False) -> list[Addition]:
        """Apply the entries of the additions log written since this replica's index was made, looking at most once
        every ``index_refresh_s`` unless forced; returns them. The caller holds ``index_lock``."""
        started = time.monotonic()
        if not force and started - self.index_checked_at < self.settings.index_refresh_s:
            return []
        try:
            new = await asyncio.to_thread(read_additions, self.cfg, self.served.additions)
            if new:
                check_additions(self.cfg, new, self.checkpoints, self.served.index_id_set)
                self.served = await asyncio.to_thread(with_added_index_images, self.served, new)
        except JobError as err:  # a store that does not answer included (StorageError)
            raise Unavailable(f"the index additions log cannot be read: {err}") from None
        self.index_checked_at = started  # every entry written before this look is applied
        return new

    async def _current_index(self) -> ServedIndex:
        """The index with every addition acknowledged ``index_refresh_s`` or more before now."""
        if time.monotonic() - self.index_checked_at >= self.settings.index_refresh_s:
            async with self.index_lock:
                await self._catch_up()
        return self.served

    async def _append(self, ids: list[str], queries: dict[str, np.ndarray]) -> tuple[int, int]:
        """Add the images as the next entry of the additions log and to this replica's index; 409 for an id another
        replica added first. Returns the entry's number and the index size."""
        writer = uuid.uuid4().hex
        async with self.index_lock:
            for _ in range(APPEND_TRIES):
                new = await self._catch_up(force=True)
                mine = [a.number for a in new if a.writer == writer]
                if mine:  # written by the try before, whose reply the store lost
                    return mine[0], len(self.served.index_ids)
                refuse_taken_ids(ids, self.served)
                addition = Addition(self.served.additions + 1, ids, queries, self.checkpoints, writer)
                try:
                    written = await asyncio.to_thread(append_addition, self.cfg, addition)
                except JobError as err:
                    raise Unavailable(f"the index additions log cannot be written: {err}") from None
                if written:
                    self.served = await asyncio.to_thread(with_added_index_images, self.served, [addition])
                    return addition.number, len(self.served.index_ids)
        raise Unavailable(f"the index additions log took {APPEND_TRIES} entries from other writers while this one "
                          f"tried to append; retry")

    # ------------------------------------------------------------ endpoints

    @api.post("/recognize")
    async def recognize(self, request: Request) -> JSONResponse:
        return await self._answer(request, answer_recognition)

    @api.post("/retrieve")
    async def retrieve(self, request: Request) -> JSONResponse:
        top = min(self.settings.limits.max_retrieve_k, self.cfg.retrieval.out_k)
        try:
            k = int(request.query_params.get("k", top))
        except ValueError:
            k = 0
        if not 1 <= k <= top:
            return JSONResponse({"error": f"k must be an integer from 1 to {top}"}, status_code=400)
        return await self._answer(request, lambda served, queries: answer_retrieval(served, queries, k),
                                  searches_index=True)

    @api.post("/index/add")
    async def add_to_index(self, request: Request) -> JSONResponse:
        """Multipart JPEG files, each file's name (less .jpg) its new image id: embedded by every model and appended
        to the run's additions log as one entry (where every replica, restarted or not, and the next ensemble run
        read it), and searched by this replica's /retrieve at once."""
        if not self.settings.allow_index_add:
            return JSONResponse({"error": "adding to the index is off: set allow_index_add: true in the service's "
                                          "args"}, status_code=403)
        try:
            images = await self._read_images(request)
            ids = [os.path.splitext(name or "")[0] for name, _ in images]
            bad = [i for i in ids if not IMAGE_ID.fullmatch(i)]
            if bad:
                raise BadRequest(400, f"image ids come from the file names (less .jpg), letters, digits, _ and "
                                      f"- only: {bad[0]!r} is not one")
            refuse_taken_ids(ids, self.served)  # before embedding; checked again against the log when appending
            queries, _ = await self._embed([data for _, data in images])
            number, index_images = await self._append(ids, queries)
        except (BadRequest, Unavailable) as err:
            return JSONResponse({"error": " ".join(str(err).split())}, status_code=err.status)
        return JSONResponse({"added": ids, "index_images": index_images, "index_addition": number,
                             "replica": self.replica})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/metadata")
    async def metadata(self) -> dict:
        try:
            served = await self._current_index()
        except Unavailable as err:
            return JSONResponse({"error": " ".join(str(err).split())}, status_code=err.status)
        models = [{"name": m.name, "family": m.family, "tasks": list(m.tasks), "weight": m.weight,
                   "checkpoint": self.models[m.name]["checkpoint"],
                   "arch": self.models[m.name]["config"].model.arch,
                   "image_size": self.models[m.name]["pixels"][0],
                   "preprocessing": self.models[m.name]["pixels"][1],
                   "embedding_dim": served.dims[m.name], "backend": self.models[m.name]["backend"],
                   # onnxruntime's execution provider (CPUExecutionProvider, CUDAExecutionProvider); None for torch
                   "execution_provider": self.models[m.name]["provider"]} for m in self.cfg.models]
        return {"ensemble": self.cfg.name, "models": models, "device": self.work.device.type,
                "decode": "worker" if any(self.work.decoders.values()) else "cpu", "flip_tta": self.cfg.embed.flip_tta,
                **served.summary(), "index_refresh_s": self.settings.index_refresh_s, "replica": self.replica,
                "limits": self.settings.limits.model_dump(), "max_batch_size": self.settings.replicas.max_batch_size}


def landmark_app(settings: ServeSettings, ensemble: EnsembleConfig) -> Application:
    """The application, checked before anything is deployed (``served_checkpoints``, ``check_backends``)."""
    served_checkpoints(ensemble)
    check_backends(settings, ensemble)
    r = settings.replicas
    options = {"max_ongoing_requests": r.max_ongoing_requests,
               "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}}
    if r.autoscaling:
        options["autoscaling_config"] = r.autoscaling
    else:
        options["num_replicas"] = r.num_replicas
    return LandmarkService.options(**options).bind(settings, ensemble)


def build_app(args: dict) -> Application:
    """The ``import_path`` of ``configs/serve/*.yaml`` (``serve run`` / ``serve deploy``): its ``args`` are the
    ServeSettings."""
    settings = config_from_dict(args, "serve application args", ServeSettings)
    return landmark_app(settings, load_config(settings.ensemble, settings.ensemble_overrides, EnsembleConfig))


def start_service(settings: ServeSettings, ensemble: EnsembleConfig, host: str = "127.0.0.1", port: int = 8000,
                  name: str = "landmark", route_prefix: str = "/") -> str:
    """Deploy on the Ray this process is connected to, HTTP on ``host:port``; returns the base URL."""
    app = landmark_app(settings, ensemble)
    # Serve logs each deployment step at INFO on the driver's console; its replicas' logs stay in Ray's log files.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"
