"""Gaussian likelihoods over images, parameterised by a precision Cholesky factor.

Three distributions share one interface, :class:`StructuredNormal`:

- :class:`SUPNormal`: the structured-uncertainty (SUPN) Gaussian, whose
  precision Λ = L Lᵀ has a sparse lower-triangular factor L with local,
  spatially varying weights;
- :class:`DiagonalNormal`: L diagonal (one variance per pixel);
- :class:`SphericalNormal`: L = I / σ (one variance for the whole image).

Every distribution has batch shape ``(batch,)`` and event shape
``(channels, height, width)``. All of them expose ``whiten`` (Lᵀ(x − μ)),
``unwhiten`` (its inverse), ``log_prob``, ``sample``/``rsample``, ``mean`` and
``precision_cholesky_dense``, so scoring code can treat them alike.

Pixel order
-----------
The dense vector that L acts on lists the image pixel by pixel in raster order
(row by row, left to right), and within one pixel channel 0 first. Element
``(c, row, col)`` of a ``(channels, height, width)`` image therefore has index
``(row * width + col) * channels + c``. This interleaved order differs from
``image.flatten()`` when ``channels > 1``.

This module imports only torch.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch.distributions import Distribution, constraints

__all__ = [
    "MAX_DENSE_SIZE",
    "DiagonalNormal",
    "SUPNormal",
    "SphericalNormal",
    "StructuredNormal",
    "forward_offsets",
    "num_off_diagonal",
    "off_diagonal_layout",
]

MAX_DENSE_SIZE = 4096
"""Largest event size N = channels·height·width that ``precision_cholesky_dense``
builds. One (N, N) float64 matrix of this size takes 128 MiB."""

_LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------
# Layout of the off-diagonal weights
# ----------------------------------------------------------------------------


def _check_radius(radius: int) -> None:
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
        raise ValueError(f"radius must be an integer >= 1, got {radius!r}")


def _check_channels(channels: int) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be an integer >= 1, got {channels!r}")


def forward_offsets(radius: int) -> List[Tuple[int, int]]:
    """List the (row, column) offsets of the forward half-window, in raster order.

    These are the neighbours q = p + (drow, dcol) inside the (2r+1)×(2r+1)
    window around a pixel p that come after p in raster order:
    ``(0, 1) … (0, r)``, then ``(1, −r) … (1, r)``, …, ``(r, −r) … (r, r)``.

    Parameters
    ----------
    radius : int
        Window radius r >= 1.

    Returns
    -------
    list of (int, int)
        ((2r+1)² − 1) / 2 offsets: 4 for r = 1, 12 for r = 2.
    """
    _check_radius(radius)
    offsets = [(0, dcol) for dcol in range(1, radius + 1)]
    for drow in range(1, radius + 1):
        offsets.extend((drow, dcol) for dcol in range(-radius, radius + 1))
    return offsets


def _num_same_pixel(channels: int) -> int:
    return channels * (channels - 1) // 2


def num_off_diagonal(radius: int, channels: int = 1) -> int:
    """Count the off-diagonal weights stored per pixel.

    With K = ((2r+1)² − 1) / 2 forward offsets and C channels the count is
    C(C−1)/2 (same-pixel cross-channel terms) + C²·K (every channel pair for
    every forward offset). See :class:`SUPNormal` for the order.

    Parameters
    ----------
    radius : int
        Window radius r >= 1.
    channels : int
        Number of image channels C >= 1.

    Returns
    -------
    int
        4 for r = 1 and 12 for r = 2 with one channel; 39 for r = 1 with three.
    """
    _check_radius(radius)
    _check_channels(channels)
    num_offsets = 2 * radius * (radius + 1)
    return _num_same_pixel(channels) + channels * channels * num_offsets


def off_diagonal_layout(radius: int, channels: int = 1) -> List[Tuple[int, int, int, int]]:
    """Describe every channel of ``off_diag``.

    Parameters
    ----------
    radius : int
        Window radius r >= 1.
    channels : int
        Number of image channels C >= 1.

    Returns
    -------
    list of (drow, dcol, row_channel, column_channel)
        Entry k describes ``off_diag[:, k]``: the weight stored at pixel
        (row, col) is L[j, i] with column i = (row, col, column_channel) and
        row j = (row + drow, col + dcol, row_channel). Its length is
        ``num_off_diagonal(radius, channels)``.
    """
    _check_radius(radius)
    _check_channels(channels)
    layout = []
    for row_channel in range(1, channels):
        for column_channel in range(row_channel):
            layout.append((0, 0, row_channel, column_channel))

    for drow, dcol in forward_offsets(radius):
        for row_channel in range(channels):
            for column_channel in range(channels):
                layout.append((drow, dcol, row_channel, column_channel))
    return layout


# ----------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------


def _shape_text(shape: Sequence[int]) -> str:
    return str(tuple(int(size) for size in shape))


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def _check_finite(name: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        count = int((~torch.isfinite(value)).sum())
        raise ValueError(
            f"{name} of shape {_shape_text(value.shape)} contains {count} non-finite "
            "value(s) (NaN or inf); all values must be finite"
        )


def _check_like(name: str, value: torch.Tensor, reference: torch.Tensor) -> None:
    if value.device != reference.device:
        raise ValueError(
            f"{name} is on device {value.device} but mean is on {reference.device}; "
            "move all parameters to one device"
        )
    if value.dtype != reference.dtype:
        raise ValueError(
            f"{name} has dtype {value.dtype} but mean has {reference.dtype}; "
            "use one floating-point dtype for all parameters"
        )


# ----------------------------------------------------------------------------
# Common interface
# ----------------------------------------------------------------------------


class StructuredNormal(Distribution):
    """Gaussian over images defined by a lower-triangular precision factor L.

    Subclasses define the factor by implementing ``_whiten_centered``
    (r ↦ Lᵀ r), ``_unwhiten_centered`` (w ↦ L⁻ᵀ w), ``_sum_log_diag``
    (Σ log Lᵢᵢ per image) and ``precision_cholesky_dense``. This class
    validates shapes and derives ``whiten``, ``unwhiten``, ``log_prob``,
    ``sample`` and ``rsample`` from them.

    Parameters
    ----------
    mean : torch.Tensor
        Mean μ, shape (batch, channels, height, width).
    validate_args : bool or None
        When true (torch's default, see
        ``torch.distributions.Distribution.set_default_validate_args``),
        parameters and inputs are checked for NaN and inf, which costs one
        device synchronisation per call. Shapes are always checked.
    """

    arg_constraints: Dict[str, constraints.Constraint] = {}
    support = constraints.independent(constraints.real, 3)
    has_rsample = True

    def __init__(self, mean: torch.Tensor, validate_args: bool | None = None):
        mean = _check_tensor("mean", mean)
        if mean.dim() != 4:
            raise ValueError(
                f"mean has shape {_shape_text(mean.shape)} but must be 4-D "
                "(batch, channels, height, width)"
            )
        self.loc = mean
        super().__init__(
            batch_shape=mean.shape[:1],
            event_shape=mean.shape[1:],
            validate_args=validate_args,
        )
        if self._validate_args:
            _check_finite("mean", mean)

    # -- shapes -------------------------------------------------------------

    @property
    def mean(self) -> torch.Tensor:
        """Mean μ, shape (batch, channels, height, width)."""
        return self.loc

    @property
    def event_size(self) -> int:
        """Number N = channels·height·width of scalar values in one image."""
        channels, height, width = self.event_shape
        return channels * height * width

    def _check_input(self, name: str, value: object) -> torch.Tensor:
        value = _check_tensor(name, value)
        expected = tuple(self.loc.shape)
        if value.dim() < 4 or tuple(value.shape[-4:]) != expected:
            raise ValueError(
                f"{name} has shape {_shape_text(value.shape)} but must have shape "
                f"(*sample_shape, {', '.join(str(size) for size in expected)}), "
                "that is (*sample_shape, batch, channels, height, width) matching mean"
            )
        if value.device != self.loc.device:
            raise ValueError(
                f"{name} is on device {value.device} but the distribution is on "
                f"{self.loc.device}; move {name} with .to({str(self.loc.device)!r})"
            )
        if self._validate_args:
            _check_finite(name, value)
        return value

    # -- subclass hooks -----------------------------------------------------

    def _whiten_centered(self, residual: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _unwhiten_centered(self, whitened: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sum_log_diag(self) -> torch.Tensor:
        raise NotImplementedError

    def precision_cholesky_dense(self) -> torch.Tensor:
        """Build the dense precision factor L, shape (batch, N, N). Small images only."""
        raise NotImplementedError

    def _check_dense_size(self) -> int:
        size = self.event_size
        if size > MAX_DENSE_SIZE:
            raise ValueError(
                f"precision_cholesky_dense needs an (N, N) matrix with N = {size} for "
                f"event shape {_shape_text(self.event_shape)}, above MAX_DENSE_SIZE = "
                f"{MAX_DENSE_SIZE}; use whiten/unwhiten, which never form L densely"
            )
        return size

    # -- public interface ---------------------------------------------------

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the whitened residual w = Lᵀ(x − μ).

        ‖w‖² is the squared Mahalanobis distance (x − μ)ᵀ Λ (x − μ), and w²
        gives each value's share of it.

        Parameters
        ----------
        x : torch.Tensor
            Images, shape (*sample_shape, batch, channels, height, width).

        Returns
        -------
        torch.Tensor
            Whitened residual, same shape as ``x``.
        """
        x = self._check_input("x", x)
        return self._whiten_centered(x - self.loc)

    def unwhiten(self, whitened: torch.Tensor) -> torch.Tensor:
        """Solve whiten(x) = w for x, that is x = μ + L⁻ᵀ w.

        Parameters
        ----------
        whitened : torch.Tensor
            Whitened values w, shape (*sample_shape, batch, channels, height, width).

        Returns
        -------
        torch.Tensor
            Images x, same shape as ``whitened``.
        """
        whitened = self._check_input("whitened", whitened)
        return self.loc + self._unwhiten_centered(whitened)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Compute log N(x | μ, (L Lᵀ)⁻¹) = −N/2·log 2π + Σ log Lᵢᵢ − ½‖Lᵀ(x − μ)‖².

        Parameters
        ----------
        value : torch.Tensor
            Images x, shape (*sample_shape, batch, channels, height, width).

        Returns
        -------
        torch.Tensor
            Log density per image, shape (*sample_shape, batch).
        """
        whitened = self.whiten(value)
        squared_distance = whitened.square().sum(dim=(-3, -2, -1))
        constant = -0.5 * self.event_size * _LOG_2PI
        return constant + self._sum_log_diag() - 0.5 * squared_distance

    def rsample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> torch.Tensor:
        """Draw reparameterised samples μ + L⁻ᵀ ε with ε ~ N(0, I).

        Gradients flow to all parameters. For SUPNormal the backward pass
        costs one more wavefront solve (with L instead of Lᵀ).

        Returns
        -------
        torch.Tensor
            Samples, shape (*sample_shape, batch, channels, height, width).
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self._unwhiten_centered(noise)

    def sample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> torch.Tensor:
        """Draw samples without gradient tracking; shape as for :meth:`rsample`."""
        with torch.no_grad():
            return self.rsample(sample_shape)


