"""Score a whole field of view: segment, crop, score and map every cell.

:func:`score_field` is the one entry point that the CLI (``napari-supn
score``) and the napari widgets share. It returns the labels, a per-cell
table and two maps in field coordinates at the input's resolution.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from napari_supn.preprocessing import check_intensity_units
from napari_supn.progress import CancelCheck, ProgressCallback, check_cancel, report
from napari_supn.scoring import score_crops, stored_score_settings

logger = logging.getLogger("napari_supn")

#: Columns of the per-cell table, in order. Coordinates are pixels of the input image.
TABLE_COLUMNS = [
    "label",
    "centroid_y",
    "centroid_x",
    "area",
    "score",
    "rank",
    "flagged",
    "touches_border",
    "distance",
]

#: Fields larger than this many pixels are rejected unless ``max_pixels`` is raised.
MAX_FIELD_PIXELS = 10_000 * 10_000

#: Quantile of healthy held-out cell scores used as the default threshold.
DEFAULT_THRESHOLD_QUANTILE = "0.99"

StageCallback = Callable[[str], None]


@dataclass
class FieldResult:
    """Everything :func:`score_field` computed for one field of view.

    Attributes
    ----------
    labels : ndarray of int32, shape (H, W)
        One integer per cell, 0 for background.
    table : pandas.DataFrame
        One row per cell with the columns of :data:`TABLE_COLUMNS`, sorted by
        rank (1 = most anomalous).
    whitened : ndarray of float32, shape (H, W)
        Squared whitened residual (mean over latent samples, summed over
        channels) pasted back inside each cell; 0 outside cells.
    tiles : ndarray of float32, shape (H, W)
        Each cell pixel carries the sum of its tile; 0 outside cells.
    threshold : float
        Score above which a cell is flagged.
    segmentation_method : str
        "cellpose", "classical" or "given" (labels passed in).
    segmentation_message : str
        Why that segmenter ran, for display to the user.
    seconds : dict
        Wall time of "segmentation", "cropping" and "scoring".
    """

    labels: np.ndarray
    table: pd.DataFrame
    whitened: np.ndarray
    tiles: np.ndarray
    threshold: float
    segmentation_method: str = "given"
    segmentation_message: str = ""
    seconds: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        """Number of scored cells."""
        return int(len(self.table))

    @property
    def n_flagged(self) -> int:
        """Number of cells whose score exceeds the threshold."""
        return int(self.table["flagged"].sum()) if len(self.table) else 0

    @property
    def parasitemia(self) -> float:
        """Flagged cells divided by all cells (0 when there are no cells)."""
        return self.n_flagged / self.n_cells if self.n_cells else 0.0


def model_threshold(metadata: dict) -> Optional[float]:
    """Return the default flagging threshold stored in a model's metadata, if any.

    Looks for ``metadata["threshold"]``, then the 0.99 quantile of
    ``metadata["healthy_score_quantiles"]`` (as written by the training).
    """
    if not isinstance(metadata, dict):
        return None
    if metadata.get("threshold") is not None:
        return float(metadata["threshold"])
    quantiles = metadata.get("healthy_score_quantiles") or {}
    if DEFAULT_THRESHOLD_QUANTILE in quantiles:
        return float(quantiles[DEFAULT_THRESHOLD_QUANTILE])
    return None


def match_channels(image: np.ndarray, channels: str) -> np.ndarray:
    """Return ``image`` with the channel layout a model expects, or raise.

    Parameters
    ----------
    image : ndarray, shape (H, W), (H, W, 3) or (H, W, 4)
        A field of view; an alpha channel is dropped.
    channels : {"grey", "rgb"}
        The model's channel mode.

    Raises
    ------
    ValueError
        If the image is RGB with distinct channels and the model is grey, or
        grey and the model is RGB, or the shape is not an image.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(
            f"image must have shape (H, W) for grey or (H, W, 3) for RGB, got {image.shape}; "
            "for a stack, pass one plane at a time"
        )
    if image.dtype == bool or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise ValueError(
            f"image dtype {image.dtype} is not supported; use unsigned integers or floats"
        )

    is_rgb = image.ndim == 3
    if channels == "grey" and is_rgb:
        if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(
            image[..., 0], image[..., 2]
        ):
            return image[..., 0]
        raise ValueError(
            f"the model expects grey images but the image is RGB with shape {image.shape}; "
            "use an RGB model (for example 'giemsa') or convert the image to one channel"
        )
    if channels == "rgb" and not is_rgb:
        raise ValueError(
            f"the model expects RGB images but the image is grey with shape {image.shape}; "
            "use a grey model (for example 'fluorescence') or load the RGB image"
        )
    return image


