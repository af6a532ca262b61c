"""Images/s of a published model's training step on one GPU, next to its bare EfficientNet backbone.

Synthetic uint8 batches already on the GPU (no data loading), the loop's normalisation, channels_last, the loop's
mixed precision (``models/amp.py``: bf16 where supported, else fp16 with a grad scaler), Adam; forward + ArcFace loss +
backward + step. The full head (81,313 classes) is built, so memory and speed include it. Results go to
benchmarks/results/gpu_check.json with the card's name, and to BENCHMARKS.md with an estimate of hours per epoch on 8
such GPUs. Needs torch, timm (with PyYAML) and pillow alone: the config file is read with PyYAML, without pydantic.

    python benchmarks/gpu_check.py                      # DOLG-B5 768 px, batch 10 (the published per-GPU batch)
    python benchmarks/gpu_check.py --device cpu --config configs/tiny_dolg.yaml --image-size 64 --steps 3  # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import machine, update_benchmarks_md, write_results  # noqa: E402

from ray_landmark.data.transforms import normalize_on_device  # noqa: E402
from ray_landmark.models.amp import MixedPrecision  # noqa: E402
from ray_landmark.models.factory import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
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
    args = parser.parse_args()
    cfg = yaml.safe_load((REPO / args.config).read_text())
    model_section = {**cfg["model"], "pretrained": False}  # the weights do not change the speed
    size = args.image_size or cfg["data"]["image_size"]
    batch_size = args.batch_size or cfg["train"]["batch_size"]
    device = torch.device(args.device)
    amp_dtype = MixedPrecision(device).dtype
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    counts = torch.randint(1, 200, (args.classes,))  # long-tailed enough for dynamic margins; speed is unaffected
    batch = (
        torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, device=device),
        torch.randint(0, args.classes, (batch_size,), device=device),
    )
    results = {}
    model = build_model(model_section, cfg.get("loss", {}), args.classes, size, counts)
    model = model.to(device, memory_format=torch.channels_last)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = _training_step(model.train(), lambda net, x, y: net(x, y)["loss"], batch, device)
    seconds = _time_steps(step, args.steps, args.warmup, device)
    results["model"] = {
        "images_per_s": round(batch_size / seconds, 1), "step_ms": round(1000 * seconds, 1),
        "params_m": round(params_m, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    del model, step

    backbone = timm.create_model(model_section["backbone"].split(".")[0], pretrained=False, num_classes=0)
    backbone = backbone.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = _training_step(backbone.train(), lambda net, x, y: net(x).float().square().mean(), batch, device)
    seconds = _time_steps(step, args.steps, args.warmup, device)
    results["bare_backbone"] = {
        "images_per_s": round(batch_size / seconds, 1), "step_ms": round(1000 * seconds, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }

    utilisation = None
    if args.nvidia_smi_log and Path(args.nvidia_smi_log).exists():
        # lines like "87 %, 30123 MiB" (csv, noheader)
        fields = [line.split(",")[0].strip().rstrip(" %") for line in Path(args.nvidia_smi_log).read_text().splitlines()]
        busy = [float(f) for f in fields if f.isdigit()]
        utilisation = {"mean_percent": round(sum(busy) / len(busy), 1), "samples": len(busy)} if busy else None

    rate = results["model"]["images_per_s"]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({machine()['cpu']})"
    hours = {  # linear scaling to 8 GPUs assumed (DDP, no data-loading stall): a lower bound on the real time
        "gldv2c_8_gpus": round(GLDV2C_IMAGES / (8 * rate) / 3600, 2),
        "gldv2x_8_gpus": round(GLDV2X_IMAGES / (8 * rate) / 3600, 2),
    }
    payload = {
        "benchmark": "gpu_check", "card": card, "machine": machine(),
        "setup": {"config": args.config, "image_size": size, "batch_size": batch_size, "classes": args.classes,
                  "amp": str(amp_dtype) if amp_dtype else "off", "channels_last": True,
                  "steps": args.steps, "warmup_steps": args.warmup},
        "results": results,
        "ratios": {"model_vs_bare_backbone": round(rate / results["bare_backbone"]["images_per_s"], 3)},
        "nvidia_smi_utilisation": utilisation,
        "hours_per_epoch_estimate": hours,
    }
    print(json.dumps(payload, indent=2))
    if device.type != "cuda":
        return  # a CPU smoke run checks the script; only GPU numbers are recorded
    path = write_results("gpu_check", payload)
    update_benchmarks_md(
        "gpu_check",
        f"""## One GPU (`benchmarks/gpu_check.sh`): {card}

`{args.config}` at {size} px, batch {batch_size}, {payload['setup']['amp']}, channels_last, {args.classes:,} classes,
synthetic batches on the GPU.

| network | images/s | step ms | peak GiB |
|---|---|---|---|
| full model (head included) | {rate} | {results['model']['step_ms']} | {results['model']['peak_memory_gib']} |
| bare backbone | {results['bare_backbone']['images_per_s']} | {results['bare_backbone']['step_ms']} | {results['bare_backbone']['peak_memory_gib']} |

GPU utilisation (nvidia-smi): {utilisation}. Estimated hours per epoch on 8 such GPUs, assuming linear scaling:
GLDv2c {hours['gldv2c_8_gpus']} h, GLDv2x {hours['gldv2x_8_gpus']} h. Raw numbers: `{path.relative_to(REPO)}`.
""",
    )


if __name__ == "__main__":
    main()
