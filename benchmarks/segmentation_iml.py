"""Compare segmentation with the boxed cells of the IML-Malaria fields.

Reads the fields and boxes at run time from a folder laid out as
``images/*.JPG`` plus ``boxes.csv`` (columns file,type,x,y,w,h with x,y the
top-left corner). Nothing derived from these images is written to the
repository: the script only prints counts and timings.

Matching rules, per field:

- box centres and label centroids are matched one to one (Hungarian
  assignment that maximises the number of pairs closer than half the box
  size, then their closeness); unmatched boxes are *missed*, unmatched labels
  are *extra* (white cells, debris, fragments, or cells the annotators did not box);
- a *merge* is a label whose mask contains two or more box centres;
- a *split* is a box that holds more than half of the area of two or more
  labels.

Usage::

    .venv/bin/python benchmarks/segmentation_iml.py ../shared/data/iml_malaria_fov \
        [--method classical] [--diameter 80]
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import time
from collections import defaultdict

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage import io, measure

from napari_supn.segmentation import segment


def read_boxes(folder: pathlib.Path) -> dict[str, list[tuple[str, int, int, int, int]]]:
    boxes: dict[str, list] = defaultdict(list)
    with open(folder / "boxes.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            boxes[row["file"]].append(
                (row["type"], int(row["x"]), int(row["y"]), int(row["w"]), int(row["h"])))
    return boxes


def compare(labels: np.ndarray, boxes: list[tuple[str, int, int, int, int]]) -> dict[str, int]:
    regions = measure.regionprops(labels)
    centroids = np.array([region.centroid for region in regions]).reshape(-1, 2)
    centres = np.array([(y + h / 2, x + w / 2) for _, x, y, w, h in boxes]).reshape(-1, 2)
    sizes = np.array([max(w, h) for _, _, _, w, h in boxes], dtype=float)

    # One-to-one matching of box centres and label centroids, accepted when
    # closer than half the box size. Pairs too far apart to be accepted cost
    # a constant larger than any accepted total, so the assignment first
    # maximises the number of accepted pairs and only then their closeness.
    # A plain distance cost can trade an accepted pair for a shorter total
    # and then count one match fewer when a label is added.
    distances = np.linalg.norm(centres[:, None, :] - centroids[None, :, :], axis=-1)
    acceptable = distances < 0.5 * sizes[:, None]
    rejected_cost = 1.0 + distances[acceptable].sum() if acceptable.any() else 1.0
    rows, cols = linear_sum_assignment(np.where(acceptable, distances, rejected_cost))
    accepted = acceptable[rows, cols]

    # A merge is a label whose mask holds two or more box centres; a split is
    # a box holding more than half of the area of two or more labels.
    centres_per_label = np.zeros(labels.max() + 1, int)
    for cy, cx in centres.astype(int):
        centres_per_label[labels[min(cy, labels.shape[0] - 1), min(cx, labels.shape[1] - 1)]] += 1
    split = 0
    for _, x, y, w, h in boxes:
        window = labels[y:y + h, x:x + w]
        ids, counts = np.unique(window[window > 0], return_counts=True)
        mostly_inside = counts > 0.5 * np.array([regions[i - 1].area for i in ids])
        split += int(mostly_inside.sum() >= 2)

    return {
        "boxes": len(boxes),
        "labels": len(regions),
        "matched": int(accepted.sum()),
        "missed_boxes": len(boxes) - int(accepted.sum()),
        "extra_labels": len(regions) - int(accepted.sum()),
        "merges": int((centres_per_label[1:] >= 2).sum()),
        "splits": split,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=pathlib.Path, help="IML folder with images/ and boxes.csv")
    parser.add_argument("--method", default="classical", choices=["auto", "cellpose", "classical"])
    parser.add_argument("--diameter", type=float, default=None, help="cell diameter in px (default: estimate)")
    args = parser.parse_args()

    boxes = read_boxes(args.folder)
    columns = ["boxes", "labels", "matched", "missed_boxes", "extra_labels", "merges", "splits"]
    totals = dict.fromkeys(columns, 0)
    print("| field | diameter px | " + " | ".join(columns) + " | seconds |")
    print("|---" * (len(columns) + 3) + "|")

    for file in sorted(boxes):
        image = io.imread(args.folder / file)
        start = time.perf_counter()
        result = segment(image, method=args.method, diameter=args.diameter)
        seconds = time.perf_counter() - start

        row = compare(result.labels, boxes[file])
        for key in columns:
            totals[key] += row[key]
        print(f"| {pathlib.Path(file).stem} | {result.diameter:.0f} | "
              + " | ".join(str(row[key]) for key in columns) + f" | {seconds:.1f} |")

    print("| total | | " + " | ".join(str(totals[key]) for key in columns) + " | |")


if __name__ == "__main__":
    main()