def _resolve_model(model, device) -> object:
    from napari_supn.model_file import load_model

    if isinstance(model, (str, Path)):
        return load_model(model, device=device)
    return model


def empty_table() -> pd.DataFrame:
    """Return a per-cell table with the standard columns and no rows."""
    return pd.DataFrame({column: pd.Series(dtype=_COLUMN_DTYPES[column]) for column in TABLE_COLUMNS})


_COLUMN_DTYPES = {
    "label": "int64",
    "centroid_y": "float64",
    "centroid_x": "float64",
    "area": "int64",
    "score": "float64",
    "rank": "int64",
    "flagged": "bool",
    "touches_border": "bool",
    "distance": "float64",
}


def score_field(
    image: np.ndarray,
    model,
    *,
    labels: Optional[np.ndarray] = None,
    segmenter: str = "auto",
    cellpose_model: Optional[str | Path] = None,
    diameter: Optional[float] = None,
    samples: Optional[int] = None,
    tile: Optional[int] = None,
    mask_erosion: Optional[int] = None,
    restoration: bool = False,
    threshold: Optional[float] = None,
    device: Optional[torch.device | str] = None,
    batch_size: int = 64,
    seed: int = 0,
    max_pixels: int = MAX_FIELD_PIXELS,
    progress: Optional[ProgressCallback] = None,
    stage: Optional[StageCallback] = None,
    cancel: Optional[CancelCheck] = None,
) -> FieldResult:
    """Segment a field of view, score every cell and map the scores back.

    Parameters
    ----------
    image : ndarray, shape (H, W) or (H, W, 3)
        The field, in any unsigned integer or float dtype; its intensities
        must use the same units as the model's training crops.
    model : LoadedModel, str or Path
        A loaded model, a model file, or the name of a shipped model.
    labels : ndarray of int, shape (H, W), optional
        Existing segmentation; skips the segmenter when given.
    segmenter : {"auto", "cellpose", "classical"}
        Used when ``labels`` is None.
    cellpose_model : str or Path, optional
        Local Cellpose weights file.
    diameter : float, optional
        Expected cell diameter in field pixels; estimated when None.
    samples, tile, mask_erosion : int, optional
        Scoring settings; default to the model's stored settings, else 16
        latent samples, 4-pixel tiles and no erosion.
    restoration : bool
        Refine each latent code before scoring (slower).
    threshold : float, optional
        Flag cells scoring above it; defaults to the model's stored threshold
        (0.99 quantile of held-out healthy cells), else no cell is flagged.
    device : torch.device or str, optional
        Where the model runs when ``model`` is a name or path.
    batch_size : int
        Cells cropped and scored at a time. Peak memory grows with
        ``batch_size * samples`` decoded crops, not with the cell count.
    max_pixels : int
        Reject larger fields with a clear error (default 10⁸ pixels).
    progress, stage, cancel
        ``progress(done, total)`` over cells; ``stage(name)`` at each of
        "segmentation", "scoring"; ``cancel()`` returning True raises
        :class:`napari_supn.progress.Cancelled`.

    Returns
    -------
    FieldResult
    """
    from napari_supn.cells import iter_cell_batches, paste_to_field

    loaded = _resolve_model(model, device)
    preprocessing = loaded.preprocessing
    image = match_channels(image, preprocessing.channels)
    check_intensity_units(image, preprocessing, "image")
    height, width = image.shape[:2]
    if height * width > max_pixels:
        raise ValueError(
            f"image of {height}×{width} pixels exceeds max_pixels={max_pixels}; "
            "split it into tiles of at most that size (in Python, score_field(..., "
            "max_pixels=N) raises the limit)"
        )

    stored = stored_score_settings(loaded.metadata)
    samples = samples if samples is not None else stored["samples"]
    tile = tile if tile is not None else stored["tile"]
    mask_erosion = mask_erosion if mask_erosion is not None else stored["mask_erosion"]
    if threshold is None:
        threshold = model_threshold(loaded.metadata)
    if threshold is None:
        logger.warning("The model stores no threshold; no cell will be flagged")
        threshold = float("inf")

    seconds = {"segmentation": 0.0, "cropping": 0.0, "scoring": 0.0}

    # Segmentation.
    check_cancel(cancel, "scoring the field")
    if stage is not None:
        stage("segmentation")
    started = time.perf_counter()
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (height, width):
            raise ValueError(
                f"labels have shape {labels.shape} but the image is {(height, width)}; "
                "pass labels of the same height and width"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
        labels = labels.astype(np.int32, copy=False)
        method, message = "given", "used the given labels"
    else:
        from napari_supn.segmentation import segment

        expected = diameter
        segmentation = segment(
            image,
            method=segmenter,
            diameter=expected,
            cellpose_model=cellpose_model,
            device=loaded_device(loaded),
        )
        labels = segmentation.labels.astype(np.int32, copy=False)
        method, message = segmentation.method, segmentation.message
    seconds["segmentation"] = time.perf_counter() - started

    whitened_field = np.zeros((height, width), np.float32)
    tiles_field = np.zeros((height, width), np.float32)
    rows = []

    cell_ids = np.unique(labels)
    cell_ids = cell_ids[cell_ids != 0]
    total = int(cell_ids.size)
    if total == 0:
        logger.warning("No cells found in the image (%d×%d); nothing to score", height, width)
        return FieldResult(
            labels=labels,
            table=empty_table(),
            whitened=whitened_field,
            tiles=tiles_field,
            threshold=threshold,
            segmentation_method=method,
            segmentation_message=message,
            seconds=seconds,
        )

    # Cropping and scoring, a batch of cells at a time so memory stays bounded.
    if stage is not None:
        stage("scoring")
    device_now = loaded_device(loaded)
    generator = torch.Generator(device=device_now).manual_seed(seed)
    done = 0
    report(progress, 0, total)
    crop_iterator = iter_cell_batches(image, labels, preprocessing, batch_size=batch_size)
    while True:
        check_cancel(cancel, "scoring the field")
        started = time.perf_counter()
        cells = next(crop_iterator, None)
        seconds["cropping"] += time.perf_counter() - started
        if cells is None:
            break

        started = time.perf_counter()
        images, masks = preprocessing.prepare(cells.images, cells.masks)
        scores = score_crops(
            loaded.model,
            images,
            masks,
            samples=samples,
            tile=tile,
            mask_erosion=mask_erosion,
            restoration=restoration,
            batch_size=batch_size,
            generator=generator,
            cancel=cancel,
        )
        model_size = scores.whitened.shape[-1]
        tile_pixels = np.kron(scores.tiles, np.ones((tile, tile), np.float32))
        tile_pixels = tile_pixels[:, : scores.whitened.shape[1], :model_size]
        seconds["scoring"] += time.perf_counter() - started

        started = time.perf_counter()
        np.maximum(
            whitened_field,
            paste_to_field(scores.whitened, cells, (height, width)),
            out=whitened_field,
        )
        np.maximum(
            tiles_field, paste_to_field(tile_pixels, cells, (height, width)), out=tiles_field
        )
        seconds["cropping"] += time.perf_counter() - started

        for index in range(len(cells.labels)):
            rows.append(
                {
                    "label": int(cells.labels[index]),
                    "centroid_y": float(cells.centroid_y[index]),
                    "centroid_x": float(cells.centroid_x[index]),
                    "area": int(cells.area[index]),
                    "score": float(scores.cell_score[index]),
                    "touches_border": bool(cells.touches_border[index]),
                    "distance": float(scores.distance[index]),
                }
            )
        done += len(cells.labels)
        report(progress, done, total)

    table = pd.DataFrame(rows)
    table = table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    table["flagged"] = table["score"] > threshold
    table = table[TABLE_COLUMNS].astype(_COLUMN_DTYPES)

    logger.info(
        "Scored %d cells (%d flagged above %.4g) in %.1f s",
        len(table),
        int(table["flagged"].sum()),
        threshold,
        sum(seconds.values()),
    )
    return FieldResult(
        labels=labels,
        table=table,
        whitened=whitened_field,
        tiles=tiles_field,
        threshold=threshold,
        segmentation_method=method,
        segmentation_message=message,
        seconds=seconds,
    )


def loaded_device(loaded) -> torch.device:
    """Return the device a loaded model's weights live on."""
    return next(loaded.model.parameters()).device
