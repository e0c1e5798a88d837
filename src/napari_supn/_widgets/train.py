"""The "Train SUPN model" dock: train a model file from a folder in the background.

Training runs :func:`napari_supn.fitting.fit_model` in a worker thread
with a progress bar, a live loss plot and a Cancel button.
A cancelled run keeps its last checkpoint (``<output>.ckpt``) and writes no
model file. A finished model is registered in the session model list, so
the Find dock offers it at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
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

from napari_supn._widgets.common import BackgroundTask, TaskOutcome, notify, session_models
from napari_supn.fitting import FitRequest, fit_model

logger = logging.getLogger("napari_supn")

SOURCE_LABELS = {"crops": "folder of healthy crops", "fields": "folder of fields of view"}


class LossPlot(QWidget):
    """A small matplotlib plot of the training loss per iteration, one line per stage."""

    def __init__(self) -> None:
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.5, 2.2), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.axes = self.figure.add_subplot(1, 1, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.points: dict[int, list[tuple[int, float]]] = {}
        self.clear()

    def clear(self) -> None:
        """Remove all points and draw empty axes."""
        self.points = {1: [], 2: []}
        self._redraw()

    def add(self, record: tuple) -> None:
        """Append one ``(stage, iteration, loss)`` record and redraw."""
        stage, iteration, value = record
        self.points.setdefault(int(stage), []).append((int(iteration), float(value)))
        self._redraw()

    def _redraw(self) -> None:
        self.axes.clear()
        for stage, points in self.points.items():
            if points:
                iterations, values = zip(*points)
                self.axes.plot(iterations, values, label=f"stage {stage}")
        self.axes.set_xlabel("iteration", fontsize=8)
        self.axes.set_ylabel("loss per crop", fontsize=8)
        self.axes.tick_params(labelsize=7)
        if any(self.points.values()):
            self.axes.legend(fontsize=7)
        self.canvas.draw_idle()


class TrainWidget(QWidget):
    """Dock that trains a model on healthy crops or on fields of view.

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
        self._build()
        self._source_changed()

    def _build(self) -> None:
        form = QFormLayout()

        self.source_combo = QComboBox()
        for key, text in SOURCE_LABELS.items():
            self.source_combo.addItem(text, key)
        self.source_combo.currentIndexChanged.connect(self._source_changed)
        form.addRow("Training data", self.source_combo)

        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("crops: flat folder or raw/ + mask/; fields: images")
        form.addRow("Folder", self._with_button(self.folder_edit, self._browse_folder))

        self.drop_spin = QDoubleSpinBox()
        self.drop_spin.setRange(0.0, 50.0)
        self.drop_spin.setSuffix(" %")
        self.drop_spin.setToolTip(
            "fields only: drop this share of crops with the largest stage-1 error before stage 2"
        )
        form.addRow("Drop most anomalous", self.drop_spin)

        self.segmenter_combo = QComboBox()
        self.segmenter_combo.addItems(["auto", "cellpose", "classical"])
        form.addRow("Segmenter (fields)", self.segmenter_combo)
        self.cellpose_edit = QLineEdit()
        self.cellpose_edit.setPlaceholderText("default: cyto3 in the Cellpose models folder")
        form.addRow("Cellpose model (fields)", self.cellpose_edit)

        self.likelihood_combo = QComboBox()
        self.likelihood_combo.addItems(["supn", "diagonal", "spherical"])
        form.addRow("Likelihood", self.likelihood_combo)

        self.radius_spin = self._spin(1, 4, 1, "SUPN connectivity radius in model pixels")
        form.addRow("Radius", self.radius_spin)
        self.stage1_spin = self._spin(1, 1_000_000, 6000, "Adam steps of stage 1 (mean)")
        form.addRow("Stage 1 iterations", self.stage1_spin)
        self.stage2_spin = self._spin(1, 1_000_000, 1500, "Adam steps of stage 2 (likelihood)")
        form.addRow("Stage 2 iterations", self.stage2_spin)
        self.batch_spin = self._spin(1, 4096, 32, "crops per iteration")
        form.addRow("Batch size", self.batch_spin)
        self.downsample_spin = self._spin(1, 16, 2, "average pooling from crop to model input")
        form.addRow("Downsample", self.downsample_spin)
        self.depth_spin = self._spin(1, 8, 4, "encoder blocks; model input must divide by 2^depth")
        form.addRow("Depth", self.depth_spin)
        self.width_spin = self._spin(1, 256, 16, "channels of the first encoder block")
        form.addRow("Base width", self.width_spin)
        self.latent_spin = self._spin(1, 1024, 100, "latent dimensions")
        form.addRow("Latent size", self.latent_spin)

        self.device_combo = QComboBox()
        self.device_combo.addItems(self._device_choices())
        form.addRow("Device", self.device_combo)

        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("model file to write, e.g. my_model.supn")
        form.addRow("Output file", self._with_button(self.out_edit, self._browse_out))

        self.train_button = QPushButton("Train")
        self.train_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.cancel_button)

        self.loss_plot = LossPlot()
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.loss_plot)
        layout.addWidget(self.status_label)

    @staticmethod
    def _spin(low: int, high: int, value: int, tooltip: str) -> QSpinBox:
        spin = QSpinBox()
        spin.setRange(low, high)
        spin.setValue(value)
        spin.setToolTip(tooltip)
        return spin

    def _with_button(self, edit: QLineEdit, slot) -> QHBoxLayout:
        button = QPushButton("…")
        button.setMaximumWidth(30)
        button.clicked.connect(slot)
        row = QHBoxLayout()
        row.addWidget(edit)
        row.addWidget(button)
        return row

    @staticmethod
    def _device_choices() -> list[str]:
        import torch

        return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    def _source_changed(self, index: int = 0) -> None:
        fields = self.source_combo.currentData() == "fields"
        for widget in (self.drop_spin, self.segmenter_combo, self.cellpose_edit):
            widget.setEnabled(fields)

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Training folder")
        if folder:
            self.folder_edit.setText(folder)

    def _browse_out(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Model file", "model.supn", "SUPN models (*.supn)")
        if path:
            self.out_edit.setText(path if path.endswith(".supn") else f"{path}.supn")

    # -- running -------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether training is in progress."""
        return self._task is not None and self._task.running

    def request(self) -> FitRequest:
        """Build the training request from the form; raise ValueError for invalid input."""
        folder = self.folder_edit.text().strip()
        out = self.out_edit.text().strip()
        if not folder:
            raise ValueError("choose a training folder")
        if not out:
            raise ValueError("choose an output file ending in .supn")
        source = self.source_combo.currentData()
        request = FitRequest(
            data=Path(folder).expanduser(),
            out=Path(out).expanduser(),
            source=source,
            likelihood=self.likelihood_combo.currentText(),
            radius=self.radius_spin.value(),
            stage1_iterations=self.stage1_spin.value(),
            stage2_iterations=self.stage2_spin.value(),
            batch_size=self.batch_spin.value(),
            device=self.device_combo.currentText(),
            downsample=self.downsample_spin.value(),
            depth=self.depth_spin.value(),
            base_width=self.width_spin.value(),
            latent_size=self.latent_spin.value(),
            # The drop field is disabled for crop folders, so a value left in it must not apply.
            drop_fraction=self.drop_spin.value() / 100.0 if source == "fields" else 0.0,
            segmenter=self.segmenter_combo.currentText(),
            cellpose_model=self.cellpose_edit.text().strip() or None,
            log_every=50,
            extra_metadata={"trained_in": "napari widget"},
        )
        request.validate()
        return request

    def run(self) -> bool:
        """Start training; return False when the form is invalid."""
        if self.running:
            return False
        try:
            request = self.request()
        except ValueError as error:
            self._show_status(str(error), "error")
            return False

        self.loss_plot.clear()
        self._task = BackgroundTask(
            lambda progress, stage, cancel, loss: fit_model(request, progress, stage, cancel, loss),
            f"Training {request.out.name}",
            on_done=lambda outcome: self._finish(request, outcome),
            on_stage=lambda name: self.status_label.setText(f"Training {request.out.name}: {name}…"),
            on_loss=self.loss_plot.add,
        )
        self.train_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status_label.setText(f"Training {request.out.name}…")
        logger.info("Training %s from %s (%s)", request.out, request.data, request.source)
        self._task.start()
        return True

    def cancel(self) -> None:
        """Stop after the current iteration, keeping the last checkpoint."""
        if self.running:
            self._task.cancel()
            self.status_label.setText("Cancelling after the current iteration…")

    def _finish(self, request: FitRequest, outcome: TaskOutcome) -> None:
        self.train_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        checkpoint = request.checkpoint_path
        try:
            if outcome.cancelled:
                checkpoint_note = f"; the last checkpoint is kept at {checkpoint}" if checkpoint.exists() else ""
                self._show_status(f"Training cancelled, no model file written{checkpoint_note}.", "info")
            elif outcome.error is not None:
                self._show_status(f"Training failed: {outcome.error}", "error")
            else:
                result = outcome.value
                name = session_models.register(result.path)
                threshold = "no threshold" if result.threshold is None else f"threshold {result.threshold:.4g}"
                dropped = f", {result.dropped} dropped after stage 1" if result.dropped else ""
                self._show_status(
                    f"Saved {result.path} ({result.crops} crops{dropped}, {threshold}); "
                    f"'{name}' is now in the Find dock's model list.",
                    "info",
                )
        finally:
            self.run_finished.emit(outcome)

    def _show_status(self, message: str, level: str) -> None:
        self.status_label.setText(message)
        if level == "error":
            logger.warning("Train SUPN model: %s", message)
        notify(message, level)
