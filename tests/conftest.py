"""One local S3 server, one local Ray and one synthetic GLDv2 (in a folder and in a bucket) per test process."""

from __future__ import annotations

import io
import json
import os
import runpy
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

# Set before anything imports Ray (it reads this once): a test that reaches Ray without the ray_session fixture fails
# at once, "Ray has not been started yet", instead of starting Ray's default one, with a CPU per core (2 here) and a
# dashboard, under which a later test's pipeline in the same process waited forever for a CPU that an actor held.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

import pytest
from filelock import FileLock
from PIL import Image

from ray_landmark.data import gldv2

from ray_landmark.data.metadata import open_manifest, prepare_manifests
from ray_landmark.data.shard_members import dataset_shard_index
from ray_landmark.data.storage import resolve
from ray_landmark.data.config import DataConfig, SyntheticSpec
from ray_landmark.data.synthetic import write_synthetic_gldv2
from ray_landmark.local_s3 import LocalS3Server, use_test_credentials

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's token authentication on, as Ray 2.60 turns it on for a local ray.init anyway; set here so that Ray does not
# warn about it (tests/test_cluster.py gives the cluster it starts a token of its own).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# No instance-metadata probing on a machine that is not in a cloud.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Notice a dead training worker within a second, not Ray Train's default interval.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec()
# For training tests: fewer landmarks with more views each, so that a tiny model learns within seconds.
LEARNABLE_SPEC = SyntheticSpec(
    num_landmarks=12, max_images_per_landmark=40, min_images_per_landmark=20, clean_landmark_fraction=1.0,
    test_landmark_images=40, index_distractor_landmarks=4,
)


