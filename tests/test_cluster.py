"""Running on a cluster: cluster.yaml through Ray's own validation, nothing but SSH open to the internet, no storage
credential in a runtime env, the KubeRay manifest, a job submitted with `ray job submit` to a cluster started with
`ray start --head` and token authentication on; and the user guide's links and configuration reference."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import yaml

from ray_landmark import runtime
from ray_landmark.local_s3 import free_port

REPO = Path(__file__).resolve().parents[1]
THE_INTERNET = ("0.0.0.0/0", "::/0")
DEPLOYMENT_FILES = [REPO / "cluster.yaml", *sorted((REPO / "k8s").iterdir())]

# A node's or a driver's environment: credentials that must stay there, and where storage is, which may travel.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-access-key-id-not-real",
    "AWS_SECRET_ACCESS_KEY": "test-secret-access-key-not-real",
    "AWS_SESSION_TOKEN": "test-session-token-not-real",
}
STORAGE_SETTINGS = {
    "AWS_REGION": "eu-north-1",
    "AWS_DEFAULT_REGION": "eu-north-1",
    "AWS_ENDPOINT_URL": "https://s3.example.test",
}


def _prepared_cluster_config() -> dict:
    """cluster.yaml as `ray up` prepares it: merged with Ray's AWS defaults."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import validate_config

    config = _prepared_cluster_config()
    validate_config(config)  # raises on any schema error
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}, "the head must run no training work"
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on-demand"
    # The launcher gives an instance profile to the head only: every node type names its own.
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert any(t["node_config"].get("InstanceMarketOptions") == {"MarketType": "spot"} for t in types.values())
    assert any(t["node_config"]["InstanceType"] == "p4d.24xlarge" and t["max_workers"] > 0 for t in types.values())
    # The project's own image, tagged by its commit; the object store's shared memory sized on every node type.
    assert config["docker"]["image"] == "REGISTRY/ray-landmark:REPLACE_WITH_IMAGE_TAG"
    assert any(o.startswith("--shm-size=") for o in config["docker"]["head_run_options"])
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert all(any(o.startswith("--shm-size=") for o in t["docker"]["worker_run_options"]) for t in workers)
    assert not any("pip install" in command for command in config["setup_commands"])  # all in the image


def test_the_image_builds_on_the_projects_ray_with_every_package_at_its_locked_version():
    dockerfile = (REPO / "k8s" / "Dockerfile").read_text()
    assert f"ARG BASE=rayproject/ray:{ray.__version__}-py311-gpu\nFROM ${{BASE}}\n" in dockerfile
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and all("-c /tmp/ray_landmark/constraints.txt" in line for line in installs)
    assert '"/tmp/ray_landmark[gpu,serve,onnx]"' in dockerfile
    assert "-c constraints.txt" in (REPO / "scripts" / "setup_venv.sh").read_text()
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["ray"] == ray.__version__ and {"torch", "timm", "pyarrow", "pandas", "faiss-cpu"} <= set(pins)


def _open_to_the_internet(rule: dict) -> bool:
    return any(r.get("CidrIp") in THE_INTERNET for r in rule.get("IpRanges", [])) or any(
        r.get("CidrIpv6") in THE_INTERNET for r in rule.get("Ipv6Ranges", [])
    )