# ----------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------


class SphericalNormal(StructuredNormal):
    """Gaussian with covariance σ² I: the same variance for every pixel.

    Give exactly one of ``log_sigma`` or ``variance``. L = I / σ, so
    log Lᵢᵢ = −log σ.

    Parameters
    ----------
    mean : torch.Tensor
        Mean μ, shape (batch, channels, height, width).
    log_sigma : float or torch.Tensor, optional
        log σ, a number, a 0-D tensor or one value per image, shape (batch,).
    variance : float or torch.Tensor, optional
        σ² > 0, same forms as ``log_sigma``.
    validate_args : bool or None
        See :class:`StructuredNormal`.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        log_sigma: float | torch.Tensor | None = None,
        variance: float | torch.Tensor | None = None,
        validate_args: bool | None = None,
    ):
        super().__init__(mean, validate_args=validate_args)
        if (log_sigma is None) == (variance is None):
            raise ValueError("give exactly one of log_sigma or variance to SphericalNormal")

        if variance is not None:
            name = "variance"
            value = torch.as_tensor(variance, dtype=mean.dtype, device=mean.device)
            if bool((value <= 0).any()):
                raise ValueError(f"variance must be > 0, got {variance!r}")
            log_sigma_tensor = 0.5 * torch.log(value)
        else:
            name = "log_sigma"
            log_sigma_tensor = torch.as_tensor(log_sigma, dtype=mean.dtype, device=mean.device)

        batch = mean.shape[0]
        if log_sigma_tensor.shape not in (torch.Size([]), torch.Size([batch])):
            raise ValueError(
                f"{name} has shape {_shape_text(log_sigma_tensor.shape)} but must be a "
                f"number, a 0-D tensor or shape ({batch},) (one value per image)"
            )
        if self._validate_args:
            _check_finite(name, log_sigma_tensor)
        self.log_sigma = log_sigma_tensor

    def _log_sigma_image(self) -> torch.Tensor:
        # Shape () or (batch, 1, 1, 1), so it broadcasts over images.
        if self.log_sigma.dim() == 0:
            return self.log_sigma
        return self.log_sigma.reshape(-1, 1, 1, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Per-value variance σ², shape (batch, channels, height, width)."""
        return torch.exp(2.0 * self._log_sigma_image()).expand(self.loc.shape)

    def _whiten_centered(self, residual: torch.Tensor) -> torch.Tensor:
        return residual * torch.exp(-self._log_sigma_image())

    def _unwhiten_centered(self, whitened: torch.Tensor) -> torch.Tensor:
        return whitened * torch.exp(self._log_sigma_image())

    def _sum_log_diag(self) -> torch.Tensor:
        return (-self.event_size * self.log_sigma).expand(self.batch_shape)

    def precision_cholesky_dense(self) -> torch.Tensor:
        """Build the dense precision factor L = I / σ, shape (batch, N, N). Small images only."""
        size = self._check_dense_size()
        diag = torch.exp(-self.log_sigma).expand(self.batch_shape)
        eye = torch.eye(size, dtype=self.loc.dtype, device=self.loc.device)
        return diag[:, None, None] * eye


