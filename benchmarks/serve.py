"""The landmark service under a bounded load, against a plain single-process loop doing the same work, one run.

(1) plain: one process, no Ray, no HTTP: for each batch of ``--batch`` query JPEGs, decode and resize (the
    validation transform), embed with the model in PyTorch, round to float16, and answer as the service answers
    ``POST /recognize`` (``serve.answers.answer_recognition``: the ensemble embedding, the query's penalty to the
    non-landmark set N, the exact adjusted top 3 of the gallery by ``clamp(cos, 0, 1) - b_j``, voting); the gallery
    (the GLDv2c train images) and N (the non-landmark test images) embedded in-process first, with b_j (not timed);
(2) plain onnxruntime: the same loop with the model exported by ``infer.onnx_export`` run by onnxruntime;
(3) serve: the service (``ray_landmark/serve``, one replica) on 127.0.0.1 over the ensemble job's output for the
    same model, ``--requests`` POST /recognize of one JPEG each at concurrency 1, 8 and 32 (client threads with
    keep-alive sessions), giving requests/s and p50/p99 latency.

``ratios.serve_vs_plain``: requests/s of (3) at concurrency 32 over images/s of (1). Model: a tiny DOLG with random
weights (speed does not depend on the weights) at ``--image-size``. The plain half starts no Ray (``--plain-only``,
for GPU machines; the package is imported); the Serve half needs Ray with Serve.

    python -m benchmarks.serve [--image-size 128] [--requests 96] [--jpeg 640x480] [--plain-only] [--no-write] \
        [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.embed import make_checkpoint
from benchmarks.results_io import add_jpeg_option, add_out_option, machine, publish, results_path
from ray_landmark.config import config_from_dict
from ray_landmark.data import gldv2
from ray_landmark.data.config import SyntheticSpec
from ray_landmark.data.metadata import open_manifest, prepare_manifests
from ray_landmark.data.storage import resolve
from ray_landmark.data.synthetic import write_synthetic_gldv2
from ray_landmark.data.transforms import decode_resized, normalize_on_device
from ray_landmark.infer import postprocess as pp
from ray_landmark.infer.config import EnsembleConfig
from ray_landmark.infer.onnx_export import export_onnx
from ray_landmark.infer.report import read_jpegs
from ray_landmark.markdown import markdown_table
from ray_landmark.runs.checkpoint import load_model
from ray_landmark.serve.answers import ServedIndex, answer_recognition

CONCURRENCY = (1, 8, 32)
MODEL = "dolg"  # the ensemble's one model


def ensemble_config(folder: Path, checkpoint: str, batch: int) -> EnsembleConfig:
    """The ensemble of the one model: what the service serves, and whose settings the plain loop answers with."""
    return config_from_dict({"name": "bench", "output_dir": str(folder / "ensemble"), "report": {"queries": 0},
                             "models": [{"name": MODEL, "checkpoint": checkpoint, "family": "dolg"}],
                             "embed": {"batch_size": batch}}, "benchmark", EnsembleConfig)


class PlainLoop:
    """Decode, embed, round and answer, one batch at a time, in this process."""

    def __init__(self, checkpoint: str, image_size: int, device: str, onnx_path: str | None = None):
        self.size, self.device = image_size, torch.device(device)
        self.model = load_model(checkpoint).model.to(self.device)
        self.session = None
        if onnx_path:
            import onnxruntime as ort

            self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])

    @torch.inference_mode()
    def embed(self, jpegs: list[bytes]) -> np.ndarray:
        images = normalize_on_device(torch.from_numpy(np.stack([decode_resized(j, self.size) for j in jpegs])))
        if self.session is not None:
            return self.session.run(["embedding"], {"images": images.numpy()})[0].astype(np.float16)
        return self.model.embed(images.to(self.device)).cpu().numpy().astype(np.float16)

    def answer(self, jpegs: list[bytes], served: ServedIndex) -> list[dict]:
        return answer_recognition(served, {MODEL: self.embed(jpegs)})


def plain_served_index(loop: PlainLoop, cfg: EnsembleConfig, gallery_jpegs: list[bytes], gallery_labels: np.ndarray,
                       nonlandmark_jpegs: list[bytes]) -> ServedIndex:
    """What a replica loads from the ensemble's files (``answers.load_served_index``), here from the plain loop's own
    embeddings: the gallery and N as unit rows of the ensemble embedding on the device, and the gallery's b_j."""
    def rows(jpegs: list[bytes]) -> torch.Tensor:
        embedded = np.concatenate([loop.embed(jpegs[s:s + 64]) for s in range(0, len(jpegs), 64)])
        return torch.from_numpy(pp.combine_families([("dolg", embedded.astype(np.float32))])).to(loop.device)

    gallery, nonlandmark = rows(gallery_jpegs), rows(nonlandmark_jpegs)
    device = loop.device.type
    bias = pp.nonlandmark_bias(gallery, nonlandmark, cfg.recognition.gallery_nonlandmark_k, device=device)
    return ServedIndex(cfg=cfg, device=device, recognition_models=tuple(cfg.models), gallery=gallery,
                       gallery_labels=gallery_labels, bias=bias, nonlandmark=nonlandmark,
                       nonlandmark_source="the non-landmark test images", retrieval=[], labelling_train=None,
                       index_ids=np.zeros(0, dtype=object), index_id_set=frozenset(), additions=0,
                       dims={MODEL: gallery.shape[1]})


