"""Sample fields for napari's File > Open Sample menu.

Both fields are assembled from real single-cell crops (see
``sample_data/PROVENANCE.md``), and the layer names state it. Each sample also adds
a hidden Points layer marking the cells whose source crop is infected, so a
user can compare the suspects with the known truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SAMPLE_DIR = Path(__file__).parent / "sample_data"

#: Sample key → (image file stem, layer name, attribution).
SAMPLES = {
    "fluorescence": (
        "fluorescence_field",
        "assembled fluorescence field",
        "Assembled from fl_supn crops, Vodenicharski et al. 2022 (MIDL), CC BY 4.0; "
        "github.com/boykovdn/unsupervised_cells_supn, Zenodo 6645803",
    ),
    "giemsa": (
        "giemsa_field",
        "assembled Giemsa field",
        "Assembled from NIH malaria cell crops, Rajaraman et al. 2018, PeerJ 6:e4568; "
        "U.S. Government work",
    ),
}


def sample_paths(key: str) -> dict[str, Path]:
    """Return the files of one sample: ``image``, ``labels`` and ``cells`` (CSV)."""
    if key not in SAMPLES:
        raise ValueError(f"unknown sample {key!r}; choose one of {', '.join(SAMPLES)}")
    stem = SAMPLES[key][0]
    return {
        "image": SAMPLE_DIR / f"{stem}.png",
        "labels": SAMPLE_DIR / f"{stem}_labels.png",
        "cells": SAMPLE_DIR / f"{stem}_cells.csv",
    }


def load_sample(key: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Read one sample field without napari.

    Returns
    -------
    image : ndarray of uint8, shape (H, W) for fluorescence or (H, W, 3) for Giemsa
    labels : ndarray of uint8, shape (H, W)
        The pasted cell masks; value p is the cell at ``position`` p.
    cells : pandas.DataFrame
        One row per pasted cell: ``position``, ``centroid_y``, ``centroid_x``,
        ``area``, ``infected`` (bool), ``source_label``, ``source``.
    """
    from skimage import io

    paths = sample_paths(key)
    image = io.imread(paths["image"])
    labels = io.imread(paths["labels"])
    cells = pd.read_csv(paths["cells"])
    return image, labels, cells


def _layer_data(key: str) -> list[tuple]:
    stem, name, attribution = SAMPLES[key]
    image, _, cells = load_sample(key)
    infected = cells[cells["infected"]]
    metadata = {"attribution": attribution, "provenance": str(SAMPLE_DIR / "PROVENANCE.md")}
    return [
        (image, {"name": name, "rgb": image.ndim == 3, "metadata": metadata}, "image"),
        (
            infected[["centroid_y", "centroid_x"]].to_numpy(),
            {
                "name": f"{name} known infected",
                "symbol": "square",
                "size": 90 if key == "fluorescence" else 130,
                "face_color": "transparent",
                "border_color": "lime",
                "border_width": 0.03,
                "visible": False,
                "metadata": metadata,
            },
            "points",
        ),
    ]


def fluorescence_field() -> list[tuple]:
    """Assembled fluorescence field (fl_supn crops, CC BY 4.0)."""
    return _layer_data("fluorescence")


def giemsa_field() -> list[tuple]:
    """Assembled Giemsa field (NIH crops, public domain)."""
    return _layer_data("giemsa")
