"""The Find anomalous cells dock on a shipped sample field with a tiny trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_supn._sample_data import load_sample
from napari_supn._widgets.common import METADATA_KEY, layer_id, result_layers
from napari_supn._widgets.find import FindCellsWidget

RESULT_NAMES = ("cells", "whitened residual", "tile scores", "suspects")


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fluorescence_crop() -> np.ndarray:
    """The top-left 336×448 pixels (3×4 grid slots) of the shipped fluorescence field."""
    image, _, _ = load_sample("fluorescence")
    return image[:336, :448]


def make_widget(viewer, model_path) -> FindCellsWidget:
    widget = FindCellsWidget(viewer)
    widget.set_model(model_path)
    widget.segmenter_combo.setCurrentText("classical")
    widget.samples_spin.setValue(2)
    widget.device_combo.setCurrentText("cpu")
    return widget


def run_and_wait(qtbot, widget: FindCellsWidget):
    with qtbot.waitSignal(widget.run_finished, timeout=60_000) as finished:
        assert widget.run()
    return finished.args[0]


def test_find_adds_named_layers(make_napari_viewer, qtbot, tiny_fluorescence_model, fluorescence_crop):
    viewer = make_napari_viewer()
    source = viewer.add_image(fluorescence_crop, name="field", scale=(0.5, 0.5), translate=(10, 20))
    widget = make_widget(viewer, tiny_fluorescence_model)
    widget.threshold_edit.setText("0")  # flag every cell, so the suspects layer has points

    outcome = run_and_wait(qtbot, widget)

    assert outcome.error is None, outcome.traceback
    for suffix in RESULT_NAMES:
        assert f"field {suffix}" in viewer.layers
    cells = viewer.layers["field cells"]
    whitened = viewer.layers["field whitened residual"]
    tiles = viewer.layers["field tile scores"]
    suspects = viewer.layers["field suspects"]

    for layer in (cells, whitened, tiles, suspects):
        np.testing.assert_allclose(layer.scale, source.scale)
        np.testing.assert_allclose(layer.translate, source.translate)
        assert layer.metadata[METADATA_KEY]["source_id"] == layer_id(source)
    assert cells.data.shape == fluorescence_crop.shape
    assert whitened.data.shape == fluorescence_crop.shape
    assert tiles.data.shape == fluorescence_crop.shape

    features = cells.features
    for column in ("label", "score", "rank", "flagged", "annotation"):
        assert column in features.columns
    n_cells = len(features)
    assert n_cells >= 3
    assert set(features["label"]) == set(np.unique(cells.data)) - {0}
    assert list(features["rank"]) == list(range(1, n_cells + 1))
    assert np.all(np.diff(features["score"].to_numpy()) <= 0)
    assert (features["annotation"] == "").all()
    assert features["flagged"].all()
    assert len(suspects.data) == n_cells

    # One display range for the whole map: 0 to the 99.5th percentile of cell pixels.
    expected_high = np.percentile(whitened.data[cells.data > 0], 99.5)
    assert whitened.contrast_limits[0] == 0
    assert whitened.contrast_limits[1] == pytest.approx(expected_high, rel=1e-5)
    assert "cells" in widget.status_label.text()


def test_find_rerun_replaces_layers(make_napari_viewer, qtbot, tiny_fluorescence_model, fluorescence_crop):
    viewer = make_napari_viewer()
    viewer.add_image(fluorescence_crop, name="field")
    widget = make_widget(viewer, tiny_fluorescence_model)

    run_and_wait(qtbot, widget)
    first_cells = viewer.layers["field cells"]
    outcome = run_and_wait(qtbot, widget)

    assert outcome.error is None, outcome.traceback
    assert len(viewer.layers) == 1 + len(RESULT_NAMES)
    assert first_cells not in viewer.layers
    assert "field cells" in viewer.layers


def test_find_cancel_adds_no_layers(make_napari_viewer, qtbot, tiny_fluorescence_model):
    viewer = make_napari_viewer()
    image, _, _ = load_sample("fluorescence")
    viewer.add_image(image, name="field")
    widget = make_widget(viewer, tiny_fluorescence_model)

    with qtbot.waitSignal(widget.run_finished, timeout=60_000) as finished:
        assert widget.run()
        assert widget.cancel_button.isEnabled()
        # Cancel while the worker segments; the pipeline checks before scoring.
        qtbot.waitUntil(lambda: "segmentation" in widget.status_label.text(), timeout=30_000)
        widget.cancel()
    outcome = finished.args[0]

    assert outcome.cancelled
    assert [layer.name for layer in viewer.layers] == ["field"]
    assert "Cancelled" in widget.status_label.text()
    assert widget.run_button.isEnabled()
    assert not widget.cancel_button.isEnabled()


def test_find_results_stay_on_source(make_napari_viewer, qtbot, tiny_fluorescence_model, fluorescence_crop):
    viewer = make_napari_viewer()
    first = viewer.add_image(fluorescence_crop, name="first")
    second = viewer.add_image(np.ascontiguousarray(fluorescence_crop[::-1]), name="second", translate=(500, 0))
    widget = make_widget(viewer, tiny_fluorescence_model)
    widget.select_layer(first)

    with qtbot.waitSignal(widget.run_finished, timeout=60_000) as finished:
        assert widget.run()
        widget.select_layer(second)
        viewer.layers.selection.active = second
    assert finished.args[0].error is None

    assert "first cells" in viewer.layers
    assert "second cells" not in viewer.layers
    cells = viewer.layers["first cells"]
    assert cells.metadata[METADATA_KEY]["source_id"] == layer_id(first)
    np.testing.assert_allclose(cells.translate, first.translate)

    # Scoring the second layer adds its own results and leaves the first layer's alone.
    run_and_wait(qtbot, widget)
    assert len(result_layers(viewer, layer_id(first))) == len(RESULT_NAMES)
    assert len(result_layers(viewer, layer_id(second))) == len(RESULT_NAMES)
    np.testing.assert_allclose(viewer.layers["second cells"].translate, second.translate)


def test_find_stack_uses_current_plane(make_napari_viewer, qtbot, tiny_fluorescence_model, fluorescence_crop):
    viewer = make_napari_viewer()
    blank = np.zeros_like(fluorescence_crop)
    viewer.add_image(np.stack([blank, fluorescence_crop]), name="stack")
    viewer.dims.set_current_step(0, 1)
    widget = make_widget(viewer, tiny_fluorescence_model)

    outcome = run_and_wait(qtbot, widget)

    assert outcome.error is None, outcome.traceback
    cells = viewer.layers["stack cells"]
    assert cells.data.shape == fluorescence_crop.shape
    assert cells.metadata[METADATA_KEY]["plane"] == [1]
    assert len(cells.features) >= 3


def test_find_wrong_channel_message(make_napari_viewer, qtbot, tiny_fluorescence_model):
    viewer = make_napari_viewer()
    image, _, _ = load_sample("giemsa")
    viewer.add_image(image[:200, :200], name="giemsa", rgb=True)
    widget = make_widget(viewer, tiny_fluorescence_model)

    outcome = run_and_wait(qtbot, widget)

    assert isinstance(outcome.error, ValueError)
    assert "expects grey images" in widget.status_label.text()
    assert [layer.name for layer in viewer.layers] == ["giemsa"]


def test_find_empty_image_message(make_napari_viewer, tiny_fluorescence_model):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((128, 128), np.uint8), name="blank")
    widget = make_widget(viewer, tiny_fluorescence_model)

    assert not widget.run()
    assert "empty" in widget.status_label.text()
    assert not widget.running
    assert len(viewer.layers) == 1


def test_find_missing_cellpose_message(make_napari_viewer, qtbot, tiny_fluorescence_model, fluorescence_crop, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(fluorescence_crop, name="field")
    widget = make_widget(viewer, tiny_fluorescence_model)
    widget.segmenter_combo.setCurrentText("cellpose")
    widget.cellpose_edit.setText(str(tmp_path / "missing_cyto3"))

    outcome = run_and_wait(qtbot, widget)

    assert outcome.error is not None
    assert "Cellpose weights not found" in widget.status_label.text()
    assert len(viewer.layers) == 1


def test_find_invalid_threshold_message(make_napari_viewer, tiny_fluorescence_model, fluorescence_crop):
    viewer = make_napari_viewer()
    viewer.add_image(fluorescence_crop, name="field")
    widget = make_widget(viewer, tiny_fluorescence_model)
    widget.threshold_edit.setText("high")

    assert not widget.run()
    assert "threshold 'high' is not a number" in widget.status_label.text()


def test_find_fills_threshold_from_model(make_napari_viewer, tiny_fluorescence_model):
    from napari_supn.model_file import load_model

    viewer = make_napari_viewer()
    widget = make_widget(viewer, tiny_fluorescence_model)
    stored = load_model(tiny_fluorescence_model).metadata["threshold"]

    assert float(widget.threshold_edit.text()) == pytest.approx(stored, rel=1e-5)
    assert widget.device_label.text() == "Model runs on: cpu"


def shipped_model(name):
    from napari_supn.model_file import list_shipped_models

    shipped = list_shipped_models()
    assert name in shipped, f"shipped model {name!r} missing from {sorted(shipped)}"
    return shipped[name]


@pytest.mark.parametrize("key, expected", [
    ("giemsa", "giemsa"),
    ("fluorescence", "fluorescence"),
])
def test_find_default_model_matches_layer(make_napari_viewer, key, expected):
    viewer = make_napari_viewer()
    image, _, _ = load_sample(key)
    layer = viewer.add_image(image, name=key)
    assert layer.rgb is (key == "giemsa")

    widget = FindCellsWidget(viewer)

    assert widget.selected_layer() is layer
    assert widget.model_combo.currentText() == expected
    assert widget.model_path() == shipped_model(expected)
    assert "likelihood" in widget.model_info.text()


def test_find_default_model_follows_selection(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = FindCellsWidget(viewer)
    assert widget.model_combo.currentText() == "fluorescence"

    giemsa, _, _ = load_sample("giemsa")
    rgb_layer = viewer.add_image(giemsa, name="giemsa")
    assert widget.selected_layer() is rgb_layer
    assert widget.model_combo.currentText() == "giemsa"

    fluorescence, _, _ = load_sample("fluorescence")
    grey_layer = viewer.add_image(fluorescence, name="fluorescence")
    widget.select_layer(grey_layer)
    assert widget.model_combo.currentText() == "fluorescence"

    widget.select_layer(rgb_layer)
    assert widget.model_combo.currentText() == "giemsa"


def test_find_keeps_model_user_picked(make_napari_viewer):
    viewer = make_napari_viewer()
    fluorescence, _, _ = load_sample("fluorescence")
    giemsa, _, _ = load_sample("giemsa")
    grey_layer = viewer.add_image(fluorescence, name="fluorescence")
    rgb_layer = viewer.add_image(giemsa, name="giemsa")
    widget = FindCellsWidget(viewer)
    widget.select_layer(grey_layer)

    # A pick in the list, as a click on an entry sends it.
    index = widget.model_combo.findText("fluorescence-diagonal")
    widget.model_combo.setCurrentIndex(index)
    widget.model_combo.activated.emit(index)
    widget.select_layer(rgb_layer)

    assert widget.model_combo.currentText() == "fluorescence-diagonal"
    assert widget.model_path() == shipped_model("fluorescence-diagonal")
