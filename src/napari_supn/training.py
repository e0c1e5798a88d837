"""Two-stage training of a ``SUPNVAE`` on healthy crops, with checkpoints.

Stage 1 trains the encoder and the mean decoder under the spherical
likelihood with the fixed variance σ² of the model config: the loss per
crop is the negative ELBO −log N(x | μ(z), σ² I) + KL(q(z | x) ‖ N(0, I)).
The learning rate drops tenfold after a set fraction of the iterations.

Stage 2 freezes the encoder and the mean decoder (``requires_grad`` off and
eval mode) and trains only the likelihood decoder on
−log p(x | z) + KL under the model's own likelihood (diagonal or SUPN), plus
an optional L1 penalty ``off_diagonal_l1 · mean |off-diagonal weights|``.
The KL term is constant in stage 2 and is included only so the logged loss
is the negative ELBO.

Checkpoints are safetensors files (no pickle) holding the model weights, the
Adam state, the batch-sampling random generator and a JSON header with the
iteration, the stage and the loss history. They are written atomically every
``checkpoint_every`` iterations, at the end of a stage and on cancel, so the
file on disk is always a complete state. ``resume=True`` continues from it
with the same optimizer state and random stream.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from napari_supn.model import SUPNVAE, kl_divergence
from napari_supn.model_file import ModelFileError, read_tensors, save_tensors_atomic
from napari_supn.progress import CancelCheck, Cancelled

logger = logging.getLogger("napari_supn")

CHECKPOINT_KIND = "napari-supn-checkpoint"
VALIDATION_BATCH = 64

StageProgress = Callable[[int, int, int, float], None]
"""progress(stage, iteration, total_iterations, loss) after every iteration."""


@dataclass
class TrainingConfig:
    """Settings of both training stages.

    Attributes
    ----------
    stage1_iterations, stage2_iterations : int
        Adam steps (mini-batches) in each stage.
    batch_size : int
        Crops per step, drawn uniformly with replacement.
    stage1_lr : float
        Stage-1 Adam learning rate before the drop.
    stage1_lr_drop_at : float
        Fraction of stage-1 iterations after which the learning rate is
        divided by 10 (0.5: halfway).
    stage2_lr : float
        Stage-2 Adam learning rate, constant.
    off_diagonal_l1 : float
        Weight of the L1 penalty on the mean absolute off-diagonal weight in
        stage 2 (SUPN only); 0 disables it.
    flips : bool
        Random horizontal and vertical flips of each crop.
    rotations : bool
        Random multiples of 90° rotation of each crop.
    seed : int
        Seed of weight initialisation (when the caller builds the model after
        ``seed_everything``), of the validation split and of batch sampling,
        augmentation and latent noise.
    checkpoint_every : int
        Iterations between checkpoints (one is also written at the end).
    log_every : int
        Iterations between log lines (with validation loss when available).
    validation_fraction : float
        Fraction of the healthy crops held out from training, for the
        validation loss and the healthy-score quantiles.
    """

    stage1_iterations: int = 6000
    stage2_iterations: int = 1500
    batch_size: int = 32
    stage1_lr: float = 1e-3
    stage1_lr_drop_at: float = 0.5
    stage2_lr: float = 1e-3
    off_diagonal_l1: float = 100.0
    flips: bool = True
    rotations: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    validation_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("stage1_iterations", "stage2_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("stage1_lr", "stage2_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.stage1_lr_drop_at <= 1:
            raise ValueError(f"stage1_lr_drop_at must lie in [0, 1], got {self.stage1_lr_drop_at!r}")
        if self.off_diagonal_l1 < 0:
            raise ValueError(f"off_diagonal_l1 must be ≥ 0, got {self.off_diagonal_l1!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must lie in [0, 1), got {self.validation_fraction!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-compatible dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainingConfig":
        """Build settings from ``to_dict`` output; unknown keys raise ValueError."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainingConfig keys: {', '.join(unknown)}")
        return cls(**values)

    def iterations(self, stage: int) -> int:
        """Return the iteration count of ``stage`` (1 or 2)."""
        return self.stage1_iterations if stage == 1 else self.stage2_iterations


