"""Segment red blood cells in a field of view into a label image.

Two segmenters share one entry point, :func:`segment`:

- ``"cellpose"`` runs a Cellpose 3 network from a local weights file. Nothing
  is ever downloaded: the file is resolved and checked here before Cellpose
  receives it, because Cellpose 3.1 silently downloads its default ``cyto3``
  weights when a ``pretrained_model`` path does not exist.
- ``"classical"`` uses scikit-image only: illumination correction, a
  threshold (Otsu, or per object above the background noise for
  fluorescence), hole filling, and a distance-transform watershed that
  splits touching cells.
- ``"auto"`` runs Cellpose when weights are available locally and the
  classical segmenter otherwise, and says which one ran in the result's
  message.

Both segmenters work on a single "cells bright" channel: RGB images are
projected onto their first principal colour component, and brightfield
images (cells darker than the background, as in Giemsa smears) are inverted.
"""

from __future__ import annotations

import logging
import os
import pathlib
import pickle
import urllib.error
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, segmentation, transform

from napari_supn.progress import ProgressCallback, report

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("napari_supn")

# Largest field accepted, in pixels. The classical segmenter keeps about ten
# float32/int32 copies of the field, roughly 40 bytes per pixel or 2 GB at
# this bound. Larger images should be cut into tiles first.
MAX_PIXELS = 50_000_000
MIN_SIDE = 16

MODELS_PATH_ENV = "CELLPOSE_LOCAL_MODELS_PATH"
DEFAULT_CELLPOSE_MODEL = "cyto3"
# Cellpose 3's own cache folder, used when the environment variable is unset.
CELLPOSE_DEFAULT_MODELS_DIR = pathlib.Path.home() / ".cellpose" / "models"

# Smallest cell diameter, in pixels: smaller estimates are raised to it, and
# a smaller given diameter is rejected.
MIN_DIAMETER = 6.0
# An estimated diameter above this fraction of the shorter image side is
# rejected: such a field would hold fewer than two cells across, so the
# estimate measured something else (usually the background).
MAX_ESTIMATE_FRACTION = 0.5

# Polarity detection (see detect_brightfield) shrinks the grey image so that
# its longer side becomes POLARITY_SIDE px, but by at most POLARITY_MAX_SHRINK,
# so a cell of 12 px still spans MIN_DIAMETER px. When the shrunk image is
# still wider than POLARITY_WINDOW px, at most POLARITY_WINDOWS_PER_AXIS²
# windows of that side, spread evenly over it, are scored instead of the
# whole image, which bounds the time on large fields.
POLARITY_SIDE = 512
POLARITY_MAX_SHRINK = 2.0
POLARITY_WINDOW = 640
POLARITY_WINDOWS_PER_AXIS = 2
# A class whose hole filling covers more than this fraction of the other
# class has the other class's objects as its holes, so it is the background.
MAX_ENCLOSED_FRACTION = 0.5

# Fluorescence thresholding (see _fluorescence_threshold): objects are
# detected this many background noise units above the background, and each
# is cut at this fraction of its median contrast.
FLUORESCENCE_DETECTION_SNR = 5.0
FLUORESCENCE_EDGE_FRACTION = 0.3
# Smallest object kept, as a fraction of the area of a cell of the
# estimated diameter. The fluorescence bound keeps isolated cells of about
# 0.4 diameters, as in the fluorescence sample field.
# Brightfield keeps 0.25: on the ten IML-Malaria Giemsa fields, 0.15 added
# 29 labels (fragments and debris) and one split without matching more cells.
MIN_AREA_FRACTION_BRIGHTFIELD = 0.25
MIN_AREA_FRACTION_FLUORESCENCE = 0.15

Method = Literal["auto", "cellpose", "classical"]
PathLike = Union[str, os.PathLike]


class CellposeWeightsError(FileNotFoundError, ValueError):
    """Raised when Cellpose weights are missing or cannot be loaded offline."""


@dataclass(frozen=True)
class SegmentationResult:
    """Output of :func:`segment`.

    Attributes
    ----------
    labels : np.ndarray, shape (height, width), int32
        0 for background, 1..n for cells, numbered consecutively.
    method : str
        ``"cellpose"`` or ``"classical"``: the segmenter that ran.
    message : str
        One sentence for the user: which segmenter ran, why, and how many
        cells it found.
    diameter : float
        Cell diameter in pixels that was used (given or estimated).
    brightfield : bool
        True when cells were treated as darker than the background.
    """

    labels: np.ndarray
    method: str
    message: str
    diameter: float
    brightfield: bool

    @property
    def n_cells(self) -> int:
        """Number of labelled cells."""
        return int(self.labels.max()) if self.labels.size else 0


