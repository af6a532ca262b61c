"""ONNX export of each model family, checked with onnxruntime against PyTorch on the synthetic set's test images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ray_landmark.config import load_config
from ray_landmark.data.config import DataConfig
from ray_landmark.data.metadata import open_manifest
from ray_landmark.data.storage import resolve
from ray_landmark.data.jpeg import decode_resized
from ray_landmark.data.transforms import normalize_on_device
from ray_landmark.infer.onnx_export import ExportError, export_onnx
from ray_landmark.infer.report import read_jpegs
from ray_landmark.models.factory import build_model
from ray_landmark.runs.checkpoint import Progress, load_model, save_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def untrained_checkpoint(name: str, root: str, folder: Path, classes: int = 6) -> str:
    """A checkpoint of a freshly initialised tiny model (no training needed to test an export)."""
    cfg = load_config(CONFIGS / f"{name}.yaml", [f"data.root={root}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss, classes, cfg.data.image_size)
    state = {"model": model.state_dict(), "landmark_ids": torch.arange(100, 100 + classes)}
    save_checkpoint(folder, state=state, config=cfg.model_dump(mode="json"), progress=Progress(1, 1, 0))
    return str(folder)


@pytest.mark.parametrize("name", [pytest.param("tiny_dolg", marks=pytest.mark.slow),
                                  pytest.param("tiny_hybrid_swin", marks=pytest.mark.slow), "tiny_efficientnet"])
def test_export_matches_pytorch_at_any_batch_size_and_describes_itself(name, gldv2_local, tmp_path):
    checkpoint = untrained_checkpoint(name, gldv2_local, tmp_path / "ckpt")
    result = export_onnx(checkpoint, str(tmp_path / "onnx"), head=True, triton=True, check_images=4)

    meta = json.loads((tmp_path / "onnx" / "model.json").read_text())
    assert meta["image_size"] == 64 and meta["embedding_dim"] == 512 and meta["preprocessing"] == "fast"
    assert meta["check"]["max_abs_diff"]["embedding"] < 1e-4 and meta["check"]["domains"] == ["ai.onnx"]
    assert (tmp_path / "onnx" / "1" / "model.onnx").is_file() and result.onnx.endswith("1/model.onnx")
    assert json.loads((tmp_path / "onnx" / "landmark_ids.json").read_text()) == list(range(100, 106))
    pbtxt = (tmp_path / "onnx" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in pbtxt and "dims: [ 3, 64, 64 ]" in pbtxt and "dims: [ 6 ]" in pbtxt

    # Independently of the export's own check: other test images, a batch size it never saw, the preprocessing
    # model.json describes, against the checkpoint's model.
    data = DataConfig(root=gldv2_local, image_size=meta["image_size"], preprocessing=meta["preprocessing"])
    ids = open_manifest(data).test()["id"].tolist()[-5:]
    jpegs = read_jpegs(resolve(gldv2_local).child("test"), ids)
    pixels = np.stack([decode_resized(jpegs[i], 64) for i in ids]).astype(np.float32) * meta["normalisation"]["scale"]
    images = ((pixels - meta["normalisation"]["mean"]) / meta["normalisation"]["std"]).transpose(0, 3, 1, 2)
    session = ort.InferenceSession(result.onnx, providers=["CPUExecutionProvider"])
    embedding, cosine = session.run(["embedding", "cosine"], {"images": images.astype(np.float32)})
    model = load_model(checkpoint).model
    with torch.no_grad():
        reference = model.embed(normalize_on_device(torch.from_numpy(np.stack([decode_resized(jpegs[i], 64)
                                                                                  for i in ids]))))
    assert embedding.shape == (5, 512) and cosine.shape == (5, 6)
    np.testing.assert_allclose(embedding, reference.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1, atol=1e-5)


def test_an_export_that_disagrees_with_pytorch_is_refused_and_leaves_no_model(gldv2_local, tmp_path):
    checkpoint = untrained_checkpoint("tiny_efficientnet", gldv2_local, tmp_path / "ckpt")
    with pytest.raises(ExportError, match=r"onnxruntime differs from PyTorch by .*tolerance 1e-12.*nothing written"):
        export_onnx(checkpoint, str(tmp_path / "onnx"), tolerance=1e-12)
    assert not [p.name for p in (tmp_path / "onnx").rglob("*") if p.is_file()]
