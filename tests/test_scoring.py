import numpy as np
import pytest
import torch

from napari_supn.evaluation import blend_ellipse, ellipse_mask, ranking_metrics
from napari_supn.progress import Cancelled, check_cancel
from napari_supn.scoring import erode_masks, healthy_quantiles, tile_sums


def test_tile_sums_adds_each_block():
    maps = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    tiles = tile_sums(maps, 2)
    expected = torch.tensor([[[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]])
    assert torch.equal(tiles, expected.float())


def test_tile_sums_pads_ragged_edges():
    maps = torch.ones(2, 5, 7)
    tiles = tile_sums(maps, 4)
    assert tiles.shape == (2, 2, 2)
    assert tiles.sum().item() == pytest.approx(2 * 5 * 7)
    assert tiles[0, 1, 1].item() == pytest.approx(1 * 3)


def test_tile_sums_rejects_zero_tile():
    with pytest.raises(ValueError, match="tile must be a positive"):
        tile_sums(torch.ones(1, 4, 4), 0)


def test_erode_masks_shrinks_disk():
    yy, xx = np.mgrid[0:32, 0:32]
    disk = torch.from_numpy((yy - 16) ** 2 + (xx - 16) ** 2 <= 10**2)[None, None]
    eroded = erode_masks(disk, 2)
    assert eroded.sum() < disk.sum()
    assert not (eroded & ~disk).any()
    assert eroded[0, 0, 16, 16]
    assert not eroded[0, 0, 16, 25]


def test_erode_masks_keeps_mask_that_would_vanish():
    tiny = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    tiny[0, 0, 7:9, 7:9] = True
    assert torch.equal(erode_masks(tiny, 3), tiny)


def test_ranking_metrics_perfect_and_reversed():
    perfect = ranking_metrics(np.array([0.1, 0.2]), np.array([0.5, 0.9]))
    reversed_ = ranking_metrics(np.array([0.5, 0.9]), np.array([0.1, 0.2]))
    assert perfect["auroc"] == 1.0
    assert perfect["auprc"] == 1.0
    assert reversed_["auroc"] == 0.0


def test_ranking_metrics_rejects_empty_group():
    with pytest.raises(ValueError, match="0 anomalous"):
        ranking_metrics(np.array([1.0]), np.array([]))


def test_healthy_quantiles_keys_and_order():
    quantiles = healthy_quantiles(np.arange(1001, dtype=float))
    assert quantiles["0.5"] == pytest.approx(500)
    assert quantiles["0.99"] == pytest.approx(990)
    assert quantiles["0.5"] < quantiles["0.9"] < quantiles["0.999"]


def test_check_cancel_raises_when_requested():
    check_cancel(lambda: False)
    with pytest.raises(Cancelled, match="scoring cancelled"):
        check_cancel(lambda: True, "scoring")


def test_ellipse_lies_inside_cell():
    yy, xx = np.mgrid[0:64, 0:64]
    cell = (yy - 32) ** 2 + (xx - 30) ** 2 <= 20**2
    rng = np.random.default_rng(3)
    for _ in range(10):
        ellipse = ellipse_mask(cell, rng)
        assert ellipse.sum() > 10
        assert not (ellipse & ~cell).any()


@pytest.mark.parametrize("kind", ["noisy", "smooth"])
def test_blend_ellipse_alpha_extremes(kind):
    image = torch.zeros(1, 32, 32)
    ellipse = np.zeros((32, 32), bool)
    ellipse[10:20, 12:18] = True
    untouched = blend_ellipse(image, ellipse, 0.0, kind, np.random.default_rng(0))
    blended = blend_ellipse(image, ellipse, 1.0, kind, np.random.default_rng(0))
    assert torch.equal(untouched, image)
    assert blended[0][torch.from_numpy(ellipse)].abs().mean() > 0.1
    assert blended[0, 0:5, 0:5].abs().max() < 1e-6
