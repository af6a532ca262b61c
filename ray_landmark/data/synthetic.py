"""A synthetic GLDv2: the official files and columns, with images that can be learned like the real task.

A landmark is a persistent scene (a "building" of a few textured shapes, fixed per landmark); each of its images is a
different view of it: perspective, scale, crop, rotation, lighting, partial occlusion and a new background. Class sizes
are long-tailed (Zipf). Non-landmark images are unrelated clutter. The full train set carries label noise (clutter
filed under a landmark, and very hard views), which the "clean" subset drops, as GLDv2c does.

Everything is deterministic from the seed; each image's randomness comes from (seed, image number) alone.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ray_landmark.data import gldv2
from ray_landmark.data.config import SyntheticSpec
from ray_landmark.data.storage import Location, write_bytes

log = logging.getLogger(__name__)

# What the synthetic CSVs hold where GLDv2 has a Wikimedia address, and how test images split between the usages.
URL_PREFIX = "https://upload.wikimedia.org/synthetic/"  # train.csv's url: URL_PREFIX + <id>.jpg
CATEGORY_PREFIX = "http://commons.wikimedia.org/wiki/Category:Synthetic_"  # + <landmark_id>
USAGE_SHARES = {"Public": 0.3, "Private": 0.6, "Ignored": 0.1}


# ---------------------------------------------------------------- rendering


def _random_color(rng: np.random.Generator, low: int = 30, high: int = 230) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def _draw_textured_shape(draw: ImageDraw.ImageDraw, rng, kind: str, box, color, pattern: str, pattern_color) -> None:
    x0, y0, x1, y1 = box
    if kind == "rect":
        draw.rectangle(box, fill=color + (255,))
    elif kind == "ellipse":
        draw.ellipse(box, fill=color + (255,))
    elif kind == "triangle":
        draw.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], fill=color + (255,))
    else:  # arch: a rectangle topped by a half disc
        mid = y0 + (y1 - y0) / 3
        draw.rectangle((x0, mid, x1, y1), fill=color + (255,))
        draw.pieslice((x0, y0, x1, mid + (mid - y0)), 180, 360, fill=color + (255,))
    if kind in ("rect", "arch"):
        w, h = x1 - x0, y1 - y0
        if pattern == "windows":
            cols, rows = 3 + int(w // 40), 2 + int(h // 40)
            for i in range(cols):
                for j in range(rows):
                    cx0 = x0 + w * (i + 0.25) / cols
                    cy0 = y0 + h * (j + 0.3) / rows
                    draw.rectangle((cx0, cy0, cx0 + w * 0.5 / cols, cy0 + h * 0.45 / rows), fill=pattern_color + (255,))
        elif pattern == "stripes":
            n = 4 + int(rng.integers(0, 5))
            for i in range(n):
                sx = x0 + w * i / n
                draw.rectangle((sx, y0, sx + w * 0.35 / n, y1), fill=pattern_color + (255,))


def render_building(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A landmark's identity: an RGBA layer of textured shapes on a transparent canvas."""
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(3, 7))):
        kind = str(rng.choice(["rect", "rect", "ellipse", "triangle", "arch"]))
        w = width * rng.uniform(0.15, 0.45)
        h = height * rng.uniform(0.2, 0.6)
        cx = width * rng.uniform(0.25, 0.75)
        bottom = height * rng.uniform(0.65, 0.9)
        box = (cx - w / 2, bottom - h, cx + w / 2, bottom)
        pattern = str(rng.choice(["windows", "stripes", "plain"]))
        _draw_textured_shape(draw, rng, kind, box, _random_color(rng), pattern, _random_color(rng))
    return layer


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A sky-to-ground gradient with noise, new for every image."""
    top, bottom = np.array(_random_color(rng, 60, 250), float), np.array(_random_color(rng, 20, 200), float)
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    img = top * (1 - t) + bottom * t
    img = np.broadcast_to(img, (height, width, 3)) + rng.normal(0, 8, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """PIL's PERSPECTIVE coefficients that map output points ``dst`` back to input points ``src``."""
    rows = []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(rows, float), src.reshape(-1).astype(float)).tolist()


