"""Shared fixtures for the test suite."""

from __future__ import annotations

import importlib.util
import pathlib
import socket

import numpy as np
import pytest
from skimage import io, transform

DATA_DIR = pathlib.Path(__file__).parent / "data"
REPO_ROOT = pathlib.Path(__file__).parent.parent


class NetworkAccessError(RuntimeError):
    """Raised when a test tries to open an internet connection."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Make every IPv4/IPv6 connection attempt fail, so a download is a test failure.

    Unix-domain sockets (used by Qt, Xvfb and multiprocessing) stay allowed.
    """
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex

    def guarded(original):
        def connect(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                raise NetworkAccessError(f"test tried to connect to {address!r}")
            return original(self, address)
        return connect

    def create_connection(address, *args, **kwargs):
        raise NetworkAccessError(f"test tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded(original_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(original_connect_ex))
    monkeypatch.setattr(socket, "create_connection", create_connection)


@pytest.fixture
def empty_cellpose_dir(tmp_path, monkeypatch):
    """Point CELLPOSE_LOCAL_MODELS_PATH at an empty folder."""
    folder = tmp_path / "cellpose_models"
    folder.mkdir()
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(folder))
    return folder


@pytest.fixture(scope="session")
def nih_crops() -> list[np.ndarray]:
    """Six real uninfected NIH crops, each (128, 128, 3) uint8, black outside the cell."""
    paths = sorted((DATA_DIR / "nih").glob("*.png"))
    assert len(paths) == 6, f"expected 6 NIH crops in {DATA_DIR / 'nih'}"
    return [io.imread(path)[..., :3] for path in paths]


def assemble_touching_field(crops: list[np.ndarray], background: tuple[int, int, int],
                            cell_size: int = 64, spacing: int = 62,
                            margin: int = 24) -> np.ndarray:
    """Place real cells on a 2×3 grid so that horizontal and vertical neighbours touch.

    Each crop is resized to ``cell_size`` and placed every ``spacing`` px, so
    neighbouring cells overlap by ``cell_size - spacing`` px. Pixels outside
    every cell get the ``background`` RGB colour.

    Returns
    -------
    np.ndarray, shape (2 * spacing + cell_size + 2 * margin - spacing, ...), uint8 RGB
    """
    rows, cols = 2, 3
    height = margin * 2 + spacing * (rows - 1) + cell_size
    width = margin * 2 + spacing * (cols - 1) + cell_size
    field = np.empty((height, width, 3), np.uint8)
    field[:] = background

    for index, crop in enumerate(crops[: rows * cols]):
        small = transform.resize(crop, (cell_size, cell_size), order=1,
                                 preserve_range=True, anti_aliasing=True)
        inside = transform.resize(crop.max(axis=-1) > 0, (cell_size, cell_size), order=0) > 0
        top = margin + spacing * (index // cols)
        left = margin + spacing * (index % cols)
        window = field[top:top + cell_size, left:left + cell_size]
        window[inside] = np.round(small[inside]).astype(np.uint8)
    return field


@pytest.fixture(scope="session")
def touching_field_dark(nih_crops) -> np.ndarray:
    """Six touching real cells on black: cells brighter than the background."""
    return assemble_touching_field(nih_crops, background=(0, 0, 0))


@pytest.fixture(scope="session")
def touching_field_bright(nih_crops) -> np.ndarray:
    """Six touching real cells on a pale background: cells darker, as in brightfield."""
    return assemble_touching_field(nih_crops, background=(235, 232, 236))


def _load_script(name: str):
    path = REPO_ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cellpose_test_model_script():
    """The script that trained the committed Cellpose test model (for its disk images)."""
    return _load_script("make_cellpose_test_model")


@pytest.fixture(scope="session")
def cellpose_test_weights() -> pathlib.Path:
    """Float16 Cellpose 3 weights trained on synthetic 30 px disks."""
    path = DATA_DIR / "cellpose" / "disks_cp3_fp16.pth"
    assert path.is_file(), f"{path} is missing: run scripts/make_cellpose_test_model.py {path}"
    return path


@pytest.fixture(scope="session")
def tiny_fluorescence_model(tmp_path_factory) -> pathlib.Path:
    """A grey SUPN model trained for a few iterations on the 16 fl_supn test crops.

    Tiny on purpose (16-pixel model input, 4 channels, 4 latent dimensions):
    the widget tests need a real model file, not a good one.
    """
    import torch

    from napari_supn.fitting import FitRequest, fit_model

    torch.set_num_threads(1)
    request = FitRequest(
        data=DATA_DIR / "fl_supn",
        out=tmp_path_factory.mktemp("models") / "tiny_fluorescence.supn",
        stage1_iterations=5,
        stage2_iterations=5,
        batch_size=8,
        downsample=8,
        depth=2,
        base_width=4,
        latent_size=4,
        fc_width=16,
        samples=2,
        validation_fraction=0.25,
        device="cpu",
    )
    return fit_model(request).path
