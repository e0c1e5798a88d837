"""One self-describing ``.supn`` model file: weights plus everything needed to use them.

A ``.supn`` file is a safetensors file. Its tensors are the ``SUPNVAE``
state dict. Its header metadata has one key, ``napari_supn``, whose value
is a JSON object with:

- ``format_version``: integer, currently 1;
- ``model_config``: ``ModelConfig.to_dict()``;
- ``preprocessing``: ``Preprocessing.to_dict()``;
- ``metadata``: free-form training facts (data summary, iterations and wall
  time per stage, hardware, healthy-score quantiles, default threshold,
  score settings).

Loading parses JSON and raw tensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from napari_supn.model import ModelConfig, SUPNVAE
from napari_supn.preprocessing import Preprocessing

logger = logging.getLogger("napari_supn")

FORMAT_VERSION = 1
METADATA_KEY = "napari_supn"
SUFFIX = ".supn"
SHIPPED_MODELS_DIR = Path(__file__).parent / "models"


class ModelFileError(ValueError):
    """A model file is missing, corrupt, of another format or incompatible."""


@dataclass
class LoadedModel:
    """A model read from a ``.supn`` file.

    Attributes
    ----------
    model : SUPNVAE
        The network, in eval mode, on the requested device.
    preprocessing : Preprocessing
        How crops must be prepared for this model.
    metadata : dict
        Training facts stored with the model (see the module docstring).
    path : pathlib.Path
        The file it was read from.
    """

    model: SUPNVAE
    preprocessing: Preprocessing
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def config(self) -> ModelConfig:
        """The model's architecture and likelihood settings."""
        return self.model.config


def _atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)`` and move the result onto ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        # mkstemp creates the file readable by its owner only; apply the usual umask mode instead.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Write ``tensors`` and a JSON ``header`` to a safetensors file, atomically.

    The header is stored as JSON under the ``napari_supn`` metadata key.
    """
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    metadata = {METADATA_KEY: json.dumps(header)}
    _atomic_write(Path(path), lambda temporary: save_file(contiguous, temporary, metadata=metadata))


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by ``save_tensors_atomic``: (tensors, header).

    Raises
    ------
    ModelFileError
        If the file is missing, not safetensors, truncated, or has no
        ``napari_supn`` JSON header.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw_metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for bad files
        raise ModelFileError(
            f"{path} is not a readable .supn model file (corrupt, truncated or another "
            f"format): {error}"
        ) from error

    if METADATA_KEY not in raw_metadata:
        raise ModelFileError(
            f"{path} is a safetensors file without napari-supn metadata; it was not "
            "written by napari-supn"
        )
    try:
        header = json.loads(raw_metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path} has invalid napari-supn metadata JSON: {error}") from error
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} has napari-supn metadata that is not a JSON object")
    return tensors, header


def save_model(
    path: str | Path,
    model: SUPNVAE,
    preprocessing: Preprocessing,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` with its preprocessing and metadata to one ``.supn`` file.

    The file is written to a temporary name in the same folder and then
    renamed, so an interrupted save never leaves a partial file at ``path``.
    ``metadata`` must be JSON-serialisable.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    if preprocessing.num_channels != model.config.in_channels:
        raise ValueError(
            f"preprocessing channels {preprocessing.channels!r} do not match the model's "
            f"{model.config.in_channels} input channels"
        )
    if preprocessing.model_size != model.config.image_size:
        raise ValueError(
            f"preprocessing gives {preprocessing.model_size}-pixel input but the model "
            f"expects {model.config.image_size}"
        )
    header = {
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "metadata": metadata or {},
    }
    try:
        json.dumps(header)
    except TypeError as error:
        raise ValueError(f"model metadata is not JSON-serialisable: {error}") from error

    save_tensors_atomic(path, model.state_dict(), header)
    logger.info("Wrote model %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def list_shipped_models() -> dict[str, Path]:
    """Return the models shipped with the package: name (file stem) → path."""
    if not SHIPPED_MODELS_DIR.is_dir():
        return {}
    return {path.stem: path for path in sorted(SHIPPED_MODELS_DIR.glob(f"*{SUFFIX}"))}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """Return the file for a shipped model name (e.g. ``"fluorescence"``) or a path."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    shipped = list_shipped_models()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    names = ", ".join(shipped) or "none installed"
    raise ModelFileError(
        f"model {str(name_or_path)!r} is neither a file nor a shipped model name "
        f"(shipped: {names})"
    )


def load_model(name_or_path: str | Path, device: str | torch.device | None = None) -> LoadedModel:
    """Read a ``.supn`` file (or a shipped model name) into a ready-to-use model.

    Parameters
    ----------
    name_or_path : str or Path
        A file path, or the name of a shipped model (see ``list_shipped_models``).
    device : str, torch.device or None
        Where to put the weights; None keeps them on the CPU.

    Raises
    ------
    ModelFileError
        If the file is missing, corrupt, truncated, of another format or
        version, lacks required entries, or its weights do not fit its
        configuration. The message names the file.
    """
    path = resolve_model_path(name_or_path)
    tensors, header = read_tensors(path)

    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model format version {version!r}; this napari-supn reads version "
            f"{FORMAT_VERSION}. Use the napari-supn release that wrote it, or retrain"
        )
    for key in ("model_config", "preprocessing"):
        if not isinstance(header.get(key), dict):
            raise ModelFileError(f"{path} is missing the {key!r} entry in its metadata")

    try:
        config = ModelConfig.from_dict(header["model_config"])
        preprocessing = Preprocessing.from_dict(header["preprocessing"])
    except (TypeError, ValueError) as error:
        raise ModelFileError(f"{path} has an invalid configuration: {error}") from error

    model = SUPNVAE(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ModelFileError(f"{path} has weights that do not match its configuration: {error}") from error

    if device is not None:
        model = model.to(device)
    model.eval()
    metadata = header.get("metadata") or {}
    logger.info(
        "Loaded model %s (%s likelihood, %s input %d px)",
        path,
        config.likelihood,
        preprocessing.channels,
        config.image_size,
    )
    return LoadedModel(model=model, preprocessing=preprocessing, metadata=metadata, path=path)
