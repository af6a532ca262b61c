"""Images/s of jobs/embed.py's pipeline against a plain single-process PyTorch loop, same model and images, one run.

(1) plain: one process reads the tar shards from disk, decodes and resizes each JPEG (the validation transform), and
    embeds batches with the model: nothing overlaps;
(2) ray: ``infer.embed.embed_splits``, the job's code: Ray Data read and decode tasks feed one model actor, and the
    driver writes a parquet file per shard; the same tar files.
Both are timed from start to the last embedding written (model load and, for Ray, the actor start included), on a
synthetic train split of GLDv2-like 640x480 JPEGs.

    python -m benchmarks.embed [--image-size 224] [--landmarks 160] [--jpeg 640x480] [--no-write] [--out DIR]
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.results_io import REPO, add_jpeg_option, add_out_option, machine, publish, results_path
from ray_landmark.config import load_config
from ray_landmark.data.config import SyntheticSpec
from ray_landmark.data.metadata import prepare_manifests
from ray_landmark.data.storage import resolve
from ray_landmark.data.synthetic import write_synthetic_gldv2
from ray_landmark.data.jpeg import decode_resized
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.infer.config import EmbedSettings
from ray_landmark.infer.embed import EmbedRequest, embed_splits
from ray_landmark.markdown import markdown_table
from ray_landmark.models.factory import build_model
from ray_landmark.runs.checkpoint import Progress, load_model, save_checkpoint
from ray_landmark.runtime import init_ray


def make_checkpoint(folder: Path, image_size: int, *overrides: str,
                    config: Path = REPO / "configs" / "tiny_dolg.yaml") -> str:
    """A model of ``config`` (a tiny DOLG by default) with random weights, saved as a checkpoint of this project;
    ``overrides``: more KEY=VALUE of its config."""
    cfg = load_config(config, [f"data.image_size={image_size}", *overrides])
    model = build_model(cfg.model, cfg.loss, 100, image_size)
    state = {"model": model.state_dict(), "landmark_ids": torch.arange(100)}
    save_checkpoint(folder, state=state, config=cfg.model_dump(mode="json"), progress=Progress(1, 1, 0))
    return str(folder)


@torch.inference_mode()
def plain_loop(checkpoint: str, train_dir: Path, image_size: int, batch_size: int) -> tuple[int, float]:
    started = time.perf_counter()
    model = load_model(checkpoint).model.to(memory_format=torch.channels_last)
    n, batch = 0, []

    def embed(images: list[np.ndarray]) -> None:
        x = normalize_on_device(torch.from_numpy(np.stack(images))).contiguous(memory_format=torch.channels_last)
        model.embed(x).to(torch.float16).numpy()

    for tar_path in sorted(train_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.isreg():
                    batch.append(decode_resized(tar.extractfile(member).read(), image_size))
                    if len(batch) == batch_size:
                        embed(batch)
                        n, batch = n + len(batch), []
    if batch:
        embed(batch)
        n += len(batch)
    return n, time.perf_counter() - started


def ray_runs(checkpoint: str, root: str, out: Path, image_size: int, batch_size: int) -> dict[str, tuple[int, float]]:
    """(images embedded, seconds) of ``infer.embed.embed_splits`` on the train split, twice on one local Ray: cold
    (its worker processes start during the job) and warm."""
    init_ray()
    data = load_config(REPO / "configs" / "tiny_dolg.yaml", [f"data.root={root}", f"data.image_size={image_size}"]).data
    runs = {}
    for run in ("cold", "warm"):
        request = EmbedRequest(checkpoint=checkpoint, out=str(out / f"emb_{run}"), splits=("train",), view="full",
                               data=data, settings=EmbedSettings(batch_size=batch_size))
        started = time.perf_counter()
        embedded = embed_splits(request, printer=lambda line, transient=False: None)["train"]["embedded"]
        runs[run] = (embedded, time.perf_counter() - started)
    return runs


def benchmarks_md(payload: dict) -> str:
    """This benchmark's section of BENCHMARKS.md, from its results."""
    setup, m, results, ratios = payload["setup"], payload["machine"], payload["results"], payload["ratios"]
    jpeg = setup["jpeg"].split()[0].replace("x", "×")  # "640x480 synthetic" -> 640×480
    rows = [[what, results[name]["images"], f"{results[name]['seconds']:.1f}", f"{results[name]['images_per_s']:.1f}"]
            for name, what in (
                ("plain", "(1) plain single-process loop, tars on local disk"),
                ("ray_cold", "(2) `jobs/embed.py`'s pipeline, cold: Ray Data decode tasks + 1 model actor, same files"),
                ("ray_warm", "(2) the same, warm"))]
    return f"""## Embedding job (`python -m benchmarks.embed`)

{setup['images']} synthetic {jpeg} JPEGs of the train split → {setup['image_size']} px, tiny DOLG, batch
{setup['batch_size']}, on {m['cores']} cores ({m['cpu']}). Each timed from start to the last
embedding written, model load included. Cold: the first job on a new local Ray (its worker processes start and
import torch); warm: the same job again, as every pass after the first of a long embedding job.

{markdown_table(["pipeline", "images", "seconds", "images/s"], rows)}

`ray_vs_plain` (warm) = **{ratios['ray_vs_plain']}** (target ≥ 0.9); cold:
{ratios['ray_cold_vs_plain']}. Raw numbers: `{results_path("embed")}`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--landmarks", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=64)  # the ensemble's embed.batch_size
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    add_jpeg_option(parser)
    add_out_option(parser)
    args = parser.parse_args()
    spec = SyntheticSpec(num_landmarks=args.landmarks, max_images_per_landmark=50, min_images_per_landmark=15,
                         width=args.jpeg[0], height=args.jpeg[1], train_shards=8, clean_landmark_fraction=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        local = resolve(str(Path(tmp) / "gldv2"))
        summary = write_synthetic_gldv2(spec, local, progress=None)
        prepare_manifests(local, local.child("manifest"), progress=None)
        checkpoint = make_checkpoint(Path(tmp) / "ckpt", args.image_size)
        plain_n, plain_s = plain_loop(checkpoint, Path(local.path) / "train", args.image_size, args.batch_size)
        ray = ray_runs(checkpoint, local.path, Path(tmp), args.image_size, args.batch_size)

    plain_rate = plain_n / plain_s
    rates = {run: n / seconds for run, (n, seconds) in ray.items()}
    payload = {
        "machine": machine(),
        "setup": {"images": summary["images"]["train"], "jpeg": f"{args.jpeg[0]}x{args.jpeg[1]} synthetic",
                  "image_size": args.image_size,
                  "model": "tiny DOLG (timm test_efficientnet)", "batch_size": args.batch_size,
                  "ray": "1 model actor (2 CPUs), Ray Data read and decode tasks, the same local tar files"},
        "results": {
            "plain": {"images": plain_n, "seconds": round(plain_s, 2), "images_per_s": round(plain_rate, 1)},
            **{f"ray_{run}": {"images": n, "seconds": round(seconds, 2), "images_per_s": round(rates[run], 1)}
               for run, (n, seconds) in ray.items()},
        },
        "ratios": {"ray_vs_plain": round(rates["warm"] / plain_rate, 3),
                   "ray_cold_vs_plain": round(rates["cold"] / plain_rate, 3)},
    }
    section = benchmarks_md(payload)
    print(section)
    if not args.no_write:
        publish("embed", payload, section, args.out)


if __name__ == "__main__":
    main()
