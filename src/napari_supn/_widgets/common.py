"""Pieces the napari-supn docks share: background tasks, the session model list, layer helpers.

Widgets only gather parameters and show results. Every long computation
runs through :class:`BackgroundTask`, which calls a napari-free function in
a ``napari.qt.threading`` worker and drives a ``napari.utils.progress`` bar.
The function receives ``progress(done, total)``, ``stage(name)`` and
``cancel()`` hooks, the same hooks as the library's long loops.
"""

from __future__ import annotations

import logging
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from psygnal import Signal as PsygnalSignal
from qtpy.QtCore import QObject, Signal

from napari_supn.progress import Cancelled

logger = logging.getLogger("napari_supn")

#: Key in ``layer.metadata`` under which result layers record where they came from.
METADATA_KEY = "napari_supn"

#: Suffix of each result layer's name, after the source layer's name.
RESULT_SUFFIXES = {
    "cells": "cells",
    "whitened": "whitened residual",
    "tiles": "tile scores",
    "suspects": "suspects",
}


def result_layer_name(source_name: str, kind: str) -> str:
    """Return the name of a result layer, e.g. ``"field cells"`` for kind ``"cells"``."""
    return f"{source_name} {RESULT_SUFFIXES[kind]}"


def result_layers(viewer, source_id: str) -> list:
    """Return the layers in ``viewer`` that were computed from the layer with ``source_id``."""
    found = []
    for layer in viewer.layers:
        info = layer.metadata.get(METADATA_KEY)
        if isinstance(info, dict) and info.get("source_id") == source_id:
            found.append(layer)
    return found


def layer_id(layer) -> str:
    """Return a stable string id for a napari layer (its ``unique_id``)."""
    return str(layer.unique_id)


def is_cells_layer(layer) -> bool:
    """Return True for a ``<source> cells`` Labels layer written by the Find widget."""
    info = layer.metadata.get(METADATA_KEY)
    return isinstance(info, dict) and info.get("kind") == "cells"


# ---------------------------------------------------------------------------
# Session model registry


class ModelRegistry:
    """Models trained (or opened) in this napari session, shared by all docks.

    The Train widget registers each model file it writes; the Find widget
    lists the registered models after the shipped ones and refreshes when
    ``changed`` fires.
    """

    changed = PsygnalSignal()

    def __init__(self) -> None:
        self._models: dict[str, Path] = {}

    def register(self, path: str | Path, name: Optional[str] = None) -> str:
        """Add a model file and return its display name (the file stem unless given)."""
        path = Path(path)
        name = name or path.stem
        self._models[name] = path
        logger.info("Registered session model %r at %s", name, path)
        self.changed.emit()
        return name

    def models(self) -> dict[str, Path]:
        """Return the registered models: display name → file."""
        return dict(self._models)

    def clear(self) -> None:
        """Forget all registered models."""
        self._models.clear()
        self.changed.emit()


#: The one registry of this Python process.
session_models = ModelRegistry()


# ---------------------------------------------------------------------------
# Background tasks


class _TaskSignals(QObject):
    """Carries progress from the worker thread to the GUI thread (queued connections)."""

    progress = Signal(int, int)
    stage = Signal(str)
    loss = Signal(object)


@dataclass
class TaskOutcome:
    """Result of a background task: a value, a cancellation or an error."""

    value: Any = None
    cancelled: bool = False
    error: Optional[BaseException] = None
    traceback: str = ""


