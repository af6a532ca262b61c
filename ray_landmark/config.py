"""YAML configs loaded into typed, validated objects.

Each package owns the section it reads (``data.config.DataConfig``, ``models.config.ModelConfig``, ...); this module
holds the root ``Config``, the loader and the ``--set key=value`` overrides. Every error names the key and the file,
and is raised before any Ray resource is requested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ray_landmark.config_base import Section
from ray_landmark.data.config import DataConfig, StorageConfig, SyntheticSpec
from ray_landmark.errors import ConfigError
from ray_landmark.models.config import LossConfig, ModelConfig
from ray_landmark.train.config import TrainConfig


class RunConfig(Section):
    # Stable across resubmissions: rerunning a run name resumes it from its latest checkpoint.
    name: str
    # Local folder or bucket URI for logs, checkpoints and summaries (<output_dir>/<name>/...).
    output_dir: str = "runs"
    # How to reach output_dir when it is a bucket (credentials from the environment, as for data).
    storage: StorageConfig = StorageConfig()


class Config(Section):
    run: RunConfig
    data: DataConfig
    model: ModelConfig | None = None
    loss: LossConfig = LossConfig()
    train: TrainConfig | None = None
    # Set in configs that generate their own synthetic GLDv2 (the quickstart, benchmarks).
    synthetic: SyntheticSpec | None = None


def set_dotted(tree: dict, dotted_key: str, value: Any, source: str) -> None:
    """Set ``a.b.c`` in a nested dict, creating sections on the way."""
    node = tree
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: --set {dotted_key}: '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where (PyYAML's own message spans several, with a caret)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem or ' '.join(str(err).split())}{where}"


def parse_override(text: str) -> tuple[str, Any]:
    """``data.image_size=448`` -> ("data.image_size", 448); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example --set data.image_size=448")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({_yaml_problem(err)}); quote it as a "
                          f"string, for example --set '{key.strip()}=\"{raw}\"'") from None


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's content; a missing file, one that is not UTF-8 text or not YAML is a ConfigError in one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found" if not path.exists() else f"{path}: a folder, not a {what}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save "
                          f"the {what} as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        elif e["type"] == "missing":
            lines.append(f"{source}: missing required key '{key}'")
        elif e["type"] == "value_error":  # a validator's own sentence, without pydantic's "Value error, "
            lines.append(f"{source}: key '{key}': {e['ctx']['error']} (got {e.get('input')!r})")
        else:
            lines.append(f"{source}: key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def config_from_dict(tree: dict, source: str = "<dict>", cls: type[BaseModel] = Config):
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] = (), cls: type[BaseModel] = Config):
    """Read a YAML config, apply ``KEY=VALUE`` overrides and validate it."""
    path = Path(path)
    tree = read_yaml_file(path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value, str(path))
    return config_from_dict(tree, str(path), cls)
