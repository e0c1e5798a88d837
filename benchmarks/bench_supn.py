"""Benchmark the SUPN core: whiten against conv2d, unwhiten against SciPy.

Every figure is the median of ``--repeats`` timed runs after one warm-up run,
and every comparison is a ratio measured in the same process, so that a
shared machine slows both sides alike. Run ``--help`` for the options; the
results recorded for this project are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np
import scipy
import scipy.sparse
import scipy.sparse.linalg
import torch

from napari_supn.device import select_device
from napari_supn.supn import SUPNormal, num_off_diagonal, off_diagonal_layout


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(function, device: torch.device, repeats: int) -> float:
    """Return the median wall time of ``function()`` over ``repeats`` runs, after one warm-up."""
    function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Return the peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_distribution(batch, radius, size, device, dtype, seed=0):
    """Build a SUPNormal with random but well-conditioned parameters."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 1, size, size)
    num_weights = num_off_diagonal(radius)
    mean = torch.randn(shape, generator=generator)
    log_diag = 0.5 + 0.1 * torch.randn(shape, generator=generator)
    off_diag = 0.1 * torch.randn((batch, num_weights, size, size), generator=generator)
    return SUPNormal(
        mean.to(device, dtype),
        log_diag.to(device, dtype),
        off_diag.to(device, dtype),
        radius,
        validate_args=False,
    )


def sparse_transposed_factor(distribution: SUPNormal, image: int) -> scipy.sparse.csr_matrix:
    """Build Lᵀ of one image as a SciPy CSR matrix, straight from the stored weights."""
    _, channels, height, width = distribution.mean.shape
    log_diag = distribution.log_diag[image].double().cpu().numpy()
    off_diag = distribution.off_diag[image].double().cpu().numpy()
    rows_grid, cols_grid = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")

    size = channels * height * width
    diagonal = np.exp(log_diag.transpose(1, 2, 0).reshape(-1))
    entry_rows = [np.arange(size)]
    entry_cols = [np.arange(size)]
    entry_values = [diagonal]
    layout = off_diagonal_layout(distribution.radius, channels)
    for index, (drow, dcol, row_channel, column_channel) in enumerate(layout):
        target_rows = rows_grid + drow
        target_cols = cols_grid + dcol
        inside = (target_rows < height) & (target_cols >= 0) & (target_cols < width)
        column = (rows_grid * width + cols_grid) * channels + column_channel
        row = (target_rows * width + target_cols) * channels + row_channel
        entry_rows.append(row[inside])
        entry_cols.append(column[inside])
        entry_values.append(off_diag[index][inside])

    factor = scipy.sparse.coo_matrix(
        (np.concatenate(entry_values), (np.concatenate(entry_rows), np.concatenate(entry_cols))),
        shape=(size, size),
    )
    return factor.T.tocsr()


def bench_whiten(device, repeats, batch, size):
    rows = []
    for radius in (1, 2):
        distribution = make_distribution(batch, radius, size, device, torch.float32)
        x = torch.randn(batch, 1, size, size, device=device)
        num_taps = num_off_diagonal(radius) + 1
        kernel = torch.randn(num_taps, 1, 2 * radius + 1, 2 * radius + 1, device=device)

        whiten_time = median_seconds(lambda: distribution.whiten(x), device, repeats)
        conv_time = median_seconds(
            lambda: torch.nn.functional.conv2d(x, kernel, padding=radius), device, repeats
        )
        rows.append((radius, num_taps, whiten_time, conv_time))
        del distribution, x
    return rows


def bench_unwhiten(device, repeats, size, radius, batches, scipy_images):
    rows = []
    for batch in batches:
        distribution = make_distribution(batch, radius, size, device, torch.float32, seed=batch)
        whitened = torch.randn(batch, 1, size, size, device=device)
        torch_time = median_seconds(lambda: distribution.unwhiten(whitened), device, repeats)

        # SciPy solves one image at a time: time a few and scale per image.
        checked = min(batch, scipy_images)
        solved = distribution.unwhiten(whitened) - distribution.mean
        scipy_times = []
        max_error = 0.0
        for image in range(checked):
            matrix = sparse_transposed_factor(distribution, image)
            rhs = whitened[image].reshape(-1).double().cpu().numpy()
            scipy_times.append(
                median_seconds(
                    lambda: scipy.sparse.linalg.spsolve_triangular(matrix, rhs, lower=False),
                    torch.device("cpu"),
                    repeats,
                )
            )
            reference = scipy.sparse.linalg.spsolve_triangular(matrix, rhs, lower=False)
            difference = solved[image].reshape(-1).double().cpu().numpy() - reference
            scale = np.abs(reference).max()
            max_error = max(max_error, float(np.abs(difference).max() / scale))
        rows.append((batch, torch_time, statistics.median(scipy_times), max_error))
        del distribution, whitened
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'auto' (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (default: 5)")
    parser.add_argument("--whiten-batch", type=int, default=256, help="images in the whiten batch")
    parser.add_argument("--size", type=int, default=128, help="image height and width in pixels")
    parser.add_argument("--scipy-images", type=int, default=4, help="images solved with SciPy per case")
    args = parser.parse_args(argv)

    device = select_device(args.device)
    torch.set_num_threads(args.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, scipy {scipy.__version__}")
    print(f"device {device}, torch threads {torch.get_num_threads()}, cpus available {len(os.sched_getaffinity(0))}")
    if device.type == "cuda":
        print(f"gpu {torch.cuda.get_device_name(device)}")
    print(f"command: {' '.join(sys.argv)}")
    print()

    print(f"## whiten, ({args.whiten_batch}, 1, {args.size}, {args.size}) float32, median of {args.repeats}")
    print("| radius | conv2d output channels | whiten (ms) | conv2d (ms) | whiten / conv2d |")
    print("| --- | --- | --- | --- | --- |")
    for radius, num_taps, whiten_time, conv_time in bench_whiten(
        device, args.repeats, args.whiten_batch, args.size
    ):
        print(
            f"| {radius} | {num_taps} | {whiten_time * 1e3:.1f} | {conv_time * 1e3:.1f} "
            f"| {whiten_time / conv_time:.2f} |"
        )
    print(f"peak RSS so far: {peak_rss_mib():.0f} MiB")
    print()

    radius = 2
    print(f"## unwhiten, {args.size}x{args.size}, radius {radius}, float32 torch vs float64 SciPy")
    print(
        "| batch | torch total (ms) | torch per image (ms) | SciPy per image (ms) "
        "| speed-up per image | max relative difference |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for batch, torch_time, scipy_time, max_error in bench_unwhiten(
        device, args.repeats, args.size, radius, (1, 64), args.scipy_images
    ):
        per_image = torch_time / batch
        print(
            f"| {batch} | {torch_time * 1e3:.1f} | {per_image * 1e3:.2f} | {scipy_time * 1e3:.2f} "
            f"| {scipy_time / per_image:.1f}x | {max_error:.1e} |"
        )
    print(f"peak RSS so far: {peak_rss_mib():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