class DiagonalNormal(StructuredNormal):
    """Gaussian with one variance per value: L diagonal.

    Parameters
    ----------
    mean : torch.Tensor
        Mean μ, shape (batch, channels, height, width).
    log_diag : torch.Tensor
        log Lᵢᵢ = −½ log σᵢ², shape (batch, channels, height, width).
    validate_args : bool or None
        See :class:`StructuredNormal`.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        log_diag: torch.Tensor,
        validate_args: bool | None = None,
    ):
        super().__init__(mean, validate_args=validate_args)
        log_diag = _check_tensor("log_diag", log_diag)
        if log_diag.shape != mean.shape:
            raise ValueError(
                f"log_diag has shape {_shape_text(log_diag.shape)} but must match mean, "
                f"shape {_shape_text(mean.shape)} (batch, channels, height, width)"
            )
        _check_like("log_diag", log_diag, mean)
        if self._validate_args:
            _check_finite("log_diag", log_diag)
        self.log_diag = log_diag

    @property
    def variance(self) -> torch.Tensor:
        """Per-value variance σᵢ² = exp(−2 log Lᵢᵢ), shape (batch, channels, height, width)."""
        return torch.exp(-2.0 * self.log_diag)

    def _whiten_centered(self, residual: torch.Tensor) -> torch.Tensor:
        return residual * torch.exp(self.log_diag)

    def _unwhiten_centered(self, whitened: torch.Tensor) -> torch.Tensor:
        return whitened * torch.exp(-self.log_diag)

    def _sum_log_diag(self) -> torch.Tensor:
        return self.log_diag.sum(dim=(-3, -2, -1))

    def precision_cholesky_dense(self) -> torch.Tensor:
        """Build the dense diagonal factor L, shape (batch, N, N). Small images only."""
        self._check_dense_size()
        diag = torch.exp(self.log_diag).permute(0, 2, 3, 1).reshape(self.loc.shape[0], -1)
        return torch.diag_embed(diag)


# ----------------------------------------------------------------------------
# SUPN
# ----------------------------------------------------------------------------


class _WindowLayout:
    """Geometry of the padded, pixel-major layout used by the wavefront solves.

    Images are padded by r pixels on every side and stored as
    (samples, batch, padded pixels, channels), so the (r+1)×(2r+1) window
    below-and-around a pixel, and the same window above-and-around it, are
    plain strided views: no gather is needed. ``steps`` lists, for each
    wavefront number t = (r+1)·row + col in increasing order, the padded flat
    index of the step's first pixel (smallest row) and its pixel count.
    Consecutive pixels of a step are ``pixel_stride`` apart, because the next
    row is Wp further on and r+1 columns back. ``raster_steps`` gives the
    same first pixels as raster indices row·W + col, ``raster_stride`` apart.
    """

    def __init__(self, height: int, width: int, radius: int):
        self.height = height
        self.width = width
        self.radius = radius
        self.padded_height = height + 2 * radius
        self.padded_width = width + 2 * radius
        self.num_padded = self.padded_height * self.padded_width
        self.window_rows = radius + 1
        self.window_cols = 2 * radius + 1
        self.pixel_stride = self.padded_width - radius - 1
        # A step has one pixel when W <= r + 1, so any positive stride will do.
        self.raster_stride = max(1, width - radius - 1)

        steps = []
        raster_steps = []
        last_t = (radius + 1) * (height - 1) + width - 1
        for t in range(last_t + 1):
            first_row = max(0, -(-(t - (width - 1)) // (radius + 1)))
            last_row = min(height - 1, t // (radius + 1))
            first_col = t - (radius + 1) * first_row
            first_index = (first_row + radius) * self.padded_width + first_col + radius
            steps.append((first_index, last_row - first_row + 1))
            raster_steps.append(first_row * width + first_col)
        self.steps = steps
        self.raster_steps = raster_steps

    def pad(self, images: torch.Tensor) -> torch.Tensor:
        """Copy (samples, batch, channels, height, width) into a zero padded pixel-major tensor."""
        samples, batch, channels = images.shape[:3]
        padded = images.new_zeros(samples, batch, self.padded_height, self.padded_width, channels)
        interior = padded[:, :, self.radius : self.radius + self.height, self.radius : self.radius + self.width]
        interior.copy_(images.permute(0, 1, 3, 4, 2))
        return padded.reshape(samples, batch, self.num_padded, channels)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`pad`: return (samples, batch, channels, height, width)."""
        samples, batch, _, channels = padded.shape
        grid = padded.reshape(samples, batch, self.padded_height, self.padded_width, channels)
        interior = grid[:, :, self.radius : self.radius + self.height, self.radius : self.radius + self.width]
        return interior.permute(0, 1, 4, 2, 3).contiguous()

    def window_weights(self, off_diag: torch.Tensor, channels: int, padded: bool) -> torch.Tensor:
        """Arrange off-diagonal weights as (batch, pixels, window rows, window cols, C, C).

        Entry [b, p, dy, dx + r, c', c] contains L[(p + (dy, dx), c'), (p, c)]. The
        backward half of the first window row is zero, and so is the diagonal
        and upper triangle of the same-pixel block at (0, 0), so a window sum
        over all entries only picks up the forward terms of L. With ``padded``
        the pixels are the padded grid (zero weights outside the image),
        otherwise the H·W raster pixels.
        """
        batch = off_diag.shape[0]
        radius = self.radius
        num_window = self.window_rows * self.window_cols
        if padded:
            weights = off_diag.new_zeros(
                batch, self.padded_height, self.padded_width, num_window, channels, channels
            )
            interior = weights[:, radius : radius + self.height, radius : radius + self.width]
        else:
            weights = off_diag.new_empty(batch, self.height, self.width, num_window, channels, channels)
            weights[:, :, :, : radius + 1].zero_()
            interior = weights

        num_same = _num_same_pixel(channels)
        neighbour = off_diag[:, num_same:].reshape(
            batch, num_window - radius - 1, channels, channels, self.height, self.width
        )
        interior[:, :, :, radius + 1 :].copy_(neighbour.permute(0, 4, 5, 1, 2, 3))
        for row_channel in range(1, channels):
            first = row_channel * (row_channel - 1) // 2
            same = off_diag[:, first : first + row_channel].permute(0, 2, 3, 1)
            interior[:, :, :, radius, row_channel, :row_channel].copy_(same)
        return weights.reshape(batch, -1, self.window_rows, self.window_cols, channels, channels)

    def pad_diagonal(self, log_diag: torch.Tensor) -> torch.Tensor:
        """Arrange exp(log_diag) as (batch, padded pixels, channels), one outside the image."""
        padded = self.pad(log_diag.unsqueeze(0))[0]
        return torch.exp(padded)


