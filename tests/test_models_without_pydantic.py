"""The models need torch and timm alone: every recipe's model builds from its config file read with PyYAML, with
pydantic and Ray unimportable (as on the GPU machines the benchmarks run on), and that model is the one the validated
config sections build."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ray_landmark.config import load_config
from ray_landmark.models.config import DolgConfig, EfficientNetConfig, HybridSwinConfig, LossConfig
from ray_landmark.models.dolg import DolgEmbedder
from ray_landmark.models.efficientnet import EfficientNetEmbedder
from ray_landmark.models.factory import build_arcface, build_model
from ray_landmark.models.hybrid_swin import HybridSwinEmbedder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "recipes").glob("*.yaml")) + sorted((REPO / "configs").glob("tiny_*.yaml"))
CLASSES = 1_000

# Each config's model on the meta device, from its file's model and loss sections as plain dicts; prints, per config,
# what identifies the model: its parameter count and a digest of its printout (every layer with its settings).
BUILD_WITHOUT_PYDANTIC = """
import sys
sys.modules["pydantic"] = sys.modules["ray"] = None
import hashlib, json
import torch, yaml
from ray_landmark.models.factory import build_model

built = {}
for path in sys.argv[1:]:
    tree = yaml.safe_load(open(path))
    with torch.device("meta"):
        model = build_model({**tree["model"], "pretrained": False}, tree.get("loss", {}), %d,
                            tree["data"]["image_size"])
    built[path] = [sum(p.numel() for p in model.parameters()), hashlib.sha1(repr(model).encode()).hexdigest()]
print(json.dumps(built))
""" % CLASSES


def identity(model: torch.nn.Module) -> list:
    return [sum(p.numel() for p in model.parameters()), hashlib.sha1(repr(model).encode()).hexdigest()]


@pytest.mark.slow
def test_every_recipe_builds_without_pydantic_or_ray_as_the_config_sections_build_it():
    proc = subprocess.run([sys.executable, "-c", BUILD_WITHOUT_PYDANTIC, *map(str, CONFIGS)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(built) == len(CONFIGS) and len(CONFIGS) > 27
    for path in CONFIGS:
        cfg = load_config(path, ["model.pretrained=false"])
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.loss, CLASSES, cfg.data.image_size)
        assert built[str(path)] == identity(model), path.name


@pytest.mark.parametrize("section, builder", [
    (DolgConfig, DolgEmbedder), (HybridSwinConfig, HybridSwinEmbedder), (EfficientNetConfig, EfficientNetEmbedder),
    (LossConfig, build_arcface),
])
def test_each_config_key_is_an_argument_with_the_same_default(section, builder):
    """A plain dict that leaves a key out gets the argument's default; the validated section, its own."""
    arguments = inspect.signature(builder).parameters
    for key, field in section.model_fields.items():
        if key == "arch":  # chooses the class
            continue
        assert key in arguments, f"{builder.__name__} takes no {key}"
        default = arguments[key].default
        if field.is_required():
            assert default is inspect.Parameter.empty, f"{builder.__name__}({key}=...) should be required too"
        elif key == "swin_kwargs":  # None: no extra arguments, the section's {}
            assert default is None and field.default == {}
        else:
            assert default == field.default, f"{builder.__name__}({key}={default!r}), config {field.default!r}"
