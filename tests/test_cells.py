import numpy as np
import pytest
from skimage import draw

from napari_supn.cells import extract_cells, iter_cell_batches, paste_to_field
from napari_supn.preprocessing import Preprocessing

SPOT = (92, 171)  # row, col of the bright spot inside cell 3


def synthetic_field():
    """Four elliptical cells (two touching, one cut by the left edge) on a dark field.

    Returns
    -------
    image : (160, 240) float32, labels : (160, 240) int32
    """
    image = np.full((160, 240), 20.0, np.float32)
    labels = np.zeros((160, 240), np.int32)
    cells = [((50, 60), (22, 26)), ((50, 110), (20, 24)), ((100, 170), (24, 34)), ((120, 10), (20, 20))]
    for cell_id, (centre, radii) in enumerate(cells, start=1):
        rows, cols = draw.ellipse(*centre, *radii, shape=labels.shape)
        labels[rows, cols] = cell_id
        image[rows, cols] = 100.0 + 10 * cell_id

    rows, cols = np.mgrid[:160, :240]
    image += 120.0 * np.exp(-((rows - SPOT[0]) ** 2 + (cols - SPOT[1]) ** 2) / (2 * 1.5**2))
    return image, labels


def average_pool(maps, factor):
    n, size, _ = maps.shape
    return maps.reshape(n, size // factor, factor, size // factor, factor).mean(axis=(2, 4))


@pytest.mark.parametrize("crop_mode, cell_diameter", [
    ("centred", None),
    ("centred", 40.0),
    ("bbox_resize", None),
])
@pytest.mark.parametrize("pool", [1, 2])
def test_paste_back_puts_spot_in_place(crop_mode, cell_diameter, pool):
    image, labels = synthetic_field()
    settings = Preprocessing(crop_size=96, downsample=2, crop_mode=crop_mode, cell_diameter=cell_diameter)
    cells = extract_cells(image, labels, settings)
    maps = average_pool(cells.images, pool) if pool > 1 else cells.images

    field = paste_to_field(maps, cells, labels.shape)

    peak = np.unravel_index(np.argmax(field), field.shape)
    assert abs(peak[0] - SPOT[0]) <= 1.5 * pool
    assert abs(peak[1] - SPOT[1]) <= 1.5 * pool
    assert field.dtype == np.float32
    assert np.all(field[labels == 0] == 0)
    assert field[labels == 1].max() < 150


def test_masks_hold_own_cell_only():
    image, labels = synthetic_field()
    settings = Preprocessing(crop_size=96, crop_mode="centred")
    cells = extract_cells(image, labels, settings)

    first = cells.images[0][cells.masks[0]]
    assert np.mean(np.isclose(first, 110.0, atol=1.0)) > 0.85
    assert cells.masks[0].sum() == pytest.approx(cells.area[0], rel=0.02)
    # Cell 2 touches cell 1 and lies inside cell 1's crop, but outside its mask.
    assert np.any(np.isclose(cells.images[0], 120.0) & ~cells.masks[0])


def test_centred_crop_rescales_to_cell_diameter():
    image, labels = synthetic_field()
    settings = Preprocessing(crop_size=96, crop_mode="centred", cell_diameter=50.0)
    cells = extract_cells(image, labels, settings)
    diameters = 2 * np.sqrt(cells.masks.reshape(len(cells), -1).sum(axis=1) / np.pi)
    interior = ~cells.touches_border
    assert np.allclose(diameters[interior], 50.0, rtol=0.05)


def test_bbox_resize_fills_crop():
    image, labels = synthetic_field()
    settings = Preprocessing(crop_size=64, crop_mode="bbox_resize")
    cells = extract_cells(image, labels, settings)
    mask = cells.masks[2]
    assert mask[:, 0].any()
    assert mask[:, -1].any()
    assert mask[0].any()
    assert mask[-1].any()
    assert mask.mean() > 0.7


def test_border_cells_are_kept_and_marked():
    image, labels = synthetic_field()
    cells = extract_cells(image, labels, Preprocessing(crop_size=96))
    assert cells.labels.tolist() == [1, 2, 3, 4]
    assert cells.touches_border.tolist() == [False, False, False, True]
    assert np.all(np.isfinite(cells.images))
    # Pixels beyond the field edge are filled by reflection, never marked as the cell.
    left_of_field = np.arange(96) < (96 - 1) / 2 - cells.centroid_x[3]
    assert not cells.masks[3][:, left_of_field].any()


def test_mask_background_uses_raw_background():
    image, labels = synthetic_field()
    settings = Preprocessing(crop_size=96, mask_background=True, background_value=-1.0,
                             intensity_low=5.0, intensity_high=255.0)
    cells = extract_cells(image, labels, settings)
    assert np.all(cells.images[~cells.masks] == 5.0)
    x, mask = settings.prepare(cells.images, cells.masks)
    assert tuple(x.shape) == (4, 1, 48, 48)
    assert tuple(mask.shape) == (4, 1, 48, 48)


def test_rgb_field_gives_rgb_crops(touching_field_dark):
    labels = np.zeros(touching_field_dark.shape[:2], np.int32)
    labels[30:80, 30:80] = 1
    cells = extract_cells(touching_field_dark, labels, Preprocessing(channels="rgb", crop_size=64))
    assert cells.images.shape == (1, 64, 64, 3)
    assert cells.images.dtype == np.float32


def test_empty_labels_give_empty_crops():
    image, labels = synthetic_field()
    empty = np.zeros_like(labels)
    cells = extract_cells(image, empty, Preprocessing(crop_size=32))
    assert len(cells) == 0
    assert cells.images.shape == (0, 32, 32)
    assert cells.masks.shape == (0, 32, 32)
    assert list(iter_cell_batches(image, empty, Preprocessing(crop_size=32))) == []
    assert not paste_to_field(np.zeros((0, 32, 32)), cells, labels.shape).any()


def test_batches_match_single_extraction():
    image, labels = synthetic_field()
    settings = Preprocessing(crop_size=48, crop_mode="bbox_resize")
    batches = list(iter_cell_batches(image, labels, settings, batch_size=3))
    whole = extract_cells(image, labels, settings)
    assert [len(batch) for batch in batches] == [3, 1]
    assert np.array_equal(np.concatenate([batch.images for batch in batches]), whole.images)
    assert np.array_equal(np.concatenate([batch.labels for batch in batches]), whole.labels)


def test_labels_subset_selects_cells():
    image, labels = synthetic_field()
    cells = extract_cells(image, labels, Preprocessing(crop_size=48), labels_subset=[3, 1])
    assert cells.labels.tolist() == [1, 3]
    with pytest.raises(ValueError, match=r"label ids \[9\]"):
        extract_cells(image, labels, Preprocessing(crop_size=48), labels_subset=[9])


@pytest.mark.parametrize("labels, fragment", [
    (np.zeros((10, 10), np.int32), "does not match"),
    (np.zeros((160, 240), np.float32), "not an integer type"),
    (np.full((160, 240), -1, np.int32), "negative"),
])
def test_invalid_labels_raise(labels, fragment):
    image, _ = synthetic_field()
    with pytest.raises(ValueError, match=fragment):
        extract_cells(image, labels, Preprocessing(crop_size=32))


def test_paste_rejects_wrong_map_count():
    image, labels = synthetic_field()
    cells = extract_cells(image, labels, Preprocessing(crop_size=32))
    with pytest.raises(ValueError, match="4 cells"):
        paste_to_field(np.zeros((3, 32, 32)), cells, labels.shape)
