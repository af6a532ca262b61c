"""Decoding and augmenting on the GPU (``data.decode: gpu``) against a torch DataLoader of PIL workers, and the DOLG-B5
training step fed by GPU decoding against synthetic in-memory batches. One short script for one GPU (sized for about 3
minutes on an H200 from the rates in docs/method.md §12; not yet run on a GPU), with neither Ray nor pydantic: the GPU
machines we measure on have neither.

1. images/s of ``worker_decode.TrainBatchDecoder`` on the GPU (nvjpeg decode of a list of JPEGs, resize, the train
   augmentation with each image's own parameters; what a training worker runs with ``data.decode: gpu``), for both
   ``data.preprocessing`` modes and without the augmentation, against
2. a torch DataLoader whose N workers decode, resize and augment with PIL (``benchmarks.one_by_one``, what the
   Ray Data decode tasks and the published solution run), for N = 4, 8, 16;
3. the DOLG-B5 training step at 768 px, batch 10, bf16, channels_last, 81,313 classes, fed by GPU decoding of JPEG
   bytes held in host memory, against the same step on one synthetic uint8 batch already on the GPU:
   ``ratios.gpu_fed_vs_inmemory`` (target >= 0.95).

The JPEGs are synthetic 800×600 "photos" (smooth colour fields, edges and grain, quality 90, about GLDv2's ~80 KB);
their mean size is recorded. The model is the project's: ``build_model`` from recipe ``dolg_efficientnet_b5`` (read
with PyYAML; random weights), its sub-center ArcFace loss included, trained with the loop's mixed precision
(``models/amp.py``). Results go to benchmarks/results/gpu_decode.json with the card's name, and BENCHMARKS.md.

    python -m benchmarks.gpu_decode            # on one GPU
    python -m benchmarks.gpu_decode --tiny     # a smoke run on the CPU at toy size (the tests run it); writes nothing
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from benchmarks.one_by_one import OneByOne
from benchmarks.results_io import REPO, add_out_option, machine, publish, results_path, sync
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.data.worker_decode import TrainBatchDecoder
from ray_landmark.markdown import markdown_table
from ray_landmark.models.amp import MixedPrecision
from ray_landmark.models.factory import build_model

FULL = dict(device="cuda", photo=(800, 600), unique_photos=256, size=768, decode_batch=128, decode_batches=24,
            loader_workers=(4, 8, 16), loader_seconds=6.0, config="configs/recipes/dolg_efficientnet_b5.yaml",
            classes=81_313, batch=10, steps=20, warmup=5)
TINY = dict(device="cpu", photo=(160, 120), unique_photos=16, size=64, decode_batch=8, decode_batches=2,
            loader_workers=(1,), loader_seconds=0.5, config="configs/tiny_dolg.yaml", classes=100, batch=4, steps=1,
            warmup=1)
LOADER_BATCH = 32


def synthetic_photos(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """JPEGs (q90) with what makes a photo costly to decode: smooth colour fields, sharp edges and sensor grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    photos = []
    for _ in range(n):
        field = np.stack([80 + 60 * np.sin(x / rng.uniform(20, 200) + y / rng.uniform(20, 200) + rng.uniform(0, 6))
                          for _ in range(3)], axis=-1)
        for _ in range(6):  # a few hard-edged blocks ("buildings")
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            field[y0:y0 + rng.integers(20, height // 2), x0:x0 + rng.integers(20, width // 2)] += rng.uniform(
                -60, 60, 3)
        pixels = np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        photos.append(out.getvalue())
    return photos


def worker_decode_rate(jpegs: list[bytes], size: int, preprocessing: str, augment: bool, batch: int, batches: int,
                       device: torch.device) -> float:
    """Images/s of decode + resize (+ augment) of batches of JPEG bytes on ``device``, after one warm-up batch."""
    decoder = TrainBatchDecoder(size, preprocessing, device, augment=augment)
    labels = np.zeros(batch, np.int64)

    def chunk(i: int) -> list[bytes]:
        return [jpegs[(i * batch + j) % len(jpegs)] for j in range(batch)]

    decoder(chunk(0), labels)
    sync(device)
    started = time.perf_counter()
    for i in range(batches):
        decoder(chunk(i + 1), labels)
    sync(device)
    return batch * batches / (time.perf_counter() - started)


class InMemoryJpegs(torch.utils.data.Dataset):
    """``length`` items cycling over the JPEGs, each decoded, resized and augmented with PIL in a loader worker."""

    def __init__(self, jpegs: list[bytes], size: int, length: int):
        self.jpegs, self.length, self.transform = jpegs, length, OneByOne(size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i):
        return torch.from_numpy(self.transform(self.jpegs[i % len(self.jpegs)])), 0


def dataloader_rate(jpegs: list[bytes], size: int, workers: int, seconds: float) -> float:
    """Images/s of a DataLoader with ``workers`` PIL workers (one thread each, as DataLoader sets), timed after their
    first batches (worker start-up)."""
    # PIL decodes ~67 images/s a core at 768 px (docs/method.md §12.4); at 60 a worker's share takes about ``seconds``.
    per_worker = max(4 * LOADER_BATCH, int(seconds * 60))
    loader = torch.utils.data.DataLoader(InMemoryJpegs(jpegs, size, workers * per_worker), batch_size=LOADER_BATCH,
                                         num_workers=workers, prefetch_factor=2)
    n, started = 0, None
    for i, (images, _) in enumerate(loader):
        if i == 2 * workers:  # every worker has delivered its first batches: start the clock
            n, started = 0, time.perf_counter()
        n += len(images)
    return n / (time.perf_counter() - started)


def build_net(config: str, size: int, classes: int) -> nn.Module:
    """The config's model (random weights), with dynamic margins from long-tailed class counts."""
    tree = yaml.safe_load((REPO / config).read_text())
    counts = torch.randint(1, 200, (classes,))
    return build_model({**tree["model"], "pretrained": False}, tree.get("loss", {}), classes, size, counts)


def training_rate(net: nn.Module, next_batch, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of forward + loss + backward + Adam step, each step's uint8 NHWC batch from ``next_batch()``."""
    precision = MixedPrecision(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-5)

    def step() -> None:
        images_u8, labels = next_batch()
        images = normalize_on_device(images_u8).contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            loss = net(images, labels)["loss"]
        precision.backward(loss)
        precision.step(optimizer)

    for _ in range(warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - started)


def dataloader_rates(jpegs: list[bytes], p: dict) -> dict[int, float]:
    """Images/s of a DataLoader of PIL workers, for each number of workers."""
    rates = {}
    for workers in p["loader_workers"]:
        rates[workers] = round(dataloader_rate(jpegs, p["size"], workers, p["loader_seconds"]), 1)
        print(f"DataLoader, {workers} PIL workers: {rates[workers]} img/s")
    return rates


def worker_decode_rates(jpegs: list[bytes], p: dict, device: torch.device) -> dict[str, float]:
    """Images/s of decoding on ``device``: without the augmentation, with it, and with the original preprocessing."""
    rates = {}
    for name, preprocessing, augment in [("decode_resize", "fast", False), ("decode_resize_augment", "fast", True),
                                         ("decode_resize_augment_original", "original", True)]:
        rates[name] = round(worker_decode_rate(jpegs, p["size"], preprocessing, augment, p["decode_batch"],
                                               p["decode_batches"], device), 1)
        print(f"{device.type} decode ({name}): {rates[name]} img/s")
    return rates


def training_rates(jpegs: list[bytes], net: nn.Module, p: dict, device: torch.device) -> tuple[float, float]:
    """Images/s of the training step on one synthetic batch already on ``device``, and fed by decoding JPEG bytes
    there."""
    size, batch = p["size"], p["batch"]
    labels = torch.randint(0, p["classes"], (batch,), device=device)
    in_memory_images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    in_memory = training_rate(net, lambda: (in_memory_images, labels), batch, p["steps"], p["warmup"], device)
    print(f"DOLG step, synthetic in-memory batches: {in_memory:.1f} img/s")
    decoder = TrainBatchDecoder(size, "fast", device, augment=True)
    host_labels = np.zeros(batch, np.int64)
    position = 0

    def decoded_batch():
        nonlocal position
        chunk = [jpegs[(position + j) % len(jpegs)] for j in range(batch)]
        position += batch
        images, _, _ = decoder(chunk, host_labels)
        return images, labels

    fed = training_rate(net, decoded_batch, batch, p["steps"], p["warmup"], device)
    print(f"DOLG step, fed by {device.type} decoding: {fed:.1f} img/s")
    return in_memory, fed


def benchmarks_md(payload: dict) -> str:
    """This benchmark's section of BENCHMARKS.md, from its results."""
    setup, training, r = payload["setup"], payload["setup"]["training"], payload["images_per_second"]
    decode = r["worker_decode"]
    rows = [[f"GPU: decode + resize (`data.decode: gpu`, batches of {setup['decode_batch']})", decode["decode_resize"]],
            ["GPU: decode + resize + train augmentation", decode["decode_resize_augment"]],
            ["GPU: the same with `data.preprocessing: original`", decode["decode_resize_augment_original"]]]
    rows += [[f"DataLoader, {w} PIL workers: decode + resize + augmentation", rate]
             for w, rate in r["dataloader_pil_workers"].items()]
    return f"""## Decoding on the GPU (`python -m benchmarks.gpu_decode`): {payload['card']}

JPEGs: {setup['jpegs']}, mean {setup['mean_jpeg_kb']} KB; → {setup['output_px']} px.

{markdown_table(["decoder", "images/s"], rows)}

DOLG-B5 ({training['params_m']} M parameters) training step at {setup['output_px']} px, batch {training['batch']},
{training['amp']}, channels_last: fed by GPU decoding {r['training_step_fed_by_worker_decode']} images/s, on one
synthetic batch already on the GPU {r['training_step_in_memory_batches']} images/s: `gpu_fed_vs_inmemory` =
**{payload['ratios']['gpu_fed_vs_inmemory']}** (target ≥ 0.95). Raw numbers: `{results_path("gpu_decode")}`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a CPU smoke run at toy size; writes no results")
    add_out_option(parser)
    args = parser.parse_args()
    p = TINY if args.tiny else FULL
    device = torch.device(p["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    width, height = p["photo"]
    jpegs = synthetic_photos(p["unique_photos"], width, height)
    mean_jpeg_kb = round(float(np.mean([len(j) for j in jpegs])) / 1e3, 1)
    print(f"{len(jpegs)} synthetic {width}x{height} JPEGs, mean {mean_jpeg_kb:.0f} KB")
    loaders = dataloader_rates(jpegs, p)  # first: the loaders' workers are forked before this process uses the GPU
    decode = worker_decode_rates(jpegs, p, device)
    net = build_net(p["config"], p["size"], p["classes"]).to(device, memory_format=torch.channels_last).train()
    params_m = round(sum(t.numel() for t in net.parameters()) / 1e6, 1)
    in_memory, gpu_fed = training_rates(jpegs, net, p, device)

    amp_dtype = MixedPrecision(device).dtype
    payload = {
        "benchmark": "gpu_decode",
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({machine()['cpu']})",
        "machine": machine(),
        "setup": {"jpegs": f"{len(jpegs)} synthetic {width}x{height} q90, cycled", "mean_jpeg_kb": mean_jpeg_kb,
                  "output_px": p["size"], "decode_batch": p["decode_batch"], "loader_batch": LOADER_BATCH,
                  "training": {"config": p["config"], "params_m": params_m, "batch": p["batch"],
                               "classes": p["classes"], "steps": p["steps"], "warmup": p["warmup"],
                               "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
                               "channels_last": True}},
        "images_per_second": {
            "worker_decode": decode,
            "dataloader_pil_workers": {str(w): r for w, r in loaders.items()},
            "training_step_in_memory_batches": round(in_memory, 1),
            "training_step_fed_by_worker_decode": round(gpu_fed, 1),
        },
        "ratios": {
            "gpu_fed_vs_inmemory": round(gpu_fed / in_memory, 3),
            "worker_decode_augment_vs_best_dataloader": round(decode["decode_resize_augment"] / max(loaders.values()),
                                                              2),
        },
        "targets": {"gpu_fed_vs_inmemory": ">= 0.95"},
    }
    print(json.dumps(payload, indent=2))
    if not args.tiny:
        publish("gpu_decode", payload, benchmarks_md(payload), args.out)


if __name__ == "__main__":
    main()
