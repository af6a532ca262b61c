"""The embedding network run by PyTorch and by onnxruntime on one GPU: DOLG-EfficientNet-B5 at 768 px and the
EfficientNet-B6-Swin-Base-384 hybrid at 384 px, the published image sizes (their recipe configs, docs/method.md §4).

Each model is built from one seed as its recipe config describes it (random weights: the speed does not depend on
them) and exported as the service's onnxruntime backend runs it (``models/onnx_graph.py``: float32, opset 18, dynamic
batch). The same synthetic images (uniform noise from one seed, normalised as the embedding job normalises) go
through every runtime:

* ``torch``: as ``infer.embed.Embedder`` runs the model: eval, channels_last, under ``models/amp.py``'s autocast
  (bf16 on a GPU that has it; on the CPU no autocast, float32);
* ``torch_fp32``: on a GPU, the same without autocast: the reference every difference is measured from (on the CPU
  ``torch`` is that reference);
* ``onnxruntime_cuda``: the CUDA execution provider, float32, inputs and outputs bound in GPU memory (I/O binding),
  and ``onnxruntime_cuda_host``: the same session fed as the service's backend feeds it (``OnnxEmbedding``: the batch
  copied to host memory and passed as a numpy array, which onnxruntime copies back to the GPU);
* ``onnxruntime_tensorrt_fp16``: the TensorRT execution provider with fp16 engines (the original's Triton demo runs
  TensorRT fp16 engines, docs/method.md §8), I/O binding; its engines are built during the first run, whose time is
  reported apart;
* on the CPU, ``onnxruntime_cpu`` alone (the toy run that keeps this script working).

A provider that this onnxruntime does not have (the CPU build of onnxruntime has neither CUDA nor TensorRT; install
``onnxruntime-gpu``), or that the session falls back from, is a named line in ``skipped``, not a number.

Per runtime: images/s at ``--batch`` (mean over ``--steps`` calls after ``--warmup``), latency at batch 1 (median and
90th percentile of ``--latency-runs`` calls after the warm-up), the first call's seconds (a TensorRT engine build
included), and the largest absolute difference of its unit embeddings from the reference, with the smallest cosine
between them. No Ray and no pydantic: the GPU machines have torch, timm (with PyYAML), onnx, onnxscript and
onnxruntime; the models come from the config files as ``benchmarks/gpu_compile.py`` reads them.

    python -m benchmarks.gpu_onnx                     # both models on the GPU: benchmarks/results/gpu_onnx.json and
                                                      # its BENCHMARKS.md section, written after each model
    python -m benchmarks.gpu_onnx --models dolg_b5 --batch 32 --no-tensorrt    # no TensorRT engines to build
    python -m benchmarks.gpu_onnx --tiny --device cpu --batch 2 --steps 2 --warmup 1 --latency-runs 3   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.gpu_compile import CASES, TINY_CASES, Case, read_case
from benchmarks.results_io import add_out_option, machine, publish, results_path, sync
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.markdown import markdown_table
from ray_landmark.models.amp import MixedPrecision
from ray_landmark.models.factory import build_model
from ray_landmark.models.onnx_graph import INPUT, EmbeddingNetwork, export_graph

CLASSES = 1000  # the head is no part of the embedding network: its size changes nothing measured here
Embed = Callable[[torch.Tensor], torch.Tensor]  # normalised NCHW images on the device -> float32 [N, D] embeddings


def _torch_runtime(model: torch.nn.Module, precision: MixedPrecision) -> Embed:
    @torch.inference_mode()
    def embed(images: torch.Tensor) -> torch.Tensor:
        with precision.autocast():
            return model.embed(images.contiguous(memory_format=torch.channels_last)).float()

    return embed


def _bound_runtime(session, device: torch.device) -> Embed:
    """onnxruntime reading and writing GPU memory (I/O binding): no copy through the host."""
    def embed(images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous()
        binding = session.io_binding()
        binding.bind_input(INPUT, "cuda", device.index or 0, np.float32, tuple(images.shape), images.data_ptr())
        binding.bind_output("embedding", "cuda", device.index or 0)
        session.run_with_iobinding(binding)
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0])

    return embed


def _host_runtime(session) -> Embed:
    """onnxruntime fed numpy arrays, as ``infer/onnx_runtime.py``'s ``OnnxEmbedding`` feeds it."""
    def embed(images: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(images.float().cpu().numpy())
        return torch.from_numpy(session.run(["embedding"], {INPUT: pixels})[0])

    return embed


def _providers(device: torch.device, cache: str, tensorrt: bool) -> dict[str, list]:
    """runtime name -> the provider list its session is made with (the first one is the one measured)."""
    if device.type != "cuda":
        return {"onnxruntime_cpu": ["CPUExecutionProvider"]}
    cuda = ("CUDAExecutionProvider", {"device_id": device.index or 0})
    engines = ("TensorrtExecutionProvider", {"device_id": device.index or 0, "trt_fp16_enable": True,
                                             "trt_engine_cache_enable": True, "trt_engine_cache_path": cache})
    return {"onnxruntime_cuda": [cuda], **({"onnxruntime_tensorrt_fp16": [engines, cuda]} if tensorrt else {})}


def onnx_runtimes(path: str, device: torch.device, cache: str,
                  tensorrt: bool) -> tuple[dict[str, Embed], dict[str, str]]:
    """The onnxruntime runtimes this machine can run on ``path``, and a line for each one it cannot."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the CPU provider gets torch's threads
    runtimes, skipped = {}, {}
    for name, providers in _providers(device, cache, tensorrt).items():
        provider = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if provider not in available:
            skipped[name] = (f"{provider} is not in this onnxruntime {ort.__version__} (it has {', '.join(available)})"
                             f"; install onnxruntime-gpu")
            continue
        try:
            session = ort.InferenceSession(path, options, providers=providers)
        except Exception as err:  # noqa: BLE001 (a provider whose libraries are missing: CUDA, cuDNN, TensorRT)
            skipped[name] = f"onnxruntime could not make a {provider} session: {' '.join(str(err).split())[:300]}"
            continue
        if session.get_providers()[0] != provider:
            skipped[name] = f"onnxruntime made the session with {session.get_providers()[0]}, not {provider}"
            continue
        if device.type == "cuda":
            runtimes[name] = _bound_runtime(session, device)
            if name == "onnxruntime_cuda":
                runtimes["onnxruntime_cuda_host"] = _host_runtime(session)
        else:
            runtimes[name] = _host_runtime(session)
    return runtimes, skipped


def measure(embed: Embed, images: torch.Tensor, args, device: torch.device,
            reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Speed at the batch, latency at batch 1, and the difference of the batch's embeddings from ``reference``
    (None: this runtime is the reference); also the batch's embeddings."""
    sync(device)
    started = time.perf_counter()
    first = embed(images).float().cpu()
    sync(device)
    first_s = time.perf_counter() - started
    for _ in range(args.warmup):
        embed(images)
    sync(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        embed(images)
    sync(device)
    seconds = (time.perf_counter() - started) / args.steps
    one, latencies = images[:1], []
    for run in range(args.warmup + args.latency_runs):
        started = time.perf_counter()
        embed(one)
        sync(device)
        if run >= args.warmup:
            latencies.append(1000 * (time.perf_counter() - started))
    latencies.sort()
    result = {"images_per_s": round(len(images) / seconds, 2), "batch_ms": round(1000 * seconds, 2),
              "latency_ms_p50": round(statistics.median(latencies), 2),
              "latency_ms_p90": round(latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))], 2),
              "first_call_s": round(first_s, 2), "embedding_dim": first.shape[1]}
    if reference is not None:
        result["max_abs_difference"] = float((first - reference).abs().max())
        result["min_cosine"] = round(float((first * reference).sum(1).min()), 6)
    return result, first


