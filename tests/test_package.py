import subprocess
import sys

import pytest

from napari_supn.cli import main
from napari_supn.device import select_device


def test_cli_help_lists_program(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "napari-supn" in capsys.readouterr().out


def test_console_script_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "napari_supn", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "usage: napari-supn" in result.stdout


def test_manifest_validates():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-supn")
    assert manifest.name == "napari-supn"


def test_select_device_auto_is_available():
    device = select_device("auto")
    assert device.type in {"cpu", "cuda"}


def test_select_device_rejects_unknown_name():
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        select_device("gpu0")
