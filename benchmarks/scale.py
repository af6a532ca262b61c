"""The scale rehearsal (issue 27): the real jobs, unchanged, on GLDv2 at fractions f of its counts
(jobs/make_synthetic_gldv2.py --fraction f), each stage measured as a process tree, then each stage's growth law.

Per fraction, each stage runs as a process of its own, which starts a local Ray of its own (RAY_ADDRESS unset), so
that the process tree under it is the job and every Ray process it needs:

    prepare              python jobs/prepare_gldv2.py --root D --verify-shards
    stream               python -m benchmarks.scale --stream-epoch D: ray_landmark.quickstart.stream_epoch, the
                         quickstart's data-only epoch (one epoch of GLDv2c's train stream read by Ray Data and
                         consumed without a model, then one pass over the test images)
    train                python jobs/train.py --config configs/tiny_dolg.yaml, one epoch on GLDv2c on the CPU, the
                         untrained model validated first over the complete eval set (data.eval_queries/eval_index
                         unset): the job's "the first validation took X s" is recorded as the validation's seconds
                         (only at f <= --train-up-to)
    embed_<family>       python jobs/embed.py on the test, index and GLDv2c gallery images, one per tiny model of
                         --families (configs/tiny_{dolg,efficientnet,hybrid_swin}.yaml, all three by default; random
                         weights, or the trained DOLG)
    ensemble             python jobs/ensemble.py: reuses those embeddings; kNN, post-processing, metrics,
                         submissions and the report (only at f <= --ensemble-up-to: its exact kNN passes grow as
                         queries x gallery, 629 s at f = 0.03 on 2 cores)

A stage left out at a fraction (train above --train-up-to, ensemble above --ensemble-up-to, an embed family left out
of a fraction added with --add-to) is extrapolated there from the largest fraction that measured it, by the
exponents b of wall and CPU seconds ~ rows^b between the two largest (``extrapolate``), and marked ``extrapolated``
with the fractions it came from; extrapolated and reused figures never enter a law.

Measured per stage by sampling /proc every --interval seconds: wall seconds; CPU seconds of the tree (the larger of
wait4's, which counts every descendant its parent reaped, and the sum of the last sample of each process seen); the
peak RSS (VmHWM) of the driver and of the largest Ray worker ("ray::" processes; a worker's RSS counts the object
store's pages it has mapped); the object store's peaks: the blocks of the raylet's plasma file in /dev/shm (pages
ever written, a high-water mark that freed and fragmented pages keep up) and the bytes in use (the raylet's own
figure, from its debug_state.txt, rewritten every 10 s: none for a stage shorter than that); bytes the tree read
(rchar: read() calls on files, pipes and sockets; read_bytes: from block devices, 0 from the page cache).
Then, per stage over the fractions, the exponent b of time (and memory) ~ rows^b by least squares on the logs.

    python -m benchmarks.scale [--fractions 0.01,0.03,0.1] [--train-up-to 0.03] [--ensemble-up-to 0.03] \
        [--families dolg,...] [--work DIR] [--out DIR]
    python -m benchmarks.scale --add-to benchmarks/results/scale.json --fractions 1 --families dolg   # GLDv2's size
    python -m benchmarks.scale --add-to benchmarks/results/scale.json --fractions 1 --measure-embeddings \
        --families efficientnet,hybrid_swin       # families extrapolated at f = 1, measured there
    python -m benchmarks.scale --add-to benchmarks/results/scale.json --fractions 0.01,0.03 --measure-ensemble
    python -m benchmarks.scale --add-to benchmarks/results/scale.json --fractions 0.01,0.03,0.1,1 --measure-stream
                                                  # one stage measured again where it was measured, the old kept
    python -m benchmarks.scale --refit benchmarks/results/scale.json     # the laws and extrapolations alone, again
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.results_io import REPO, add_out_option, machine, publish, results_path
from ray_landmark.markdown import markdown_table

NAME = "scale"
FAMILIES = {"dolg": "configs/tiny_dolg.yaml", "efficientnet": "configs/tiny_efficientnet.yaml",
            "hybrid_swin": "configs/tiny_hybrid_swin.yaml"}
EMBED_BATCH = 64
RAY_DID_NOT_START = "a local Ray did not start"  # runtime.init_ray's line
TICK = os.sysconf("SC_CLK_TCK")
MIB = 2**20


# ---------------------------------------------------------------- measuring a process tree through /proc


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:  # the process ended, or is not ours
        return None


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _read(f"/proc/{entry}/stat")):
            fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
            parents[int(entry)] = int(fields[1])
    return parents


def _plasma_bytes(pid: int) -> int:
    """Bytes allocated to the plasma (object store) file that the raylet ``pid`` holds open: pages ever written."""
    allocated = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if "plasma" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                allocated = max(allocated, os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512)
        except OSError:
            continue
    return allocated


def object_store_in_use(raylet_cmdline: str) -> int | None:
    """Bytes of the object store in use, as the raylet last wrote them to its session's debug_state.txt (the node's
    object_store_memory resource, total less available; Ray rewrites the file every 10 s): None before it has."""
    log_dir = re.search(r"--log_dir=(\S+)", raylet_cmdline)
    state = _read(os.path.join(log_dir.group(1), "debug_state.txt")) if log_dir else None
    total, available = (state and re.search(rf'"{key}": ?\{{[^}}]*?object_store_memory: \[(\d+)\]', state)
                        for key in ("total", "available"))
    # Ray counts resources in 1/10,000 units; the resources of a line come in any order.
    return (int(total.group(1)) - int(available.group(1))) // 10_000 if total and available else None


class TreeMeter:
    """The last sample of every process ever seen under ``root``: CPU seconds, peak RSS, bytes read, its role; and
    the object store's peaks (pages ever written, and bytes in use)."""

    def __init__(self, root: int):
        self.root, self.seen, self.object_store_peak, self.object_store_in_use_peak = root, {}, 0, None

    def sample(self) -> None:
        parents = _parents()
        tree, frontier = {self.root}, [self.root]
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                tree.add(child)
                frontier.append(child)
        for pid in tree:
            self._sample_one(pid)

    def _sample_one(self, pid: int) -> None:
        stat, status, io = _read(f"/proc/{pid}/stat"), _read(f"/proc/{pid}/status"), _read(f"/proc/{pid}/io")
        cmdline = (_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ")
        if not stat or not status:
            return
        fields = stat[stat.rindex(")") + 2:].split()
        hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
        counters = dict(re.findall(r"(\w+): (\d+)", io or ""))
        record = self.seen.setdefault(pid, {"worker": False})
        # A Ray worker renames itself (ray::IDLE, ray::<task>) once started: a later sample sees what it became.
        record["worker"] = record["worker"] or cmdline.startswith("ray::") or "default_worker.py" in cmdline
        record.update(cpu_s=(int(fields[11]) + int(fields[12])) / TICK,
                      hwm=max(record.get("hwm", 0), int(hwm.group(1)) * 1024 if hwm else 0),
                      rchar=int(counters.get("rchar", 0)), read_bytes=int(counters.get("read_bytes", 0)))
        if "raylet" in cmdline.split(" ")[0]:
            self.object_store_peak = max(self.object_store_peak, _plasma_bytes(pid))
            in_use = object_store_in_use(cmdline)
            if in_use is not None:
                self.object_store_in_use_peak = max(self.object_store_in_use_peak or 0, in_use)

    def totals(self, rusage_cpu_s: float) -> dict:
        workers = [r["hwm"] for r in self.seen.values() if r["worker"]]
        return {
            "cpu_s": round(max(rusage_cpu_s, sum(r["cpu_s"] for r in self.seen.values())), 1),
            "driver_peak_rss_mib": round(self.seen.get(self.root, {}).get("hwm", 0) / MIB, 1),
            "largest_worker_peak_rss_mib": round(max(workers) / MIB, 1) if workers else None,
            "object_store_peak_mib": round(self.object_store_peak / MIB, 1),
            "object_store_in_use_peak_mib": (round(self.object_store_in_use_peak / MIB, 1)
                                             if self.object_store_in_use_peak is not None else None),
            "rchar_mib": round(sum(r["rchar"] for r in self.seen.values()) / MIB, 1),
            "storage_read_mib": round(sum(r["read_bytes"] for r in self.seen.values()) / MIB, 1),
            "processes": len(self.seen),
        }


def run_stage(command: list[str], log: Path, interval: float, retries: int = 1) -> dict:
    """Run ``command`` from the repository's root with a local Ray of its own; its tree's measures. A failure raises,
    naming its log."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # Ray workers too
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        meter = TreeMeter(proc.pid)
        while True:
            meter.sample()
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(interval)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode and RAY_DID_NOT_START in log.read_text() and retries:
        # Ray waits a fixed 30 s for its raylet: on a loaded machine the start can fail; the job is run again.
        print(f"[scale] {log.stem}: its local Ray did not start; run again", flush=True)
        return {**run_stage(command, log, interval, retries - 1), "ray_start_retries": 1}
    if proc.returncode:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(command[:3])} failed (exit {proc.returncode}); its log: {log}\n{tail}")
    return {"wall_s": round(wall, 1), **meter.totals(rusage.ru_utime + rusage.ru_stime)}


# ---------------------------------------------------------------- the stages at one fraction


def stream_epoch_main(root: str) -> None:
    """``--stream-epoch ROOT``: the stream stage's process (the quickstart's data-only epoch on the set at ROOT)."""
    from ray_landmark.config import load_config
    from ray_landmark.quickstart import stream_epoch
    from ray_landmark.runtime import init_ray

    cfg = load_config(REPO / FAMILIES["dolg"], [f"data.root={root}"])
    init_ray()
    print(json.dumps(stream_epoch(cfg, cfg.train.batch_size)))


def write_set(fraction: float, root: Path, log: Path, interval: float) -> dict:
    """The synthetic set (reused when complete); its counts and the writer's measures, ``reused`` where the set was
    complete before (then they measure the check, not the writing, and stay out of the growth law)."""
    marker = root / "synthetic_scale.json"
    reused = marker.is_file() and json.loads(marker.read_text()).get("complete", False)
    measured = run_stage([sys.executable, "jobs/make_synthetic_gldv2.py", "--out", str(root), "--fraction",
                          str(fraction), "--no-manifest"], log, interval)
    written = json.loads(marker.read_text())
    return {**measured, "counts": written["summary"]["counts"], "bytes": written["summary"]["bytes"], "reused": reused}


def ensemble_config(work: Path, checkpoints: dict[str, str]) -> Path:
    """The ensemble of one model of each family, with the embed settings the embed stages use."""
    import yaml

    config = {"name": "ensemble", "output_dir": str(work),
              "models": [{"name": family, "checkpoint": checkpoint, "family": family}
                         for family, checkpoint in checkpoints.items()],
              "embed": {"batch_size": EMBED_BATCH}, "report": {"queries": 16, "results": 8}}
    path = work / "ensemble.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def checkpoints_of(work: Path, root: Path, trained: bool, families: list[str]) -> dict[str, str]:
    """A checkpoint of each of ``families`` on the set at ``root``: the trained DOLG run when there is one, else
    random weights (the embedding's cost does not depend on them)."""
    from benchmarks.embed import make_checkpoint

    checkpoints = {}
    for family in families:
        config = FAMILIES[family]
        if family == "dolg" and trained:
            checkpoints[family] = str(work / "runs" / "tiny_dolg")
            continue
        folder = work / "checkpoints" / family
        if not folder.exists():
            make_checkpoint(folder, 64, f"data.root={root}", config=REPO / config)
        checkpoints[family] = str(folder)
    return checkpoints


def stage_commands(root: Path, work: Path, train: bool) -> dict[str, list[str]]:
    """The stages that need no checkpoint, in order."""
    python = sys.executable
    commands = {"prepare": [python, "jobs/prepare_gldv2.py", "--root", str(root), "--verify-shards"],
                "stream": [python, "-m", "benchmarks.scale", "--stream-epoch", str(root)]}
    if train:
        commands["train"] = [python, "jobs/train.py", "--config", FAMILIES["dolg"], "--set", f"data.root={root}",
                             "--set", f"run.output_dir={work / 'runs'}", "--set", "train.epochs=1"]
    return commands


def embed_command(work: Path, family: str, checkpoint: str) -> list[str]:
    """The embed stage of one family: the test, index and GLDv2c gallery images."""
    return [sys.executable, "jobs/embed.py", "--checkpoint", checkpoint, "--split", "test", "--split", "index",
            "--split", "train", "--view", "gldv2c", "--batch-size", str(EMBED_BATCH),
            "--out", str(work / "ensemble" / "embeddings" / family)]


def recorded_set(work: Path, option: str) -> tuple[Path, dict]:
    """The complete, prepared set in a recorded run's ``work`` and its counts; refused in one line naming ``option``
    where there is none: writing and preparing it is the recorded run's part."""
    from ray_landmark.data.metadata import SUMMARY_FILE

    root = work / "gldv2"
    marker = root / "synthetic_scale.json"
    written = json.loads(marker.read_text()) if marker.is_file() else {}
    if not written.get("complete") or not (root / "manifest" / SUMMARY_FILE).is_file():
        raise SystemExit(f"{option}: no complete, prepared set at {root}; give the --work of the recorded run")
    return root, written["summary"]["counts"]


def stage_rows(counts: dict, families: list[str] | tuple[str, ...]) -> dict[str, int]:
    """The rows each stage takes from a set of these counts, an embed stage per family of ``families``: each embeds,
    and the ensemble takes, the test, index and GLDv2c gallery images."""
    embedded = counts["test_images"] + counts["index_images"] + counts["clean_images"]
    return {"prepare": counts["train_images"] + counts["index_images"] + counts["test_images"],
            "stream": counts["clean_images"] + counts["test_images"], "train": counts["clean_images"],
            **{f"embed_{family}": embedded for family in families}, "ensemble": embedded}


def check_rows(option: str, root: Path, rows: int, recorded: list[int]) -> None:
    """Refuse a set whose rows for the stage are not the recorded run's, before any stage runs."""
    other = set(recorded) - {rows}
    if other:
        raise SystemExit(f"{option}: the set at {root} has {rows:,} images for the stage, the recorded run "
                         f"{other.pop():,}; give its --work")


def with_before(stage: dict, recorded: dict) -> dict:
    """A stage measured again, with the wall and CPU seconds it replaces under ``before``."""
    return {**stage, "before": {key: recorded[key] for key in ("wall_s", "cpu_s")}}


# Each plan_* (PLANS) checks the recorded run's inputs at one fraction, refusing in one line what is missing, and
# returns what measures the stage(s) there: main checks every fraction before it measures any. ``families`` is the
# embeddings' alone: the stream takes none, the ensemble those of its config.

def plan_stream(fraction: float, work: Path, interval: float, families: list[str],
                recorded: dict) -> Callable[[], dict]:
    """``--measure-stream``: the stream stage alone, on the recorded run's set in ``work``: {"stream": its measures
    with its rows and ``before``}."""
    root, counts = recorded_set(work, "--measure-stream")
    rows = stage_rows(counts, families)["stream"]
    check_rows("--measure-stream", root, rows, [recorded["stream"]["rows"]])
    command = stage_commands(root, work, train=False)["stream"]

    def measure() -> dict:
        print(f"[scale] f={fraction}: stream", flush=True)
        stage = {**run_stage(command, work / "logs" / "stream.log", interval), "rows": rows}
        return {"stream": with_before(stage, recorded["stream"])}
    return measure


def plan_embeddings(fraction: float, work: Path, interval: float, families: list[str],
                    recorded: dict) -> Callable[[], dict]:
    """``--measure-embeddings``: the embed stages of ``families`` alone, on the complete, prepared set in ``work``, with
    new random-weight checkpoints: {stage: measures with its rows}. The recorded run's other stages, their logs and
    outputs are left as they are."""
    root, counts = recorded_set(work, "--measure-embeddings")
    rows = stage_rows(counts, families)["ensemble"]
    check_rows("--measure-embeddings", root, rows, [recorded[f"embed_{family}"]["rows"] for family in families])

    def measure() -> dict:
        stages = {}
        for family in families:
            stage = f"embed_{family}"
            shutil.rmtree(work / "checkpoints" / family, ignore_errors=True)
            shutil.rmtree(work / "ensemble" / "embeddings" / family, ignore_errors=True)
            checkpoint = checkpoints_of(work, root, False, [family])[family]
            print(f"[scale] f={fraction}: {stage}", flush=True)
            stages[stage] = {**run_stage(embed_command(work, family, checkpoint), work / "logs" / f"{stage}.log",
                                         interval), "rows": rows}
        return stages
    return measure


def plan_ensemble(fraction: float, work: Path, interval: float, families: list[str],
                  recorded: dict) -> Callable[[], dict]:
    """``--measure-ensemble``: the ensemble stage alone, on the recorded run's set, config and embeddings in ``work``,
    which it must reuse (a job that embedded anything fails: its figures would not be the ensemble's), with the
    models the recorded ensembles took: {"ensemble": its measures with its rows and ``before``}."""
    import yaml

    root, counts = recorded_set(work, "--measure-ensemble")
    rows = stage_rows(counts, families)["ensemble"]
    check_rows("--measure-ensemble", root, rows, [recorded["ensemble"]["rows"]])
    config = work / "ensemble.yaml"
    if not config.is_file():
        raise SystemExit(f"--measure-ensemble: no {config}; give the --work of the recorded run")
    models = [m["name"] for m in yaml.safe_load(config.read_text())["models"]]
    embedded = sorted(stage.removeprefix("embed_") for stage, figures in recorded.items()
                      if stage.startswith("embed_") and measured(figures))
    if sorted(models) != embedded:
        raise SystemExit(f"--measure-ensemble: {config} ensembles {', '.join(models)}, but the recorded run at "
                         f"f = {fraction} embedded {', '.join(embedded) or 'none'}: not the recorded ensemble")
    missing = [m for m in models if not (work / "ensemble" / "embeddings" / m).is_dir()]
    if missing:
        raise SystemExit(f"--measure-ensemble: the embeddings of {', '.join(missing)} missing in {work}; give the "
                         f"--work of the recorded run, whose embed stages made them")

    def measure() -> dict:
        print(f"[scale] f={fraction}: ensemble", flush=True)
        log = work / "logs" / "ensemble.log"
        command = [sys.executable, "jobs/ensemble.py", "--config", str(config)]
        stage = {**run_stage(command, log, interval), "rows": rows}
        reused = log.read_text().count("was embedded earlier with ")
        if reused != len(models):
            raise SystemExit(f"--measure-ensemble: the ensemble job at f = {fraction} reused the embeddings of "
                             f"{reused} of {len(models)} models and embedded the others, so its figures are not the "
                             f"ensemble's alone; see {log}")
        return {"ensemble": with_before(stage, recorded["ensemble"])}
    return measure


PLANS = {"embeddings": plan_embeddings, "ensemble": plan_ensemble, "stream": plan_stream}


def run_fraction(fraction: float, work: Path, train: bool, ensemble: bool, interval: float,
                 families: list[str], left_out_families: tuple[str, ...] = ()) -> dict:
    """Every stage at one fraction (train and ensemble where asked), embedding with a tiny model of each of
    ``families``: {stage: measures with its rows}; a stage left out (``left_out_families``' embeddings among them)
    gets its rows alone, to be extrapolated."""
    root, logs = work / "gldv2", work / "logs"
    for earlier in ("runs", "checkpoints", "ensemble", "logs"):  # a rerun measures the jobs anew, not their reuse
        shutil.rmtree(work / earlier, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    written = write_set(fraction, root, logs / "write_set.log", interval)
    rows = stage_rows(written["counts"], (*families, *left_out_families))
    stages = {}

    def measure(stage: str, command: list[str]) -> None:  # each stage's measures kept as it ends (stages.json)
        print(f"[scale] f={fraction}: {stage}", flush=True)
        stages[stage] = {**run_stage(command, logs / f"{stage}.log", interval), "rows": rows[stage]}
        (work / "stages.json").write_text(json.dumps(stages, indent=1))

    stages["write_set"] = {**written, "rows": rows["prepare"]}
    for stage, command in stage_commands(root, work, train).items():
        measure(stage, command)
    checkpoints = checkpoints_of(work, root, train, families)
    config = ensemble_config(work, checkpoints)
    for family, checkpoint in checkpoints.items():
        measure(f"embed_{family}", embed_command(work, family, checkpoint))
    if ensemble:
        measure("ensemble", [sys.executable, "jobs/ensemble.py", "--config", str(config)])
    left_out = ["train", *(f"embed_{family}" for family in left_out_families), "ensemble"]
    return {**stages, **{stage: {"rows": rows[stage]} for stage in left_out if stage not in stages}}


# ---------------------------------------------------------------- growth laws, the section and the plot

MEASURES = {"wall_s": "time", "cpu_s": "cpu", "driver_peak_rss_mib": "driver_memory",
            "largest_worker_peak_rss_mib": "worker_memory", "object_store_peak_mib": "object_store",
            "object_store_in_use_peak_mib": "object_store_in_use"}


def exponents(runs: dict[str, dict]) -> dict[str, dict]:
    """stage -> {measure: b of measure ~ rows^b}, by least squares on the logs over the fractions that ran it."""
    laws = {}
    stages = dict.fromkeys(stage for run in runs.values() for stage in run)
    for stage in stages:
        points = [run[stage] for run in runs.values() if stage in run and measured(run[stage])]
        if len(points) < 2:
            continue
        laws[stage] = {}
        for key, law in MEASURES.items():
            pairs = [(p["rows"], p[key]) for p in points if p.get(key)]
            if len(pairs) >= 2 and len({n for n, _ in pairs}) >= 2:
                x, y = np.log([n for n, _ in pairs]), np.log([v for _, v in pairs])
                laws[stage][law] = round(float(np.polyfit(x, y, 1)[0]), 3) + 0.0  # no -0.0
        # The exponents between the two largest fractions alone: a fixed cost (a Ray start, imports) weighs least
        # there, and a super-linear term most.
        for key, law in (("wall_s", "time_largest_two"), ("cpu_s", "cpu_largest_two")):
            (n0, t0), (n1, t1) = sorted((p["rows"], p[key]) for p in points)[-2:]
            if n1 > n0:
                laws[stage][law] = round(math.log(t1 / t0) / math.log(n1 / n0), 3)
    return laws


def recorded_runs(payload: dict, fractions: list[float], families: list[str], ensemble_up_to: float,
                  train_up_to: float, remeasure: str | None = None) -> tuple[dict[str, dict], tuple[str, ...]]:
    """``--add-to``: the recorded runs as they were measured (extrapolated stages back to their rows alone, to be
    extrapolated again from the laws refitted over every fraction), and the recorded embed families that
    ``families`` leaves out, to be extrapolated at the added fractions. Refuses in one line what would mix two
    setups: another machine, other limits, a fraction recorded already, or an ensemble of fewer families. To
    ``remeasure`` a stage (``embeddings``, ``ensemble``, ``stream``: ``--measure-<stage>``) each fraction must be
    recorded, with each of ``families``' embeddings extrapolated there for the embeddings."""
    here = machine()
    if (payload["machine"]["cpu"], payload["machine"]["cores"]) != (here["cpu"], here["cores"]):
        raise SystemExit(f"--add-to: recorded on {payload['machine']['cores']} cores of {payload['machine']['cpu']}, "
                         f"not this machine; run every fraction here instead")
    if (payload["train_up_to"], payload["ensemble_up_to"]) != (train_up_to, ensemble_up_to):
        raise SystemExit(f"--add-to: recorded with --train-up-to {payload['train_up_to']} --ensemble-up-to "
                         f"{payload['ensemble_up_to']}; pass the same")
    if remeasure:
        for f in fractions:
            run = payload["runs"].get(str(f), {})
            if not run:
                raise SystemExit(f"--measure-{remeasure}: f = {f} is not recorded; run it with --add-to alone")
            if remeasure == "embeddings":
                measured_there = [family for family in families
                                  if not run.get(f"embed_{family}", {}).get("extrapolated")]
                if measured_there:
                    raise SystemExit(f"--measure-embeddings: at f = {f} the embeddings of {', '.join(measured_there)} "
                                     f"were not extrapolated; name only extrapolated families in --families")
            elif remeasure == "ensemble" and f > ensemble_up_to:
                raise SystemExit(f"--measure-ensemble: f = {f} is above --ensemble-up-to {ensemble_up_to}, where the "
                                 f"ensemble is extrapolated by design")
            elif not measured(run.get(remeasure, {})):
                raise SystemExit(f"--measure-{remeasure}: the {remeasure} stage was not measured at f = {f}; "
                                 f"there is nothing to measure again")
        return as_measured(payload["runs"]), ()
    again = [f for f in fractions if str(f) in payload["runs"]]
    if again:
        raise SystemExit(f"--add-to: f = {', '.join(map(str, again))} recorded already; leave it out of --fractions")
    recorded = sorted({stage.removeprefix("embed_") for run in payload["runs"].values() for stage in run
                       if stage.startswith("embed_")})
    left_out = tuple(f for f in recorded if f not in families)
    if left_out and any(f <= ensemble_up_to for f in fractions):
        raise SystemExit(f"--add-to: the ensemble at f <= {ensemble_up_to} would leave out {', '.join(left_out)}, "
                         f"which the recorded ensembles took; pass --families {','.join(recorded)}")
    return as_measured(payload["runs"]), left_out


def as_measured(runs: dict[str, dict]) -> dict[str, dict]:
    """The runs with each extrapolated stage back to its rows alone, to be extrapolated again."""
    return {f: {stage: (figures if not figures.get("extrapolated") else {"rows": figures["rows"]})
                for stage, figures in run.items()} for f, run in runs.items()}


def measured(stage: dict) -> bool:
    """Whether a stage's figures were measured as the stage ran: not a reused set's check, not extrapolated."""
    return "wall_s" in stage and not stage.get("reused") and not stage.get("extrapolated")


def extrapolate(runs: dict[str, dict], laws: dict[str, dict]) -> None:
    """Give each stage left out at a fraction (rows alone) its wall and CPU seconds, in place, from the largest
    measured fraction by the exponents between the two largest (the least-squares law over every fraction weighs the
    small fractions' fixed costs: it put DOLG's embedding at f = 1 at 936 s from f <= 0.1, measured 1,936 s; the two
    largest, 1,570 s); one measured at fewer than two fractions is dropped there."""
    for stage, law in laws.items():
        if "time_largest_two" not in law or "cpu_largest_two" not in law:
            continue
        points = {f: run[stage] for f, run in runs.items() if stage in run and measured(run[stage])}
        anchor = points[max(points, key=float)]
        for run in runs.values():
            if stage in run and "wall_s" not in run[stage]:
                scale = run[stage]["rows"] / anchor["rows"]
                run[stage].update(
                    wall_s=round(anchor["wall_s"] * scale ** law["time_largest_two"], 1),
                    cpu_s=round(anchor["cpu_s"] * scale ** law["cpu_largest_two"], 1),
                    extrapolated={"from_fractions": sorted(points, key=float),
                                  "time_exponent": law["time_largest_two"], "cpu_exponent": law["cpu_largest_two"]})
    for run in runs.values():
        for stage in [stage for stage, figures in run.items() if "wall_s" not in figures]:
            del run[stage]


def plot(payload: dict, path: Path) -> bool:
    """Wall seconds against f per stage, log-log, as a PNG; False where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = payload["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage in dict.fromkeys(stage for run in runs.values() for stage in run):
        points = sorted((float(f), run[stage]["wall_s"]) for f, run in runs.items()
                        if stage in run and measured(run[stage]))
        if not points:
            continue
        ax.plot(*zip(*points), marker="o", label=stage)
    ax.set(xscale="log", yscale="log", xlabel="fraction f of GLDv2's counts", ylabel="wall seconds",
           title="Scale rehearsal: each stage's time against f")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _cell(value, unit: str = "") -> str | None:
    return None if value is None else f"{value:,}{unit}"


def commit() -> str | None:
    """The repository's commit: fractions added later may have run other code than the recorded ones."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return proc.stdout.strip() or None


def _added_text(added: dict) -> str:
    """A sentence on fractions added to the recorded ones (``--add-to``), on embeddings measured at a recorded one
    where they had been extrapolated (``--measure-embeddings``), or on a stage measured again there
    (``--measure-ensemble``, ``--measure-stream``)."""
    if added.get("embeddings_only"):
        return (f" At f = {', '.join(added['fractions'])} the embeddings of {', '.join(added['families'])}, "
                f"extrapolated before, were measured later, at commit {added['commit']} (`{added['command']}`).")
    again = next((key.removesuffix("_before") for key in added if key.endswith("_before")), None)
    if again:
        before = "; ".join(f"f = {f}: {wall} s" for f, wall in added[f"{again}_before"].items())
        return (f" The {again} stage at f = {', '.join(added['fractions'])} was measured again later, at commit "
                f"{added['commit']} (`{added['command']}`); before, it took {before}.")
    families = (f", embedding with {', '.join(added['families'])} alone ({', '.join(added['extrapolated_families'])} "
                f"extrapolated there)" if added["extrapolated_families"] else "")
    return (f" f = {', '.join(added['fractions'])} was added later, at commit {added['commit']} "
            f"(`{added['command']}`){families}.")


def benchmarks_md(payload: dict) -> str:
    """This benchmark's section of BENCHMARKS.md, from its results."""
    m, runs, laws = payload["machine"], payload["runs"], payload["exponents"]
    rows = [[stage + (" (set reused: its check only)" if s.get("reused") else "")
             + (" (extrapolated)" if s.get("extrapolated") else ""), f, _cell(s["rows"]), s["wall_s"], s["cpu_s"],
             s.get("driver_peak_rss_mib"), s.get("largest_worker_peak_rss_mib"), s.get("object_store_peak_mib"),
             s.get("object_store_in_use_peak_mib"), s.get("rchar_mib")]
            for f, run in runs.items() for stage, s in run.items()]
    table = markdown_table(["stage", "f", "rows", "wall s", "CPU s", "driver peak MiB", "largest worker MiB",
                            "object store pages written MiB", "object store in use, peak MiB", "read MiB (rchar)"],
                           rows)
    laws_shown = [*MEASURES.values(), "time_largest_two"]
    law_rows = [[stage, *(law.get(key) for key in laws_shown),
                 "super-linear" if stage != "ensemble" and max(law.get("time", 0), law.get("time_largest_two", 0))
                 > payload["limit"] else ""]
                for stage, law in laws.items()]
    law_table = markdown_table(["stage", *laws_shown, ""], law_rows) if law_rows else "(one fraction: no law)"
    plot_line = f"\n![time against f per stage]({payload['plot']})\n" if payload.get("plot") else ""
    added = "".join(_added_text(a) for a in payload.get("added", []))
    return f"""## Scale rehearsal (`python -m benchmarks.scale`)

The real jobs on GLDv2 at fractions f = {', '.join(runs)} of its counts (`jobs/make_synthetic_gldv2.py --fraction`,
32-64 px JPEGs), each stage a process with a local Ray of its own, its whole process tree sampled from /proc; on
{m['cores']} cores ({m['cpu']}). Tiny models (`configs/tiny_*.yaml`), CPU only; training at
f ≤ {payload['train_up_to']} (one epoch of GLDv2c with its validation over the complete eval set), the ensemble at
f ≤ {payload['ensemble_up_to']}; above those, their seconds are extrapolated from the largest measured fraction by
the exponents between the two largest (marked so; memory is not extrapolated). Every stage's time includes its Ray
start.{added}

{table}

Growth exponents b (measure ~ rows^b, least squares on the logs; time_largest_two: between the two largest
fractions alone, where fixed costs weigh least); above {payload['limit']} is super-linear (the ensemble's kNN is n·m
by nature):

{law_table}
{plot_line}
Raw numbers: `{results_path(NAME)}`.
"""


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", default="0.01,0.03,0.1", help="comma-separated fractions of GLDv2's counts")
    parser.add_argument("--train-up-to", type=float, default=0.03, help="train one epoch at fractions up to this")
    parser.add_argument("--ensemble-up-to", type=float, default=0.03,
                        help="run the ensemble at fractions up to this; above, it is extrapolated from its law")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ray_landmark_scale"),
                        help="the data sets and job outputs, one folder per fraction: a complete set is reused, the "
                             "jobs' outputs are deleted and made anew")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples of /proc")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated model families to embed and ensemble, of {', '.join(FAMILIES)}")
    parser.add_argument("--add-to", type=Path, metavar="RESULTS",
                        help="a recorded results file (benchmarks/results/scale.json): its fractions kept as measured, "
                             "those of --fractions run and added, the laws fitted again over all; an embed family "
                             "it holds that --families leaves out is extrapolated at the added fractions")
    parser.add_argument("--measure-embeddings", action="store_true",
                        help="with --add-to: at fractions it holds, run only the embeddings of --families, which it "
                             "extrapolated there, on the set in --work, and put them in place of the extrapolations")
    parser.add_argument("--measure-ensemble", action="store_true",
                        help="with --add-to: at fractions it holds, run only the ensemble again, on the set, config "
                             "and embeddings in --work, and put its figures in place of the recorded ones (kept under "
                             "before)")
    parser.add_argument("--measure-stream", action="store_true",
                        help="with --add-to: at fractions it holds, run only the stream stage again, on the set in "
                             "--work, and put its figures in place of the recorded ones (kept under before)")
    parser.add_argument("--refit", type=Path, metavar="RESULTS",
                        help="run no stage: fit the laws of a recorded results file again, and extrapolate the stages "
                             "it left out anew, with this version's method")
    parser.add_argument("--stream-epoch", metavar="ROOT", help=argparse.SUPPRESS)  # the stream stage's process
    add_out_option(parser)
    return parser


