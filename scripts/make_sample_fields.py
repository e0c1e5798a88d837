"""Build the two assembled sample fields shipped in src/napari_supn/sample_data/.

No real field of view with a licence that allows redistribution was at hand,
so each sample field is assembled from real single-cell crops whose licence
does: every cell is cut out along its mask and pasted into its own slot of a
loose grid, at a random offset inside the slot, so cells never overlap.

- fluorescence: fl_supn crops (Vodenicharski et al. 2022, CC BY 4.0), the
  cell given by each crop's mask, pasted onto a dark background.
- giemsa: NIH malaria crops (Rajaraman et al. 2018, U.S. Government work),
  the cell given by the non-black pixels of each crop, pasted onto a light
  background.

For each field the script writes ``<name>.png`` (the image), ``<name>_labels.png``
(the pasted cell masks, one value per position) and ``<name>_cells.csv``
(one row per position: where it is, whether the source crop is infected and
which crop it came from). The output is the same on every run for the same
data and seed.

Usage::

    python scripts/make_sample_fields.py --data ../shared/data \
        --out src/napari_supn/sample_data
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage import io, measure, morphology

SEED = 20240611


@dataclass
class Cell:
    """One cell cut from a crop: its pixels, its mask and where it came from."""

    pixels: np.ndarray  # (h, w) or (h, w, 3), uint8, the crop's bounding box of the mask
    mask: np.ndarray  # (h, w) bool
    infected: bool
    source_label: str
    source: str  # path relative to the data folder


def cut_cell(image: np.ndarray, mask: np.ndarray, infected: bool, source_label: str, source: str) -> Cell:
    """Keep the largest connected part of ``mask`` and cut image and mask to its box."""
    components = measure.label(mask)
    if components.max() == 0:
        raise ValueError(f"crop {source} has an empty cell mask")
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    mask = ndi.binary_fill_holes(components == sizes.argmax())

    rows, cols = np.nonzero(mask)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    return Cell(image[box].copy(), mask[box].copy(), infected, source_label, source)


def read_fluorescence(data: Path, n_healthy: int, n_infected: int, rng: np.random.Generator) -> list[Cell]:
    """Draw fl_supn dev crops and cut each cell along its Cellpose mask."""
    cells = []
    for label, count in (("healthy", n_healthy), ("infected", n_infected)):
        files = sorted((data / "fl_supn" / "dev" / label / "raw").glob("*.png"))
        for path in rng.choice(files, size=count, replace=False):
            mask_path = path.parent.parent / "mask" / path.name
            image = io.imread(path)
            mask = io.imread(mask_path) > 0
            source = str(path.relative_to(data))
            cells.append(cut_cell(image, mask, label == "infected", label, source))
    return cells


def read_giemsa(data: Path, n_healthy: int, n_infected: int, rng: np.random.Generator) -> list[Cell]:
    """Draw NIH dev crops and keep the non-black part of each as the cell.

    The crops were resized from their original boxes, which left a few
    pixels of dark blend between the cell and the black surround. A 2-pixel
    erosion drops that rim.
    """
    cells = []
    for label, count in (("uninfected", n_healthy), ("parasitized", n_infected)):
        files = sorted((data / "nih_malaria_cells" / "dev" / label).glob("*.png"))
        for path in rng.choice(files, size=count, replace=False):
            image = io.imread(path)[..., :3]
            mask = image.max(axis=-1) > 20
            mask = ndi.binary_erosion(ndi.binary_fill_holes(mask), morphology.disk(2))
            source = str(path.relative_to(data))
            cells.append(cut_cell(image, mask, label == "parasitized", label, source))
    return cells


def smooth_noise(shape: tuple[int, ...], sigma_noise: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise blurred by one pixel, so the background has a camera-like grain."""
    noise = rng.normal(0.0, sigma_noise, size=shape)
    spatial_sigma = (1.0, 1.0) + (0.0,) * (len(shape) - 2)
    return ndi.gaussian_filter(noise, spatial_sigma)


