"""The CPU augmentation of Ray Data's decode tasks (data/transforms.py ``augment_hwc``), and their decode without
torch where they do not augment (data/jpeg.py)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ray_landmark.data.transforms import AUGMENT_CHUNK, TrainAugmentation, augment_hwc


def test_augmenting_a_few_images_at_a_time_is_the_augmentation_of_each_chunk():
    images = np.random.default_rng(0).integers(0, 256, (2 * AUGMENT_CHUNK + 1, 32, 32, 3), dtype=np.uint8)
    before = images.copy()
    out = augment_hwc(images, TrainAugmentation(seed=5))

    reference = TrainAugmentation(seed=5)  # the same draws, chunk by chunk, in the NCHW layout
    chunks = [torch.from_numpy(images[s:s + AUGMENT_CHUNK].transpose(0, 3, 1, 2).copy())
              for s in range(0, len(images), AUGMENT_CHUNK)]
    expected = np.concatenate([reference(chunk).permute(0, 2, 3, 1).numpy() for chunk in chunks])
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(images, before)  # the input batch is left as it was
    assert not np.array_equal(out, images)  # nine images: some augmentation was drawn


# With torch unimportable (a None in sys.modules fails the import): a decode task that does not augment runs, one that
# augments needs torch.
WITHOUT_TORCH = """
import io, sys
import numpy as np
from PIL import Image
sys.modules["torch"] = None
from ray_landmark.data.pipeline import decode_images

class Tally:
    def add(self, counts): pass

buffer = io.BytesIO()
Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(buffer, "JPEG")
batch = {"id": np.array(["a", "b"]), "jpeg": np.array([buffer.getvalue(), b"not a jpeg"], object),
         "label": np.array([3, 4])}
out = decode_images(batch, image_size=32, preprocessing="fast", augment=False, keep_ids=False, counter=Tally())
assert out["image"].shape == (1, 32, 32, 3) and out["label"].tolist() == [3], out
try:
    decode_images(batch, image_size=32, preprocessing="fast", augment=True, keep_ids=False, counter=Tally())
except ImportError:
    print("augmenting needs torch")
"""


def test_a_decode_task_that_does_not_augment_runs_without_torch():
    """Every eval and embedding stream's tasks: a fresh task process skips torch's import (seconds on a small CPU)."""
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "augmenting needs torch"