def main() -> None:
    parser = argument_parser()
    args = parser.parse_args()
    if args.stream_epoch:
        return stream_epoch_main(args.stream_epoch)
    if args.refit:
        recorded = json.loads(args.refit.read_text())
        return publish_fitted(recorded, as_measured(recorded["runs"]), args.out)
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        parser.error(f"--fractions {args.fractions}: expected comma-separated numbers, e.g. 0.01,0.03")
    if not all(0 < f <= 1 for f in fractions):
        parser.error(f"--fractions {args.fractions}: each is a fraction of GLDv2's counts, in (0, 1]")
    families = args.families.split(",")
    if not families or not set(families) <= set(FAMILIES):
        parser.error(f"--families {args.families}: expected comma-separated names of {', '.join(FAMILIES)}")
    command = "python -m benchmarks.scale " + " ".join(sys.argv[1:])
    payload = {"machine": machine(), "command": command, "train_up_to": args.train_up_to,
               "ensemble_up_to": args.ensemble_up_to, "limit": 1.15}
    runs, left_out = {}, ()
    remeasured = [name for name in PLANS if getattr(args, f"measure_{name}")]
    if len(remeasured) > 1:
        parser.error(f"{', '.join('--measure-' + name for name in remeasured)}: one at a time")
    remeasure = remeasured[0] if remeasured else None
    if remeasure and not args.add_to:
        parser.error(f"--measure-{remeasure}: give the recorded results with --add-to")
    if args.add_to:
        recorded = json.loads(args.add_to.read_text())
        runs, left_out = recorded_runs(recorded, fractions, families, args.ensemble_up_to, args.train_up_to,
                                       remeasure=remeasure)
        added = {"command": command, "commit": commit(), "fractions": [str(f) for f in fractions]}
        if args.measure_embeddings:
            added.update(families=families, embeddings_only=True)
        elif remeasure:
            added[f"{remeasure}_before"] = {str(f): recorded["runs"][str(f)][remeasure]["wall_s"] for f in fractions}
        else:
            added.update(families=families, extrapolated_families=list(left_out))
        payload.update(command=recorded["command"], added=[*recorded.get("added", []), added])
    if remeasure:  # every fraction's inputs checked before any stage runs
        plans = {f: PLANS[remeasure](f, args.work / f"f{f}", args.interval, families, runs[str(f)]) for f in fractions}
        for f, measure in plans.items():
            runs[str(f)].update(measure())
    else:
        for f in fractions:
            runs[str(f)] = run_fraction(f, args.work / f"f{f}", f <= args.train_up_to, f <= args.ensemble_up_to,
                                        args.interval, families, left_out)
    publish_fitted(payload, runs, args.out)


def publish_fitted(payload: dict, runs: dict[str, dict], out: Path) -> None:
    """Fit the laws over ``runs``, extrapolate the stages left out, draw the plot and publish the results and the
    section under ``out``."""
    runs = dict(sorted(runs.items(), key=lambda run: float(run[0])))
    laws = exponents(runs)
    extrapolate(runs, laws)
    payload.update(runs=runs, exponents=laws)
    payload["plot"] = results_path(NAME).replace(".json", ".png")
    if not plot(payload, out / payload["plot"]):
        payload["plot"] = None
    section = benchmarks_md(payload)
    print(section)
    publish(NAME, payload, section, out)


if __name__ == "__main__":
    main()
