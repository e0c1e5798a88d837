"""The VAE: an encoder, a mean decoder and a likelihood decoder.

``SUPNVAE`` maps a preprocessed crop x of shape (batch, channels, height,
width), with intensities in (-1, 1), to a diagonal Gaussian posterior q(z | x)
over a latent code z. From a latent sample, the mean decoder predicts the
image mean μ(z), and the likelihood decoder predicts the parameters of the
residual distribution around μ. The spherical likelihood has no such
parameters (one fixed variance). The diagonal likelihood has one log Lᵢᵢ per
pixel and channel, and the SUPN likelihood adds the off-diagonal weights of
the sparse Cholesky factor L of the precision.

Training runs in two stages (``napari_supn.training``): stage 1 trains the
encoder and the mean decoder under the spherical likelihood, and stage 2
freezes them and trains only the likelihood decoder. The two parameter groups
are exposed by ``mean_parameters`` and ``likelihood_parameters``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

import torch
from torch import nn

from napari_supn.supn import DiagonalNormal, SphericalNormal, SUPNormal, num_off_diagonal

LIKELIHOODS = ("supn", "diagonal", "spherical")


@dataclass
class ModelConfig:
    """Architecture and likelihood settings of a ``SUPNVAE``.

    Attributes
    ----------
    in_channels : int
        Image channels: 1 (grey, e.g. fluorescence) or 3 (RGB, e.g. Giemsa).
    image_size : int
        Side of the square model input in pixels, after preprocessing
        (e.g. 64 for 128-pixel crops pooled by 2). Must be divisible by
        ``2 ** depth``.
    latent_size : int
        Dimension of the latent code z.
    depth : int
        Number of encoder blocks. Each block halves the spatial size and
        doubles the channels; the decoders mirror it.
    base_width : int
        Channels of the first encoder block (the last decoder block).
    fc_width : int
        Width of the hidden fully connected layer between the convolutional
        features and the latent code.
    likelihood : str
        ``"supn"`` (sparse Cholesky precision factor), ``"diagonal"``
        (per-pixel variance) or ``"spherical"`` (one fixed variance).
    radius : int
        Connectivity radius r of the SUPN factor: each pixel links to the
        later pixels of its (2r+1)×(2r+1) window. Used only by ``"supn"``.
    log_diag_min, log_diag_max : float
        Range of the predicted log Lᵢᵢ:
        log Lᵢᵢ = min + (max − min) · sigmoid(a) for the decoder output a.
        Lᵢᵢ is the precision factor, so log Lᵢᵢ = −½ log σᵢ² for the
        diagonal likelihood.
    variance : float
        Fixed per-pixel variance σ² of the spherical likelihood, used by
        stage 1 and by ``"spherical"`` models, on images scaled to (−1, 1).
        0.11 suits fluorescence crops, 0.06 brightfield crops.
    """

    in_channels: int = 1
    image_size: int = 64
    latent_size: int = 100
    depth: int = 4
    base_width: int = 16
    fc_width: int = 300
    likelihood: str = "supn"
    radius: int = 1
    log_diag_min: float = -7.0
    log_diag_max: float = 4.0
    variance: float = 0.11

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {self.in_channels!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(
                f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}"
            )
        for name in ("latent_size", "depth", "base_width", "fc_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.radius, int) or self.radius < 1:
            raise ValueError(f"radius must be a positive integer, got {self.radius!r}")
        if not isinstance(self.image_size, int) or self.image_size < 2:
            raise ValueError(f"image_size must be an integer ≥ 2, got {self.image_size!r}")
        if self.image_size % (2**self.depth) != 0:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**depth = {2**self.depth}; "
                "change image_size or depth"
            )
        if not self.log_diag_min < self.log_diag_max:
            raise ValueError(
                f"log_diag_min ({self.log_diag_min}) must be below log_diag_max ({self.log_diag_max})"
            )
        if not (self.variance > 0 and math.isfinite(self.variance)):
            raise ValueError(f"variance must be a positive number, got {self.variance!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-compatible dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Build a config from ``to_dict`` output; unknown keys raise ValueError."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {', '.join(unknown)}")
        return cls(**values)

    @property
    def bottleneck_size(self) -> int:
        """Spatial side of the deepest feature map."""
        return self.image_size // (2**self.depth)

    def block_widths(self) -> list[int]:
        """Output channels of each encoder block, shallow to deep."""
        return [self.base_width * 2**index for index in range(self.depth)]


class EncoderBlock(nn.Module):
    """Two 3×3 convolutions, 2×2 max pooling, ReLU: halves the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return torch.relu(self.pool(self.conv2(x)))


