"""Scoring and evaluation with a real, briefly trained model on real crops."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_supn.cli import main
from napari_supn.data import load_crops
from napari_supn.model import ModelConfig, SUPNVAE
from napari_supn.preprocessing import fit_preprocessing
from napari_supn.progress import Cancelled
from napari_supn.scoring import score_crops
from napari_supn.training import TrainingConfig, seed_everything, train

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def crops():
    return load_crops(DATA / "fl_supn")


@pytest.fixture(scope="module")
def prepared(crops):
    preprocessing = fit_preprocessing(crops.images, crops.masks, downsample=4)
    return preprocessing.prepare(crops.images, crops.masks)


@pytest.fixture(scope="module")
def trained_model(prepared):
    images, _ = prepared
    seed_everything(0)
    model = SUPNVAE(
        ModelConfig(image_size=32, latent_size=8, depth=2, base_width=8, fc_width=32, likelihood="supn")
    )
    config = TrainingConfig(stage1_iterations=80, stage2_iterations=40, batch_size=16, log_every=40)
    train(model, images, config, stage=1)
    train(model, images, config, stage=2)
    return model.eval()


def test_score_crops_shapes(trained_model, prepared):
    images, masks = prepared
    scores = score_crops(trained_model, images, masks, samples=3, tile=4)
    count = images.shape[0]
    assert scores.cell_score.shape == (count,)
    assert scores.distance.shape == (count,)
    assert scores.whitened.shape == (count, 32, 32)
    assert scores.tiles.shape == (count, 8, 8)
    assert np.isfinite(scores.cell_score).all()


def test_whitened_map_zero_outside_mask(trained_model, prepared):
    images, masks = prepared
    scores = score_crops(trained_model, images, masks, samples=2)
    outside = ~masks[:, 0].numpy()
    assert np.all(scores.whitened[outside] == 0)
    assert np.all(scores.whitened[~outside] >= 0)
    assert scores.whitened[~outside].max() > 0


def test_cell_score_is_max_tile(trained_model, prepared):
    images, masks = prepared
    scores = score_crops(trained_model, images, masks, samples=2, tile=4)
    assert np.allclose(scores.cell_score, scores.tiles.reshape(len(scores), -1).max(axis=1))
    assert np.allclose(scores.tiles.sum(axis=(1, 2)), scores.whitened.sum(axis=(1, 2)), rtol=1e-4)


def test_distance_matches_log_prob(trained_model, prepared):
    images, _ = prepared
    with torch.no_grad():
        z_mean, _ = trained_model.encode(images[:2])
        mean = trained_model.decode_mean(z_mean)
        distribution = trained_model.likelihood(z_mean, mean)
        whitened = distribution.whiten(images[:2])
        direct = (whitened**2).flatten(1).sum(dim=1)
        log_prob = distribution.log_prob(images[:2])
    count = images[0].numel()
    log_det = distribution_log_det(trained_model, z_mean)
    expected = -0.5 * count * np.log(2 * np.pi) + log_det - 0.5 * direct
    assert torch.allclose(log_prob, expected, rtol=1e-4, atol=1e-2)


def distribution_log_det(model, z):
    with torch.no_grad():
        mean = model.decode_mean(z)
        distribution = model.likelihood(z, mean)
        dense = distribution.precision_cholesky_dense()
    return torch.log(torch.diagonal(dense, dim1=-2, dim2=-1)).sum(dim=-1)


def test_same_generator_seed_gives_same_scores(trained_model, prepared):
    images, masks = prepared
    first = score_crops(trained_model, images, masks, samples=4, generator=torch.Generator().manual_seed(7))
    second = score_crops(trained_model, images, masks, samples=4, generator=torch.Generator().manual_seed(7))
    other = score_crops(trained_model, images, masks, samples=4, generator=torch.Generator().manual_seed(8))
    assert np.array_equal(first.cell_score, second.cell_score)
    assert not np.array_equal(first.cell_score, other.cell_score)


def test_bright_spot_ranks_above_clean_crop(trained_model, prepared):
    images, masks = prepared
    spotted = images.clone()
    for index in range(images.shape[0]):
        rows, cols = torch.nonzero(masks[index, 0], as_tuple=True)
        centre_y, centre_x = int(rows.float().mean()), int(cols.float().mean())
        spotted[index, 0, centre_y - 1 : centre_y + 2, centre_x - 1 : centre_x + 2] = 1.0
    generator = torch.Generator().manual_seed(0)
    clean = score_crops(trained_model, images, masks, samples=4, generator=generator)
    generator = torch.Generator().manual_seed(0)
    anomalous = score_crops(trained_model, spotted, masks, samples=4, generator=generator)
    # A spot can land in a tile that was not the cell's largest, so ties are allowed
    # per cell, but the spot must raise the score of almost every cell.
    assert np.all(anomalous.cell_score >= clean.cell_score * (1 - 1e-4))
    assert np.mean(anomalous.cell_score > clean.cell_score * 1.05) >= 0.75


def test_spot_location_is_map_maximum(trained_model, prepared):
    images, masks = prepared
    spotted = images[:1].clone()
    rows, cols = torch.nonzero(masks[0, 0], as_tuple=True)
    centre_y, centre_x = int(rows.float().mean()), int(cols.float().mean())
    spotted[0, 0, centre_y - 1 : centre_y + 2, centre_x - 1 : centre_x + 2] = 1.0
    scores = score_crops(trained_model, spotted, masks[:1], samples=4)
    peak_y, peak_x = np.unravel_index(np.argmax(scores.whitened[0]), scores.whitened[0].shape)
    assert abs(peak_y - centre_y) <= 2
    assert abs(peak_x - centre_x) <= 2


def test_restoration_lowers_distance(trained_model, prepared):
    images, masks = prepared
    plain = score_crops(trained_model, images, masks, samples=1, generator=torch.Generator().manual_seed(0))
    restored = score_crops(trained_model, images, masks, restoration=True, restoration_steps=30)
    assert np.median(restored.distance) < np.median(plain.distance)


def test_score_crops_cancel_raises(trained_model, prepared):
    images, masks = prepared
    with pytest.raises(Cancelled):
        score_crops(trained_model, images, masks, samples=1, cancel=lambda: True)


def test_score_crops_rejects_mask_shape(trained_model, prepared):
    images, masks = prepared
    with pytest.raises(ValueError, match="masks must have shape"):
        score_crops(trained_model, images, masks[:, :, :16], samples=1)


def test_evaluate_cli_reports_json(tmp_path, capsys):
    model_path = tmp_path / "tiny.supn"
    status = main(
        [
            "train",
            "--data", str(DATA / "fl_supn"),
            "--out", str(model_path),
            "--stage1-iterations", "30",
            "--stage2-iterations", "10",
            "--batch-size", "8",
            "--downsample", "4",
            "--depth", "2",
            "--base-width", "8",
            "--latent-size", "8",
            "--validation-fraction", "0.25",
            "--samples", "2",
            "--device", "cpu",
        ]
    )
    assert status == 0
    capsys.readouterr()

    scores_csv = tmp_path / "scores.csv"
    status = main(
        [
            "evaluate",
            "--model", str(model_path),
            "--healthy", str(DATA / "fl_supn_dev" / "healthy"),
            "--anomalous", str(DATA / "fl_supn_dev" / "infected"),
            "--samples", "2",
            "--json",
            "--scores-csv", str(scores_csv),
            "--device", "cpu",
        ]
    )
    assert status == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(last_line)
    assert summary["n_healthy"] == 4
    assert summary["n_anomalous"] == 4
    assert 0.0 <= summary["auroc"] <= 1.0
    assert 0.0 <= summary["auprc"] <= 1.0
    assert len(scores_csv.read_text().strip().splitlines()) == 1 + 8


def test_evaluate_cli_missing_folder_is_clear_error(tmp_path, capsys):
    status = main(
        ["evaluate", "--model", "nonexistent.supn", "--healthy", str(tmp_path / "nope"), "--anomalous", str(tmp_path)]
    )
    assert status == 2
    assert "--healthy folder not found" in capsys.readouterr().err