class BackgroundTask:
    """Run one function in a napari worker thread with a progress bar and a cancel flag.

    ``function(progress, stage, cancel, **hooks)`` runs off the GUI thread.
    Its result, a :class:`napari_supn.progress.Cancelled` or any other
    exception all arrive on the GUI thread through ``on_done(outcome)`` as a
    :class:`TaskOutcome`. Exceptions never reach napari's traceback
    notifications, so the widget decides how to show them.

    Parameters
    ----------
    function : callable
        Called as ``function(progress, stage, cancel)``, plus ``loss=`` when
        ``on_loss`` is given.
    description : str
        Text of the napari progress bar.
    on_done : callable
        Receives the :class:`TaskOutcome` on the GUI thread.
    on_progress, on_stage, on_loss : callable, optional
        GUI-thread callbacks for each progress report, stage name or loss
        record.
    """

    def __init__(
        self,
        function: Callable,
        description: str,
        on_done: Callable[[TaskOutcome], None],
        on_progress: Optional[Callable[[int, int], None]] = None,
        on_stage: Optional[Callable[[str], None]] = None,
        on_loss: Optional[Callable[[Any], None]] = None,
    ) -> None:
        self._function = function
        self._description = description
        self._on_done = on_done
        self._on_progress = on_progress
        self._on_stage = on_stage
        self._cancel_event = threading.Event()
        self._signals = _TaskSignals()
        self._signals.progress.connect(self._update_progress)
        self._signals.stage.connect(self._update_stage)
        self._on_loss = on_loss
        self._signals.loss.connect(self._update_loss)
        self._progress_bar = None
        self.worker = None
        self.running = False

    def start(self) -> None:
        """Start the worker and open the progress bar."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self._progress_bar = progress(total=0, desc=self._description)
        self.running = True
        self.worker = create_worker(self._run, _start_thread=False)
        self.worker.returned.connect(self._finish)
        self.worker.start()

    def cancel(self) -> None:
        """Ask the function to stop at its next cancel check."""
        self._cancel_event.set()
        if self._progress_bar is not None:
            self._progress_bar.set_description(f"{self._description} (cancelling)")

    @property
    def cancel_requested(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self._cancel_event.is_set()

    def _run(self) -> TaskOutcome:
        hooks = {"loss": self._signals.loss.emit} if self._on_loss is not None else {}
        try:
            value = self._function(
                self._signals.progress.emit,
                self._signals.stage.emit,
                self._cancel_event.is_set,
                **hooks,
            )
        except Cancelled:
            return TaskOutcome(cancelled=True)
        except Exception as error:  # shown in the widget; the traceback goes to the log
            return TaskOutcome(error=error, traceback=traceback.format_exc())
        return TaskOutcome(value=value)

    # Updating a napari progress bar can run a nested Qt event loop, which
    # delivers later worker signals (even the result) before the update
    # returns. So each handler updates the widget first and touches the bar
    # last, and reports that arrive after the task finished are dropped.

    def _update_progress(self, done: int, total: int) -> None:
        if not self.running:
            return
        if self._on_progress is not None:
            self._on_progress(done, total)
        bar = self._progress_bar
        if bar is not None and self.running:
            if bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

    def _update_stage(self, name: str) -> None:
        if not self.running:
            return
        if self._on_stage is not None:
            self._on_stage(name)
        bar = self._progress_bar
        if bar is not None and self.running:
            bar.set_description(f"{self._description}: {name}")

    def _update_loss(self, record) -> None:
        if self.running and self._on_loss is not None:
            self._on_loss(record)

    def _finish(self, outcome: TaskOutcome) -> None:
        self.running = False
        if self._progress_bar is not None:
            self._progress_bar.close()
            self._progress_bar = None
        if isinstance(outcome.error, (ValueError, FileNotFoundError)):
            # Bad input: the dock shows and logs the message itself, so keep
            # the traceback out of the user's log unless debugging.
            logger.debug("%s failed: %s\n%s", self._description, outcome.error, outcome.traceback)
        elif outcome.error is not None:
            logger.error("%s failed: %s\n%s", self._description, outcome.error, outcome.traceback)
        self._on_done(outcome)


def notify(message: str, level: str = "info") -> None:
    """Show ``message`` as a napari notification of ``level`` info, warning or error."""
    from napari.utils.notifications import show_error, show_info, show_warning

    {"info": show_info, "warning": show_warning, "error": show_error}[level](message)


# ---------------------------------------------------------------------------
# Layers


@dataclass
class Plane:
    """One 2D plane of an image layer, with the geometry result layers must copy.

    Attributes
    ----------
    data : ndarray, shape (H, W) or (H, W, 3)
    index : tuple of int
        Position of the plane along the layer's leading axes; empty for 2D layers.
    scale, translate : tuple of float
        The layer's scale and translate along its last two spatial axes.
    """

    data: np.ndarray
    index: tuple
    scale: tuple
    translate: tuple


def current_plane(viewer, layer) -> Plane:
    """Return the plane of ``layer`` that the viewer shows now.

    2D layers (grey or RGB) are returned whole. For a stack, the leading
    indices come from the viewer's current dims position mapped into the
    layer's data coordinates. Multiscale layers use their full-resolution
    level.
    """
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    spatial_axes = 3 if getattr(layer, "rgb", False) else 2
    leading = data.ndim - spatial_axes
    scale = tuple(float(value) for value in layer.scale[-2:])
    translate = tuple(float(value) for value in layer.translate[-2:])
    if leading <= 0:
        return Plane(np.asarray(data), (), scale, translate)

    position = layer.world_to_data(viewer.dims.point)
    index = tuple(
        int(np.clip(round(float(coordinate)), 0, size - 1))
        for coordinate, size in zip(position[:leading], data.shape[:leading])
    )
    return Plane(np.asarray(data[index]), index, scale, translate)
