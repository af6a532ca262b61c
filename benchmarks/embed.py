"""Images/s of jobs/embed.py's pipeline against a plain single-process PyTorch loop, same model and images, one run.

(1) plain: one process reads the tar shards from disk, decodes and resizes each JPEG (the validation transform), and
    embeds batches with the model: nothing overlaps;
(2) ray: ``infer.embed.embed_splits``, the job's code: Ray Data read and decode tasks feed one model actor, and the
    driver writes a parquet file per shard; the same tar files.
Both are timed from start to the last embedding written (model load and, for Ray, the actor start included), on a
synthetic train split of GLDv2-like 640x480 JPEGs.

    python benchmarks/embed.py [--image-size 224] [--landmarks 80]
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine, update_benchmarks_md, write_results  # noqa: E402

from ray_landmark.config import load_config  # noqa: E402
from ray_landmark.data.config import SyntheticSpec  # noqa: E402
from ray_landmark.data.metadata import prepare_manifests  # noqa: E402
from ray_landmark.data.storage import resolve  # noqa: E402
from ray_landmark.data.synthetic import write_synthetic_gldv2  # noqa: E402
from ray_landmark.data.transforms import decode_resized, normalize_on_device  # noqa: E402
from ray_landmark.infer.config import EmbedSettings  # noqa: E402
from ray_landmark.infer.embed import EmbedRequest, embed_splits  # noqa: E402
from ray_landmark.models.factory import build_model  # noqa: E402
from ray_landmark.runs.checkpoint import Progress, load_model, save_checkpoint  # noqa: E402
from ray_landmark.runtime import init_ray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(folder: Path, image_size: int, *overrides: str) -> str:
    """A tiny DOLG (random weights) saved as a checkpoint of this project; ``overrides``: more KEY=VALUE of its
    config."""
    cfg = load_config(REPO / "configs" / "tiny_dolg.yaml", [f"data.image_size={image_size}", *overrides])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--landmarks", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=64)  # the ensemble's embed.batch_size
    parser.add_argument("--no-write", action="store_true", help="print the results only")
    args = parser.parse_args()
    spec = SyntheticSpec(num_landmarks=args.landmarks, max_images_per_landmark=50, min_images_per_landmark=15,
                         width=640, height=480, train_shards=8, clean_landmark_fraction=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        local = resolve(str(Path(tmp) / "gldv2"))
        summary = write_synthetic_gldv2(spec, local, progress=None)
        prepare_manifests(local, local.child("manifest"), progress=None)
        checkpoint = make_checkpoint(Path(tmp) / "ckpt", args.image_size)

        plain_n, plain_s = plain_loop(checkpoint, Path(local.path) / "train", args.image_size, args.batch_size)

        init_ray()
        data = load_config(REPO / "configs" / "tiny_dolg.yaml",
                           [f"data.root={local.path}", f"data.image_size={args.image_size}"]).data
        ray_runs = {}
        for run in ("cold", "warm"):  # warm: the job again on the same Ray, its worker processes already started
            request = EmbedRequest(checkpoint=checkpoint, out=str(Path(tmp) / f"emb_{run}"), splits=("train",),
                                   view="full", data=data, settings=EmbedSettings(batch_size=args.batch_size))
            started = time.perf_counter()
            embedded = embed_splits(request, printer=lambda line, transient=False: None)["train"]["embedded"]
            ray_runs[run] = (embedded, time.perf_counter() - started)

    plain_rate = plain_n / plain_s
    rates = {run: n / seconds for run, (n, seconds) in ray_runs.items()}
    payload = {
        "machine": machine(),
        "setup": {"images": summary["images"]["train"], "jpeg": "640x480 synthetic", "image_size": args.image_size,
                  "model": "tiny DOLG (timm test_efficientnet)", "batch_size": args.batch_size,
                  "ray": "1 model actor (2 CPUs), Ray Data read and decode tasks, the same local tar files"},
        "results": {
            "plain": {"images": plain_n, "seconds": round(plain_s, 2), "images_per_s": round(plain_rate, 1)},
            **{f"ray_{run}": {"images": n, "seconds": round(seconds, 2), "images_per_s": round(rates[run], 1)}
               for run, (n, seconds) in ray_runs.items()},
        },
        "ratios": {"ray_vs_plain": round(rates["warm"] / plain_rate, 3),
                   "ray_cold_vs_plain": round(rates["cold"] / plain_rate, 3)},
    }
    (cold_n, cold_s), (warm_n, warm_s) = ray_runs["cold"], ray_runs["warm"]
    markdown = f"""## Embedding job (`benchmarks/embed.py`)

{payload['setup']['images']} synthetic 640×480 JPEGs of the train split → {args.image_size} px, tiny DOLG, batch
{args.batch_size}, on {payload['machine']['cores']} cores ({payload['machine']['cpu']}). Each timed from start to the last
embedding written, model load included. Cold: the first job on a new local Ray (its worker processes start and
import torch); warm: the same job again, as every pass after the first of a long embedding job.

| pipeline | images | seconds | images/s |
|---|---|---|---|
| (1) plain single-process loop, tars on local disk | {plain_n} | {plain_s:.1f} | {plain_rate:.1f} |
| (2) `jobs/embed.py`'s pipeline, cold: Ray Data decode tasks + 1 model actor, same files | {cold_n} | {cold_s:.1f} | {rates['cold']:.1f} |
| (2) the same, warm | {warm_n} | {warm_s:.1f} | {rates['warm']:.1f} |

`ray_vs_plain` (warm) = **{payload['ratios']['ray_vs_plain']}** (target ≥ 0.9); cold:
{payload['ratios']['ray_cold_vs_plain']}. Raw numbers: `benchmarks/results/embed.json`.
"""
    print(markdown)
    if not args.no_write:
        write_results("embed", payload)
        update_benchmarks_md("embed", markdown)


if __name__ == "__main__":
    main()
