"""The benchmarks must not rot between their full runs. Each runs here at toy size from the repository's root,
writing its results under tmp_path (no timing is asserted, and the repository's BENCHMARKS.md and benchmarks/results/
must stay as they are): as ``python -m benchmarks.<name>``, or, for the CPU ones that start a local Ray, their
``main()`` one after another in one process; the GPU ones run on the CPU with Ray and pydantic unimportable, as on
the GPU machines we measure on. BENCHMARKS.md's sections are what their scripts render
from the recorded results, and the package keeps its rules: no sys.path edits, no function over 80 lines."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "benchmarks"
LONGEST_FUNCTION = 80

# Ray and pydantic unimportable (a None in sys.modules fails the import), then the benchmark named by the first
# argument run with the rest.
WITHOUT_RAY_OR_PYDANTIC = """
import importlib, sys
sys.modules.update({"pydantic": None, "ray": None})
benchmark = importlib.import_module("benchmarks." + sys.argv[1])
sys.argv = sys.argv[1:]
benchmark.main()
"""


def run_benchmark(name: str, *args: str, without_ray_or_pydantic: bool = False) -> str:
    """Its standard output: ``python -m benchmarks.<name> args`` from the repository's root."""
    command = ([sys.executable, "-c", WITHOUT_RAY_OR_PYDANTIC, name] if without_ray_or_pydantic
               else [sys.executable, "-m", f"benchmarks.{name}"])
    proc = subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def printed_json(stdout: str) -> dict:
    """The JSON object a benchmark printed last, after its progress lines."""
    return json.loads(stdout if stdout.startswith("{") else stdout[stdout.index("\n{") + 1:])


def written(out: Path, name: str) -> tuple[dict, str]:
    """The results file and the BENCHMARKS.md section a run wrote under ``out``."""
    section = re.search(f"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", (out / "BENCHMARKS.md").read_text(),
                        re.S)
    assert section, f"no {name} section in {out / 'BENCHMARKS.md'}"
    return json.loads((out / "benchmarks" / "results" / f"{name}.json").read_text()), section.group(1)


@pytest.fixture(autouse=True)
def recorded_results_untouched():
    """The toy runs write under tmp_path only: the recorded results are the quiet machine's."""
    def snapshot() -> dict[str, bytes]:
        return {path.name: path.read_bytes() for path in [REPO / "BENCHMARKS.md",
                                                           *sorted((PACKAGE / "results").glob("*.json"))]}

    before = snapshot()
    yield
    assert snapshot() == before, "a benchmark wrote into the repository's BENCHMARKS.md or benchmarks/results/"


# ---------------------------------------------------------------- the package's rules


def test_no_benchmark_edits_sys_path():
    """The benchmarks are a package run with ``python -m``: its modules import each other as ``benchmarks.<name>``."""
    edits = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                       if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [node.func.value]
                       if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else [])
            for target in targets:
                if isinstance(target, ast.Subscript):
                    target = target.value
                if ast.unparse(target) == "sys.path":
                    edits.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not edits, "sys.path edited:\n" + "\n".join(edits)