@dataclass
class TrainingResult:
    """Outcome of one ``train`` call.

    Attributes
    ----------
    stage : int
        1 or 2.
    iterations : int
        Iterations completed in this stage, counting those before a resume.
    losses : list of (int, float)
        (iteration, training loss per crop) at every log step.
    validation_losses : list of (int, float)
        (iteration, validation loss per crop) at every log step, if any.
    wall_time_s : float
        Seconds spent in this stage, summed over resumed runs.
    checkpoint_path : pathlib.Path or None
        The last checkpoint written.
    """

    stage: int
    iterations: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    checkpoint_path: Path | None = None

    @property
    def final_loss(self) -> float | None:
        """The last logged training loss, or None."""
        return self.losses[-1][1] if self.losses else None


def seed_everything(seed: int) -> None:
    """Seed torch's and numpy's global generators (weight initialisation)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def split_train_validation(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(count)`` at random into (train, validation) index arrays, each sorted.

    At least one crop stays in training; the validation part has
    round(fraction · count) crops.
    """
    if count < 1:
        raise ValueError("cannot split an empty crop set")
    held_out = min(int(round(fraction * count)), count - 1)
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def augment(x: torch.Tensor, generator: torch.Generator, flips: bool, rotations: bool) -> torch.Tensor:
    """Apply random per-crop flips and 90° rotations to (batch, channels, H, W)."""
    batch = x.shape[0]
    if flips:
        flip_h = torch.rand(batch, generator=generator) < 0.5
        flip_v = torch.rand(batch, generator=generator) < 0.5
        x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
        x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
    if rotations:
        turns = torch.randint(4, (batch,), generator=generator)
        rotated = x.clone()
        for k in (1, 2, 3):
            selected = turns == k
            if selected.any():
                rotated[selected] = torch.rot90(x[selected], k, dims=(-2, -1))
        x = rotated
    return x


