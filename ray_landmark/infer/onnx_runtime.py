"""The embedding network run by onnxruntime instead of PyTorch: the file ``jobs/export_onnx.py`` writes for a
checkpoint (``infer/onnx_export.py``), exported on first use where it is missing and refused where it was made from
another checkpoint or image size. onnxruntime runs it with its CUDA provider where the process has a GPU and the CUDA
build of onnxruntime, else with its CPU provider; ``OnnxEmbedding.provider`` says which.

The graph takes ImageNet-normalised float32 N×3×S×S images at the exported S only, and returns unit float32 rows; an
``Embedder`` given such a file embeds through it exactly as through the PyTorch model (same decode, flip TTA, float16
rounding), so only the network's arithmetic differs (docs/serving.md says by how much).
"""

from __future__ import annotations

import fcntl
import json
import os

import numpy as np
import torch

from ray_landmark.data.config import DataConfig, StorageConfig
from ray_landmark.errors import JobError
from ray_landmark.infer.onnx_export import INPUT, export_onnx

# The model.json that jobs/export_onnx.py writes beside model.onnx: what the file was made from.
METADATA = "model.json"


class OnnxEmbedding:
    """``embed(images)`` as the PyTorch model's, run by an onnxruntime session on ``path``."""

    def __init__(self, path: str, device: torch.device, threads: int):
        import onnxruntime as ort

        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else \
            ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # what the replica holds, as torch's threads
        # Idle pool threads sleep instead of spinning for the next run: a replica's decode, HTTP and search threads
        # need those cores between batches. Spinning, a replica used 39 CPU-ms per request at concurrency 1 on 2
        # cores, 14 without (benchmarks/serve.py's tiny DOLG; the same latency).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            path, options, providers=[p for p in wanted if p in ort.get_available_providers()])
        self.provider = self.session.get_providers()[0]
        self.dim = int(self.session.get_outputs()[0].shape[-1])
        self.device = device

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(images.float().cpu().numpy())
        return torch.from_numpy(self.session.run(["embedding"], {INPUT: pixels})[0]).to(self.device)


def exported_onnx(checkpoint: str, folder: str, image_size: int, storage: StorageConfig, data: DataConfig) -> str:
    """The path of ``checkpoint``'s model.onnx in the local ``folder``: exported there (and checked against PyTorch on
    test images of ``data``) when the folder has none, one process at a time; a folder whose file was made from
    another checkpoint or image size is refused in one line."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:  # replicas of one node start together
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(folder, METADATA)):
            export_onnx(checkpoint, folder, storage, data=data)
    with open(os.path.join(folder, METADATA)) as f:
        made = json.load(f)
    if (made["checkpoint"], made["image_size"]) != (checkpoint, image_size):
        raise JobError(f"{folder}: its model.onnx was exported from {made['checkpoint']} at {made['image_size']} px, "
                       f"not from {checkpoint} at {image_size} px; delete the folder (it is exported again on start) "
                       f"or set onnx_dir to another folder")
    return os.path.join(folder, made["onnx"])
