"""Decoding in the workers (``data.decode: worker``, the CPU twin of ``gpu``: the same code with device="cpu") against
the Ray Data decode stage; bad input on that path; the batched train augmentation; the two preprocessing modes."""

from __future__ import annotations

import collections
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ray_landmark.data.config import DataConfig, StorageConfig
from ray_landmark.data.metadata import open_manifest
from ray_landmark.errors import ConfigError
from ray_landmark.data.batches import images_on_device, train_batches
from ray_landmark.data.pipeline import SKIP_REASONS, decodes_in_worker, eval_stream, stream_shards, train_stream
from ray_landmark.data.jpeg import decode_resized
from ray_landmark.data.transforms import CUTOUT_FRACTION, TrainAugmentation, affine, cutout, normalize_on_device
from ray_landmark.data.worker_decode import CorruptBatch, TrainBatchDecoder, WorkerDecoder

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _smooth_image(seed: int, height: int = 72, width: int = 96) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    channels = [127 + 100 * np.sin(x / rng.uniform(4, 12) + y / rng.uniform(4, 12) + rng.uniform(0, 6))
                for _ in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def _config(root: str, **kwargs) -> DataConfig:
    return DataConfig(root=root, storage=StorageConfig(retries=2), image_size=32, decode_batch_size=16, **kwargs)


# ---------------------------------------------------------------- the train augmentation, on a batch


def test_batched_affine_gives_torchvision_affine_image_by_image():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 3, 40, 48), dtype=np.uint8))
    params = TrainAugmentation(seed=1).sample(6, 40, 48)

    out = affine(images.clone(), params.angle_deg, params.shift_px, params.scale)

    for i in range(6):
        expected = TF.affine(images[i], angle=float(params.angle_deg[i]), translate=params.shift_px[i].tolist(),
                             scale=float(params.scale[i]), shear=[0.0, 0.0],
                             interpolation=TF.InterpolationMode.BILINEAR, fill=0)
        assert (out[i].int() - expected.int()).abs().max() <= 1


def test_cutout_places_and_cuts_the_hole_as_albumentations_1_0():
    side = 50
    hole = int(CUTOUT_FRACTION * side)  # 20
    # Centres (y, x): inside; at the top-left corner (the hole is shifted inside, whole); at the bottom-right corner
    # (cut to half a hole each way); near the right edge only.
    centres = np.array([[25, 25], [0, 0], [side, side], [25, 45]])
    images = torch.full((4, 3, side, side), 255, dtype=torch.uint8)

    out = cutout(images, centres)

    holes = (out == 0).all(dim=1)
    expected_boxes = [(15, 35, 15, 35), (0, 20, 0, 20), (40, 50, 40, 50), (15, 35, 35, 50)]
    for image_hole, (top, bottom, left, right) in zip(holes, expected_boxes):
        box = torch.zeros(side, side, dtype=torch.bool)
        box[top:bottom, left:right] = True
        assert torch.equal(image_hole, box)
    assert holes[0].sum() == hole * hole and holes[2].sum() == (hole // 2) ** 2


def test_each_image_draws_its_own_augmentation_with_the_published_probabilities():
    n = 4000
    params = TrainAugmentation(seed=0).sample(n, 64, 64)
    for flags, p in [(params.flip, 0.5), (params.jpeg_quality > 0, 0.5), (params.affine, 0.7), (params.cutout, 0.5)]:
        assert abs(flags.mean() - p) < 0.03
    assert set(params.jpeg_quality[params.jpeg_quality > 0]) == {99, 100}
    assert np.abs(params.angle_deg).max() <= 10 and np.abs(params.shift_px).max() <= round(0.2 * 64)
    assert 0.8 <= params.scale.min() and params.scale.max() <= 1.2
    assert params.cutout_centre.min() == 0 and params.cutout_centre.max() == 64  # uniform over 0..S inclusive

    same = torch.from_numpy(np.repeat(_smooth_image(0, 64, 64).transpose(2, 0, 1)[None], 8, axis=0).copy())
    out = TrainAugmentation(seed=3)(same)
    assert len({bytes(image.numpy()) for image in out}) == 8  # one image, eight different draws


class _Angles(torch.utils.data.Dataset):
    def __init__(self):
        self.augmentation = TrainAugmentation()

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i) -> float:
        return float(self.augmentation.sample(1, 8, 8).angle_deg[0])


