"""One training run, from a folder to a ``.supn`` file, shared by the CLI and the Train dock.

:func:`fit_model` carries out the whole run behind ``napari-supn train``
and the "Train SUPN model" dock:

1. read healthy crops from a folder, or segment every field of view in a
   folder and cut one crop per cell;
2. hold out a validation split (or reuse the split of an initial model);
3. fit the preprocessing (or reuse it from the initial model or the
   checkpoint);
4. run stage 1 and stage 2 of :func:`napari_supn.training.train`, optionally
   dropping the training crops with the largest stage-1 reconstruction error
   before stage 2;
5. write the model file, then score the held-out crops and store their
   cell-score quantiles and a default threshold in it.

The module is napari-free. Progress, stage names, loss values and cancel go
through optional callbacks, so the CLI runs it without hooks and the Train
dock runs it in a worker thread.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from napari_supn.data import CropSet
from napari_supn.preprocessing import Preprocessing
from napari_supn.progress import CancelCheck, ProgressCallback, check_cancel

logger = logging.getLogger("napari_supn")

SOURCES = ("crops", "fields")
LIKELIHOODS = ("supn", "diagonal", "spherical")
STAGE_CHOICES = ("1", "2", "both")
SEGMENTERS = ("auto", "cellpose", "classical")

#: Quantile of the held-out healthy cell scores stored as the default threshold.
THRESHOLD_QUANTILE = 0.99
QUANTILE_LEVELS = (0.5, 0.9, 0.95, 0.99, 0.999)
#: Fewer held-out crops than this make the stored threshold a rough estimate (warned).
MIN_THRESHOLD_CROPS = 50

StageCallback = Callable[[str], None]
LossCallback = Callable[[tuple], None]


@dataclass
class FitRequest:
    """Settings of one training run.

    Attributes
    ----------
    data : Path
        Folder of healthy crops (flat, or ``raw/`` + ``mask/``) when
        ``source`` is ``"crops"``. Folder of field-of-view images when
        ``source`` is ``"fields"``.
    out : Path
        Model file to write; must end in ``.supn``.
    source : str
        ``"crops"`` or ``"fields"``.
    likelihood, radius, variance, downsample, depth, base_width, latent_size, fc_width
        Model settings (see :class:`napari_supn.model.ModelConfig`); with
        ``init`` only ``likelihood`` and ``radius`` apply.
    intensity : str
        ``"dtype"`` or ``"percentile"`` intensity range (see
        :func:`napari_supn.preprocessing.fit_preprocessing`).
    crop_mode : str
        ``"centred"`` or ``"bbox_resize"``. Fields are cut this way, and the
        model file stores it for scoring whole fields.
    masked : bool
        Set pixels outside the cell mask to −1 before blurring; needs masks.
    use_masks : bool
        Read ``mask/`` of a paired crop folder. False ignores it.
    stage : str or None
        ``"1"``, ``"2"`` or ``"both"``. None means both, stage 2 with
        ``init``, or stage 1 for a spherical likelihood.
    init : Path or None
        Existing model whose encoder, mean decoder, preprocessing and
        validation split are reused; only stage 2 runs.
    stage1_iterations, stage2_iterations, batch_size, off_diagonal_l1, rotations, validation_fraction
        Training settings (see :class:`napari_supn.training.TrainingConfig`).
    crop_size : int
        Fields only: side in pixels of the square crop cut around each cell.
    segmenter, cellpose_model, diameter
        Fields only: passed to :func:`napari_supn.segmentation.segment`.
    drop_fraction : float
        Fraction of training crops with the largest stage-1 reconstruction
        error removed before stage 2 (0 keeps all). Meant for uncurated
        crops such as those cut from fields, which may hold debris, clumps
        or sick cells.
    samples, tile, mask_erosion
        Settings for scoring the held-out crops, stored in the model file.
    checkpoint : Path or None
        Checkpoint file; None means ``out`` with ``.ckpt`` appended.
    checkpoint_every, log_every : int
        Iterations between checkpoints and between log lines.
    resume : bool
        Continue from the checkpoint when it exists.
    seed : int
        Seed of the weights, the split, the batches and the noise.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    threads : int or None
        torch CPU threads; None keeps torch's setting.
    extra_metadata : dict
        Entries added to the model file's metadata (e.g. ``trained_in``).
    """

    data: Path
    out: Path
    source: str = "crops"

    likelihood: str = "supn"
    radius: int = 1
    variance: float = 0.11
    downsample: int = 2
    depth: int = 4
    base_width: int = 16
    latent_size: int = 100
    fc_width: int = 300
    intensity: str = "dtype"
    crop_mode: str = "centred"
    masked: bool = False
    use_masks: bool = True

    stage: Optional[str] = None
    init: Optional[Path] = None
    stage1_iterations: int = 6000
    stage2_iterations: int = 1500
    batch_size: int = 32
    off_diagonal_l1: float = 100.0
    rotations: bool = False
    validation_fraction: float = 0.1

    crop_size: int = 128
    segmenter: str = "auto"
    cellpose_model: Optional[str] = None
    diameter: Optional[float] = None
    drop_fraction: float = 0.0

    samples: int = 16
    tile: int = 4
    mask_erosion: int = 0

    checkpoint: Optional[Path] = None
    checkpoint_every: int = 500
    log_every: int = 100
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    extra_metadata: dict = field(default_factory=dict)

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint file: ``checkpoint``, or ``out`` with ``.ckpt`` appended."""
        if self.checkpoint is not None:
            return Path(self.checkpoint)
        out = Path(self.out)
        return out.with_name(out.name + ".ckpt")

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.source not in SOURCES:
            raise ValueError(f"source must be 'crops' or 'fields', got {self.source!r}")
        if not Path(self.data).is_dir():
            raise ValueError(f"training folder not found: {self.data}")
        if Path(self.out).suffix != ".supn":
            raise ValueError(f"the output file must end in .supn, got {self.out}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}")
        if self.stage is not None and self.stage not in STAGE_CHOICES:
            raise ValueError(f"stage must be '1', '2' or 'both', got {self.stage!r}")
        if self.init is not None and not Path(self.init).is_file():
            raise ValueError(f"initial model not found: {self.init}")
        if self.masked and not self.use_masks:
            raise ValueError("masked training needs the cell masks, so it cannot also ignore them (use_masks=False)")
        if not 0 <= self.drop_fraction < 1:
            raise ValueError(f"drop fraction must lie in [0, 1), got {self.drop_fraction}")
        if self.segmenter not in SEGMENTERS:
            raise ValueError(f"segmenter must be one of {', '.join(SEGMENTERS)}, got {self.segmenter!r}")
        if self.crop_size < 1:
            raise ValueError(f"crop size must be a positive number of pixels, got {self.crop_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be ≥ 1, got {self.threads}")
        for name in ("stage1_iterations", "stage2_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")


