"""Per-cell annotations (parasite, healthy, unsure) saved to and read from CSV.

The CSV has the columns of ``napari-supn score``'s per-cell table
(:data:`napari_supn.pipeline.TABLE_COLUMNS`) plus ``annotation``, one row
per cell, so a reviewed field can be reopened, shared or analysed with the
same tools as the command-line output. Reading a CSV back checks that it
describes the same segmentation: the same label values, and the same area
for every label when the CSV has an ``area`` column.
"""

from __future__ import annotations

import logging
from pathlib import Path
import numpy as np
import pandas as pd

from napari_supn.pipeline import TABLE_COLUMNS

logger = logging.getLogger("napari_supn")

#: Allowed annotation values; the empty string means "not reviewed".
ANNOTATIONS = ("", "parasite", "healthy", "unsure")

#: Columns written by :func:`save_annotations`, in order.
CSV_COLUMNS = [*TABLE_COLUMNS, "annotation"]


def save_annotations(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a per-cell table with its ``annotation`` column to CSV, sorted by rank.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per cell with at least the columns of :data:`CSV_COLUMNS`;
        other columns (such as napari's ``index``) are not written.
    path : str or Path

    Returns
    -------
    pathlib.Path
        The file written.
    """
    missing = [column for column in CSV_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"the cell table lacks the columns {', '.join(missing)}; score the image first")
    path = Path(path)
    out = table[CSV_COLUMNS].sort_values("rank", kind="stable").copy()
    out["annotation"] = out["annotation"].fillna("").astype(str)
    out.to_csv(path, index=False)
    logger.info("Wrote %d cell annotations to %s", len(out), path)
    return path


def label_areas(labels: np.ndarray) -> dict[int, int]:
    """Return the pixel count of every non-zero label in ``labels``."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {int(value): int(count) for value, count in zip(values, counts) if value != 0}


def load_annotations(path: str | Path, labels: np.ndarray) -> pd.DataFrame:
    """Read an annotation CSV and check that it belongs to ``labels``.

    Parameters
    ----------
    path : str or Path
        A CSV written by :func:`save_annotations` (or any CSV with ``label``
        and ``annotation`` columns).
    labels : ndarray of int, shape (H, W)
        The label image the annotations must match.

    Returns
    -------
    pandas.DataFrame
        The CSV's rows with ``label`` as int and ``annotation`` as str
        (empty for unreviewed cells).

    Raises
    ------
    ValueError
        If the file lacks ``label`` or ``annotation``, contains an unknown
        annotation, or its labels or areas differ from ``labels``.
    FileNotFoundError
        If the file does not exist.
    """
    path = Path(path)
    table = pd.read_csv(path, keep_default_na=False, dtype={"annotation": str})
    for column in ("label", "annotation"):
        if column not in table.columns:
            raise ValueError(f"{path} has no {column!r} column; expected a CSV saved by napari-supn")
    table["label"] = table["label"].astype(int)
    table["annotation"] = table["annotation"].fillna("").astype(str).str.strip()

    unknown = sorted(set(table["annotation"]) - set(ANNOTATIONS))
    if unknown:
        raise ValueError(
            f"{path} contains unknown annotations {unknown}; allowed are "
            f"{', '.join(repr(value) for value in ANNOTATIONS)}"
        )
    if table["label"].duplicated().any():
        duplicates = sorted(table.loc[table["label"].duplicated(), "label"].unique())[:5]
        raise ValueError(f"{path} lists labels {duplicates} more than once")

    _check_same_cells(path, table, label_areas(labels))
    return table


def _check_same_cells(path: Path, table: pd.DataFrame, areas: dict[int, int]) -> None:
    in_file = set(table["label"])
    in_layer = set(areas)
    if in_file != in_layer:
        only_file = sorted(in_file - in_layer)[:5]
        only_layer = sorted(in_layer - in_file)[:5]
        raise ValueError(
            f"{path} does not match these cells: {len(in_file)} labels in the file, "
            f"{len(in_layer)} in the layer (only in the file: {only_file}, only in the layer: "
            f"{only_layer}). Load it onto the cells layer it was saved from"
        )
    if "area" in table.columns:
        differing = [
            int(label)
            for label, area in zip(table["label"], table["area"])
            if int(area) != areas[int(label)]
        ]
        if differing:
            raise ValueError(
                f"{path} has the same labels but different cell areas (labels {differing[:5]}), "
                "so it comes from another segmentation; load it onto the cells layer it was saved from"
            )


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """Count cells, flagged cells and annotations.

    Returns
    -------
    dict
        ``cells``, ``flagged``, ``parasite``, ``healthy``, ``unsure``,
        ``unreviewed``, ``parasitemia`` (cells marked parasite divided by
        all cells) and ``flagged_fraction`` (flagged divided by all cells);
        both fractions are 0 when there are no cells.
    """
    cells = int(len(table))
    annotation = table["annotation"].fillna("") if "annotation" in table else pd.Series([""] * cells)
    counts = {value or "unreviewed": int((annotation == value).sum()) for value in ANNOTATIONS}
    flagged = int(table["flagged"].sum()) if "flagged" in table and cells else 0
    return {
        "cells": cells,
        "flagged": flagged,
        **counts,
        "parasitemia": counts["parasite"] / cells if cells else 0.0,
        "flagged_fraction": flagged / cells if cells else 0.0,
    }


def merge_annotations(features: pd.DataFrame, loaded: pd.DataFrame) -> pd.DataFrame:
    """Return ``features`` with its ``annotation`` column taken from ``loaded`` by label."""
    by_label: dict[int, str] = dict(zip(loaded["label"].astype(int), loaded["annotation"]))
    merged = features.copy()
    merged["annotation"] = [by_label.get(int(label), "") for label in merged["label"]]
    return merged

