"""Starting or joining Ray the same way in every job, with Ray's own chatter kept in its log files."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import ray
import ray.data
from ray.util.debug import log_once

from ray_landmark.data.storage import aws_settings
from ray_landmark.errors import JobError
from ray_landmark.progress import say

# Set by Ray's job supervisor in a submitted job's driver: the job's own runtime env, as JSON.
_SUBMITTED_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_session_logs: str | None = None  # set by init_ray


def _quiet_ray_console() -> None:
    """Ray Data logs each execution's plan and progress to the console at INFO; keep those in its log file."""
    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    log_once("ray_data_progress_manager_disabled")  # its "progress bars disabled" warning: they are, on purpose


def init_ray(local_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it), or start a local Ray, and say where Ray's
    logs are.

    Storage credentials never go into a runtime env, which Ray stores and shows (job info, dashboard). A local Ray's
    workers are children of the Ray that this process starts and inherit its environment, credentials included. A
    cluster's workers get theirs from their instance role or their node's environment (cluster.yaml, k8s/); a job
    joining one forwards only where storage is (region, endpoint: ``storage.aws_settings``), since a pickled
    filesystem does not carry environment settings (docs/ray-notes.md §0.12).

    A local Ray gets more logical CPUs than cores: training workers hold theirs for the whole run, and Ray Data's
    read and decode tasks must still be schedulable beside them (docs/ray-notes.md §0.6). Workers' output stays in
    Ray's log files (log_to_driver off): jobs print what a person needs through ``progress.ConsoleRelay``.
    """
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        # The dashboard's job API, which `ray job submit` talks to (docs/cluster.md exports it); a driver joins a
        # cluster by its GCS address, which Ray sets for a submitted job.
        raise JobError(f"RAY_ADDRESS={address} is a job API address: submit this job with `ray job submit "
                       f"--working-dir . -- python jobs/...`, or unset RAY_ADDRESS to run it on a local Ray")
    if ray.is_initialized():
        _quiet_ray_console()
        _keep_token_private()
        return
    common = dict(log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address:
            # Ray waits for an address where nothing listens forever, retrying: the address is tried first.
            check_reachable(address)
            context = ray.init(runtime_env=cluster_runtime_env(), **common)
        else:
            context = ray.init(
                # "local": a new Ray of this job's own. Without it, ray.init() joins the last cluster that `ray
                # start` began on this machine (/tmp/ray/ray_current_cluster), which RAY_ADDRESS did not name.
                address="local",
                num_cpus=local_cpus or max(4, 2 * (os.cpu_count() or 1)),
                include_dashboard=False,
                # Ray replaces workers idle for 1 s by default; every new one imports torch again. On 2 cores that
                # churn took 0.2 of a core away from decoding (benchmarks/data_pipeline.py); keep idle workers for
                # a minute.
                _system_config={"idle_worker_killing_time_threshold_ms": 60_000},
                **common,
            )
    except JobError:
        raise
    except Exception as err:  # noqa: BLE001 (Ray raises RuntimeError, ConnectionError, its own and plain Exception)
        first = " ".join(str(err).split())[:300] or type(err).__name__
        if address:
            raise RayStartError(f"RAY_ADDRESS={address}: could not join the Ray cluster there ({first}); check that "
                                f"it names the head node's GCS address (host:6379) and that the cluster runs Ray "
                                f"{ray.__version__}, or unset RAY_ADDRESS to run on a local Ray") from err
        raise RayStartError(f"a local Ray did not start ({first}); check free memory and /dev/shm (Ray's object "
                            f"store) and that /tmp/ray can be written; Ray's own logs: "
                            f"/tmp/ray/session_latest/logs") from err
    _quiet_ray_console()
    _keep_token_private()
    global _session_logs
    _session_logs = logs = os.path.join(context.address_info.get("session_dir", ""), "logs")
    say(f"[ray] {'joined ' + os.environ['RAY_ADDRESS'] if os.environ.get('RAY_ADDRESS') else 'local Ray started'}; "
        f"Ray's logs: {logs}")


class RayStartError(JobError, RuntimeError):
    """Ray could not be started or joined; the message names the address and what to check."""


def connect_wait_s() -> float:
    """How long a job waits for ``RAY_ADDRESS`` to answer (a cluster still starting): RAY_LANDMARK_CONNECT_WAIT_S,
    default 30 s."""
    try:
        return max(0.0, float(os.environ.get("RAY_LANDMARK_CONNECT_WAIT_S", "30")))
    except ValueError:
        raise JobError(f"RAY_LANDMARK_CONNECT_WAIT_S={os.environ['RAY_LANDMARK_CONNECT_WAIT_S']!r}: expected a "
                       f"number of seconds") from None


def check_reachable(address: str) -> None:
    """That something accepts connections at a cluster address (``host:port`` or ``ray://host:port``), trying for
    ``connect_wait_s``; else a JobError naming it. ``auto`` (the cluster `ray start` began here) is Ray's to find."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise JobError(f"RAY_ADDRESS={address}: expected host:port (the head node's GCS address, e.g. 10.0.0.5:6379), "
                       f"ray://host:10001, or auto")
    deadline = time.monotonic() + connect_wait_s()
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise JobError(f"RAY_ADDRESS={address}: nothing answers there ({err.strerror or err}, waited "
                               f"{connect_wait_s():g} s); start the cluster (ray up cluster.yaml, or ray start "
                               f"--head) or point RAY_ADDRESS at its head, or unset it to run on a local Ray") \
                    from None
            time.sleep(1)


def _keep_token_private() -> None:
    """Ray's token (``~/.ray/auth_token``, made on first use or by ``ray get-auth-token --generate``) is a password:
    readable by its owner only."""
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.stat().st_mode & 0o077:
        token.chmod(0o600)


def ray_logs_folder() -> str | None:
    """The log folder of the Ray session ``init_ray`` started or joined (on the head node); None before."""
    return _session_logs if ray.is_initialized() else None


def cluster_runtime_env() -> dict:
    """The runtime env a job adds when it joins a cluster: the storage settings of its environment, less those the
    submitted job's runtime env already sets (they reach every worker of the job anyway, and Ray refuses a key
    set twice)."""
    submitted = json.loads(os.environ.get(_SUBMITTED_JOB_CONFIG, "{}")).get("runtime_env") or {}
    env_vars = {k: v for k, v in aws_settings().items() if k not in (submitted.get("env_vars") or {})}
    return {"env_vars": env_vars} if env_vars else {}