def test_the_forked_workers_of_a_dataloader_draw_their_own_augmentation():
    angles = torch.cat(list(torch.utils.data.DataLoader(_Angles(), batch_size=1, num_workers=2)))
    assert angles[0] != angles[1]


# ---------------------------------------------------------------- preprocessing: fast and original


def _opencv_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) written out: pixel centres mapped by src = (dst + 0.5) * scale - 0.5, clamped at the
    borders, two-tap interpolation (no antialiasing)."""

    def taps(out_len: int, in_len: int):
        src = (np.arange(out_len) + 0.5) * in_len / out_len - 0.5
        low = np.floor(src).astype(int)
        weight = src - low
        weight[low < 0], low[low < 0] = 0.0, 0
        high = np.minimum(low + 1, in_len - 1)
        return low, high, weight

    y0, y1, wy = taps(size, image.shape[0])
    x0, x1, wx = taps(size, image.shape[1])
    img = image.astype(np.float64)
    rows = img[y0] * (1 - wy)[:, None, None] + img[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def test_original_preprocessing_decodes_the_full_jpeg_and_resizes_as_opencv():
    # Fine stripes: an antialiased resize greys them out, a plain bilinear one keeps their contrast.
    pixels = np.zeros((240, 320, 3), np.uint8)
    pixels[:, ::2] = 255
    data = _jpeg(pixels, quality=100)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    original = decode_resized(data, 64, "original")
    fast = decode_resized(data, 64, "fast")

    assert np.abs(original.astype(float) - _opencv_bilinear(full, 64)).max() <= 1
    assert original.std() > 3 * fast.std()


@pytest.mark.parametrize("preprocessing", ["fast", "original"])
def test_the_worker_decoder_gives_the_ray_data_stages_pixels(preprocessing):
    jpegs = [_jpeg(_smooth_image(seed)) for seed in range(4)]
    decoded = WorkerDecoder(64, preprocessing, CPU).decode(jpegs)
    for image, data in zip(decoded.images, jpegs):
        difference = np.abs(image.permute(1, 2, 0).numpy().astype(int) - decode_resized(data, 64, preprocessing))
        assert difference.max() <= 1  # a 96x72 JPEG at 64 px: no reduced-size decode, resize rounding only


# ---------------------------------------------------------------- bad input on the worker path


def _bad_jpegs() -> dict[str, bytes]:
    good = _jpeg(_smooth_image(0))
    noisy = bytearray(good)
    noisy[400:500] = os.urandom(100)
    return {"truncated": good[: len(good) // 2], "header only": good[:100], "noise in the data": bytes(noisy)}


def test_a_batch_with_bad_jpegs_is_decoded_image_by_image_and_only_the_bad_ones_are_skipped():
    good = [_jpeg(_smooth_image(seed)) for seed in range(3)]
    bad = _bad_jpegs()
    batch = [good[0], bad["truncated"], good[1], bad["header only"], bad["noise in the data"], good[2]]

    decoded = WorkerDecoder(32, "fast", CPU).decode(batch)

    assert decoded.kept.tolist() == [0, 2, 5] and decoded.images.shape == (3, 3, 32, 32)
    assert [position for position, _ in decoded.corrupt] == [1, 3, 4]
    assert all(error and "decode_jpeg.cpp" not in error for _, error in decoded.corrupt)  # the decoder's own words
    assert torch.equal(decoded.images[1], WorkerDecoder(32, "fast", CPU).decode([good[1]]).images[0])


def test_a_short_train_batch_is_topped_up_with_its_good_images_and_an_undecodable_one_replaced():
    good = [_jpeg(_smooth_image(seed)) for seed in range(3)]
    bad = _bad_jpegs()["truncated"]
    decoder = TrainBatchDecoder(32, "fast", CPU, augment=True, seed=0)

    with pytest.raises(CorruptBatch, match="none of the 2 JPEGs of the first train batch"):
        decoder([bad, bad], np.array([7, 8]))
    images, labels, decoded = decoder([good[0], bad, good[1], bad], np.array([10, 11, 12, 13]))
    assert images.shape == (4, 32, 32, 3) and images.dtype == torch.uint8
    assert labels.tolist() == [10, 12, 10, 12] and len(decoded.corrupt) == 2
    images, labels, decoded = decoder([bad, bad, bad, bad], np.array([1, 2, 3, 4]))  # the previous batch stands in
    assert labels.tolist() == [10, 12, 10, 12] and len(decoded.corrupt) == 4


# ---------------------------------------------------------------- data.decode


def test_data_decode_chooses_where_jpegs_are_decoded():
    def config(decode):
        return _config("/data", decode=decode)

    assert not decodes_in_worker(config("cpu"), worker_has_gpu=True)
    assert decodes_in_worker(config("worker"), worker_has_gpu=False)
    assert decodes_in_worker(config("gpu"), worker_has_gpu=True)
    assert decodes_in_worker(config("auto"), worker_has_gpu=True)
    assert not decodes_in_worker(config("auto"), worker_has_gpu=False)
    with pytest.raises(ConfigError, match=r"data.decode: gpu needs workers with a GPU \(train.use_gpu: true\)"):
        decodes_in_worker(config("gpu"), worker_has_gpu=False)


# ---------------------------------------------------------------- the streams, on a real local Ray


@pytest.mark.parametrize("preprocessing", ["fast", "original"])
def test_eval_images_decoded_in_the_worker_are_the_ray_data_stages_images(ray_session, gldv2_local, preprocessing):
    # 96x72 JPEGs at 64 px: PIL's reduced-size decode (fast) needs both sides >= 2 x 64, so both paths decode in full.
    cfg = _config(gldv2_local, preprocessing=preprocessing).model_copy(update={"image_size": 64})
    by_ray = {str(row["id"]): row["image"] for row in eval_stream(cfg, "test").dataset.take_all()}
    decoder = WorkerDecoder(cfg.image_size, preprocessing, CPU)
    by_worker = {}
    for batch in eval_stream(cfg, "test", worker_decode=True).dataset.iter_batches(batch_size=16):
        assert set(batch) == {"id", "jpeg", "shard", "split"}
        batch, corrupt = images_on_device(batch, CPU, decoder)
        assert not corrupt and set(batch["split"]) == {"test"}
        by_worker.update(zip(batch["id"], batch["image"].numpy()))

    assert by_worker.keys() == by_ray.keys()
    for image_id, image in by_worker.items():
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert np.abs(image.astype(int) - by_ray[image_id]).max() <= 1


def test_train_batches_decoded_in_the_worker_match_the_ray_data_stage(ray_session, gldv2_local):
    cfg = _config(gldv2_local, view="full")
    manifest = open_manifest(cfg)
    classes = set(manifest.view_classes("full")["class"].astype(int))
    by_ray = list(train_stream(cfg, manifest).dataset.iter_torch_batches(batch_size=16, drop_last=True))
    worker_cfg = cfg.model_copy(update={"decode": "worker"})
    stream = train_stream(worker_cfg, manifest, worker_decode=True)
    by_worker = list(train_batches(stream.dataset.iterator(), worker_cfg, batch_size=16, device=CPU,
                                   counter=stream.counter, worker_decode=True))

    assert len(by_worker) == len(by_ray)
    means = []
    for batches in (by_ray, by_worker):
        images = torch.cat([b["image"] for b in batches])
        labels = torch.cat([b["label"] for b in batches])
        assert images.dtype == torch.uint8 and images.shape[1:] == (32, 32, 3)
        assert labels.dtype == torch.int64 and set(labels.tolist()) <= classes
        assert images.min() == 0 and images.max() >= 250  # black borders and holes, bright pixels
        means.append(images.float().mean())
    mean_ray, mean_worker = means
    assert abs(mean_ray - mean_worker) < 0.05 * mean_ray


def test_bad_input_on_the_worker_path_is_skipped_counted_and_every_good_sample_arrives_once(
    ray_session, damaged_gldv2
):
    cfg = _config(damaged_gldv2.root, view="full", decode="worker")
    manifest = open_manifest(cfg)
    stream = stream_shards(cfg, "train", lookup=manifest.label_lookup("full"), augment=True, keep_ids=True,
                           shuffle=True, worker_decode=True)
    decoder = WorkerDecoder(cfg.image_size, cfg.preprocessing, CPU)
    got = []
    for batch in stream.dataset.iter_batches(batch_size=16):
        batch, _ = images_on_device(batch, CPU, decoder)
        got += [(str(i), int(c)) for i, c in zip(batch["id"], batch["label"])]

    assert sorted(got) == damaged_gldv2.good_samples

    # The training path counts what it skips, as the Ray Data decode stage does, and keeps its batches full.
    train = stream_shards(cfg, "train", lookup=manifest.label_lookup("full"), augment=True, keep_ids=False,
                          shuffle=True, worker_decode=True)
    batches = list(train_batches(train.dataset.iterator(), cfg, batch_size=16, device=CPU, counter=train.counter,
                                 worker_decode=True))
    assert all(len(b["image"]) == len(b["label"]) == 16 for b in batches)
    counts = train.counts()
    assert {r: counts.get(r, 0) for r in SKIP_REASONS} == damaged_gldv2.skips


# ---------------------------------------------------------------- embedding, end to end
# (Training with data.decode: worker, decoding and augmenting in the workers: tests/test_training.py, fault run.)


@pytest.mark.slow
def test_embedding_decodes_in_the_model_actors(ray_session, tiny_checkpoints, tmp_path):
    from ray_landmark.config import config_from_dict
    from ray_landmark.data.storage import resolve
    from ray_landmark.infer.config import EmbedSettings
    from ray_landmark.infer.embed import EmbedRequest, embed_splits, read_embeddings
    from ray_landmark.runs.checkpoint import load_model, read_checkpoint_config

    checkpoint = tiny_checkpoints["dolg"]
    data = config_from_dict(read_checkpoint_config(checkpoint), "checkpoint").data
    request = EmbedRequest(checkpoint=checkpoint, out=str(tmp_path / "emb"), splits=("test",),
                           settings=EmbedSettings(batch_size=16), data=data.model_copy(update={"decode": "worker"}))
    summary = embed_splits(request, printer=lambda line, transient=False: None)
    ids, embeddings = read_embeddings(resolve(str(tmp_path / "emb" / "test")))
    assert summary["test"]["listed_but_not_embedded"] == 0 and len(ids) == summary["test"]["listed"]

    # The same vectors as the model gives the Ray Data decode stage's images of the same JPEGs.
    jpegs = {}
    for shard in sorted((Path(data.root) / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            jpegs.update({Path(m.name).stem: tar.extractfile(m).read() for m in tar if m.isreg()})
    model = load_model(checkpoint).model.eval()
    images = np.stack([decode_resized(jpegs[i], data.image_size, data.preprocessing) for i in ids])
    with torch.inference_mode():
        expected = model.embed(normalize_on_device(torch.from_numpy(images)))
    cosine = (expected.numpy() * embeddings.astype(np.float32)).sum(axis=1)
    assert cosine.min() > 0.99, collections.Counter(np.round(cosine, 2))
