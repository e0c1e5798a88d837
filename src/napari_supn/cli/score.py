"""``napari-supn score``: segment and score whole fields of view, headless."""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

from napari_supn.scoring import DEFAULT_SAMPLES, DEFAULT_TILE

logger = logging.getLogger("napari_supn")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "score",
        help="segment fields of view and score every cell",
        description=(
            "Segment each image, score every cell with the model and write, per image, "
            "DIR/<stem>_cells.csv (one row per cell, ranked by score), "
            "<stem>_labels.tif, <stem>_whitened.tif and <stem>_tiles.tif, all in the "
            "input image's pixel coordinates."
        ),
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="TIFF, PNG or JPEG fields")
    parser.add_argument(
        "--model", required=True, help="model file path or shipped model name (e.g. fluorescence, giemsa)"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument(
        "--segmenter",
        choices=["auto", "cellpose", "classical"],
        default="auto",
        help="auto uses Cellpose when local weights exist, else the classical segmenter (default auto)",
    )
    parser.add_argument(
        "--cellpose-model",
        type=Path,
        default=None,
        help="local Cellpose 3 weights file (default: CELLPOSE_LOCAL_MODELS_PATH/cyto3 when present)",
    )
    parser.add_argument(
        "--diameter", type=float, default=None, help="expected cell diameter in image pixels (default: estimated)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"latent samples per cell (default: the model's setting, else {DEFAULT_SAMPLES})",
    )
    parser.add_argument(
        "--tile",
        type=int,
        default=None,
        help=f"tile side in model pixels (default: the model's setting, else {DEFAULT_TILE})",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="flag cells scoring above this (default: the model's stored threshold)",
    )
    parser.add_argument("--restoration", action="store_true", help="refine latent codes before scoring (slower)")
    parser.add_argument("--batch-size", type=int, default=64, help="cells scored at a time (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent samples (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.set_defaults(run=run)


def write_outputs(result, out: Path, stem: str) -> list[Path]:
    """Write the table and the three maps of one field; return the paths written."""
    import tifffile

    out.mkdir(parents=True, exist_ok=True)
    paths = [
        out / f"{stem}_cells.csv",
        out / f"{stem}_labels.tif",
        out / f"{stem}_whitened.tif",
        out / f"{stem}_tiles.tif",
    ]
    result.table.to_csv(paths[0], index=False, float_format="%.6g")
    tifffile.imwrite(paths[1], result.labels.astype("int32"), compression="zlib")
    tifffile.imwrite(paths[2], result.whitened.astype("float32"), compression="zlib")
    tifffile.imwrite(paths[3], result.tiles.astype("float32"), compression="zlib")
    for path in paths:
        logger.debug("Wrote %s", path)
    return paths


def check_arguments(args: argparse.Namespace) -> None:
    """Reject arguments that would fail or overwrite results only after scoring.

    Raises
    ------
    ValueError
        If two images share a file stem (their outputs would overwrite each
        other), --out is an existing file, or --threshold is not finite.
    """
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is an existing file; pass a folder for the outputs")

    stems: dict[str, Path] = {}
    for path in args.images:
        if path.stem in stems and stems[path.stem].resolve() != path.resolve():
            raise ValueError(
                f"{stems[path.stem]} and {path} share the name {path.stem!r}, so their outputs in "
                f"{args.out} would overwrite each other; score them into separate --out folders"
            )
        stems[path.stem] = path

    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ValueError(f"--threshold must be a finite number, got {args.threshold}")


def warn_if_settings_differ(loaded, args: argparse.Namespace) -> None:
    """Warn when score settings differ from those the stored threshold was computed with."""
    from napari_supn.scoring import stored_score_settings

    if args.threshold is not None:
        return
    stored = stored_score_settings(loaded.metadata)
    changed = [
        f"{name} {value} (model: {stored[name]})"
        for name, value in (("samples", args.samples), ("tile", args.tile))
        if value is not None and value != stored[name]
    ]
    if changed:
        logger.warning(
            "The model's threshold was computed with other score settings (%s), so flagging "
            "may be off; pass --threshold or run napari-supn calibrate with these settings",
            ", ".join(changed),
        )


def run(args: argparse.Namespace) -> int:
    from napari_supn.data import read_image
    from napari_supn.device import select_device
    from napari_supn.model_file import load_model
    from napari_supn.pipeline import score_field

    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"image not found: {', '.join(missing)}")
    check_arguments(args)

    device = select_device(args.device)
    loaded = load_model(args.model, device=device)
    warn_if_settings_differ(loaded, args)

    for path in args.images:
        started = time.perf_counter()
        image = read_image(path)
        result = score_field(
            image,
            loaded,
            segmenter=args.segmenter,
            cellpose_model=args.cellpose_model,
            diameter=args.diameter,
            samples=args.samples,
            tile=args.tile,
            restoration=args.restoration,
            threshold=args.threshold,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        write_outputs(result, args.out, path.stem)
        seconds = time.perf_counter() - started
        threshold = "none" if math.isinf(result.threshold) else f"{result.threshold:.4g}"
        print(
            f"{path.name}: {result.n_cells} cells, {result.n_flagged} flagged "
            f"(threshold {threshold}, parasitemia {100 * result.parasitemia:.2f} %), "
            f"segmenter {result.segmentation_method}, {seconds:.1f} s"
        )
    return 0