_LAYOUT_CACHE: Dict[Tuple[int, int, int], _WindowLayout] = {}


def _window_layout(height: int, width: int, radius: int) -> _WindowLayout:
    key = (height, width, radius)
    layout = _LAYOUT_CACHE.get(key)
    if layout is None:
        layout = _WindowLayout(height, width, radius)
        _LAYOUT_CACHE[key] = layout
    return layout


def _step_view(tensor: torch.Tensor, first_index: int, count: int, layout: _WindowLayout) -> torch.Tensor:
    """View (samples, batch, count, channels) of the step's pixels in a padded tensor."""
    samples, batch, num_padded, channels = tensor.shape
    return tensor.as_strided(
        (samples, batch, count, channels),
        (batch * num_padded * channels, num_padded * channels, layout.pixel_stride * channels, 1),
        tensor.storage_offset() + first_index * channels,
    )


def _solve_transposed(
    rhs: torch.Tensor, log_diag: torch.Tensor, off_diag: torch.Tensor, layout: _WindowLayout
) -> torch.Tensor:
    """Solve Lᵀ y = rhs by back-substitution, wavefront by wavefront (last one first).

    ``rhs`` is padded (samples, batch, padded pixels, channels) as made by
    :meth:`_WindowLayout.pad`. Returns y in the same layout.

    Row i of Lᵀ gives yᵢ = rhsᵢ / Lᵢᵢ − Σⱼ (L[j, i] / Lᵢᵢ) yⱼ. The solution
    tensor starts as rhs / L_ii, and each pixel's window weight on itself is
    set to 1, so one product and one sum finish a pixel.
    Unsolved pixels inside the window (the pixel itself in other channels and
    the pixels left of it in its row) carry zero weight.
    """
    samples, batch, num_padded, channels = rhs.shape
    rows, cols = layout.window_rows, layout.window_cols
    stride = layout.pixel_stride
    raster_stride = layout.raster_stride
    radius = layout.radius

    solution = rhs / layout.pad_diagonal(log_diag).unsqueeze(0)
    weights = layout.window_weights(off_diag, channels, padded=False)
    diagonal = torch.exp(log_diag).permute(0, 2, 3, 1).reshape(batch, -1, 1, 1, 1, channels)
    weights.div_(diagonal).neg_()
    for channel in range(channels):
        weights[:, :, 0, radius, channel, channel] = 1.0

    for (first_index, count), first_raster in zip(
        reversed(layout.steps), reversed(layout.raster_steps)
    ):
        # y at the window of each step pixel, starting at (dy, dx) = (0, −r).
        known = solution.as_strided(
            (samples, batch, count, rows, cols, channels),
            (batch * num_padded * channels, num_padded * channels, stride * channels,
             layout.padded_width * channels, channels, 1),
            solution.storage_offset() + (first_index - radius) * channels,
        )
        last_raster = first_raster + (count - 1) * raster_stride
        step_weights = weights[:, first_raster : last_raster + 1 : raster_stride]
        step_solution = _step_view(solution, first_index, count, layout)

        # Channels of one pixel in reverse order: channel c needs c' > c.
        for channel in range(channels - 1, -1, -1):
            column_weights = step_weights[..., channel].unsqueeze(0)
            value = (column_weights * known).sum(dim=(-3, -2, -1))
            step_solution[..., channel].copy_(value)
    return solution