def assemble(
    cells: list[Cell],
    columns: int,
    slot: int,
    background: np.ndarray,
    grain: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Paste cells into a grid of ``slot``-pixel squares at random offsets.

    Cells are shuffled, then each goes into the next slot at an offset drawn
    uniformly so that it stays inside its slot. Edges are blended over one
    pixel so the paste leaves no hard seam.

    Returns
    -------
    image : ndarray of uint8, shape (H, W) or (H, W, 3)
    labels : ndarray of uint8, shape (H, W)
        Position p (1-based) marks the pixels of the cell pasted there.
    rows : list of dict
        One record per position for the CSV.
    """
    order = rng.permutation(len(cells))
    grid_rows = int(np.ceil(len(cells) / columns))
    height, width = grid_rows * slot, columns * slot
    channels = background.shape[-1] if background.ndim else 0
    shape = (height, width, channels) if channels else (height, width)

    field = np.broadcast_to(background.astype(np.float64), shape).copy()
    field += smooth_noise(shape, grain, rng)
    labels = np.zeros((height, width), np.uint8)
    records = []

    for position, index in enumerate(order, start=1):
        cell = cells[index]
        h, w = cell.mask.shape
        if h > slot or w > slot:
            raise ValueError(f"cell {cell.source} ({h}×{w}) does not fit a {slot}-pixel slot")
        grid_row, grid_col = divmod(position - 1, columns)
        top = grid_row * slot + int(rng.integers(0, slot - h + 1))
        left = grid_col * slot + int(rng.integers(0, slot - w + 1))

        alpha = ndi.gaussian_filter(cell.mask.astype(np.float64), 0.7) * cell.mask
        if channels:
            alpha = alpha[..., None]
        window = field[top : top + h, left : left + w]
        window[...] = alpha * cell.pixels + (1 - alpha) * window
        labels[top : top + h, left : left + w][cell.mask] = position

        rows, cols = np.nonzero(cell.mask)
        records.append(
            {
                "position": position,
                "grid_row": grid_row,
                "grid_col": grid_col,
                "centroid_y": round(top + rows.mean(), 2),
                "centroid_x": round(left + cols.mean(), 2),
                "area": int(cell.mask.sum()),
                "infected": cell.infected,
                "source_label": cell.source_label,
                "source": cell.source,
            }
        )

    image = np.clip(np.round(field), 0, 255).astype(np.uint8)
    return image, labels, records


def write_field(out: Path, name: str, image: np.ndarray, labels: np.ndarray, records: list[dict]) -> None:
    """Write the image, the labels and the per-position CSV of one field."""
    out.mkdir(parents=True, exist_ok=True)
    io.imsave(out / f"{name}.png", image, check_contrast=False)
    io.imsave(out / f"{name}_labels.png", labels, check_contrast=False)
    with open(out / f"{name}_cells.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    sizes = ", ".join(
        f"{path.name} {path.stat().st_size / 1e3:.0f} kB"
        for path in (out / f"{name}.png", out / f"{name}_labels.png")
    )
    infected = sum(record["infected"] for record in records)
    print(f"{name}: {image.shape}, {len(records)} cells ({infected} infected); {sizes}")


def build_fluorescence(data: Path, seed: int = SEED):
    """Assemble the fluorescence field: 26 healthy and 4 infected fl_supn crops on a 6×5 grid."""
    rng = np.random.default_rng(seed)
    cells = read_fluorescence(data, n_healthy=26, n_infected=4, rng=rng)
    # Dark background near the median out-of-mask level of fl_supn crops (about 20).
    return assemble(cells, columns=6, slot=112, background=np.array(20.0), grain=3.0, rng=rng)


def build_giemsa(data: Path, seed: int = SEED):
    """Assemble the Giemsa field: 16 uninfected and 4 parasitized NIH crops on a 5×4 grid."""
    rng = np.random.default_rng(seed + 1)
    cells = read_giemsa(data, n_healthy=16, n_infected=4, rng=rng)
    # Light pinkish-grey background, as between cells on a Giemsa thin smear.
    background = np.array([228.0, 215.0, 218.0])
    return assemble(cells, columns=5, slot=144, background=background, grain=2.0, rng=rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder with fl_supn/ and nih_malaria_cells/")
    parser.add_argument("--out", type=Path, default=Path("src/napari_supn/sample_data"), help="output folder")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    args = parser.parse_args()

    write_field(args.out, "fluorescence_field", *build_fluorescence(args.data, args.seed))
    write_field(args.out, "giemsa_field", *build_giemsa(args.data, args.seed))


if __name__ == "__main__":
    main()
