"""The released 2021 checkpoints -> checkpoints of this project (runs/released.py, jobs/convert_released.py).

The six original state dicts are rebuilt from the names and shapes in tests/data/original-checkpoints.json (read off the
original model code: docs/method.md §4). A
real one holds a 243,939 x 512 head (0.5 GB), so the six are checked on the meta device, where tensors have shapes but
no memory: mapping, counts and a strict load into our model built from each recipe. One real conversion through the
job runs at real names and real backbone shapes (DOLG-B5), with the head cut to the classes of a small train_clean.csv.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ray_landmark.config import config_from_dict, parse_override, set_dotted
from ray_landmark.data.config import StorageConfig
from ray_landmark.data.storage import resolve, write_bytes
from ray_landmark.models.factory import build_model
from ray_landmark.runs.released import (
    CHECKPOINT_DIR,
    RELEASED_MODELS,
    REPORT_FILE,
    SWIN_BUFFERS,
    UNUSED_CNN_BLOCKS,
    UNUSED_GEM,
    ReleasedCheckpointError,
    choose_released_model,
    convert_released,
    detect_released_model,
    landmark_ids_from_train_clean,
    map_state_dict,
    released_config_tree,
    unwrap_state_dict,
)
from ray_landmark.models.transfer import warm_start
from ray_landmark.runs.checkpoint import checkpoint_folder, load_model, read_checkpoint_at

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
REFERENCE = REPO / "tests" / "data" / "original-checkpoints.json"

# The reference's model keys -> our recipe names.
REFERENCE_NAMES = {
    "dolg_b5": "dolg_efficientnet_b5",
    "dolg_b6": "dolg_efficientnet_b6",
    "dolg_b7s3": "dolg_efficientnet_b7_step3",
    "hyb_b3": "efficientnet_b3_swin_base_224",
    "hyb_b5": "efficientnet_b5_swin_base_224",
    "hyb_b6": "efficientnet_b6_swin_base_384",
}
# Tensors each conversion maps and drops, counted from the reference by hand: the hybrids drop the EfficientNet
# stages after the token level (B3, B5: stages 5-6; B6: stages 2-6), 24 relative_position_index and 11 attn_mask
# buffers, and GeM's p.
EXPECTED = {
    "dolg_efficientnet_b5": (880, {}),
    "dolg_efficientnet_b6": (1012, {}),
    "dolg_efficientnet_b7_step3": (1226, {}),
    "efficientnet_b3_swin_base_224": (724, {UNUSED_CNN_BLOCKS: 176, SWIN_BUFFERS: 35, UNUSED_GEM: 1}),
    "efficientnet_b5_swin_base_224": (916, {UNUSED_CNN_BLOCKS: 264, SWIN_BUFFERS: 35, UNUSED_GEM: 1}),
    "efficientnet_b6_swin_base_384": (520, {UNUSED_CNN_BLOCKS: 792, SWIN_BUFFERS: 35, UNUSED_GEM: 1}),
}
# Written out by hand, apart from the mapping's own table: tensors of equal shape swapped would pass every shape check.
SAME_TENSOR = {
    "dolg": {
        "backbone.blocks.6.0.conv_pwl.weight": "encoder.backbone.blocks.6.0.conv_pwl.weight",
        "mam.d1.weight": "encoder.local_branch.0.branches.1.weight",
        "mam.d2.bias": "encoder.local_branch.0.branches.2.bias",
        "mam.conv1.weight": "encoder.local_branch.0.proj.weight",
        "attention2d.conv1.weight": "encoder.local_branch.1.conv.weight",
        "attention2d.bn.running_var": "encoder.local_branch.1.bn.running_var",
        "attention2d.conv2.weight": "encoder.local_branch.1.score.weight",
        "conv_g.weight": "encoder.global_branch.0.weight",
        "bn_g.bias": "encoder.global_branch.1.bias",
        "global_pool.p": "encoder.global_branch.3.p",
        "neck.2.weight": "encoder.neck.2.weight",
        "head.weight": "head.weight",
    },
    "hybrid": {
        "backbone.patch_embed.backbone.conv_stem.weight": "encoder.swin.patch_embed.cnn.conv_stem.weight",
        "backbone.patch_embed.backbone.blocks.1.0.conv_dw.weight":
            "encoder.swin.patch_embed.cnn.blocks.1.0.conv_dw.weight",
        "backbone.patch_embed.proj.weight": "encoder.swin.patch_embed.proj.weight",
        "backbone.layers.0.downsample.reduction.weight": "encoder.swin.layers.1.downsample.reduction.weight",
        "backbone.layers.1.downsample.norm.weight": "encoder.swin.layers.2.downsample.norm.weight",
        "backbone.layers.2.downsample.norm.bias": "encoder.swin.layers.3.downsample.norm.bias",
        "backbone.layers.2.blocks.17.attn.relative_position_bias_table":
            "encoder.swin.layers.2.blocks.17.attn.relative_position_bias_table",
        "backbone.layers.3.blocks.1.mlp.fc2.weight": "encoder.swin.layers.3.blocks.1.mlp.fc2.weight",
        "backbone.norm.weight": "encoder.swin.norm.weight",
        "neck.0.weight": "encoder.neck.0.weight",
        "head.weight": "head.weight",
    },
}


@functools.cache
def reference() -> dict[str, dict[str, list[int]]]:
    models = json.loads(REFERENCE.read_text())["models"]
    return {REFERENCE_NAMES[key]: model["tensors"] for key, model in models.items()}


def meta_original(name: str) -> dict[str, torch.Tensor]:
    """An original state dict of tensors with the reference's shapes and no memory."""
    return {key: torch.empty(shape, device="meta") for key, shape in reference()[name].items()}


