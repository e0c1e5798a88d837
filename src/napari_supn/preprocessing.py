"""Turn raw cell crops into model input, identically for training and scoring.

The steps, in order:

1. channel check: a grey model takes (N, H, W) crops, an RGB model
   (N, H, W, 3) crops. A grey model also accepts RGB crops whose three
   channels are identical (grey stored as RGB). Other RGB crops must be
   converted explicitly with ``rgb_to_grey``.
2. fixed intensity mapping to (−1, 1): raw value ``intensity_low`` maps to −1
   and ``intensity_high`` to +1, then values are clipped. The range comes
   from the dtype (0–255 for uint8) or from training-set percentiles, and is
   the same for every crop (never per-crop min–max, which would erase the
   brightness differences that make a cell anomalous).
3. optional background masking: pixels outside the cell mask are set to
   ``background_value`` (in the (−1, 1) scale).
4. Gaussian blur at crop resolution (``blur_kernel``, ``blur_sigma``), always.
5. average pooling by ``downsample`` to the model size.

Masks are pooled with the same factor: a model pixel belongs to the cell when
at least half of its crop pixels do.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("napari_supn")

CHANNELS = ("grey", "rgb")
CROP_MODES = ("centred", "bbox_resize")
INTENSITY_SOURCES = ("dtype", "percentile", "fixed")

# ITU-R BT.601 luma weights for R, G, B.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def rgb_to_grey(images: np.ndarray) -> np.ndarray:
    """Convert RGB crops (..., 3) to grey (...) by BT.601 luma, keeping the dtype range.

    grey = 0.299 R + 0.587 G + 0.114 B, computed in float64 and cast back to
    the input dtype (rounded for integer dtypes).
    """
    images = np.asarray(images)
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"rgb_to_grey expects a last axis of 3 channels, got shape {images.shape}")
    grey = images.astype(np.float64) @ np.asarray(LUMA_WEIGHTS)
    if np.issubdtype(images.dtype, np.integer):
        return np.round(grey).astype(images.dtype)
    return grey.astype(images.dtype)


def dtype_range(dtype: np.dtype) -> tuple[float, float]:
    """Return the (low, high) intensity range implied by an image dtype.

    Integer dtypes use their full range (uint8: 0–255, uint16: 0–65535);
    float images are assumed to lie in [0, 1].
    """
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    if np.issubdtype(dtype, np.floating):
        return 0.0, 1.0
    raise ValueError(f"unsupported image dtype {dtype}; use integer or float images")


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Return a normalised 2D Gaussian kernel, (size, size), float32."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-(coords**2) / (2 * sigma**2))
    profile = profile / profile.sum()
    return torch.outer(profile, profile).to(torch.float32)


@dataclass
class Preprocessing:
    """Settings that turn raw crops into model input; stored in the model file.

    Attributes
    ----------
    channels : str
        ``"grey"`` (model input has 1 channel) or ``"rgb"`` (3 channels).
    crop_size : int
        Side of the square raw crop in pixels (e.g. 128).
    downsample : int
        Average-pooling factor from crop to model input (2: 128 → 64).
    blur_kernel : int
        Side of the Gaussian blur kernel in crop pixels (odd; 1 disables).
    blur_sigma : float
        Standard deviation of the Gaussian blur in crop pixels.
    intensity_low, intensity_high : float
        Raw intensities mapped to −1 and +1.
    intensity_source : str
        Where the range came from: ``"dtype"`` (full dtype range),
        ``"percentile"`` (training-set percentiles) or ``"fixed"`` (given).
    mask_background : bool
        Whether pixels outside the cell mask are replaced by
        ``background_value`` before blurring. The model then receives the
        cell alone, and scoring needs masks.
    background_value : float
        Replacement value for masked-out pixels, in the (−1, 1) scale.
    crop_mode : str
        How crops are cut from a field: ``"centred"`` (cell centred at native
        scale in a crop_size window) or ``"bbox_resize"`` (the cell's
        bounding box resized to crop_size × crop_size, aspect not kept).
    cell_diameter : float or None
        Median equivalent diameter, in raw crop pixels, of the training
        cells (from their masks); None when trained without masks.
    """

    channels: str = "grey"
    crop_size: int = 128
    downsample: int = 2
    blur_kernel: int = 5
    blur_sigma: float = 2.0
    intensity_low: float = 0.0
    intensity_high: float = 255.0
    intensity_source: str = "dtype"
    mask_background: bool = False
    background_value: float = -1.0
    crop_mode: str = "centred"
    cell_diameter: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.channels not in CHANNELS:
            raise ValueError(f"channels must be 'grey' or 'rgb', got {self.channels!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(
                f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}"
            )
        if self.intensity_source not in INTENSITY_SOURCES:
            raise ValueError(
                f"intensity_source must be one of {', '.join(INTENSITY_SOURCES)}, "
                f"got {self.intensity_source!r}"
            )
        if not isinstance(self.downsample, int) or self.downsample < 1:
            raise ValueError(f"downsample must be a positive integer, got {self.downsample!r}")
        if not isinstance(self.crop_size, int) or self.crop_size < 1:
            raise ValueError(f"crop_size must be a positive integer, got {self.crop_size!r}")
        if self.crop_size % self.downsample != 0:
            raise ValueError(
                f"crop_size {self.crop_size} is not divisible by downsample {self.downsample}"
            )
        if not isinstance(self.blur_kernel, int) or self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be an odd positive integer, got {self.blur_kernel!r}")
        if not self.blur_sigma > 0:
            raise ValueError(f"blur_sigma must be positive, got {self.blur_sigma!r}")
        if not self.intensity_low < self.intensity_high:
            raise ValueError(
                f"intensity_low ({self.intensity_low}) must be below "
                f"intensity_high ({self.intensity_high})"
            )
        if not -1.0 <= self.background_value <= 1.0:
            raise ValueError(f"background_value must lie in [-1, 1], got {self.background_value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-compatible dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        """Build settings from ``to_dict`` output; unknown keys raise ValueError."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Preprocessing keys: {', '.join(unknown)}")
        return cls(**values)

    @property
    def num_channels(self) -> int:
        """Model input channels: 1 for grey, 3 for RGB."""
        return 1 if self.channels == "grey" else 3

    @property
    def model_size(self) -> int:
        """Side of the model input in pixels: crop_size // downsample."""
        return self.crop_size // self.downsample

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """Validate raw crops and return them as (N, H, W) or (N, H, W, 3).

        Raises ValueError for a channel mismatch, a wrong crop size or NaNs.
        """
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
            raise ValueError(
                f"crops must have shape (N, H, W) for grey or (N, H, W, 3) for RGB, "
                f"got {images.shape}"
            )

        is_rgb = images.ndim == 4
        if self.channels == "rgb" and not is_rgb:
            raise ValueError(
                "model expects RGB crops (N, H, W, 3) but got grey crops "
                f"{images.shape}; use a model trained on grey images"
            )
        if self.channels == "grey" and is_rgb:
            if np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(
                images[..., 0], images[..., 2]
            ):
                images = images[..., 0]
            else:
                raise ValueError(
                    "model expects grey crops (N, H, W) but got RGB crops "
                    f"{images.shape}; use a model trained on RGB images, or convert "
                    "with napari_supn.preprocessing.rgb_to_grey"
                )

        height, width = images.shape[1:3]
        if (height, width) != (self.crop_size, self.crop_size):
            raise ValueError(
                f"crops are {height}×{width} pixels but the model expects "
                f"{self.crop_size}×{self.crop_size}; cut crops with crop_mode "
                f"{self.crop_mode!r} at that size"
            )
        if np.issubdtype(images.dtype, np.floating) and not np.all(np.isfinite(images)):
            raise ValueError("crops contain NaN or infinite values; fix or drop those crops")
        if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
                or images.dtype == bool):
            raise ValueError(f"unsupported crop dtype {images.dtype}; use integer or float images")
        return images

    def check_masks(self, masks: np.ndarray, count: int) -> np.ndarray:
        """Validate masks and return them as bool (N, H, W)."""
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = masks[None]
        expected = (count, self.crop_size, self.crop_size)
        if masks.shape != expected:
            raise ValueError(f"masks must have shape {expected}, got {masks.shape}")
        return masks.astype(bool) if masks.dtype == bool else masks > 0

    def scale_intensity(self, images: np.ndarray) -> torch.Tensor:
        """Map raw crops to float32 (N, C, H, W) in [−1, 1] with the fixed range."""
        values = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if values.dim() == 3:
            values = values[:, None]
        else:
            values = values.permute(0, 3, 1, 2).contiguous()
        span = self.intensity_high - self.intensity_low
        scaled = (values - self.intensity_low) * (2.0 / span) - 1.0
        return scaled.clamp_(-1.0, 1.0)

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the Gaussian blur per channel with reflected borders, (N, C, H, W)."""
        if self.blur_kernel == 1:
            return x
        kernel = gaussian_kernel(self.blur_kernel, self.blur_sigma).to(x.device, x.dtype)
        channels = x.shape[1]
        weight = kernel.expand(channels, 1, *kernel.shape).contiguous()
        pad = self.blur_kernel // 2
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(padded, weight, groups=channels)

    def prepare(
        self, images: np.ndarray, masks: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Turn raw crops into model input.

        Parameters
        ----------
        images : numpy.ndarray
            Raw crops, (N, crop_size, crop_size) grey or (N, crop_size,
            crop_size, 3) RGB, any integer or float dtype.
        masks : numpy.ndarray or None
            Cell masks, (N, crop_size, crop_size), bool or nonzero-is-cell.
            Required when ``mask_background`` is set.

        Returns
        -------
        x : torch.Tensor
            float32 (N, C, model_size, model_size) in [−1, 1], on the CPU.
        mask : torch.Tensor or None
            bool (N, 1, model_size, model_size), or None without masks.
        """
        images = self.check_images(images)
        count = images.shape[0]
        mask_tensor = None
        if masks is not None:
            mask_tensor = torch.from_numpy(self.check_masks(masks, count))[:, None]
        elif self.mask_background:
            raise ValueError(
                "this model was trained with the background masked out, so it needs "
                "a cell mask for every crop; pass masks"
            )

        x = self.scale_intensity(images)
        if self.mask_background:
            x = torch.where(mask_tensor, x, torch.full_like(x, self.background_value))
        x = self.blur(x)

        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
            if mask_tensor is not None:
                coverage = F.avg_pool2d(mask_tensor.float(), self.downsample)
                mask_tensor = coverage >= 0.5
        return x.contiguous(), mask_tensor


