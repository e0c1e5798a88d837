import logging
import shutil

import numpy as np
import pytest
from skimage import draw, measure

from napari_supn._sample_data import load_sample
from napari_supn.segmentation import (
    MAX_PIXELS,
    CellposeWeightsError,
    _resolve_diameter,
    detect_brightfield,
    estimate_diameter,
    find_cellpose_weights,
    segment,
    to_grey,
    validate_image,
)

# Grid centres of the assembled NIH field (see conftest.assemble_touching_field):
# margin 24 + half a 64 px cell, then every 62 px.
GRID_CENTRES = [(24 + 32 + 62 * row, 24 + 32 + 62 * col) for row in range(2) for col in range(3)]


def assert_one_label_per_cell(labels):
    centroids = np.array([region.centroid for region in measure.regionprops(labels)])
    for centre in GRID_CENTRES:
        distances = np.linalg.norm(centroids - np.array(centre), axis=1)
        assert (distances < 12).sum() == 1, f"no single label centred near {centre}"


@pytest.mark.parametrize("field_name, brightfield", [
    ("touching_field_dark", False),
    ("touching_field_bright", True),
])
def test_classical_splits_touching_cells(request, field_name, brightfield):
    field = request.getfixturevalue(field_name)
    cell_pixels = np.any(field != field[0, 0], axis=-1)
    assert measure.label(cell_pixels).max() == 1, "fixture cells should touch"

    result = segment(field, method="classical")

    assert result.method == "classical"
    assert result.brightfield is brightfield
    assert result.n_cells == 6
    assert result.labels.dtype == np.int32
    assert result.labels.shape == field.shape[:2]
    assert_one_label_per_cell(result.labels)
    assert 50 < result.diameter < 70


def test_classical_respects_given_polarity(touching_field_bright):
    grey = touching_field_bright.mean(axis=-1).astype(np.uint16) * 200
    result = segment(grey, method="classical", brightfield=True, diameter=60)
    assert result.n_cells == 6
    assert result.brightfield is True


def test_classical_reports_progress(touching_field_dark):
    calls = []
    segment(touching_field_dark, method="classical", progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (5, 5)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_uniform_image_gives_empty_labels_and_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="napari_supn"):
        result = segment(np.full((64, 64), 7, np.uint8), method="classical")
    assert result.n_cells == 0
    assert not result.labels.any()
    assert "No cells found" in caplog.text


def test_estimate_diameter_of_disks():
    mask = np.zeros((200, 200), bool)
    for centre in [(40, 40), (40, 140), (140, 60), (150, 150)]:
        mask[draw.disk(centre, 20, shape=mask.shape)] = True
    assert estimate_diameter(mask) == pytest.approx(40, rel=0.1)


def test_estimate_diameter_inside_one_cluster():
    mask = np.zeros((120, 200), bool)
    for centre in [(60, 40), (60, 78), (60, 116), (60, 154)]:
        mask[draw.disk(centre, 20, shape=mask.shape)] = True
    assert measure.label(mask).max() == 1
    assert estimate_diameter(mask) == pytest.approx(40, rel=0.15)


