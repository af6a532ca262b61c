"""Images/s of a published model's training step on one GPU, next to its bare EfficientNet backbone.

Synthetic uint8 batches already on the GPU (no data loading), the loop's normalisation, channels_last, the loop's
mixed precision (``models/amp.py``: bf16 where supported, else fp16 with a grad scaler), Adam; forward + ArcFace loss +
backward + step. The full head (81,313 classes) is built, so memory and speed include it. Results go to
benchmarks/results/gpu_check.json with the card's name, and to BENCHMARKS.md with an estimate of hours per epoch on 8
such GPUs. Needs torch, timm (with PyYAML) and pillow alone: the config file is read with PyYAML, without pydantic.

    bash benchmarks/gpu_check.sh                  # DOLG-B5 768 px, batch 10 (the published per-GPU batch), with
                                                  # nvidia-smi sampling utilisation
    python -m benchmarks.gpu_check --device cpu --config configs/tiny_dolg.yaml --image-size 64 --steps 3  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch
import yaml

from benchmarks.results_io import REPO, add_out_option, machine, publish, results_path
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.markdown import markdown_table
from ray_landmark.models.amp import MixedPrecision
from ray_landmark.models.factory import build_model
GLDV2C_IMAGES = 1_580_470
GLDV2X_IMAGES = 3_200_000  # "about 3.2 M" (docs/method.md §1); the exact count comes from the manifest
GLDV2C_CLASSES = 81_313


def _time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step, after warm-up, with the device synchronised around the timed region."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def _training_step(net, loss_fn, batch, device):
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-5)
    precision = MixedPrecision(device)
    images_u8, labels = batch

    def step():
        images = normalize_on_device(images_u8).contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            loss = loss_fn(net, images, labels)
        precision.backward(loss)
        precision.step(optimizer)

    return step


def _timed_network(net, loss_fn, batch, args, device: torch.device) -> dict:
    """Images/s, step time and peak GPU memory of training ``net`` on ``batch``."""
    net = net.to(device, memory_format=torch.channels_last).train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = _time_steps(_training_step(net, loss_fn, batch, device), args.steps, args.warmup, device)
    return {
        "images_per_s": round(len(batch[0]) / seconds, 1), "step_ms": round(1000 * seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


def measure(model_section: dict, loss_section: dict, size: int, batch_size: int, args,
            device: torch.device) -> dict:
    """The full model (its 81,313-class head included), then its bare timm backbone, on one synthetic batch."""
    counts = torch.randint(1, 200, (args.classes,))  # long-tailed enough for dynamic margins; speed is unaffected
    batch = (
        torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, device=device),
        torch.randint(0, args.classes, (batch_size,), device=device),
    )
    model = build_model(model_section, loss_section, args.classes, size, counts)
    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    results = {"model": {**_timed_network(model, lambda net, x, y: net(x, y)["loss"], batch, args, device),
                         "params_m": params_m}}
    del model
    backbone = timm.create_model(model_section["backbone"].split(".")[0], pretrained=False, num_classes=0)
    results["bare_backbone"] = _timed_network(backbone, lambda net, x, y: net(x).float().square().mean(), batch,
                                              args, device)
    return results


def utilisation_from_log(path: str | None) -> dict | None:
    """The mean GPU utilisation of an nvidia-smi log (lines like "87 %, 30123 MiB": csv, noheader)."""
    if not path or not Path(path).exists():
        return None
    fields = [line.split(",")[0].strip().rstrip(" %") for line in Path(path).read_text().splitlines()]
    busy = [float(f) for f in fields if f.isdigit()]
    return {"mean_percent": round(sum(busy) / len(busy), 1), "samples": len(busy)} if busy else None


def benchmarks_md(payload: dict) -> str:
    """This benchmark's section of BENCHMARKS.md, from its results."""
    setup, results, hours = payload["setup"], payload["results"], payload["hours_per_epoch_estimate"]
    table = markdown_table(["network", "images/s", "step ms", "peak GiB"], [
        [what, results[name]["images_per_s"], results[name]["step_ms"], results[name]["peak_memory_gib"]]
        for name, what in (("model", "full model (head included)"), ("bare_backbone", "bare backbone"))])
    return f"""## One GPU (`bash benchmarks/gpu_check.sh`): {payload['card']}

`{setup['config']}` at {setup['image_size']} px, batch {setup['batch_size']}, {setup['amp']}, channels_last,
{setup['classes']:,} classes, synthetic batches on the GPU.

{table}

GPU utilisation (nvidia-smi): {payload['nvidia_smi_utilisation']}. Estimated hours per epoch on 8 such GPUs, assuming
linear scaling: GLDv2c {hours['gldv2c_8_gpus']} h, GLDv2x {hours['gldv2x_8_gpus']} h. Raw numbers:
`{results_path("gpu_check")}`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/recipes/dolg_efficientnet_b5.yaml")
    parser.add_argument("--image-size", type=int, help="default: the config's data.image_size")
    parser.add_argument("--batch-size", type=int, help="default: the config's train.batch_size")
    parser.add_argument("--classes", type=int, default=GLDV2C_CLASSES)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--nvidia-smi-log", help="CSV written by nvidia-smi during the run (gpu_check.sh makes it)")
    add_out_option(parser)
    args = parser.parse_args()
    cfg = yaml.safe_load((REPO / args.config).read_text())
    size = args.image_size or cfg["data"]["image_size"]
    batch_size = args.batch_size or cfg["train"]["batch_size"]
    device = torch.device(args.device)
    amp_dtype = MixedPrecision(device).dtype
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # Random weights: they do not change the speed.
    results = measure({**cfg["model"], "pretrained": False}, cfg.get("loss", {}), size, batch_size, args, device)
    rate = results["model"]["images_per_s"]
    payload = {
        "benchmark": "gpu_check",
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({machine()['cpu']})",
        "machine": machine(),
        "setup": {"config": args.config, "image_size": size, "batch_size": batch_size, "classes": args.classes,
                  "amp": str(amp_dtype) if amp_dtype else "off", "channels_last": True,
                  "steps": args.steps, "warmup_steps": args.warmup},
        "results": results,
        "ratios": {"model_vs_bare_backbone": round(rate / results["bare_backbone"]["images_per_s"], 3)},
        "nvidia_smi_utilisation": utilisation_from_log(args.nvidia_smi_log),
        "hours_per_epoch_estimate": {  # linear scaling to 8 GPUs assumed (DDP, no data-loading stall): a lower bound
            "gldv2c_8_gpus": round(GLDV2C_IMAGES / (8 * rate) / 3600, 2),
            "gldv2x_8_gpus": round(GLDV2X_IMAGES / (8 * rate) / 3600, 2),
        },
    }
    print(json.dumps(payload, indent=2))
    if device.type == "cuda":  # a CPU smoke run checks the script; only GPU numbers are recorded
        publish("gpu_check", payload, benchmarks_md(payload), args.out)


if __name__ == "__main__":
    main()