class DecoderBlock(nn.Module):
    """Nearest-neighbour 2× upsampling, then two 3×3 convolutions with ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        x = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(x))


class Encoder(nn.Module):
    """Convolutional encoder: image → (z_mean, z_logvar), each (batch, latent_size)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        widths = config.block_widths()
        channels = [config.in_channels, *widths]
        self.blocks = nn.Sequential(
            *(EncoderBlock(channels[i], channels[i + 1]) for i in range(config.depth))
        )
        flat = widths[-1] * config.bottleneck_size**2
        self.hidden = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, config.fc_width),
            nn.ReLU(),
            nn.Linear(config.fc_width, config.fc_width),
            nn.ReLU(),
        )
        self.to_mean = nn.Linear(config.fc_width, config.latent_size)
        self.to_logvar = nn.Linear(config.fc_width, config.latent_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden(self.blocks(x))
        return self.to_mean(hidden), self.to_logvar(hidden)


class Decoder(nn.Module):
    """Mirror of the encoder: z (batch, latent_size) → (batch, out_channels, H, W).

    The final 3×3 convolution has no activation.
    """

    def __init__(self, config: ModelConfig, out_channels: int) -> None:
        super().__init__()
        widths = config.block_widths()
        self.top_channels = widths[-1]
        self.top_size = config.bottleneck_size
        self.hidden = nn.Sequential(
            nn.Linear(config.latent_size, config.fc_width),
            nn.ReLU(),
            nn.Linear(config.fc_width, self.top_channels * self.top_size**2),
            nn.ReLU(),
        )
        reversed_widths = widths[::-1]
        outputs = [*reversed_widths[1:], config.base_width]
        self.blocks = nn.Sequential(
            *(DecoderBlock(reversed_widths[i], outputs[i]) for i in range(config.depth))
        )
        self.head = nn.Conv2d(config.base_width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden(z).view(-1, self.top_channels, self.top_size, self.top_size)
        return self.head(self.blocks(hidden))


class SUPNVAE(nn.Module):
    """VAE with a spherical, diagonal or SUPN Gaussian likelihood.

    Parameters
    ----------
    config : ModelConfig
        Architecture and likelihood settings.

    Attributes
    ----------
    encoder : Encoder
        Image → posterior mean and log-variance.
    mean_decoder : Decoder
        Latent code → image mean μ, (batch, channels, height, width).
    likelihood_decoder : Decoder or None
        Latent code → raw likelihood parameters: ``channels`` log-diagonal
        maps, then (SUPN only) ``num_off_diagonal(radius, channels)``
        off-diagonal maps. None for the spherical likelihood.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.mean_decoder = Decoder(config, config.in_channels)

        self.num_off_diagonal = 0
        if config.likelihood == "supn":
            self.num_off_diagonal = num_off_diagonal(config.radius, config.in_channels)
        if config.likelihood == "spherical":
            self.likelihood_decoder: Decoder | None = None
        else:
            out_channels = config.in_channels + self.num_off_diagonal
            self.likelihood_decoder = Decoder(config, out_channels)
            self._initialise_likelihood_head()

    def _initialise_likelihood_head(self) -> None:
        """Start the likelihood decoder at the stage-1 spherical likelihood.

        With zero head weights, every log Lᵢᵢ starts at −½ log σ² of the
        fixed stage-1 variance, and every off-diagonal weight at 0, so
        stage 2 begins from the distribution that stage 1 trained under.
        """
        config = self.config
        head = self.likelihood_decoder.head
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        target = -0.5 * math.log(config.variance)
        span = config.log_diag_max - config.log_diag_min
        fraction = (target - config.log_diag_min) / span
        fraction = min(max(fraction, 1e-4), 1 - 1e-4)
        with torch.no_grad():
            head.bias[: config.in_channels] = math.log(fraction / (1 - fraction))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior mean and log-variance, each (batch, latent_size).

        Parameters
        ----------
        x : torch.Tensor
            Preprocessed crops, (batch, in_channels, image_size, image_size).
        """
        expected = (self.config.in_channels, self.config.image_size, self.config.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"model expects input of shape (batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}), got {tuple(x.shape)}; prepare crops with the model's "
                "Preprocessing"
            )
        return self.encoder(x)

    @staticmethod
    def reparameterize(
        z_mean: torch.Tensor,
        z_logvar: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw z = mean + exp(½ logvar) · ε with ε ~ N(0, I), differentiably.

        ``generator`` (on any device) makes the draw reproducible; the noise
        is drawn on the generator's device and moved to ``z_mean``'s.
        """
        if generator is None:
            noise = torch.randn_like(z_mean)
        else:
            noise = torch.randn(
                z_mean.shape, generator=generator, device=generator.device, dtype=z_mean.dtype
            ).to(z_mean.device)
        return z_mean + torch.exp(0.5 * z_logvar) * noise

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """Return the image mean μ(z), (batch, in_channels, image_size, image_size)."""
        return self.mean_decoder(z)

    def log_diag_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Map unbounded decoder outputs to log Lᵢᵢ in (log_diag_min, log_diag_max)."""
        config = self.config
        span = config.log_diag_max - config.log_diag_min
        return config.log_diag_min + span * torch.sigmoid(raw)

    def likelihood(self, z: torch.Tensor, mean: torch.Tensor):
        """Return the residual distribution p(x | z) around ``mean``.

        Parameters
        ----------
        z : torch.Tensor
            Latent codes, (batch, latent_size).
        mean : torch.Tensor
            Image mean from ``decode_mean(z)``, (batch, channels, height, width).

        Returns
        -------
        SUPNormal, DiagonalNormal or SphericalNormal
            Batch of distributions over images shaped like ``mean``.
        """
        config = self.config
        if config.likelihood == "spherical":
            return spherical_normal(mean, config.variance)

        raw = self.likelihood_decoder(z)
        log_diag = self.log_diag_from_raw(raw[:, : config.in_channels])
        if config.likelihood == "diagonal":
            return DiagonalNormal(mean, log_diag)
        off_diag = raw[:, config.in_channels :]
        return SUPNormal(mean, log_diag, off_diag, config.radius)

    def stage1_likelihood(self, mean: torch.Tensor) -> SphericalNormal:
        """Return the fixed-variance spherical likelihood that stage 1 trains under."""
        return spherical_normal(mean, self.config.variance)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Encode, sample one z per image and return (distribution, z_mean, z_logvar)."""
        z_mean, z_logvar = self.encode(x)
        z = self.reparameterize(z_mean, z_logvar, generator)
        mean = self.decode_mean(z)
        return self.likelihood(z, mean), z_mean, z_logvar

    def mean_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained in stage 1: the encoder and the mean decoder."""
        yield from self.encoder.parameters()
        yield from self.mean_decoder.parameters()

    def likelihood_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained in stage 2: the likelihood decoder (none if spherical)."""
        if self.likelihood_decoder is not None:
            yield from self.likelihood_decoder.parameters()


def kl_divergence(z_mean: torch.Tensor, z_logvar: torch.Tensor) -> torch.Tensor:
    """Return KL(N(mean, exp(logvar)) ‖ N(0, I)) per sample, shape (batch,)."""
    return 0.5 * torch.sum(z_mean**2 + torch.exp(z_logvar) - 1.0 - z_logvar, dim=1)


def spherical_normal(mean: torch.Tensor, variance: float) -> SphericalNormal:
    """Build the ``SphericalNormal`` with per-pixel variance ``variance`` around ``mean``."""
    return SphericalNormal(mean, variance=variance)
