"""The Review suspects dock: ordering, navigation, shortcuts and CSV round trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from qtpy.QtCore import Qt

from napari_supn._sample_data import load_sample
from napari_supn._widgets.common import current_plane, layer_id
from napari_supn._widgets.find import FindCellsWidget, FindJob
from napari_supn._widgets.review import ReviewWidget
from napari_supn.annotations import CSV_COLUMNS


@pytest.fixture(scope="module")
def scored_field(tiny_fluorescence_model):
    """The top half of the fluorescence sample scored once, half of its cells flagged."""
    from napari_supn.pipeline import score_field

    torch.set_num_threads(1)
    image, _, _ = load_sample("fluorescence")
    image = image[:336]
    first = score_field(image, tiny_fluorescence_model, segmenter="classical", samples=2, device="cpu")
    median = float(first.table["score"].median())
    result = score_field(
        image, tiny_fluorescence_model, segmenter="classical", samples=2, threshold=median, device="cpu"
    )
    return image, result


def show_results(viewer, image, result, model_path, name="field"):
    """Add a source layer and its result layers, as a finished Find run does."""
    source = viewer.add_image(image, name=name)
    finder = FindCellsWidget(viewer)
    job = FindJob(
        source=source,
        source_id=layer_id(source),
        plane=current_plane(viewer, source),
        model_path=model_path,
        device=torch.device("cpu"),
        settings={},
    )
    finder.add_result_layers(job, result)
    return viewer.layers[f"{name} cells"]


def test_review_table_sorted_by_score(make_napari_viewer, scored_field, tiny_fluorescence_model):
    viewer = make_napari_viewer()
    review = ReviewWidget(viewer)
    image, result = scored_field
    cells = show_results(viewer, image, result, tiny_fluorescence_model)

    assert review.cells_layer() is cells
    labels = review.table_labels()
    scores = cells.features.set_index("label").loc[labels, "score"].to_numpy()
    assert len(labels) == result.n_cells
    assert np.all(np.diff(scores) <= 0)
    assert review.table.item(0, 0).text() == "1"
    assert f"Cells: {result.n_cells}" in review.summary_label.text()
    assert f"flagged: {result.n_flagged}" in review.summary_label.text()


def test_review_selection_centres_view(make_napari_viewer, scored_field, tiny_fluorescence_model):
    viewer = make_napari_viewer()
    review = ReviewWidget(viewer)
    image, result = scored_field
    cells = show_results(viewer, image, result, tiny_fluorescence_model)
    label = review.table_labels()[2]
    row = cells.features.set_index("label").loc[label]
    zoom_before = viewer.scene.camera.zoom

    review.select_label(label)

    assert review.selected_label() == label
    np.testing.assert_allclose(viewer.scene.camera.center[-2:], [row["centroid_y"], row["centroid_x"]], atol=1e-6)
    assert viewer.scene.camera.zoom != zoom_before
    assert cells.selected_label == label


def test_review_shortcuts_mark_cells(make_napari_viewer, qtbot, scored_field, tiny_fluorescence_model):
    viewer = make_napari_viewer()
    review = ReviewWidget(viewer)
    qtbot.addWidget(review)
    review.show()
    qtbot.waitExposed(review)
    review.activateWindow()
    image, result = scored_field
    cells = show_results(viewer, image, result, tiny_fluorescence_model)
    labels = review.table_labels()
    review.select_label(labels[0])
    review.table.setFocus()
    qtbot.waitUntil(review.table.hasFocus, timeout=5_000)

    qtbot.keyClick(review.table, Qt.Key.Key_P)
    annotations = cells.features.set_index("label")["annotation"]
    assert annotations[labels[0]] == "parasite"
    assert review.table.item(0, 4).text() == "parasite"

    qtbot.keyClick(review.table, Qt.Key.Key_N)
    assert review.selected_label() == labels[1]
    qtbot.keyClick(review.table, Qt.Key.Key_H)
    qtbot.keyClick(review.table, Qt.Key.Key_Space)
    qtbot.keyClick(review.table, Qt.Key.Key_U)

    annotations = cells.features.set_index("label")["annotation"]
    assert annotations[labels[1]] == "healthy"
    assert annotations[labels[2]] == "unsure"
    assert "marked parasite: 1" in review.summary_label.text()
    parasitemia = 100 / result.n_cells
    assert f"{parasitemia:.2f} %" in review.summary_label.text()


def test_review_next_suspect_skips_reviewed(make_napari_viewer, scored_field, tiny_fluorescence_model):
    viewer = make_napari_viewer()
    review = ReviewWidget(viewer)
    image, result = scored_field
    show_results(viewer, image, result, tiny_fluorescence_model)
    flagged = [int(label) for label in result.table.loc[result.table["flagged"], "label"]]
    assert len(flagged) >= 2

    review.mark("healthy", label=flagged[0])
    chosen = review.next_suspect()

    assert chosen == flagged[1]
    for label in flagged[1:]:
        review.mark("parasite", label=label)
    # With every suspect reviewed, the next cell is the best-scoring unflagged one.
    unflagged = [int(label) for label in result.table.loc[~result.table["flagged"], "label"]]
    assert review.next_suspect() == unflagged[0]


def test_review_csv_round_trip(make_napari_viewer, scored_field, tiny_fluorescence_model, tmp_path):
    viewer = make_napari_viewer()
    review = ReviewWidget(viewer)
    image, result = scored_field
    cells = show_results(viewer, image, result, tiny_fluorescence_model)
    labels = review.table_labels()
    review.mark("parasite", label=labels[0])
    review.mark("unsure", label=labels[-1])
    path = tmp_path / "annotations.csv"

    review.save_csv(path)
    saved = pd.read_csv(path, keep_default_na=False)
    assert list(saved.columns) == CSV_COLUMNS
    assert list(saved["rank"]) == list(range(1, result.n_cells + 1))

    # A fresh run on the same labels starts unannotated; loading restores the marks.
    cells.features = cells.features.assign(annotation="")
    review.load_csv(path)

    annotations = cells.features.set_index("label")["annotation"]
    assert annotations[labels[0]] == "parasite"
    assert annotations[labels[-1]] == "unsure"
    assert (annotations.drop([labels[0], labels[-1]]) == "").all()
    assert review.table.item(0, 4).text() == "parasite"


def test_review_load_rejects_other_labels(make_napari_viewer, scored_field, tiny_fluorescence_model, tmp_path):
    viewer = make_napari_viewer()
    review = ReviewWidget(viewer)
    image, result = scored_field
    cells = show_results(viewer, image, result, tiny_fluorescence_model)
    path = tmp_path / "annotations.csv"
    review.save_csv(path)

    relabelled = np.asarray(cells.data).copy()
    relabelled[relabelled == review.table_labels()[0]] = 999
    cells.data = relabelled
    with pytest.raises(ValueError, match="does not match these cells"):
        review.load_csv(path)

    review._report_errors(lambda: review.load_csv(path))
    assert "does not match these cells" in review.status_label.text()


def test_review_load_rejects_other_areas(make_napari_viewer, scored_field, tiny_fluorescence_model, tmp_path):
    viewer = make_napari_viewer()
    review = ReviewWidget(viewer)
    image, result = scored_field
    cells = show_results(viewer, image, result, tiny_fluorescence_model)
    path = tmp_path / "annotations.csv"
    review.save_csv(path)

    shrunk = np.asarray(cells.data).copy()
    label = review.table_labels()[0]
    rows, cols = np.nonzero(shrunk == label)
    shrunk[rows[0], cols[0]] = 0
    cells.data = shrunk

    with pytest.raises(ValueError, match="different cell areas"):
        review.load_csv(path)
