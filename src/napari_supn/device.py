"""Choose the torch device once, at the edge of the program."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("napari_supn")


def select_device(requested: str | torch.device | None = None) -> torch.device:
    """Return the torch device to run on.

    Parameters
    ----------
    requested : str, torch.device or None
        ``None`` or ``"auto"`` picks CUDA when available, else the CPU. Any
        other value (``"cpu"``, ``"cuda"``, ``"cuda:1"``) is used as given.

    Raises
    ------
    ValueError
        If the string is not a valid torch device, or CUDA is requested on a
        machine without it.
    """
    if requested is None or requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("Using device %s", device)
        return device

    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"invalid device {requested!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from error

    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {requested!r} requested but CUDA is not available here; "
            "use --device cpu or --device auto"
        )
    return device