def run_plain(loop: PlainLoop, queries: list[bytes], served: ServedIndex, batch: int) -> dict:
    loop.answer(queries[:batch], served)  # warm-up
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        loop.answer(queries[start:start + batch], served)
    seconds = time.perf_counter() - started
    return {"images": len(queries), "seconds": round(seconds, 2), "images_per_s": round(len(queries) / seconds, 1)}


def load_test(url: str, jpegs: list[bytes], requests_n: int, concurrency: int) -> dict:
    """``requests_n`` POST /recognize of one JPEG each, from ``concurrency`` threads; rate and latency."""
    import requests

    latencies: list[float] = []
    failures = []
    lock = threading.Lock()
    counter = iter(range(requests_n))

    def worker():
        session = requests.Session()
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            started = time.perf_counter()
            response = session.post(f"{url}/recognize", data=jpegs[n % len(jpegs)],
                                    headers={"Content-Type": "image/jpeg"}, timeout=300)
            elapsed = time.perf_counter() - started
            with lock:
                (latencies if response.status_code == 200 else failures).append(elapsed)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests_n} requests failed at concurrency {concurrency}")
    ms = sorted(1000 * x for x in latencies)
    return {"requests": requests_n, "seconds": round(seconds, 2), "requests_per_s": round(requests_n / seconds, 1),
            "p50_ms": round(statistics.median(ms), 1), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1)}


def start_served(cfg: EnsembleConfig, args) -> str:
    """The ensemble job for the model (its embeddings), then the service on them; returns its URL."""
    from ray_landmark.infer.ensemble import run_ensemble
    from ray_landmark.local_s3 import free_port
    from ray_landmark.runtime import init_ray
    from ray_landmark.serve.app import start_service
    from ray_landmark.serve.config import ServeSettings

    init_ray()
    run_ensemble(cfg, printer=lambda line, transient=False: None)
    settings = ServeSettings(ensemble="(in memory)", replicas={
        "num_cpus": args.replica_cpus, "max_batch_size": args.batch, "batch_wait_timeout_s": 0.01,
        "max_ongoing_requests": 64})
    return start_service(settings, cfg, port=free_port())


