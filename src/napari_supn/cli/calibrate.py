"""``napari-supn calibrate``: store new score settings and a matching threshold in a model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("napari_supn")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="recompute a model's threshold for new score settings",
        description=(
            "Score healthy crops with the given settings and write a copy of the model "
            "whose stored score settings, healthy-score quantiles and threshold match "
            "them. The score command, the evaluate command and the napari dock use the "
            "stored settings by default. Use crops the model did not train on: with "
            "--held-out, only the crops the training run held out (their names are "
            "stored in the model) are taken from --healthy."
        ),
    )
    parser.add_argument("--model", required=True, help="model file path or shipped model name")
    parser.add_argument(
        "--healthy", required=True, type=Path, help="folder of healthy crops (flat, or raw/ and mask/)"
    )
    parser.add_argument("--out", required=True, type=Path, help="model file to write (may equal --model)")
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="use only the crops the model's training run held out (--healthy must be its training folder)",
    )
    parser.add_argument("--samples", type=int, default=None, help="latent samples per crop (default: keep)")
    parser.add_argument("--tile", type=int, default=None, help="tile side in model pixels (default: keep)")
    parser.add_argument(
        "--mask-erosion", type=int, default=None, help="mask erosion in model pixels (default: keep)"
    )
    parser.add_argument(
        "--quantile", type=float, default=0.99, help="healthy-score quantile used as threshold (default 0.99)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent samples (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from napari_supn.calibration import calibrate, select_crops
    from napari_supn.scoring import stored_score_settings
    from napari_supn.data import load_crops
    from napari_supn.device import select_device
    from napari_supn.model_file import load_model, save_model

    if not args.healthy.is_dir():
        raise FileNotFoundError(f"--healthy folder not found: {args.healthy}")

    loaded = load_model(args.model, device=select_device(args.device))
    current = stored_score_settings(loaded.metadata)

    crops = load_crops(args.healthy)
    if args.held_out:
        names = loaded.metadata.get("training_data", {}).get("validation_names")
        if not names:
            raise ValueError(
                f"model {args.model} stores no held-out crop names; drop --held-out and pass "
                "healthy crops it did not train on"
            )
        crops = select_crops(crops, names)

    updates = calibrate(
        loaded,
        crops,
        samples=args.samples if args.samples is not None else current["samples"],
        tile=args.tile if args.tile is not None else current["tile"],
        mask_erosion=args.mask_erosion if args.mask_erosion is not None else current["mask_erosion"],
        quantile=args.quantile,
        seed=args.seed,
    )
    metadata = {**loaded.metadata, **updates}
    metadata["calibration"]["held_out"] = bool(args.held_out)
    save_model(args.out, loaded.model.cpu(), loaded.preprocessing, metadata)
    print(
        f"wrote {args.out}: samples {updates['scoring']['samples']}, tile {updates['scoring']['tile']}, "
        f"mask erosion {updates['scoring']['mask_erosion']}, threshold {updates['threshold']:.4g} "
        f"({args.quantile:g} quantile of {len(crops)} healthy crops)"
    )
    return 0
