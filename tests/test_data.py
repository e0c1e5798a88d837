import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io

from napari_supn.data import load_crops, read_image

DATA = Path(__file__).parent / "data" / "fl_supn"


def test_load_paired_folder_with_masks():
    crops = load_crops(DATA)
    assert crops.images.shape == (16, 128, 128)
    assert crops.images.dtype == np.uint8
    assert crops.masks.shape == (16, 128, 128)
    assert crops.masks.dtype == bool
    assert crops.names[0] == "00000.png"
    assert crops.names == sorted(crops.names)
    assert 0.05 < crops.masks.mean() < 0.6


def test_load_paired_folder_ignoring_masks():
    crops = load_crops(DATA, use_masks=False, limit=3)
    assert crops.masks is None
    assert len(crops) == 3


def test_flat_folder_skips_non_images(tmp_path, caplog):
    for name in ("00000.png", "00001.png"):
        shutil.copy(DATA / "raw" / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.INFO, logger="napari_supn"):
        crops = load_crops(tmp_path)
    assert len(crops) == 2
    assert crops.masks is None
    assert "Skipped 1 non-image files" in caplog.text


def test_crop_without_mask_is_named(tmp_path):
    shutil.copytree(DATA, tmp_path / "set")
    (tmp_path / "set" / "mask" / "00003.png").unlink()
    with pytest.raises(ValueError, match="00003.png has no mask"):
        load_crops(tmp_path / "set")


def test_mask_without_crop_is_named(tmp_path):
    shutil.copytree(DATA, tmp_path / "set")
    (tmp_path / "set" / "raw" / "00005.png").unlink()
    with pytest.raises(ValueError, match="mask .*00005.png has no crop"):
        load_crops(tmp_path / "set")


def test_mixed_sizes_are_named(tmp_path):
    for name in ("00000.png", "00001.png"):
        shutil.copy(DATA / "raw" / name, tmp_path / name)
    io.imsave(tmp_path / "00002.png", np.zeros((64, 64), dtype=np.uint8), check_contrast=False)
    with pytest.raises(ValueError, match="00002.png has shape"):
        load_crops(tmp_path)


def test_mixed_channels_are_named(tmp_path):
    shutil.copy(DATA / "raw" / "00000.png", tmp_path / "a.png")
    io.imsave(tmp_path / "b.png", np.zeros((128, 128, 3), dtype=np.uint8), check_contrast=False)
    with pytest.raises(ValueError, match="b.png has shape \\(128, 128, 3\\)"):
        load_crops(tmp_path)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        load_crops(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_crops(tmp_path / "absent")


def test_read_image_drops_alpha(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    io.imsave(tmp_path / "rgba.png", rgba, check_contrast=False)
    image = read_image(tmp_path / "rgba.png")
    assert image.shape == (8, 8, 3)
    assert (image[..., 0] == 200).all()


def test_read_image_reads_uint16_tiff(tmp_path):
    data = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    tifffile.imwrite(tmp_path / "crop.tif", data)
    image = read_image(tmp_path / "crop.tif")
    assert image.dtype == np.uint16
    assert np.array_equal(image, data)


def test_read_image_names_unreadable_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        read_image(path)


def test_subset_keeps_masks_and_names():
    crops = load_crops(DATA).subset([2, 5])
    assert crops.names == ["00002.png", "00005.png"]
    assert crops.masks.shape == (2, 128, 128)
