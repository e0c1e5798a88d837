"""Measure the shipped fluorescence models on the fl_supn development set.

Prints one Markdown table row per (model, scoring setting) with AUROC and
AUPRC by cell score (largest masked tile sum) and by the image-level
expected Mahalanobis distance. The data folder is read at run time and
never copied into the repository.

    .venv/bin/python scripts/experiments/fluorescence_results.py ../shared/data/fl_supn/dev
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from napari_supn.evaluation import evaluate_folders
from napari_supn.model_file import load_model

MODELS = ("fluorescence-spherical", "fluorescence-diagonal", "fluorescence")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dev", type=Path, help="folder with healthy/ and infected/ subfolders")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tiles", type=int, nargs="+", default=[4])
    parser.add_argument("--erosions", type=int, nargs="+", default=[0])
    parser.add_argument("--restoration", choices=["off", "on", "both"], default="both")
    parser.add_argument("--json", type=Path, default=None, help="also write all rows as JSON")
    args = parser.parse_args()

    torch.set_num_threads(2)
    restorations = {"off": [False], "on": [True], "both": [False, True]}[args.restoration]
    rows = []
    print("| model | restoration | tile | erosion | AUROC | AUPRC | distance AUROC | distance AUPRC | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in MODELS:
        loaded = load_model(name, device="cpu")
        for restoration, tile, erosion in itertools.product(restorations, args.tiles, args.erosions):
            started = time.perf_counter()
            result = evaluate_folders(
                loaded,
                args.dev / "healthy",
                args.dev / "infected",
                samples=args.samples,
                tile=tile,
                mask_erosion=erosion,
                restoration=restoration,
                seed=0,
            )
            seconds = time.perf_counter() - started
            row = {"model": name, **result.to_dict(), "seconds": seconds}
            rows.append(row)
            print(
                f"| {name} | {'yes' if restoration else 'no'} | {tile} | {erosion} | "
                f"{result.auroc:.3f} | {result.auprc:.3f} | {result.distance_auroc:.3f} | "
                f"{result.distance_auprc:.3f} | {seconds:.0f} |",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
