"""``python -m benchmarks.scale`` at toy size, in a file of its own: pytest-xdist then runs it beside the other benchmark
toy runs (tests/test_benchmark_scripts.py), which it outlasts."""

import json
import math

import pytest

from test_benchmark_scripts import run_benchmark, written


@pytest.mark.slow  # every job of the pipeline in a process of its own, each with a local Ray of its own
def test_scale_benchmark_runs_end_to_end_at_a_tiny_fraction(tmp_path):
    """``python -m benchmarks.scale --fractions 0.0005``: GLDv2 at 1/2000 of its counts through every stage, one
    family embedded (each family's embedding is the same job with another config)."""
    run_benchmark("scale", "--fractions", "0.0005", "--families", "dolg", "--work", str(tmp_path / "work"), "--out",
                  str(tmp_path))
    payload, section = written(tmp_path, "scale")
    stages = payload["runs"]["0.0005"]
    assert list(stages) == ["write_set", "prepare", "stream", "train", "embed_dolg", "ensemble"]
    counts = stages["write_set"]["counts"]
    assert stages["write_set"]["reused"] is False
    assert stages["train"]["rows"] == counts["clean_images"] == 790
    assert stages["ensemble"]["rows"] == counts["test_images"] + counts["index_images"] + counts["clean_images"]
    for name, stage in stages.items():
        assert stage["cpu_s"] > 0 and stage["driver_peak_rss_mib"] > 0 and stage["processes"] >= 1, name
    # Every job past the writer starts a local Ray: its workers and object store were seen.
    assert all(stages[name]["largest_worker_peak_rss_mib"] for name in ("stream", "embed_dolg", "ensemble"))
    assert stages["stream"]["object_store_peak_mib"] > 0
    assert payload["exponents"] == {}  # one fraction: no growth law
    assert "| train | 0.0005 | 790 |" in section
    work = tmp_path / "work" / "f0.0005"
    assert (work / "ensemble" / "submission_recognition.csv").exists() and (work / "ensemble" / "report.html").exists()


def test_a_set_reused_from_an_earlier_run_stays_out_of_the_writers_growth_law():
    """A complete set is reused, and its stage then measures the check alone: it must not bend the writer's law."""
    from benchmarks.scale import exponents

    def written(rows, seconds, reused=False):
        return {"write_set": {"rows": rows, "wall_s": seconds, "cpu_s": seconds, "reused": reused}}

    laws = exponents({"0.01": written(100, 1.5, reused=True), "0.03": written(300, 9.0), "0.1": written(1000, 30.0)})
    law = laws["write_set"]
    assert law["time"] == law["time_largest_two"] == round(math.log(30 / 9) / math.log(10 / 3), 3)


def test_a_stage_left_out_at_a_fraction_is_extrapolated_there_from_the_two_largest_measured_and_said_so():
    """A stage left out (the ensemble above --ensemble-up-to) gets its seconds from the largest measured fraction by
    the exponent between the two largest, where a fixed cost weighs least (the least-squares law over all three is
    flatter here); a stage measured at one fraction has no law, so where it was left out it is left out."""
    from benchmarks.scale import exponents, extrapolate

    def stage(rows, seconds):
        return {"rows": rows, "wall_s": seconds, "cpu_s": seconds / 2}

    runs = {"0.01": {"ensemble": stage(100, 20.0), "train": stage(100, 5.0)},
            "0.03": {"ensemble": stage(300, 30.0), "train": {"rows": 300}},
            "0.1": {"ensemble": stage(1000, 100.0), "train": {"rows": 1000}},
            "1.0": {"ensemble": {"rows": 10000}, "train": {"rows": 10000}}}
    laws = exponents(runs)
    extrapolate(runs, laws)
    assert laws["ensemble"]["time_largest_two"] == laws["ensemble"]["cpu_largest_two"] == 1.0
    assert laws["ensemble"]["time"] < 1.0 and "train" not in laws
    assert runs["1.0"]["ensemble"] == {"rows": 10000, "wall_s": 1000.0, "cpu_s": 500.0, "extrapolated": {
        "from_fractions": ["0.01", "0.03", "0.1"], "time_exponent": 1.0, "cpu_exponent": 1.0}}
    assert list(runs["1.0"]) == ["ensemble"] and runs["0.01"]["train"] == stage(100, 5.0)
    assert exponents(runs) == laws  # an extrapolated figure never enters a law


