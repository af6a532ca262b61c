"""The CPU augmentation of Ray Data's decode tasks (data/transforms.py ``augment_hwc``)."""

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