def _solve_forward(
    rhs: torch.Tensor, diagonal: torch.Tensor, weights: torch.Tensor, layout: _WindowLayout
) -> torch.Tensor:
    """Solve L u = rhs by forward substitution, wavefront by wavefront (first one first).

    ``rhs`` is laid out as for :func:`_solve_transposed`. ``diagonal`` and
    ``weights`` come from :meth:`_WindowLayout.pad_diagonal` and
    :meth:`_WindowLayout.window_weights` (padded). Row j of L collects the
    weights stored at the pixels j − (dy, dx). The view below walks that
    window in reverse, a = r − dy and b = r − dx, so all its strides are
    positive.
    """
    samples, batch, num_padded, channels = rhs.shape
    rows, cols = layout.window_rows, layout.window_cols
    stride = layout.pixel_stride
    radius = layout.radius
    wide = layout.padded_width
    num_window = rows * cols
    entry = num_window * channels * channels
    solution = torch.zeros_like(rhs)
    diagonal = diagonal.unsqueeze(0)

    for first_index, count in layout.steps:
        corner = first_index - radius * wide - radius
        known = solution.as_strided(
            (samples, batch, count, rows, cols, channels),
            (batch * num_padded * channels, num_padded * channels, stride * channels,
             wide * channels, channels, 1),
            solution.storage_offset() + corner * channels,
        )
        # weights[b, corner + a·Wp + b', r − a, 2r − b', c', c] for a ≤ r, b' ≤ 2r.
        step_weights = weights.as_strided(
            (batch, count, rows, cols, channels, channels),
            (num_padded * entry, stride * entry,
             wide * entry - cols * channels * channels, entry - channels * channels,
             channels, 1),
            weights.storage_offset() + corner * entry + (num_window - 1) * channels * channels,
        )
        step_rhs = _step_view(rhs, first_index, count, layout)
        step_diagonal = _step_view(diagonal, first_index, count, layout)
        step_solution = _step_view(solution, first_index, count, layout)

        # Channels of one pixel in order: row c' needs the columns c < c'.
        for channel in range(channels):
            row_weights = step_weights[..., channel, :].unsqueeze(0)
            correction = (row_weights * known).sum(dim=(-3, -2, -1))
            value = (step_rhs[..., channel] - correction) / step_diagonal[..., channel]
            step_solution[..., channel].copy_(value)
    return solution