def test_a_fraction_added_to_the_recorded_ones_keeps_them_as_measured_and_refuses_what_would_mix_two_setups():
    """``--add-to``: the recorded fractions stay as they were measured, their extrapolated stages go back to their rows
    (the laws are fitted again with the added fraction), an embed family the added run leaves out is extrapolated
    there; another machine, other limits, a fraction recorded already, or an ensemble of fewer families are refused."""
    from benchmarks.results_io import machine
    from benchmarks.scale import benchmarks_md, recorded_runs

    def stage(rows, seconds):
        return {"rows": rows, "wall_s": seconds, "cpu_s": seconds}

    extrapolated = {"rows": 1000, "wall_s": 9.0, "cpu_s": 9.0, "extrapolated": {"from_fractions": ["0.01", "0.03"]}}
    payload = {"machine": machine(), "command": "python -m benchmarks.scale", "train_up_to": 0.03,
               "ensemble_up_to": 0.03, "runs": {
                   "0.01": {"embed_dolg": stage(100, 1.0), "embed_efficientnet": stage(100, 1.0),
                            "train": stage(100, 2.0)},
                   "0.1": {"embed_dolg": stage(1000, 8.0), "embed_efficientnet": stage(1000, 8.5),
                           "train": extrapolated}}}
    runs, left_out = recorded_runs(payload, [1.0], ["dolg"], ensemble_up_to=0.03, train_up_to=0.03)
    assert left_out == ("efficientnet",)
    assert runs["0.1"]["train"] == {"rows": 1000} and runs["0.1"]["embed_dolg"] == stage(1000, 8.0)
    assert runs["0.01"] == payload["runs"]["0.01"]

    refusals = {"recorded with --train-up-to 0.03 --ensemble-up-to 0.03; pass the same": dict(train_up_to=0.1),
                "f = 0.1 recorded already": dict(fractions=[0.1, 1.0]),
                "the ensemble at f <= 0.03 would leave out efficientnet": dict(fractions=[0.02])}
    for message, changed in refusals.items():
        args = {"fractions": [1.0], "families": ["dolg"], "ensemble_up_to": 0.03, "train_up_to": 0.03, **changed}
        with pytest.raises(SystemExit, match=message):
            recorded_runs(payload, **args)
    with pytest.raises(SystemExit, match="not this machine"):
        recorded_runs({**payload, "machine": {**machine(), "cores": 999}}, [1.0], ["dolg"], 0.03, 0.03)

    added = {"command": "python -m benchmarks.scale --add-to x --fractions 1", "commit": "abc1234",
             "fractions": ["1.0"], "families": ["dolg"], "extrapolated_families": ["efficientnet"]}
    section = benchmarks_md({**payload, "exponents": {}, "limit": 1.15, "added": [added]})
    assert ("f = 1.0 was added later, at commit abc1234 (`python -m benchmarks.scale --add-to x --fractions 1`), "
            "embedding with dolg alone (efficientnet extrapolated there).") in " ".join(section.split())


def test_the_object_store_in_use_is_read_from_the_raylets_debug_state(tmp_path):
    """The raylet's own figure (its node's object_store_memory, total less available, in Ray's 1/10,000 units), from
    the debug_state.txt of the log folder its command line names; none before Ray has written one."""
    from benchmarks.scale import object_store_in_use

    (tmp_path / "debug_state.txt").write_text(
        'Local id: 1 Local resources: {"total":{memory: [17264778855], object_store_memory: [71206293500000], CPU: '
        '[40000]}, "available": {CPU: [0], object_store_memory: [63305414460000], memory: [1]}, "labels":{}}\n')
    raylet = f"/x/ray/core/src/ray/raylet/raylet --session_dir=/tmp/s --log_dir={tmp_path} --resource_dir=/tmp/r"
    assert object_store_in_use(raylet) == 7_120_629_350 - 6_330_541_446
    assert object_store_in_use(raylet.replace(str(tmp_path), str(tmp_path / "none"))) is None