def render_view(building: Image.Image, rng: np.random.Generator, width: int, height: int, hard: bool) -> Image.Image:
    """One photo of a landmark: a random viewpoint, lighting, occlusion and background."""
    bw, bh = building.size
    corners = np.array([[0, 0], [bw, 0], [bw, bh], [0, bh]], float)
    scale = rng.uniform(0.75, 1.25) if not hard else rng.uniform(0.45, 1.6)
    angle = np.deg2rad(rng.uniform(-12, 12) if not hard else rng.uniform(-35, 35))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([width, height]) / 2 + rng.uniform(-0.12, 0.12, 2) * [width, height]
    fit = min(width / bw, height / bh) * scale
    dst = (corners - [bw / 2, bh / 2]) * fit @ rot.T + centre
    dst += rng.uniform(-0.1, 0.1, dst.shape) * [width, height]  # perspective: each corner moves on its own
    warped = building.transform((width, height), Image.PERSPECTIVE, _perspective_coeffs(corners, dst), Image.BILINEAR)

    scene = Image.fromarray(_background(rng, width, height))
    scene.paste(warped, (0, 0), warped)
    pixels = np.asarray(scene, dtype=float)
    gain = rng.uniform(0.6, 1.35) * rng.uniform(0.88, 1.12, 3)  # exposure and white balance
    contrast = rng.uniform(0.75, 1.25)
    mean = pixels.mean()
    pixels = np.clip((pixels - mean) * contrast + mean, 0, 255) * gain
    scene = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    if rng.random() < (0.5 if not hard else 0.9):  # partial occlusion (a person, a tree, a car...)
        draw = ImageDraw.Draw(scene)
        ow, oh = width * rng.uniform(0.15, 0.4), height * rng.uniform(0.15, 0.45)
        ox, oy = rng.uniform(0, width - ow), rng.uniform(0, height - oh)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((ox, oy, ox + ow, oy + oh), fill=_random_color(rng, 0, 255))
    return scene


