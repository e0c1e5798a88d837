"""Score fl_supn development crops with a spot heuristic that needs no training.

The score of a crop is the maximum white top-hat (disk of radius 5 px,
after a Gaussian blur of sigma 1 px) inside the cell mask: bright spots
smaller than the disk, such as parasite DNA, stand out. Prints AUROC and
AUPRC, anomalous = positive.

    .venv/bin/python scripts/experiments/fluorescence_heuristic.py ../shared/data/fl_supn/dev
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from skimage.filters import gaussian
from skimage.morphology import disk, white_tophat

from napari_supn.data import load_crops
from napari_supn.evaluation import ranking_metrics


def tophat_scores(folder: Path) -> np.ndarray:
    """Return the maximum white top-hat inside each crop's mask."""
    crops = load_crops(folder)
    scores = []
    for image, mask in zip(crops.images, crops.masks):
        smooth = gaussian(image.astype(np.float64), sigma=1.0, preserve_range=True)
        response = white_tophat(smooth, disk(5))
        scores.append(float(response[mask].max()) if mask.any() else 0.0)
    return np.array(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dev", type=Path, help="folder with healthy/ and infected/ subfolders")
    args = parser.parse_args()
    metrics = ranking_metrics(tophat_scores(args.dev / "healthy"), tophat_scores(args.dev / "infected"))
    print(f"white top-hat: AUROC {metrics['auroc']:.3f} AUPRC {metrics['auprc']:.3f}")


if __name__ == "__main__":
    main()