def run_case(name: str, case: Case, args, device: torch.device, folder: str) -> dict:
    """Every runtime on one model: the reference first, so that the others are compared with it."""
    size = args.image_size or case.image_size
    torch.manual_seed(args.seed)
    model = build_model(case.model, case.loss, CLASSES, size).eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pixels = torch.randint(0, 256, (args.batch, size, size, 3), dtype=torch.uint8, device=device, generator=generator)
    images = normalize_on_device(pixels).contiguous()
    print(f"[{name}] exporting to ONNX at {size} px", flush=True)
    path = os.path.join(folder, f"{name}.onnx")
    started = time.perf_counter()
    export_graph(EmbeddingNetwork(model).eval(), images[:2].cpu(), path)
    export_s = time.perf_counter() - started
    model = model.to(device, memory_format=torch.channels_last)
    precision = MixedPrecision(device)
    runtimes: dict[str, Embed] = {}
    if precision.dtype is not None:  # the reference first: float32 PyTorch
        runtimes["torch_fp32"] = _torch_runtime(model, MixedPrecision(device, enabled=False))
    runtimes["torch"] = _torch_runtime(model, precision)
    onnx, skipped = onnx_runtimes(path, device, os.path.join(folder, "tensorrt"), args.tensorrt)
    runtimes.update(onnx)
    results, reference = {}, None
    for runtime, embed in runtimes.items():
        print(f"[{name}] {runtime}", flush=True)
        results[runtime], out = measure(embed, images, args, device, reference)
        reference = out if reference is None else reference
    for runtime, reason in skipped.items():
        print(f"[{name}] {runtime} skipped: {reason}", flush=True)
    del model, runtimes, onnx
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"config": case.config, "image_size": size, "batch": args.batch, "export_s": round(export_s, 1),
            "onnx_mib": round(os.path.getsize(path) / 2**20, 1), "reference": next(iter(results)),
            "torch_precision": str(precision.dtype).removeprefix("torch.") + " autocast" if precision.dtype else "fp32",
            "runtimes": results, "skipped": skipped}


