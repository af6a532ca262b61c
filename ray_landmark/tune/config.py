"""The sweep config (``configs/tune_*.yaml``): a base training config, a search space over any of its values, and
the sweep settings. Every key and value of the space is checked against the base config before any trial starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ray_landmark.config import Config, config_from_dict, load_config, set_dotted
from ray_landmark.config_base import Section
from ray_landmark.data.config import StorageConfig
from ray_landmark.errors import ConfigError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")


class Distribution(Section):
    """Exactly one of: ``grid: [values]`` (every value, in every sample), ``choice: [values]``, ``uniform: [low,
    high]``, ``loguniform: [low, high]``."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {given or 'none'})")
        values = getattr(self, given[0])
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]}: needs at least one value")
        if given[0] in ("uniform", "loguniform") and not 0 < values[1] - values[0]:
            raise ValueError(f"{given[0]}: low must be below high (got {list(values)})")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform: bounds must be positive (got {list(values)})")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)

    @property
    def values(self) -> list:
        return list(getattr(self, self.kind))


class SweepSettings(Section):
    num_samples: int = Field(4, ge=1)  # samples of the space (each grid value is crossed with every sample)
    metric: str = "val_map100"
    mode: Literal["max", "min"] = "max"
    epochs: int = Field(gt=0)  # per trial: train.epochs and the ASHA horizon
    grace_period: int = Field(1, ge=1)  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = Field(2, ge=2)
    # Trials at once; default: the cluster's GPUs // the GPUs one trial's training takes (Tune does not reserve the
    # Train workers' resources, docs/ray-notes.md §3.3), or 1 on a cluster without GPUs.
    max_concurrent_trials: int | None = Field(None, ge=1)
    # CPUs each trial's Ray Data pipelines may use, so that concurrent trials' pipelines don't starve each other.
    data_cpus_per_trial: float | None = Field(None, gt=0)
    seed: int = 0


class SweepConfig(Section):
    name: str  # the sweep's folder under output_dir; rerunning the same name resumes it
    base: str  # the training config every trial starts from (a YAML path)
    base_overrides: list[str] = []  # KEY=VALUE applied to the base, as --set does
    output_dir: str = "runs/sweeps"  # <output_dir>/<name>/: Tune's state, the trials' runs, the table, plots, best
    storage: StorageConfig = StorageConfig()
    # Every trial warm-starts from this checkpoint or run folder (fine-tuning at a new margin or size).
    init_from: str | None = None
    space: dict[str, Distribution] = Field(min_length=1)
    settings: SweepSettings


def load_sweep(
    path: str | Path, overrides: list[str] = (), base_overrides: list[str] = ()
) -> tuple[SweepConfig, Config]:
    """The sweep and its base training config, with every key and value of the space checked against the base:
    a key the base does not have, or a value it rejects, is an error naming the key (before any trial starts).
    ``base_overrides`` are applied to the base after the sweep's own."""
    sweep = load_config(path, overrides, SweepConfig)
    sweep = sweep.model_copy(update={"base_overrides": [*sweep.base_overrides, *base_overrides]})
    base_path = Path(sweep.base)
    if not base_path.is_absolute() and not base_path.exists():
        base_path = Path(path).parent / base_path
    base = load_config(base_path, sweep.base_overrides)
    if base.model is None or base.train is None:
        raise ConfigError(f"{path}: base {sweep.base} has no model or train section to sweep")
    tree = base.model_dump(mode="json")
    for key, distribution in sweep.space.items():
        if not _has_key(tree, key):
            raise ConfigError(f"{path}: space key '{key}' is not a value of the base config {sweep.base}")
        for value in distribution.values:
            config_from_dict(with_values(base, {key: value}, str(path)), f"{path}: space '{key}' value {value!r}")
    return sweep, base


def with_values(base: Config, values: dict[str, Any], source: str) -> dict:
    """The base config as a new plain tree with ``values`` (dotted keys) set."""
    tree = base.model_dump(mode="json")
    for key, value in values.items():
        set_dotted(tree, key, value, source)
    return tree


def _has_key(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
