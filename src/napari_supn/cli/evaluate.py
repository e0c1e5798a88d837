"""``napari-supn evaluate``: AUROC and AUPRC of a model on healthy vs anomalous crops."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

from napari_supn.scoring import DEFAULT_SAMPLES, DEFAULT_TILE

logger = logging.getLogger("napari_supn")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure AUROC and AUPRC on folders of healthy and anomalous crops",
        description=(
            "Score every crop of a healthy and an anomalous folder and print AUROC "
            "and AUPRC (anomalous = positive), ranking cells by their largest tile "
            "score inside the cell mask. Folders use the training layouts: a flat "
            "folder of images, or raw/ and mask/ subfolders (masks used when present)."
        ),
    )
    parser.add_argument("--model", required=True, help="model file path or shipped model name")
    parser.add_argument("--healthy", required=True, type=Path, help="folder of healthy crops")
    parser.add_argument("--anomalous", required=True, type=Path, help="folder of anomalous crops")
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"latent samples per crop (default: the model's setting, else {DEFAULT_SAMPLES})",
    )
    parser.add_argument(
        "--restoration",
        action="store_true",
        help="refine each latent code by 100 Adam steps (lr 0.01) before scoring",
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=None,
        help=f"tile side in model pixels (default: the model's setting, else {DEFAULT_TILE})",
    )
    parser.add_argument(
        "--mask-erosion",
        type=int,
        default=None,
        help="erode cell masks by this many model pixels before tiling (default: the model's setting, else 0)",
    )
    parser.add_argument("--no-masks", action="store_true", help="ignore masks and tile the whole crop")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent samples (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--json", action="store_true", help="print the metrics as one JSON object on the last line"
    )
    parser.add_argument(
        "--scores-csv", type=Path, default=None, help="write one row per crop (file, label, scores)"
    )
    parser.set_defaults(run=run)


def write_scores_csv(path: Path, result) -> None:
    """Write one row per crop with its label and both scores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "cell_score", "distance"])
        for label, folder in (("healthy", result.healthy), ("anomalous", result.anomalous)):
            for name, score, distance in zip(
                folder.names, folder.scores.cell_score, folder.scores.distance
            ):
                writer.writerow([name, label, f"{score:.6g}", f"{distance:.6g}"])
    logger.info("Wrote %s", path)


def run(args: argparse.Namespace) -> int:
    from napari_supn.device import select_device
    from napari_supn.evaluation import evaluate_folders
    from napari_supn.model_file import load_model
    from napari_supn.scoring import stored_score_settings

    for option, folder in (("--healthy", args.healthy), ("--anomalous", args.anomalous)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{option} folder not found: {folder}")

    device = select_device(args.device)
    loaded = load_model(args.model, device=device)
    defaults = stored_score_settings(loaded.metadata)

    result = evaluate_folders(
        loaded,
        args.healthy,
        args.anomalous,
        samples=args.samples if args.samples is not None else defaults["samples"],
        tile=args.tile if args.tile is not None else defaults["tile"],
        mask_erosion=(
            args.mask_erosion if args.mask_erosion is not None else defaults["mask_erosion"]
        ),
        restoration=args.restoration,
        seed=args.seed,
        use_masks=not args.no_masks,
    )

    if args.scores_csv is not None:
        write_scores_csv(args.scores_csv, result)

    print(
        f"model {args.model}: {result.n_healthy} healthy, {result.n_anomalous} anomalous; "
        f"cell score AUROC {result.auroc:.3f} AUPRC {result.auprc:.3f}; "
        f"image distance AUROC {result.distance_auroc:.3f} AUPRC {result.distance_auprc:.3f}"
    )
    if args.json:
        summary = {"model": str(args.model), **result.to_dict()}
        print(json.dumps(summary))
    return 0