def test_only_ssh_is_open_and_only_from_the_guides_cidr_and_every_ray_node_requires_the_token():
    from ray.autoscaler._private.aws.config import _configure_security_group

    config = _prepared_cluster_config()
    # Every node type names the security group of the guide's step 2: the launcher's own step then creates and
    # opens nothing (its default group would admit SSH from anywhere).
    groups = {tuple(t["node_config"]["SecurityGroupIds"]) for t in config["available_node_types"].values()}
    assert groups == {("REPLACE_WITH_SECURITY_GROUP_ID",)}
    assert _configure_security_group(json.loads(json.dumps(config))) == config
    # Step 2 opens port 22 to SSH_CIDR and everything to the group itself, nothing else; the placeholder is no CIDR.
    guide = (REPO / "docs" / "cluster.md").read_text()
    rules = re.findall(r"authorize-security-group-ingress --region \S+ --group-id \$SG (.*)", guide)
    assert rules == ["--protocol tcp --port 22 --cidr $SSH_CIDR", "--protocol -1 --source-group $SG"], rules
    cidr = re.search(r"^SSH_CIDR=(\S+)", guide, re.M).group(1)
    assert cidr == "REPLACE_WITH_YOUR_CIDR" and cidr not in THE_INTERNET
    docker_options = [*config["docker"]["run_options"], *config["docker"].get("head_run_options", []),
                      *[o for t in config["available_node_types"].values()
                        for o in t.get("docker", {}).get("worker_run_options", [])]]
    assert not [o for o in docker_options if o.split()[0] in ("-p", "--publish", "-P", "--publish-all")]
    head_start = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    worker_start = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert all("--dashboard-host=127.0.0.1" in c for c in head_start)
    assert all("RAY_AUTH_MODE=token ray start" in c for c in head_start + worker_start)
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]


def test_no_account_id_or_access_key_in_the_deployment_files_and_guides():
    for path in [*DEPLOYMENT_FILES, REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        assert not re.search(r"(?<![\d,.])\d{12}(?![\d,.])", text), f"{path}: an AWS account id? use ACCOUNT_ID"
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"{path}: an AWS access key id"


def _markdown_slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_of_the_guide_reaches_a_file_and_heading():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
                assert anchor in {_markdown_slug(h) for h in headings}, f"{page.name}: no heading for {target}"


def _config_keys(section: type, seen: tuple = ()) -> set[str]:
    """The key names of a config section and of every section inside it."""
    from pydantic import BaseModel

    def sections_in(annotation) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [s for arg in typing.get_args(annotation) for s in sections_in(arg)]

    keys = set(section.model_fields)
    for field in section.model_fields.values():
        for inner in sections_in(field.annotation):
            if inner not in seen:
                keys |= _config_keys(inner, (*seen, section))
    return keys


def test_the_configuration_reference_names_every_key():
    from ray_landmark.config import Config
    from ray_landmark.infer.config import EnsembleConfig
    from ray_landmark.serve.config import ServeSettings
    from ray_landmark.train.chain import ChainConfig
    from ray_landmark.tune.config import SweepConfig

    reference = (REPO / "docs" / "configuration.md").read_text()
    missing = {key for root in (Config, EnsembleConfig, SweepConfig, ChainConfig, ServeSettings) for key in _config_keys(root)
               if f"`{key}`" not in reference}
    assert not missing, f"docs/configuration.md: add {sorted(missing)}"


def _init_ray_call(monkeypatch, env: dict[str, str]) -> dict:
    """The keyword arguments init_ray passes to ray.init with this environment (no Ray is started)."""
    for key in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR", *CREDENTIALS, *STORAGE_SETTINGS, "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(runtime, "check_reachable", lambda address: None)  # the address is made up: nothing answers
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs) or SimpleNamespace(address_info={}))
    runtime.init_ray()
    return calls[0]


def test_joining_a_cluster_forwards_where_storage_is_and_no_credential(monkeypatch):
    call = _init_ray_call(monkeypatch, {"RAY_ADDRESS": "10.0.0.1:6379", "AWS_PROFILE": "work-profile",
                                        **CREDENTIALS, **STORAGE_SETTINGS})
    assert call["runtime_env"] == {"env_vars": STORAGE_SETTINGS}
    shown = json.dumps(call)
    assert not [key for key, value in CREDENTIALS.items() if value in shown] and "work-profile" not in shown


def test_a_submitted_job_forwards_only_settings_its_own_runtime_env_does_not_set(monkeypatch):
    submitted = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"AWS_REGION": "eu-north-1"}}}
    call = _init_ray_call(monkeypatch, {"RAY_ADDRESS": "10.0.0.1:6379", "RAY_JOB_CONFIG_JSON_ENV_VAR":
                                        json.dumps(submitted), **CREDENTIALS, **STORAGE_SETTINGS})
    # Ray refuses a key that both the submitted job and ray.init set.
    assert set(call["runtime_env"]["env_vars"]) == set(STORAGE_SETTINGS) - {"AWS_REGION"}