# ---------------------------------------------------------------------------
# Input handling shared by both segmenters


def validate_image(image: np.ndarray) -> np.ndarray:
    """Check a field of view and return it as float32.

    Parameters
    ----------
    image : array-like, shape (height, width) or (height, width, 3)
        Grey or RGB image of any real numeric dtype.

    Returns
    -------
    np.ndarray, float32, same shape as ``image``.

    Raises
    ------
    ValueError
        For a wrong number of dimensions or channels, a non-numeric dtype,
        non-finite values, sides under 16 px or more than ``MAX_PIXELS``
        pixels.
    """
    array = np.asarray(image)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                   or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(
            f"image dtype {array.dtype} is not supported: pass integer or float "
            "intensities, e.g. image.astype(np.float32)"
        )

    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise ValueError(
            f"image shape {array.shape} is not (height, width) or (height, width, 3): "
            "pass one grey plane or an RGB image with channels last "
            "(drop alpha with image[..., :3]; move channels with np.moveaxis(image, 0, -1))"
        )

    height, width = array.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ValueError(
            f"image shape {array.shape} is too small: both sides must be at least "
            f"{MIN_SIDE} px"
        )
    if height * width > MAX_PIXELS:
        raise ValueError(
            f"image shape {array.shape} has {height * width} pixels, more than the "
            f"{MAX_PIXELS} this segmenter accepts: cut the field into tiles or "
            "downsample it first"
        )

    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError("image contains NaN or infinite values: replace them first, "
                         "e.g. np.nan_to_num(image)")
    return array


