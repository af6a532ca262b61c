"""The house's floors: each package imports only the floors below it (function-level imports included).

data, models, eval   the ground: GLDv2 files and streams, the networks, metrics and kNN
runs                 run folders and checkpoints, loading a model from one
train, infer         training writes runs; embedding, the ensemble and export read them (neither imports the other)
tune, serve          sweeps over training; the service over the ensemble's answers

Config sections (``<package>/config.py``, the root ``config.py``) are data and the base modules (errors, progress,
markdown, runtime) hold no floor's logic, so every floor may read them.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ray_landmark"
BASE = {"errors", "config_base", "config", "progress", "markdown", "runtime"}
ALLOWED = {
    "data": {"data"},
    "models": {"models"},
    "eval": {"eval"},
    "runs": {"runs", "data", "models"},
    "train": {"train", "runs", "data", "models", "eval"},
    "infer": {"infer", "runs", "data", "models", "eval"},
    "tune": {"tune", "train", "runs", "data", "models", "eval"},
    "serve": {"serve", "infer", "runs", "data", "models", "eval"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("ray_landmark.")}


def test_every_package_imports_only_the_floors_below_it():
    arrows = []
    for package, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / package).glob("*.py")):
            for name in _imports(path):
                parts = name.split(".")[1:]
                if parts[0] in BASE or parts[0] in allowed or (len(parts) > 1 and parts[1] == "config"):
                    continue
                if (PACKAGE / parts[0]).is_dir():  # a name imported from a package, not a module: ray_landmark.data
                    arrows.append(f"{package}/{path.name} -> {name}")
    assert not arrows, "imports that go up or sideways:\n" + "\n".join(sorted(arrows))


def test_no_private_name_crosses_a_module():
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.parent.glob("*/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("ray_landmark", "benchmarks")):
                crossings += [f"{path.relative_to(PACKAGE.parent)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_")]
    assert not crossings, "private names imported from another module:\n" + "\n".join(crossings)
