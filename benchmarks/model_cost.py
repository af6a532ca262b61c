"""What each model family's additions cost over its bare timm backbone: forward+backward time and peak memory.

Per family, at one image size (384: the only size the B6-Swin-384 hybrid accepts) and 81,313 classes (--classes):
  backbone  the timm classification network without its classifier, pooled, loss = mean of squares;
  encoder   the family's network up to the 512-d neck (build_model from the recipe), loss = mean of squares;
  model     the full landmark model: encoder + sub-center ArcFace head and loss.
Both run in NCHW and channels_last. Each measurement runs in a fresh process, so on CPU the peak resident memory
(ru_maxrss) belongs to that one case; on a GPU, torch.cuda.max_memory_allocated under the training loop's autocast
(``models/amp.py``: bf16 where supported, else fp16 with a grad scaler). Needs torch and timm (with PyYAML) alone: the
recipes are read with PyYAML, without pydantic.
torch.compile (inductor, fwd+bwd, channels_last) is run on the tiny configs: compile seconds and step time against
eager. Writes benchmarks/results/model_cost.json and its section of BENCHMARKS.md.

    python -m benchmarks.model_cost [--batch 2] [--steps 4] [--size 384] [--out DIR]
    python -m benchmarks.model_cost --tiny --size 32 --classes 100 --steps 1 --compile-configs "" --out /tmp/toy
        # a smoke run: the tiny DOLG's costs instead of the recipes', no compiling
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import timm
import torch
import yaml

from benchmarks.results_io import REPO, add_out_option, machine, publish
from ray_landmark.markdown import markdown_table
from ray_landmark.models.amp import MixedPrecision
from ray_landmark.models.factory import build_model

CLASSES = 81_313
FAMILIES = {  # family -> (recipe, the timm network its backbone is)
    "DOLG-EfficientNet-B5": ("recipes/dolg_efficientnet_b5", "tf_efficientnet_b5"),
    "EfficientNet-B6-Swin-Base-384": ("recipes/efficientnet_b6_swin_base_384", "swin_base_patch4_window12_384"),
    "EfficientNet-B3 (plain)": ("recipes/efficientnet_b3_step3", "tf_efficientnet_b3"),
}
# --tiny: the tiny DOLG of the tests and the quickstart in place of the recipes, for a smoke run on the CPU.
TINY_FAMILIES = {"tiny DOLG": ("tiny_dolg", "test_efficientnet")}
TINY = ["tiny_dolg", "tiny_hybrid_swin", "tiny_efficientnet"]  # compiled, at 64 px


def _build(kind: str, recipe: str, timm_name: str, size: int, num_classes: int):
    if kind == "backbone":
        net = timm.create_model(timm_name, pretrained=False, num_classes=0)
        return net, lambda module, images, labels: module(images).float().square().mean()
    tree = yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text())
    counts = torch.randint(1, 100, (num_classes,))
    model = build_model({**tree["model"], "pretrained": False}, tree.get("loss", {}), num_classes, size, counts)
    if kind == "encoder":
        return model.encoder, lambda module, images, labels: module(images).float().square().mean()
    return model, lambda module, images, labels: module(images, labels)["loss"]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(case: dict) -> dict:
    """One case in this process: build, warm up once, time ``steps`` forward+backward passes."""
    device = torch.device(case["device"])
    rss_idle = _rss_mib()  # torch and timm loaded, nothing built
    net, loss_of = _build(case["kind"], case["recipe"], case["timm"], case["size"], case["classes"])
    memory_format = torch.channels_last if case["channels_last"] else torch.contiguous_format
    net = net.to(device, memory_format=memory_format).train()
    runner = torch.compile(net) if case["compile"] else net
    size = case["size"]
    images = torch.randn(case["batch"], 3, size, size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, case["classes"], (case["batch"],), device=device)
    precision = MixedPrecision(device)

    def step():
        with precision.autocast():
            loss = loss_of(runner, images, labels)
        precision.backward(loss)
        net.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    step()  # warm-up (and the compile, when compiling)
    first_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(case["steps"]):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    result = {
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        # Best of the timed steps: on a shared machine interference only ever adds time.
        "step_ms": round(1000 * min(times), 1),
        "median_step_ms": round(1000 * statistics.median(times), 1),
        "first_step_s": round(first_s, 2),
    }
    if device.type == "cuda":
        result["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    else:
        result["peak_mib"] = round(_rss_mib() - rss_idle)
        result["idle_rss_mib"] = round(rss_idle)
    return result


def run_case(case: dict) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        # A fresh inductor cache per case: compile times are cold compiles, not cache hits from an earlier run.
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.model_cost", "--one", json.dumps(case)],
                              capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return {**case, **json.loads(proc.stdout.strip().splitlines()[-1])}


def benchmarks_md(payload: dict) -> str:
    """This benchmark's section of BENCHMARKS.md, from its results."""
    m, classes = payload["machine"], payload["classes"]
    # The head's parameters: the model's less the encoder's (the same in every family).
    heads = [round(r["model"]["params_m"] - r["encoder"]["params_m"], 1) for r in payload["families"]
             if "params_m" in r["model"] and "params_m" in r["encoder"]]
    head = f"{heads[0]} M parameters at " if heads else ""
    lines = [
        "## Model cost (`python -m benchmarks.model_cost`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; GPU: {m['gpu'] or 'none'}; "
        f"torch {m['torch']}, {payload['torch_threads']} threads. Forward+backward of a batch of {payload['batch']} "
        f"at {payload['size']} px, best of {payload['steps']} steps after one warm-up (median in the JSON), "
        f"{classes:,} classes; load average {payload['load_average_1m']} when it started. "
        "Backbone: the timm network without classifier (pooled); encoder: the family's network up to the 512-d "
        "neck; model: encoder + sub-center ArcFace head and loss. Peak memory: on CPU the process's peak resident "
        "memory above its idle size (torch and timm imported, nothing built), so weights, gradients and activations; "
        "on GPU max allocated.",
        "",
        "Time and memory of encoder and model are also given as multiples (×) of the backbone's. Encoder vs "
        "backbone is the cost of the family's own layers (DOLG's branches replace the backbone's conv_head, the "
        "hybrid adds an EfficientNet stem and stages in front of Swin); model vs encoder is the ArcFace head "
        f"({head}{classes:,} classes, normalised every step).",
        "",
    ]
    family_rows = []
    for row in payload["families"]:
        b, e, f = row["backbone"], row["encoder"], row["model"]
        errors = [r["error"] for r in (b, e, f) if "error" in r]
        if errors:
            family_rows.append([row["family"], row["device"], row["layout"], f"error: {errors[0]}"] + [""] * 6)
            continue

        def rel(key, r):
            return f"{r[key]} ({r[key] / b[key]:.2f}×)"

        family_rows.append([row["family"], row["device"], row["layout"],
                            f"{b['params_m']} / {e['params_m']} / {f['params_m']}", b["step_ms"], rel("step_ms", e),
                            rel("step_ms", f), b["peak_mib"], rel("peak_mib", e), rel("peak_mib", f)])
    compile_rows = []
    for row in payload["compile"]:
        compiled = row["compiled"]
        compile_rows.append([row["config"], row["eager"]["step_ms"], f"error: {compiled['error']}", ""]
                            if "error" in compiled else
                            [row["config"], row["eager"]["step_ms"], compiled["step_ms"], compiled["first_step_s"]])
    lines.append(markdown_table(["family", "device", "layout", "params M (backbone / encoder / model)",
                                 "backbone ms", "encoder ms", "model ms", "backbone peak MiB", "encoder peak MiB",
                                 "model peak MiB"], family_rows))
    if compile_rows:
        lines += ["", "torch.compile (inductor, channels_last, fwd+bwd) on the tiny configs (64 px, batch "
                      f"{payload['tiny_batch']}, CPU):", "",
                  markdown_table(["config", "eager ms", "compiled ms", "compile + first step s (cold cache)"],
                                 compile_rows)]
    return "\n".join(lines) + "\n"


