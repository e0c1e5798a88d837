from pathlib import Path

import numpy as np
import pytest
import torch

from napari_supn.data import load_crops
from napari_supn.preprocessing import (
    Preprocessing,
    equivalent_diameters,
    fit_preprocessing,
    rgb_to_grey,
)

DATA = Path(__file__).parent / "data" / "fl_supn"


@pytest.fixture(scope="module")
def crops():
    return load_crops(DATA)


def test_prepare_real_crops_shapes_and_range(crops):
    settings = fit_preprocessing(crops.images, crops.masks)
    x, mask = settings.prepare(crops.images, crops.masks)

    assert settings.model_size == 64
    assert x.shape == (16, 1, 64, 64)
    assert x.dtype == torch.float32
    assert x.min() >= -1.0
    assert x.max() <= 1.0
    assert mask.shape == (16, 1, 64, 64)
    assert mask.dtype == torch.bool
    coverage = mask.float().mean().item()
    assert coverage == pytest.approx(crops.masks.mean(), abs=0.02)


def test_prepare_without_masks_returns_none(crops):
    x, mask = Preprocessing().prepare(crops.images[:2])
    assert x.shape == (2, 1, 64, 64)
    assert mask is None


def test_intensity_mapping_is_fixed_not_per_crop(crops):
    settings = Preprocessing()
    bright, _ = settings.prepare(crops.images[:1])
    dim, _ = settings.prepare(crops.images[:1] // 2)
    # Per-crop min-max scaling would make these nearly identical.
    assert dim.mean() < bright.mean() - 0.1


def test_uint8_value_maps_to_expected_scale():
    settings = Preprocessing(blur_kernel=1, downsample=1, crop_size=8)
    image = np.full((1, 8, 8), 51, dtype=np.uint8)
    x, _ = settings.prepare(image)
    assert torch.allclose(x, torch.full_like(x, 51 / 127.5 - 1))


def test_uint16_and_uint8_give_same_input(crops):
    uint8_settings = fit_preprocessing(crops.images)
    uint16_images = crops.images.astype(np.uint16) * 257
    uint16_settings = fit_preprocessing(uint16_images)
    assert uint16_settings.intensity_high == 65535
    first, _ = uint8_settings.prepare(crops.images[:2])
    second, _ = uint16_settings.prepare(uint16_images[:2])
    assert torch.allclose(first, second, atol=1e-5)


def test_blur_is_applied_before_pooling():
    settings = Preprocessing(crop_size=16, downsample=1)
    image = np.zeros((1, 16, 16), dtype=np.uint8)
    image[0, 8, 8] = 255
    x, _ = settings.prepare(image)
    assert x[0, 0, 8, 8] < 0.0
    assert x[0, 0, 8, 9] > -1.0
    assert x[0, 0, 8, 9] < x[0, 0, 8, 8]


def test_mask_background_sets_outside_to_background_value(crops):
    settings = fit_preprocessing(crops.images, crops.masks, mask_background=True, background_value=-1.0)
    x, mask = settings.prepare(crops.images[:4], crops.masks[:4])
    far_outside = ~torch.nn.functional.max_pool2d(mask.float(), 5, stride=1, padding=2).bool()
    assert far_outside.any()
    assert torch.allclose(x[far_outside], torch.full_like(x[far_outside], -1.0), atol=1e-6)


def test_mask_background_requires_masks(crops):
    settings = Preprocessing(mask_background=True)
    with pytest.raises(ValueError, match="pass masks"):
        settings.prepare(crops.images[:1])


def test_rgb_crops_rejected_by_grey_model(crops):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, size=(2, 128, 128, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="expects grey crops.*rgb_to_grey"):
        Preprocessing(channels="grey").prepare(rgb)


def test_grey_crops_rejected_by_rgb_model(crops):
    with pytest.raises(ValueError, match="expects RGB crops"):
        Preprocessing(channels="rgb").prepare(crops.images[:2])


def test_grey_stored_as_rgb_accepted_by_grey_model(crops):
    settings = Preprocessing()
    stacked = np.repeat(crops.images[:2, ..., None], 3, axis=-1)
    from_rgb, _ = settings.prepare(stacked)
    from_grey, _ = settings.prepare(crops.images[:2])
    assert torch.equal(from_rgb, from_grey)


def test_rgb_model_gives_three_channels():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, size=(2, 32, 32, 3), dtype=np.uint8)
    settings = fit_preprocessing(rgb, downsample=2)
    x, _ = settings.prepare(rgb)
    assert settings.channels == "rgb"
    assert x.shape == (2, 3, 16, 16)


def test_wrong_crop_size_rejected(crops):
    with pytest.raises(ValueError, match="64×64 pixels but the model expects 128×128"):
        Preprocessing().prepare(crops.images[:1, :64, :64])


def test_nan_crops_rejected():
    images = np.zeros((1, 128, 128), dtype=np.float32)
    images[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Preprocessing().prepare(images)


def test_fit_preprocessing_measures_cell_diameter(crops):
    settings = fit_preprocessing(crops.images, crops.masks)
    assert settings.cell_diameter == pytest.approx(np.median(equivalent_diameters(crops.masks)))
    assert 40 < settings.cell_diameter < 100
    assert settings.intensity_source == "dtype"


def test_fit_preprocessing_percentile_range(crops):
    settings = fit_preprocessing(crops.images, intensity="percentile", percentiles=(1, 99))
    low, high = np.percentile(crops.images, (1, 99))
    assert settings.intensity_low == pytest.approx(low)
    assert settings.intensity_high == pytest.approx(high)
    assert settings.intensity_source == "percentile"


def test_equivalent_diameter_of_disk():
    yy, xx = np.mgrid[0:101, 0:101]
    disk = ((yy - 50) ** 2 + (xx - 50) ** 2 <= 30**2)[None]
    assert equivalent_diameters(disk)[0] == pytest.approx(60, abs=1)


def test_rgb_to_grey_uses_luma_weights():
    pixel = np.array([[[100, 200, 50]]], dtype=np.uint8)
    assert rgb_to_grey(pixel)[0, 0] == round(0.299 * 100 + 0.587 * 200 + 0.114 * 50)


def test_preprocessing_round_trips_through_dict():
    settings = Preprocessing(channels="rgb", crop_mode="bbox_resize", cell_diameter=55.5)
    assert Preprocessing.from_dict(settings.to_dict()) == settings


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"channels": "grayscale"}, "'grayscale'"),
        ({"crop_size": 100, "downsample": 3}, "divisible"),
        ({"blur_kernel": 4}, "odd"),
        ({"intensity_low": 5.0, "intensity_high": 5.0}, "intensity_low"),
        ({"crop_mode": "tight"}, "crop_mode"),
    ],
)
def test_preprocessing_rejects_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(**overrides)