def synthetic_images(folder: Path, image_size: int, jpeg: tuple[int, int]) -> tuple[str, dict[str, list[bytes]],
                                                                                 np.ndarray]:
    """A synthetic GLDv2 of ``jpeg`` (width, height) JPEGs under ``folder`` and a tiny DOLG checkpoint reading it: the
    checkpoint, the JPEGs of the queries (every test image), of the gallery (the GLDv2c train images) and of N (the
    test images without a landmark), and the gallery's labels."""
    spec = SyntheticSpec(num_landmarks=30, max_images_per_landmark=12, min_images_per_landmark=6, width=jpeg[0],
                         height=jpeg[1], test_landmark_images=48, test_non_landmark_images=16, train_shards=2,
                         clean_landmark_fraction=1.0)
    local = resolve(str(folder / "gldv2"))
    write_synthetic_gldv2(spec, local, progress=None)
    prepare_manifests(local, local.child("manifest"), progress=None)
    checkpoint = make_checkpoint(folder / "ckpt", image_size, f"data.root={local.path}")
    manifest = open_manifest(load_model(checkpoint).config.data)
    truth = manifest.recognition()
    nonlandmark_ids = truth.loc[truth["landmarks"].fillna("").astype(str).str.strip() == "", "id"].tolist()
    view = manifest.view_images("gldv2c")
    train_ids = gldv2.u64_to_ids(view["id"].to_numpy())
    train_jpegs = read_jpegs(local.child("train"), train_ids)
    label_of = dict(zip(train_ids, view["landmark_id"]))
    jpegs = {"queries": list(read_jpegs(local.child("test"), manifest.test()["id"].tolist()).values()),
             "gallery": list(train_jpegs.values()),
             "nonlandmark": list(read_jpegs(local.child("test"), nonlandmark_ids).values())}
    return checkpoint, jpegs, np.asarray([label_of[i] for i in train_jpegs], np.int64)


