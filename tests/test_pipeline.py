"""score_field and the score command on the shipped assembled fluorescence field."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from skimage import io

from napari_supn.cli import main
from napari_supn.data import load_crops
from napari_supn.model import ModelConfig, SUPNVAE
from napari_supn.model_file import load_model, save_model
from napari_supn.pipeline import TABLE_COLUMNS, match_channels, score_field
from napari_supn.preprocessing import fit_preprocessing
from napari_supn.progress import Cancelled
from napari_supn.training import TrainingConfig, seed_everything, train

DATA = Path(__file__).parent / "data"
SAMPLES = Path(__file__).parent.parent / "src" / "napari_supn" / "sample_data"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    crops = load_crops(DATA / "fl_supn")
    preprocessing = fit_preprocessing(crops.images, crops.masks, downsample=4)
    images, _ = preprocessing.prepare(crops.images, crops.masks)
    seed_everything(0)
    model = SUPNVAE(
        ModelConfig(image_size=32, latent_size=8, depth=2, base_width=8, fc_width=32, likelihood="supn")
    )
    config = TrainingConfig(stage1_iterations=60, stage2_iterations=30, batch_size=16, log_every=30)
    train(model, images, config, stage=1)
    train(model, images, config, stage=2)
    path = tmp_path_factory.mktemp("pipeline") / "small.supn"
    save_model(path, model, preprocessing, {"threshold": 1e9, "scoring": {"samples": 2, "tile": 4}})
    return path


@pytest.fixture(scope="module")
def loaded(model_path):
    return load_model(model_path, device="cpu")


@pytest.fixture(scope="module")
def field():
    return io.imread(SAMPLES / "fluorescence_field.png")


@pytest.fixture(scope="module")
def field_labels():
    return io.imread(SAMPLES / "fluorescence_field_labels.png").astype(np.int32)


def test_score_field_outputs_match_field(loaded, field, field_labels):
    result = score_field(field, loaded, labels=field_labels, samples=2)
    cell_count = len(np.unique(field_labels)) - 1
    assert result.labels.shape == field.shape
    assert result.whitened.shape == field.shape
    assert result.tiles.shape == field.shape
    assert list(result.table.columns) == TABLE_COLUMNS
    assert len(result.table) == cell_count
    assert result.table["rank"].tolist() == list(range(1, cell_count + 1))
    assert result.table["score"].is_monotonic_decreasing
    assert not result.table["flagged"].any()
    assert np.all(result.whitened[field_labels == 0] == 0)
    assert result.whitened[field_labels > 0].max() > 0


def test_table_centroids_in_field_coordinates(loaded, field, field_labels):
    result = score_field(field, loaded, labels=field_labels, samples=1)
    for row in result.table.itertuples():
        rows, cols = np.nonzero(field_labels == row.label)
        assert row.area == rows.size
        assert abs(row.centroid_y - rows.mean()) < 0.5
        assert abs(row.centroid_x - cols.mean()) < 0.5


def test_bright_spot_peaks_at_its_field_position(loaded, field, field_labels):
    target = int(np.unique(field_labels)[5])
    rows, cols = np.nonzero(field_labels == target)
    spot_y, spot_x = int(np.median(rows)), int(np.median(cols))
    spotted = field.copy()
    spotted[spot_y - 3 : spot_y + 4, spot_x - 3 : spot_x + 4] = 255

    result = score_field(spotted, loaded, labels=field_labels, samples=2)
    inside = np.where(field_labels == target, result.whitened, 0)
    peak_y, peak_x = np.unravel_index(np.argmax(inside), inside.shape)
    assert abs(peak_y - spot_y) <= 6
    assert abs(peak_x - spot_x) <= 6

    clean = score_field(field, loaded, labels=field_labels, samples=2)
    spotted_score = result.table.set_index("label").loc[target, "score"]
    clean_score = clean.table.set_index("label").loc[target, "score"]
    assert spotted_score > clean_score


def test_threshold_flags_cells_above_it(loaded, field, field_labels):
    probe = score_field(field, loaded, labels=field_labels, samples=1)
    threshold = float(probe.table["score"].median())
    result = score_field(field, loaded, labels=field_labels, samples=1, threshold=threshold)
    assert result.n_flagged == int((result.table["score"] > threshold).sum())
    assert 0 < result.n_flagged < result.n_cells
    assert result.parasitemia == pytest.approx(result.n_flagged / result.n_cells)


def test_classical_segmentation_finds_sample_cells(loaded, field, field_labels):
    result = score_field(field, loaded, segmenter="classical", samples=1)
    expected = len(np.unique(field_labels)) - 1
    assert result.segmentation_method == "classical"
    assert abs(result.n_cells - expected) <= 2


def test_empty_field_gives_empty_table_and_warning(loaded, caplog):
    dark = np.zeros((200, 300), np.uint8)
    with caplog.at_level(logging.WARNING, logger="napari_supn"):
        result = score_field(dark, loaded, segmenter="classical")
    assert result.n_cells == 0
    assert list(result.table.columns) == TABLE_COLUMNS
    assert not result.whitened.any()
    assert "No cells found" in caplog.text


def test_rgb_field_with_grey_model_is_clear_error(loaded, field):
    rgb = np.stack([field, field // 2, field // 3], axis=-1)
    with pytest.raises(ValueError, match="the model expects grey images but the image is RGB"):
        score_field(rgb, loaded)


def test_match_channels_accepts_grey_stored_as_rgb(field):
    rgb = np.stack([field] * 3, axis=-1)
    assert match_channels(rgb, "grey").shape == field.shape


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 8, 8, 3), np.uint8), "must have shape"),
        (np.zeros((8, 8), bool), "dtype bool is not supported"),
        (np.zeros((8, 8), np.complex64), "not supported"),
    ],
)
def test_match_channels_rejects_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        match_channels(image, "grey")


def test_labels_shape_mismatch_is_clear_error(loaded, field, field_labels):
    with pytest.raises(ValueError, match="labels have shape"):
        score_field(field, loaded, labels=field_labels[:-1])


def test_score_field_cancel_raises(loaded, field, field_labels):
    with pytest.raises(Cancelled):
        score_field(field, loaded, labels=field_labels, cancel=lambda: True)


def test_score_field_reports_progress(loaded, field, field_labels):
    calls, stages = [], []
    score_field(
        field,
        loaded,
        labels=field_labels,
        samples=1,
        batch_size=8,
        progress=lambda done, total: calls.append((done, total)),
        stage=stages.append,
    )
    total = len(np.unique(field_labels)) - 1
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert stages == ["segmentation", "scoring"]


def test_score_cli_writes_outputs(model_path, tmp_path, capsys):
    image_path = SAMPLES / "fluorescence_field.png"
    status = main(
        [
            "score",
            str(image_path),
            "--model", str(model_path),
            "--out", str(tmp_path),
            "--segmenter", "classical",
            "--samples", "1",
            "--device", "cpu",
        ]
    )
    assert status == 0
    summary = capsys.readouterr().out
    assert "fluorescence_field.png:" in summary
    assert "cells" in summary

    table = pd.read_csv(tmp_path / "fluorescence_field_cells.csv")
    for column in ["label", "centroid_y", "centroid_x", "area", "score", "rank", "flagged", "touches_border"]:
        assert column in table.columns
    labels = tifffile.imread(tmp_path / "fluorescence_field_labels.tif")
    whitened = tifffile.imread(tmp_path / "fluorescence_field_whitened.tif")
    tiles = tifffile.imread(tmp_path / "fluorescence_field_tiles.tif")
    field_shape = io.imread(image_path).shape
    assert labels.shape == whitened.shape == tiles.shape == field_shape
    assert set(table["label"]) == set(np.unique(labels)) - {0}


def test_score_cli_missing_image_is_clear_error(model_path, tmp_path, capsys):
    status = main(["score", str(tmp_path / "missing.png"), "--model", str(model_path), "--out", str(tmp_path)])
    assert status == 2
    assert "image not found" in capsys.readouterr().err


def test_model_threshold_reads_stored_values():
    from napari_supn.pipeline import model_threshold

    assert model_threshold({"threshold": 3.5}) == 3.5
    assert model_threshold({"healthy_score_quantiles": {"0.99": 7.0}}) == 7.0
    assert model_threshold({}) is None


@pytest.mark.parametrize(
    "convert, message",
    [
        (lambda image: image.astype(np.uint16) * 257, "outside the model's intensity range"),
        (lambda image: image / 255.0, "the brightest pixels reach"),
        (lambda image: image.astype(np.int64) - 100, "outside the model's intensity range"),
    ],
)
def test_wrong_intensity_units_are_clear_error(loaded, field, convert, message):
    with pytest.raises(ValueError, match=message):
        score_field(convert(field), loaded, segmenter="classical")


def test_score_cli_rejects_duplicate_stems(model_path, tmp_path, capsys):
    image = io.imread(SAMPLES / "fluorescence_field.png")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        io.imsave(tmp_path / folder / "same.png", image, check_contrast=False)
    status = main(
        [
            "score",
            str(tmp_path / "a" / "same.png"),
            str(tmp_path / "b" / "same.png"),
            "--model", str(model_path),
            "--out", str(tmp_path / "out"),
        ]
    )
    assert status == 2
    assert "share the name 'same'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_score_cli_rejects_out_file_and_nan_threshold(model_path, tmp_path, capsys):
    image_path = str(SAMPLES / "fluorescence_field.png")
    existing = tmp_path / "results.csv"
    existing.write_text("keep me")
    status = main(["score", image_path, "--model", str(model_path), "--out", str(existing)])
    assert status == 2
    assert "is an existing file" in capsys.readouterr().err
    assert existing.read_text() == "keep me"

    status = main(
        ["score", image_path, "--model", str(model_path), "--out", str(tmp_path / "o"), "--threshold", "nan"]
    )
    assert status == 2
    assert "--threshold must be a finite number" in capsys.readouterr().err
