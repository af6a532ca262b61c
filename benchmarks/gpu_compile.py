"""torch.compile of the training step, eager vs compiled, on one GPU: DOLG-EfficientNet-B5 at 768 px (batch 10) and
the EfficientNet-B6-Swin-Base-384 hybrid at 384 px (batch 16), as the published recipes train them per GPU.

Each model, as its recipe config describes it, is built from one seed and trains 20 steps (Adam, the recipe's lr, the
full 81,313-class sub-center ArcFace head) on the same 4 synthetic batches, cycled, three times from the same initial
weights:

* eager, bf16 autocast, channels_last (the training loop's settings on a GPU);
* eager without autocast: how far bf16 alone moves the losses, printed beside the bound below;
* compiled as the training loop compiles (``models/torch_compile.py``: the whole model, head and loss included, in
  place; default mode, inductor). ``--scopes model,encoder`` adds a run with the encoder alone compiled (as the
  embedding job compiles), which answers whether compiling the head and loss too pays off.

Speed is the mean of steps 6-20 of each run (on the CPU also the process's CPU seconds per step, which a shared
machine's other load disturbs less than wall time); the compiled run's first step includes compiling. The compiled
losses must agree with the eager ones at every step within ``--loss-rtol`` of the first step's loss (default 2 % under
bf16, 0.1 % in fp32, the CPU's precision): bf16 keeps 8 significant bits (0.4 %), inductor rounds fused
intermediates differently from eager, and the differences build up over the steps. (Relative to the first loss, not
to each step's: a loss that falls near 0 would make any difference large.) The hybrid's stochastic depth (timm's
0.1) is off, so that both runs compute the same function.

No Ray and no pydantic: GPU machines may have only torch, torchvision, timm (with PyYAML) and pillow. The models are
the project's, built by ``build_model`` from the config file's model and loss sections read with PyYAML; the step is
the training loop's (``models/amp.py``).

    bash benchmarks/gpu_compile.sh                    # both models (sized for 5 minutes on an H200): writes
                                                      # benchmarks/results/gpu_compile.json and BENCHMARKS.md
    python -m benchmarks.gpu_compile --models dolg_b5 --scopes model,encoder   # the two scopes on the GPU
    python -m benchmarks.gpu_compile --tiny --device cpu --backend aot_eager --steps 3 --warmup 1   # smoke test
    OMP_NUM_THREADS=1 python -m benchmarks.gpu_compile --tiny --device cpu --models tiny_dolg --batch-size 16 \
        --scopes model,encoder --results compile_scope_cpu    # the same question on the CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from benchmarks.results_io import REPO, add_out_option, machine, publish, results_path, sync
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.markdown import markdown_table
from ray_landmark.models.amp import MixedPrecision
from ray_landmark.models.factory import build_model
from ray_landmark.models.torch_compile import compile_for_embedding, compile_for_training

GLDV2C_CLASSES = 81_313
STEPS, WARMUP = 20, 5


@dataclasses.dataclass(frozen=True)
class Case:
    """A model as its config trains it: the model and loss sections (plain dicts, as build_model takes them without
    pydantic), image size, per-GPU batch and lr."""

    config: str
    model: dict
    loss: dict
    image_size: int
    batch_size: int
    lr: float


def read_case(config: str) -> Case:
    """The case of a config file (``configs/...yaml``), read with PyYAML alone. The weights are not downloaded
    (random ones train at the same speed) and the Swin's stochastic depth is off, so that the eager and the compiled
    runs compute the same function (their random numbers differ)."""
    import yaml  # timm requires PyYAML

    tree = yaml.safe_load((REPO / config).read_text())
    model = {**tree["model"], "pretrained": False}
    if model["arch"] == "hybrid_swin":
        model["swin_kwargs"] = {**model.get("swin_kwargs", {}), "drop_path_rate": 0.0}
    return Case(config, model, tree.get("loss", {}), tree["data"]["image_size"], tree["train"]["batch_size"],
                tree["train"]["lr"])


CASES = {"dolg_b5": "configs/recipes/dolg_efficientnet_b5.yaml",
         "hybrid_b6_swin384": "configs/recipes/efficientnet_b6_swin_base_384.yaml"}
TINY_CASES = {"tiny_dolg": "configs/tiny_dolg.yaml", "tiny_hybrid_swin": "configs/tiny_hybrid_swin.yaml"}

# What is compiled: "model" (encoder, head and loss) is what the training loop compiles; "encoder" what the
# embedding job compiles.
SCOPES = {"model": compile_for_training, "encoder": compile_for_embedding}
TRAINING_SCOPE = "model"


def _build(case: Case, classes: int, device: torch.device, seed: int) -> torch.nn.Module:
    """The same initial weights for every run of a case: built on the CPU from ``seed``."""
    counts = torch.randint(1, 200, (classes,), generator=torch.Generator().manual_seed(seed))  # long-tailed enough
    torch.manual_seed(seed)
    model = build_model(case.model, case.loss, classes, case.image_size, counts)
    return model.to(device, memory_format=torch.channels_last).train()


def _train(model, batches, case: Case, steps: int, warmup: int, device: torch.device, amp: bool) -> dict:
    """``steps`` optimizer steps over ``batches`` (cycled), with the training loop's mixed precision when ``amp``:
    losses, the first step's seconds, the speed after ``warmup`` steps and the peak device memory."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=case.lr)
    precision = MixedPrecision(device, enabled=amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    sync(device)
    started = timed_from = time.perf_counter()
    cpu_from = time.process_time()
    first_step_s = 0.0
    for step in range(steps):
        if step == warmup:
            sync(device)
            timed_from, cpu_from = time.perf_counter(), time.process_time()
        images_u8, labels = batches[step % len(batches)]
        images = normalize_on_device(images_u8).contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            loss = model(images, labels)["loss"]
        precision.backward(loss)
        precision.step(optimizer)
        losses.append(loss.detach())
        if step == 0:
            sync(device)
            first_step_s = time.perf_counter() - started
    sync(device)
    seconds = (time.perf_counter() - timed_from) / (steps - warmup)
    cpu_seconds = (time.process_time() - cpu_from) / (steps - warmup)
    return {
        "images_per_s": round(case.batch_size / seconds, 2), "step_ms": round(1000 * seconds, 2),
        "first_step_s": round(first_step_s, 2),
        "cpu_s_per_step": round(cpu_seconds, 3) if device.type == "cpu" else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "losses": [round(x, 6) for x in torch.stack(losses).float().tolist()],
    }


def _max_difference(losses: list[float], reference: list[float]) -> float:
    """The largest difference at any step, relative to the reference's first loss."""
    return max(abs(a - b) for a, b in zip(losses, reference)) / abs(reference[0])


def run_case(name: str, case: Case, args, device: torch.device, amp: bool) -> dict:
    generator = torch.Generator(device=device).manual_seed(args.seed)
    size, batch = case.image_size, case.batch_size
    batches = [(torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device, generator=generator),
                torch.randint(0, args.classes, (batch,), device=device, generator=generator)) for _ in range(4)]
    model = _build(case, args.classes, device, args.seed)
    initial = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    print(f"[{name}] eager", flush=True)
    runs = {"eager": _train(model, batches, case, args.steps, args.warmup, device, amp)}
    if amp:
        print(f"[{name}] eager without autocast (the bf16 reference)", flush=True)
        model.load_state_dict(initial)
        runs["eager_fp32"] = _train(model, batches, case, args.steps, args.warmup, device, False)
    del model
    for scope in args.scopes:
        print(f"[{name}] compiled ({scope}, {args.backend}); the first step compiles", flush=True)
        model = _build(case, args.classes, device, args.seed)
        SCOPES[scope](model, args.backend)
        runs[f"compiled_{scope}"] = _train(model, batches, case, args.steps, args.warmup, device, amp)
        del model
        torch.compiler.reset()  # the next scope or case compiles from scratch
        if device.type == "cuda":
            torch.cuda.empty_cache()

    eager = runs["eager"]["losses"]
    agreement = {f"compiled_{scope}_vs_eager": _max_difference(runs[f"compiled_{scope}"]["losses"], eager)
                 for scope in args.scopes}
    if "eager_fp32" in runs:
        agreement["eager_vs_eager_fp32"] = _max_difference(eager, runs["eager_fp32"]["losses"])
    bound = args.loss_rtol if args.loss_rtol is not None else (0.02 if amp else 1e-3)
    return {
        "config": case.config, "image_size": size, "batch_size": batch, "lr": case.lr, "runs": runs,
        "loss_agreement": {"max_difference_vs_first_loss": {k: round(v, 7) for k, v in agreement.items()},
                           "bound": bound,
                           "ok": all(agreement[f"compiled_{s}_vs_eager"] <= bound for s in args.scopes)},
    }


