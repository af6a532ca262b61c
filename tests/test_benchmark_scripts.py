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


# Ray and pydantic unimportable, as on the GPU machines we measure on (a None in sys.modules fails the import).
BLOCK_RAY_AND_PYDANTIC = """
import sys
sys.modules.update({"pydantic": None, "ray": None})
"""
# Runs the script named by the first argument with them blocked.
WITHOUT_RAY_OR_PYDANTIC = BLOCK_RAY_AND_PYDANTIC + """
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow  # the benchmark script end to end, in a process of its own
def test_gpu_decode_benchmark_runs_on_cpu_at_toy_size_without_ray_or_pydantic():
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY_OR_PYDANTIC, "benchmarks/gpu_decode.py", "--tiny"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout[proc.stdout.index("{"):])
    rates = payload["images_per_second"]
    assert all(rate > 0 for rate in rates["worker_decode"].values()) and rates["dataloader_pil_workers"]["1"] > 0
    assert payload["ratios"]["gpu_fed_vs_inmemory"] > 0 and payload["card"].startswith("CPU")


@pytest.mark.slow
def test_search_benchmark_runs_at_toy_size():
    proc = subprocess.run(
        [sys.executable, "benchmarks/search.py", "--queries", "32", "--sizes", "500,1500", "--dim", "16", "--k", "5",
         "--repeats", "1", "--sweep-mib", "1", "--no-gpu", "--no-write"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "search_vs_gemm" in proc.stdout and "| cpu | faiss | 1,500 |" in proc.stdout


@pytest.mark.slow
def test_gpu_compile_runs_without_ray_or_pydantic_at_toy_size():
    """The GPU machine has neither: the script must not import them (the model code's config classes included), and
    the sections it reads from the configs with PyYAML alone must be those that the pydantic sections read."""
    script = BLOCK_RAY_AND_PYDANTIC + """
import contextlib, dataclasses, io, json, runpy
benchmark = runpy.run_path("benchmarks/gpu_compile.py")
sys.argv = ["gpu_compile.py", "--tiny", "--device", "cpu", "--backend", "aot_eager", "--steps", "3", "--warmup", "1",
            "--classes", "10", "--batch-size", "2"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    benchmark["main"]()
payload = json.loads(out.getvalue()[out.getvalue().index("{"):])
cases = {config: dataclasses.asdict(benchmark["read_case"](config))
         for config in [*benchmark["CASES"].values(), *benchmark["TINY_CASES"].values()]}
print(json.dumps({"payload": payload, "markdown": benchmark["_markdown"](payload, "results.json"), "cases": cases}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    payload = result["payload"]
    assert set(payload["ratios"]["compiled_vs_eager"]) == {"tiny_dolg", "tiny_hybrid_swin"}
    for model in payload["models"].values():
        assert model["loss_agreement"]["ok"] and len(model["runs"]["compiled_model"]["losses"]) == 3
    assert "| tiny_dolg | 64 | 2 | compiled_model |" in result["markdown"]

    from ray_landmark.config import load_config

    assert len(result["cases"]) == 4
    for config, case in result["cases"].items():
        cfg = load_config(REPO / config)
        expected = cfg.model.model_dump(mode="json")
        expected["pretrained"] = False
        if cfg.model.arch == "hybrid_swin":
            expected["swin_kwargs"] = {**expected["swin_kwargs"], "drop_path_rate": 0.0}
        # The file's keys (build_model gives the others their defaults, the same as the sections': see
        # tests/test_models_without_pydantic.py).
        assert json.loads(json.dumps(case["model"])) == {key: expected[key] for key in case["model"]}, config
        loss = cfg.loss.model_dump(mode="json")
        assert case["loss"] == {key: loss[key] for key in case["loss"]}, config
        assert (case["image_size"], case["batch_size"], case["lr"]) == (
            cfg.data.image_size, cfg.train.batch_size, cfg.train.lr)
