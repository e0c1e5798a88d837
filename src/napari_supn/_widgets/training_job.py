"""Train a model file from a folder, with progress, loss and cancel hooks (no napari, no Qt).

The Train widget runs :func:`run_training` in a worker thread. The steps
follow ``napari-supn train``. It reads healthy crops (or segments fields of
view and crops their cells), fits the preprocessing and holds out a
validation split. Then it runs stage 1 and stage 2 of
:func:`napari_supn.training.train`, scores the held-out crops for a default
threshold and writes one ``.supn`` file.

NOTE: this repeats the orchestration in ``napari_supn.cli.train.run``,
because that function has no progress or cancel hooks. Both should call
one library function once the training module offers it.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from napari_supn.progress import check_cancel

logger = logging.getLogger("napari_supn")

SOURCES = ("crops", "fields")

#: Quantile of held-out healthy scores stored as the default threshold.
THRESHOLD_QUANTILE = 0.99
QUANTILE_LEVELS = (0.5, 0.9, 0.95, 0.99, 0.999)


@dataclass
class TrainRequest:
    """Settings of one training run from the Train widget.

    Attributes
    ----------
    data : Path
        Folder of healthy crops (flat, or ``raw/`` + ``mask/``) when
        ``source`` is ``"crops"``; folder of field-of-view images when
        ``"fields"``.
    out : Path
        Model file to write; must end in ``.supn``. The checkpoint is
        ``out`` with ``.ckpt`` appended.
    source : str
        ``"crops"`` or ``"fields"``.
    drop_fraction : float
        Fields only: fraction of training crops with the largest stage-1
        reconstruction error removed before stage 2 (0 keeps all). Fields
        are not curated, so this drops crops that are likely not healthy
        single cells.
    crop_size : int
        Fields only: side of the square crops cut around each cell.
    segmenter, cellpose_model, diameter
        Fields only: passed to :func:`napari_supn.segmentation.segment`.
    """

    data: Path
    out: Path
    source: str = "crops"
    likelihood: str = "supn"
    radius: int = 1
    stage1_iterations: int = 6000
    stage2_iterations: int = 1500
    batch_size: int = 32
    device: str = "auto"
    downsample: int = 2
    depth: int = 4
    base_width: int = 16
    latent_size: int = 100
    fc_width: int = 300
    variance: float = 0.11
    drop_fraction: float = 0.0
    crop_size: int = 128
    segmenter: str = "auto"
    cellpose_model: Optional[str] = None
    diameter: Optional[float] = None
    validation_fraction: float = 0.1
    samples: int = 16
    tile: int = 4
    seed: int = 0
    extra_metadata: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.source not in SOURCES:
            raise ValueError(f"source must be 'crops' or 'fields', got {self.source!r}")
        if not Path(self.data).is_dir():
            raise ValueError(f"training folder not found: {self.data}")
        if Path(self.out).suffix != ".supn":
            raise ValueError(f"the output file must end in .supn, got {self.out}")
        if not 0 <= self.drop_fraction < 1:
            raise ValueError(f"drop fraction must lie in [0, 1), got {self.drop_fraction}")


@dataclass
class TrainOutcome:
    """Summary of the model file written by :func:`run_training`."""

    path: Path
    checkpoint: Path
    crops: int
    dropped: int
    threshold: Optional[float]
    losses: dict = field(default_factory=dict)


def crops_from_fields(request: TrainRequest, cancel: Callable[[], bool], stage: Callable[[str], None]):
    """Segment every image in ``request.data`` and cut one crop per cell.

    Returns
    -------
    CropSet
        Crops (N, crop_size, crop_size[, 3]) with their cell masks; names
        are ``<image stem>_<label>``.
    """
    from napari_supn.cells import iter_cell_batches
    from napari_supn.data import IMAGE_SUFFIXES, CropSet, read_image
    from napari_supn.preprocessing import Preprocessing
    from napari_supn.segmentation import segment

    files = sorted(path for path in Path(request.data).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {request.data}")

    images, masks, names = [], [], []
    for number, path in enumerate(files, start=1):
        check_cancel(cancel, "cropping fields")
        stage(f"segmenting field {number}/{len(files)}")
        image = read_image(path)
        channels = "rgb" if image.ndim == 3 else "grey"
        cutter = Preprocessing(channels=channels, crop_size=request.crop_size, downsample=request.downsample)
        labels = segment(
            image, method=request.segmenter, diameter=request.diameter, cellpose_model=request.cellpose_model
        ).labels
        for cells in iter_cell_batches(image, labels, cutter, batch_size=256):
            images.append(cells.images)
            masks.append(cells.masks)
            names += [f"{path.stem}_{int(label)}" for label in cells.labels]
    if not names:
        raise ValueError(f"no cells found in the {len(files)} images of {request.data}")
    return CropSet(np.concatenate(images), np.concatenate(masks).astype(bool), names, Path(request.data))


def reconstruction_errors(model, images, masks, batch_size: int = 64) -> np.ndarray:
    """Return each crop's mean squared error between it and its mean reconstruction (inside the mask)."""
    import torch

    device = next(model.parameters()).device
    errors = []
    model.eval()
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(device)
            z_mean, _ = model.encode(x)
            residual = (x - model.decode_mean(z_mean)) ** 2
            if masks is not None:
                weight = masks[start : start + batch_size].to(device).float()
                error = (residual * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp(min=1)
            else:
                error = residual.mean(dim=(1, 2, 3))
            errors.append(error.cpu().numpy())
    return np.concatenate(errors)


def run_training(
    request: TrainRequest,
    progress: Callable[[int, int], None],
    stage: Callable[[str], None],
    cancel: Callable[[], bool],
    loss: Optional[Callable[[tuple], None]] = None,
) -> TrainOutcome:
    """Train both stages and write the model file described by ``request``.

    ``progress(done, total)`` counts iterations over both stages, and
    ``loss((stage, iteration, value))`` reports training losses.
    ``cancel()`` stops after the current iteration. The checkpoint then
    contains the last completed step, and no model file is written.
    """
    import torch

    from napari_supn import __version__
    from napari_supn.data import load_crops
    from napari_supn.device import select_device
    from napari_supn.model import ModelConfig, SUPNVAE
    from napari_supn.model_file import save_model
    from napari_supn.preprocessing import fit_preprocessing
    from napari_supn.scoring import healthy_quantiles, score_crops
    from napari_supn.training import TrainingConfig, seed_everything, split_train_validation, train

    request.validate()
    device = select_device(request.device)
    out = Path(request.out)
    checkpoint = out.with_name(out.name + ".ckpt")

    stage("reading crops")
    if request.source == "crops":
        crops = load_crops(request.data)
    else:
        crops = crops_from_fields(request, cancel, stage)
    check_cancel(cancel, "training")

    config = TrainingConfig(
        stage1_iterations=request.stage1_iterations,
        stage2_iterations=request.stage2_iterations if request.likelihood != "spherical" else 0,
        batch_size=request.batch_size,
        seed=request.seed,
        validation_fraction=request.validation_fraction,
        checkpoint_every=max(1, min(500, request.stage1_iterations)),
        log_every=max(1, min(50, request.stage1_iterations)),
    )
    train_index, validation_index = split_train_validation(len(crops), config.validation_fraction, request.seed)
    train_crops, validation_crops = crops.subset(train_index), crops.subset(validation_index)

    preprocessing = fit_preprocessing(
        train_crops.images, train_crops.masks, downsample=request.downsample, crop_mode="centred"
    )
    train_x, train_masks = preprocessing.prepare(train_crops.images, train_crops.masks)
    validation_x, validation_masks = (None, None)
    if len(validation_crops):
        validation_x, validation_masks = preprocessing.prepare(validation_crops.images, validation_crops.masks)

    seed_everything(request.seed)
    model = SUPNVAE(
        ModelConfig(
            in_channels=preprocessing.num_channels,
            image_size=preprocessing.model_size,
            latent_size=request.latent_size,
            depth=request.depth,
            base_width=request.base_width,
            fc_width=request.fc_width,
            likelihood=request.likelihood,
            radius=request.radius,
            variance=request.variance,
        )
    ).to(device)

    stages = [1] if request.likelihood == "spherical" else [1, 2]
    total = sum(config.iterations(number) for number in stages)
    offsets = {1: 0, 2: config.stage1_iterations}
    report_every = max(1, total // 300)

    def on_iteration(stage_number: int, iteration: int, stage_total: int, value: float) -> None:
        done = offsets[stage_number] + iteration
        progress(done, total)
        if loss is not None and (iteration % report_every == 0 or iteration == stage_total):
            loss((stage_number, done, float(value)))

    summaries = {}
    dropped = 0
    for stage_number in stages:
        if stage_number == 2 and request.drop_fraction > 0:
            stage("dropping the most anomalous crops")
            errors = reconstruction_errors(model, train_x, train_masks)
            keep = errors <= np.quantile(errors, 1 - request.drop_fraction)
            dropped = int((~keep).sum())
            train_x = train_x[torch.from_numpy(keep)]
            logger.info("Dropped %d of %d training crops with the largest stage-1 error", dropped, keep.size)

        stage(f"stage {stage_number} of {len(stages)}")
        result = train(
            model,
            train_x,
            config,
            stage_number,
            validation=validation_x,
            progress=on_iteration,
            cancel=cancel,
            checkpoint_path=checkpoint,
            device=device,
            checkpoint_extra={"preprocessing": preprocessing.to_dict()},
        )
        summaries[str(stage_number)] = {
            "iterations": result.iterations,
            "wall_time_s": round(result.wall_time_s, 1),
            "batch_size": config.batch_size,
            "final_loss": result.final_loss,
            "loss_curve": result.losses,
        }

    stage("scoring held-out crops")
    scoring = {"samples": request.samples, "tile": request.tile, "mask_erosion": 0}
    metadata = {
        "napari_supn_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cell_diameter_px": preprocessing.cell_diameter,
        "training_data": {
            "folder": str(request.data),
            "source": request.source,
            "crops": len(crops),
            "training_crops": len(train_crops) - dropped,
            "dropped_after_stage1": dropped,
            "validation_crops": len(validation_crops),
            "masks": crops.masks is not None,
        },
        "training_config": config.to_dict(),
        "stages": summaries,
        "hardware": {"device": str(device), "torch_version": torch.__version__},
        "scoring": scoring,
        "trained_in": "napari widget",
        **request.extra_metadata,
    }

    threshold = None
    if validation_x is not None and validation_x.shape[0] > 0:
        generator = torch.Generator(device=device).manual_seed(request.seed)
        scores = score_crops(
            model, validation_x, validation_masks, samples=request.samples, tile=request.tile, generator=generator
        )
        quantiles = healthy_quantiles(scores.cell_score, QUANTILE_LEVELS)
        threshold = float(quantiles[f"{THRESHOLD_QUANTILE:g}"])
        metadata.update(
            healthy_score_quantiles=quantiles,
            threshold=threshold,
            threshold_quantile=THRESHOLD_QUANTILE,
            healthy_scores_from=f"{validation_x.shape[0]} held-out training crops",
        )

    save_model(out, model, preprocessing, metadata)
    return TrainOutcome(
        path=out,
        checkpoint=checkpoint,
        crops=len(crops),
        dropped=dropped,
        threshold=threshold,
        losses={number: summary["loss_curve"] for number, summary in summaries.items()},
    )
