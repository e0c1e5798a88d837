"""Train the small Cellpose 3 model that the segmentation tests load.

The tests must run a real Cellpose network without downloading weights, so
this script trains one offline on synthetic images of bright disks and saves
its state dict in float16 (half the size of Cellpose's float32 files).
Cellpose 3 loads the file through ``CellposeModel(pretrained_model=path)`` and
casts the weights back to float32.

Usage (about 1–2 minutes on 2 CPU cores)::

    .venv/bin/python scripts/make_cellpose_test_model.py tests/data/cellpose/disks_cp3_fp16.pth

The output is deterministic up to floating-point differences between
machines; the tests only require that the model finds the disks.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import tempfile

import numpy as np
import torch

# Disk images shared with the tests: 256×256, disks of diameter 30 px.
IMAGE_SIZE = 256
DISK_DIAMETER = 30


def make_disk_image(rng: np.random.Generator, n_disks: int, size: int = IMAGE_SIZE,
                    diameter: float = DISK_DIAMETER) -> tuple[np.ndarray, np.ndarray]:
    """Draw non-overlapping bright disks on a dark noisy background.

    Returns
    -------
    image : np.ndarray, shape (size, size), float32
    labels : np.ndarray, shape (size, size), int32
        One label per disk, 0 for background.
    """
    radius = diameter / 2
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(0.1, 0.03, (size, size)).astype(np.float32)
    labels = np.zeros((size, size), np.int32)

    centres: list[tuple[float, float]] = []
    attempts = 0
    while len(centres) < n_disks and attempts < 1000:
        attempts += 1
        cy, cx = rng.uniform(radius + 2, size - radius - 2, 2)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (2 * radius + 4) ** 2 for y, x in centres):
            centres.append((cy, cx))

    for index, (cy, cx) in enumerate(centres, start=1):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[inside] = rng.uniform(0.6, 1.0)
        labels[inside] = index
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return image, labels


def train_test_model(output: pathlib.Path, n_epochs: int = 60, seed: int = 0) -> pathlib.Path:
    """Train a Cellpose 3 network on synthetic disks and save it as float16."""
    from cellpose import models, train

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = [make_disk_image(rng, n_disks=12) for _ in range(8)]
    images = [image for image, _ in pairs]
    labels = [label for _, label in pairs]

    model = models.CellposeModel(pretrained_model=False, device=torch.device("cpu"),
                                 diam_mean=DISK_DIAMETER)
    with tempfile.TemporaryDirectory() as workdir:
        model_path, _, _ = train.train_seg(
            model.net, train_data=images, train_labels=labels, channels=[0, 0],
            n_epochs=n_epochs, learning_rate=0.05, weight_decay=1e-4,
            batch_size=8, save_path=workdir, model_name="disks", min_train_masks=1,
        )
        state = torch.load(model_path, map_location="cpu", weights_only=True)

    half = {name: (value.half() if value.is_floating_point() else value)
            for name, value in state.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(half, output)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=pathlib.Path, help="path of the float16 .pth file to write")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(2)
    path = train_test_model(args.output, n_epochs=args.epochs, seed=args.seed)
    logging.getLogger("napari_supn").info(
        "Wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)


if __name__ == "__main__":
    main()
