"""The built-in synthetic street scenes: seeded, any size, Cityscapes train ids, classes visually distinct."""

from __future__ import annotations

import numpy as np
import pytest

from segmentation.data.synthetic import SYNTHETIC_CLASS_IDS, generate_scene


def test_same_seed_same_scene_other_seed_differs():
    image_a, mask_a = generate_scene(64, 128, (0, 3))
    image_b, mask_b = generate_scene(64, 128, (0, 3))
    assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
    image_c, _ = generate_scene(64, 128, (0, 4))
    assert not np.array_equal(image_a, image_c)


@pytest.mark.parametrize("size", [(32, 32), (64, 128), (97, 61)])
def test_any_size(size):
    image, mask = generate_scene(*size, seed=1)
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert mask.shape == size and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= set(SYNTHETIC_CLASS_IDS)


def test_every_class_occurs_and_sky_is_on_top():
    masks = [generate_scene(96, 192, (0, i))[1] for i in range(8)]
    assert set(np.unique(np.stack(masks))) == set(SYNTHETIC_CLASS_IDS)
    for mask in masks:
        assert (mask[0] != 0).all()  # no road in the top row
        assert (mask[-1] != 10).all()  # no sky in the bottom row


def test_classes_have_distinct_mean_colours():
    # A small CNN has to separate them: mean BGR colours per class differ clearly across a few scenes.
    sums, counts = {}, {}
    for i in range(6):
        image, mask = generate_scene(96, 192, (1, i))
        for c in SYNTHETIC_CLASS_IDS:
            sel = mask == c
            sums[c] = sums.get(c, 0) + image[sel].astype(np.float64).sum(axis=0)
            counts[c] = counts.get(c, 0) + sel.sum()
    means = {c: sums[c] / counts[c] for c in SYNTHETIC_CLASS_IDS if counts[c]}
    road, sidewalk, sky, vegetation = (means[c] for c in (0, 1, 10, 8))
    assert np.abs(road - sidewalk).sum() > 100 and np.abs(sky - vegetation).sum() > 100
    assert sky[0] > sky[2]  # BGR: the sky is blue, channel 0 is the largest
    assert vegetation[1] > vegetation[0] and vegetation[1] > vegetation[2]  # and vegetation green


def test_too_small_is_an_error():
    with pytest.raises(ValueError, match="height and width >= 32"):
        generate_scene(16, 64, 0)
