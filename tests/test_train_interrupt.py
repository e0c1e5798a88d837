"""Ctrl-C during ``napari-supn train`` keeps a checkpoint that --resume continues."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from napari_supn.training import read_checkpoint

DATA = Path(__file__).parent / "data" / "fl_supn"


def train_command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "napari_supn", "train",
        "--data", str(DATA),
        "--out", str(out),
        "--stage1-iterations", "100000",
        "--stage2-iterations", "5",
        "--batch-size", "4",
        "--downsample", "8",
        "--depth", "2",
        "--base-width", "4",
        "--latent-size", "4",
        "--checkpoint-every", "1000000",
        "--log-every", "1",
        "--device", "cpu",
        "--threads", "1",
        *extra,
    ]


def test_sigint_writes_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "interrupted.supn"
    process = subprocess.Popen(
        train_command(out), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "stage 1 iteration 3/" in line or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)
    _, remaining = process.communicate(timeout=120)
    log = "".join(seen) + remaining

    assert process.returncode == 130, log
    assert "--resume" in log
    assert not out.exists()
    checkpoint = Path(str(out) + ".ckpt")
    assert checkpoint.is_file()
    _, state = read_checkpoint(checkpoint)
    assert state["stage"] == 1
    assert state["iteration"] >= 3
    stopped_at = state["iteration"]

    resumed = subprocess.run(
        train_command(out, "--resume", "--stage1-iterations", str(stopped_at + 2)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert out.is_file()


def test_fresh_run_moves_old_checkpoint_aside(tmp_path):
    out = tmp_path / "again.supn"
    old_checkpoint = Path(str(out) + ".ckpt")
    old_checkpoint.write_bytes(b"an earlier run's checkpoint")
    command = train_command(out, "--stage1-iterations", "2", "--stage2-iterations", "1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    previous = Path(str(old_checkpoint) + ".previous")
    assert previous.read_bytes() == b"an earlier run's checkpoint"
    assert "moved it to" in result.stderr
