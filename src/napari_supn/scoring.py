"""Anomaly scores and whitened-residual maps for preprocessed cell crops.

For a crop x and latent samples z_s ~ q(z | x), the decoder gives a mean
μ(z_s) and a precision factor L(z_s). The whitened residual
w_s = L(z_s)ᵀ (x − μ(z_s)) has one entry per pixel and channel, and
‖w_s‖² is the squared Mahalanobis distance of x under that sample. This
module computes, batched over cells and samples:

- ``whitened``: the per-pixel map mean_s Σ_c w_s², zero outside the cell mask;
- ``tiles``: that map summed over non-overlapping ``tile`` × ``tile`` pixels;
- ``cell_score``: the largest tile sum (the cell's anomaly score);
- ``distance``: the image-level expected squared Mahalanobis distance
  mean_s ‖w_s‖² over the whole crop, mask ignored.

All sizes are in model pixels, that is after the preprocessing's pooling:
with 128-px crops pooled by 2, a 4×4 tile covers 8×8 crop pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from napari_supn.progress import CancelCheck, ProgressCallback, check_cancel, report

logger = logging.getLogger("napari_supn")

DEFAULT_SAMPLES = 16
DEFAULT_TILE = 4
DEFAULT_RESTORATION_STEPS = 100
DEFAULT_RESTORATION_LR = 0.01


@dataclass
class CropScores:
    """Scores of N crops of size (h, w) in model pixels.

    Attributes
    ----------
    cell_score : ndarray, shape (N,)
        Largest tile sum of ``whitened`` inside the cell mask.
    distance : ndarray, shape (N,)
        Expected squared Mahalanobis distance of the whole crop.
    whitened : ndarray, shape (N, h, w)
        Mean over latent samples of the squared whitened residual summed over
        channels; zero outside the (eroded) cell mask when masks were given.
    tiles : ndarray, shape (N, ceil(h / tile), ceil(w / tile))
        Sums of ``whitened`` over tile × tile blocks.
    tile : int
        Tile side in model pixels.
    """

    cell_score: np.ndarray
    distance: np.ndarray
    whitened: np.ndarray
    tiles: np.ndarray
    tile: int

    def __len__(self) -> int:
        return int(self.cell_score.shape[0])


def erode_masks(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Erode boolean masks of shape (N, 1, h, w) by a square of half-side ``pixels``.

    Erosion keeps the cell's dark rim, where the model's residual is largest
    on healthy cells, out of the tiles. A mask that would vanish is kept
    unchanged, so every cell still gets a score.
    """
    if pixels <= 0:
        return masks
    size = 2 * pixels + 1
    background = (~masks).float()
    grown_background = F.max_pool2d(background, size, stride=1, padding=pixels)
    eroded = grown_background < 0.5
    empty = eroded.flatten(1).sum(dim=1) == 0
    eroded[empty] = masks[empty]
    return eroded


def tile_sums(maps: torch.Tensor, tile: int) -> torch.Tensor:
    """Sum maps of shape (N, h, w) over tile × tile blocks, zero-padding the edges."""
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    height, width = maps.shape[-2:]
    pad_bottom = (-height) % tile
    pad_right = (-width) % tile
    padded = F.pad(maps, (0, pad_right, 0, pad_bottom))
    return F.avg_pool2d(padded.unsqueeze(1), tile).squeeze(1) * (tile * tile)


def restore_latent(
    model: torch.nn.Module,
    images: torch.Tensor,
    z_init: torch.Tensor,
    *,
    steps: int = DEFAULT_RESTORATION_STEPS,
    lr: float = DEFAULT_RESTORATION_LR,
) -> torch.Tensor:
    """Refine latent codes by Adam on the negative log posterior of each crop.

    Minimises −log p(x | z) + ½‖z‖² for every crop in the batch at once
    (a maximum a posteriori code), starting from ``z_init``. Only ``z`` is
    optimised; the model weights receive no gradient.

    Parameters
    ----------
    images : Tensor, shape (B, C, h, w)
    z_init : Tensor, shape (B, latent_size)

    Returns
    -------
    Tensor, shape (B, latent_size), detached.
    """
    z = z_init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)

    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            mean = model.decode_mean(z)
            distribution = model.likelihood(z, mean)
            loss = -distribution.log_prob(images).sum() + 0.5 * (z * z).sum()
            loss.backward(inputs=[z])
            optimizer.step()

    return z.detach()


def _validate_inputs(
    images: torch.Tensor, masks: Optional[torch.Tensor], samples: int, tile: int
) -> None:
    if images.ndim != 4:
        raise ValueError(
            f"images must have shape (N, C, h, w), got {tuple(images.shape)}; "
            "prepare raw crops with the model's Preprocessing.prepare first"
        )
    if masks is not None and (
        masks.ndim != 4
        or masks.shape[0] != images.shape[0]
        or masks.shape[1] != 1
        or masks.shape[2:] != images.shape[2:]
    ):
        raise ValueError(
            f"masks must have shape {(images.shape[0], 1, *images.shape[2:])} to match "
            f"images {tuple(images.shape)}, got {tuple(masks.shape)}"
        )
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values; check the input crops")


