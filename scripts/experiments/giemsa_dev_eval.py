"""Score NIH dev crops with Giemsa models over a grid of tile sizes and mask erosions.

Each model scores the 200 + 200 dev crops once per setting of restoration
(the whitened map does not depend on the tile or erosion), then the cell
score (largest tile sum inside the eroded cell mask) is recomputed for
every tile size and erosion with ``napari_supn.scoring`` helpers. Prints
one line per (model, restoration, tile, erosion) and writes them as JSON.

Usage::

    python scripts/experiments/giemsa_dev_eval.py runs/giemsa/*.supn \
        --folders runs/nih --samples 16 --restoration both --out runs/giemsa/dev.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from napari_supn.data import load_crops
from napari_supn.evaluation import ranking_metrics
from napari_supn.model_file import load_model
from napari_supn.scoring import erode_masks, score_crops, tile_sums


def whitened_maps(loaded, folder: Path, samples: int, restoration: bool, seed: int):
    """Return the whitened maps (N, h, w) and prepared masks (N, 1, h, w) of a crop folder."""
    crops = load_crops(folder)
    images, masks = loaded.preprocessing.prepare(crops.images, crops.masks)
    generator = torch.Generator().manual_seed(seed)
    scores = score_crops(
        loaded.model, images, None, samples=samples, tile=1, restoration=restoration,
        generator=generator,
    )
    return torch.from_numpy(scores.whitened), masks


def cell_scores(maps: torch.Tensor, masks: torch.Tensor, tile: int, erosion: int):
    """Return the largest tile sum inside the eroded mask, (N,)."""
    inside = erode_masks(masks.bool(), erosion)[:, 0].to(maps.dtype)
    return tile_sums(maps * inside, tile).flatten(1).amax(dim=1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--folders", type=Path, default=Path("runs/nih"))
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--erosions", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--restoration", choices=("no", "yes", "both"), default="no")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for all rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    restorations = {"no": [False], "yes": [True], "both": [False, True]}[args.restoration]
    rows = []
    for model_path in args.models:
        loaded = load_model(model_path)
        folders = args.folders
        if loaded.preprocessing.channels == "grey" and (args.folders.parent / (args.folders.name + "_grey")).is_dir():
            folders = args.folders.parent / (args.folders.name + "_grey")
        for restoration in restorations:
            started = time.perf_counter()
            healthy_maps, healthy_masks = whitened_maps(
                loaded, folders / "dev_uninfected", args.samples, restoration, args.seed
            )
            infected_maps, infected_masks = whitened_maps(
                loaded, folders / "dev_parasitized", args.samples, restoration, args.seed
            )
            seconds = time.perf_counter() - started
            for tile in args.tiles:
                for erosion in args.erosions:
                    metrics = ranking_metrics(
                        cell_scores(healthy_maps, healthy_masks, tile, erosion),
                        cell_scores(infected_maps, infected_masks, tile, erosion),
                    )
                    row = {
                        "model": model_path.name, "likelihood": loaded.config.likelihood,
                        "channels": loaded.preprocessing.channels, "restoration": restoration,
                        "samples": 1 if restoration else args.samples, "tile": tile,
                        "erosion": erosion, "seconds": round(seconds, 1), **metrics,
                    }
                    rows.append(row)
                    print(
                        f"{model_path.name:32s} restoration {int(restoration)} tile {tile} "
                        f"erosion {erosion}: AUROC {metrics['auroc']:.3f} AUPRC {metrics['auprc']:.3f} "
                        f"({seconds:.0f} s)", flush=True,
                    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