@pytest.mark.parametrize("image, fragment", [
    (np.zeros((32, 32, 4)), "image[..., :3]"),
    (np.zeros((3, 32, 32)), "np.moveaxis"),
    (np.zeros((32, 32), complex), "dtype complex"),
    (np.zeros((8, 32)), "too small"),
    (np.broadcast_to(np.uint8(0), (MAX_PIXELS // 1000 + 1, 1000)), "tiles"),
    (np.full((32, 32), np.nan), "NaN"),
])
def test_invalid_image_raises(image, fragment):
    with pytest.raises(ValueError, match="image") as error:
        segment(image, method="classical")
    assert fragment in str(error.value)


def test_invalid_method_and_diameter_raise(touching_field_dark):
    with pytest.raises(ValueError, match="method 'watershed'"):
        segment(touching_field_dark, method="watershed")
    with pytest.raises(ValueError, match="diameter 2 px"):
        segment(touching_field_dark, method="classical", diameter=2)


def test_missing_weights_path_raises_without_download(tmp_path, touching_field_dark):
    missing = tmp_path / "no_such_model.pth"
    with pytest.raises(CellposeWeightsError) as error:
        segment(touching_field_dark, method="cellpose", cellpose_model=missing)
    assert isinstance(error.value, FileNotFoundError)
    assert isinstance(error.value, ValueError)
    assert str(missing) in str(error.value)
    assert "CELLPOSE_LOCAL_MODELS_PATH" in str(error.value)


def test_missing_model_name_names_the_folder(empty_cellpose_dir, touching_field_dark):
    with pytest.raises(CellposeWeightsError, match="cyto3") as error:
        segment(touching_field_dark, method="auto", cellpose_model="cyto3")
    assert str(empty_cellpose_dir / "cyto3") in str(error.value)

    with pytest.raises(CellposeWeightsError, match="classical"):
        segment(touching_field_dark, method="cellpose")


def test_auto_falls_back_to_classical(empty_cellpose_dir, touching_field_dark, caplog):
    with caplog.at_level(logging.INFO, logger="napari_supn"):
        result = segment(touching_field_dark, method="auto")
    assert find_cellpose_weights() is None
    assert result.method == "classical"
    assert "No Cellpose weights" in result.message
    assert str(empty_cellpose_dir) in result.message
    assert "classical segmentation ran" in caplog.text
    assert result.n_cells == 6


def disk_scene(script, seed=5):
    rng = np.random.default_rng(seed)
    image, labels = script.make_disk_image(rng, n_disks=10)
    return (np.clip(image, 0, None) * 1000).astype(np.uint16), labels


def assert_finds_disks(result, truth):
    n_disks = truth.max()
    assert result.method == "cellpose"
    assert abs(result.n_cells - n_disks) <= 1
    found = 0
    for disk in measure.regionprops(truth):
        cy, cx = (round(value) for value in disk.centroid)
        label = result.labels[cy, cx]
        if label and np.mean(truth[result.labels == label] == disk.label) > 0.8:
            found += 1
    assert found >= n_disks - 1


def test_cellpose_finds_disks(cellpose_test_weights, cellpose_test_model_script):
    image, truth = disk_scene(cellpose_test_model_script)
    result = segment(image, method="cellpose", cellpose_model=cellpose_test_weights,
                     diameter=cellpose_test_model_script.DISK_DIAMETER, device="cpu")
    assert result.brightfield is False
    assert_finds_disks(result, truth)


def test_auto_uses_weights_in_models_folder(empty_cellpose_dir, cellpose_test_weights,
                                            cellpose_test_model_script):
    shutil.copy(cellpose_test_weights, empty_cellpose_dir / "cyto3")
    image, truth = disk_scene(cellpose_test_model_script, seed=6)
    result = segment(image, method="auto", device="cpu")
    assert "cyto3" in result.message
    assert_finds_disks(result, truth)


def test_unreadable_weights_raise(tmp_path, touching_field_dark):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a torch file")
    with pytest.raises(CellposeWeightsError, match="not a Cellpose 3 weights file"):
        segment(touching_field_dark, method="cellpose", cellpose_model=broken, device="cpu")


def count_matched_cells(labels, truth, min_iou=0.5):
    """Count true cells that one predicted label overlaps with IoU >= min_iou."""
    matched = 0
    for cell in range(1, int(truth.max()) + 1):
        cell_mask = truth == cell
        ids, overlaps = np.unique(labels[cell_mask], return_counts=True)
        for label, overlap in zip(ids, overlaps):
            if label == 0:
                continue
            union = cell_mask.sum() + (labels == label).sum() - overlap
            if overlap / union >= min_iou:
                matched += 1
                break
    return matched


@pytest.mark.parametrize("sample, brightfield, min_matched", [
    ("fluorescence", False, 28),
    ("giemsa", True, 18),
])
def test_classical_matches_sample_field_cells(sample, brightfield, min_matched):
    image, truth, cells = load_sample(sample)
    assert truth.max() == len(cells)

    result = segment(image, method="classical")

    assert result.brightfield is brightfield
    assert count_matched_cells(result.labels, truth) >= min_matched
    assert abs(result.n_cells - len(cells)) <= 2


def test_classical_finds_dim_fluorescence_cells():
    # Positions 21 and 22 of the fluorescence sample have a mean intensity
    # of about 24 on a background of 20 (uint8), far below Otsu's threshold.
    image, truth, _ = load_sample("fluorescence")
    result = segment(image, method="classical")
    for position in (21, 22):
        cell_mask = truth == position
        assert result.labels[cell_mask].any(), f"dim cell {position} has no label"
        assert count_matched_cells(result.labels, cell_mask.astype(np.uint8)) == 1


def tile_sample(key, repeats, shape=None):
    """Tile a sample field ``repeats`` times per axis and crop it to ``shape``.

    Returns the field, the sample's cell table, and the number of cells
    expected in the field (the sample's count scaled by area).
    """
    image, _, cells = load_sample(key)
    tiled = np.tile(image, (repeats, repeats) + (1,) * (image.ndim - 2))
    if shape is not None:
        tiled = tiled[:shape[0], :shape[1]]
    area_ratio = (tiled.shape[0] * tiled.shape[1]) / (image.shape[0] * image.shape[1])
    return tiled, cells, len(cells) * area_ratio


def sample_diameter(cells):
    """Median equivalent diameter of the pasted cells, in pixels."""
    return float(np.sqrt(4 * np.median(cells["area"]) / np.pi))


@pytest.mark.parametrize("key, shape, brightfield", [
    ("fluorescence", None, False),
    ("fluorescence", (960, 1280), False),
    ("giemsa", (960, 1280), True),
])
def test_classical_on_tiled_sample_fields(key, shape, brightfield):
    image, cells, expected_cells = tile_sample(key, 2, shape)

    result = segment(image, method="classical")

    assert result.brightfield is brightfield
    assert result.diameter == pytest.approx(sample_diameter(cells), rel=0.15)
    assert result.n_cells >= 0.75 * expected_cells


def test_polarity_and_diameter_on_7x7_tiled_fluorescence():
    # 3920×4704 px: the polarity check must not shrink these 63 px cells
    # below a recognisable size. A full segmentation takes about 20 s, so
    # the two estimates are tested directly.
    image, cells, _ = tile_sample("fluorescence", 7)
    image = validate_image(image)

    brightfield = detect_brightfield(image)
    diameter = _resolve_diameter(to_grey(image), None)

    assert brightfield is False
    assert diameter == pytest.approx(sample_diameter(cells), rel=0.15)


def test_implausible_diameter_estimate_raises():
    # With the polarity forced wrong, the background is measured as one
    # cell larger than the image.
    image, _, _ = load_sample("fluorescence")
    with pytest.raises(ValueError, match="estimated cell diameter") as error:
        segment(image, method="classical", brightfield=True)
    assert "--diameter" in str(error.value)
    assert "560×672" in str(error.value)