def test_a_local_ray_gets_no_runtime_env_its_workers_inherit_the_environment(monkeypatch):
    call = _init_ray_call(monkeypatch, {**CREDENTIALS, **STORAGE_SETTINGS})
    assert "runtime_env" not in call


def test_the_kuberay_job_has_a_gpu_worker_group_shared_memory_token_auth_and_a_bucket_service_account(monkeypatch):
    from ray_landmark.train.chain import load_chain

    documents = {d["kind"]: d for d in yaml.safe_load_all((REPO / "k8s" / "rayjob_train.yaml").read_text())}
    account, job = documents["ServiceAccount"], documents["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"] == {"mode": "token"}
    assert "working_dir" in yaml.safe_load(spec["runtimeEnvYAML"])
    # The entrypoint is a training chain of this repository whose every step loads as given (a bucket URI needs
    # credentials to resolve: placeholders do here).
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["python", "jobs/train_chain.py"] and (REPO / args[1]).is_file()
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    _, steps = load_chain(REPO / args[args.index("--chain") + 1], overrides)
    assert all(cfg.train.num_workers == 8 and cfg.train.use_gpu for cfg in steps)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    # The same image as cluster.yaml's nodes.
    assert _prepared_cluster_config()["docker"]["image"] in {
        c["image"] for group in groups for c in group["template"]["spec"]["containers"]}
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        shm = {v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
        for container in pod["containers"]:
            assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in container["volumeMounts"])
            assert not {e["name"] for e in container.get("env", [])} & set(CREDENTIALS)
    gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert max(gpus) >= steps[-1].train.num_workers