def released_cfg(name: str, overrides: list[str] = ()):
    """The config the converter writes for ``name``, with ``KEY=VALUE`` overrides."""
    tree = released_config_tree(RELEASED_MODELS[name], yaml.safe_load((RECIPES / f"{name}.yaml").read_text()))
    for text in overrides:
        set_dotted(tree, *parse_override(text), name)
    return config_from_dict(tree, name)


def meta_model(name: str):
    """Our model for ``name`` with GLDv2c's 81,313 classes, on the meta device."""
    cfg = released_cfg(name)
    with torch.device("meta"):
        return build_model(cfg.model, cfg.loss, 81_313, cfg.data.image_size)


@pytest.mark.parametrize("name", list(REFERENCE_NAMES.values()))
def test_each_released_model_maps_onto_ours_and_loads_strictly(name):
    original = meta_original(name)
    released = detect_released_model(original)
    assert released is not None and released.name == name
    model = meta_model(name)

    mapped = map_state_dict(original, released, model)

    expected_mapped, expected_dropped = EXPECTED[name]
    assert len(mapped.tensors) == expected_mapped
    assert {reason: len(names) for reason, names in mapped.dropped.items()} == expected_dropped
    assert len(mapped.tensors) + sum(expected_dropped.values()) == len(original)
    for theirs, ours in SAME_TENSOR[released.family].items():
        assert mapped.tensors[ours] is original[theirs], f"{theirs} should become {ours}"
    model.load_state_dict(mapped.tensors, strict=True, assign=True)  # meta tensors: assign instead of copying


def test_released_config_selects_the_original_preprocessing_and_fusion():
    dolg = released_cfg("dolg_efficientnet_b5")
    hybrid = released_cfg("efficientnet_b6_swin_base_384")
    assert dolg.data.preprocessing == hybrid.data.preprocessing == "original"
    assert dolg.model.fusion == "published"
    assert not dolg.model.pretrained and not hybrid.model.pretrained  # loading must not download ImageNet weights
    assert (dolg.model.backbone, dolg.model.dilations, dolg.data.image_size) == (
        "tf_efficientnet_b5.ns_jft_in1k", (6, 12, 18), 768)


@pytest.fixture(scope="module")
def dolg_b5():
    """The DOLG-B5 reference on the meta device and our model (meta) to map it onto."""
    return meta_original("dolg_efficientnet_b5"), meta_model("dolg_efficientnet_b5")


def test_an_unmapped_tensor_is_an_error_naming_it(dolg_b5):
    original, target = dolg_b5
    with pytest.raises(ReleasedCheckpointError, match=r"extra\.weight of the file have no counterpart"):
        map_state_dict({**original, "extra.weight": torch.empty(3, device="meta")},
                       RELEASED_MODELS["dolg_efficientnet_b5"], target)


