"""``napari-supn train``: train a model on a folder of healthy crops or fields of view.

The command only turns its arguments into a
:class:`napari_supn.fitting.FitRequest`; :func:`napari_supn.fitting.fit_model`
does the work, the same function the Train dock calls.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("napari_supn")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" to option help, except where the default is None or False."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on a folder of healthy cell crops or fields of view",
        description=(
            "Train a VAE on healthy crops in two stages: stage 1 fits the encoder and "
            "the mean decoder under a spherical likelihood with fixed variance, stage 2 "
            "freezes them and fits the likelihood decoder (diagonal or SUPN). The "
            "crops are a flat folder of images or raw/ and mask/ subfolders with the "
            "same file names. With --fields the folder holds field-of-view images "
            "instead, and every segmented cell becomes one crop. A fraction of the "
            "crops is held out to compute healthy-score quantiles and a default "
            "threshold, stored in the model file. "
            "A checkpoint is written next to the output (OUT.ckpt) so --resume can "
            "continue after an interruption."
        ),
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder of healthy crops, or of field-of-view images with --fields",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="MODEL.supn", help="model file to write"
    )

    parser.add_argument(
        "--likelihood",
        choices=("supn", "diagonal", "spherical"),
        default="supn",
        help="likelihood of the model; spherical has stage 1 only",
    )
    parser.add_argument(
        "--radius", type=int, default=1, help="SUPN connectivity radius in model pixels"
    )
    parser.add_argument(
        "--stage",
        choices=("1", "2", "both"),
        default=None,
        help="stages to run (default: both, or 2 with --init, or 1 for spherical)",
    )
    parser.add_argument(
        "--init",
        type=Path,
        metavar="MODEL.supn",
        default=None,
        help="existing model whose encoder, mean decoder, preprocessing and validation "
        "split are reused; runs stage 2 only",
    )

    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="iterations (batches) per stage; overrides --stage1-iterations and "
        "--stage2-iterations",
    )
    parser.add_argument("--stage1-iterations", type=int, default=6000, help="stage-1 iterations")
    parser.add_argument("--stage2-iterations", type=int, default=1500, help="stage-2 iterations")
    parser.add_argument("--batch-size", type=int, default=32, help="crops per iteration")

    parser.add_argument(
        "--variance",
        type=float,
        default=0.11,
        help="fixed pixel variance σ² of stage 1 and of the spherical likelihood, on the "
        "(-1, 1) intensity scale (0.11 fluorescence, 0.06 brightfield)",
    )
    parser.add_argument(
        "--downsample", type=int, default=2, help="average-pooling factor from crop to model input"
    )
    parser.add_argument("--depth", type=int, default=4, help="encoder blocks")
    parser.add_argument("--base-width", type=int, default=16, help="channels of the first block")
    parser.add_argument("--latent-size", type=int, default=100, help="latent dimensions")
    parser.add_argument(
        "--intensity",
        choices=("dtype", "percentile"),
        default="dtype",
        help="map the dtype range or the 0.5–99.5 percentiles of the training pixels to (-1, 1)",
    )
    parser.add_argument(
        "--crop-mode",
        choices=("centred", "bbox_resize"),
        default="centred",
        help="how crops were cut from fields (stored for scoring whole fields)",
    )

    masks = parser.add_mutually_exclusive_group()
    masks.add_argument(
        "--masked",
        action="store_true",
        help="set pixels outside the cell mask to -1 before blurring (needs mask/)",
    )
    masks.add_argument(
        "--no-mask", action="store_true", help="ignore mask/ even when present"
    )
    parser.add_argument(
        "--off-diagonal-l1",
        type=float,
        default=100.0,
        help="weight of the L1 penalty on the mean absolute off-diagonal weight (0: off)",
    )
    parser.add_argument("--rotations", action="store_true", help="add random 90° rotations to the flips")
    parser.add_argument(
        "--drop-fraction",
        type=float,
        default=0.0,
        help="fraction of training crops with the largest stage-1 reconstruction error removed "
        "before stage 2, for uncurated crops such as those cut from fields (0: keep all)",
    )

    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="fraction of crops held out for validation loss and score quantiles",
    )
    parser.add_argument("--samples", type=int, default=16, help="latent samples per crop when scoring held-out crops")
    parser.add_argument("--tile", type=int, default=4, help="score tile side in model pixels")
    parser.add_argument(
        "--mask-erosion", type=int, default=0, help="erode cell masks by this many model pixels before tiling"
    )

    fields = parser.add_argument_group("training from fields of view (--fields)")
    fields.add_argument(
        "--fields",
        action="store_true",
        help="treat --data as a folder of field-of-view images: segment the cells and crop "
        "each one (crops keep the field's dtype and carry their cell masks)",
    )
    fields.add_argument(
        "--segmenter",
        choices=("auto", "cellpose", "classical"),
        default="auto",
        help="cell segmenter; auto runs Cellpose when its weights are on disk, else the "
        "classical one",
    )
    fields.add_argument(
        "--cellpose-model",
        default=None,
        metavar="NAME_OR_FILE",
        help="Cellpose weights file or model name (default: cyto3 in the Cellpose models folder)",
    )
    fields.add_argument(
        "--diameter",
        type=float,
        default=None,
        help="typical cell diameter in field pixels (default: estimated per field)",
    )
    fields.add_argument(
        "--crop-size", type=int, default=128, help="side of the square crop cut around each cell, in field pixels"
    )

    parser.add_argument("--checkpoint-every", type=int, default=500, help="iterations between checkpoints")
    parser.add_argument("--log-every", type=int, default=100, help="iterations between log lines")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint file (default: OUT with .ckpt appended)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")

    parser.add_argument("--seed", type=int, default=0, help="seed of weights, split, batches and noise")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.set_defaults(run=run)


def _request(args):
    """Build the FitRequest of ``args``; raise ValueError for options that do not fit together."""
    from napari_supn.fitting import FitRequest

    if not args.fields:
        fields_options = [
            flag
            for flag, value, default in (
                ("--segmenter", args.segmenter, "auto"),
                ("--cellpose-model", args.cellpose_model, None),
                ("--diameter", args.diameter, None),
                ("--crop-size", args.crop_size, 128),
            )
            if value != default
        ]
        if fields_options:
            raise ValueError(f"{', '.join(fields_options)} only apply when cutting crops from fields; add --fields")

    stage1_iterations = args.iterations if args.iterations is not None else args.stage1_iterations
    stage2_iterations = args.iterations if args.iterations is not None else args.stage2_iterations
    return FitRequest(
        data=args.data,
        out=args.out,
        source="fields" if args.fields else "crops",
        likelihood=args.likelihood,
        radius=args.radius,
        variance=args.variance,
        downsample=args.downsample,
        depth=args.depth,
        base_width=args.base_width,
        latent_size=args.latent_size,
        intensity=args.intensity,
        crop_mode=args.crop_mode,
        masked=args.masked,
        use_masks=not args.no_mask,
        stage=args.stage,
        init=args.init,
        stage1_iterations=stage1_iterations,
        stage2_iterations=stage2_iterations,
        batch_size=args.batch_size,
        off_diagonal_l1=args.off_diagonal_l1,
        rotations=args.rotations,
        validation_fraction=args.validation_fraction,
        crop_size=args.crop_size,
        segmenter=args.segmenter,
        cellpose_model=args.cellpose_model,
        diameter=args.diameter,
        drop_fraction=args.drop_fraction,
        samples=args.samples,
        tile=args.tile,
        mask_erosion=args.mask_erosion,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        resume=args.resume,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        extra_metadata={"trained_in": "napari-supn train"},
    )


def run(args) -> int:
    import signal
    import threading

    from napari_supn.fitting import fit_model
    from napari_supn.progress import Cancelled

    # The first Ctrl-C (SIGINT) or SIGTERM requests a stop at the next
    # iteration, which writes a checkpoint that --resume continues from.
    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        logger.warning("Stop requested (signal %d): writing a checkpoint, then exiting", signum)
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
    try:
        fit_model(_request(args), cancel=stop.is_set)
    except Cancelled:
        print("Training stopped; run the same command with --resume to continue.", file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
