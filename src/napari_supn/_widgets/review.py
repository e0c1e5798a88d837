"""The "Review suspects" dock: walk through the cells by score and annotate them.

The table lists the cells of a ``<source> cells`` layer sorted by score.
Selecting a row centres and zooms the view on that cell. With the table
focused, P, H and U mark the selected cell as parasite, healthy or unsure,
0 clears the mark, and N or Space jumps to the next unreviewed suspect.
Annotations live in the ``annotation`` column of the cells layer's features
and can be saved to and loaded from CSV (:mod:`napari_supn.annotations`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt
from qtpy.QtGui import QKeySequence, QShortcut
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_supn.annotations import load_annotations, merge_annotations, save_annotations, summarise
from napari_supn._widgets.common import is_cells_layer, notify

logger = logging.getLogger("napari_supn")

#: Table columns: header → feature column.
COLUMNS = {"Rank": "rank", "Label": "label", "Score": "score", "Flagged": "flagged", "Annotation": "annotation"}

#: Shortcut key → annotation written by it.
MARK_KEYS = {"P": "parasite", "H": "healthy", "U": "unsure", "0": ""}

#: Fraction of the canvas's shorter side that a centred cell spans.
CELL_FRACTION_OF_VIEW = 0.25


class ReviewWidget(QWidget):
    """Dock that lists the scored cells and records a reviewer's verdict on each.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._cells_layers: list = []
        self._row_labels: list[int] = []

        self._build()
        self._refresh_layers()

        self.viewer.layers.events.inserted.connect(self._layer_inserted)
        self.viewer.layers.events.removed.connect(self._refresh_layers)

    def _build(self) -> None:
        form = QFormLayout()
        self.layer_combo = QComboBox()
        self.layer_combo.currentIndexChanged.connect(self._layer_changed)
        form.addRow("Cells layer", self.layer_combo)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._selection_changed)

        marks = QHBoxLayout()
        for key, annotation in MARK_KEYS.items():
            text = f"{annotation.capitalize() or 'Clear'} ({key})"
            button = QPushButton(text)
            button.clicked.connect(lambda checked=False, value=annotation: self.mark(value))
            marks.addWidget(button)
        next_button = QPushButton("Next suspect (N)")
        next_button.clicked.connect(self.next_suspect)

        files = QHBoxLayout()
        save_button = QPushButton("Save CSV…")
        save_button.clicked.connect(self._save_dialog)
        load_button = QPushButton("Load CSV…")
        load_button.clicked.connect(self._load_dialog)
        files.addWidget(save_button)
        files.addWidget(load_button)

        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        hint = QLabel("Keys (table focused): P parasite, H healthy, U unsure, 0 clear, N or Space next suspect.")
        hint.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.table, 1)
        layout.addLayout(marks)
        layout.addWidget(next_button)
        layout.addWidget(hint)
        layout.addWidget(self.summary_label)
        layout.addLayout(files)
        layout.addWidget(self.status_label)

        for key, annotation in MARK_KEYS.items():
            self._shortcut(key, lambda value=annotation: self.mark(value))
        self._shortcut("N", self.next_suspect)
        self._shortcut("Space", self.next_suspect)

    def _shortcut(self, key: str, slot) -> None:
        shortcut = QShortcut(QKeySequence(key), self)
        shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        shortcut.activated.connect(slot)

    # -- layers ------------------------------------------------------------

    def _layer_inserted(self, event) -> None:
        self._refresh_layers()
        if is_cells_layer(event.value):
            self.set_layer(event.value)

    def _refresh_layers(self, event=None) -> None:
        current = self.cells_layer()
        self._cells_layers = [layer for layer in self.viewer.layers if is_cells_layer(layer)]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems([layer.name for layer in self._cells_layers])
        self.layer_combo.blockSignals(False)

        if current in self._cells_layers:
            self.layer_combo.setCurrentIndex(self._cells_layers.index(current))
        elif self._cells_layers:
            self.layer_combo.setCurrentIndex(len(self._cells_layers) - 1)
        self._layer_changed()

    def cells_layer(self):
        """Return the cells layer under review, or None."""
        index = self.layer_combo.currentIndex() if hasattr(self, "layer_combo") else -1
        if 0 <= index < len(self._cells_layers):
            return self._cells_layers[index]
        return None

    def set_layer(self, layer) -> None:
        """Review ``layer``, a cells layer written by the Find widget."""
        if layer not in self._cells_layers:
            raise ValueError(f"layer {layer.name!r} is not a cells layer from 'Find anomalous cells'")
        self.layer_combo.setCurrentIndex(self._cells_layers.index(layer))
        self._layer_changed()

    def _layer_changed(self, index: int = 0) -> None:
        self.populate()

    # -- table -----------------------------------------------------------

    def features(self) -> pd.DataFrame:
        """Return the features of the cells layer under review (empty without one)."""
        layer = self.cells_layer()
        return layer.features if layer is not None else pd.DataFrame()

    def populate(self) -> None:
        """Fill the table from the cells layer, highest score first."""
        features = self.features()
        self.table.blockSignals(True)
        self.table.clearContents()
        if features.empty:
            self.table.setRowCount(0)
            self._row_labels = []
        else:
            ordered = features.sort_values("score", ascending=False, kind="stable")
            self.table.setRowCount(len(ordered))
            self._row_labels = [int(label) for label in ordered["label"]]
            for row, (_, cell) in enumerate(ordered.iterrows()):
                self._fill_row(row, cell)
        self.table.blockSignals(False)
        self._update_summary()

    def _fill_row(self, row: int, cell: pd.Series) -> None:
        texts = {
            "rank": str(int(cell["rank"])),
            "label": str(int(cell["label"])),
            "score": f"{float(cell['score']):.4g}",
            "flagged": "yes" if bool(cell["flagged"]) else "",
            "annotation": str(cell.get("annotation", "") or ""),
        }
        for column, key in enumerate(COLUMNS.values()):
            item = QTableWidgetItem(texts[key])
            if key in ("rank", "label", "score"):
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.table.setItem(row, column, item)

    def table_labels(self) -> list[int]:
        """Return the label of each table row, top to bottom."""
        return list(self._row_labels)

    def selected_label(self) -> Optional[int]:
        """Return the label of the selected row, or None."""
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows:
            return None
        return self._row_labels[rows[0].row()]

    def select_label(self, label: int) -> None:
        """Select the row of ``label``, which centres the view on that cell."""
        self.table.selectRow(self._row_labels.index(int(label)))

    def _selection_changed(self) -> None:
        label = self.selected_label()
        if label is not None:
            self.centre_on(label)

    def centre_on(self, label: int) -> None:
        """Centre the view on cell ``label`` and zoom so it spans a quarter of the canvas."""
        layer = self.cells_layer()
        features = self.features()
        cell = features[features["label"] == label]
        if layer is None or cell.empty:
            return
        cell = cell.iloc[0]

        world = np.asarray(layer.data_to_world([float(cell["centroid_y"]), float(cell["centroid_x"])]), float)
        center = list(self.viewer.scene.camera.center)
        center[-2:] = world[-2:]
        self.viewer.scene.camera.center = tuple(center)

        diameter = 2.0 * np.sqrt(float(cell["area"]) / np.pi) * float(np.max(np.abs(layer.scale[-2:])))
        canvas = min(self.viewer.canvas.size)
        if diameter > 0 and canvas > 0:
            self.viewer.scene.camera.zoom = CELL_FRACTION_OF_VIEW * canvas / diameter
        layer.selected_label = int(label)

    # -- annotation ----------------------------------------------------------

    def mark(self, annotation: str, label: Optional[int] = None) -> None:
        """Set the annotation of ``label`` (default: the selected cell)."""
        layer = self.cells_layer()
        label = self.selected_label() if label is None else int(label)
        if layer is None or label is None:
            self.status_label.setText("Select a cell in the table first.")
            return

        features = layer.features.copy()
        features.loc[features["label"] == label, "annotation"] = annotation
        layer.features = features

        row = self._row_labels.index(label)
        self.table.item(row, list(COLUMNS.values()).index("annotation")).setText(annotation)
        self._update_summary()

    def next_suspect(self) -> Optional[int]:
        """Select the next unreviewed flagged cell below the selection (else any unreviewed cell).

        Returns the label selected, or None when every cell is reviewed.
        """
        features = self.features()
        if features.empty:
            return None
        by_label = features.set_index("label")
        current = self.selected_label()
        start = self._row_labels.index(current) + 1 if current is not None else 0
        order = self._row_labels[start:] + self._row_labels[:start]

        def unreviewed(label: int) -> bool:
            return not str(by_label.at[label, "annotation"] or "")

        for flagged_only in (True, False):
            for label in order:
                if unreviewed(label) and (bool(by_label.at[label, "flagged"]) or not flagged_only):
                    self.select_label(label)
                    return label
        self.status_label.setText("Every cell has an annotation.")
        return None

    def _update_summary(self) -> None:
        features = self.features()
        if features.empty:
            self.summary_label.setText("No scored cells: run 'Find anomalous cells' first.")
            return
        counts = summarise(features)
        self.summary_label.setText(
            f"Cells: {counts['cells']} · flagged: {counts['flagged']} "
            f"({100 * counts['flagged_fraction']:.1f} %) · marked parasite: {counts['parasite']}, "
            f"healthy: {counts['healthy']}, unsure: {counts['unsure']}, "
            f"unreviewed: {counts['unreviewed']} · parasitemia (marked parasites / cells): "
            f"{100 * counts['parasitemia']:.2f} %"
        )

    # -- files -------------------------------------------------------------

    def save_csv(self, path: str | Path) -> Path:
        """Write the cells layer's table and annotations to ``path``."""
        layer = self.cells_layer()
        if layer is None:
            raise ValueError("no cells layer to save: run 'Find anomalous cells' first")
        written = save_annotations(layer.features, path)
        self.status_label.setText(f"Saved {len(layer.features)} cells to {written}.")
        return written

    def load_csv(self, path: str | Path) -> None:
        """Read annotations from ``path`` onto the cells layer, after checking the labels match."""
        layer = self.cells_layer()
        if layer is None:
            raise ValueError("no cells layer to load onto: run 'Find anomalous cells' first")
        loaded = load_annotations(path, np.asarray(layer.data))
        layer.features = merge_annotations(layer.features, loaded)
        self.populate()
        self.status_label.setText(f"Loaded annotations for {len(loaded)} cells from {path}.")

    def _save_dialog(self) -> None:
        layer = self.cells_layer()
        default = f"{layer.name}.csv" if layer is not None else "cells.csv"
        path, _ = QFileDialog.getSaveFileName(self, "Save cell annotations", default, "CSV (*.csv)")
        if path:
            self._report_errors(lambda: self.save_csv(path))

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load cell annotations", "", "CSV (*.csv)")
        if path:
            self._report_errors(lambda: self.load_csv(path))

    def _report_errors(self, action) -> None:
        try:
            action()
        except (ValueError, OSError) as error:
            self.status_label.setText(str(error))
            logger.warning("Review suspects: %s", error)
            notify(str(error), "error")