@dataclass
class FitOutcome:
    """Summary of the model file written by :func:`fit_model`.

    Attributes
    ----------
    path : Path
        The model file.
    checkpoint : Path
        The checkpoint, kept after the run.
    crops : int
        Crops read or cut, before the validation split.
    dropped : int
        Training crops removed before stage 2.
    threshold : float or None
        Default threshold (0.99 quantile of the held-out cell scores), or
        None without held-out crops.
    losses : dict
        Stage number as a string ("1", "2") → list of (iteration, loss).
    metadata : dict
        The metadata stored in the model file.
    """

    path: Path
    checkpoint: Path
    crops: int
    dropped: int
    threshold: Optional[float]
    losses: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------
# Reading the training crops
# ----------------------------------------------------------------------------


def crops_from_fields(
    request: FitRequest,
    crop_size: int,
    crop_mode: str,
    device: Optional[torch.device] = None,
    cancel: Optional[CancelCheck] = None,
    stage: Optional[StageCallback] = None,
) -> tuple[CropSet, dict]:
    """Segment every image in ``request.data`` and cut one crop per cell.

    Centred crops are at the field's native scale. Every crop is rounded
    back to the field's dtype, so an 8-bit field gives 8-bit crops and the
    ``dtype`` intensity range stays 0–255.

    Returns
    -------
    crops : CropSet
        Crops (N, crop_size, crop_size) grey or (N, crop_size, crop_size, 3)
        RGB, with their cell masks; names are ``<image stem>_<label>``.
    summary : dict
        Segmentation facts for the model metadata.
    """
    from napari_supn.cells import iter_cell_batches
    from napari_supn.data import IMAGE_SUFFIXES, read_image
    from napari_supn.segmentation import segment

    folder = Path(request.data)
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")

    images, masks, names = [], [], []
    methods, diameters = set(), []
    first = None
    for number, path in enumerate(files, start=1):
        check_cancel(cancel, "cropping fields")
        if stage is not None:
            stage(f"segmenting field {number}/{len(files)}")
        image = read_image(path)
        if first is None:
            first = (path, image.ndim, image.dtype)
        elif (image.ndim, image.dtype) != first[1:]:
            raise ValueError(
                f"{path} is {'RGB' if image.ndim == 3 else 'grey'} {image.dtype}, but {first[0]} is "
                f"{'RGB' if first[1] == 3 else 'grey'} {first[2]}. Train on fields of one kind"
            )

        result = segment(
            image,
            method=request.segmenter,
            diameter=request.diameter,
            cellpose_model=request.cellpose_model,
            device=device,
        )
        methods.add(result.method)
        diameters.append(float(result.diameter))
        logger.info("%s: %s", path.name, result.message)

        # Only the crop size and mode matter for cutting. Without a cell
        # diameter, centred crops are not rescaled.
        cutter = Preprocessing(
            channels="rgb" if image.ndim == 3 else "grey", crop_size=crop_size, downsample=1, crop_mode=crop_mode
        )
        for cells in iter_cell_batches(image, result.labels, cutter):
            images.append(_to_dtype(cells.images, image.dtype))
            masks.append(cells.masks)
            names += [f"{path.stem}_{int(label)}" for label in cells.labels]

    if not names:
        raise ValueError(f"no cells found in the {len(files)} images of {folder}. Check the segmenter settings")
    logger.info("Cut %d cell crops from %d fields in %s", len(names), len(files), folder)

    summary = {
        "fields": len(files),
        "segmenter": request.segmenter,
        "segmenters_used": sorted(methods),
        "cellpose_model": request.cellpose_model,
        "diameter_px": request.diameter,
        "median_segmentation_diameter_px": float(np.median(diameters)),
        "crop_size": crop_size,
    }
    crops = CropSet(np.concatenate(images), np.concatenate(masks).astype(bool), names, folder)
    return crops, summary


