"""Evaluation on labelled crops (AUROC, AUPRC) and the synthetic ellipse experiment."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from napari_supn.preprocessing import check_intensity_units
from napari_supn.progress import CancelCheck, ProgressCallback
from napari_supn.scoring import DEFAULT_SAMPLES, DEFAULT_TILE, CropScores, score_crops

logger = logging.getLogger("napari_supn")


def ranking_metrics(healthy_scores: np.ndarray, anomalous_scores: np.ndarray) -> dict[str, float]:
    """Return AUROC and AUPRC with the anomalous class as positive.

    Raises
    ------
    ValueError
        If either group is empty or a score is not finite.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    healthy_scores = np.asarray(healthy_scores, dtype=np.float64)
    anomalous_scores = np.asarray(anomalous_scores, dtype=np.float64)
    if healthy_scores.size == 0 or anomalous_scores.size == 0:
        raise ValueError(
            f"need healthy and anomalous scores, got {healthy_scores.size} healthy and "
            f"{anomalous_scores.size} anomalous"
        )
    scores = np.concatenate([healthy_scores, anomalous_scores])
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    labels = np.concatenate([np.zeros(healthy_scores.size), np.ones(anomalous_scores.size)])
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
    }


@dataclass
class FolderScores:
    """Scores of one folder of crops: file names, cell scores and image-level distances."""

    names: list[str]
    scores: CropScores


@dataclass
class EvaluationResult:
    """Metrics of a healthy-vs-anomalous evaluation.

    ``auroc`` and ``auprc`` rank cells by ``cell_score`` (largest masked tile
    sum); ``distance_auroc`` and ``distance_auprc`` rank them by the
    image-level expected squared Mahalanobis distance.
    """

    auroc: float
    auprc: float
    distance_auroc: float
    distance_auprc: float
    n_healthy: int
    n_anomalous: int
    settings: dict = field(default_factory=dict)
    healthy: Optional[FolderScores] = None
    anomalous: Optional[FolderScores] = None

    def to_dict(self) -> dict:
        """Return the metrics and settings as a JSON-serialisable dict."""
        return {
            "auroc": self.auroc,
            "auprc": self.auprc,
            "distance_auroc": self.distance_auroc,
            "distance_auprc": self.distance_auprc,
            "n_healthy": self.n_healthy,
            "n_anomalous": self.n_anomalous,
            **self.settings,
        }


def masks_from_black_background(images: np.ndarray, threshold: float = 10) -> np.ndarray:
    """Derive cell masks from crops whose background outside the cell is black.

    A pixel is cell when its largest channel exceeds ``threshold`` (raw
    units). Holes are filled and only the largest connected component is
    kept.

    Parameters
    ----------
    images : ndarray, shape (N, H, W) or (N, H, W, 3)
        Raw crops.

    Returns
    -------
    ndarray of bool, shape (N, H, W)
    """
    from scipy import ndimage

    images = np.asarray(images)
    foreground = images.max(axis=-1) > threshold if images.ndim == 4 else images > threshold
    masks = np.zeros(foreground.shape, dtype=bool)
    for index, cell in enumerate(foreground):
        cell = ndimage.binary_fill_holes(cell)
        labels, count = ndimage.label(cell)
        if count > 1:
            sizes = ndimage.sum(cell, labels, index=np.arange(1, count + 1))
            cell = labels == 1 + int(np.argmax(sizes))
        masks[index] = cell
    return masks


def score_folder(
    loaded,
    folder: str | Path,
    *,
    use_masks: bool = True,
    samples: int = DEFAULT_SAMPLES,
    tile: int = DEFAULT_TILE,
    mask_erosion: int = 0,
    restoration: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCheck] = None,
) -> FolderScores:
    """Load, prepare and score every crop of a folder with a loaded model.

    ``folder`` uses the training-data layouts (a flat folder of images, or
    ``raw/`` and ``mask/`` subfolders); masks are used when present and
    ``use_masks`` is True.
    """
    from napari_supn.data import load_crops

    crops = load_crops(folder)
    check_intensity_units(crops.images, loaded.preprocessing, str(folder))
    masks = crops.masks if use_masks else None
    if masks is None and loaded.preprocessing.mask_background:
        # A flat folder of crops with a black background (such as the NIH
        # malaria crops) gives a masked model the masks it needs.
        masks = masks_from_black_background(crops.images)
        logger.info("No masks in %s: cell masks taken from the non-black pixels", folder)
    images, prepared_masks = loaded.preprocessing.prepare(crops.images, masks)

    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    scores = score_crops(
        loaded.model,
        images,
        prepared_masks,
        samples=samples,
        tile=tile,
        mask_erosion=mask_erosion,
        restoration=restoration,
        batch_size=batch_size,
        generator=generator,
        progress=progress,
        cancel=cancel,
    )
    logger.info("Scored %d crops from %s", len(scores), folder)
    return FolderScores(names=list(crops.names), scores=scores)