#: Largest share of pixels allowed outside the model's intensity range.
MAX_OUT_OF_RANGE_FRACTION = 0.01
#: Smallest share of the model's intensity range the brightest pixels must reach.
MIN_RANGE_FRACTION = 0.05


def check_intensity_units(values: np.ndarray, preprocessing: "Preprocessing", source: str) -> None:
    """Raise when an image's intensities are not in the units the model was trained on.

    Scaling clips values outside the model's fixed range, so a 16-bit image
    given to an 8-bit model saturates and every cell looks anomalous, while
    a float image in [0, 1] given to the same model looks flat and healthy.
    Both raise here instead. Constant images (an empty field) pass, so that
    they reach the "no cells found" path.

    Parameters
    ----------
    values : numpy.ndarray
        Raw pixel values of an image or a stack of crops, any shape.
    preprocessing : Preprocessing
        The model's preprocessing, whose ``intensity_low`` and
        ``intensity_high`` give the expected range.
    source : str
        What the values are, for the message (a file name or "image").

    Raises
    ------
    ValueError
        If more than 1 % of the pixels lie outside the range, or the
        brightest 0.1 % of pixels reach less than 5 % of it.
    """
    values = np.asarray(values)
    if values.size == 0:
        return
    sample = values.reshape(-1)
    if sample.size > 1_000_000:
        sample = sample[:: sample.size // 1_000_000]
    sample = sample.astype(np.float64)
    low, high = preprocessing.intensity_low, preprocessing.intensity_high
    span = high - low
    if sample.min() == sample.max():
        return

    outside = float(np.mean((sample < low - 1e-6 * span) | (sample > high + 1e-6 * span)))
    if outside > MAX_OUT_OF_RANGE_FRACTION:
        raise ValueError(
            f"{source}: {100 * outside:.1f} % of the pixels (range {sample.min():g} to "
            f"{sample.max():g}, dtype {values.dtype}) lie outside the model's intensity "
            f"range {low:g} to {high:g}; convert the image to the units of the training data "
            "(for example 16-bit to 8-bit by dividing by 257) or train a model on such images"
        )

    bright = float(np.quantile(sample, 0.999))
    if bright < low + MIN_RANGE_FRACTION * span:
        raise ValueError(
            f"{source}: the brightest pixels reach {bright:g} (dtype {values.dtype}) but the "
            f"model expects intensities from {low:g} to {high:g}; convert the image to those "
            "units (for example a float image in [0, 1] times 255 for an 8-bit model) or "
            "train a model on such images"
        )


def equivalent_diameters(masks: np.ndarray) -> np.ndarray:
    """Return each mask's equivalent circle diameter 2·sqrt(area/π), in pixels, (N,)."""
    masks = np.asarray(masks) > 0
    areas = masks.reshape(masks.shape[0], -1).sum(axis=1)
    return 2.0 * np.sqrt(areas / math.pi)


def fit_preprocessing(
    crops: np.ndarray,
    masks: np.ndarray | None = None,
    *,
    downsample: int = 2,
    intensity: str = "dtype",
    percentiles: tuple[float, float] = (0.5, 99.5),
    mask_background: bool = False,
    background_value: float = -1.0,
    crop_mode: str = "centred",
    blur_kernel: int = 5,
    blur_sigma: float = 2.0,
) -> Preprocessing:
    """Derive preprocessing settings from the training crops.

    Parameters
    ----------
    crops : numpy.ndarray
        Training crops, (N, S, S) grey or (N, S, S, 3) RGB; S becomes
        ``crop_size`` and the channel count sets ``channels``.
    masks : numpy.ndarray or None
        Cell masks (N, S, S); when given, ``cell_diameter`` is the median
        equivalent diameter of the cells.
    intensity : str
        ``"dtype"``: map the dtype range to (−1, 1) (floats: [0, 1]).
        ``"percentile"``: map the ``percentiles`` of all training pixels.
    Other parameters are stored as given (see ``Preprocessing``).
    """
    crops = np.asarray(crops)
    if crops.ndim not in (3, 4) or (crops.ndim == 4 and crops.shape[-1] != 3):
        raise ValueError(
            f"training crops must have shape (N, H, W) or (N, H, W, 3), got {crops.shape}"
        )
    if crops.shape[1] != crops.shape[2]:
        raise ValueError(f"training crops must be square, got {crops.shape[1]}×{crops.shape[2]}")
    if crops.shape[0] == 0:
        raise ValueError("no training crops given")

    if intensity == "dtype":
        low, high = dtype_range(crops.dtype)
    elif intensity == "percentile":
        low, high = (float(v) for v in np.percentile(crops, percentiles))
        if not low < high:
            raise ValueError(
                f"training crops have a constant intensity ({low}) between the "
                f"percentiles {percentiles}; check the data"
            )
    else:
        raise ValueError(f"intensity must be 'dtype' or 'percentile', got {intensity!r}")

    cell_diameter = None
    if masks is not None:
        cell_diameter = float(np.median(equivalent_diameters(masks)))

    settings = Preprocessing(
        channels="rgb" if crops.ndim == 4 else "grey",
        crop_size=int(crops.shape[1]),
        downsample=downsample,
        blur_kernel=blur_kernel,
        blur_sigma=blur_sigma,
        intensity_low=low,
        intensity_high=high,
        intensity_source=intensity,
        mask_background=mask_background,
        background_value=background_value,
        crop_mode=crop_mode,
        cell_diameter=cell_diameter,
    )
    logger.info(
        "Preprocessing fitted: %s crops %d px, intensity %g–%g (%s), cell diameter %s px",
        settings.channels,
        settings.crop_size,
        low,
        high,
        intensity,
        "unknown" if cell_diameter is None else f"{cell_diameter:.1f}",
    )
    return settings