def test_a_misshapen_tensor_is_an_error_naming_it_and_both_shapes(dolg_b5):
    original, target = dolg_b5
    bad = {**original, "mam.d0.weight": torch.empty(512, 200, 3, 3, device="meta")}
    expected = r"mam\.d0\.weight \[512, 200, 3, 3\] -> encoder\.local_branch\.0\.branches\.0\.weight \[512, 176, 3, 3\]"
    with pytest.raises(ReleasedCheckpointError, match=expected):
        map_state_dict(bad, RELEASED_MODELS["dolg_efficientnet_b5"], target)


def test_a_missing_tensor_is_an_error_naming_it(dolg_b5):
    original, target = dolg_b5
    incomplete = {k: v for k, v in original.items() if k != "bn_g.bias"}
    with pytest.raises(ReleasedCheckpointError, match=r"encoder\.global_branch\.1\.bias: not in the file"):
        map_state_dict(incomplete, RELEASED_MODELS["dolg_efficientnet_b5"], target)


def test_only_cnn_blocks_after_the_token_level_are_dropped_silently():
    name = "efficientnet_b3_swin_base_224"  # tokens after stage 4: stages 5 and 6 are dropped, a stray in 4 is not
    target = meta_model(name)
    stray = "backbone.patch_embed.backbone.blocks.4.9.conv_pw.weight"  # a block our stage 4 does not have
    with pytest.raises(ReleasedCheckpointError, match=rf"{stray} -> encoder\.swin\.patch_embed\.cnn\.blocks\.4\.9\."
                                                      r"conv_pw\.weight: our .* has no such tensor"):
        map_state_dict({**meta_original(name), stray: torch.empty(1, device="meta")}, RELEASED_MODELS[name], target)


