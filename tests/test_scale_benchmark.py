"""``python -m benchmarks.scale`` at toy size, in a file of its own: pytest-xdist then runs it beside the other benchmark
toy runs (tests/test_benchmark_scripts.py), which it outlasts."""

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