def evaluate_folders(
    loaded,
    healthy_folder: str | Path,
    anomalous_folder: str | Path,
    **score_options,
) -> EvaluationResult:
    """Score a healthy and an anomalous folder and compute AUROC and AUPRC.

    ``score_options`` go to :func:`score_folder` (samples, tile,
    mask_erosion, restoration, seed, batch_size, use_masks).
    """
    healthy = score_folder(loaded, healthy_folder, **score_options)
    anomalous = score_folder(loaded, anomalous_folder, **score_options)

    by_cell = ranking_metrics(healthy.scores.cell_score, anomalous.scores.cell_score)
    by_distance = ranking_metrics(healthy.scores.distance, anomalous.scores.distance)

    settings = {
        key: value
        for key, value in score_options.items()
        if key in {"samples", "tile", "mask_erosion", "restoration", "seed", "use_masks"}
    }
    return EvaluationResult(
        auroc=by_cell["auroc"],
        auprc=by_cell["auprc"],
        distance_auroc=by_distance["auroc"],
        distance_auprc=by_distance["auprc"],
        n_healthy=len(healthy.names),
        n_anomalous=len(anomalous.names),
        settings=settings,
        healthy=healthy,
        anomalous=anomalous,
    )


# --- Synthetic ellipse experiment -------------------------------------------------


