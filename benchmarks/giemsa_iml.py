"""Score the segmented cells of the IML-Malaria fields and compare with the parasite boxes.

Reads the fields and boxes at run time from a folder laid out as
``images/*.JPG`` plus ``boxes.csv`` (columns file,type,x,y,w,h with x,y the
top-left corner). Nothing derived from these images belongs in the
repository: per-cell tables, labels and crops go under ``runs/``.

For every field the script segments the cells (or reuses cached labels),
runs :func:`napari_supn.pipeline.score_field` with the given model, and
labels each segmented cell:

- positive when its centroid lies in a parasite box (ring, trophozoite,
  schizont, gametocyte);
- excluded when its centroid lies only in a ``difficult`` box;
- negative otherwise.

It prints, over the cells of all fields pooled:

- AUROC and AUPRC of the model score, and of two colour heuristics on the
  same cells. Green darkness is the median − 0.5th percentile of the green
  channel inside the cell mask eroded by ``--heuristic-erosion`` pixels.
  Saturation spread is the 99.5th percentile − median of HSV saturation
  there;
- the share of parasite boxes that contain the centroid of a cell ranked in
  the top 5 % of all cells.

Both are printed for all segmented cells and for the kept cells: those
whose centroid lies outside ``--exclude-box`` (the IML fields carry a
burnt-in scale bar and "50 µm" label in the bottom-right corner, which
the segmenter cuts as cells) and whose area is at most
``--max-area-ratio`` times the median cell area of their field (larger
labels are clumps of touching cells).

``--export-crops DIR`` also writes every segmented cell as a training crop
(``DIR/raw`` + ``DIR/mask``, cut as the model's preprocessing cuts them) and
``DIR/cells.csv`` with each crop's label, so that a model can be trained on
the cells of these fields.

Usage::

    .venv/bin/python benchmarks/giemsa_iml.py /path/to/iml_malaria_fov \
        --model giemsa --labels-cache runs/iml_labels --csv runs/iml_giemsa.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage import color, io
from sklearn.metrics import average_precision_score, roc_auc_score

from napari_supn.model_file import load_model
from napari_supn.pipeline import score_field
from napari_supn.segmentation import segment

PARASITE_TYPES = ("ring", "trophozoite", "schizont", "gametocyte")


def read_boxes(folder: Path) -> dict[str, list[tuple[str, int, int, int, int]]]:
    """Return the boxes of each field file name: (type, x, y, w, h), top-left corner."""
    boxes: dict[str, list] = defaultdict(list)
    with open(folder / "boxes.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            boxes[Path(row["file"]).name].append(
                (row["type"], int(row["x"]), int(row["y"]), int(row["w"]), int(row["h"]))
            )
    return boxes


def inside(box, y: float, x: float) -> bool:
    """Return True when field point (y, x) lies in the box (type, x, y, w, h)."""
    _, left, top, width, height = box
    return left <= x < left + width and top <= y < top + height


def field_labels(image: np.ndarray, name: str, cache: Path | None, segmenter: str) -> tuple[np.ndarray, float]:
    """Segment a field, or load its labels from ``cache``; return labels and seconds."""
    cached = None if cache is None else cache / f"{Path(name).stem}.npy"
    if cached is not None and cached.exists():
        return np.load(cached), 0.0
    started = time.perf_counter()
    labels = segment(image, method=segmenter).labels
    seconds = time.perf_counter() - started
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, labels)
    return labels, seconds


def colour_heuristics(image: np.ndarray, labels: np.ndarray, erosion: int) -> dict[int, tuple[float, float]]:
    """Return green darkness and saturation spread of every label, inside the eroded cell."""
    saturation = color.rgb2hsv(image)[..., 1]
    green = image[..., 1].astype(np.float64)
    values = {}
    for label, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None:
            continue
        cell = labels[region] == label
        inner = ndimage.binary_erosion(cell, iterations=erosion) if erosion > 0 else cell
        if inner.sum() < 16:
            inner = cell
        cell_green = green[region][inner]
        cell_saturation = saturation[region][inner]
        values[label] = (
            float(np.median(cell_green) - np.percentile(cell_green, 0.5)),
            float(np.percentile(cell_saturation, 99.5) - np.median(cell_saturation)),
        )
    return values


def label_cells(table: pd.DataFrame, boxes) -> pd.DataFrame:
    """Add ``target`` (1 parasite, 0 healthy, -1 difficult only) and ``box`` columns."""
    targets, box_ids = [], []
    for y, x in zip(table["centroid_y"], table["centroid_x"]):
        hits = [index for index, box in enumerate(boxes) if inside(box, y, x)]
        parasite = [index for index in hits if boxes[index][0] in PARASITE_TYPES]
        difficult = [index for index in hits if boxes[index][0] == "difficult"]
        if parasite:
            targets.append(1)
            box_ids.append(parasite[0])
        elif difficult:
            targets.append(-1)
            box_ids.append(difficult[0])
        else:
            targets.append(0)
            box_ids.append(hits[0] if hits else -1)
    table = table.copy()
    table["target"] = targets
    table["box"] = box_ids
    return table


def export_crops(image, labels, preprocessing, table: pd.DataFrame, field: str, out: Path) -> list[dict]:
    """Write each cell's crop and mask under ``out/raw`` and ``out/mask``; return CSV rows."""
    from napari_supn.cells import extract_cells

    crops = extract_cells(image, labels, preprocessing)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "mask").mkdir(parents=True, exist_ok=True)
    target_by_label = dict(zip(table["label"], table["target"]))
    kept_by_label = dict(zip(table["label"], table["kept"]))
    rows = []
    for index, label in enumerate(crops.labels):
        name = f"{Path(field).stem}_cell{int(label):04d}.png"
        crop = np.clip(np.round(crops.images[index]), 0, 255).astype(np.uint8)
        io.imsave(out / "raw" / name, crop, check_contrast=False)
        io.imsave(out / "mask" / name, (crops.masks[index] * 255).astype(np.uint8), check_contrast=False)
        rows.append({"file": name, "field": field, "label": int(label),
                     "target": int(target_by_label.get(int(label), 0)),
                     "kept": bool(kept_by_label.get(int(label), True))})
    return rows


