"""The Train SUPN model dock: a tiny real training run, cancel, and bad input."""

from __future__ import annotations

import pathlib

import pytest
import torch

from napari_supn._widgets.common import session_models
from napari_supn._widgets.find import FindCellsWidget
from napari_supn._widgets.train import TrainWidget
from napari_supn.model_file import load_model

DATA_DIR = pathlib.Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def fresh_registry():
    session_models.clear()
    torch.set_num_threads(1)
    yield
    session_models.clear()


def fill_tiny(widget: TrainWidget, out: pathlib.Path, iterations: int = 4) -> None:
    widget.folder_edit.setText(str(DATA_DIR / "fl_supn"))
    widget.out_edit.setText(str(out))
    widget.stage1_spin.setValue(iterations)
    widget.stage2_spin.setValue(iterations)
    widget.batch_spin.setValue(8)
    widget.downsample_spin.setValue(8)
    widget.depth_spin.setValue(2)
    widget.width_spin.setValue(4)
    widget.latent_spin.setValue(4)
    widget.device_combo.setCurrentText("cpu")


def test_train_widget_model_appears_in_find(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    find = FindCellsWidget(viewer)
    train = TrainWidget(viewer)
    out = tmp_path / "widget_model.supn"
    fill_tiny(train, out)

    with qtbot.waitSignal(train.run_finished, timeout=60_000) as finished:
        assert train.run()
        assert not train.train_button.isEnabled()
    outcome = finished.args[0]

    assert outcome.error is None, outcome.traceback
    assert not outcome.cancelled
    assert out.is_file()
    loaded = load_model(out)
    assert loaded.config.image_size == 16
    assert loaded.metadata["stages"]["1"]["iterations"] == 4
    assert loaded.metadata["stages"]["2"]["iterations"] == 4
    assert "widget_model" in session_models.models()

    names = [find.model_combo.itemText(index) for index in range(find.model_combo.count())]
    assert "widget_model (this session)" in names
    assert sum(len(points) for points in train.loss_plot.points.values()) > 0
    assert "Saved" in train.status_label.text()
    assert train.train_button.isEnabled()


def test_train_widget_cancel_keeps_checkpoint(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    train = TrainWidget(viewer)
    out = tmp_path / "cancelled.supn"
    fill_tiny(train, out, iterations=3000)

    with qtbot.waitSignal(train.run_finished, timeout=60_000) as finished:
        assert train.run()
        qtbot.waitUntil(lambda: len(train.loss_plot.points[1]) >= 2, timeout=30_000)
        train.cancel()
    outcome = finished.args[0]

    assert outcome.cancelled
    assert not out.exists()
    assert out.with_name(out.name + ".ckpt").is_file()
    assert "cancelled" in train.status_label.text()
    assert session_models.models() == {}


def test_train_widget_missing_folder_message(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    train = TrainWidget(viewer)
    train.folder_edit.setText(str(tmp_path / "nowhere"))
    train.out_edit.setText(str(tmp_path / "model.supn"))

    assert not train.run()
    assert "training folder not found" in train.status_label.text()
    assert not train.running


def test_train_widget_rejects_wrong_suffix(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    train = TrainWidget(viewer)
    train.folder_edit.setText(str(DATA_DIR / "fl_supn"))
    train.out_edit.setText(str(tmp_path / "model.pt"))

    assert not train.run()
    assert ".supn" in train.status_label.text()


def test_train_widget_from_fields_drops_outliers(make_napari_viewer, qtbot, tmp_path):
    from napari_supn._sample_data import sample_paths

    fields = tmp_path / "fields"
    fields.mkdir()
    (fields / "field.png").write_bytes(sample_paths("fluorescence")["image"].read_bytes())
    viewer = make_napari_viewer()
    train = TrainWidget(viewer)
    out = tmp_path / "from_fields.supn"
    fill_tiny(train, out, iterations=3)
    train.folder_edit.setText(str(fields))
    train.source_combo.setCurrentIndex(train.source_combo.findData("fields"))
    train.segmenter_combo.setCurrentText("classical")
    train.drop_spin.setValue(20.0)
    assert train.drop_spin.isEnabled()

    with qtbot.waitSignal(train.run_finished, timeout=60_000) as finished:
        assert train.run()
    outcome = finished.args[0]

    assert outcome.error is None, outcome.traceback
    metadata = load_model(out).metadata["training_data"]
    assert metadata["source"] == "fields"
    assert metadata["crops"] >= 10
    assert metadata["dropped_after_stage1"] > 0
    assert metadata["training_crops"] + metadata["dropped_after_stage1"] + metadata["validation_crops"] == metadata["crops"]