def measure(args, device: str) -> tuple[dict[str, list[dict]], dict]:
    """Every pass of every path, round robin (one pass of each per round, so that a busy spell of other work hits
    them alike), and the sizes measured."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, jpegs, gallery_labels = synthetic_images(Path(tmp), args.image_size, args.jpeg)
        cfg = ensemble_config(Path(tmp), checkpoint, args.batch)
        loop = PlainLoop(checkpoint, args.image_size, device)
        served = plain_served_index(loop, cfg, jpegs["gallery"], gallery_labels, jpegs["nonlandmark"])
        exported = export_onnx(checkpoint, str(Path(tmp) / "onnx"), check_images=4)
        loops = {"plain_torch": loop,
                 "plain_onnxruntime": PlainLoop(checkpoint, args.image_size, device, exported.onnx)}
        url = None if args.plain_only else start_served(cfg, args)
        passes: dict[str, list[dict]] = {}
        try:
            if url:
                load_test(url, jpegs["queries"], 8, 4)  # warm-up: the replica's first batches
            for _ in range(args.rounds):
                for name, plain_loop in loops.items():
                    passes.setdefault(name, []).append(run_plain(plain_loop, jpegs["queries"], served, args.batch))
                for c in CONCURRENCY if url else ():
                    passes.setdefault(f"serve_{c}", []).append(load_test(url, jpegs["queries"], args.requests, c))
        finally:
            if url:
                from ray import serve

                serve.shutdown()
    return passes, {"queries": len(jpegs["queries"]), "gallery": len(gallery_labels),
                    "nonlandmark": len(jpegs["nonlandmark"])}


def best(passes: list[dict], rate: str) -> dict:
    """The pass with the highest rate: the least disturbed by other work on a shared machine."""
    return max(passes, key=lambda p: p[rate])


def benchmarks_md(payload: dict) -> str:
    """This benchmark's section of BENCHMARKS.md, from its results."""
    m, setup, results, ratios = payload["machine"], payload["setup"], payload["results"], payload["ratios"]
    served = results["serve"] or {}
    rates = [[p.get("images_per_s", p.get("requests_per_s")) for p in runs] for runs in results["passes"].values()]
    swing = max(max(r) / min(r) for r in rates)
    table = markdown_table(["path", "images or requests/s", "p50 ms", "p99 ms"], [
        ["plain PyTorch loop", results["plain_torch"]["images_per_s"], "", ""],
        ["plain onnxruntime loop", results["plain_onnxruntime"]["images_per_s"], "", ""],
        *([f"serve, concurrency {c}", r["requests_per_s"], r["p50_ms"], r["p99_ms"]] for c, r in served.items())])
    serve_text = (f"Serve: one replica with {setup['replica_cpus']} CPUs, `@serve.batch` up to {setup['batch']} "
                  f"images, {served['1']['requests']} POST /recognize of one JPEG per concurrency level, clients on "
                  "the same cores." if served else "No service (`--plain-only`).")
    serve_ratio = f"; serve at concurrency 32 vs the plain loop {ratios['serve_vs_plain']}." if served else "."
    load = setup["load_average_1min_at_start_and_end"]
    jpeg = setup["jpeg"].split()[0]  # "640x480 synthetic" -> 640x480
    return f"""## The landmark service (`python -m benchmarks.serve`)

{setup['queries']} synthetic {jpeg} test JPEGs as queries against a gallery of {setup['gallery']} train images and
{setup['nonlandmark']} non-landmark images, tiny DOLG (random weights) at {setup['image_size']} px, on {m['cores']}
cores ({m['cpu']}; shared with other work while it ran), {m['gpu'] or 'no GPU'}, torch {m['torch']}, Ray {m['ray']}.
Plain: one process decoding, embedding (batches of {setup['batch']}), rounding and answering as the service answers
(`serve.answers.answer_recognition`: the query's penalty to the non-landmark images, the exact adjusted top 3 of the
gallery, voting).
{serve_text}
{setup['rounds']} rounds, each path once per round (round robin); each row is its best pass. Load average (1 min) at
the start and end: {load[0]} and {load[1]} (other sessions' tests shared the machine).

{table}

The plain loop does one thing at a time; the service decodes the images of queued requests in threads while a batch
is embedded, which is how it can beat the loop on the same cores. Every pass is in `{results_path("serve")}`
(`results.passes`): with other work on the machine the same path's rate moved by up to {swing:.1f}x between rounds.

Ratios: onnxruntime vs torch {ratios['onnxruntime_vs_torch']}{serve_ratio}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    parser.add_argument("--batch", type=int, default=16, help="the plain loop's batch and the service's max batch")
    parser.add_argument("--replica-cpus", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2, help="passes of each path, round robin; the best counts")
    parser.add_argument("--plain-only", action="store_true", help="no Ray: the plain loops only")
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    add_jpeg_option(parser)
    add_out_option(parser)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, int(args.replica_cpus)))
    load = [round(os.getloadavg()[0], 1)]
    passes, sizes = measure(args, device)
    load.append(round(os.getloadavg()[0], 1))
    plain, plain_ort = best(passes["plain_torch"], "images_per_s"), best(passes["plain_onnxruntime"], "images_per_s")
    served = None if args.plain_only else {str(c): best(passes[f"serve_{c}"], "requests_per_s") for c in CONCURRENCY}
    payload = {
        "machine": machine(),
        "setup": {**sizes, "jpeg": f"{args.jpeg[0]}x{args.jpeg[1]} synthetic", "image_size": args.image_size,
                  "model": "tiny DOLG (timm test_efficientnet), random weights", "device": device,
                  "batch": args.batch, "replica_cpus": args.replica_cpus, "torch_threads": torch.get_num_threads(),
                  "rounds": args.rounds, "load_average_1min_at_start_and_end": load,
                  "plain": "decode, embed, round to float16, serve.answers.answer_recognition",
                  "serve": "1 replica, max_batch_size = batch, batch_wait_timeout_s 0.01, HTTP keep-alive clients "
                           "on the same machine"},
        "results": {"plain_torch": plain, "plain_onnxruntime": plain_ort, "serve": served, "passes": passes},
        "ratios": {"onnxruntime_vs_torch": round(plain_ort["images_per_s"] / plain["images_per_s"], 3)},
    }
    if served:
        payload["ratios"]["serve_vs_plain"] = round(served["32"]["requests_per_s"] / plain["images_per_s"], 3)
    print(json.dumps(payload, indent=2))
    if not args.no_write:
        publish("serve", payload, benchmarks_md(payload), args.out)


if __name__ == "__main__":
    main()