class _Unwhiten(torch.autograd.Function):
    """y = L⁻ᵀ w with an analytic backward pass.

    With u = L⁻¹ g for the incoming gradient g: ∂/∂w = u and
    ∂/∂L[j, i] = −uᵢ yⱼ, so log Lᵢᵢ gets −uᵢ yᵢ Lᵢᵢ and each off-diagonal
    weight gets −uᵢ yⱼ, both summed over samples.
    """

    @staticmethod
    def forward(ctx, whitened, log_diag, off_diag, radius):
        batch, channels, height, width = log_diag.shape
        layout = _window_layout(height, width, radius)

        flat = whitened.reshape(-1, batch, channels, height, width)
        solution = _solve_transposed(layout.pad(flat), log_diag, off_diag, layout)

        ctx.layout = layout
        ctx.save_for_backward(log_diag, off_diag, solution)
        return layout.unpad(solution).reshape(whitened.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        log_diag, off_diag, solution = ctx.saved_tensors
        layout = ctx.layout
        batch, channels, height, width = log_diag.shape
        radius = layout.radius

        diagonal = layout.pad_diagonal(log_diag)
        weights = layout.window_weights(off_diag, channels, padded=True)
        grad = grad_output.reshape(-1, batch, channels, height, width)
        adjoint_padded = _solve_forward(layout.pad(grad), diagonal, weights, layout)
        adjoint = layout.unpad(adjoint_padded)
        grad_whitened = adjoint.reshape(grad_output.shape)

        # −uᵢ yⱼ for every stored entry, as a local product of u and shifted y.
        solution_grid = solution.reshape(
            -1, batch, layout.padded_height, layout.padded_width, channels
        ).permute(0, 1, 4, 2, 3)
        inside = solution_grid[..., radius : radius + height, radius : radius + width]
        grad_log_diag = -(adjoint * inside).sum(0) * torch.exp(log_diag)

        grad_off_diag = torch.empty_like(off_diag)
        num_same = _num_same_pixel(channels)
        for row_channel in range(1, channels):
            first = row_channel * (row_channel - 1) // 2
            product = adjoint[:, :, :row_channel] * inside[:, :, row_channel : row_channel + 1]
            grad_off_diag[:, first : first + row_channel] = -product.sum(0)
        for index, (drow, dcol) in enumerate(forward_offsets(radius)):
            shifted = solution_grid[
                ..., radius + drow : radius + drow + height, radius + dcol : radius + dcol + width
            ]
            # (samples, batch, row channel, column channel, height, width)
            product = shifted.unsqueeze(3) * adjoint.unsqueeze(2)
            first = num_same + index * channels * channels
            grad_off_diag[:, first : first + channels * channels] = -product.sum(0).reshape(
                batch, channels * channels, height, width
            )
        return grad_whitened, grad_log_diag, grad_off_diag, None


class SUPNormal(StructuredNormal):
    """Structured-uncertainty Gaussian N(μ, (L Lᵀ)⁻¹) with a sparse local factor L.

    L is lower triangular in the interleaved pixel order of this module (raster
    order of pixels, channel 0 first within a pixel). Column i = (row, col, c)
    has the diagonal Lᵢᵢ = exp(log_diag[:, c, row, col]) and off-diagonal
    entries only on rows j that come after i:

    - the same pixel, channel c' > c (``channels·(channels−1)/2`` weights);
    - a pixel (row + drow, col + dcol) of the forward half-window of radius r
      (see :func:`forward_offsets`), any channel c'.

    The weight for L[j, i] is stored at the column's pixel (row, col), so
    whitening is a spatially varying local correlation. ``off_diag`` channels
    are ordered as follows (:func:`off_diagonal_layout` lists them):

    1. same-pixel terms, row channel c' = 1 … C−1, then column channel
       c = 0 … c'−1: channel index c'(c'−1)/2 + c;
    2. for each forward offset o = 0 … K−1 in :func:`forward_offsets` order,
       a C×C block in row-major order: channel index
       C(C−1)/2 + o·C² + c'·C + c contains L[(row+drow, col+dcol, c'), (row, col, c)].

    With one channel this is simply one channel per forward offset. Weights
    whose row pixel lies outside the image have no entry in L and are ignored.

    Parameters
    ----------
    mean : torch.Tensor
        Mean μ, shape (batch, channels, height, width).
    log_diag : torch.Tensor
        log Lᵢᵢ, shape (batch, channels, height, width).
    off_diag : torch.Tensor
        Off-diagonal weights, shape (batch, num_off_diagonal(radius, channels),
        height, width).
    radius : int
        Window radius r >= 1: r = 1 is a 3×3 window, r = 2 a 5×5 window.
    validate_args : bool or None
        See :class:`StructuredNormal`.

    Notes
    -----
    ``whiten`` costs O(N·K) time and memory. ``unwhiten`` (hence sampling) solves
    Lᵀ y = w by back-substitution over (r+1)·(height−1) + width wavefront steps,
    each step solving all pixels with equal (r+1)·row + col for every image and
    sample at once, channels of a pixel in reverse order.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        log_diag: torch.Tensor,
        off_diag: torch.Tensor,
        radius: int,
        validate_args: bool | None = None,
    ):
        super().__init__(mean, validate_args=validate_args)
        _check_radius(radius)
        batch, channels, height, width = mean.shape

        log_diag = _check_tensor("log_diag", log_diag)
        if log_diag.shape != mean.shape:
            raise ValueError(
                f"log_diag has shape {_shape_text(log_diag.shape)} but must match mean, "
                f"shape {_shape_text(mean.shape)} (batch, channels, height, width)"
            )

        off_diag = _check_tensor("off_diag", off_diag)
        num_weights = num_off_diagonal(radius, channels)
        expected = (batch, num_weights, height, width)
        if tuple(off_diag.shape) != expected:
            raise ValueError(
                f"off_diag has shape {_shape_text(off_diag.shape)} but radius={radius} "
                f"with {channels} channel(s) needs {_shape_text(expected)}, that is "
                "(batch, num_off_diagonal(radius, channels), height, width)"
            )

        _check_like("log_diag", log_diag, mean)
        _check_like("off_diag", off_diag, mean)
        if self._validate_args:
            _check_finite("log_diag", log_diag)
            _check_finite("off_diag", off_diag)

        self.log_diag = log_diag
        self.off_diag = off_diag
        self.radius = radius

    # -- whiten ---------------------------------------------------------------

    def _whiten_centered(self, residual: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.event_shape
        num_same = _num_same_pixel(channels)
        whitened = residual * torch.exp(self.log_diag)

        # Same pixel: w[c] += L[(p, c'), (p, c)] · r[c'] for c' > c.
        for row_channel in range(1, channels):
            first = row_channel * (row_channel - 1) // 2
            weights = self.off_diag[:, first : first + row_channel]
            target = whitened[..., :row_channel, :, :]
            target.addcmul_(weights, residual[..., row_channel : row_channel + 1, :, :])

        # Forward neighbours: w[c](p) += L[(p + o, c'), (p, c)] · r[c'](p + o).
        # Only the part of the image whose neighbour lies inside is updated,
        # which drops the entries that would point outside.
        for index, (drow, dcol) in enumerate(forward_offsets(self.radius)):
            if drow >= height or abs(dcol) >= width:
                continue
            col_start = max(0, -dcol)
            col_stop = width - max(0, dcol)
            target = whitened[..., : height - drow, col_start:col_stop]
            neighbour = residual[..., drow:, col_start + dcol : col_stop + dcol]
            base = num_same + index * channels * channels
            for row_channel in range(channels):
                first = base + row_channel * channels
                weights = self.off_diag[:, first : first + channels, : height - drow, col_start:col_stop]
                target.addcmul_(weights, neighbour[..., row_channel : row_channel + 1, :, :])
        return whitened

    # -- unwhiten -------------------------------------------------------------

    def _unwhiten_centered(self, whitened: torch.Tensor) -> torch.Tensor:
        return _Unwhiten.apply(whitened, self.log_diag, self.off_diag, self.radius)

    # -- densities and dense factor -------------------------------------------

    def _sum_log_diag(self) -> torch.Tensor:
        return self.log_diag.sum(dim=(-3, -2, -1))

    def precision_cholesky_dense(self) -> torch.Tensor:
        """Build the dense factor L in the interleaved pixel order, shape (batch, N, N).

        For tests and small images only.

        Raises
        ------
        ValueError
            If N = channels·height·width exceeds ``MAX_DENSE_SIZE``.
        """
        size = self._check_dense_size()
        batch, channels, height, width = self.loc.shape
        device = self.loc.device

        diag = torch.exp(self.log_diag).permute(0, 2, 3, 1).reshape(batch, size)
        dense = torch.diag_embed(diag)

        rows = torch.arange(height, device=device).repeat_interleave(width)
        cols = torch.arange(width, device=device).repeat(height)
        weights = self.off_diag.reshape(batch, -1, height * width)
        for index, (drow, dcol, row_channel, column_channel) in enumerate(
            off_diagonal_layout(self.radius, channels)
        ):
            target_row = rows + drow
            target_col = cols + dcol
            inside = (target_row < height) & (target_col >= 0) & (target_col < width)
            column = (rows * width + cols) * channels + column_channel
            row = (target_row * width + target_col) * channels + row_channel
            dense[:, row[inside], column[inside]] = weights[:, index, inside]
        return dense