def test_refit_extrapolates_a_recorded_file_anew_without_running_a_stage(tmp_path):
    """``--refit``: a recorded file's extrapolated figures go back to their rows and come again from this version's
    method; its measured figures are written as they were."""
    from benchmarks.results_io import machine

    def stage(rows, seconds):
        return {"rows": rows, "wall_s": seconds, "cpu_s": seconds}

    runs = {"0.01": {"embed_dolg": stage(100, 20.0)}, "0.03": {"embed_dolg": stage(300, 30.0)},
            "0.1": {"embed_dolg": stage(1000, 100.0)},
            "1.0": {"embed_dolg": {"rows": 10000, "wall_s": 1.0, "cpu_s": 1.0, "extrapolated": {"old": True}}}}
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({"machine": machine(), "command": "python -m benchmarks.scale", "train_up_to": 0.03,
                                    "ensemble_up_to": 0.03, "limit": 1.15, "runs": runs}))
    run_benchmark("scale", "--refit", str(recorded), "--out", str(tmp_path / "out"))
    payload, section = written(tmp_path / "out", "scale")
    assert payload["runs"]["0.1"]["embed_dolg"] == stage(1000, 100.0)
    assert payload["runs"]["1.0"]["embed_dolg"] == {"rows": 10000, "wall_s": 1000.0, "cpu_s": 1000.0, "extrapolated": {
        "from_fractions": ["0.01", "0.03", "0.1"], "time_exponent": 1.0, "cpu_exponent": 1.0}}
    assert "| embed_dolg (extrapolated) | 1.0 | 10,000 | 1000.0 |" in section


def test_embeddings_extrapolated_at_a_recorded_fraction_are_measured_there_alone_and_replace_the_extrapolation(
    tmp_path, monkeypatch
):
    """``--measure-embeddings``: at a recorded fraction, only the named families' embed stages run, on the recorded
    set, and their figures replace the extrapolated ones; the other stages stay as recorded (extrapolated ones come
    again from the refitted laws). No prepared set there, a family measured there already, or a fraction not recorded
    is refused."""
    import sys

    from benchmarks import scale
    from benchmarks.results_io import machine

    def stage(rows, seconds):
        return {"rows": rows, "wall_s": seconds, "cpu_s": seconds}

    extrapolated = {"rows": 10000, "wall_s": 9.0, "cpu_s": 9.0, "extrapolated": {"from_fractions": ["0.01", "0.1"]}}
    runs = {"0.01": {"embed_dolg": stage(100, 2.0), "embed_efficientnet": stage(100, 2.0)},
            "0.1": {"embed_dolg": stage(1000, 10.0), "embed_efficientnet": stage(1000, 10.0)},
            "1.0": {"embed_dolg": stage(10000, 50.0), "embed_efficientnet": extrapolated}}
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({"machine": machine(), "command": "python -m benchmarks.scale", "train_up_to": 0.03,
                                    "ensemble_up_to": 0.03, "limit": 1.15, "runs": runs}))
    commands = []
    root = tmp_path / "work" / "f1.0" / "gldv2"
    (root / "manifest").mkdir(parents=True)
    (root / "synthetic_scale.json").write_text(json.dumps({"complete": True, "summary": {"counts": {
        "train_images": 20000, "test_images": 1000, "index_images": 2000, "clean_images": 7000}}}))
    monkeypatch.setattr(scale, "checkpoints_of", lambda work, root, trained, families: {
        family: str(work / "checkpoints" / family) for family in families})
    monkeypatch.setattr(scale, "run_stage", lambda command, log, interval: commands.append(command) or {
        "wall_s": 80.0, "cpu_s": 70.0})

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["scale", "--add-to", str(recorded), "--fractions", "1",
                                          "--measure-embeddings", "--work", str(tmp_path / "work"), "--out",
                                          str(tmp_path / "out"), *args])
        scale.main()

    with pytest.raises(SystemExit, match=f"no complete, prepared set at {root}; give the --work of the recorded run"):
        main("--families", "efficientnet")  # the set is there, its manifests are not
    (root / "manifest" / "summary.json").write_text("{}")
    main("--families", "efficientnet")
    assert len(commands) == 1 and commands[0][1] == "jobs/embed.py"
    assert commands[0][commands[0].index("--checkpoint") + 1] == str(tmp_path / "work" / "f1.0" / "checkpoints"
                                                                     / "efficientnet")
    payload, section = written(tmp_path / "out", "scale")
    assert payload["runs"]["1.0"] == {"embed_dolg": stage(10000, 50.0),
                                      "embed_efficientnet": {"wall_s": 80.0, "cpu_s": 70.0, "rows": 10000}}
    assert payload["added"][-1]["embeddings_only"] and payload["added"][-1]["families"] == ["efficientnet"]
    assert "At f = 1.0 the embeddings of efficientnet, extrapolated before, were measured later, at commit" \
        in " ".join(section.split())
    assert "| embed_efficientnet | 1.0 | 10,000 | 80.0 | 70.0 |" in section

    marker = root / "synthetic_scale.json"
    marker.write_text(json.dumps({"complete": True, "summary": {"counts": {
        "train_images": 20000, "test_images": 1000, "index_images": 2000, "clean_images": 6000}}}))
    with pytest.raises(SystemExit,
                       match="the set at .* has 9,000 images for the stage, the recorded run 10,000; give its"):
        main("--families", "efficientnet")  # a set of another fraction: refused before any stage runs
    for args, message in [(["--families", "dolg"], "at f = 1.0 the embeddings of dolg were not extrapolated"),
                          (["--families", "efficientnet", "--fractions", "0.3"], "f = 0.3 is not recorded")]:
        with pytest.raises(SystemExit, match=message):
            main(*args)
    assert len(commands) == 1


