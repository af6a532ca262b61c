"""Models and loss: published parameter counts and shapes, fusion, margins, the ArcFace formula, overfitting tiny
models, channels_last / torch.compile, transfer between recipe steps, and config errors.

The full-size models are built on the meta device (shapes only, no memory), from the recipe configs themselves.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import yaml

from ray_landmark.config import config_from_dict, load_config
from ray_landmark.errors import ConfigError
from ray_landmark.models.arcface import ArcFaceLoss, SubCenterArcFaceHead, dynamic_margins
from ray_landmark.models.config import LossConfig
from ray_landmark.models.factory import build_model
from ray_landmark.models.layers import OrthogonalFusion, orthogonal_component
from ray_landmark.models.transfer import freeze_except, warm_start

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GLDV2C_CLASSES = 81_313
GLDV2_FULL_CLASSES = 203_094


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def recipe(name: str, *overrides: str):
    return load_config(CONFIGS / "recipes" / f"{name}.yaml", ["model.pretrained=false", *overrides])


def build_meta(cfg, num_classes=GLDV2C_CLASSES, image_size=None):
    with torch.device("meta"):
        return build_model(cfg.model, cfg.loss, num_classes, image_size or cfg.data.image_size)


# --- published architectures (docs/method.md §2.1, §2.2) ----------------------------------------------------------

@pytest.mark.parametrize("name, params_m, local_map, global_map", [
    ("dolg_efficientnet_b5", 158.8, (176, 48, 48), (512, 24, 24)),
    ("dolg_efficientnet_b6", 171.3, (200, 48, 48), (576, 24, 24)),
    ("dolg_efficientnet_b7_step3", 194.5, (224, 56, 56), (640, 28, 28)),
])
def test_dolg_matches_published_counts_and_shapes(name, params_m, local_map, global_map):
    cfg = recipe(name)
    model = build_meta(cfg)
    assert n_params(model) / 1e6 == pytest.approx(params_m, abs=0.1)
    size = cfg.data.image_size
    local, global_ = model.encoder.feature_levels(torch.empty(1, 3, size, size, device="meta"))
    assert tuple(local.shape[1:]) == local_map
    assert tuple(global_.shape[1:]) == global_map


@pytest.mark.parametrize("name, params_m, cnn_chs, grid", [
    ("efficientnet_b3_swin_base_224", 222.3, 136, 56),
    ("efficientnet_b5_swin_base_224", 239.5, 176, 56),
    ("efficientnet_b6_swin_base_384", 251.7, 40, 96),
])
def test_hybrid_matches_published_counts_and_token_grid(name, params_m, cnn_chs, grid):
    cfg = recipe(name)
    model = build_meta(cfg)
    patch_embed = model.encoder.swin.patch_embed
    assert patch_embed.proj.in_channels == cnn_chs
    size = cfg.data.image_size
    tokens = patch_embed(torch.empty(1, 3, size, size, device="meta"))
    assert tuple(tokens.shape) == (1, grid, grid, 128)
    # The published model also holds the EfficientNet blocks after the token level (never used); ours does not
    # build them. Adding them back must give the published count.
    with torch.device("meta"):
        full_cnn = timm.create_model(cfg.model.backbone.split(".")[0], num_classes=0, global_pool="")
    kept_blocks = len(patch_embed.cnn.blocks)
    unbuilt = n_params(full_cnn.blocks[kept_blocks:])
    assert unbuilt > 0
    assert (n_params(model) + unbuilt) / 1e6 == pytest.approx(params_m, abs=0.1)


@pytest.mark.parametrize("num_classes, head_m", [(GLDV2C_CLASSES, 124.9), (GLDV2_FULL_CLASSES, 312.0)])
def test_head_size_for_both_class_counts(num_classes, head_m):
    with torch.device("meta"):
        head = SubCenterArcFaceHead(512, num_classes, subcenters=3)
    assert tuple(head.weight.shape) == (num_classes * 3, 512)
    assert n_params(head) / 1e6 == pytest.approx(head_m, abs=0.1)


# --- fusion, margins, loss ----------------------------------------------------------------------------------------

def test_exact_fusion_is_orthogonal_and_published_matches_its_formula():
    torch.manual_seed(0)
    f_local = torch.randn(2, 16, 3, 3) * 4
    f_global = torch.randn(2, 16) * 3  # |f_g| far from 1, where the two variants differ
    exact = orthogonal_component(f_local, f_global, "exact")
    dot = torch.einsum("bchw,bc->bhw", exact, f_global)
    assert dot.abs().max() < 1e-4 * f_local.abs().max() * f_global.norm(dim=1).max()

    published = orthogonal_component(f_local, f_global, "published")
    norm = f_global.norm(dim=1)
    for b in range(2):
        for h in range(3):
            for w in range(3):
                fl = f_local[b, :, h, w]
                expected = fl - (fl @ f_global[b]) / norm[b] * f_global[b]
                torch.testing.assert_close(published[b, :, h, w], expected)
    assert torch.einsum("bchw,bc->bhw", published, f_global).abs().max() > 1.0  # not orthogonal

    pooled = OrthogonalFusion("exact")(f_local, f_global)
    torch.testing.assert_close(pooled, torch.cat([exact.mean(dim=(2, 3)), f_global], dim=1))


def test_dynamic_margins_span_005_to_050_monotone_in_count():
    cfg = LossConfig()
    counts = torch.tensor([3, 1, 500, 40, 2, 10_000, 7])
    margins = dynamic_margins(counts, cfg.margin_a, cfg.margin_b, cfg.margin_power)
    assert margins[counts.argmax()] == pytest.approx(0.05)
    assert margins[counts.argmin()] == pytest.approx(0.50)
    order = counts.argsort()
    assert (margins[order].diff() < 0).all()  # more images -> smaller margin
    # n^-1/4 between the extremes: class with 40 images.
    t = counts.double().pow(-0.25)
    assert margins[3] == pytest.approx(0.45 * (40 ** -0.25 - t.min()) / (t.max() - t.min()) + 0.05)
    assert dynamic_margins([5, 5, 5]).tolist() == pytest.approx([0.275] * 3)
    with pytest.raises(ConfigError, match=r"class ids \[1\]"):
        dynamic_margins([4, 0, 2])


def test_arcface_logits_follow_the_formula_in_fp32_under_autocast():
    margins = torch.tensor([0.1, 0.5, 0.3])
    loss_fn = ArcFaceLoss(margins, scale=45.0)
    cosine = torch.tensor([[0.8, 0.1, -0.2], [0.3, -0.95, 0.2], [0.0, 0.4, 0.9]])
    labels = torch.tensor([0, 1, 2])
    logits = loss_fn.logits(cosine, labels)
    expected = cosine.clone()
    for i, y in enumerate(labels.tolist()):
        cos_t, m = cosine[i, y].item(), margins[y].item()
        if cos_t > math.cos(math.pi - m):
            expected[i, y] = math.cos(math.acos(cos_t) + m)
        else:  # sample 1: theta + m would pass pi
            expected[i, y] = cos_t - m * math.sin(m)
    torch.testing.assert_close(logits, expected * 45.0)

    smoothed = ArcFaceLoss(margins, scale=45.0, label_smoothing=0.1)
    assert smoothed(cosine, labels) != loss_fn(cosine, labels)

    head = SubCenterArcFaceHead(8, num_classes=3, subcenters=3)
    embeddings = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = head(embeddings.bfloat16())
        loss = loss_fn(cos, torch.tensor([0, 1, 2, 0]))
    assert cos.dtype == torch.float32 and loss.dtype == torch.float32
    all_cos = torch.nn.functional.normalize(embeddings) @ torch.nn.functional.normalize(head.weight).T
    torch.testing.assert_close(cos, all_cos.view(4, 3, 3).amax(dim=2), atol=1e-2, rtol=0)


# --- tiny models ----------------------------------------------------------------------------------------------------

TINY = ["tiny_dolg", "tiny_hybrid_swin", "tiny_efficientnet"]


def tiny_model(name: str, num_classes: int = 8, **loss):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    loss_cfg = cfg.loss.model_copy(update=loss)
    counts = list(range(1, num_classes + 1))
    return cfg, build_model(cfg.model, loss_cfg, num_classes, cfg.data.image_size, class_counts=counts)


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_overfits_a_batch_through_its_encoder(name):
    torch.manual_seed(0)
    cfg, model = tiny_model(name)
    size = cfg.data.image_size
    images, labels = torch.randn(8, 3, size, size), torch.arange(8)
    # The head is frozen: only the encoder (backbone, branches, neck) can lower the loss.
    trainable = freeze_except(model, ["encoder.*"])
    assert "head.weight" not in trainable
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(15):
        loss = model(images, labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # every encoder parameter is used (DDP without find_unused_parameters needs that)
            assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, losses

    model.eval()
    with torch.no_grad():
        embeddings = model.embed(images)
    assert embeddings.shape == (8, 512) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(8))


# In the full run only: the quick run (-m "not slow") compiles the hybrid and the DOLG in tests/test_compile.py.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_dolg", "tiny_hybrid_swin", "tiny_efficientnet"])
def test_channels_last_and_compile(name):
    torch.manual_seed(0)
    cfg, model = tiny_model(name)
    size = cfg.data.image_size
    images, labels = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        reference = model.embed(images)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model.embed(images.to(memory_format=torch.channels_last)), reference,
                                   atol=1e-4, rtol=1e-4)
    # aot_eager traces the whole forward and backward graph as inductor would (fullgraph: no graph breaks), without
    # inductor's C++ code generation, which takes about a minute per model on 2 CPU cores; benchmarks/model_cost.py
    # runs inductor itself.
    model.train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(images.to(memory_format=torch.channels_last), labels)
    out["loss"].backward()
    assert out["cosine"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert model.encoder.neck[0].weight.grad is not None


def test_build_for_gldv2_full_class_count():
    with torch.device("meta"):
        cfg = load_config(CONFIGS / "tiny_efficientnet.yaml")
        model = build_model(cfg.model, cfg.loss, GLDV2_FULL_CLASSES, 64)
    assert model.head.weight.shape[0] == GLDV2_FULL_CLASSES * 3


def test_without_class_counts_the_model_embeds_but_has_no_dynamic_margin_loss():
    cfg = load_config(CONFIGS / "tiny_efficientnet.yaml")
    model = build_model(cfg.model, cfg.loss, 4, 64)
    out = model(torch.randn(2, 3, 64, 64))
    assert out["cosine"].shape == (2, 4) and "loss" not in out
    with pytest.raises(RuntimeError, match="class_counts"):
        model(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))
    fixed = build_model(cfg.model, cfg.loss.model_copy(update={"margin": 0.3}), 4, 64)
    assert fixed(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))["loss"].ndim == 0


def test_stem_stride_one_doubles_the_feature_maps():
    cfg = load_config(CONFIGS / "tiny_dolg.yaml")
    strided = build_model(cfg.model, cfg.loss, 4, 64).encoder
    unstrided = build_model(cfg.model.model_copy(update={"stem_stride": 1}), cfg.loss, 4, 64).encoder
    with torch.no_grad():
        a = [t.shape[-1] for t in strided.feature_levels(torch.randn(1, 3, 64, 64))]
        b = [t.shape[-1] for t in unstrided.feature_levels(torch.randn(1, 3, 64, 64))]
    assert a == [4, 2] and b == [8, 4]


# --- transfer between recipe steps ----------------------------------------------------------------------------------

def hybrid_cfg(**update):
    cfg = load_config(CONFIGS / "tiny_hybrid_swin.yaml")
    return cfg.model.model_copy(update=update), cfg.loss


def test_hybrid_steps_plain_swin_then_embedder_only_then_one_more_cnn_block():
    torch.manual_seed(0)
    # Step 1: plain Swin with its own patch embedding (32 px / 4 = the 8x8 grid).
    model_cfg, loss_cfg = hybrid_cfg(cnn_level=None, backbone=None)
    step1 = build_model(model_cfg, loss_cfg, 8, 32)
    # Step 2: CNN embedder at stride 4 (32 px / 4), only the embedder trains.
    step2 = build_model(hybrid_cfg(cnn_level=4)[0], loss_cfg, 8, 32)
    report = warm_start(step2, step1.state_dict())
    assert report.shape_mismatched == [("encoder.swin.patch_embed.proj.weight", (32, 3, 4, 4), (32, 24, 1, 1))]
    assert "encoder.swin.patch_embed.norm.weight" in report.unexpected
    assert all(k.startswith("encoder.swin.patch_embed.cnn.") for k in report.missing)
    assert "encoder.swin.layers.0.blocks.0.attn.qkv.weight" in report.loaded
    torch.testing.assert_close(step2.state_dict()["head.weight"], step1.state_dict()["head.weight"])
    trainable = freeze_except(step2, ["encoder.swin.patch_embed.*"])
    assert trainable and all(n.startswith("encoder.swin.patch_embed.") for n in trainable)
    assert not step2.head.weight.requires_grad

    # Step 4: one more CNN level (stride 8, 64 px); the projection's input channels change, so it is dropped.
    step4 = build_model(hybrid_cfg(cnn_level=8)[0], loss_cfg, 8, 64)
    report = warm_start(step4, step2.state_dict(), drop=["encoder.swin.patch_embed.proj.*"])
    assert report.dropped == ["encoder.swin.patch_embed.proj.weight", "encoder.swin.patch_embed.proj.bias"]
    assert report.shape_mismatched == [] and report.unexpected == []
    assert report.missing and all(k.startswith("encoder.swin.patch_embed.cnn.blocks.2.") for k in report.missing)
    assert "patch_embed.cnn.blocks.2" in report.summary()


def test_transfer_patterns_that_match_nothing_are_errors():
    model = build_model(*hybrid_cfg(), 4, 64)
    with pytest.raises(ConfigError, match="train.trainable"):
        freeze_except(model, ["encoder.swin.patch_embd.*"])
    with pytest.raises(ConfigError, match="train.drop_keys"):
        warm_start(model, model.state_dict(), drop=["encoder.nope.*"])


# --- config errors ----------------------------------------------------------------------------------------------------

def tiny_tree(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name, key, value, message", [
    ("tiny_dolg", "backbone", "efficientnet_b99", r"model\.dolg\.backbone.*unknown timm model 'efficientnet_b99'"),
    ("tiny_dolg", "backbone", "tf_efficientnet_b5.no_such_tag", r"model\.dolg\.backbone.*no pretrained tag"),
    ("tiny_dolg", "dilations", [3, 6], r"model\.dolg\.dilations"),
    ("tiny_dolg", "dilations", [3, 6, 9, 12], r"model\.dolg\.dilations"),
    ("tiny_dolg", "arch", "dolgg", r"model.*'dolgg'"),
    ("tiny_hybrid_swin", "swin", "swin_huge_patch4", r"model\.hybrid_swin\.swin.*unknown timm model"),
    ("tiny_hybrid_swin", "cnn_level", 12, r"model\.hybrid_swin\.cnn_level"),
    ("tiny_hybrid_swin", "backbone", None, r"model\.backbone .*required when model\.cnn_level"),
    ("tiny_efficientnet", "stem_stride", 4, r"model\.efficientnet\.stem_stride"),
])
def test_bad_model_configs_name_the_field(name, key, value, message):
    tree = tiny_tree(name)
    tree["model"][key] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tree, name)


def test_grid_mismatch_gives_both_numbers_and_the_size_that_fits():
    with pytest.raises(ConfigError, match=r"image size 448 / CNN stride 16 .* = 28 tokens.* 56x56 .*image_size=896"):
        build_meta(recipe("efficientnet_b3_swin_base_224"), image_size=448)
    cfg = load_config(CONFIGS / "tiny_hybrid_swin.yaml")
    with pytest.raises(ConfigError, match=r"image size 72 / CNN stride 8 .* = 9 tokens.*8x8.*image_size=64"):
        build_model(cfg.model, cfg.loss, 4, 72)


def test_zero_classes_and_non_efficientnet_backbones_are_errors():
    cfg = load_config(CONFIGS / "tiny_dolg.yaml")
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(cfg.model, cfg.loss, 0, 64)
    with pytest.raises(ConfigError, match=r"model\.backbone: 'resnet18' is a ResNet"):
        build_model(cfg.model.model_copy(update={"backbone": "resnet18"}), cfg.loss, 4, 64)
    with pytest.raises(ConfigError, match="class_counts: 3 counts for num_classes=4"):
        build_model(cfg.model, cfg.loss, 4, 64, class_counts=[1, 2, 3])
    with pytest.raises(ConfigError, match=r"loss\.subcenters"):
        config_from_dict({**tiny_tree("tiny_dolg"), "loss": {"subcenters": 0}}, "tiny_dolg")


# --- recipes --------------------------------------------------------------------------------------------------------

# docs/method.md §4: image, stem stride, epochs, stop_at, batch, grad accum, lr, wd, warm-up, and §1 data views.
TABLE = {
    "dolg_efficientnet_b7_step1": ("gldv2c", 256, 2, 10, None, 64, 1, 1e-4, 1e-4, 1),
    "dolg_efficientnet_b7_step2": ("gldv2x", 448, 2, 40, 29, 20, 1, 1e-4, 1e-4, 1),
    "dolg_efficientnet_b7_step3": ("gldv2x", 448, 1, 15, None, 4, 4, 5e-5, 1e-4, 1),
    "dolg_efficientnet_b5": ("gldv2x", 768, 2, 7, None, 10, 1, 5e-5, 0, 1),
    "dolg_efficientnet_b6": ("gldv2x", 768, 2, 7, None, 10, 1, 1e-4, 1e-4, 1),
    "efficientnet_b3_swin_base_224": ("gldv2x", 896, 2, 40, 16, 12, 1, 1e-4, 0, 0),
    "efficientnet_b5_swin_base_224": ("gldv2x", 448, 1, 40, 16, 8, 1, 5e-5, 0, 1),
    "efficientnet_b6_swin_base_384": ("gldv2x", 384, 2, 40, 29, 16, 1, 2.5e-4, 0, 1),
}


def test_every_recipe_loads_and_the_table_rows_match_docs_method_md():
    recipes = sorted(p.stem for p in (CONFIGS / "recipes").glob("*.yaml"))
    assert set(TABLE) <= set(recipes)
    for name in recipes:
        cfg = load_config(CONFIGS / "recipes" / f"{name}.yaml")
        assert cfg.run.name == name and cfg.model.pretrained and cfg.train is not None
        if name in TABLE:
            t, m, d = cfg.train, cfg.model, cfg.data
            got = (d.view, d.image_size, m.stem_stride, t.epochs, t.stop_at, t.batch_size, t.grad_accum, t.lr,
                   t.weight_decay, t.warmup_epochs)
            assert got == TABLE[name], name
            assert (cfg.loss.scale, cfg.loss.margin, cfg.loss.margin_a, cfg.loss.margin_b) == (45, None, 0.45, 0.05)
    b5 = load_config(CONFIGS / "recipes" / "efficientnet_b5.yaml")
    assert (b5.data.image_size, b5.loss.subcenters, b5.loss.scale, b5.loss.margin, b5.loss.label_smoothing) == (
        704, 1, 30, 0.3, 0.1)
    assert load_config(CONFIGS / "recipes" / "efficientnet_b6_step1.yaml").data.view == "full"