def _wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited with code {head.returncode}: {log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers, if only to refuse
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {url} did not answer within {timeout_s:.0f} s; see {log}")


def _status_without_token(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=10).status
    except urllib.error.HTTPError as err:
        return err.code


def _stop_cluster(head: subprocess.Popen, temp_dir: Path) -> None:
    """Stop the cluster this test started, and only it: `ray stop` would stop every Ray on the machine."""
    head.send_signal(signal.SIGTERM)  # `ray start --block` then stops the processes it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    for pid in filter(str.isdigit, os.listdir("/proc")):  # anything left that runs under this cluster's temp dir
        try:
            if str(temp_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_a_training_job_from_the_working_dir_on_a_token_authenticated_cluster(
    gldv2_learnable, tmp_path
):
    # The working directory: this repository, whose package says where each process imports it from, plus what an
    # upload must leave out (Ray's default excludes, .gitignore's runs/, .rayignore's data/).
    def bulky(folder: str, names: list[str]) -> list[str]:
        top_level = {".git", ".venv", "runs", "data"} if Path(folder) == REPO else set()
        return [n for n in names if n in top_level or n in ("__pycache__", ".pytest_cache", ".ruff_cache")
                or n.endswith(".egg-info")]

    working_dir = tmp_path / "repo"
    shutil.copytree(REPO, working_dir, ignore=bulky)
    with (working_dir / "ray_landmark" / "__init__.py").open("a") as f:
        f.write('\nprint(f"[test] ray_landmark imported from {__file__}")\n')
    for left_out in (".git", ".venv", "runs", "data"):
        (working_dir / left_out).mkdir()
        (working_dir / left_out / "left_out.bin").write_bytes(b"0" * 1024)

    ray_cli = str(Path(sys.executable).parent / "ray")
    # Short: Ray's unix sockets live under it, and their paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rl-cluster-", dir="/tmp"))
    dashboard = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *CREDENTIALS)}
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` in the entrypoint
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once when the test ends, not after 30 s of draining
        # The nodes' environment: a credential the job must not copy into its runtime env, and a region it forwards.
        AWS_SECRET_ACCESS_KEY=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], AWS_DEFAULT_REGION="eu-north-1",
    )
    # Its own ports and temp dir, apart from the tests' own Ray and any other Ray on the machine.
    log = tmp_path / "ray_start.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", "--num-cpus=4", f"--temp-dir={temp_dir}",
             f"--port={free_port()}", f"--dashboard-port={dashboard.rsplit(':', 1)[1]}",
             "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_dashboard(dashboard, head, log)
        assert _status_without_token(f"{dashboard}/api/jobs/") == 401  # authentication is on

        job = subprocess.run(
            [ray_cli, "job", "submit", f"--address={dashboard}", f"--working-dir={working_dir}", "--",
             "python", "jobs/train.py", "--config", "configs/tiny_dolg.yaml", "--set", f"data.root={gldv2_learnable}",
             "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.name=submitted", "--set", "train.epochs=1",
             "--set", "data.image_size=32", "--set", "data.augment=false",
             "--set", "data.eval_queries=8", "--set", "data.eval_index=16"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "[train] finished submitted" in job.stdout
        assert any((tmp_path / "runs" / "submitted").glob("checkpoint_*"))

        # Every process imported the uploaded working directory's package (the driver's line is in the job's output,
        # the workers' in their log files), never the installed one; the upload left out what it should.
        session = (temp_dir / "session_latest").resolve()
        unpacked = [p for p in (session / "runtime_resources" / "working_dir_files").iterdir() if p.is_dir()]
        assert len(unpacked) == 1
        imported = re.findall(r"\[test\] ray_landmark imported from (\S+)", job.stdout + "".join(
            worker_log.read_text(errors="replace") for worker_log in (session / "logs").glob("worker-*.out")))
        assert len(imported) >= 2 and all(Path(p).is_relative_to(unpacked[0]) for p in imported), imported
        uploaded = {p.name for p in unpacked[0].iterdir()}
        assert {"jobs", "configs", "ray_landmark"} <= uploaded and not {".git", ".venv", "runs", "data"} & uploaded

        # The job's runtime environment as Ray stores and shows it (every task's, in the state API that `ray list`
        # and the dashboard read): the region the driver forwarded, never the node's secret.
        tasks = urllib.request.Request(f"{dashboard}/api/v0/tasks?detail=true&limit=100",
                                       headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
        shown = urllib.request.urlopen(tasks, timeout=30).read().decode()
        assert "eu-north-1" in shown and CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in shown
    finally:
        _stop_cluster(head, temp_dir)


def test_the_heads_ec2_rights_are_limited_to_the_clusters_tagged_instances():
    guide = (REPO / "docs" / "cluster.md").read_text()
    assert "AmazonEC2FullAccess" not in guide
    policy = json.loads(re.search(r"cat > head-ec2.json <<'EOF'\n(.*?)\nEOF", guide, re.S).group(1))
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())["cluster_name"]
    for statement in policy["Statement"]:
        actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        resources = [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]
        mutating = [a for a in actions if not a.startswith("ec2:Describe")]
        assert all(a.startswith("ec2:") for a in actions)
        if not mutating:
            continue
        on_instances = any(":instance/" in r or r == "*" for r in resources)
        condition = statement.get("Condition", {}).get("StringEquals", {})
        if on_instances:  # launching, tagging, stopping or ending an instance: this cluster's only
            assert condition.get("aws:RequestTag/ray-cluster-name") == cluster or condition.get(
                "aws:ResourceTag/ray-cluster-name") == cluster or condition == {"ec2:CreateAction": "RunInstances"}, \
                statement["Sid"]
        else:  # what a launch uses (image, subnet, group, key, disk, interface): RunInstances only
            assert mutating == ["ec2:RunInstances"] and "*" not in resources, statement["Sid"]


def test_a_local_ray_leaves_its_token_readable_by_its_owner_only(ray_session):
    from ray_landmark.runtime import init_ray

    token = Path.home() / ".ray" / "auth_token"
    assert token.exists()
    token.chmod(0o644)  # as `ray get-auth-token --generate` may leave it
    init_ray()
    assert token.stat().st_mode & 0o777 == 0o600