def _to_dtype(images: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round interpolated float crops back to an integer field dtype; keep float fields as they are."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(images), info.min, info.max).astype(dtype)
    return images.astype(dtype, copy=False)


def reconstruction_errors(
    model, images: torch.Tensor, masks: Optional[torch.Tensor], batch_size: int = 64
) -> np.ndarray:
    """Return each crop's mean squared error against its mean reconstruction.

    Parameters
    ----------
    images : torch.Tensor
        Preprocessed crops, (batch, channels, height, width).
    masks : torch.Tensor or None
        Cell masks, (batch, 1, height, width); the mean runs over the cell
        pixels when given, over all pixels otherwise.

    Returns
    -------
    numpy.ndarray
        (batch,) errors computed from the latent mean, so they are
        deterministic.
    """
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


# ----------------------------------------------------------------------------
# Pieces of the run
# ----------------------------------------------------------------------------


def resolve_stages(request: FitRequest) -> list[int]:
    """Return the stages to run for ``request.stage``, ``request.init`` and the likelihood."""
    stage = request.stage
    if request.init is not None:
        if stage not in (None, "2"):
            raise ValueError("--init reuses a trained stage 1, so only --stage 2 is possible")
        if request.likelihood == "spherical":
            raise ValueError("--init runs stage 2, which a spherical model does not have")
        return [2]
    if request.likelihood == "spherical":
        if stage == "2":
            raise ValueError("a spherical model has no stage 2; use --stage 1")
        return [1]
    if stage == "2":
        raise ValueError("stage 2 needs a trained stage 1: pass --init MODEL.supn or use --stage both")
    return [1] if stage == "1" else [1, 2]


def _cpu_model() -> Optional[str]:
    """Return the CPU model name from /proc/cpuinfo (Linux), or None elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def hardware_summary(device: torch.device) -> dict:
    """Describe where training ran, for the model metadata."""
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


def _split(crops: CropSet, init, fraction: float, seed: int) -> tuple[CropSet, CropSet]:
    """Return (training, validation) crops; an initial model's held-out names win over a new split.

    Reusing the initial model's split keeps stage 2 and the score quantiles
    away from crops that stage 1 trained on.
    """
    from napari_supn.training import split_train_validation

    held_out_names = None
    if init is not None:
        held_out_names = init.metadata.get("training_data", {}).get("validation_names")
    if held_out_names is None:
        train_index, validation_index = split_train_validation(len(crops), fraction, seed)
        return crops.subset(train_index), crops.subset(validation_index)

    held_out = set(held_out_names)
    validation_index = [i for i, name in enumerate(crops.names) if name in held_out]
    train_index = [i for i, name in enumerate(crops.names) if name not in held_out]
    if len(validation_index) < len(held_out):
        logger.warning(
            "Only %d of the %d crops held out by the initial model are in %s",
            len(validation_index), len(held_out), crops.folder,
        )
    return crops.subset(train_index), crops.subset(validation_index)


def _load_model_weights(model, checkpoint_path: Path) -> None:
    """Load the model weights of a checkpoint, without the optimizer state."""
    from napari_supn.training import read_checkpoint

    tensors, _ = read_checkpoint(checkpoint_path)
    state = {name[len("model."):]: tensor for name, tensor in tensors.items() if name.startswith("model.")}
    model.load_state_dict(state, strict=True)


def _build_model(request: FitRequest, init, preprocessing: Preprocessing):
    """Build a fresh model, or one whose encoder and mean decoder are copied from ``init``."""
    from napari_supn.model import ModelConfig, SUPNVAE

    if init is not None:
        values = init.config.to_dict()
        values.update(likelihood=request.likelihood, radius=request.radius)
        model = SUPNVAE(ModelConfig.from_dict(values))
        model.encoder.load_state_dict(init.model.encoder.state_dict())
        model.mean_decoder.load_state_dict(init.model.mean_decoder.state_dict())
        return model
    return SUPNVAE(
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
    )


def healthy_thresholds(model, images, masks, scoring: dict, seed: int) -> dict:
    """Score held-out healthy crops; return their quantiles and the default threshold.

    Parameters
    ----------
    images : torch.Tensor or None
        Preprocessed held-out crops, (batch, channels, height, width).
    masks : torch.Tensor or None
        Their cell masks, (batch, 1, height, width).
    scoring : dict
        ``samples``, ``tile`` and ``mask_erosion`` for
        :func:`napari_supn.scoring.score_crops`.

    Returns
    -------
    dict
        Metadata entries ``healthy_score_quantiles``, ``threshold``,
        ``threshold_quantile`` and ``healthy_scores_from``; empty without
        held-out crops.
    """
    from napari_supn.scoring import healthy_quantiles, score_crops

    if images is None or images.shape[0] == 0:
        logger.warning("No held-out crops, so no healthy-score quantiles or threshold are stored")
        return {}

    logger.info("Scoring %d held-out healthy crops for thresholds", images.shape[0])
    if images.shape[0] < MIN_THRESHOLD_CROPS:
        logger.warning(
            "Only %d held-out crops set the threshold, so its %g quantile is a rough estimate; "
            "use more crops or a larger --validation-fraction, or run napari-supn calibrate "
            "on other healthy crops",
            images.shape[0],
            THRESHOLD_QUANTILE,
        )
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
    threshold = float(quantiles[f"{THRESHOLD_QUANTILE:g}"])
    logger.info("Healthy cell-score quantiles %s; default threshold %.4g", quantiles, threshold)
    return {
        "healthy_score_quantiles": quantiles,
        "threshold": threshold,
        "threshold_quantile": THRESHOLD_QUANTILE,
        "healthy_scores_from": f"{images.shape[0]} held-out training crops",
    }


def _drop_worst(model, train_x: torch.Tensor, train_masks, names: list[str], fraction: float):
    """Remove the ``fraction`` of crops with the largest reconstruction error; return (kept crops, dropped names)."""
    errors = reconstruction_errors(model, train_x, train_masks)
    keep = errors <= np.quantile(errors, 1 - fraction)
    dropped = [name for name, kept in zip(names, keep) if not kept]
    logger.info("Dropped %d of %d training crops with the largest stage-1 error", len(dropped), keep.size)
    return train_x[torch.from_numpy(keep)], dropped


def _read_crops(request: FitRequest, init, device, cancel, stage) -> tuple[CropSet, Optional[dict]]:
    """Read the crop folder, or cut crops from the fields; return (crops, segmentation summary or None).

    Fields are cut with the initial model's crop size and mode when there is one.
    """
    from napari_supn.data import load_crops

    segmentation = None
    if request.source == "crops":
        crops = load_crops(request.data, use_masks=request.use_masks)
    else:
        crop_size = init.preprocessing.crop_size if init is not None else request.crop_size
        crop_mode = init.preprocessing.crop_mode if init is not None else request.crop_mode
        crops, segmentation = crops_from_fields(request, crop_size, crop_mode, device, cancel, stage)
    if request.masked and crops.masks is None:
        raise ValueError(f"--masked needs cell masks, but {request.data} has no mask/ subfolder")
    return crops, segmentation


def _choose_preprocessing(request: FitRequest, init, resume_header, train_crops: CropSet) -> Preprocessing:
    """Return the initial model's preprocessing, else the resumed checkpoint's, else fit it to ``train_crops``."""
    from napari_supn.preprocessing import fit_preprocessing

    if init is not None:
        return init.preprocessing
    if resume_header is not None and "preprocessing" in resume_header:
        return Preprocessing.from_dict(resume_header["preprocessing"])
    return fit_preprocessing(
        train_crops.images,
        train_crops.masks,
        downsample=request.downsample,
        intensity=request.intensity,
        mask_background=request.masked,
        crop_mode=request.crop_mode,
    )


def _metadata(
    request: FitRequest,
    init,
    device,
    config,
    crops: CropSet,
    train_crops: CropSet,
    validation_crops: CropSet,
    dropped_names: list[str],
    segmentation: Optional[dict],
    preprocessing: Preprocessing,
    stage_summaries: dict,
) -> dict:
    """Assemble the model file's metadata, without the healthy-score entries."""
    from napari_supn import __version__

    training_data: dict[str, Any] = {
        "folder": str(request.data),
        "source": request.source,
        "crops": len(crops),
        "training_crops": len(train_crops) - len(dropped_names),
        "validation_crops": len(validation_crops),
        "masks": crops.masks is not None,
        "validation_names": validation_crops.names,
        "dropped_after_stage1": len(dropped_names),
        "dropped_names": dropped_names,
    }
    if segmentation is not None:
        training_data["segmentation"] = segmentation
    scoring = {"samples": request.samples, "tile": request.tile, "mask_erosion": request.mask_erosion}
    metadata = {
        "napari_supn_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cell_diameter_px": preprocessing.cell_diameter,
        "masked_training_crops": preprocessing.mask_background,
        "training_data": training_data,
        "training_config": config.to_dict(),
        "stages": stage_summaries,
        "hardware": hardware_summary(device),
        "scoring": scoring,
    }
    if init is not None:
        metadata["initialised_from"] = str(request.init)
    metadata.update(request.extra_metadata)

    return metadata


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def fit_model(
    request: FitRequest,
    progress: Optional[ProgressCallback] = None,
    stage: Optional[StageCallback] = None,
    cancel: Optional[CancelCheck] = None,
    loss: Optional[LossCallback] = None,
) -> FitOutcome:
    """Train the stages that ``request`` sets and write its model file.

    Parameters
    ----------
    request : FitRequest
        What to train on, how, and where to write it.
    progress : callable, optional
        ``progress(done, total)`` after every iteration, counting the
        iterations of all stages of this run.
    stage : callable, optional
        ``stage(name)`` when a step starts ("reading crops", "stage 1 of 2", …).
    cancel : callable, optional
        Polled while cutting fields and after every iteration. When it
        returns True the run stops: the checkpoint holds the last completed
        iteration, no model file is written and
        :class:`napari_supn.progress.Cancelled` is raised.
    loss : callable, optional
        ``loss((stage, iteration, value))`` about 300 times per run, with
        ``iteration`` counted over all stages of this run.

    Returns
    -------
    FitOutcome

    Raises
    ------
    ValueError
        For invalid settings or data; the message names the value.
    Cancelled
        When ``cancel()`` returned True.
    """
    from napari_supn.device import select_device
    from napari_supn.model_file import load_model, save_model
    from napari_supn.training import TrainingConfig, read_checkpoint, seed_everything, train

    def announce(name: str) -> None:
        logger.debug("Training step: %s", name)
        if stage is not None:
            stage(name)

    request.validate()
    if request.threads is not None:
        torch.set_num_threads(request.threads)
    device = select_device(request.device)
    out = Path(request.out)
    checkpoint_path = request.checkpoint_path
    if not request.resume and checkpoint_path.exists():
        # Starting afresh would overwrite the old checkpoint at the first save;
        # keep it next to the new one so an unfinished run is never lost.
        previous = checkpoint_path.with_name(checkpoint_path.name + ".previous")
        checkpoint_path.replace(previous)
        logger.warning(
            "Checkpoint %s exists and --resume was not given: moved it to %s and starting afresh",
            checkpoint_path,
            previous,
        )
    init = load_model(request.init) if request.init is not None else None
    stages = resolve_stages(request)
    for stage_number in stages:
        if getattr(request, f"stage{stage_number}_iterations") == 0:
            logger.warning(
                "Stage %d runs 0 iterations, so its part of the model stays untrained", stage_number
            )

    config = TrainingConfig(
        stage1_iterations=request.stage1_iterations,
        stage2_iterations=request.stage2_iterations if request.likelihood != "spherical" else 0,
        batch_size=request.batch_size,
        off_diagonal_l1=request.off_diagonal_l1,
        rotations=request.rotations,
        seed=request.seed,
        checkpoint_every=request.checkpoint_every,
        log_every=request.log_every,
        validation_fraction=request.validation_fraction,
    )

    announce("reading crops" if request.source == "crops" else "segmenting fields")
    crops, segmentation = _read_crops(request, init, device, cancel, stage)
    check_cancel(cancel, "training")
    train_crops, validation_crops = _split(crops, init, config.validation_fraction, request.seed)

    # Preprocessing: from the initial model, else from the checkpoint being resumed, else fitted.
    resume_header = None
    if request.resume and checkpoint_path.exists():
        _, resume_header = read_checkpoint(checkpoint_path)
    preprocessing = _choose_preprocessing(request, init, resume_header, train_crops)
    train_x, train_masks = preprocessing.prepare(train_crops.images, train_crops.masks)
    validation_x, validation_masks = (None, None)
    if len(validation_crops):
        validation_x, validation_masks = preprocessing.prepare(validation_crops.images, validation_crops.masks)

    seed_everything(request.seed)
    model = _build_model(request, init, preprocessing).to(device)

    # A checkpoint already in stage 2 means stage 1 is done.
    stage_summaries = dict(init.metadata.get("stages", {})) if init is not None else {}
    if resume_header is not None:
        stage_summaries.update(resume_header.get("stage_summaries", {}))
        if resume_header.get("stage") == 2 and 1 in stages:
            logger.info("Checkpoint %s is already in stage 2; skipping stage 1", checkpoint_path)
            stages = [2]

    total = sum(config.iterations(number) for number in stages)
    offsets = {
        number: sum(config.iterations(earlier) for earlier in stages[:index])
        for index, number in enumerate(stages)
    }
    report_every = max(1, total // 300)

    def on_iteration(stage_number: int, iteration: int, stage_total: int, value: float) -> None:
        done = offsets[stage_number] + iteration
        if progress is not None:
            progress(done, total)
        if loss is not None and (iteration % report_every == 0 or iteration == stage_total):
            loss((stage_number, done, float(value)))

    checkpoint_extra = {"preprocessing": preprocessing.to_dict(), "validation_names": validation_crops.names}
    dropped_names: list[str] = []
    for position, stage_number in enumerate(stages, start=1):
        resume_stage = (
            request.resume
            and checkpoint_path.exists()
            and read_checkpoint(checkpoint_path)[1].get("stage") == stage_number
        )
        if stage_number == 2 and request.drop_fraction > 0:
            announce("dropping the most anomalous crops")
            if resume_stage:
                # Stage 2 never changes the encoder or the mean decoder, so the
                # checkpoint's copies give the same errors as the interrupted run.
                _load_model_weights(model, checkpoint_path)
            train_x, dropped_names = _drop_worst(
                model, train_x, train_masks, train_crops.names, request.drop_fraction
            )

        announce(f"stage {stage_number} ({position} of {len(stages)})")
        result = train(
            model,
            train_x,
            config,
            stage_number,
            validation=validation_x,
            progress=on_iteration,
            cancel=cancel,
            checkpoint_path=checkpoint_path,
            resume=resume_stage,
            device=device,
            checkpoint_extra={**checkpoint_extra, "stage_summaries": stage_summaries},
        )
        stage_summaries[str(stage_number)] = {
            "iterations": result.iterations,
            "wall_time_s": round(result.wall_time_s, 1),
            "batch_size": config.batch_size,
            "final_loss": result.final_loss,
            "final_validation_loss": result.validation_losses[-1][1] if result.validation_losses else None,
            "loss_curve": result.losses,
            "validation_curve": result.validation_losses,
        }
    if stages == [1] and request.likelihood != "spherical":
        logger.warning(
            "Only stage 1 ran: the %s likelihood decoder is untrained; run stage 2 with --init %s",
            request.likelihood,
            out,
        )
    if request.drop_fraction > 0 and 2 not in stages:
        logger.warning("No stage 2 ran, so no crops were dropped (drop fraction %g)", request.drop_fraction)

    metadata = _metadata(
        request, init, device, config, crops, train_crops, validation_crops, dropped_names, segmentation,
        preprocessing, stage_summaries,
    )
    scoring = metadata["scoring"]

    # Write the trained model before scoring, so a failure while scoring loses no training.
    save_model(out, model, preprocessing, metadata)
    announce("scoring held-out crops")
    thresholds = healthy_thresholds(model, validation_x, validation_masks, scoring, request.seed)
    if thresholds:
        metadata.update(thresholds)
        save_model(out, model, preprocessing, metadata)
    logger.info("Model written to %s; checkpoint kept at %s", out, checkpoint_path)

    return FitOutcome(
        path=out,
        checkpoint=checkpoint_path,
        crops=len(crops),
        dropped=len(dropped_names),
        threshold=thresholds.get("threshold"),
        losses={number: summary["loss_curve"] for number, summary in stage_summaries.items()},
        metadata=metadata,
    )
