"""A trained model's embedding network as ONNX, for serving outside Ray (onnxruntime, Triton, TensorRT).

    <out>/model.onnx      images float32 [N, 3, S, S] (ImageNet-normalised) -> embedding float32 [N, D], unit rows;
                          with ``head``, also cosine float32 [N, C]: the sub-center ArcFace cosines per class
    <out>/model.json      input size, normalisation, preprocessing mode, embedding dimension, what was checked
    <out>/landmark_ids.json   with ``head``: class index -> GLDv2 landmark id
    <out>/config.pbtxt    with ``triton``: the folder is then a Triton model (``1/model.onnx``) to drop into a model
                          repository

The graph is ``models/onnx_graph.py``'s (opset 18, a dynamic batch dimension). Before anything is reported as done
the file is checked: ``onnx.checker``, every node in the standard ``ai.onnx`` domain (no custom op a TensorRT or
Triton user would lack), and onnxruntime's outputs against PyTorch's on real images of the data at batch 1 and at a
batch of several images, within ``tolerance``. The max absolute difference goes into ``model.json``.

Nothing here depends on Ray.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ray_landmark.data.config import DataConfig, StorageConfig
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.storage import resolve, write_bytes
from ray_landmark.data.jpeg import decode_resized
from ray_landmark.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device
from ray_landmark.errors import JobError
from ray_landmark.infer.report import read_jpegs
from ray_landmark.models.onnx_graph import INPUT, OPSET, EmbeddingNetwork, export_graph
from ray_landmark.runs.checkpoint import checkpoint_folder, load_model


class ExportError(JobError, RuntimeError):
    """An export that failed its check; the message says by how much and what to try."""


@dataclass
class ExportResult:
    onnx: str  # path of model.onnx
    metadata: dict  # what model.json holds
    files: list[str] = field(default_factory=list)


def _check_images(data: DataConfig, count: int) -> np.ndarray:
    """uint8 [n, S, S, 3]: the first ``count`` test images of the data, decoded as the embedding job decodes them."""
    ids = open_manifest(data).test()["id"].head(count).tolist()
    jpegs = read_jpegs(resolve(data.root, data.storage).child("test"), ids)
    if not jpegs:
        raise ExportError(f"{data.root}: no test image to check the export with (looked for {len(ids)} ids)")
    return np.stack([decode_resized(jpegs[i], data.image_size, data.preprocessing) for i in ids if i in jpegs])


def triton_config(name: str, image_size: int, dim: int, classes: int | None, max_batch_size: int) -> str:
    """A Triton model configuration for the onnxruntime backend; Triton adds the batch dimension itself."""
    inputs = [(INPUT, [3, image_size, image_size])]
    outputs = [("embedding", [dim])] + ([("cosine", [classes])] if classes else [])

    def listed(entries):
        return ",\n".join(f'  {{ name: "{n}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, d))} ] }}'
                           for n, d in entries)

    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{listed(inputs)}\n]\noutput [\n{listed(outputs)}\n]\ndynamic_batching {{ }}\n")


def export_onnx(checkpoint: str, out: str, storage: StorageConfig | None = None, data: DataConfig | None = None,
                head: bool = False, triton: bool = False, check_images: int = 8, tolerance: float = 1e-4,
                triton_max_batch: int = 64) -> ExportResult:
    """Export ``checkpoint``'s model to ``out`` (a local folder), check it, write model.json; see the module doc.
    ``data``: where the check images come from (default: the checkpoint's data section)."""
    import onnxruntime as ort

    folder = checkpoint_folder(checkpoint, storage)
    trained = load_model(folder.uri, storage)
    cfg = trained.config
    data = (data or cfg.data).model_copy(update={"image_size": cfg.data.image_size,
                                                 "preprocessing": cfg.data.preprocessing})
    size = data.image_size
    network = EmbeddingNetwork(trained.model, head).eval()
    images = _check_images(data, max(2, check_images))
    inputs = normalize_on_device(torch.from_numpy(images))

    os.makedirs(out, exist_ok=True)
    onnx_path = os.path.join(out, "1", "model.onnx") if triton else os.path.join(out, "model.onnx")
    os.makedirs(os.path.dirname(onnx_path), exist_ok=True)
    outputs = network.outputs
    graph = export_graph(network, inputs[:2], onnx_path + ".partial")
    with torch.no_grad():
        expected = [network(inputs[:1]), network(inputs)]
    domains = sorted({node.domain or "ai.onnx" for node in graph.graph.node})
    if domains != ["ai.onnx"]:
        raise ExportError(f"{checkpoint}: the graph uses operator domains {domains}, not only ai.onnx")
    session = ort.InferenceSession(onnx_path + ".partial", providers=["CPUExecutionProvider"])
    diffs = {name: 0.0 for name in outputs}
    for x, torch_out in zip((inputs[:1], inputs), expected):
        torch_out = torch_out if head else (torch_out,)
        for name, got, want in zip(outputs, session.run(outputs, {INPUT: x.numpy()}), torch_out):
            diffs[name] = max(diffs[name], float(np.abs(got - want.numpy()).max()))
    if max(diffs.values()) > tolerance:
        os.remove(onnx_path + ".partial")
        raise ExportError(f"{checkpoint}: onnxruntime differs from PyTorch by {diffs} on {len(images)} test images "
                          f"(tolerance {tolerance}); nothing written to {out}")
    os.replace(onnx_path + ".partial", onnx_path)

    dim = int(expected[1][0].shape[1] if head else expected[1].shape[1])
    classes = len(trained.landmark_ids) if head else None
    metadata = {
        "checkpoint": folder.uri,
        "arch": cfg.model.arch,
        "backbone": getattr(cfg.model, "backbone", None),
        "onnx": os.path.relpath(onnx_path, out),
        "opset": OPSET,
        "input": {"name": INPUT, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, size, size]},
        "image_size": size,
        # pixel = (uint8 value / 255 - mean) / std, per RGB channel
        "normalisation": {"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "preprocessing": data.preprocessing,
        "preprocessing_note": ("decode the JPEG, resize to image_size x image_size without keeping the aspect; fast: "
                               "libjpeg draft decode then antialiased bilinear (PIL), original: full decode then "
                               "bilinear without antialiasing (ray_landmark.data.jpeg.decode_resized)"),
        "outputs": {"embedding": {"dtype": "float32", "shape": ["batch", dim], "unit_rows": True},
                    **({"cosine": {"dtype": "float32", "shape": ["batch", classes],
                                   "meaning": "sub-center ArcFace cosine per class, see landmark_ids.json"}}
                       if head else {})},
        "embedding_dim": dim,
        "check": {"images": len(images), "batch_sizes": [1, len(images)], "max_abs_diff": diffs,
                  "tolerance": tolerance, "onnxruntime": ort.__version__, "torch": torch.__version__,
                  "operators": sorted({node.op_type for node in graph.graph.node}), "domains": domains,
                  "precision": "float32 on onnxruntime's CPU provider; fp16 and TensorRT engines not built here"},
    }
    files = [onnx_path]
    if head:
        files.append(_write_json(out, "landmark_ids.json", [int(i) for i in trained.landmark_ids.tolist()]))
    if triton:
        name = os.path.basename(os.path.abspath(out))
        files.append(os.path.join(out, "config.pbtxt"))
        write_bytes(resolve(files[-1]), triton_config(name, size, dim, classes, triton_max_batch).encode())
    files.append(_write_json(out, "model.json", metadata))
    return ExportResult(onnx_path, metadata, files)


def _write_json(folder: str, name: str, value) -> str:
    path = os.path.join(folder, name)
    write_bytes(resolve(path), json.dumps(value, indent=2).encode())
    return path