def benchmarks_md(payload: dict, results_file: str) -> str:
    """The section of BENCHMARKS.md of a run, from its results (written to ``results_file``)."""
    setup, rows = payload["setup"], []
    for name, result in payload["models"].items():
        torch_rate = result["runtimes"]["torch"]["images_per_s"]
        for runtime, r in result["runtimes"].items():
            difference = r.get("max_abs_difference")
            rows.append([name, result["image_size"], runtime, r["images_per_s"],
                         f"{r['images_per_s'] / torch_rate:.2f}", r["latency_ms_p50"], r["latency_ms_p90"],
                         r["first_call_s"], "reference" if difference is None else f"{difference:.1e}",
                         "" if difference is None else r["min_cosine"]])
    table = markdown_table(["model", "px", "runtime", "images/s", "× torch", "batch-1 ms p50", "batch-1 ms p90",
                            "first call s", "max abs difference", "min cosine"], rows)
    skipped = [f"{name} {runtime}: {reason}" for name, result in payload["models"].items()
               for runtime, reason in result["skipped"].items()]
    skipped_text = ("Not measured: " + "; ".join(skipped) + ".\n\n") if skipped else ""
    return f"""## The embedding network, PyTorch vs onnxruntime (`python -m benchmarks.gpu_onnx`): {payload['card']}

Random-weight models built from their recipe configs, exported with `models/onnx_graph.py` (float32, opset 18);
synthetic images, batch {setup['batch']} for images/s ({setup['steps']} calls after {setup['warmup']} warm-up), batch
1 for latency ({setup['latency_runs']} calls). `torch` runs as the embedding job and the service run it (channels_last,
autocast on a GPU); `_host` rows feed onnxruntime numpy arrays, as the service's onnxruntime backend does; the other
onnxruntime rows read and write GPU memory. Differences: the batch's unit embeddings against the reference row
(PyTorch float32). onnxruntime {setup['onnxruntime']}, torch {payload['machine']['torch']}; load average
{setup['load_average']} when it started. Run: `{setup['command']}`.

{table}

{skipped_text}Raw numbers: `{results_file}`.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated, default all of: {', '.join(CASES)} "
                                         f"(with --tiny: {', '.join(TINY_CASES)})")
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU configs' models instead")
    parser.add_argument("--image-size", type=int, help="default: each model's recipe size")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64, help="the batch images/s is measured at")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensorrt", action=argparse.BooleanOptionalAction, default=True,
                        help="also the TensorRT provider where onnxruntime has it (its engines take minutes to build)")
    parser.add_argument("--results", help="write benchmarks/results/NAME.json and its BENCHMARKS.md section "
                                          "(default on a GPU: gpu_onnx; on the CPU: nothing)")
    add_out_option(parser)
    args = parser.parse_args()
    cases = TINY_CASES if args.tiny else CASES
    names = args.models.split(",") if args.models else list(cases)
    if set(names) - set(cases):
        parser.error(f"unknown {sorted(set(names) - set(cases))}; choose from {', '.join(cases)}")
    if args.batch < 2:
        parser.error("--batch must be 2 or more: the graph is exported at a batch of 2, its batch dimension dynamic")
    import onnxruntime as ort

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results_name = args.results or ("gpu_onnx" if device.type == "cuda" else None)
    host = machine()
    payload = {
        "benchmark": "gpu_onnx", "machine": host,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({host['cpu']}, "
                                                                                  f"{host['cores']} cores)",
        "setup": {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "latency_runs": args.latency_runs,
                  "seed": args.seed, "tiny": args.tiny, "tensorrt": args.tensorrt, "onnxruntime": ort.__version__,
                  "onnxruntime_providers": ort.get_available_providers(), "torch_threads": torch.get_num_threads(),
                  "load_average": round(os.getloadavg()[0], 2),
                  "command": f"python -m benchmarks.gpu_onnx {' '.join(sys.argv[1:])}".strip()},
        "models": {}, "ratios": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            result = run_case(name, read_case(cases[name]), args, device, folder)
            payload["models"][name] = result
            torch_rate = result["runtimes"]["torch"]["images_per_s"]
            for runtime, r in result["runtimes"].items():
                if runtime.startswith("onnxruntime"):
                    payload["ratios"].setdefault(f"{runtime}_vs_torch", {})[name] = round(
                        r["images_per_s"] / torch_rate, 3)
            if results_name:  # after each model: a run cut short keeps the models it finished
                publish(results_name, payload, benchmarks_md(payload, results_path(results_name)), args.out)
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