@torch.no_grad()
def score_crops(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: Optional[torch.Tensor] = None,
    *,
    samples: int = DEFAULT_SAMPLES,
    tile: int = DEFAULT_TILE,
    mask_erosion: int = 0,
    restoration: bool = False,
    restoration_steps: int = DEFAULT_RESTORATION_STEPS,
    restoration_lr: float = DEFAULT_RESTORATION_LR,
    batch_size: int = 64,
    generator: Optional[torch.Generator] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCheck] = None,
) -> CropScores:
    """Score preprocessed crops with a trained model.

    Parameters
    ----------
    model : SUPNVAE
        Trained model; it is put in eval mode and must sit on the device
        where scoring should run. ``images`` and ``masks`` are moved there.
    images : Tensor, shape (N, C, h, w)
        Crops already prepared by the model's ``Preprocessing.prepare``.
    masks : bool Tensor, shape (N, 1, h, w), optional
        The cell's own pixels. Without masks the whole crop is tiled.
    samples : int
        Latent samples S per crop (default 16). Without restoration,
        z_s ~ q(z | x); with restoration all samples are the restored code,
        so S = 1 is used.
    tile : int
        Tile side in model pixels (default 4).
    mask_erosion : int
        Erode the masks by this many model pixels before tiling (default 0).
    restoration : bool
        Refine each latent code by gradient descent on the negative log
        posterior before scoring (``restoration_steps`` Adam steps at
        ``restoration_lr``).
    batch_size : int
        Crops per forward pass. Each pass decodes ``batch_size * samples``
        images.
    generator : torch.Generator, optional
        Source of the latent noise, for reproducible scores. Must live on
        the model's device.
    progress, cancel
        ``progress(done, total)`` after each batch; ``cancel()`` returning
        True raises :class:`napari_supn.progress.Cancelled`.

    Returns
    -------
    CropScores
    """
    _validate_inputs(images, masks, samples, tile)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    model.eval()
    device = next(model.parameters()).device
    total = images.shape[0]
    sample_count = 1 if restoration else samples

    cell_scores, distances, maps, tile_maps = [], [], [], []

    for start in range(0, total, batch_size):
        check_cancel(cancel, "scoring")
        batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
        batch_masks = None if masks is None else masks[start : start + batch_size].to(device)
        count = batch.shape[0]

        z_mean, z_logvar = model.encode(batch)
        if restoration:
            z = restore_latent(
                model, batch, z_mean, steps=restoration_steps, lr=restoration_lr
            ).unsqueeze(0)
        else:
            noise = torch.randn(
                (sample_count, *z_mean.shape),
                generator=generator,
                device=device,
                dtype=z_mean.dtype,
            )
            z = z_mean.unsqueeze(0) + noise * torch.exp(0.5 * z_logvar).unsqueeze(0)

        flat_z = z.reshape(sample_count * count, -1)
        mean = model.decode_mean(flat_z)
        distribution = model.likelihood(flat_z, mean)
        repeated = batch.unsqueeze(0).expand(sample_count, *batch.shape).reshape(mean.shape)
        whitened = distribution.whiten(repeated)

        squared = (whitened * whitened).sum(dim=1).reshape(sample_count, count, *batch.shape[2:])
        distance = squared.flatten(2).sum(dim=2).mean(dim=0)
        pixel_map = squared.mean(dim=0)

        if batch_masks is not None:
            eroded = erode_masks(batch_masks.bool(), mask_erosion)
            pixel_map = pixel_map * eroded[:, 0].to(pixel_map.dtype)

        tiles = tile_sums(pixel_map, tile)
        cell_scores.append(tiles.flatten(1).amax(dim=1).cpu())
        distances.append(distance.cpu())
        maps.append(pixel_map.cpu())
        tile_maps.append(tiles.cpu())

        report(progress, min(start + count, total), total)

    if total == 0:
        height, width = images.shape[2:]
        tiles_shape = (0, -(-height // tile), -(-width // tile))
        return CropScores(
            cell_score=np.zeros(0, np.float32),
            distance=np.zeros(0, np.float32),
            whitened=np.zeros((0, height, width), np.float32),
            tiles=np.zeros(tiles_shape, np.float32),
            tile=tile,
        )

    return CropScores(
        cell_score=torch.cat(cell_scores).numpy(),
        distance=torch.cat(distances).numpy(),
        whitened=torch.cat(maps).numpy(),
        tiles=torch.cat(tile_maps).numpy(),
        tile=tile,
    )


def stored_score_settings(metadata: dict) -> dict:
    """Return a model's stored score settings, with the package defaults for missing ones.

    Returns
    -------
    dict
        ``samples``, ``tile`` and ``mask_erosion`` as ints, read from
        ``metadata["scoring"]``; defaults 16, 4 and 0.
    """
    stored = metadata.get("scoring", {}) if isinstance(metadata, dict) else {}
    return {
        "samples": int(stored.get("samples", DEFAULT_SAMPLES)),
        "tile": int(stored.get("tile", DEFAULT_TILE)),
        "mask_erosion": int(stored.get("mask_erosion", 0)),
    }


def healthy_quantiles(
    scores: np.ndarray, levels: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99, 0.999)
) -> dict[str, float]:
    """Return score quantiles of healthy cells, keyed by level as a string ("0.99")."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("no healthy scores given; cannot compute thresholds")
    return {f"{level:g}": float(np.quantile(scores, level)) for level in levels}