def test_a_stage_measured_again_at_a_recorded_fraction_replaces_its_figures_and_keeps_the_ones_before(
    tmp_path, monkeypatch, capsys
):
    """``--measure-ensemble``: at recorded fractions only the ensemble job runs, on the recorded run's set, config and
    embeddings, which it must reuse; its figures replace the recorded ones (kept under ``before``) and the laws are
    fitted again. Refused in one line, before any stage runs at any fraction: a fraction above --ensemble-up-to, a
    config of other models than the recorded embeddings, a missing embedding; a job that embedded anew fails.
    ``--measure-stream`` does the same for the stream stage."""
    import sys

    import yaml

    from benchmarks import scale
    from benchmarks.results_io import machine

    def stage(rows, seconds):
        return {"rows": rows, "wall_s": seconds, "cpu_s": seconds}

    extrapolated = {"rows": 1000, "wall_s": 400.0, "cpu_s": 400.0, "extrapolated": {"from_fractions": ["0.01"]}}
    runs = {"0.01": {"embed_dolg": stage(100, 2.0), "embed_effnet": stage(100, 2.0), "ensemble": stage(100, 4.0)},
            "0.03": {"stream": stage(230, 3.0), "embed_dolg": stage(300, 6.0), "embed_effnet": stage(300, 6.0),
                     "ensemble": stage(300, 36.0)},
            "0.1": {"embed_dolg": stage(1000, 20.0), "embed_effnet": stage(1000, 20.0), "ensemble": extrapolated}}
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({"machine": machine(), "command": "python -m benchmarks.scale", "train_up_to": 0.03,
                                    "ensemble_up_to": 0.03, "limit": 1.15, "runs": runs}))
    work = tmp_path / "work" / "f0.03"
    (work / "gldv2" / "manifest").mkdir(parents=True)
    (work / "gldv2" / "manifest" / "summary.json").write_text("{}")
    (work / "gldv2" / "synthetic_scale.json").write_text(json.dumps({"complete": True, "summary": {"counts": {
        "train_images": 600, "test_images": 30, "index_images": 70, "clean_images": 200}}}))
    (work / "ensemble.yaml").write_text(yaml.safe_dump({"models": [{"name": "dolg"}]}))
    (work / "ensemble" / "embeddings" / "dolg").mkdir(parents=True)
    commands, reused = [], []

    def run_stage(command, log, interval):
        commands.append(command)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(f"[embed] {m}: every shard was embedded earlier with x; reused\n" for m in reused))
        return {"wall_s": 12.0, "cpu_s": 11.0}

    monkeypatch.setattr(scale, "run_stage", run_stage)

    def main(option="--measure-ensemble", fractions="0.03"):
        monkeypatch.setattr(sys, "argv", ["scale", "--add-to", str(recorded), "--fractions", fractions, option,
                                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
        scale.main()

    for fractions, message in [("0.1", r"f = 0.1 is above --ensemble-up-to 0.03, where the ensemble is extrapolated"),
                               ("0.03", r"ensembles dolg, but the recorded run at f = 0.03 embedded dolg, effnet")]:
        with pytest.raises(SystemExit, match=message):
            main(fractions=fractions)
    (work / "ensemble.yaml").write_text(yaml.safe_dump({"models": [{"name": "dolg"}, {"name": "effnet"}]}))
    with pytest.raises(SystemExit, match=f"the embeddings of effnet missing in {work}; give the --work"):
        main()
    (work / "ensemble" / "embeddings" / "effnet").mkdir()
    with pytest.raises(SystemExit, match=f"no complete, prepared set at {tmp_path / 'work' / 'f0.01' / 'gldv2'}"):
        main(fractions="0.03,0.01")  # 0.03's inputs are there, 0.01's are not: nothing runs at either
    assert not commands
    reused[:] = ["dolg"]
    with pytest.raises(SystemExit, match=r"reused the embeddings of 1 of 2 models and embedded the others"):
        main()
    reused[:] = ["dolg", "effnet"]
    main()
    assert commands[-1][1:3] == ["jobs/ensemble.py", "--config"] and commands[-1][3] == str(work / "ensemble.yaml")
    payload, section = written(tmp_path / "out", "scale")
    assert payload["runs"]["0.03"]["ensemble"] == {"wall_s": 12.0, "cpu_s": 11.0, "rows": 300,
                                                   "before": {"wall_s": 36.0, "cpu_s": 36.0}}
    assert payload["runs"]["0.01"]["ensemble"] == stage(100, 4.0)
    # The law refitted from the new figure: 4 s -> 12 s for 3x the rows, so b = 1 and f = 0.1 extrapolates to 40 s.
    assert payload["exponents"]["ensemble"]["time"] == 1.0
    assert payload["runs"]["0.1"]["ensemble"]["wall_s"] == 40.0
    assert payload["added"][-1]["ensemble_before"] == {"0.03": 36.0} and "families" not in payload["added"][-1]
    assert ("The ensemble stage at f = 0.03 was measured again later, at commit" in " ".join(section.split())
            and "; before, it took f = 0.03: 36.0 s." in " ".join(section.split()))

    # --measure-stream: the stream stage's own process, on the same set (its rows: GLDv2c and the test images).
    main("--measure-stream")
    assert commands[-1][1:4] == ["-m", "benchmarks.scale", "--stream-epoch"]
    payload, _ = written(tmp_path / "out", "scale")
    assert payload["runs"]["0.03"]["stream"] == {"wall_s": 12.0, "cpu_s": 11.0, "rows": 230,
                                                 "before": {"wall_s": 3.0, "cpu_s": 3.0}}
    assert payload["added"][-1]["stream_before"] == {"0.03": 3.0}
    with pytest.raises(SystemExit, match="the stream stage was not measured at f = 0.01; there is nothing to measure"):
        main("--measure-stream", "0.01")
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["scale", "--add-to", str(recorded), "--fractions", "0.03", "--measure-stream",
                                      "--measure-ensemble"])
    with pytest.raises(SystemExit) as refused:
        scale.main()
    assert refused.value.code == 2 and "--measure-ensemble, --measure-stream: one at a time" in capsys.readouterr().err
