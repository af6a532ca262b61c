"""Starting or joining Ray the same way in every job."""

from __future__ import annotations

import os

import ray
import ray.data

from ray_landmark.data.storage import worker_env_vars


def init_ray(local_cpus: int | None = None, progress_bars: bool = True) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it), or start a local Ray.

    A local Ray gets more logical CPUs than cores: training workers hold theirs for the whole run, and Ray Data's
    read and decode tasks must still be schedulable beside them (ray.md §0.6). AWS settings of this process go to every
    worker through the runtime env, since a pickled filesystem does not carry environment credentials.
    """
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": worker_env_vars()}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env)
    else:
        ray.init(
            num_cpus=local_cpus or max(4, 2 * (os.cpu_count() or 1)),
            include_dashboard=False,
            runtime_env=runtime_env,
            # Ray replaces workers idle for 1 s by default; every new one imports torch again. On 2 cores that churn
            # took 0.2 of a core away from decoding (benchmarks/data_pipeline.py); keep idle workers for a minute.
            _system_config={"idle_worker_killing_time_threshold_ms": 60_000},
        )
    ray.data.DataContext.get_current().enable_progress_bars = progress_bars