def job_error(monkeypatch, script: str, *args: str) -> str:
    """Run jobs/<script> in this process (no interpreter start: torch is imported already); its exit message."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / "jobs" / script), run_name="__main__")
    message = exit_.value.code
    assert isinstance(message, str) and "\n" not in message, message  # sys.exit(str): printed, exit status 1
    return message


# The longest test files, longest first, and their wall seconds in a whole run of `bash scripts/test.sh` (two pytest
# processes on 2 cores, 1,731 s); they only order the files, so they need not be exact.
LONGEST_FILES = {"test_benchmark_scripts.py": 568, "test_faults.py": 561, "test_quickstart.py": 369,
                 "test_tune.py": 356, "test_training.py": 305, "test_scale_benchmark.py": 269, "test_chains.py": 167,
                 "test_compile.py": 130, "test_data_pipeline.py": 112, "test_serve.py": 103, "test_bad_input.py": 92,
                 "test_cluster.py": 86, "test_inference.py": 76}


def pytest_collection_modifyitems(items):
    """The longest files first, then those with slow tests: under ``pytest -n 2 --dist loadfile`` (scripts/test.sh)
    each process takes the next file when it is free, so the long ones should not be left to the end."""
    def order(item):
        seconds = LONGEST_FILES.get(item.path.name, 0)
        return -seconds, item.get_closest_marker("slow") is None

    items.sort(key=order)


def once_per_run(tmp_path_factory, name: str, build):
    """What ``build(folder)`` returns (JSON), built once per test run in the run's temp folder however many pytest-xdist
    processes ask: the first builds it, the others wait for it and reuse it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder the processes' own temp folders share
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            done.write_text(json.dumps(build(root / name)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def s3():
    use_test_credentials()  # before Ray starts, so its local workers inherit them
    with LocalS3Server() as server:
        yield server


@pytest.fixture(scope="session")
def ray_session(s3):
    import ray
    import ray.data

    from ray_landmark.runtime import init_ray

    init_ray(local_cpus=4)
    # A starved pipeline should fail in two minutes, not the default 30.
    ray.data.DataContext.get_current().execution_no_progress_timeout_s = 120
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def job_env(ray_session) -> dict[str, str]:
    """The environment of a job run as a subprocess that joins this process's Ray, as a job submitted to a cluster
    does (RAY_ADDRESS): its own local Ray would cost 8-9 s and as many CPU-seconds to start (jobs/tune.py's failing
    sweep, alternated: 26.8-28.2 s on its own Ray, 17.4-19.6 s joined)."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def _prepare_indexed(root) -> None:
    """The manifests of the dataset under ``root`` with the shard index, as ``prepare_gldv2.py --verify-shards``
    writes them: every stream of the tests reads by ranged requests unless it turns ``data.ranged_reads`` off."""
    prepare_manifests(root, root.child("manifest"), progress=None, shard_index=dataset_shard_index(root, progress=None))


def _synthetic_gldv2(spec: SyntheticSpec, root) -> str:
    """Write the dataset and its manifests (with the shard index) under ``root``; returns the root URI."""
    write_synthetic_gldv2(spec, root, progress=None)
    _prepare_indexed(root)
    return root.uri


@pytest.fixture(scope="session")
def gldv2_local(tmp_path_factory):
    """Synthetic GLDv2 in a local folder, with manifests; returns its root path."""
    return once_per_run(tmp_path_factory, "gldv2", lambda folder: _synthetic_gldv2(SPEC, resolve(str(folder))))


@pytest.fixture(scope="session")
def gldv2_s3(s3):
    """The same synthetic GLDv2 in a bucket of the local S3 server; returns its root URI."""
    from ray_landmark.data.config import StorageConfig

    bucket = s3.create_bucket("gldv2-synthetic")
    return _synthetic_gldv2(SPEC, resolve(f"{bucket}/v2", StorageConfig(endpoint_url=s3.endpoint_url)))


@pytest.fixture(scope="session")
def gldv2_learnable(tmp_path_factory):
    return once_per_run(tmp_path_factory, "gldv2_learnable",
                        lambda folder: _synthetic_gldv2(LEARNABLE_SPEC, resolve(str(folder))))


@pytest.fixture(scope="session")
def tiny_checkpoints(gldv2_learnable, tmp_path_factory, request):
    """Two tiny models of different families trained briefly on the learnable set: name -> run folder."""
    from ray_landmark.config import load_config
    from ray_landmark.train.trainer import fit

    # Every process that uses them embeds, serves or trains with them: each needs the session's Ray, whichever process
    # trained them.
    request.getfixturevalue("ray_session")

    def train(out: Path) -> dict[str, str]:
        runs = {}
        for name, config in (("dolg", "tiny_dolg.yaml"), ("effnet", "tiny_efficientnet.yaml")):
            cfg = load_config(REPO / "configs" / config, [
                f"data.root={gldv2_learnable}", "data.augment=false", f"run.output_dir={out}", f"run.name={name}",
                "train.epochs=2", "train.lr=3e-3", "loss.scale=16", "loss.margin=0.1", "train.cpus_per_worker=0.5",
            ])
            fit(cfg)
            runs[name] = str(out / name)
        return runs

    return once_per_run(tmp_path_factory, "tiny_runs", train)


# ---------------------------------------------------------------- bad input


def _jpeg(color) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(out, format="JPEG")
    return out.getvalue()


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class DamagedSet:
    root: str
    good_samples: list[tuple[str, int]]  # (id, class) of every full-view image that can arrive, sorted
    view_rows: int  # the full view's images (shards verified), one of them cut off in its shard
    skips: dict[str, int]  # what a train stream of it counts, by reason
    corrupt_id: str  # the image whose JPEG is corrupt (found when decoding)


@pytest.fixture
def damaged_gldv2(gldv2_local, tmp_path) -> DamagedSet:
    """A copy of the synthetic set with every kind of bad input injected into its train shards, and its manifests
    with the shard index of the damaged shards."""
    root = tmp_path / "damaged"
    shutil.copytree(gldv2_local, root, ignore=shutil.ignore_patterns("manifest"))
    train_dir = root / "train"
    shards = sorted(train_dir.glob("*.tar"))
    members = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            members[shard] = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]

    never_appear = [name for name, _ in members[shards[0]][:3]]  # metadata rows whose images are gone
    members[shards[0]] = members[shards[0]][3:]
    known_id = os.path.basename(members[shards[1]][0][0])[:-4]
    corrupt = bytearray(_jpeg("red"))
    corrupt[200:] = os.urandom(len(corrupt) - 200)
    injected = [
        (gldv2.member_name("f" * 15 + "0"), bytes(corrupt[:300])),  # corrupt: JPEG header, then noise, cut short
        (gldv2.member_name("f" * 15 + "1"), b""),  # zero-byte member
        (gldv2.member_name("f" * 15 + "2"), _png()),  # a PNG named .jpg
        ("0/0/0/readme.txt", b"not an image"),  # a non-JPEG member
        (gldv2.member_name("e" * 16), _jpeg("blue")),  # a good JPEG whose id is in no metadata
    ]
    # The corrupt member needs an id the metadata knows, or it would be dropped as unknown before decoding.
    injected[0] = (gldv2.member_name(known_id), bytes(corrupt[:300]))
    members[shards[1]] = [m for m in members[shards[1]] if known_id not in m[0]] + injected
    for shard, entries in members.items():
        shard.write_bytes(gldv2.pack_tar(entries))
    # Truncated tar: cut the last shard inside its last member's data.
    last = shards[-1]
    data = last.read_bytes()
    with tarfile.open(last) as tar:
        last_member = [m for m in tar if m.isreg()][-1]
    last.write_bytes(data[: last_member.offset_data + last_member.size // 2])
    truncated_id = os.path.basename(last_member.name)[:-4]

    loc = resolve(str(root))
    _prepare_indexed(loc)
    dropped = {os.path.basename(n)[:-4] for n in never_appear} | {known_id, truncated_id}
    view = open_manifest(DataConfig(root=str(root))).view_images("full")
    good = sorted((i, int(c)) for i, c in zip(gldv2.u64_to_ids(view["id"].to_numpy()), view["class"])
                  if i not in dropped)
    skips = {"not_jpeg": 2, "empty_member": 1, "corrupt_jpeg": 1, "truncated_tar": 1, "unknown_id": 1}
    return DamagedSet(str(root), good, len(view), skips, known_id)
