"""Starting or joining Ray the same way in every job, with Ray's own chatter kept in its log files."""

from __future__ import annotations

import logging
import os

import ray
import ray.data
from ray.util.debug import log_once

from ray_landmark.data.storage import worker_env_vars
from ray_landmark.progress import say


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

    A local Ray gets more logical CPUs than cores: training workers hold theirs for the whole run, and Ray Data's
    read and decode tasks must still be schedulable beside them (ray.md §0.6). AWS settings of this process go to every
    worker through the runtime env, since a pickled filesystem does not carry environment credentials. Workers'
    output stays in Ray's log files (log_to_driver off): jobs print what a person needs through
    ``progress.ConsoleRelay``.
    """
    if ray.is_initialized():
        _quiet_ray_console()
        return
    common = dict(runtime_env={"env_vars": worker_env_vars()}, log_to_driver=False, logging_level=logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(**common)
    else:
        context = ray.init(
            num_cpus=local_cpus or max(4, 2 * (os.cpu_count() or 1)),
            include_dashboard=False,
            # Ray replaces workers idle for 1 s by default; every new one imports torch again. On 2 cores that churn
            # took 0.2 of a core away from decoding (benchmarks/data_pipeline.py); keep idle workers for a minute.
            _system_config={"idle_worker_killing_time_threshold_ms": 60_000},
            **common,
        )
    _quiet_ray_console()
    logs = os.path.join(context.address_info.get("session_dir", ""), "logs")
    say(f"[ray] {'joined ' + os.environ['RAY_ADDRESS'] if os.environ.get('RAY_ADDRESS') else 'local Ray started'}; "
        f"Ray's logs: {logs}")
