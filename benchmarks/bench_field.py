"""Time the field pipeline: segmentation, cropping and scoring per field of view.

For each field image, :func:`napari_supn.pipeline.score_field` runs once
with segmentation (the segmenter chosen by ``--segmenter``) and the largest
number of latent samples. It then runs again on the same labels for every
other sample count, so segmentation is timed once per field and scoring
once per (field, S). Times come from ``FieldResult.seconds``; "cropping" includes
pasting the maps back into field coordinates. Each configuration is run
``--repeats`` times and the median is reported, after one untimed warm-up
run. Prints one table row per S with the median seconds per field and the
median over fields of the cells scored per second, and the
machine (CPU count, torch threads, load average at the start and end).

The images are read at run time; pass any field images, for example the
IML-Malaria fields (never copied into the repository) or the bundled
``src/napari_supn/sample_data/giemsa_field.png``.

Usage::

    .venv/bin/python benchmarks/bench_field.py /path/to/iml_malaria_fov/images/*.JPG \
        --model giemsa --fields 3 --samples 1 4 16 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

from napari_supn.data import read_image
from napari_supn.model_file import load_model
from napari_supn.pipeline import score_field


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="field images")
    parser.add_argument("--model", required=True, help="model file or shipped model name")
    parser.add_argument("--fields", type=int, default=3, help="number of images to time (first N)")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16], help="latent samples S")
    parser.add_argument("--segmenter", default="auto", choices=("auto", "cellpose", "classical"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (median)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device)
    samples = sorted(set(args.samples), reverse=True)
    load_start = os.getloadavg()

    # One untimed run first, so one-off start-up costs (lazy imports, first
    # torch calls) do not land in the first timed configuration.
    score_field(read_image(args.images[0]), loaded, samples=1, segmenter=args.segmenter)

    segmentation_seconds, cells_per_field = [], []
    cropping = {s: [] for s in samples}
    scoring = {s: [] for s in samples}
    for path in args.images[: args.fields]:
        image = read_image(path)
        labels = None
        for count in samples:
            runs = []
            for _ in range(args.repeats):
                result = score_field(image, loaded, labels=labels, samples=count, segmenter=args.segmenter)
                runs.append(result.seconds)
            if labels is None:
                labels = result.labels
                segmentation_seconds.append(statistics.median(r["segmentation"] for r in runs))
                cells_per_field.append(result.n_cells)
            cropping[count].append(statistics.median(r["cropping"] for r in runs))
            scoring[count].append(statistics.median(r["scoring"] for r in runs))
        print(f"{path.name}: {image.shape[1]}×{image.shape[0]} px, {cells_per_field[-1]} cells, "
              f"segmentation {segmentation_seconds[-1]:.2f} s", flush=True)

    load_end = os.getloadavg()
    print()
    print(f"model {args.model}: {loaded.preprocessing.channels}, {loaded.config.likelihood}, "
          f"input {loaded.preprocessing.model_size} px; device {args.device}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")
    print(f"load average (1 min) at start {load_start[0]:.1f}, at end {load_end[0]:.1f}")
    print(f"fields {len(cells_per_field)}, median cells per field {statistics.median(cells_per_field):.0f}, "
          f"median segmentation {statistics.median(segmentation_seconds):.2f} s per field")
    print("| S | segmentation (s) | cropping (s) | scoring (s) | total (s/field) | scoring (cells/s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for count in sorted(samples):
        segment_s = statistics.median(segmentation_seconds)
        crop_s = statistics.median(cropping[count])
        score_s = statistics.median(scoring[count])
        rate = statistics.median(np.asarray(cells_per_field) / np.asarray(scoring[count]))
        print(f"| {count} | {segment_s:.2f} | {crop_s:.2f} | {score_s:.2f} | "
              f"{segment_s + crop_s + score_s:.2f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
