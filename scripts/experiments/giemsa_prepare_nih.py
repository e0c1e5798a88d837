"""Build raw/ + mask/ crop folders from the flat NIH Giemsa crops.

The NIH crops are flat RGB PNGs whose background outside the segmented cell
is black (0). This script derives each cell mask from the non-black pixels
(maximum channel above ``--threshold``, holes filled, largest component
kept) and writes the paired layout that ``napari-supn train --masked`` and
``napari-supn evaluate`` read: ``OUT/NAME/raw`` (links to the original
crops, or BT.601 grey copies with ``--grey``) and ``OUT/NAME/mask``.

Usage::

    python scripts/experiments/giemsa_prepare_nih.py \
        --data /path/to/nih_malaria_cells --out runs/nih [--grey]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import io

from napari_supn.preprocessing import rgb_to_grey

SUBSETS = {
    "train": "train/uninfected",
    "dev_uninfected": "dev/uninfected",
    "dev_parasitized": "dev/parasitized",
}


def cell_mask(crop: np.ndarray, threshold: int) -> np.ndarray:
    """Return the bool (H, W) mask of the non-black cell in an (H, W, 3) crop."""
    foreground = crop.max(axis=-1) > threshold
    foreground = ndimage.binary_fill_holes(foreground)
    labels, count = ndimage.label(foreground)
    if count > 1:
        sizes = ndimage.sum(foreground, labels, index=np.arange(1, count + 1))
        foreground = labels == (1 + int(np.argmax(sizes)))
    return foreground


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="nih_malaria_cells folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--threshold", type=int, default=10, help="max-channel value above which a pixel is cell")
    parser.add_argument("--grey", action="store_true", help="write BT.601 grey crops instead of linking RGB")
    args = parser.parse_args()

    for name, relative in SUBSETS.items():
        source = args.data / relative
        raw_folder, mask_folder = args.out / name / "raw", args.out / name / "mask"
        raw_folder.mkdir(parents=True, exist_ok=True)
        mask_folder.mkdir(parents=True, exist_ok=True)
        paths = sorted(source.glob("*.png"))
        fractions = []
        for path in paths:
            crop = io.imread(path)[..., :3]
            mask = cell_mask(crop, args.threshold)
            fractions.append(mask.mean())
            io.imsave(mask_folder / path.name, (mask * 255).astype(np.uint8), check_contrast=False)
            target = raw_folder / path.name
            if args.grey:
                io.imsave(target, rgb_to_grey(crop), check_contrast=False)
            elif not target.exists():
                target.symlink_to(path.resolve())
        print(f"{name}: {len(paths)} crops, mean cell fraction {np.mean(fractions):.3f}")


if __name__ == "__main__":
    main()