def ellipse_mask(
    cell_mask: np.ndarray, rng: np.random.Generator, size_fraction: float = 0.35
) -> np.ndarray:
    """Draw a random ellipse inside a cell mask of shape (h, w).

    The ellipse is centred on a random pixel of the cell mask eroded by the
    ellipse's major semi-axis, so it lies inside the cell, with semi-axes
    ``size_fraction`` and half of that times the cell's equivalent radius
    and a random orientation.
    """
    from scipy import ndimage

    height, width = cell_mask.shape
    area = max(int(cell_mask.sum()), 1)
    radius = np.sqrt(area / np.pi)
    major = max(size_fraction * radius, 1.5)
    minor = max(0.5 * major, 1.0)

    inner = ndimage.binary_erosion(cell_mask, iterations=int(np.ceil(major)))
    candidates = np.argwhere(inner if inner.any() else cell_mask)
    if candidates.size == 0:
        candidates = np.array([[height // 2, width // 2]])
    centre_y, centre_x = candidates[rng.integers(len(candidates))]

    angle = rng.uniform(0, np.pi)
    rows, cols = np.mgrid[0:height, 0:width]
    dy, dx = rows - centre_y, cols - centre_x
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    return (along / major) ** 2 + (across / minor) ** 2 <= 1.0


def blend_ellipse(
    image: torch.Tensor,
    ellipse: np.ndarray,
    alpha: float,
    kind: str,
    rng: np.random.Generator,
    amplitude: float = 0.5,
) -> torch.Tensor:
    """Alpha-blend a noisy or smooth filling into a prepared image inside an ellipse.

    Works in model space (after blur and intensity scaling) so the
    preprocessing blur does not remove the noise. ``kind="noisy"`` fills the
    ellipse with the cell's mean there plus i.i.d. Gaussian noise of standard
    deviation ``amplitude``; ``kind="smooth"`` adds a smooth bump of peak
    ``amplitude`` (a Gaussian-blurred ellipse), a distortion of the same
    size without high frequencies.

    Parameters
    ----------
    image : Tensor, shape (C, h, w)
    ellipse : bool ndarray, shape (h, w)
    """
    from scipy import ndimage

    if kind not in {"noisy", "smooth"}:
        raise ValueError(f"kind must be 'noisy' or 'smooth', got {kind!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")

    original = image.detach().cpu().numpy().astype(np.float64)
    channels = original.shape[0]
    inside = ellipse.astype(bool)

    if kind == "noisy":
        filling = original.copy()
        for channel in range(channels):
            level = original[channel][inside].mean() if inside.any() else 0.0
            noise = rng.normal(0.0, amplitude, size=int(inside.sum()))
            filling[channel][inside] = level + noise
        weight = inside.astype(np.float64)
    else:
        bump = ndimage.gaussian_filter(inside.astype(np.float64), sigma=2.0)
        bump = bump / max(bump.max(), 1e-12)
        filling = original + amplitude * bump[None]
        weight = (bump > 0.05).astype(np.float64)

    blended = (1 - alpha * weight[None]) * original + alpha * weight[None] * filling
    return torch.from_numpy(blended.astype(np.float32))


def ellipse_experiment(
    loaded_models: dict,
    folder: str | Path,
    *,
    alphas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    kinds: tuple[str, ...] = ("noisy", "smooth"),
    max_images: int = 100,
    samples: int = 8,
    seed: int = 0,
    cancel: Optional[CancelCheck] = None,
) -> list[dict]:
    """Measure the expected squared Mahalanobis distance against blending strength.

    For every model in ``loaded_models`` (name → loaded model), every kind
    and every alpha, the same ellipses are blended into the same healthy
    crops and scored. Returns one row per (model, kind, alpha) with the mean
    and standard deviation of the image-level distance over the images.
    """
    from napari_supn.data import load_crops

    crops = load_crops(folder)
    count = min(max_images, len(crops.names))
    if count == 0:
        raise ValueError(f"no images found in {folder}")

    rows = []
    for name, loaded in loaded_models.items():
        images, masks = loaded.preprocessing.prepare(
            crops.images[:count], None if crops.masks is None else crops.masks[:count]
        )
        device = next(loaded.model.parameters()).device

        for kind in kinds:
            # Same ellipses and noise for every alpha and model of this kind.
            rng_shapes = np.random.default_rng(seed)
            ellipses = [
                ellipse_mask(
                    masks[index, 0].numpy() if masks is not None else np.ones(images.shape[2:], bool),
                    rng_shapes,
                )
                for index in range(count)
            ]
            for alpha in alphas:
                rng_fill = np.random.default_rng(seed + 1)
                blended = torch.stack(
                    [
                        blend_ellipse(images[index], ellipses[index], alpha, kind, rng_fill)
                        for index in range(count)
                    ]
                )
                generator = torch.Generator(device=device).manual_seed(seed)
                scores = score_crops(
                    loaded.model, blended, None, samples=samples, generator=generator, cancel=cancel
                )
                rows.append(
                    {
                        "model": name,
                        "kind": kind,
                        "alpha": float(alpha),
                        "mean_distance": float(np.mean(scores.distance)),
                        "std_distance": float(np.std(scores.distance)),
                        "n_images": count,
                    }
                )
                logger.info(
                    "ellipse %s %s alpha=%.1f: mean distance %.1f",
                    name,
                    kind,
                    alpha,
                    rows[-1]["mean_distance"],
                )
    return rows


def plot_ellipse_experiment(rows: list[dict], path: str | Path) -> None:
    """Plot mean distance against alpha, one panel per model, one line per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for axis, model_name in zip(axes[0], models):
        for kind in dict.fromkeys(row["kind"] for row in rows):
            selected = [row for row in rows if row["model"] == model_name and row["kind"] == kind]
            alphas = [row["alpha"] for row in selected]
            means = np.array([row["mean_distance"] for row in selected])
            spreads = np.array([row["std_distance"] for row in selected])
            axis.plot(alphas, means, marker="o", label=kind)
            axis.fill_between(alphas, means - spreads, means + spreads, alpha=0.2)
        axis.set_title(model_name)
        axis.set_xlabel("alpha (blending strength)")
        axis.set_ylabel("expected squared Mahalanobis distance")
        axis.set_yscale("log")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
