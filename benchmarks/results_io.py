"""Shared by the benchmark scripts: a description of the machine, where a run's results go (the JSON results file and
the script's own section of BENCHMARKS.md, regenerated between markers, so each script owns exactly its section), the
two passes of a path that agree best (a path is timed until two of its passes agree), and waiting for a device. Needs
the standard library alone (torch where a function says so): the GPU machines have neither Ray nor pydantic."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import torch

    try:  # the installed version, without importing Ray: the GPU benchmarks run where Ray is not installed
        ray_version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = None

    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        m = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gb, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray_version,
    }


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """``--out``: the folder that receives BENCHMARKS.md and benchmarks/results/ (a toy run points it elsewhere)."""
    parser.add_argument("--out", type=Path, default=REPO,
                        help="write BENCHMARKS.md and benchmarks/results/NAME.json under this folder "
                             "(default: this repository)")


def add_jpeg_option(parser: argparse.ArgumentParser) -> None:
    """``--jpeg WIDTHxHEIGHT``: the size of the synthetic JPEGs a benchmark writes (``args.jpeg``: a (width, height)
    pair). A toy run gives smaller ones: drawing 640x480 images took most of a toy run's set-up."""
    def size(text: str) -> tuple[int, int]:
        try:
            width, height = (int(side) for side in text.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x480 (got {text!r})") from None
        return width, height

    parser.add_argument("--jpeg", type=size, default=(640, 480), metavar="WIDTHxHEIGHT",
                        help="size of the synthetic JPEGs (default 640x480, GLDv2-like)")


def results_path(name: str) -> str:
    """Where a benchmark's raw numbers lie, relative to the output folder (as its section of BENCHMARKS.md cites
    them)."""
    return f"benchmarks/results/{name}.json"


def write_results(name: str, payload: dict, out: Path) -> Path:
    path = out / results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def update_benchmarks_md(name: str, markdown: str, out: Path) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    benchmarks_md = out / "BENCHMARKS.md"
    text = benchmarks_md.read_text() if benchmarks_md.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    benchmarks_md.write_text(text)


def publish(name: str, payload: dict, section: str, out: Path) -> Path:
    """Write the results file and the section of BENCHMARKS.md under ``out``."""
    path = write_results(name, payload, out)
    update_benchmarks_md(name, section, out)
    print(f"wrote {path} and the {name} section of {out / 'BENCHMARKS.md'}")
    return path


def closest_pair(passes: list[dict]) -> tuple[list[dict], float]:
    """The two passes whose rates agree best, and their spread: the faster's rate over the slower's, less 1."""
    ordered = sorted(passes, key=rate)
    pairs = [(ordered[i], ordered[i + 1]) for i in range(len(ordered) - 1)]
    pair = min(pairs, key=lambda p: rate(p[1]) / rate(p[0]))
    return list(pair), rate(pair[1]) / rate(pair[0]) - 1


def rate(one_pass: dict) -> float:
    """A pass's rate: images/s, or requests/s where it served requests."""
    return one_pass.get("images_per_s") or one_pass["requests_per_s"]


def sync(device) -> None:
    """Wait for the work queued on ``device`` (a torch.device): a GPU runs asynchronously, so timings need it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
