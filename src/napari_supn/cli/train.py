"""``napari-supn train``: train a model on a folder of healthy crops."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
from pathlib import Path

logger = logging.getLogger("napari_supn")

DEFAULT_THRESHOLD_QUANTILE = 0.99
QUANTILE_LEVELS = (0.5, 0.9, 0.95, 0.99, 0.999)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: X)" to option help, except where the default is None or False."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on a folder of healthy cell crops",
        description=(
            "Train a VAE on healthy crops in two stages: stage 1 fits the encoder and "
            "the mean decoder under a spherical likelihood with fixed variance, stage 2 "
            "freezes them and fits the likelihood decoder (diagonal or SUPN). The "
            "crops are a flat folder of images or raw/ and mask/ subfolders with the "
            "same file names. A fraction of the crops is held out to compute "
            "healthy-score quantiles and a default threshold, stored in the model file. "
            "A checkpoint is written next to the output (OUT.ckpt) so --resume can "
            "continue after an interruption."
        ),
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument(
        "--data", required=True, type=Path, metavar="DIR", help="folder of healthy crops"
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


def _cpu_model() -> str | None:
    """Return the CPU model name from /proc/cpuinfo (Linux), or None elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def hardware_summary(device) -> dict:
    """Describe where training ran, for the model metadata."""
    import torch

    summary = {
        "device": str(device),
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    return summary


def _resolve_stages(args, init_metadata) -> list[int]:
    stage = args.stage
    if args.init is not None:
        if stage not in (None, "2"):
            raise ValueError("--init reuses a trained stage 1, so only --stage 2 is possible")
        if args.likelihood == "spherical":
            raise ValueError("--init runs stage 2, which a spherical model does not have")
        return [2]
    if args.likelihood == "spherical":
        if stage == "2":
            raise ValueError("a spherical model has no stage 2; use --stage 1")
        return [1]
    if stage == "2":
        raise ValueError("stage 2 needs a trained stage 1: pass --init MODEL.supn or use --stage both")
    return [1] if stage == "1" else [1, 2]


def run(args) -> int:
    import numpy as np
    import torch

    from napari_supn import __version__
    from napari_supn.data import load_crops
    from napari_supn.device import select_device
    from napari_supn.model import ModelConfig, SUPNVAE
    from napari_supn.model_file import load_model, save_model
    from napari_supn.preprocessing import Preprocessing, fit_preprocessing
    from napari_supn.training import (
        TrainingConfig,
        read_checkpoint,
        seed_everything,
        split_train_validation,
        train,
    )

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.out.suffix != ".supn":
        raise ValueError(f"--out must end in .supn, got {args.out}")
    device = select_device(args.device)
    checkpoint_path = args.checkpoint or args.out.with_name(args.out.name + ".ckpt")

    init = load_model(args.init) if args.init is not None else None
    stages = _resolve_stages(args, init.metadata if init else None)

    stage1_iterations = args.iterations if args.iterations is not None else args.stage1_iterations
    stage2_iterations = args.iterations if args.iterations is not None else args.stage2_iterations
    training_config = TrainingConfig(
        stage1_iterations=stage1_iterations,
        stage2_iterations=stage2_iterations,
        batch_size=args.batch_size,
        off_diagonal_l1=args.off_diagonal_l1,
        rotations=args.rotations,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        validation_fraction=args.validation_fraction,
    )

    crops = load_crops(args.data, use_masks=not args.no_mask)
    if args.masked and crops.masks is None:
        raise ValueError(f"--masked needs cell masks, but {args.data} has no mask/ subfolder")

    # Validation split: reuse the initial model's held-out crops so stage 2 and
    # the score quantiles never see crops that stage 1 trained on.
    if init is not None and "validation_names" in init.metadata.get("training_data", {}):
        held_out = set(init.metadata["training_data"]["validation_names"])
        validation_index = np.array([i for i, n in enumerate(crops.names) if n in held_out], dtype=int)
        train_index = np.array([i for i, n in enumerate(crops.names) if n not in held_out], dtype=int)
    else:
        train_index, validation_index = split_train_validation(
            len(crops), training_config.validation_fraction, args.seed
        )
    train_crops, validation_crops = crops.subset(train_index), crops.subset(validation_index)

    resume_header = None
    if args.resume and checkpoint_path.exists():
        _, resume_header = read_checkpoint(checkpoint_path)

    if init is not None:
        preprocessing = init.preprocessing
    elif resume_header is not None and "preprocessing" in resume_header:
        preprocessing = Preprocessing.from_dict(resume_header["preprocessing"])
    else:
        preprocessing = fit_preprocessing(
            train_crops.images,
            train_crops.masks,
            downsample=args.downsample,
            intensity=args.intensity,
            mask_background=args.masked,
            crop_mode=args.crop_mode,
        )

    train_x, _ = preprocessing.prepare(train_crops.images, train_crops.masks)
    validation_x, validation_masks = (None, None)
    if len(validation_crops):
        validation_x, validation_masks = preprocessing.prepare(
            validation_crops.images, validation_crops.masks
        )

    seed_everything(args.seed)
    if init is not None:
        config_values = init.config.to_dict()
        config_values.update(likelihood=args.likelihood, radius=args.radius)
        model = SUPNVAE(ModelConfig.from_dict(config_values))
        model.encoder.load_state_dict(init.model.encoder.state_dict())
        model.mean_decoder.load_state_dict(init.model.mean_decoder.state_dict())
    else:
        model = SUPNVAE(
            ModelConfig(
                in_channels=preprocessing.num_channels,
                image_size=preprocessing.model_size,
                latent_size=args.latent_size,
                depth=args.depth,
                base_width=args.base_width,
                likelihood=args.likelihood,
                radius=args.radius,
                variance=args.variance,
            )
        )
    model.to(device)

    extra = {
        "preprocessing": preprocessing.to_dict(),
        "validation_names": validation_crops.names,
    }
    stage_summaries = dict(init.metadata.get("stages", {})) if init is not None else {}
    if resume_header is not None and resume_header.get("stage") == 2 and 1 in stages:
        logger.info("Checkpoint %s is already in stage 2; skipping stage 1", checkpoint_path)
        stage_summaries.update(resume_header.get("stage_summaries", {}))
        stages = [2]
    elif resume_header is not None:
        stage_summaries.update(resume_header.get("stage_summaries", {}))

    for stage in stages:
        resume_stage = (
            args.resume
            and checkpoint_path.exists()
            and read_checkpoint(checkpoint_path)[1].get("stage") == stage
        )
        result = train(
            model,
            train_x,
            training_config,
            stage,
            validation=validation_x,
            checkpoint_path=checkpoint_path,
            resume=resume_stage,
            device=device,
            checkpoint_extra={**extra, "stage_summaries": stage_summaries},
        )
        stage_summaries[str(stage)] = {
            "iterations": result.iterations,
            "wall_time_s": round(result.wall_time_s, 1),
            "batch_size": training_config.batch_size,
            "final_loss": result.final_loss,
            "final_validation_loss": result.validation_losses[-1][1] if result.validation_losses else None,
            "loss_curve": result.losses,
            "validation_curve": result.validation_losses,
        }
    if stages == [1] and args.likelihood != "spherical":
        logger.warning(
            "Only stage 1 ran: the %s likelihood decoder is untrained; run stage 2 with --init %s",
            args.likelihood,
            args.out,
        )

    scoring = {"samples": args.samples, "tile": args.tile, "mask_erosion": args.mask_erosion}
    metadata = {
        "napari_supn_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cell_diameter_px": preprocessing.cell_diameter,
        "masked_training_crops": preprocessing.mask_background,
        "training_data": {
            "folder": str(args.data),
            "crops": len(crops),
            "training_crops": len(train_crops),
            "validation_crops": len(validation_crops),
            "masks": crops.masks is not None,
            "validation_names": validation_crops.names,
        },
        "training_config": training_config.to_dict(),
        "stages": stage_summaries,
        "hardware": hardware_summary(device),
        "scoring": scoring,
    }
    if init is not None:
        metadata["initialised_from"] = str(args.init)

    # Write the trained model before scoring, so a failure while scoring loses no training.
    save_model(args.out, model, preprocessing, metadata)
    thresholds = _healthy_thresholds(model, validation_x, validation_masks, scoring, args.seed)
    if thresholds:
        metadata.update(thresholds)
        save_model(args.out, model, preprocessing, metadata)
    logger.info("Model written to %s; checkpoint kept at %s", args.out, checkpoint_path)
    return 0


def _healthy_thresholds(model, images, masks, scoring: dict, seed: int) -> dict:
    """Score held-out healthy crops; return quantiles and the default threshold."""
    import torch

    if images is None or images.shape[0] == 0:
        logger.warning("No held-out crops, so no healthy-score quantiles or threshold are stored")
        return {}
    try:
        from napari_supn.scoring import healthy_quantiles, score_crops
    except ImportError:
        logger.warning("napari_supn.scoring is not available; healthy-score quantiles not computed")
        return {}

    logger.info("Scoring %d held-out healthy crops for thresholds", images.shape[0])
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    scores = score_crops(
        model,
        images,
        masks,
        samples=scoring["samples"],
        tile=scoring["tile"],
        mask_erosion=scoring["mask_erosion"],
        generator=generator,
    )
    quantiles = healthy_quantiles(scores.cell_score, QUANTILE_LEVELS)
    threshold = quantiles[f"{DEFAULT_THRESHOLD_QUANTILE:g}"]
    logger.info("Healthy cell-score quantiles %s; default threshold %.4g", quantiles, threshold)
    return {
        "healthy_score_quantiles": quantiles,
        "threshold": threshold,
        "threshold_quantile": DEFAULT_THRESHOLD_QUANTILE,
        "healthy_scores_from": f"{images.shape[0]} held-out training crops",
    }