def ranking_summary(table: pd.DataFrame, column: str, n_boxes: int, top: float) -> dict:
    """Return AUROC, AUPRC and the share of parasite boxes with a top-ranked cell."""
    scored = table[table["target"] >= 0]
    labels, scores = scored["target"].to_numpy(), scored[column].to_numpy()
    cutoff = np.quantile(scores, 1.0 - top)
    top_cells = scored[(scored[column] >= cutoff) & (scored["target"] == 1)]
    boxes_hit = len(set(zip(top_cells["field"], top_cells["box"])))
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
        "boxes_in_top": boxes_hit,
        "boxes": n_boxes,
        "share_in_top": boxes_hit / n_boxes if n_boxes else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="iml_malaria_fov folder (images/ and boxes.csv)")
    parser.add_argument("--model", required=True, help="model file or shipped model name")
    parser.add_argument("--segmenter", default="auto", choices=("auto", "cellpose", "classical"))
    parser.add_argument("--labels-cache", type=Path, default=None, help="folder for cached label images")
    parser.add_argument("--samples", type=int, default=None, help="latent samples (default: model's)")
    parser.add_argument("--tile", type=int, default=None, help="tile side in model pixels (default: model's)")
    parser.add_argument("--mask-erosion", type=int, default=None, help="model pixels (default: model's)")
    parser.add_argument("--restoration", action="store_true")
    parser.add_argument("--heuristic-erosion", type=int, default=2, help="field pixels")
    parser.add_argument("--exclude-box", type=int, nargs=4, default=[1130, 820, 1280, 960],
                        metavar=("X0", "Y0", "X1", "Y1"), help="drop cells centred in this field box")
    parser.add_argument("--max-area-ratio", type=float, default=2.0,
                        help="drop cells larger than this times the field's median cell area")
    parser.add_argument("--top", type=float, default=0.05, help="top fraction of the ranking")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", type=Path, default=None, help="per-cell table to write")
    parser.add_argument("--export-crops", type=Path, default=None, help="write cell crops here")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    loaded = load_model(args.model)
    boxes = read_boxes(args.folder)

    tables, crop_rows, seconds = [], [], defaultdict(float)
    n_parasite_boxes = 0
    for field in sorted(boxes):
        image = io.imread(args.folder / "images" / field)[..., :3]
        labels, segmentation_seconds = field_labels(image, field, args.labels_cache, args.segmenter)
        result = score_field(
            image, loaded, labels=labels, samples=args.samples, tile=args.tile,
            mask_erosion=args.mask_erosion, restoration=args.restoration,
        )
        seconds["segmentation"] += segmentation_seconds
        for key in ("cropping", "scoring"):
            seconds[key] += result.seconds.get(key, 0.0)

        table = label_cells(result.table, boxes[field])
        table["field"] = field
        x0, y0, x1, y1 = args.exclude_box
        in_box = table["centroid_x"].between(x0, x1) & table["centroid_y"].between(y0, y1)
        oversized = table["area"] > args.max_area_ratio * table["area"].median()
        table["kept"] = ~(in_box | oversized)
        heuristics = colour_heuristics(image, labels, args.heuristic_erosion)
        table["green_darkness"] = [heuristics[int(label)][0] for label in table["label"]]
        table["saturation_spread"] = [heuristics[int(label)][1] for label in table["label"]]
        tables.append(table)
        n_parasite_boxes += sum(box[0] in PARASITE_TYPES for box in boxes[field])
        if args.export_crops is not None:
            crop_rows += export_crops(image, labels, loaded.preprocessing, table, field, args.export_crops)

    cells = pd.concat(tables, ignore_index=True)
    summary = {
        "model": str(args.model),
        "cells": int(len(cells)),
        "positive_cells": int((cells["target"] == 1).sum()),
        "difficult_cells": int((cells["target"] == -1).sum()),
        "parasite_boxes": n_parasite_boxes,
        "seconds": {key: round(value, 1) for key, value in seconds.items()},
    }
    for subset, selected in (("all", cells), ("kept", cells[cells["kept"]])):
        summary[subset] = {"cells": int(len(selected)), "positive_cells": int((selected["target"] == 1).sum())}
        for column in ("score", "green_darkness", "saturation_spread"):
            metrics = ranking_summary(selected, column, n_parasite_boxes, args.top)
            summary[subset][column] = metrics
            print(
                f"{subset:4s} cells {column:18s} AUROC {metrics['auroc']:.3f} AUPRC {metrics['auprc']:.3f} "
                f"parasite boxes with a top-{args.top:.0%} cell: {metrics['boxes_in_top']}/{metrics['boxes']}"
            )
    print(
        f"{summary['cells']} cells, {summary['positive_cells']} in parasite boxes, "
        f"{summary['difficult_cells']} difficult only, {summary['kept']['cells']} kept; "
        f"seconds {summary['seconds']}"
    )

    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        cells.to_csv(args.csv, index=False)
    if args.export_crops is not None:
        pd.DataFrame(crop_rows).to_csv(args.export_crops / "cells.csv", index=False)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
