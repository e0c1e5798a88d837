"""The "Find anomalous cells" dock: score every cell of an image layer.

The dock gathers the parameters of :func:`napari_supn.pipeline.score_field`,
runs it in a worker thread and shows four layers named after the source
layer: ``<source> cells`` (Labels with per-cell features), ``<source>
whitened residual``, ``<source> tile scores`` and ``<source> suspects``
(Points on flagged cells). The source layer is captured when the run starts,
so switching layers during a run cannot misplace the results, and running
again on the same source replaces its previous result layers. Until the
user picks a model, the dock follows the source layer: the shipped
``giemsa`` model for an RGB layer, ``fluorescence`` for a grey one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_supn._widgets.common import (
    METADATA_KEY,
    BackgroundTask,
    Plane,
    TaskOutcome,
    current_plane,
    layer_id,
    notify,
    result_layer_name,
    result_layers,
    session_models,
)

logger = logging.getLogger("napari_supn")

BROWSE = "Browse…"

#: Percentile of cell pixels used as the top of the residual maps' contrast range.
CONTRAST_PERCENTILE = 99.5

#: Shipped model chosen for the source layer until the user picks one, keyed
#: by whether the layer is RGB.
DEFAULT_MODELS = {True: "giemsa", False: "fluorescence"}
#: Name endings of the baseline models, which are never chosen by default.
BASELINE_SUFFIXES = ("-diagonal", "-spherical")


def is_baseline(name: str) -> bool:
    """Return whether a model list entry names a diagonal or spherical baseline."""
    stem = name.removesuffix(" (this session)").removesuffix(".supn")
    return stem.endswith(BASELINE_SUFFIXES)


@dataclass
class FindJob:
    """Everything one run needs, captured from the GUI when it starts."""

    source: object  # the napari Image layer
    source_id: str
    plane: Plane
    model_path: Path
    device: object  # torch.device
    settings: dict
    started: float = field(default_factory=time.perf_counter)


def contrast_limits(values: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Return one display range for a whole map: 0 to the 99.5th percentile of cell pixels."""
    cell_values = values[labels > 0]
    if cell_values.size == 0:
        return 0.0, 1.0
    high = float(np.percentile(cell_values, CONTRAST_PERCENTILE))
    if not high > 0:
        high = float(cell_values.max()) if cell_values.max() > 0 else 1.0
    return 0.0, high


def cells_features(table: pd.DataFrame) -> pd.DataFrame:
    """Return the Labels-layer features for a per-cell table, with an empty ``annotation``.

    ``index`` repeats ``label`` because napari maps label values to feature
    rows through a column of that name.
    """
    features = table.copy()
    features.insert(0, "index", features["label"].to_numpy())
    features["annotation"] = pd.Series([""] * len(features), dtype=object)
    return features.reset_index(drop=True)


