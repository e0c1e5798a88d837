"""Recompute a model's flagging threshold for new score settings or new healthy data.

A threshold is only meaningful for the score settings (latent samples, tile
size, mask erosion) it was computed with, so the three are stored together
in the model file. :func:`calibrate` scores healthy crops with the given
settings and returns the metadata entries to store.
"""

from __future__ import annotations

import datetime
import logging
from typing import Optional, Sequence

import numpy as np
import torch

from napari_supn.progress import CancelCheck, ProgressCallback
from napari_supn.scoring import healthy_quantiles, score_crops

logger = logging.getLogger("napari_supn")

QUANTILE_LEVELS = (0.5, 0.9, 0.95, 0.99, 0.999)


def select_crops(crops, names: Optional[Sequence[str]]):
    """Return the crops whose file names are in ``names`` (all crops when None).

    Raises
    ------
    ValueError
        If a requested name is not in the folder.
    """
    if names is None:
        return crops
    index = {name: position for position, name in enumerate(crops.names)}
    missing = [name for name in names if name not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} held-out crops named in the model are not in the folder "
            f"(first: {missing[0]!r}); pass the training folder the model was trained on"
        )
    return crops.subset([index[name] for name in names])


def calibrate(
    loaded,
    crops,
    *,
    samples: int,
    tile: int,
    mask_erosion: int,
    quantile: float = 0.99,
    seed: int = 0,
    batch_size: int = 64,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCheck] = None,
) -> dict:
    """Score healthy crops and return the metadata entries of a new threshold.

    Parameters
    ----------
    loaded : LoadedModel
    crops : CropSet
        Healthy crops the model did not train on, in the training layout.
    samples, tile, mask_erosion : int
        Score settings stored with the threshold.
    quantile : float
        Quantile of the healthy scores used as the threshold (default 0.99).

    Returns
    -------
    dict
        ``scoring``, ``healthy_score_quantiles``, ``threshold``,
        ``threshold_quantile`` and ``calibration`` (count and date).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie strictly between 0 and 1, got {quantile}")
    if len(crops) == 0:
        raise ValueError("no healthy crops to calibrate on")

    images, masks = loaded.preprocessing.prepare(crops.images, crops.masks)
    device = next(loaded.model.parameters()).device
    scores = score_crops(
        loaded.model,
        images,
        masks,
        samples=samples,
        tile=tile,
        mask_erosion=mask_erosion,
        batch_size=batch_size,
        generator=torch.Generator(device=device).manual_seed(seed),
        progress=progress,
        cancel=cancel,
    )

    levels = tuple(sorted(set(QUANTILE_LEVELS) | {quantile}))
    quantiles = healthy_quantiles(scores.cell_score, levels)
    threshold = float(np.quantile(scores.cell_score, quantile))
    logger.info(
        "Calibrated on %d healthy crops (samples %d, tile %d, erosion %d): threshold %.4g",
        len(crops),
        samples,
        tile,
        mask_erosion,
        threshold,
    )
    return {
        "scoring": {"samples": samples, "tile": tile, "mask_erosion": mask_erosion},
        "healthy_score_quantiles": quantiles,
        "threshold": threshold,
        "threshold_quantile": quantile,
        "calibration": {
            "crops": len(crops),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
