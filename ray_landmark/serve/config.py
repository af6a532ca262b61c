"""The service's settings: the ``args`` of its application in a Serve config file (``configs/serve/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from ray_landmark.config import config_from_dict, parse_override, read_yaml_file, set_dotted
from ray_landmark.config_base import Section
from ray_landmark.errors import ConfigError


Backend = Literal["torch", "onnxruntime"]


class ReplicaSettings(Section):
    """Ray Serve deployment options of the model replicas."""

    num_replicas: int | None = Field(1, ge=1)  # None with autoscaling
    # Ray Serve's autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s,
    # downscale_delay_s, ...), checked by Ray's own model when the settings load; replaces num_replicas.
    autoscaling: dict[str, Any] | None = None
    num_cpus: float = Field(1.0, gt=0)  # fractional is fine: a replica's torch runs on max(1, int(num_cpus)) threads
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)  # requests a replica holds at once: what batching can gather
    max_batch_size: int = Field(16, ge=1)  # images embedded together (@serve.batch)
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # how long a batch waits for more images

    @field_validator("autoscaling")
    @classmethod
    def check_autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from ray.serve.config import AutoscalingConfig

            unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
            if unknown:  # Ray's model ignores them: a misspelt max_replicas would leave 1 replica, silently
                raise ValueError(f"unknown key {unknown[0]!r}; Ray Serve's autoscaling config takes "
                                 f"{', '.join(sorted(AutoscalingConfig.model_fields))}")
            try:
                AutoscalingConfig.model_validate(value)
            except ValidationError as err:
                raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'autoscaling'}: {e['msg']}"
                                           for e in err.errors())) from None
        return value


class LimitSettings(Section):
    """Requests beyond these are refused with a 413."""

    max_images: int = Field(16, ge=1)  # images in one request
    max_image_bytes: int = Field(20_000_000, gt=0)  # bytes of one image
    max_pixels: int = Field(40_000_000, gt=0)  # width x height of one image (a 50-megapixel photo is refused)
    max_retrieve_k: int = Field(100, ge=1)  # the largest ``k`` /retrieve returns (at most the ensemble's out_k)


class ServeSettings(Section):
    # The ensemble config whose models and embeddings (<output_dir>/<name>/embeddings/) the service answers with.
    ensemble: str
    # KEY=VALUE overrides of that config, as jobs' --set (e.g. storage.endpoint_url=..., output_dir=...).
    ensemble_overrides: list[str] = []
    # POST /index/add: embed new images into the retrieval index of every replica (the run's additions log,
    # <output_dir>/<name>/index_additions/). Off unless asked for: it writes to the ensemble's folder on behalf of
    # whoever can reach the service.
    allow_index_add: bool = False
    # The bound on a shared index: an image added through any replica is searched by every replica for requests
    # that arrive this long after its /index/add answer; each replica looks at the additions log at most this often.
    index_refresh_s: float = Field(1.0, ge=0)
    # What runs each model's network: PyTorch, or onnxruntime on the checkpoint's ONNX export (jobs/export_onnx.py's
    # file, exported on a replica's first start into <onnx_dir>/<ensemble name>/<model name>/ when missing).
    backend: Backend = "torch"
    model_backends: dict[str, Backend] = {}  # model name -> its backend, where it differs from ``backend``
    onnx_dir: str = "~/.cache/ray_landmark/onnx"  # a local folder on each replica's node
    replicas: ReplicaSettings = ReplicaSettings()
    limits: LimitSettings = LimitSettings()


@dataclass(frozen=True)
class ServeFile:
    """What jobs/serve.py takes from a Serve config file: where to listen, and the first application."""

    settings: ServeSettings
    host: str
    port: int
    name: str
    route_prefix: str


def read_serve_file(path: str | Path, overrides: list[str] = ()) -> ServeFile:
    """A Serve config file (``configs/serve/*.yaml``) with ``KEY=VALUE`` overrides of its first application's args."""
    path = Path(path)
    tree = read_yaml_file(path, "Serve config file") or {}
    try:
        app = tree["applications"][0]
        args = dict(app.get("args") or {})
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path}: not a Serve config file with an application ({type(err).__name__}: {err})") \
            from None
    for text in overrides:
        set_dotted(args, *parse_override(text), str(path))
    http = tree.get("http_options") or {}
    return ServeFile(config_from_dict(args, f"{path} (applications[0].args)", ServeSettings),
                     http.get("host", "127.0.0.1"), int(http.get("port", 8000)), app.get("name", "landmark"),
                     app.get("route_prefix", "/"))
