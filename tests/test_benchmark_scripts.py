"""The prepared GPU check must not rot while no GPU is at hand: run it on the CPU at toy size."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_at_toy_size(tmp_path):
    smi_log = tmp_path / "smi.csv"
    smi_log.write_text("87 %, 1000 MiB\n91 %, 1100 MiB\n")
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--config", "configs/tiny_dolg.yaml",
         "--image-size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--classes", "100",
         "--nvidia-smi-log", str(smi_log)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert payload["results"]["model"]["images_per_s"] > 0 and payload["results"]["bare_backbone"]["images_per_s"] > 0
    assert payload["nvidia_smi_utilisation"] == {"mean_percent": 89.0, "samples": 2}
    assert payload["setup"]["image_size"] == 32


@pytest.mark.slow
def test_search_benchmark_runs_at_toy_size():
    proc = subprocess.run(
        [sys.executable, "benchmarks/search.py", "--queries", "32", "--sizes", "500,1500", "--dim", "16", "--k", "5",
         "--repeats", "1", "--sweep-mib", "1", "--no-gpu", "--no-write"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "search_vs_gemm" in proc.stdout and "| cpu | faiss | 1,500 |" in proc.stdout