def benchmarks_md(payload: dict, results_file: str) -> str:
    """The section of BENCHMARKS.md of a run, from its results (written to ``results_file``)."""
    setup = payload["setup"]
    rows = []
    for name, result in payload["models"].items():
        eager = result["runs"]["eager"]
        differences = result["loss_agreement"]["max_difference_vs_first_loss"]
        for run, numbers in result["runs"].items():
            difference = differences.get(f"{run}_vs_eager", differences.get(f"eager_vs_{run}"))
            rows.append([name, result["image_size"], result["batch_size"], run, numbers["images_per_s"],
                         f"{numbers['images_per_s'] / eager['images_per_s']:.3f}", numbers["cpu_s_per_step"],
                         numbers["first_step_s"], numbers["peak_memory_gib"],
                         "" if difference is None else f"{difference:.1e}"])
    table = markdown_table(["model", "px", "batch", "run", "images/s", "× eager", "CPU s/step", "first step s",
                            "peak GiB", "loss difference from eager"], rows)
    bounds = ", ".join(f"{b:g}" for b in sorted({r["loss_agreement"]["bound"] for r in payload["models"].values()}))
    scope_lines = [  # the question --scopes model,encoder answers
        f"{name}: compiling the head and the loss too ran at {model['images_per_s'] / encoder['images_per_s']:.2f}× "
        f"the images/s of compiling the encoder alone"
        + (f" ({encoder['cpu_s_per_step'] / model['cpu_s_per_step']:.2f}× in CPU seconds per step)"
           if model["cpu_s_per_step"] else "") + "."
        for name, result in payload["models"].items()
        for model, encoder in [(result["runs"].get("compiled_model"), result["runs"].get("compiled_encoder"))]
        if model and encoder
    ]
    tiny_note = ("The tiny encoder leaves most of each step to the head (its weights are classes × 3 × 512): the "
                 "case most favourable to compiling the head and the loss too.\n\n") if setup.get("tiny") else ""
    reference_note = ("; on the `eager_fp32` row, what leaving out bf16 autocast changes"
                      if any("eager_fp32" in r["runs"] for r in payload["models"].values()) else "")
    return f"""## torch.compile, training step (`python -m benchmarks.gpu_compile`): {payload['card']}

{setup['precision']}, channels_last, {setup['classes']:,} classes, Adam, {setup['steps']} steps from one seed on the
same synthetic batches; speed over the steps after {setup['warmup_steps']} warm-up steps. `compiled_model`: encoder,
head and loss compiled in place, as training compiles; `compiled_encoder`: the encoder alone, as the embedding job
compiles (backend {setup['backend']}, default mode). A compiled run's first step includes compiling. Loss difference:
the largest at any step, divided by the first step's eager loss (bound {bounds}){reference_note}.
{setup['torch_threads']} torch thread(s); load average {setup['load_average']} when it started.
Run: `{setup['command']}`.

{table}

{tiny_note}{" ".join(scope_lines)}{" " if scope_lines else ""}Raw numbers: `{results_file}`.
"""