class FindCellsWidget(QWidget):
    """Dock that scores the cells of an image layer with a SUPN model.

    Parameters
    ----------
    napari_viewer : napari.Viewer
    """

    #: Emitted on the GUI thread when a run ends, with its TaskOutcome.
    run_finished = Signal(object)

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._task: Optional[BackgroundTask] = None
        self._extra_models: dict[str, Path] = {}
        self._model_info_cache: dict[tuple[str, float], object] = {}
        self._image_layers: list = []
        # True once the user (or set_model) chose a model; until then the
        # model follows the source layer (see _default_model_index).
        self._model_chosen = False
        # Restored when a file dialog opened from the model list is cancelled.
        self._last_model_path: Optional[Path] = None

        self._build()
        self._refresh_layers()
        self._refresh_models()
        self._update_device_label()

        layers_events = self.viewer.layers.events
        layers_events.inserted.connect(self._refresh_layers)
        layers_events.removed.connect(self._refresh_layers)
        layers_events.reordered.connect(self._refresh_layers)
        session_models.changed.connect(self._refresh_models)

    # -- construction ------------------------------------------------------

    def _build(self) -> None:
        form = QFormLayout()

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("2D grey or RGB image; for a stack, the plane shown now")
        self.image_combo.currentIndexChanged.connect(self._apply_default_model)
        form.addRow("Image", self.image_combo)

        self.model_combo = QComboBox()
        self.model_combo.setToolTip("shipped model, a model trained in this session, or a .supn file")
        self.model_combo.activated.connect(self._model_activated)
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        form.addRow("Model", self.model_combo)
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        form.addRow("", self.model_info)

        self.device_combo = QComboBox()
        self.device_combo.addItems(self._device_choices())
        self.device_combo.currentIndexChanged.connect(self._update_device_label)
        form.addRow("Device", self.device_combo)
        self.device_label = QLabel("")
        form.addRow("", self.device_label)

        self.segmenter_combo = QComboBox()
        self.segmenter_combo.addItems(["auto", "cellpose", "classical"])
        self.segmenter_combo.setToolTip(
            "auto: Cellpose when local weights exist, else the classical segmenter"
        )
        form.addRow("Segmenter", self.segmenter_combo)

        self.cellpose_edit = QLineEdit()
        self.cellpose_edit.setPlaceholderText("default: cyto3 in the Cellpose models folder")
        cellpose_browse = QPushButton("…")
        cellpose_browse.setMaximumWidth(30)
        cellpose_browse.clicked.connect(self._browse_cellpose)
        cellpose_row = QHBoxLayout()
        cellpose_row.addWidget(self.cellpose_edit)
        cellpose_row.addWidget(cellpose_browse)
        form.addRow("Cellpose model", cellpose_row)

        self.diameter_spin = QDoubleSpinBox()
        self.diameter_spin.setRange(0.0, 2000.0)
        self.diameter_spin.setDecimals(1)
        self.diameter_spin.setSpecialValueText("auto")
        self.diameter_spin.setSuffix(" px")
        self.diameter_spin.setToolTip("expected cell diameter in image pixels; auto estimates it")
        form.addRow("Cell diameter", self.diameter_spin)

        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(1, 512)
        self.samples_spin.setToolTip("latent samples averaged per cell")
        form.addRow("Latent samples", self.samples_spin)

        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(1, 128)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("side of the square tiles summed for the cell score, in model pixels")
        form.addRow("Tile size", self.tile_spin)

        self.restoration_check = QCheckBox("refine latent codes before scoring (slower)")
        form.addRow("Restoration", self.restoration_check)

        self.threshold_edit = QLineEdit()
        self.threshold_edit.setPlaceholderText("none: no cell is flagged")
        self.threshold_edit.setToolTip("cells scoring above this are flagged; filled from the model")
        form.addRow("Threshold", self.threshold_edit)

        self.run_button = QPushButton("Find anomalous cells")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)

        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    @staticmethod
    def _device_choices() -> list[str]:
        import torch

        choices = ["auto", "cpu"]
        if torch.cuda.is_available():
            choices.append("cuda")
        return choices

    # -- layer and model lists --------------------------------------------

    def _refresh_layers(self, event=None) -> None:
        from napari.layers import Image

        current = self.selected_layer()
        self._image_layers = [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image) and METADATA_KEY not in layer.metadata
        ]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for layer in self._image_layers:
            self.image_combo.addItem(layer.name)
            layer.events.name.disconnect(self._rename_layer)
            layer.events.name.connect(self._rename_layer)
        self.image_combo.blockSignals(False)

        if current in self._image_layers:
            self.image_combo.setCurrentIndex(self._image_layers.index(current))
        else:
            active = self.viewer.layers.selection.active
            if active in self._image_layers:
                self.image_combo.setCurrentIndex(self._image_layers.index(active))
        # The index may be unchanged while the layer behind it changed, in
        # which case currentIndexChanged does not fire.
        self._apply_default_model()

    def _rename_layer(self, event=None) -> None:
        for index, layer in enumerate(self._image_layers):
            self.image_combo.setItemText(index, layer.name)

    def selected_layer(self):
        """Return the image layer chosen in the dock, or None."""
        index = self.image_combo.currentIndex() if hasattr(self, "image_combo") else -1
        if 0 <= index < len(self._image_layers):
            return self._image_layers[index]
        return None

    def select_layer(self, layer) -> None:
        """Choose ``layer`` (an Image layer in the viewer) as the source."""
        if layer not in self._image_layers:
            raise ValueError(f"layer {layer.name!r} is not an image layer of this viewer")
        self.image_combo.setCurrentIndex(self._image_layers.index(layer))

    def _model_entries(self) -> list[tuple[str, Path]]:
        from napari_supn.model_file import list_shipped_models

        entries = [(name, path) for name, path in list_shipped_models().items()]
        entries += [(f"{name} (this session)", path) for name, path in session_models.models().items()]
        entries += [(name, path) for name, path in self._extra_models.items()]
        return entries

    def _refresh_models(self) -> None:
        current = self.model_path() or self._last_model_path
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for name, path in self._model_entries():
            self.model_combo.addItem(name, str(path))
        self.model_combo.addItem(BROWSE, None)
        self.model_combo.blockSignals(False)

        paths = [self.model_combo.itemData(index) for index in range(self.model_combo.count())]
        if current is not None and str(current) in paths:
            self.model_combo.setCurrentIndex(paths.index(str(current)))
            return

        self._model_chosen = False
        default = self._default_model_index()
        self.model_combo.blockSignals(True)
        self.model_combo.setCurrentIndex(default)
        self.model_combo.blockSignals(False)
        if default >= 0:
            self._model_changed(default)
        elif self.model_combo.count() > 1:
            kind = "RGB" if self._selected_layer_is_rgb() else "grey"
            self.model_info.setText(f"Pick a model: no listed model other than the "
                                    f"baselines takes {kind} images.")
        else:
            self.model_info.setText("No model yet: train one or browse for a .supn file.")

    def _selected_layer_is_rgb(self) -> bool:
        layer = self.selected_layer()
        return bool(layer is not None and layer.rgb)

    def _default_model_index(self) -> int:
        """Return the model list index that suits the chosen layer, or -1 for none.

        That is the shipped ``giemsa`` model for an RGB layer and
        ``fluorescence`` for a grey one (or when no layer is chosen). When
        that model is not listed, it is the first listed model that is not a
        ``-diagonal`` or ``-spherical`` baseline and takes the layer's
        channels. Baselines are never returned.
        """
        rgb = self._selected_layer_is_rgb()
        names = [self.model_combo.itemText(index) for index in range(self.model_combo.count())]
        if DEFAULT_MODELS[rgb] in names:
            return names.index(DEFAULT_MODELS[rgb])

        layer_channels = "rgb" if rgb else "grey"
        for index, name in enumerate(names):
            data = self.model_combo.itemData(index)
            if not data or is_baseline(name):
                continue
            try:
                loaded = self._model_info(Path(data))
            except ValueError as error:
                logger.warning("Skipped model %s as a default: %s", data, error)
                continue
            if loaded.preprocessing.channels == layer_channels:
                return index
        return -1

    def _apply_default_model(self, index: int = -1) -> None:
        """Choose the model that suits the chosen layer, unless the user chose one."""
        if self._model_chosen or not hasattr(self, "model_combo"):
            return
        default = self._default_model_index()
        if default >= 0 and default != self.model_combo.currentIndex():
            self.model_combo.setCurrentIndex(default)

    def model_path(self) -> Optional[Path]:
        """Return the file of the chosen model, or None."""
        data = self.model_combo.currentData() if hasattr(self, "model_combo") else None
        return Path(data) if data else None

    def set_model(self, name_or_path: str | Path) -> None:
        """Choose a model by shipped name, session name or file path."""
        from napari_supn.model_file import resolve_model_path

        for index in range(self.model_combo.count()):
            data = self.model_combo.itemData(index)
            if data and self.model_combo.itemText(index) in (str(name_or_path), f"{name_or_path} (this session)"):
                self._model_chosen = True
                self.model_combo.setCurrentIndex(index)
                return
        path = resolve_model_path(name_or_path)
        self._extra_models[path.name] = path
        self._refresh_models()
        paths = [self.model_combo.itemData(index) for index in range(self.model_combo.count())]
        self._model_chosen = True
        self.model_combo.setCurrentIndex(paths.index(str(path)))

    def _model_activated(self, index: int) -> None:
        # activated fires only for a choice made in the list by the user.
        if self.model_combo.itemText(index) != BROWSE:
            self._model_chosen = True
            return
        path, _ = QFileDialog.getOpenFileName(self, "Open a napari-supn model", "", "SUPN models (*.supn)")
        if path:
            self.set_model(path)
        else:
            self._refresh_models()

    def _model_changed(self, index: int) -> None:
        path = self.model_path()
        if path is None:
            return
        self._last_model_path = path
        try:
            loaded = self._model_info(path)
        except ValueError as error:
            self.model_info.setText("")
            self._show_status(str(error), "error")
            return
        self._fill_model_defaults(loaded)

    def _model_info(self, path: Path):
        from napari_supn.model_file import load_model

        key = (str(path), path.stat().st_mtime if path.exists() else 0.0)
        if key not in self._model_info_cache:
            self._model_info_cache[key] = load_model(path)
        return self._model_info_cache[key]

    def _fill_model_defaults(self, loaded) -> None:
        from napari_supn.pipeline import model_threshold
        from napari_supn.scoring import stored_score_settings

        stored = stored_score_settings(loaded.metadata)
        self.samples_spin.setValue(stored["samples"])
        self.tile_spin.setValue(stored["tile"])
        threshold = model_threshold(loaded.metadata)
        self.threshold_edit.setText("" if threshold is None else f"{threshold:.6g}")

        config = loaded.config
        self.model_info.setText(
            f"{loaded.preprocessing.channels} input, {config.likelihood} likelihood, "
            f"{config.image_size} px model input"
            + ("" if threshold is not None else "; no stored threshold")
        )

    def _browse_cellpose(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Cellpose 3 weights file")
        if path:
            self.cellpose_edit.setText(path)

    def _update_device_label(self, index: int = 0) -> None:
        try:
            device = self._device()
        except ValueError as error:
            self.device_label.setText(str(error))
            return
        self.device_label.setText(f"Model runs on: {device}")

    def _device(self):
        from napari_supn.device import select_device

        return select_device(self.device_combo.currentText())

    # -- running -------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a run is in progress."""
        return self._task is not None and self._task.running

    def _settings(self) -> dict:
        """Read the scoring settings from the form; raise ValueError for invalid input."""
        text = self.threshold_edit.text().strip()
        if text:
            try:
                threshold = float(text)
            except ValueError:
                raise ValueError(f"threshold {text!r} is not a number; enter one or clear the field") from None
        else:
            threshold = float("inf")

        cellpose = self.cellpose_edit.text().strip() or None
        diameter = self.diameter_spin.value() or None
        return {
            "segmenter": self.segmenter_combo.currentText(),
            "cellpose_model": cellpose,
            "diameter": diameter,
            "samples": self.samples_spin.value(),
            "tile": self.tile_spin.value(),
            "restoration": self.restoration_check.isChecked(),
            "threshold": threshold,
        }

    def _prepare(self) -> FindJob:
        """Capture the source layer and settings; raise ValueError with a message for the user."""
        layer = self.selected_layer()
        if layer is None:
            raise ValueError("no image layer chosen: open an image (File > Open Sample) and pick it")
        model_path = self.model_path()
        if model_path is None:
            raise ValueError("no model chosen: pick a shipped model, train one, or browse for a .supn file")

        plane = current_plane(self.viewer, layer)
        if plane.data.size == 0:
            raise ValueError(f"image {layer.name!r} is empty (shape {plane.data.shape})")
        if np.ptp(plane.data) == 0:
            raise ValueError(
                f"image {layer.name!r} is empty: every pixel is {plane.data.flat[0]}, so there are "
                "no cells to find"
            )
        return FindJob(
            source=layer,
            source_id=layer_id(layer),
            plane=plane,
            model_path=model_path,
            device=self._device(),
            settings=self._settings(),
        )

    def run(self) -> bool:
        """Start scoring the chosen layer; return False when the input is invalid.

        The result layers appear when the worker finishes; ``run_finished``
        fires then, with the run's TaskOutcome.
        """
        if self.running:
            return False
        try:
            job = self._prepare()
        except ValueError as error:
            self._show_status(str(error), "error")
            return False

        def compute(progress, stage, cancel):
            from napari_supn.model_file import load_model
            from napari_supn.pipeline import score_field

            loaded = load_model(job.model_path, device=job.device)
            return score_field(
                job.plane.data,
                loaded,
                progress=progress,
                stage=stage,
                cancel=cancel,
                **job.settings,
            )

        plane_text = f" (plane {job.plane.index})" if job.plane.index else ""
        self._task = BackgroundTask(
            compute,
            f"Finding anomalous cells in {job.source.name}{plane_text}",
            on_done=lambda outcome: self._finish(job, outcome),
            on_stage=lambda name: self.status_label.setText(f"{job.source.name}: {name} on {job.device}…"),
        )
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status_label.setText(f"{job.source.name}: starting on {job.device}…")
        logger.info("Finding anomalous cells in %r%s with %s on %s", job.source.name, plane_text, job.model_path, job.device)
        self._task.start()
        return True

    def cancel(self) -> None:
        """Ask the running job to stop; no result layers are added for it."""
        if self.running:
            self._task.cancel()
            self.status_label.setText("Cancelling…")

    def _finish(self, job: FindJob, outcome: TaskOutcome) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        try:
            self._show_outcome(job, outcome)
        finally:
            self.run_finished.emit(outcome)

    def _show_outcome(self, job: FindJob, outcome: TaskOutcome) -> None:
        name = job.source.name
        if outcome.cancelled:
            self._show_status(f"Cancelled: no layers were added for {name!r}.", "info")
            return
        if outcome.error is not None:
            self._show_status(f"Could not score {name!r}: {outcome.error}", "error")
            return

        result = outcome.value
        if job.source not in self.viewer.layers:
            self._show_status(f"Layer {name!r} was removed during the run, so its results were discarded.", "warning")
            return
        if result.n_cells == 0:
            self._show_status(
                f"No cells found in {name!r}, so nothing was scored. {result.segmentation_message} "
                "Check the segmenter and the cell diameter.",
                "warning",
            )
            return

        self.add_result_layers(job, result)
        seconds = time.perf_counter() - job.started
        threshold = "no threshold" if not np.isfinite(result.threshold) else f"threshold {result.threshold:.4g}"
        self._show_status(
            f"{name}: {result.n_cells} cells, {result.n_flagged} flagged ({threshold}, "
            f"{100 * result.parasitemia:.1f} % of cells) in {seconds:.1f} s on {job.device}. "
            f"{result.segmentation_message}",
            "info",
        )

    # -- result layers -------------------------------------------------------

    def add_result_layers(self, job: FindJob, result) -> list:
        """Replace the source's previous result layers by the layers of ``result``."""
        source = job.source
        for old in result_layers(self.viewer, job.source_id):
            self.viewer.layers.remove(old)

        geometry = {"scale": job.plane.scale, "translate": job.plane.translate}

        def metadata(kind: str) -> dict:
            return {
                METADATA_KEY: {
                    "kind": kind,
                    "source_id": job.source_id,
                    "source_name": source.name,
                    "plane": list(job.plane.index),
                    "model": str(job.model_path),
                    "threshold": result.threshold,
                    "segmentation": result.segmentation_message,
                }
            }

        is_rgb = bool(getattr(source, "rgb", False))
        blending = "translucent" if is_rgb else "additive"
        low_high = contrast_limits(result.whitened, result.labels)
        whitened = self.viewer.add_image(
            result.whitened,
            name=result_layer_name(source.name, "whitened"),
            colormap="inferno",
            contrast_limits=low_high,
            blending=blending,
            opacity=0.7,
            metadata=metadata("whitened"),
            **geometry,
        )
        tiles = self.viewer.add_image(
            result.tiles,
            name=result_layer_name(source.name, "tiles"),
            colormap="magma",
            contrast_limits=contrast_limits(result.tiles, result.labels),
            blending=blending,
            opacity=0.7,
            visible=False,
            metadata=metadata("tiles"),
            **geometry,
        )

        features = cells_features(result.table)
        cells = self.viewer.add_labels(
            result.labels,
            name=result_layer_name(source.name, "cells"),
            features=features,
            opacity=0.5,
            metadata=metadata("cells"),
            **geometry,
        )
        cells.contour = 2

        suspects = self.add_suspects_layer(result.table, source.name, metadata("suspects"), geometry)
        return [whitened, tiles, cells, suspects]

    def add_suspects_layer(self, table: pd.DataFrame, source_name: str, metadata: dict, geometry: dict):
        """Add a Points layer on the flagged cells, each labelled with its score."""
        flagged = table[table["flagged"]].reset_index(drop=True)
        coordinates = flagged[["centroid_y", "centroid_x"]].to_numpy(dtype=float).reshape(-1, 2)
        features = flagged[["label", "score", "rank"]].copy()

        areas = table["area"].to_numpy(dtype=float)
        diameter = 2.0 * np.sqrt(np.median(areas) / np.pi) if areas.size else 20.0
        return self.viewer.add_points(
            coordinates,
            name=result_layer_name(source_name, "suspects"),
            features=features,
            size=1.3 * diameter,
            symbol="disc",
            face_color="transparent",
            border_color="red",
            border_width=0.06,
            text={
                "string": "{score:.3g}",
                "color": "yellow",
                "size": 9,
                "anchor": "upper_left",
            },
            metadata=metadata,
            **geometry,
        )

    def _show_status(self, message: str, level: str) -> None:
        self.status_label.setText(message)
        if level == "error":
            logger.warning("Find anomalous cells: %s", message)
        notify(message, level)
