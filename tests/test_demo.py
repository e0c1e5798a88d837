"""``napari-supn demo``: a real napari window, scored and saved as a screenshot."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from skimage import io

from napari_supn.cli import main


def test_demo_screenshot(tiny_fluorescence_model, tmp_path):
    screenshot = tmp_path / "demo.png"
    command = [
        sys.executable, "-m", "napari_supn", "demo",
        "--model", str(tiny_fluorescence_model),
        "--segmenter", "classical",
        "--device", "cpu",
        "--screenshot", str(screenshot),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Saved screenshot" in result.stderr
    image = io.imread(screenshot)
    assert image.shape[0] >= 400
    assert image.shape[1] >= 600
    assert np.ptp(image[..., :3]) > 0


def test_demo_missing_model_message(capsys, tmp_path):
    code = main(["demo", "--model", str(tmp_path / "absent.supn")])

    assert code == 2
    assert "is neither a file nor a shipped model name" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the display check runs on Linux only")
def test_demo_without_display_message():
    command = [sys.executable, "-m", "napari_supn", "demo"]
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}

    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)

    assert result.returncode == 2, result.stderr[-3000:]
    assert "no display found" in result.stderr
    assert "xvfb-run -a napari-supn demo --screenshot out.png" in result.stderr
    assert "scripts/demo.sh" in result.stderr
    assert "Traceback" not in result.stderr