def _command() -> str:
    """This run's command line, with the thread setting when there is one (it changes CPU timings)."""
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return f"{threads}python -m benchmarks.gpu_compile {' '.join(sys.argv[1:])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated, default all of: {', '.join(CASES)} "
                                         f"(with --tiny: {', '.join(TINY_CASES)})")
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU configs' models at 64 px instead")
    parser.add_argument("--scopes", default=TRAINING_SCOPE, help="comma-separated compile scopes: model (the "
                                                                 "training loop's), encoder")
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--classes", type=int, default=GLDV2C_CLASSES)
    parser.add_argument("--batch-size", type=int, help="default: each model's per-GPU batch")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-rtol", type=float, help="largest loss difference, relative to the first step's "
                                                            "loss; default 0.02 with bf16/fp16 autocast, 0.001 in fp32")
    parser.add_argument("--results", help="write benchmarks/results/NAME.json and its BENCHMARKS.md section "
                                          "(default on a GPU: gpu_compile; on the CPU: nothing)")
    add_out_option(parser)
    args = parser.parse_args()
    cases = TINY_CASES if args.tiny else CASES
    names = args.models.split(",") if args.models else list(cases)
    args.scopes = args.scopes.split(",")
    for bad, known in ((set(names) - set(cases), cases), (set(args.scopes) - set(SCOPES), SCOPES)):
        if bad:
            parser.error(f"unknown {sorted(bad)}; choose from {', '.join(known)}")
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps: the speed is measured on the steps after it")
    device = torch.device(args.device)
    amp_dtype = MixedPrecision(device).dtype  # the training loop's precision: autocast on a GPU, fp32 on the CPU
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results_name = args.results or ("gpu_compile" if device.type == "cuda" else None)
    host = machine()
    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({host['cpu']}, {host['cores']} cores)")
    payload = {
        "benchmark": "gpu_compile", "card": card, "machine": host,
        "setup": {"precision": str(amp_dtype).removeprefix("torch.") + " autocast" if amp_dtype else "fp32",
                  "channels_last": True, "classes": args.classes, "steps": args.steps, "warmup_steps": args.warmup,
                  "backend": args.backend, "scopes": args.scopes, "seed": args.seed,
                  "load_average": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads(),
                  "tiny": args.tiny, "command": _command()},
        "models": {}, "ratios": {},
    }
    for name in names:
        case = read_case(cases[name])
        if args.batch_size:
            case = dataclasses.replace(case, batch_size=args.batch_size)
        result = run_case(name, case, args, device, amp_dtype is not None)
        payload["models"][name] = result
        eager_rate = result["runs"]["eager"]["images_per_s"]
        for scope in args.scopes:
            key = "compiled_vs_eager" if scope == TRAINING_SCOPE else f"compiled_{scope}_vs_eager"
            payload["ratios"].setdefault(key, {})[name] = round(
                result["runs"][f"compiled_{scope}"]["images_per_s"] / eager_rate, 3)
        if results_name:  # after each model: a run cut short still keeps the models it finished
            publish(results_name, payload, benchmarks_md(payload, results_path(results_name)), args.out)
    print(json.dumps(payload, indent=2))
    failed = [n for n, r in payload["models"].items() if not r["loss_agreement"]["ok"]]
    if failed:
        raise SystemExit(f"compiled losses differ from eager beyond the bound for {', '.join(failed)}: see "
                         f"loss_agreement above")


if __name__ == "__main__":
    main()
