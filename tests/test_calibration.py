from pathlib import Path

import pytest

from napari_supn.calibration import select_crops
from napari_supn.cli import main
from napari_supn.data import load_crops
from napari_supn.model_file import load_model

DATA = Path(__file__).parent / "data"


def test_calibrate_cli_stores_settings_and_threshold(tiny_fluorescence_model, tmp_path, capsys):
    out = tmp_path / "calibrated.supn"
    status = main(
        [
            "calibrate",
            "--model", str(tiny_fluorescence_model),
            "--healthy", str(DATA / "fl_supn"),
            "--held-out",
            "--out", str(out),
            "--tile", "2",
            "--mask-erosion", "1",
            "--samples", "2",
            "--quantile", "0.9",
            "--device", "cpu",
        ]
    )
    assert status == 0
    assert "threshold" in capsys.readouterr().out

    original = load_model(tiny_fluorescence_model).metadata
    calibrated = load_model(out).metadata
    assert calibrated["scoring"] == {"samples": 2, "tile": 2, "mask_erosion": 1}
    assert calibrated["threshold_quantile"] == 0.9
    assert calibrated["threshold"] == pytest.approx(calibrated["healthy_score_quantiles"]["0.9"])
    assert calibrated["calibration"]["held_out"] is True
    assert calibrated["calibration"]["crops"] == len(original["training_data"]["validation_names"])
    assert calibrated["training_data"] == original["training_data"]


def test_select_crops_missing_name_is_clear_error():
    crops = load_crops(DATA / "fl_supn")
    with pytest.raises(ValueError, match="not in the folder"):
        select_crops(crops, ["not_a_crop.png"])


def test_select_crops_keeps_requested_order():
    crops = load_crops(DATA / "fl_supn")
    chosen = select_crops(crops, [crops.names[3], crops.names[1]])
    assert list(chosen.names) == [crops.names[3], crops.names[1]]