def measure_families(families: dict, args) -> list[dict]:
    """Backbone, encoder and model of each family, in both layouts, on the CPU and on the GPU where there is one."""
    rows = []
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for family, (recipe, timm_name) in families.items():
            for channels_last in (False, True):
                base = dict(recipe=recipe, timm=timm_name, size=args.size, classes=args.classes, batch=args.batch,
                            steps=args.steps, device=device, channels_last=channels_last, compile=False)
                row = {"family": family, "device": device, "layout": "channels_last" if channels_last else "NCHW"}
                for kind in ("backbone", "encoder", "model"):
                    row[kind] = {k: v for k, v in run_case({**base, "kind": kind}).items()
                                 if k not in base and k != "kind"}
                    print(family, device, row["layout"], kind, row[kind], flush=True)
                rows.append(row)
    return rows


def measure_compiled(configs: list[str], args) -> list[dict]:
    """Each tiny config's model eager and compiled (inductor), on the CPU at 64 px."""
    rows = []
    for name in configs:
        base = dict(recipe=name, timm=None, size=64, classes=8, batch=args.tiny_batch, steps=max(args.steps, 5),
                    device="cpu", channels_last=True, kind="model")
        row = {"config": name}
        for mode, compile_ in (("eager", False), ("compiled", True)):
            row[mode] = {k: v for k, v in run_case({**base, "compile": compile_}).items() if k not in base}
            print(name, mode, row[mode], flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--classes", type=int, default=CLASSES, help="of the ArcFace head (default: GLDv2c's)")
    parser.add_argument("--tiny", action="store_true", help="the tiny DOLG's costs in place of the recipes'")
    parser.add_argument("--tiny-batch", type=int, default=8)
    parser.add_argument("--compile-configs", default=",".join(TINY),
                        help="the tiny configs compiled, comma-separated (empty: none)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    add_out_option(parser)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    compile_configs = [name for name in args.compile_configs.split(",") if name]
    if set(compile_configs) - set(TINY):
        parser.error(f"--compile-configs: choose from {', '.join(TINY)}")

    load_average_1m = round(os.getloadavg()[0], 2)
    families = measure_families(TINY_FAMILIES if args.tiny else FAMILIES, args)
    compiled = measure_compiled(compile_configs, args)
    payload = {
        "machine": machine(), "load_average_1m": load_average_1m, "torch_threads": torch.get_num_threads(),
        "batch": args.batch, "steps": args.steps, "size": args.size, "classes": args.classes,
        "tiny_batch": args.tiny_batch,
        "families": families, "compile": compiled,
    }
    publish("model_cost", payload, benchmarks_md(payload), args.out)


if __name__ == "__main__":
    main()