def stage_loss(
    model: SUPNVAE,
    x: torch.Tensor,
    stage: int,
    config: TrainingConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the mean loss per crop of ``stage`` and its parts for logging.

    Parameters
    ----------
    x : torch.Tensor
        Preprocessed crops, (batch, channels, height, width).
    generator : torch.Generator or None
        Source of the latent noise.
    """
    if stage == 1:
        z_mean, z_logvar = model.encode(x)
        z = model.reparameterize(z_mean, z_logvar, generator)
        distribution = model.stage1_likelihood(model.decode_mean(z))
    else:
        # The encoder and mean decoder are frozen, so no graph is needed for them.
        with torch.no_grad():
            z_mean, z_logvar = model.encode(x)
            z = model.reparameterize(z_mean, z_logvar, generator)
            mean = model.decode_mean(z)
        distribution = model.likelihood(z, mean)

    nll = -distribution.log_prob(x).mean()
    kl = kl_divergence(z_mean, z_logvar).mean()
    loss = nll + kl
    parts = {"nll": float(nll.detach()), "kl": float(kl.detach())}

    off_diag = getattr(distribution, "off_diag", None)
    if stage == 2 and off_diag is not None and config.off_diagonal_l1 > 0:
        penalty = config.off_diagonal_l1 * off_diag.abs().mean()
        loss = loss + penalty
        parts["l1"] = float(penalty.detach())
    return loss, parts


def _stage_parameters(model: SUPNVAE, stage: int) -> list[torch.nn.Parameter]:
    """Set requires_grad and train/eval modes for ``stage``; return the trained parameters."""
    if stage == 1:
        for parameter in model.likelihood_parameters():
            parameter.requires_grad_(False)
        trained = list(model.mean_parameters())
        for parameter in trained:
            parameter.requires_grad_(True)
        model.train()
        return trained

    trained = list(model.likelihood_parameters())
    if not trained:
        raise ValueError(
            "a spherical model has no likelihood decoder, so there is no stage 2; "
            "train stage 1 only, or use --likelihood diagonal or supn"
        )
    for parameter in model.mean_parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    model.train()
    model.encoder.eval()
    model.mean_decoder.eval()
    return trained


def _stage1_lr(config: TrainingConfig, iteration: int) -> float:
    drop_at = int(config.stage1_lr_drop_at * config.stage1_iterations)
    return config.stage1_lr if iteration < drop_at else config.stage1_lr / 10


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def save_checkpoint(
    path: str | Path,
    model: SUPNVAE,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: dict[str, Any],
) -> None:
    """Write model, optimizer and generator state plus a JSON ``state`` header, atomically."""
    tensors = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}

    optimizer_state = optimizer.state_dict()
    scalar_state: dict[str, dict[str, Any]] = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalar_state.setdefault(str(index), {})[key] = value
    tensors["generator"] = generator.get_state()

    header = {
        "kind": CHECKPOINT_KIND,
        "model_config": model.config.to_dict(),
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_scalar_state": scalar_state,
        **state,
    }
    save_tensors_atomic(path, tensors, header)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint: (tensors, header). Raises ModelFileError for a bad file."""
    tensors, header = read_tensors(path)
    if header.get("kind") != CHECKPOINT_KIND:
        raise ModelFileError(f"{path} is not a napari-supn training checkpoint")
    return tensors, header


def _restore_checkpoint(
    path: Path,
    model: SUPNVAE,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    stage: int,
) -> dict[str, Any]:
    tensors, header = read_checkpoint(path)
    if header.get("stage") != stage:
        raise ValueError(
            f"checkpoint {path} is from stage {header.get('stage')}, not stage {stage}; "
            "resume the matching stage or delete the checkpoint"
        )
    if header.get("model_config") != model.config.to_dict():
        raise ValueError(
            f"checkpoint {path} was written for another model configuration "
            f"({header.get('model_config')}); resume with the same settings"
        )

    model_state = {name[len("model."):]: t for name, t in tensors.items() if name.startswith("model.")}
    model.load_state_dict(model_state, strict=True)

    optimizer_state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            optimizer_state.setdefault(int(index), {})[key] = tensor
    for index, values in header.get("optimizer_scalar_state", {}).items():
        optimizer_state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict(
        {"state": optimizer_state, "param_groups": header["optimizer_param_groups"]}
    )
    generator.set_state(tensors["generator"])
    return header


# ----------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------


def _validation_loss(
    model: SUPNVAE, validation: torch.Tensor, stage: int, config: TrainingConfig, device
) -> float:
    """Return the loss per crop on up to VALIDATION_BATCH held-out crops, with fixed noise."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        loss, _ = stage_loss(model, validation[:VALIDATION_BATCH].to(device), stage, config, generator)
    if was_training:
        _stage_parameters(model, stage)
    return float(loss)


def train(
    model: SUPNVAE,
    images: torch.Tensor,
    config: TrainingConfig,
    stage: int,
    *,
    validation: torch.Tensor | None = None,
    progress: StageProgress | None = None,
    cancel: CancelCheck | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    device: torch.device | str | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
) -> TrainingResult:
    """Run one training stage in place on ``model``.

    Parameters
    ----------
    model : SUPNVAE
        The model; stage 2 expects its encoder and mean decoder already trained.
    images : torch.Tensor
        Preprocessed training crops, (N, channels, height, width), on any device.
    config : TrainingConfig
        Iterations, learning rates, augmentation, seed, checkpoint and log intervals.
    stage : int
        1 or 2.
    validation : torch.Tensor or None
        Held-out crops for the validation loss logged every ``log_every``.
    progress : callable or None
        ``progress(stage, iteration, total, loss)`` after every iteration.
    cancel : callable or None
        Polled after every iteration; when it returns True a checkpoint is
        written (if ``checkpoint_path`` is set) and ``Cancelled`` is raised.
    checkpoint_path : str, Path or None
        Checkpoint file, written every ``checkpoint_every`` iterations and at
        the end. None disables checkpoints.
    resume : bool
        Continue from ``checkpoint_path`` when it exists (weights, optimizer,
        random stream, loss history); start from scratch when it does not.
    device : torch.device, str or None
        Device to train on; None keeps the model's device.
    checkpoint_extra : dict or None
        JSON-serialisable facts stored in the checkpoint header (e.g. the
        preprocessing), returned by ``read_checkpoint``.

    Returns
    -------
    TrainingResult

    Raises
    ------
    Cancelled
        When ``cancel()`` returned True. The checkpoint then contains the last step.
    RuntimeError
        When the loss becomes NaN or infinite; the last checkpoint on disk
        is left as it was.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None

    total = config.iterations(stage)
    trained = _stage_parameters(model, stage)
    base_lr = config.stage1_lr if stage == 1 else config.stage2_lr
    optimizer = torch.optim.Adam(trained, lr=base_lr)
    generator = torch.Generator().manual_seed(config.seed * 10 + stage)

    result = TrainingResult(stage=stage, iterations=0, checkpoint_path=None)
    start = 0
    previous_time = 0.0
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        header = _restore_checkpoint(checkpoint_path, model, optimizer, generator, stage)
        start = int(header["iteration"])
        previous_time = float(header.get("wall_time_s", 0.0))
        result.losses = [tuple(item) for item in header.get("losses", [])]
        result.validation_losses = [tuple(item) for item in header.get("validation_losses", [])]
        result.checkpoint_path = checkpoint_path
        _stage_parameters(model, stage)
        logger.info("Resuming stage %d from %s at iteration %d of %d", stage, checkpoint_path, start, total)
    elif resume:
        logger.info("No checkpoint at %s; starting stage %d from iteration 0", checkpoint_path, stage)

    cpu_images = images.detach().cpu()
    count = cpu_images.shape[0]
    started = time.perf_counter()
    logger.info(
        "Stage %d: %d iterations, batch %d, %d training crops, device %s",
        stage, total, config.batch_size, count, device,
    )

    def write_checkpoint(iteration: int) -> None:
        if checkpoint_path is None:
            return
        state = {
            "stage": stage,
            "iteration": iteration,
            "total_iterations": total,
            "training_config": config.to_dict(),
            "wall_time_s": previous_time + time.perf_counter() - started,
            "losses": result.losses,
            "validation_losses": result.validation_losses,
            **(checkpoint_extra or {}),
        }
        save_checkpoint(checkpoint_path, model, optimizer, generator, state)
        result.checkpoint_path = checkpoint_path
        logger.debug("Checkpoint at iteration %d written to %s", iteration, checkpoint_path)

    iteration = start
    running, running_count = 0.0, 0
    for iteration in range(start + 1, total + 1):
        lr = _stage1_lr(config, iteration - 1) if stage == 1 else base_lr
        for group in optimizer.param_groups:
            group["lr"] = lr

        indices = torch.randint(count, (min(config.batch_size, count),), generator=generator)
        batch = augment(cpu_images[indices], generator, config.flips, config.rotations).to(device)
        loss, parts = stage_loss(model, batch, stage, config, generator)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(
                f"stage {stage} loss became {value} at iteration {iteration}; the last good "
                f"checkpoint is {checkpoint_path}. Lower the learning rate or check the data"
            )
        optimizer.step()
        running += value
        running_count += 1

        if iteration % config.log_every == 0 or iteration == total:
            mean_loss = running / running_count
            running, running_count = 0.0, 0
            result.losses.append((iteration, mean_loss))
            message = f"stage {stage} iteration {iteration}/{total}: loss {mean_loss:.1f}"
            message += "".join(f", {name} {part:.1f}" for name, part in parts.items())
            if validation is not None and validation.shape[0] > 0:
                validation_value = _validation_loss(model, validation, stage, config, device)
                result.validation_losses.append((iteration, validation_value))
                message += f", validation loss {validation_value:.1f}"
            logger.info("%s (lr %.0e)", message, lr)

        if progress is not None:
            progress(stage, iteration, total, value)
        if iteration % config.checkpoint_every == 0 and iteration != total:
            write_checkpoint(iteration)
        if cancel is not None and cancel():
            result.iterations = iteration
            write_checkpoint(iteration)
            result.wall_time_s = previous_time + time.perf_counter() - started
            logger.info("Stage %d cancelled at iteration %d; checkpoint %s", stage, iteration, checkpoint_path)
            raise Cancelled(f"stage {stage} training cancelled at iteration {iteration}")

    result.iterations = max(iteration, start)
    write_checkpoint(result.iterations)
    result.wall_time_s = previous_time + time.perf_counter() - started
    model.eval()
    logger.info(
        "Stage %d finished: %d iterations in %.0f s, final loss %s",
        stage,
        result.iterations,
        result.wall_time_s,
        "n/a" if result.final_loss is None else f"{result.final_loss:.1f}",
    )
    return result