def to_grey(image: np.ndarray) -> np.ndarray:
    """Reduce a validated image to one channel scaled to about [0, 1].

    RGB pixels are projected onto their first principal colour component,
    the colour direction with the most variance, which in stained smears is
    the contrast between cells and background. The sign is chosen so that
    brighter RGB pixels stay brighter. The result is rescaled so that the
    0.5th and 99.5th percentiles map to 0 and 1.

    Parameters
    ----------
    image : np.ndarray, shape (height, width) or (height, width, 3), float32

    Returns
    -------
    np.ndarray, shape (height, width), float32
    """
    if image.ndim == 3:
        pixels = image.reshape(-1, 3).astype(np.float64)
        sample = pixels[:: max(1, len(pixels) // 200_000)]
        centred = sample - sample.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        direction = vt[0]
        if direction.sum() < 0:
            direction = -direction
        grey = (image @ direction.astype(np.float32)).astype(np.float32)
    else:
        grey = image.astype(np.float32, copy=True)

    low, high = np.percentile(grey, [0.5, 99.5])
    if high - low <= 0:
        return np.zeros_like(grey)
    return (grey - low) / (high - low)


def _objectness(mask: np.ndarray) -> float:
    """Score how much a binary class looks like separate round cells, in [0, 1].

    The class is split with the same watershed as the classical segmenter,
    at a diameter estimated from the class itself, and the score is the
    area-weighted mean solidity of the pieces. Cells give convex pieces
    (solidity near 1); the background between cells gives concave pieces.
    The score is 0 for a class whose estimated diameter exceeds the shorter
    image side, because no cell can be wider than the image. It is also 0
    for a class whose hole filling covers more than
    ``MAX_ENCLOSED_FRACTION`` of the other class: filling the central
    pallor of cells covers a small part of the background, but filling the
    holes of the background covers the cells themselves, and the filled
    background would then look like one convex cell.
    """
    diameter = estimate_diameter(ndi.binary_fill_holes(mask))
    if diameter is None or diameter > min(mask.shape):
        return 0.0

    diameter = max(diameter, MIN_DIAMETER)
    cell_area = np.pi * (diameter / 2) ** 2
    filled = morphology.remove_small_holes(mask, max_size=int(0.5 * cell_area))
    other_area = int(mask.size - np.count_nonzero(mask))
    enclosed_area = int(np.count_nonzero(filled) - np.count_nonzero(mask))
    if other_area and enclosed_area > MAX_ENCLOSED_FRACTION * other_area:
        return 0.0

    pieces = measure.regionprops(_split_touching(filled, diameter))
    kept = [piece for piece in pieces if piece.area >= 0.25 * cell_area]
    if not kept:
        return 0.0
    areas = np.array([piece.area for piece in kept], dtype=np.float64)
    solidities = np.array([piece.solidity for piece in kept])
    return float((areas * solidities).sum() / areas.sum())


def _polarity_windows(shape: tuple[int, int]) -> list[tuple[slice, slice]]:
    """Return the windows of a shrunk grey image that polarity detection scores.

    One window covering the whole image when both sides are at most
    ``POLARITY_WINDOW`` px, otherwise up to ``POLARITY_WINDOWS_PER_AXIS``
    windows of that side per axis, evenly spaced from edge to edge.
    """
    spans_per_axis = []
    for side in shape:
        if side <= POLARITY_WINDOW:
            spans_per_axis.append([(0, side)])
            continue
        starts = np.linspace(0, side - POLARITY_WINDOW, POLARITY_WINDOWS_PER_AXIS)
        spans_per_axis.append([(round(start), round(start) + POLARITY_WINDOW)
                               for start in starts])
    return [(slice(*rows), slice(*cols))
            for rows in spans_per_axis[0] for cols in spans_per_axis[1]]


def detect_brightfield(image: np.ndarray) -> bool:
    """Guess whether cells are darker than the background.

    The grey image (see :func:`to_grey`) is shrunk so that its longer side
    becomes ``POLARITY_SIDE`` (512) px, but by at most a factor of
    ``POLARITY_MAX_SHRINK`` (2), so that cells keep their shape on large
    fields. It is split into a bright and a dark class by Otsu's threshold.
    Each class is then scored by how much it looks like separate round
    cells (:func:`_objectness`: solidity of its watershed pieces), and the
    class with the higher score is taken to be the cells. On a shrunk image
    wider than ``POLARITY_WINDOW`` (640) px the scores are averaged over up
    to 4 windows of that side (see :func:`_polarity_windows`). This works in
    dense fields where cells cover more area than the background. When the
    two scores are within 0.02, the background is taken to be the class
    that contains the tallest histogram peak, because a background is flat
    while cell pixels spread over a wider range.

    Parameters
    ----------
    image : np.ndarray, shape (height, width) or (height, width, 3), float32
        Validated image (see :func:`validate_image`).

    Returns
    -------
    bool
        True for brightfield (dark cells on a bright background).
    """
    grey = to_grey(image)
    factor = min(max(grey.shape) / POLARITY_SIDE, POLARITY_MAX_SHRINK)
    if factor > 1:
        small_shape = (round(grey.shape[0] / factor), round(grey.shape[1] / factor))
        grey = transform.resize(grey, small_shape, anti_aliasing=True)
    smooth = filters.gaussian(grey, sigma=1.0)
    threshold = filters.threshold_otsu(smooth)
    bright = smooth > threshold

    windows = _polarity_windows(bright.shape)
    bright_score = float(np.mean([_objectness(bright[window]) for window in windows]))
    dark_score = float(np.mean([_objectness(~bright[window]) for window in windows]))
    logger.debug("Cell-likeness of the bright class %.3f, of the dark class %.3f "
                 "(%d windows, shrunk by %.2f)",
                 bright_score, dark_score, len(windows), max(factor, 1.0))
    if abs(bright_score - dark_score) > 0.02:
        return dark_score > bright_score

    counts, edges = np.histogram(np.clip(smooth, 0, 1), bins=64, range=(0, 1))
    counts = ndi.uniform_filter1d(counts.astype(np.float64), size=3)
    mode = 0.5 * (edges[np.argmax(counts)] + edges[np.argmax(counts) + 1])
    return bool(mode > threshold)


def estimate_diameter(foreground: np.ndarray) -> Optional[float]:
    """Estimate the typical cell diameter from a foreground mask.

    Connected components of 20 px or more are used. Components whose
    moments are nearly round (eccentricity below 0.6) are taken to be single
    cells, and the estimate is the median diameter of the disk with the
    area of their convex hull. The hull makes a cell whose pale centre fell
    below the threshold count at full size. Touching cells form elongated
    components and are skipped. When fewer than 3 round components exist,
    the estimate is twice the median height of the local maxima of the
    Euclidean distance transform that are at least ``MIN_DIAMETER / 2``
    high: each cell of a cluster gives one such maximum, about one cell
    radius high.

    Parameters
    ----------
    foreground : np.ndarray, shape (height, width), bool

    Returns
    -------
    float or None
        Diameter in pixels, or None when the mask has no component of 20 px
        or more.
    """
    components = measure.label(foreground)
    regions = [region for region in measure.regionprops(components) if region.area >= 20]
    if not regions:
        return None

    round_diameters = [np.sqrt(4 * region.area_convex / np.pi)
                       for region in regions if region.eccentricity < 0.6]
    if len(round_diameters) >= 3:
        return float(np.median(round_diameters))

    distance = ndi.distance_transform_edt(foreground)
    peaks = feature.peak_local_max(distance, min_distance=3, threshold_abs=MIN_DIAMETER / 2,
                                   exclude_border=False)
    if len(peaks) == 0:
        return float(2.0 * distance.max())
    return float(2.0 * np.median(distance[tuple(peaks.T)]))


# ---------------------------------------------------------------------------
# Classical segmenter


def _correct_illumination(cells_bright: np.ndarray, diameter: float) -> np.ndarray:
    """Subtract a smooth background estimated by a grey opening wider than a cell.

    The opening (disk of radius one cell diameter) removes every bright
    structure narrower than two cells and keeps the slowly varying
    background. It runs on a copy downsampled so that a cell spans about 8
    px, then is smoothed and resized back.
    """
    factor = max(1.0, diameter / 8.0)
    small_shape = (max(4, round(cells_bright.shape[0] / factor)),
                   max(4, round(cells_bright.shape[1] / factor)))
    source = cells_bright
    if factor > 16:
        # The anti-aliasing Gaussian of resize would be over 30 px wide and
        # take seconds on a large field, so block means do most of the
        # shrinking first. Trimming the last partial blocks shifts the
        # background by less than a quarter of a small pixel.
        block = int(factor // 4)
        height, width = cells_bright.shape
        trimmed = cells_bright[:height - height % block, :width - width % block]
        source = transform.downscale_local_mean(trimmed, (block, block))
    small = transform.resize(source, small_shape, anti_aliasing=True)

    radius = max(1, round(diameter / factor))
    background = morphology.opening(small, morphology.disk(radius))
    background = filters.gaussian(background, sigma=radius)
    background = transform.resize(background, cells_bright.shape, order=1)
    return (cells_bright - background).astype(np.float32)


def _foreground_mask(corrected: np.ndarray, diameter: Optional[float],
                     brightfield: bool = True) -> np.ndarray:
    """Threshold a "cells bright" image and fill central holes.

    Brightfield images and the first pass before the diameter is known use
    Otsu's threshold. Fluorescence images with a known diameter use
    :func:`_fluorescence_threshold`, which also keeps cells too dim for Otsu.
    """
    sigma = 1.0 if diameter is None else max(1.0, diameter / 40.0)
    smooth = filters.gaussian(corrected, sigma=sigma)
    if diameter is None or brightfield:
        mask = smooth > filters.threshold_otsu(smooth)
    else:
        mask = _fluorescence_threshold(corrected, smooth, diameter)

    if diameter is None:
        return ndi.binary_fill_holes(mask)

    # Fill holes up to half a cell's area (the central pallor of a
    # biconcave cell) but keep larger background regions that a ring of
    # touching cells encloses.
    cell_area = np.pi * (diameter / 2) ** 2
    mask = morphology.remove_small_holes(mask, max_size=int(0.5 * cell_area))
    mask = ndi.binary_opening(mask, morphology.disk(max(1, round(diameter / 20))))
    return mask


def _background_statistics(values: np.ndarray) -> tuple[float, float]:
    """Return the level and noise of the background pixels among ``values``.

    A sigma-clipped median and scaled median absolute deviation: values more
    than 3 noise units from the median are dropped until none are, so dim
    cells and the halos of bright ones that fall below Otsu's threshold do
    not inflate the noise.
    """
    for _ in range(10):
        level = float(np.median(values))
        noise = 1.4826 * float(np.median(np.abs(values - level)))
        kept = values[np.abs(values - level) < 3 * noise]
        if noise == 0 or len(kept) == len(values):
            break
        values = kept
    return level, noise


def _fluorescence_threshold(corrected: np.ndarray, smooth: np.ndarray,
                            diameter: float) -> np.ndarray:
    """Threshold a fluorescence image object by object, dim cells included.

    Otsu's threshold sits between the dark background and the typical cell,
    so cells a few grey levels above the background fall below it. Here
    objects are detected where the image smoothed at diameter/16 exceeds
    the background by ``FLUORESCENCE_DETECTION_SNR`` noise units (level and
    noise from :func:`_background_statistics` on the pixels below Otsu).
    Each detected object is then cut at ``FLUORESCENCE_EDGE_FRACTION`` of
    its own median height above the background, so the edge of a bright
    cell and of a dim cell both sit at the same fraction of their
    contrast. That cut uses ``smooth`` (the fine-scale image), except for
    objects whose cut level lies within the detection margin of the
    fine-scale noise, where it uses the coarse image instead.

    Parameters
    ----------
    corrected : np.ndarray, shape (height, width), float32
        Illumination-corrected "cells bright" image.
    smooth : np.ndarray, shape (height, width)
        ``corrected`` smoothed at the fine scale (diameter/40).
    diameter : float
        Cell diameter in pixels.

    Returns
    -------
    np.ndarray, shape (height, width), bool
    """
    otsu = filters.threshold_otsu(smooth)
    coarse = filters.gaussian(corrected, sigma=max(1.0, diameter / 16.0))
    background, coarse_noise = _background_statistics(coarse[coarse < otsu])
    _, fine_noise = _background_statistics(smooth[smooth < otsu])

    detection_level = min(otsu, background + FLUORESCENCE_DETECTION_SNR * coarse_noise)
    objects, n_objects = ndi.label(coarse > detection_level)
    if n_objects == 0:
        return np.zeros(corrected.shape, bool)

    medians = np.asarray(ndi.median(smooth, objects, np.arange(1, n_objects + 1)))
    cut_levels = background + FLUORESCENCE_EDGE_FRACTION * (medians - background)
    cut_levels = np.minimum(cut_levels, otsu)
    dim = cut_levels < background + FLUORESCENCE_DETECTION_SNR * fine_noise
    logger.debug("Fluorescence threshold: background %.4f, noise %.5f, %d objects, %d dim",
                 background, coarse_noise, n_objects, int(dim.sum()))

    # Index 0 (outside every object) gets an infinite level, so it stays background.
    cut_level_map = np.concatenate([[np.inf], cut_levels])[objects]
    dim_map = np.concatenate([[False], dim])[objects]
    return (smooth > cut_level_map) | (dim_map & (coarse > cut_level_map))


def _split_touching(mask: np.ndarray, diameter: float) -> np.ndarray:
    """Split a foreground mask into cells with a distance-transform watershed.

    Markers are maxima of the smoothed distance transform at least 0.35
    diameters apart and at least 0.2 diameters deep, one per cell for
    roughly round cells, plus the deepest point of every connected component
    that has no such maximum.
    """
    distance = ndi.distance_transform_edt(mask)
    distance = filters.gaussian(distance, sigma=max(1.0, diameter / 16.0))
    components = measure.label(mask)

    peaks = feature.peak_local_max(
        distance,
        min_distance=max(1, round(0.35 * diameter)),
        threshold_abs=0.2 * diameter,
        labels=components,
        exclude_border=False,
    )
    # A component with no maximum that deep (a cell smaller than the typical
    # one) is seeded at its deepest point, so it is kept as one cell instead
    # of being dropped.
    seeded = np.zeros(components.max() + 1, bool)
    seeded[components[tuple(peaks.T)]] = True
    unseeded = np.flatnonzero(~seeded[1:]) + 1
    if len(unseeded):
        extra = np.array(ndi.maximum_position(distance, components, unseeded)).reshape(-1, 2)
        peaks = np.concatenate([peaks, extra.astype(peaks.dtype)])

    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)

    return segmentation.watershed(-distance, markers, mask=mask).astype(np.int32)


def _filter_sizes(labels: np.ndarray, diameter: float, min_fraction: float) -> np.ndarray:
    """Drop labels under ``min_fraction`` of a cell's area and renumber 1..n."""
    min_area = min_fraction * np.pi * (diameter / 2) ** 2
    areas = np.bincount(labels.ravel())
    small = np.flatnonzero(areas < min_area)
    labels = labels.copy()
    labels[np.isin(labels, small[small != 0])] = 0
    relabelled, _, _ = segmentation.relabel_sequential(labels)
    return relabelled.astype(np.int32)


def _cells_bright(image: np.ndarray, brightfield: Optional[bool]) -> tuple[np.ndarray, bool]:
    """Return the grey image with cells bright, and the polarity used."""
    grey = to_grey(image)
    if brightfield is None:
        brightfield = detect_brightfield(image)
        logger.info("Detected %s polarity (cells %s than the background)",
                    "brightfield" if brightfield else "fluorescence",
                    "darker" if brightfield else "brighter")
    return (1.0 - grey if brightfield else grey).astype(np.float32), bool(brightfield)


def _resolve_diameter(cells_bright: np.ndarray, diameter: Optional[float]) -> float:
    """Check a given diameter, or estimate one from a first Otsu mask.

    Raises
    ------
    ValueError
        For a given diameter outside [``MIN_DIAMETER``, shorter image side],
        or an estimate above ``MAX_ESTIMATE_FRACTION`` of the shorter side.
    """
    max_diameter = float(min(cells_bright.shape))
    if diameter is not None:
        if not (np.isfinite(diameter) and MIN_DIAMETER <= diameter <= max_diameter):
            raise ValueError(
                f"diameter {diameter} px is outside [{MIN_DIAMETER}, {max_diameter:.0f}] "
                f"for an image of shape {cells_bright.shape}: pass the typical cell "
                "diameter in pixels, or leave it out (--diameter unset, diameter=None) to estimate it"
            )
        return float(diameter)

    # Correct only very slow illumination before the first estimate.
    coarse = _correct_illumination(cells_bright, diameter=max_diameter / 2)
    estimate = estimate_diameter(_foreground_mask(coarse, diameter=None))
    if estimate is None:
        logger.warning("Could not estimate the cell diameter: no foreground found; "
                       "using %.0f px", 4 * MIN_DIAMETER)
        return 4 * MIN_DIAMETER
    largest_plausible = MAX_ESTIMATE_FRACTION * max_diameter
    if estimate > largest_plausible:
        raise ValueError(
            f"estimated cell diameter {estimate:.0f} px is more than half the shorter "
            f"side of the image ({cells_bright.shape[0]}×{cells_bright.shape[1]} px), so "
            "the estimate is not a cell size (the background may have been taken for "
            "cells): pass the typical cell diameter in pixels (--diameter on the command "
            "line, 'Cell diameter' in the Find dock, diameter= in Python, where "
            "brightfield= also sets the polarity)"
        )
    estimate = max(estimate, MIN_DIAMETER)
    logger.info("Estimated cell diameter %.1f px", estimate)
    return estimate


def segment_classical(
    image: np.ndarray,
    diameter: Optional[float] = None,
    brightfield: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
) -> SegmentationResult:
    """Segment cells with scikit-image: threshold, fill holes, watershed.

    Steps: reduce to one "cells bright" channel (see :func:`to_grey` and
    :func:`detect_brightfield`), subtract a background estimated by a grey
    opening wider than a cell, threshold (Otsu for brightfield, a per-object
    threshold above the background noise for fluorescence, see
    :func:`_fluorescence_threshold`), fill holes smaller than half a cell
    (central pallor), split touching cells by a watershed on the distance
    transform seeded at its maxima, and drop objects smaller than a quarter
    of a cell's area (0.15 of it for fluorescence).

    Parameters
    ----------
    image : np.ndarray, shape (height, width) or (height, width, 3)
        Field of view, any real dtype.
    diameter : float, optional
        Typical cell diameter in pixels. When None it is estimated with
        :func:`estimate_diameter` on a first Otsu mask.
    brightfield : bool, optional
        True when cells are darker than the background; None detects it.
    progress : callable, optional
        Called as ``progress(done, total)`` after each of the 5 steps.

    Returns
    -------
    SegmentationResult
    """
    total_steps = 5
    image = validate_image(image)
    if _is_uniform(image):
        return _uniform_result(image, "classical", diameter, brightfield)
    cells_bright, brightfield = _cells_bright(image, brightfield)
    report(progress, 1, total_steps)

    diameter = _resolve_diameter(cells_bright, diameter)
    report(progress, 2, total_steps)

    corrected = _correct_illumination(cells_bright, diameter)
    mask = _foreground_mask(corrected, diameter, brightfield)
    report(progress, 3, total_steps)

    labels = _split_touching(mask, diameter)
    report(progress, 4, total_steps)

    min_fraction = MIN_AREA_FRACTION_BRIGHTFIELD if brightfield else MIN_AREA_FRACTION_FLUORESCENCE
    labels = _filter_sizes(labels, diameter, min_fraction)
    report(progress, 5, total_steps)

    n_cells = int(labels.max())
    polarity = "brightfield" if brightfield else "fluorescence"
    message = (f"Classical segmentation found {n_cells} cells "
               f"({polarity} polarity, diameter {diameter:.0f} px).")
    _log_result(n_cells, message)
    return SegmentationResult(labels, "classical", message, diameter, brightfield)


def _is_uniform(image: np.ndarray) -> bool:
    return bool(image.max() == image.min())


def _uniform_result(image: np.ndarray, method: str, diameter: Optional[float],
                    brightfield: Optional[bool]) -> SegmentationResult:
    """Return an empty result for an image with one intensity (nothing to segment)."""
    message = "The image has a single intensity value, so it contains no cells."
    _log_result(0, message)
    labels = np.zeros(image.shape[:2], np.int32)
    return SegmentationResult(labels, method, message, float(diameter or 0.0), bool(brightfield))


def _log_result(n_cells: int, message: str) -> None:
    if n_cells == 0:
        logger.warning("No cells found. %s", message)
    else:
        logger.info(message)


# ---------------------------------------------------------------------------
# Cellpose


def cellpose_models_dir() -> pathlib.Path:
    """Return the folder searched for Cellpose weights given by name.

    That is ``$CELLPOSE_LOCAL_MODELS_PATH`` when set, else Cellpose 3's
    default cache folder ``~/.cellpose/models``.
    """
    configured = os.environ.get(MODELS_PATH_ENV)
    return pathlib.Path(configured) if configured else CELLPOSE_DEFAULT_MODELS_DIR


def _how_to_get_weights(name: str) -> str:
    return (
        f"download the Cellpose 3 '{name}' weights on a machine with network access "
        f"(https://www.cellpose.org/models/{name}), copy the file to this machine, and "
        f"pass its path or put it in the folder named by ${MODELS_PATH_ENV}"
    )


def find_cellpose_weights(cellpose_model: Optional[PathLike] = None) -> Optional[pathlib.Path]:
    """Resolve a Cellpose weights file that exists on disk, without downloading.

    Parameters
    ----------
    cellpose_model : str or path, optional
        A weights file, or a bare model name such as ``"cyto3"`` looked up
        in :func:`cellpose_models_dir`. None looks for ``cyto3`` there.

    Returns
    -------
    pathlib.Path or None
        The weights file, or None when ``cellpose_model`` is None and no
        default weights are present.

    Raises
    ------
    CellposeWeightsError
        When ``cellpose_model`` is given but no such file exists (it is a
        subclass of both FileNotFoundError and ValueError).
    """
    models_dir = cellpose_models_dir()
    if cellpose_model is None:
        candidate = models_dir / DEFAULT_CELLPOSE_MODEL
        return candidate if candidate.is_file() else None

    path = pathlib.Path(cellpose_model).expanduser()
    if path.is_file():
        return path

    is_bare_name = len(path.parts) == 1 and not path.suffix
    if is_bare_name and (models_dir / path.name).is_file():
        return models_dir / path.name

    searched = f"{path}" + (f" or {models_dir / path.name}" if is_bare_name else "")
    name = path.name if is_bare_name else DEFAULT_CELLPOSE_MODEL
    raise CellposeWeightsError(
        f"Cellpose weights not found: no file at {searched}. To fix: {_how_to_get_weights(name)}."
    )


_cellpose_cache: dict[tuple[str, float, str], object] = {}


def _load_cellpose_model(weights: pathlib.Path, device: "torch.device"):
    """Build a ``CellposeModel`` from an existing weights file (cached, one entry)."""
    key = (str(weights.resolve()), weights.stat().st_mtime, str(device))
    if key in _cellpose_cache:
        return _cellpose_cache[key]

    # Cellpose reads CELLPOSE_LOCAL_MODELS_PATH once, at import; importing it
    # here, after the caller had the chance to set the variable, keeps its
    # cache folder in line with cellpose_models_dir(). Import takes ~5 s.
    from cellpose import models

    try:
        model = models.CellposeModel(pretrained_model=str(weights), device=device)
    except urllib.error.URLError as error:
        raise CellposeWeightsError(
            f"Cellpose tried to download weights while loading {weights} and the "
            f"network is unavailable ({error.reason}). To fix: "
            f"{_how_to_get_weights(DEFAULT_CELLPOSE_MODEL)}."
        ) from error
    except (RuntimeError, AssertionError, KeyError, EOFError, ValueError,
            pickle.UnpicklingError) as error:
        raise CellposeWeightsError(
            f"{weights} is not a Cellpose 3 weights file ({type(error).__name__}: {error}). "
            "Pass a file saved by Cellpose 3 (Cellpose 4 files are not compatible)."
        ) from error

    _cellpose_cache.clear()
    _cellpose_cache[key] = model
    logger.info("Loaded Cellpose weights %s on %s", weights, device)
    return model


def segment_cellpose(
    image: np.ndarray,
    cellpose_model: Optional[PathLike] = None,
    diameter: Optional[float] = None,
    brightfield: Optional[bool] = None,
    device: Union[str, "torch.device", None] = None,
    progress: Optional[ProgressCallback] = None,
) -> SegmentationResult:
    """Segment cells with a Cellpose 3 network from a local weights file.

    The network sees the same single "cells bright" channel as the
    classical segmenter (brightfield images inverted).

    Parameters
    ----------
    image : np.ndarray, shape (height, width) or (height, width, 3)
    cellpose_model : str or path, optional
        Weights file or bare name (see :func:`find_cellpose_weights`); None
        uses ``cyto3`` from :func:`cellpose_models_dir`.
    diameter : float, optional
        Cell diameter in pixels. None estimates it as in
        :func:`segment_classical`; Cellpose rescales the image so that cells
        match its training diameter.
    brightfield : bool, optional
        True when cells are darker than the background; None detects it.
    device : str or torch.device, optional
        Passed to :func:`napari_supn.device.select_device`; None picks CUDA
        when available.
    progress : callable, optional
        Called as ``progress(done, total)`` after each of 3 steps.

    Raises
    ------
    CellposeWeightsError
        When the weights are missing or unreadable. Nothing is downloaded.
    """
    from napari_supn.device import select_device

    weights = find_cellpose_weights(cellpose_model)
    if weights is None:
        raise CellposeWeightsError(
            f"Cellpose weights not found: no '{DEFAULT_CELLPOSE_MODEL}' file in "
            f"{cellpose_models_dir()}. To fix: {_how_to_get_weights(DEFAULT_CELLPOSE_MODEL)}, "
            "or use method='classical'."
        )

    total_steps = 3
    image = validate_image(image)
    if _is_uniform(image):
        return _uniform_result(image, "cellpose", diameter, brightfield)
    cells_bright, brightfield = _cells_bright(image, brightfield)
    diameter = _resolve_diameter(cells_bright, diameter)
    report(progress, 1, total_steps)

    model = _load_cellpose_model(weights, select_device(device))
    report(progress, 2, total_steps)

    masks, _, _ = model.eval(cells_bright, channels=[0, 0], diameter=diameter,
                             normalize=True)
    labels, _, _ = segmentation.relabel_sequential(np.asarray(masks, dtype=np.int32))
    labels = labels.astype(np.int32)
    report(progress, 3, total_steps)

    n_cells = int(labels.max())
    message = (f"Cellpose ({weights.name}) found {n_cells} cells "
               f"(diameter {diameter:.0f} px).")
    _log_result(n_cells, message)
    return SegmentationResult(labels, "cellpose", message, diameter, brightfield)


# ---------------------------------------------------------------------------
# Entry point


def segment(
    image: np.ndarray,
    method: Method = "auto",
    diameter: Optional[float] = None,
    cellpose_model: Optional[PathLike] = None,
    brightfield: Optional[bool] = None,
    progress: Optional[ProgressCallback] = None,
    device: Union[str, "torch.device", None] = None,
) -> SegmentationResult:
    """Segment the cells of a field of view.

    Parameters
    ----------
    image : np.ndarray, shape (height, width) or (height, width, 3)
        Grey or RGB field of any real dtype, at most ``MAX_PIXELS`` pixels.
    method : {"auto", "cellpose", "classical"}
        ``"auto"`` runs Cellpose when weights exist locally (the file named
        by ``cellpose_model``, or ``cyto3`` in :func:`cellpose_models_dir`)
        and the classical segmenter otherwise.
    diameter : float, optional
        Typical cell diameter in pixels; None estimates it.
    cellpose_model : str or path, optional
        Cellpose weights file or bare model name.
    brightfield : bool, optional
        True when cells are darker than the background (Giemsa, brightfield),
        False when brighter (fluorescence); None detects it.
    progress : callable, optional
        Called as ``progress(done, total)``.
    device : str or torch.device, optional
        Device for Cellpose; ignored by the classical segmenter.

    Returns
    -------
    SegmentationResult
        ``labels`` is all zero, with a logged warning, when no cell is found.

    Raises
    ------
    ValueError
        For an invalid image, diameter or method, or when the estimated
        diameter exceeds half the shorter image side (pass ``diameter``).
    CellposeWeightsError
        When ``cellpose_model`` names a missing file, or ``method="cellpose"``
        and no weights exist.
    """
    if method not in ("auto", "cellpose", "classical"):
        raise ValueError(f"method {method!r} is not one of 'auto', 'cellpose', 'classical'")

    if method == "classical":
        return segment_classical(image, diameter, brightfield, progress)
    if method == "cellpose":
        return segment_cellpose(image, cellpose_model, diameter, brightfield, device, progress)

    weights = find_cellpose_weights(cellpose_model)
    if weights is not None:
        logger.info("Segmenting with Cellpose: weights found at %s", weights)
        return segment_cellpose(image, weights, diameter, brightfield, device, progress)

    reason = (f"No Cellpose weights in {cellpose_models_dir()} "
              f"(set ${MODELS_PATH_ENV} or pass a weights file), so classical "
              "segmentation ran.")
    logger.info(reason)
    result = segment_classical(image, diameter, brightfield, progress)
    return SegmentationResult(result.labels, result.method, f"{reason} {result.message}",
                              result.diameter, result.brightfield)
