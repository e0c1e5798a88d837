"""fit_model: crops and fields sources, hooks, cancel, resume, init, and `napari-supn train --fields`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from napari_supn.cli import main
from napari_supn.fitting import FitRequest, fit_model
from napari_supn.model_file import load_model
from napari_supn.progress import Cancelled
from napari_supn.training import read_checkpoint

CROPS = Path(__file__).parent / "data" / "fl_supn"
SAMPLE_FIELD = Path(__file__).parent.parent / "src" / "napari_supn" / "sample_data" / "fluorescence_field.png"

#: Tiny model: 128-pixel crops pooled to 16 pixels, 4 channels, 4 latent dimensions.
TINY = dict(
    batch_size=8,
    downsample=8,
    depth=2,
    base_width=4,
    latent_size=4,
    fc_width=16,
    samples=2,
    validation_fraction=0.25,
    device="cpu",
)

METADATA_KEYS = {
    "scoring",
    "healthy_score_quantiles",
    "threshold",
    "threshold_quantile",
    "stages",
    "training_data",
    "hardware",
    "cell_diameter_px",
    "masked_training_crops",
    "training_config",
}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fields_folder(tmp_path_factory) -> Path:
    """A folder with the shipped fluorescence sample field as its only image."""
    folder = tmp_path_factory.mktemp("fields")
    shutil.copy(SAMPLE_FIELD, folder / "field.png")
    return folder


def test_fit_model_from_crops_reports_hooks(tmp_path):
    done, stages, losses = [], [], []
    request = FitRequest(data=CROPS, out=tmp_path / "crops.supn", stage1_iterations=4, stage2_iterations=3, **TINY)

    outcome = fit_model(request, lambda d, t: done.append((d, t)), stages.append, lambda: False, losses.append)

    assert outcome.path.is_file()
    assert outcome.checkpoint == tmp_path / "crops.supn.ckpt"
    assert outcome.checkpoint.is_file()
    assert done[-1] == (7, 7)
    assert [d for d, _ in done] == list(range(1, 8))
    assert stages[0] == "reading crops"
    assert "stage 1 (1 of 2)" in stages
    assert "stage 2 (2 of 2)" in stages
    assert losses[-1][:2] == (2, 7)
    assert {record[0] for record in losses} == {1, 2}

    metadata = load_model(outcome.path).metadata
    assert METADATA_KEYS <= set(metadata)
    assert metadata["stages"]["1"]["iterations"] == 4
    assert metadata["stages"]["2"]["iterations"] == 3
    assert "validation_curve" in metadata["stages"]["2"]
    assert metadata["training_data"]["source"] == "crops"
    assert metadata["training_data"]["crops"] == 16
    assert metadata["training_data"]["validation_crops"] == 4
    assert len(metadata["training_data"]["validation_names"]) == 4
    assert metadata["training_data"]["dropped_after_stage1"] == 0
    assert metadata["threshold"] == metadata["healthy_score_quantiles"]["0.99"]
    assert outcome.threshold == metadata["threshold"]
    assert metadata["masked_training_crops"] is False
    assert metadata["hardware"]["device"] == "cpu"


def test_fit_model_from_fields_drops_worst(fields_folder, tmp_path):
    request = FitRequest(
        data=fields_folder,
        out=tmp_path / "fields.supn",
        source="fields",
        segmenter="classical",
        drop_fraction=0.2,
        stage1_iterations=3,
        stage2_iterations=3,
        **TINY,
    )

    outcome = fit_model(request)

    loaded = load_model(outcome.path)
    data = loaded.metadata["training_data"]
    assert data["source"] == "fields"
    assert data["crops"] >= 10
    assert outcome.dropped == data["dropped_after_stage1"] > 0
    assert len(data["dropped_names"]) == outcome.dropped
    assert all(name.startswith("field_") for name in data["dropped_names"])
    assert data["training_crops"] + data["dropped_after_stage1"] + data["validation_crops"] == data["crops"]
    assert data["masks"] is True
    assert data["segmentation"]["segmenters_used"] == ["classical"]
    # An 8-bit field gives 8-bit crops, so the dtype intensity range is 0–255.
    assert loaded.preprocessing.intensity_high == 255.0
    assert loaded.preprocessing.crop_size == 128
    assert loaded.metadata["cell_diameter_px"] > 20


def test_fit_model_cancel_keeps_checkpoint(tmp_path):
    done = []
    request = FitRequest(data=CROPS, out=tmp_path / "cancelled.supn", stage1_iterations=500, **TINY)

    with pytest.raises(Cancelled):
        fit_model(request, lambda d, t: done.append(d), cancel=lambda: len(done) >= 3)

    assert not request.out.exists()
    _, header = read_checkpoint(request.checkpoint_path)
    assert header["stage"] == 1
    assert header["iteration"] == 3
    assert header["validation_names"]


def test_fit_model_cancel_while_cutting_fields(fields_folder, tmp_path):
    request = FitRequest(data=fields_folder, out=tmp_path / "m.supn", source="fields", segmenter="classical", **TINY)

    with pytest.raises(Cancelled):
        fit_model(request, cancel=lambda: True)

    assert not request.out.exists()
    assert not request.checkpoint_path.exists()


def test_fit_model_resume_in_stage2_drops_same_crops(fields_folder, tmp_path):
    # Stage 1 must move the weights far enough from their initial values that
    # an untrained model would rank the crops differently.
    stage1 = 20
    settings = dict(
        data=fields_folder,
        source="fields",
        segmenter="classical",
        likelihood="diagonal",
        drop_fraction=0.2,
        stage1_iterations=stage1,
        stage2_iterations=6,
        **TINY,
    )
    straight = fit_model(FitRequest(out=tmp_path / "straight.supn", **settings))

    interrupted = FitRequest(out=tmp_path / "resumed.supn", **settings)
    done = []
    with pytest.raises(Cancelled):
        fit_model(interrupted, lambda d, t: done.append(d), cancel=lambda: len(done) >= stage1 + 2)
    assert read_checkpoint(interrupted.checkpoint_path)[1]["stage"] == 2
    resumed = fit_model(FitRequest(out=tmp_path / "resumed.supn", resume=True, **settings))

    assert resumed.metadata["training_data"]["dropped_names"] == straight.metadata["training_data"]["dropped_names"]
    assert resumed.metadata["stages"]["2"]["iterations"] == 6
    first, second = load_model(straight.path).model, load_model(resumed.path).model
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_fit_model_init_from_fields_reuses_split(fields_folder, tmp_path):
    common = dict(
        data=fields_folder, source="fields", segmenter="classical", stage1_iterations=3, stage2_iterations=3, **TINY
    )
    spherical = fit_model(FitRequest(out=tmp_path / "spherical.supn", likelihood="spherical", **common))

    supn = fit_model(FitRequest(out=tmp_path / "supn.supn", init=spherical.path, **common))

    first, second = load_model(spherical.path).metadata, load_model(supn.path).metadata
    assert second["training_data"]["validation_names"] == first["training_data"]["validation_names"]
    assert second["stages"]["1"] == first["stages"]["1"]
    assert second["stages"]["2"]["iterations"] == 3
    assert second["initialised_from"] == str(spherical.path)
    assert load_model(supn.path).preprocessing == load_model(spherical.path).preprocessing


@pytest.mark.parametrize(
    "change, message",
    [
        ({"source": "tiles"}, "source"),
        ({"out": Path("model.pt")}, ".supn"),
        ({"drop_fraction": 1.0}, "drop fraction"),
        ({"segmenter": "watershed"}, "segmenter"),
        ({"stage": "3"}, "stage"),
        ({"threads": 0}, "threads"),
        ({"init": Path("absent.supn")}, "initial model not found"),
    ],
)
def test_fit_request_rejects_invalid_settings(change, message):
    request = FitRequest(**{"data": CROPS, "out": Path("model.supn"), **change})

    with pytest.raises(ValueError, match=message):
        request.validate()


TINY_CLI = [
    "--iterations", "3", "--batch-size", "8", "--downsample", "8", "--depth", "2",
    "--base-width", "4", "--latent-size", "4", "--samples", "2", "--validation-fraction", "0.25",
    "--device", "cpu", "--threads", "1",
]


def test_cli_train_fields_end_to_end(fields_folder, tmp_path):
    out = tmp_path / "cli_fields.supn"

    status = main([
        "train", "--data", str(fields_folder), "--out", str(out), "--fields",
        "--segmenter", "classical", "--drop-fraction", "0.2", *TINY_CLI,
    ])

    assert status == 0
    loaded = load_model(out)
    metadata = loaded.metadata
    assert metadata["training_data"]["source"] == "fields"
    assert metadata["training_data"]["dropped_after_stage1"] > 0
    assert metadata["trained_in"] == "napari-supn train"
    assert metadata["stages"]["1"]["iterations"] == 3
    assert metadata["stages"]["2"]["iterations"] == 3
    assert loaded.config.likelihood == "supn"
    assert loaded.config.image_size == 16
    assert METADATA_KEYS <= set(metadata)


def test_cli_train_segmenter_needs_fields(tmp_path, capsys):
    status = main(["train", "--data", str(CROPS), "--out", str(tmp_path / "m.supn"), "--segmenter", "classical"])

    assert status == 2
    assert "--fields" in capsys.readouterr().err
    assert not (tmp_path / "m.supn").exists()


def test_fit_model_warns_about_weak_runs(tmp_path, caplog):
    request = FitRequest(
        data=CROPS, out=tmp_path / "weak.supn", stage1_iterations=0, stage2_iterations=2, **TINY
    )
    with caplog.at_level("WARNING", logger="napari_supn"):
        fit_model(request)
    assert "Stage 1 runs 0 iterations" in caplog.text
    assert "Only 4 held-out crops set the threshold" in caplog.text


def test_fit_request_rejects_negative_iterations(tmp_path):
    request = FitRequest(data=CROPS, out=tmp_path / "bad.supn", stage1_iterations=-1, **TINY)
    with pytest.raises(ValueError, match="stage1_iterations must be ≥ 0, got -1"):
        fit_model(request)
