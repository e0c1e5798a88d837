"""Cell masks derived from black-background crops for masked models."""

from pathlib import Path

import numpy as np

from napari_supn.data import load_crops
from napari_supn.evaluation import masks_from_black_background

NIH = Path(__file__).parent / "data" / "nih"


def test_masks_cover_cell_not_background():
    crops = load_crops(NIH)
    masks = masks_from_black_background(crops.images)

    assert masks.shape == crops.images.shape[:3]
    assert masks.dtype == bool
    for image, mask in zip(crops.images, masks):
        # The cell fills most of a bbox-resized crop, and the corners are background.
        assert 0.4 < mask.mean() < 0.95
        assert not mask[0, 0]
        assert not mask[-1, -1]
        assert (image[~mask].max(axis=-1) <= 10).mean() > 0.95


def test_masks_fill_holes_and_keep_largest_component():
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 4:20, 4:20] = 200
    image[0, 10:12, 10:12] = 0  # a dark hole inside the cell
    image[0, 26:29, 26:29] = 200  # a detached fragment

    mask = masks_from_black_background(image)[0]

    assert mask[10, 10]
    assert mask[4:20, 4:20].all()
    assert not mask[27, 27]
    assert mask.sum() == 16 * 16


def test_masks_accept_grey_crops():
    image = np.zeros((2, 16, 16), np.uint8)
    image[:, 2:10, 3:12] = 120

    masks = masks_from_black_background(image)

    assert masks.shape == (2, 16, 16)
    assert masks.sum() == 2 * 8 * 9