def test_unwrap_accepts_a_bare_state_dict_or_a_dict_holding_one():
    sd = {"a.weight": torch.zeros(2), "b.bias": torch.zeros(1)}
    bare = unwrap_state_dict(sd, "f.pth")
    assert (bare.tensors, bare.container_key, bare.stripped_prefix) == (sd, None, False)

    wrapped = unwrap_state_dict({"model": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, "f.pth")
    assert wrapped.container_key == "model" and wrapped.tensors == sd

    ddp = unwrap_state_dict({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, "f.pth")
    assert ddp.container_key == "state_dict" and ddp.stripped_prefix and ddp.tensors == sd

    assert unwrap_state_dict({"ema": sd, "step": 10}, "f.pth").container_key == "ema"  # the only dict of tensors
    assert unwrap_state_dict({"model": sd, "ema": sd}, "f.pth").container_key == "model"  # the usual name first

    with pytest.raises(ReleasedCheckpointError, match=r"f\.pth: .*several dicts of tensors \(a, b\)"):
        unwrap_state_dict({"a": sd, "b": sd}, "f.pth")
    with pytest.raises(ReleasedCheckpointError, match=r"f\.pth: .*no dict of tensors among its keys epoch"):
        unwrap_state_dict({"epoch": 3}, "f.pth")
    with pytest.raises(ReleasedCheckpointError, match=r"f\.pth: holds a list"):
        unwrap_state_dict([sd], "f.pth")


def test_the_model_is_named_or_told_from_its_shapes():
    original = meta_original("efficientnet_b5_swin_base_224")
    assert choose_released_model(original, None, "f.pth").name == "efficientnet_b5_swin_base_224"
    assert choose_released_model(original, "efficientnet_b5_swin_base_224", "f.pth").title.startswith("EfficientNet-B5")
    with pytest.raises(ReleasedCheckpointError, match="f.pth: its tensor shapes are those of efficientnet_b5_swin"):
        choose_released_model(original, "dolg_efficientnet_b5", "f.pth")
    with pytest.raises(ReleasedCheckpointError, match="--model dolg_b5: not a released model; choose one of"):
        choose_released_model(original, "dolg_b5", "f.pth")
    with pytest.raises(ReleasedCheckpointError, match="f.pth: cannot tell which released model .* with --model"):
        choose_released_model({"x": torch.zeros(1)}, None, "f.pth")


def test_label_map_is_the_sorted_landmark_ids_of_train_clean():
    csv = b"landmark_id,images\n30,aaaa bbbb\n7,cccc\n1000,dddd\n"
    assert landmark_ids_from_train_clean(csv, "t.csv").tolist() == [7, 30, 1000]
    with pytest.raises(ReleasedCheckpointError, match="t.csv: not GLDv2's train_clean.csv"):
        landmark_ids_from_train_clean(b"id,landmark\n", "t.csv")


def _write_train_clean(root: Path, landmark_ids: list[int]) -> None:
    (root / "metadata").mkdir(parents=True)
    lines = [f"{lm},{i:016x}" for i, lm in enumerate(landmark_ids)]
    (root / "metadata" / "train_clean.csv").write_text("landmark_id,images\n" + "\n".join(lines) + "\n")


def test_converter_names_what_is_missing_or_inconsistent(tmp_path):
    # Only what the converter reads before building the model: the stem (which model) and the head (how many classes).
    stub = {"backbone.conv_stem.weight": torch.zeros(48, 3, 3, 3), "head.weight": torch.zeros(3 * 5, 512)}
    torch.save(stub, tmp_path / "dolg_b5.pth")

    def convert(out: str, source: str = str(tmp_path / "dolg_b5.pth")):
        return convert_released(source, out, recipes=RECIPES, data_root=str(tmp_path / "gldv2"),
                                printer=lambda line, transient=False: None)

    with pytest.raises(ReleasedCheckpointError, match=r"gldv2/metadata/train_clean.csv not found: .*pass --data-root"):
        convert(str(tmp_path / "out1"))
    _write_train_clean(tmp_path / "gldv2", [3, 1, 2])
    with pytest.raises(ReleasedCheckpointError, match=r"head.weight has 15 rows, but 3 sub-centres x 3 landmarks"):
        convert(str(tmp_path / "out2"))
    torch.save({"model": stub, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "pickled.pth")
    with pytest.raises(ReleasedCheckpointError, match=r"pickled.pth: holds Python objects .* rerun with --allow-pickle"):
        convert(str(tmp_path / "out3"), source=str(tmp_path / "pickled.pth"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(ReleasedCheckpointError, match=r"taken: already exists and is not empty"):
        convert(str(tmp_path / "taken"))


def _random_tensor(name: str, shape: list[int]) -> torch.Tensor:
    """Random values that still make a working network: positive BatchNorm variances, GeM's p at 3."""
    if name.endswith("num_batches_tracked"):
        return torch.tensor(7)
    if name.endswith("running_var"):
        return torch.rand(shape) + 0.5
    if name == "global_pool.p":
        return torch.full(shape, 3.0)
    return torch.randn(shape) * 0.05


@pytest.mark.slow
def test_convert_job_writes_a_run_that_loads_embeds_and_warm_starts(tmp_path, monkeypatch, capsys):
    """DOLG-B5 at real names and backbone shapes, random values, saved the way DDP training scripts do."""
    torch.manual_seed(0)
    landmarks = [5, 900, 17, 42]
    _write_train_clean(tmp_path / "gldv2", landmarks)
    shapes = {**reference()["dolg_efficientnet_b5"], "head.weight": [3 * len(landmarks), 512]}
    original = {name: _random_tensor(name, shape) for name, shape in shapes.items()}
    torch.save({"model": {f"module.{k}": v for k, v in original.items()}, "epoch": 6}, tmp_path / "released.pth")
    out = tmp_path / "runs" / "released_dolg_b5"

    monkeypatch.setattr(sys, "argv", ["convert_released.py", "--source", str(tmp_path / "released.pth"),
                                      "--out", str(out), "--data-root", str(tmp_path / "gldv2")])
    runpy.run_path(str(REPO / "jobs" / "convert_released.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "DOLG-EfficientNet-B5 (dolg_efficientnet_b5, detected from its tensor shapes)" in printed
    assert "under key 'model', 'module.' prefixes stripped" in printed and "mapped 880 tensors; dropped 0" in printed

    # What embed, the ensemble and train.init_from read: the run folder's newest checkpoint.
    assert checkpoint_folder(str(out)).uri == str(out / CHECKPOINT_DIR)
    trained = load_model(str(out))
    assert trained.landmark_ids.tolist() == sorted(landmarks)
    assert trained.config.data.preprocessing == "original" and trained.config.model.fusion == "published"
    assert (trained.config.run.output_dir, trained.config.run.name) == (str(out.parent), out.name)
    assert trained.config.data.root == str(tmp_path / "gldv2")
    ours = trained.model.state_dict()
    for theirs, name in SAME_TENSOR["dolg"].items():
        assert torch.equal(ours[name], original[theirs]), f"{theirs} -> {name}"
    with torch.no_grad():
        embeddings = trained.model.embed(torch.randn(1, 3, 64, 64))
    assert embeddings.shape == (1, 512) and torch.isfinite(embeddings).all()

    report = warm_start(trained.model, read_checkpoint_at(str(out)).state["model"])
    assert len(report.loaded) == 880 and not (report.missing or report.unexpected or report.shape_mismatched)
    conversion = json.loads((out / REPORT_FILE).read_text())
    assert (conversion["model"], conversion["mapped"], conversion["classes"]) == ("dolg_efficientnet_b5", 880, 4)


def original_hybrid_name(ours: str) -> str:
    """Our hybrid's tensor name as the original code names it: the conversion's inverse, written apart from it."""
    name = ours.removeprefix("encoder.").replace("swin.patch_embed.cnn.", "backbone.patch_embed.backbone.")
    if downsample := re.fullmatch(r"swin\.layers\.(\d+)\.downsample\.(.+)", name):
        return f"backbone.layers.{int(downsample[1]) - 1}.downsample.{downsample[2]}"
    return name.replace("swin.", "backbone.", 1)


# The B3 hybrid's recipe shrunk to timm's test EfficientNet and a 2-stage, 32-wide Swin (configs/tiny_hybrid_swin.yaml).
TINY_HYBRID = ["model.backbone=test_efficientnet", "model.cnn_level=8", "data.image_size=64",
               "model.swin_kwargs={img_size: 32, embed_dim: 32, depths: [1, 1], num_heads: [1, 2], window_size: 4}"]


def test_convert_job_reads_and_writes_buckets(tmp_path, s3, monkeypatch, capsys):
    """A tiny hybrid named on the command line, its file in a bucket holding what the original's holds beyond ours."""
    torch.manual_seed(0)
    storage = StorageConfig(endpoint_url=s3.endpoint_url)
    bucket = s3.create_bucket("released-checkpoints")
    landmarks = [11, 3]
    _write_train_clean(tmp_path / "gldv2", landmarks)
    cfg = released_cfg("efficientnet_b3_swin_base_224", TINY_HYBRID)
    ours = build_model(cfg.model, cfg.loss, len(landmarks), cfg.data.image_size).state_dict()
    original = {original_hybrid_name(k): _random_tensor(k, v.shape) for k, v in ours.items()}
    unused = {
        "backbone.patch_embed.backbone.blocks.3.0.conv_pw.weight": torch.randn(96, 32, 1, 1),  # after the token level
        "backbone.layers.0.blocks.0.attn.relative_position_index": torch.zeros(16, 16, dtype=torch.int64),
        "backbone.layers.0.blocks.0.attn_mask": torch.zeros(4, 16, 16),
        "global_pool.p": torch.full((1,), 3.0),
    }
    buffer = io.BytesIO()
    torch.save({**original, **unused}, buffer)  # a bare state dict
    write_bytes(resolve(f"{bucket}/hybrid.pth", storage), buffer.getvalue())
    out = f"{bucket}/runs/released_tiny_hybrid"

    monkeypatch.setattr(sys, "argv", [
        "convert_released.py", "--source", f"{bucket}/hybrid.pth", "--out", out, "--endpoint-url", s3.endpoint_url,
        "--model", "efficientnet_b3_swin_base_224", "--data-root", str(tmp_path / "gldv2"),
        *[arg for text in TINY_HYBRID for arg in ("--set", text)],
    ])
    runpy.run_path(str(REPO / "jobs" / "convert_released.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "(efficientnet_b3_swin_base_224, as named): a bare state dict" in printed
    assert f"mapped {len(ours)} tensors; dropped 4" in printed
    assert f"1: {UNUSED_CNN_BLOCKS}" in printed and f"2: {SWIN_BUFFERS}" in printed and f"1: {UNUSED_GEM}" in printed

    trained = load_model(out, storage)
    assert trained.landmark_ids.tolist() == [3, 11] and trained.config.data.preprocessing == "original"
    loaded = trained.model.state_dict()
    assert torch.equal(loaded["encoder.swin.layers.1.downsample.reduction.weight"],
                       original["backbone.layers.0.downsample.reduction.weight"])
    assert all(torch.equal(loaded[k], original[original_hybrid_name(k)]) for k in ours)
    with torch.no_grad():
        assert torch.isfinite(trained.model.embed(torch.randn(2, 3, 64, 64))).all()
