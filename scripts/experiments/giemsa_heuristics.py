"""Colour heuristics on NIH Giemsa crops: green darkness and saturation spread.

Both scores are computed inside the cell mask eroded by ``--erosion``
crop pixels, on the raw 0–255 values:

- green darkness: median − 0.5th percentile of the green channel (dark
  stained parasite chromatin lowers the low percentile);
- saturation spread: 99.5th percentile − median of the HSV saturation.

Reads the paired folders written by ``giemsa_prepare_nih.py`` and prints
AUROC and AUPRC (parasitized = positive).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import color, io
from sklearn.metrics import average_precision_score, roc_auc_score


def green_darkness(crop: np.ndarray, mask: np.ndarray) -> float:
    """Return median − 0.5th percentile of the green values inside ``mask``."""
    green = crop[..., 1][mask].astype(np.float64)
    return float(np.median(green) - np.percentile(green, 0.5))


def saturation_spread(crop: np.ndarray, mask: np.ndarray) -> float:
    """Return the 99.5th percentile − median of HSV saturation inside ``mask``."""
    saturation = color.rgb2hsv(crop[..., :3])[..., 1][mask]
    return float(np.percentile(saturation, 99.5) - np.median(saturation))


def eroded(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Erode ``mask`` by ``pixels``; fall back to the mask when nothing is left."""
    if pixels <= 0:
        return mask
    inner = ndimage.binary_erosion(mask, iterations=pixels)
    return inner if inner.sum() >= 16 else mask


def folder_scores(folder: Path, erosion: int) -> dict[str, np.ndarray]:
    scores = {"green_darkness": [], "saturation_spread": []}
    for path in sorted((folder / "raw").glob("*.png")):
        crop = io.imread(path)[..., :3]
        mask = eroded(io.imread(folder / "mask" / path.name) > 0, erosion)
        scores["green_darkness"].append(green_darkness(crop, mask))
        scores["saturation_spread"].append(saturation_spread(crop, mask))
    return {name: np.asarray(values) for name, values in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", type=Path, default=Path("runs/nih"), help="output of giemsa_prepare_nih.py")
    parser.add_argument("--erosion", type=int, nargs="+", default=[0, 3, 5, 8], help="mask erosion in crop pixels")
    args = parser.parse_args()

    for erosion in args.erosion:
        healthy = folder_scores(args.folders / "dev_uninfected", erosion)
        infected = folder_scores(args.folders / "dev_parasitized", erosion)
        for name in healthy:
            scores = np.concatenate([healthy[name], infected[name]])
            labels = np.r_[np.zeros(len(healthy[name])), np.ones(len(infected[name]))]
            print(
                f"erosion {erosion:2d} px  {name:18s} AUROC {roc_auc_score(labels, scores):.3f} "
                f"AUPRC {average_precision_score(labels, scores):.3f}"
            )


if __name__ == "__main__":
    main()