def test_no_function_in_the_benchmarks_is_over_80_lines():
    long = [f"{path.name}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION]
    assert not long, f"functions over {LONGEST_FUNCTION} lines:\n" + "\n".join(long)


def test_no_benchmark_writes_a_table_by_hand():
    """Every table goes through ray_landmark.markdown.markdown_table: no string in the benchmarks starts a row."""
    rows = {f"{path.name}:{node.lineno}" for path in sorted(PACKAGE.glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"^\|", node.value, re.M)}
    assert not rows, "table rows written by hand: " + ", ".join(sorted(rows))


# Sections of BENCHMARKS.md that their script would not write from the recorded results, and why.
NOT_RENDERED = {
    "gpu_compile": "the note of a benchmark prepared but not run on a GPU yet: no results",
}


def test_every_section_of_benchmarks_md_is_what_its_script_writes_from_the_recorded_results():
    """So that a script's changes to its wording cannot change a number it did not measure."""
    from benchmarks import data_pipeline, embed, gpu_compile, model_cost, scale, search, serve, serve_load, train_step
    from benchmarks.results_io import results_path

    render = {"model_cost": model_cost.benchmarks_md,
              "train_step": train_step.benchmarks_md, "search": search.benchmarks_md, "embed": embed.benchmarks_md,
              "compile_scope_cpu": lambda p: gpu_compile.benchmarks_md(p, results_path("compile_scope_cpu")),
              "search_adjusted": search.adjusted_benchmarks_md,
              "search_label_rerank": search.label_rerank_benchmarks_md, "serve": serve.benchmarks_md,
              "serve_load": serve_load.benchmarks_md, "scale": scale.benchmarks_md,
              "data_pipeline": data_pipeline.benchmarks_md}
    text = (REPO / "BENCHMARKS.md").read_text()
    sections = dict(re.findall(r"<!-- (\w+):start -->\n(.*?)\n<!-- \1:end -->", text, re.S))
    assert set(sections) == set(render) | set(NOT_RENDERED)
    for name, write in render.items():
        recorded = json.loads((REPO / results_path(name)).read_text())
        assert write(recorded).strip() == sections[name], name


def test_the_data_pipeline_benchmark_takes_an_earlier_run_only_if_it_can_set_its_ratios_beside(tmp_path):
    """``--previous``: a file that is not JSON, or results without per-round ratios (an older version's, whose ratios
    were closest pairs), is one line."""
    from benchmarks.data_pipeline import read_previous

    (tmp_path / "old.json").write_text(json.dumps({"machine": {}, "setup": {}, "ratios": {}}))
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(SystemExit, match=r"old.json: not the results of a run of this benchmark with per-round "
                                         r"ratios \(missing unsettled_paths, ratio_spreads, round_ratios\); pass a "
                                         r"results file"):
        read_previous(tmp_path / "old.json")
    with pytest.raises(SystemExit, match=r"text.json: cannot read it as JSON"):
        read_previous(tmp_path / "text.json")



def test_a_comparison_of_two_paths_is_the_median_of_its_ratios_round_by_round_with_their_range_as_its_spread():
    """A busy spell in one round moves both paths of that round: the closest passes of each path, picked apart,
    could pair a quiet pass with a busy one."""
    from benchmarks.data_pipeline import RATE_RATIOS, path_ratios, ratio_spreads, round_ratios

    every = {name: [1.0, 100.0, 50.0, 100.0, 100.0] for name in {p for pair in RATE_RATIOS.values() for p in pair}}
    every["ray_s3_ranged"] = [9.0, 90.0, 45.0, 80.0, 95.0]  # round 2 was busy for both
    every["dataloader_tars_s3"] = [1.0, 100.0, 50.0, 100.0, 100.0]
    per_round = round_ratios(every)
    assert per_round["ranged_vs_dataloader_same_source_s3"] == [0.9, 0.9, 0.8, 0.95]  # the warm-up left out
    rates = {name: passes[-1] for name, passes in every.items() if name != "ceiling"}
    ratios = path_ratios(rates, 200.0, per_round, {"ray_task_fast": 1.0, "ray_task_original": 2.0}, {})
    assert ratios["ranged_vs_dataloader_same_source_s3"] == 0.9 and ratios["stream_s3_vs_ceiling"] == 0.5
    spreads = ratio_spreads({name: 0.02 for name in rates}, per_round)
    assert spreads["ranged_vs_dataloader_same_source_s3"] == round(0.95 / 0.8 - 1, 3)
    assert spreads["stream_s3_vs_ceiling"] == 0.02  # the path's own: the ceiling has none

# ---------------------------------------------------------------- the GPU benchmarks, on the CPU


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_at_toy_size_without_ray_or_pydantic(tmp_path):
    from benchmarks.gpu_check import benchmarks_md

    smi_log = tmp_path / "smi.csv"
    smi_log.write_text("87 %, 1000 MiB\n91 %, 1100 MiB\n")
    payload = printed_json(run_benchmark(
        "gpu_check", "--device", "cpu", "--config", "configs/tiny_dolg.yaml", "--image-size", "32", "--batch-size",
        "2", "--steps", "1", "--warmup", "0", "--classes", "100", "--nvidia-smi-log", str(smi_log), "--out",
        str(tmp_path), without_ray_or_pydantic=True))
    assert payload["results"]["model"]["images_per_s"] > 0 and payload["results"]["bare_backbone"]["images_per_s"] > 0
    assert payload["nvidia_smi_utilisation"] == {"mean_percent": 89.0, "samples": 2}
    assert payload["setup"]["image_size"] == 32
    assert not (tmp_path / "BENCHMARKS.md").exists()  # only a GPU's numbers are recorded
    assert "| full model (head included) |" in benchmarks_md(payload)


@pytest.mark.slow  # the benchmark script end to end, in a process of its own
def test_gpu_decode_runs_on_cpu_at_toy_size_without_ray_or_pydantic():
    from benchmarks.gpu_decode import benchmarks_md

    payload = printed_json(run_benchmark("gpu_decode", "--tiny", without_ray_or_pydantic=True))
    rates = payload["images_per_second"]
    assert all(rate > 0 for rate in rates["worker_decode"].values()) and rates["dataloader_pil_workers"]["1"] > 0
    assert payload["ratios"]["gpu_fed_vs_inmemory"] > 0 and payload["card"].startswith("CPU")
    assert "| DataLoader, 1 PIL workers: decode + resize + augmentation |" in benchmarks_md(payload)


@pytest.mark.slow  # the benchmark script end to end, in a process of its own
def test_gpu_onnx_runs_on_cpu_at_toy_size_without_ray_or_pydantic():
    from benchmarks.gpu_onnx import benchmarks_md

    payload = printed_json(run_benchmark("gpu_onnx", "--tiny", "--device", "cpu", "--batch", "2", "--steps", "1",
                                         "--warmup", "1", "--latency-runs", "2", without_ray_or_pydantic=True))
    assert set(payload["models"]) == {"tiny_dolg", "tiny_hybrid_swin"}
    for model in payload["models"].values():
        assert model["reference"] == "torch" and set(model["runtimes"]) == {"torch", "onnxruntime_cpu"}
        onnx = model["runtimes"]["onnxruntime_cpu"]
        assert onnx["images_per_s"] > 0 and onnx["latency_ms_p50"] > 0 and onnx["max_abs_difference"] < 1e-4
    assert "| tiny_hybrid_swin | 64 | onnxruntime_cpu |" in benchmarks_md(payload, "benchmarks/results/x.json")


@pytest.mark.slow
def test_gpu_compile_runs_without_ray_or_pydantic_at_toy_size(tmp_path):
    """The GPU machine has neither: the script must not import them (the model code's config classes included), and
    the sections it reads from the configs with PyYAML alone must be those that the pydantic sections read."""
    script = WITHOUT_RAY_OR_PYDANTIC + """
import dataclasses, json
cases = {config: dataclasses.asdict(benchmark.read_case(config))
         for config in [*benchmark.CASES.values(), *benchmark.TINY_CASES.values()]}
print(json.dumps(cases))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, "gpu_compile", "--tiny", "--device", "cpu", "--backend", "aot_eager",
         "--steps", "3", "--warmup", "1", "--classes", "10", "--batch-size", "2", "--results", "toy_compile",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload, section = written(tmp_path, "toy_compile")
    assert set(payload["ratios"]["compiled_vs_eager"]) == {"tiny_dolg", "tiny_hybrid_swin"}
    for model in payload["models"].values():
        assert model["loss_agreement"]["ok"] and len(model["runs"]["compiled_model"]["losses"]) == 3
    assert "| tiny_dolg | 64 | 2 | compiled_model |" in section

    from ray_landmark.config import load_config

    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(cases) == 4
    for config, case in cases.items():
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


@pytest.mark.slow
def test_model_cost_runs_at_toy_size_without_ray_or_pydantic(tmp_path):
    """Each case runs in a fresh process of its own (its peak memory is its own), which imports the package anew: the
    cases run here too, in the process that has Ray and pydantic blocked."""
    script = WITHOUT_RAY_OR_PYDANTIC + """
import json
case = dict(recipe="tiny_dolg", timm="test_efficientnet", size=32, classes=10, batch=2, steps=1, device="cpu",
            channels_last=True, compile=False)
print(json.dumps({kind: benchmark.measure({**case, "kind": kind}) for kind in ("backbone", "encoder", "model")}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script, "model_cost", "--tiny", "--size", "32", "--classes", "10", "--batch", "2",
         "--steps", "1", "--compile-configs", "", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    in_process = json.loads(proc.stdout.strip().splitlines()[-1])
    assert in_process["model"]["params_m"] > in_process["encoder"]["params_m"] > in_process["backbone"]["params_m"]
    payload, section = written(tmp_path, "model_cost")
    assert [(row["family"], row["layout"]) for row in payload["families"]] == [("tiny DOLG", "NCHW"),
                                                                               ("tiny DOLG", "channels_last")]
    for row in payload["families"]:
        assert all("error" not in row[kind] and row[kind]["step_ms"] > 0 for kind in ("backbone", "encoder", "model"))
    assert "| tiny DOLG | cpu | channels_last |" in section and "torch.compile" not in section


# ---------------------------------------------------------------- the CPU benchmarks


@pytest.mark.slow
def test_search_benchmark_runs_at_toy_size(tmp_path):
    run_benchmark("search", "--queries", "32", "--sizes", "500,1500", "--dim", "16", "--k", "5", "--repeats", "1",
                  "--sweep-mib", "1", "--no-gpu", "--out", str(tmp_path))
    payload, section = written(tmp_path, "search")
    assert payload["ratios"]["search_vs_gemm"] > 0 and len(payload["runs"]) == 4
    assert "| cpu | faiss | 1,500 |" in section and "`search_vs_gemm`" in section


@pytest.mark.slow
def test_the_adjusted_search_benchmark_runs_at_toy_size(tmp_path):
    run_benchmark("search", "--adjusted", "--toy-merge", "--queries", "64", "--sizes", "2000", "--dim", "16",
                  "--repeats", "1", "--out", str(tmp_path))
    payload, section = written(tmp_path, "search_adjusted")
    assert payload["command"].startswith("python -m benchmarks.search --adjusted")
    assert payload["exact_vs_replaced"] > 0 and "| exact adjusted top 3 |" in section


@pytest.mark.slow
def test_the_label_rerank_search_benchmark_runs_at_toy_size(tmp_path):
    # 0.005 of GLDv2's index: 3,809 images, fewer than twice the pool, so a query's wider search is the whole index.
    run_benchmark("search", "--label-rerank", "--queries", "64", "--index-fraction", "0.005", "--dim", "16",
                  "--repeats", "1", "--out", str(tmp_path))
    payload, section = written(tmp_path, "search_label_rerank")
    assert payload["setup"]["index"] == 3809 and payload["setup"]["labels"] == 407
    assert all(w["k"] == 3809 for w in payload["wider_searches"]) and payload["exact_vs_plain_total"] > 0
    assert "| exact label re-rank |" in section and "x 761,757 / 3,809 index images" in section


# The CPU benchmarks that start a local Ray, at toy size: --jpeg 160x120 where they write a synthetic set (drawing
# 640x480 JPEGs took 10 CPU-seconds per 160 images, most of such a run's set-up; at 32 px out the decode still shrinks
# them in draft mode, as it does GLDv2's).
TOY_RUNS = {
    "train_step": ["--epochs", "2", "--image-size", "32", "--batch-size", "8", "--landmarks", "2"],
    "embed": ["--landmarks", "3", "--image-size", "32", "--batch-size", "16", "--jpeg", "160x120"],
    # Both backends, two rounds, then 6 s of the load test with its bad requests (RSS too short to be judged).
    "serve": ["--image-size", "32", "--requests", "4", "--min-rounds", "2", "--max-rounds", "2", "--batch", "4",
              "--replica-cpus", "1", "--jpeg", "160x120", "--load-minutes", "0.1", "--load-bucket-s", "2",
              "--bad-every", "4", "--rss-sample-s", "0.5", "--load-workers", "8"],
    # Last: it shuts Ray down at its end. Three rounds: the warm-up, then the two passes of each path it compares; the
    # recorded run's ratios beside its own (read only).
    "data_pipeline": ["--images", "96", "--size", "32", "--jpeg", "160x120", "--shards", "2", "--min-rounds", "3",
                      "--max-rounds", "3", "--processes", "1", "--gaps", "0,65536", "--previous",
                      "benchmarks/results/data_pipeline.json"],
}
# The selected ones run one after another in one process, on one Ray (each joins the Ray that the process started, as
# runtime.init_ray does): a process of their own each paid the interpreter's imports, a Ray start and new Ray worker
# processes importing torch again. A run that raises leaves its traceback in error.txt and the others go on.
SHARED_RAY = """
import importlib, json, sys, traceback
from pathlib import Path
from ray_landmark.local_s3 import use_test_credentials
use_test_credentials()  # before the first run starts Ray: its workers inherit them, as a run of its own would
for name, (out, args) in json.loads(sys.argv[1]).items():
    sys.argv = [name, *args, "--out", out]
    try:
        importlib.import_module("benchmarks." + name).main()
    except BaseException:
        Path(out, "error.txt").write_text(traceback.format_exc())
"""


@pytest.fixture(scope="module")
def toy_runs(request, tmp_path_factory) -> dict[str, Path]:
    """name -> the --out folder of each toy run that a selected test of this module checks, all run in one process."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    outs = {name: tmp_path_factory.mktemp(name) for name in TOY_RUNS
            if f"test_{name}_benchmark_runs_at_toy_size" in selected}
    runs = {name: (str(out), TOY_RUNS[name]) for name, out in outs.items()}
    proc = subprocess.run([sys.executable, "-c", SHARED_RAY, json.dumps(runs)], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    for out in outs.values():
        (out / "stderr.txt").write_text(f"exit status {proc.returncode}\n{proc.stderr[-3000:]}")
    return outs


def toy_run(toy_runs: dict[str, Path], name: str) -> tuple[dict, str]:
    """The results file and BENCHMARKS.md section of the toy run ``name``, once it is known to have ended well."""
    out = toy_runs[name]
    assert not (out / "error.txt").exists(), (out / "error.txt").read_text()[-3000:]
    assert (out / "BENCHMARKS.md").exists(), (out / "stderr.txt").read_text()
    return written(out, name)


@pytest.mark.slow
def test_embed_benchmark_runs_at_toy_size(toy_runs):
    payload, section = toy_run(toy_runs, "embed")
    results = payload["results"]
    assert results["plain"]["images"] == results["ray_cold"]["images"] == results["ray_warm"]["images"] > 0
    assert "| (2) the same, warm |" in section and "synthetic 160×120 JPEGs" in section


@pytest.mark.slow
def test_train_step_benchmark_runs_at_toy_size(toy_runs):
    payload, section = toy_run(toy_runs, "train_step")
    assert all(len(rates) == 2 for rates in payload["images_per_second_per_epoch"].values())
    assert "| (3) Ray Train loop, fed from S3 by the data layer |" in section


@pytest.mark.slow
def test_data_pipeline_benchmark_runs_at_toy_size(toy_runs):
    payload, section = toy_run(toy_runs, "data_pipeline")
    from benchmarks.data_pipeline import PATHS

    assert set(payload["every_pass_images_per_second"]) == set(PATHS) == set(payload["path_spreads"])
    assert all(len(passes) == 3 for passes in payload["every_pass_images_per_second"].values())
    assert payload["setup"]["rounds"] == len(payload["setup"]["load_average_after_each_round"]) == 3
    assert set(payload["unsettled_paths"]) <= set(PATHS) and all(s >= 0 for s in payload["path_spreads"].values())
    ratios, spreads = payload["ratios"], payload["ratio_spreads"]
    # A comparison of two paths: the median of its ratios in the two rounds after the warm-up, with their range.
    every = payload["every_pass_images_per_second"]
    per_round = [round(a / b, 3) for a, b in zip(every["ray_s3_ranged"][1:], every["dataloader_tars_s3"][1:])]
    assert payload["round_ratios"]["ranged_vs_dataloader_same_source_s3"] == per_round
    assert ratios["ranged_vs_dataloader_same_source_s3"] == round(sum(per_round) / 2, 3)
    assert spreads["ranged_vs_dataloader_same_source_s3"] == round(max(per_round) / min(per_round) - 1, 3)
    assert set(spreads) <= set(ratios) and spreads["stream_s3_vs_ceiling"] == payload["path_spreads"]["ray_s3"]
    assert f"= {ratios['stream_vs_dataloader_same_source_s3']} (spread " in section
    assert ("**Not settled**" in section) == bool(payload["unsettled_paths"])
    assert set(payload["range_gap_bytes_gldv2c"]) == {"0", "65536"}
    assert payload["bytes_read"]["full_streamed"]["images"] == payload["setup"]["images"]
    assert "| (c) Ray Data streaming the tars, S3 server |" in section and "| 1 process |" in section
    assert payload["setup"]["source"].startswith("160x120 JPEG")
    recorded = json.loads((REPO / "benchmarks" / "results" / "data_pipeline.json").read_text())
    assert payload["previous_run"]["ratios"] == recorded["ratios"]
    assert "| ratio | this run | the run before |" in section
    # Every process's CPU counts from its own two readings: no group of any path is negative.
    assert all(v >= 0 for busy in payload["cores_busy"].values() for group, v in busy.items()
               if not group.startswith("other"))


@pytest.mark.slow
def test_serve_benchmark_runs_at_toy_size(toy_runs):
    payload, section = toy_run(toy_runs, "serve")
    assert set(payload["results"]) == {"torch", "onnxruntime"}
    for backend in payload["results"].values():
        assert set(backend["paths"]) == {"plain_batch_1", "plain_batch_4", "serve_1", "serve_8", "serve_32"}
        assert all(len(passes) == 2 for passes in backend["every_pass"].values())
        assert all(p["images"] == 4 for p in backend["every_pass"]["plain_batch_4"])
        assert set(backend["serve_vs_plain"]) == {"1", "8", "32"} and "overhead_ms_at_concurrency_1" in backend
        # The CPU each process spent per image: the replica, the HTTP proxy and the clients were all found.
        assert all(backend["paths"][f"serve_{c}"]["cpu_ms_per_request"][process] > 0 for c in (1, 8, 32)
                   for process in ("replicas", "proxy", "clients"))
        assert backend["paths"]["plain_batch_1"]["cpu_ms_per_image"] > 0
    assert payload["ratios"]["onnxruntime_vs_torch_plain"] > 0 and len(payload["load_average"]["after_each_round"]) == 4
    assert "| onnxruntime | serve, concurrency 32 |" in section and "| torch | plain, batch 1 |" in section

    # The load test after it, on the onnxruntime service: no error, every bad request answered with its 4xx, each
    # replica's memory sampled, and the plot drawn.
    load, load_section = written(toy_runs["serve"], "serve_load")
    assert load["setup"]["backend"] == "onnxruntime" and load["errors"] == 0 and load["requests"] > 0
    bad = sum(b["bad"] for b in load["buckets"])
    assert bad > 0 and sum(b["bad_answered_as_promised"] for b in load["buckets"]) == bad
    assert len(load["rss_flat"]) == 1 and all(b["rss_mib"] for b in load["buckets"])
    assert (toy_runs["serve"] / load["plot"]).is_file() and "| bad answered as promised |" in load_section
