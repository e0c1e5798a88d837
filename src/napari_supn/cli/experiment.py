"""``napari-supn experiment ellipses``: distance against a blended synthetic anomaly."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

logger = logging.getLogger("napari_supn")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="run a synthetic experiment (ellipses)",
        description="Synthetic experiments that probe what a model treats as anomalous.",
    )
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)

    ellipses = experiments.add_parser(
        "ellipses",
        help="blend a noisy or smooth ellipse into healthy crops and plot the distance",
        description=(
            "Blend an ellipse inside each cell at alpha = 0, 0.1, ..., 1, filled "
            "either with i.i.d. Gaussian noise or with a smooth bump, and record the "
            "expected squared Mahalanobis distance of each model. Writes "
            "ellipses.csv and ellipses.png to --out."
        ),
    )
    ellipses.add_argument(
        "--model",
        required=True,
        nargs="+",
        help="one or more model files or shipped model names (e.g. a spherical, a diagonal and a SUPN model)",
    )
    ellipses.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder of healthy crops (flat, or raw/ and mask/ subfolders)",
    )
    ellipses.add_argument("--out", type=Path, required=True, help="output folder")
    ellipses.add_argument("--images", type=int, default=100, help="crops used (default 100)")
    ellipses.add_argument("--samples", type=int, default=8, help="latent samples per crop (default 8)")
    ellipses.add_argument("--seed", type=int, default=0, help="seed of ellipses and noise (default 0)")
    ellipses.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    ellipses.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from napari_supn.device import select_device
    from napari_supn.evaluation import ellipse_experiment, plot_ellipse_experiment
    from napari_supn.model_file import load_model

    if not args.data.is_dir():
        raise FileNotFoundError(f"--data folder not found: {args.data}")

    device = select_device(args.device)
    models = {}
    for reference in args.model:
        loaded = load_model(reference, device=device)
        name = f"{Path(str(reference)).stem} ({loaded.model.config.likelihood})"
        models[name] = loaded

    rows = ellipse_experiment(
        models, args.data, max_images=args.images, samples=args.samples, seed=args.seed
    )

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "ellipses.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_path = args.out / "ellipses.png"
    plot_ellipse_experiment(rows, plot_path)
    print(f"wrote {csv_path} and {plot_path}")
    return 0