def render_clutter(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A non-landmark photo: unrelated shapes and texture with no persistent identity."""
    scene = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(scene)
    for _ in range(int(rng.integers(6, 20))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.03, 0.2) * width
        box = (x - r, y - r * rng.uniform(0.3, 1.5), x + r, y + r)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_random_color(rng, 0, 255))
    return scene


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


# ---------------------------------------------------------------- dataset plan


@dataclass
class _Image:
    image_id: str
    split: str
    landmark: int  # landmark number in the plan that the image shows; -1 for clutter
    filed_under: int = -1  # landmark number its metadata row names (differs for label noise)
    hard: bool = False


def _class_sizes(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    ranks = rng.permutation(spec.num_landmarks) + 1
    sizes = spec.max_images_per_landmark * ranks ** (-spec.tail_exponent)
    return np.maximum(spec.min_images_per_landmark, np.round(sizes)).astype(int)


def unique_image_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct random image ids as uint64, in random order (16 spare draws cover any collision)."""
    values = np.unique(rng.integers(0, np.iinfo(np.uint64).max, size=n + 16, dtype=np.uint64, endpoint=False))
    return rng.permutation(values)[:n]


class _Plan:
    """Which image is what: ids, splits, landmark of each image, and the GLDv2 tables derived from that."""

    def __init__(self, spec: SyntheticSpec):
        rng = np.random.default_rng(spec.seed)
        n_lm = spec.num_landmarks
        n_distractors = spec.index_distractor_landmarks
        # Public landmark ids: distinct ints in GLDv2's range; index landmarks have their own namespace.
        lm_ids = rng.choice(210_000, size=n_lm, replace=False)
        index_lm_ids = rng.choice(np.arange(300_000, 400_000), size=n_lm + n_distractors, replace=False)
        clean = np.zeros(n_lm, bool)
        clean[rng.choice(n_lm, size=max(1, round(n_lm * spec.clean_landmark_fraction)), replace=False)] = True
        sizes = _class_sizes(spec, rng)
        clean_lms = np.flatnonzero(clean)

        test_lms = rng.choice(clean_lms, size=spec.test_landmark_images, replace=True)
        index_lms = list(np.unique(test_lms)) * spec.index_images_per_test_landmark
        index_lms += [n_lm + d for d in range(n_distractors) for _ in range(spec.index_distractor_images)]

        n_train = int(sizes.sum())
        n_test = spec.test_landmark_images + spec.test_non_landmark_images
        n_ids = n_train + n_test + len(index_lms) + spec.index_unlisted_images
        ids = iter(gldv2.u64_to_ids(unique_image_ids(rng, n_ids)))

        self.images: list[_Image] = []
        train_clean_rows = []
        for lm in range(n_lm):
            n_noisy = int(round(sizes[lm] * spec.noisy_image_fraction)) if sizes[lm] > spec.min_images_per_landmark else 0
            kept = []
            for k in range(sizes[lm]):
                noisy = k < n_noisy
                # Half of the noise is mislabelled clutter, half very hard views of the landmark.
                img = _Image(next(ids), "train", -1 if noisy and k % 2 == 0 else lm, filed_under=lm, hard=noisy)
                self.images.append(img)
                if not noisy:
                    kept.append(img.image_id)
            if clean[lm]:
                train_clean_rows.append((int(lm_ids[lm]), " ".join(kept)))
        for lm in test_lms:
            self.images.append(_Image(next(ids), "test", int(lm)))
        for _ in range(spec.test_non_landmark_images):
            self.images.append(_Image(next(ids), "test", -1))
        for lm in index_lms:
            self.images.append(_Image(next(ids), "index", int(lm)))
        for _ in range(spec.index_unlisted_images):
            self.images.append(_Image(next(ids), "index", -1))

        train = [i for i in self.images if i.split == "train"]
        self.train = pd.DataFrame(
            {
                "id": [i.image_id for i in train],
                "url": [f"{URL_PREFIX}{i.image_id}.jpg" for i in train],
                "landmark_id": [int(lm_ids[i.filed_under]) for i in train],
            }
        )
        self.train_clean = pd.DataFrame(sorted(train_clean_rows), columns=["landmark_id", "images"])
        self.label_to_category = pd.DataFrame(
            {
                "landmark_id": sorted(int(x) for x in lm_ids),
                "category": [f"{CATEGORY_PREFIX}{x}" for x in sorted(lm_ids)],
            }
        )
        index = [i for i in self.images if i.split == "index"]
        test = [i for i in self.images if i.split == "test"]
        self.index = pd.DataFrame({"id": [i.image_id for i in index]})
        self.test = pd.DataFrame({"id": [i.image_id for i in test]})
        listed = [i for i in index if i.landmark >= 0]
        self.index_to_landmark = pd.DataFrame(
            {"id": [i.image_id for i in listed], "landmark_id": [int(index_lm_ids[i.landmark]) for i in listed]}
        )
        usage = rng.choice(list(USAGE_SHARES), size=len(test), p=list(USAGE_SHARES.values()))
        index_by_lm: dict[int, list[str]] = {}
        for i in listed:
            index_by_lm.setdefault(i.landmark, []).append(i.image_id)
        self.recognition_gt = pd.DataFrame(
            {
                "id": [i.image_id for i in test],
                "landmarks": [str(int(lm_ids[i.landmark])) if i.landmark >= 0 else "" for i in test],
                "Usage": usage,
            }
        )
        self.retrieval_gt = pd.DataFrame(
            {
                "id": [i.image_id for i in test],
                "images": [" ".join(index_by_lm[i.landmark]) if i.landmark >= 0 else "None" for i in test],
                "Usage": [u if i.landmark >= 0 else "Ignored" for i, u in zip(test, usage)],
            }
        )
        shard_counts = {"train": spec.train_shards, "index": spec.index_shards, "test": spec.test_shards}
        self.shard_of = {i.image_id: int(rng.integers(0, shard_counts[i.split])) for i in self.images}
        self.shard_counts = shard_counts


def render_image(spec: SyntheticSpec, number: int, image: _Image, buildings: dict) -> bytes:
    rng = np.random.default_rng([spec.seed, 1, number])
    if image.landmark < 0:
        img = render_clutter(rng, spec.width, spec.height)
    else:
        if image.landmark not in buildings:
            brng = np.random.default_rng([spec.seed, 2, image.landmark])
            buildings[image.landmark] = render_building(brng, spec.width, spec.height)
        img = render_view(buildings[image.landmark], rng, spec.width, spec.height, image.hard)
    return jpeg_bytes(img, spec.jpeg_quality)


def csv_files(tables: dict[str, pd.DataFrame]) -> dict[str, bytes]:
    """GLDv2's CSV files holding ``tables``: each file's path under the dataset root -> its bytes."""
    return {name: df.to_csv(index=False).encode() for name, df in tables.items()}


def write_shard(root: Location, split: str, shard: int, members: list[tuple[str, bytes]]) -> int:
    """Tar shard ``shard`` of ``split`` as GLDv2 has it (``gldv2.pack_tar``), then its md5 file; the tar's bytes."""
    tar = gldv2.pack_tar(members)
    write_bytes(root.child(split, gldv2.shard_name(shard)), tar)
    md5 = hashlib.md5(tar).hexdigest()
    write_bytes(root.child(gldv2.checksum_name(split, shard)), f"{md5}  {gldv2.shard_name(shard)}\n".encode())
    return len(tar)


def write_synthetic_gldv2(spec: SyntheticSpec, root: Location, progress=print) -> dict:
    """Write the whole dataset under ``root`` (a local folder or bucket) and return a summary of what was written."""
    started = time.perf_counter()
    plan = _Plan(spec)
    tables = {
        gldv2.TRAIN_CSV: plan.train,
        gldv2.TRAIN_CLEAN_CSV: plan.train_clean,
        gldv2.LABEL_TO_CATEGORY_CSV: plan.label_to_category,
        gldv2.INDEX_CSV: plan.index,
        gldv2.TEST_CSV: plan.test,
        gldv2.INDEX_TO_LANDMARK_CSV: plan.index_to_landmark,
        gldv2.RECOGNITION_GT_CSV: plan.recognition_gt,
        gldv2.RETRIEVAL_GT_CSV: plan.retrieval_gt,
    }
    for name, data in csv_files(tables).items():
        write_bytes(root.child(name), data)

    members: dict[tuple[str, int], list[tuple[str, bytes]]] = {}
    buildings: dict[int, Image.Image] = {}
    for number, image in enumerate(plan.images):
        data = render_image(spec, number, image, buildings)
        members.setdefault((image.split, plan.shard_of[image.image_id]), []).append(
            (gldv2.member_name(image.image_id), data)
        )
        if progress and (number + 1) % 500 == 0:
            progress(f"synthetic GLDv2: rendered {number + 1}/{len(plan.images)} images")
    for split, n_shards in plan.shard_counts.items():
        for shard in range(n_shards):
            write_shard(root, split, shard, members.get((split, shard), []))

    summary = {
        "root": root.uri,
        "spec": spec.model_dump(),
        "images": {s: sum(1 for i in plan.images if i.split == s) for s in gldv2.SPLITS},
        "landmarks": spec.num_landmarks,
        "clean_landmarks": len(plan.train_clean),
        "clean_images": int(plan.train_clean["images"].str.split().str.len().sum()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if progress:
        progress(f"synthetic GLDv2: wrote {summary['images']} images to {root.uri} in {summary['seconds']} s")
    return summary
