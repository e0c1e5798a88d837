"""Tests of the structured Gaussians against dense linear algebra (float64, tiny images)."""

import math

import pytest
import torch

from napari_supn.supn import (
    MAX_DENSE_SIZE,
    DiagonalNormal,
    SphericalNormal,
    StructuredNormal,
    SUPNormal,
    forward_offsets,
    num_off_diagonal,
    off_diagonal_layout,
)

DTYPE = torch.float64

# (channels, radius, height, width): non-square images, radius 3 wider than a side.
CASES = [
    (1, 1, 4, 5),
    (1, 2, 5, 3),
    (1, 3, 3, 6),
    (3, 1, 3, 4),
    (3, 2, 4, 3),
    (3, 3, 2, 4),
]


def make_supn(channels, radius, height, width, batch=2, seed=0, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, channels, height, width)
    num_weights = num_off_diagonal(radius, channels)
    mean = torch.randn(shape, generator=generator, dtype=DTYPE)
    log_diag = scale * torch.randn(shape, generator=generator, dtype=DTYPE)
    off_diag = scale * torch.randn(
        (batch, num_weights, height, width), generator=generator, dtype=DTYPE
    )
    return SUPNormal(mean, log_diag, off_diag, radius)


def to_dense_vector(images):
    """Flatten (..., C, H, W) images in the documented interleaved pixel order."""
    channels, height, width = images.shape[-3:]
    moved = images.movedim(-3, -1)
    return moved.reshape(*images.shape[:-3], channels * height * width)


def expected_pattern(channels, radius, height, width):
    """Non-zero pattern of L written out from the definition, entry by entry."""
    size = channels * height * width
    pattern = torch.zeros(size, size, dtype=torch.bool)
    for row in range(height):
        for col in range(width):
            for channel in range(channels):
                column_index = (row * width + col) * channels + channel
                pattern[column_index, column_index] = True
                for other_row in range(height):
                    for other_col in range(width):
                        for other_channel in range(channels):
                            drow = other_row - row
                            dcol = other_col - col
                            same_pixel = drow == 0 and dcol == 0 and other_channel > channel
                            in_window = 0 <= drow <= radius and abs(dcol) <= radius
                            forward = drow > 0 or dcol > 0
                            if same_pixel or (in_window and forward):
                                row_index = (other_row * width + other_col) * channels + other_channel
                                pattern[row_index, column_index] = True
    return pattern


# --------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------


def test_num_off_diagonal_values():
    assert num_off_diagonal(1) == 4
    assert num_off_diagonal(2) == 12
    assert num_off_diagonal(3) == 24
    assert num_off_diagonal(1, channels=3) == 3 + 9 * 4
    assert num_off_diagonal(2, channels=2) == 1 + 4 * 12


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_forward_offsets_are_forward_half_window(radius):
    offsets = forward_offsets(radius)
    window = [
        (drow, dcol)
        for drow in range(-radius, radius + 1)
        for dcol in range(-radius, radius + 1)
        if (drow, dcol) > (0, 0)
    ]
    assert offsets == window
    assert len(offsets) == ((2 * radius + 1) ** 2 - 1) // 2


@pytest.mark.parametrize("channels", [1, 3])
def test_off_diagonal_layout_matches_count(channels):
    layout = off_diagonal_layout(2, channels)
    assert len(layout) == num_off_diagonal(2, channels)
    assert len(set(layout)) == len(layout)


@pytest.mark.parametrize("channels, radius, height, width", CASES)
def test_dense_factor_has_documented_pattern(channels, radius, height, width):
    distribution = make_supn(channels, radius, height, width)
    dense = distribution.precision_cholesky_dense()
    pattern = expected_pattern(channels, radius, height, width)
    assert torch.equal(dense != 0, pattern.expand_as(dense))


def test_off_diagonal_channel_sets_documented_entry():
    # Three channels, radius 1: check the docstring's index formula for each channel.
    channels, radius, height, width = 3, 1, 4, 4
    num_same = channels * (channels - 1) // 2
    row, col = 1, 1
    for index in range(num_off_diagonal(radius, channels)):
        off_diag = torch.zeros(1, num_off_diagonal(radius, channels), height, width, dtype=DTYPE)
        off_diag[0, index, row, col] = 0.5
        distribution = SUPNormal(
            torch.zeros(1, channels, height, width, dtype=DTYPE),
            torch.zeros(1, channels, height, width, dtype=DTYPE),
            off_diag,
            radius,
        )
        dense = distribution.precision_cholesky_dense()[0] - torch.eye(channels * height * width, dtype=DTYPE)

        if index < num_same:
            row_channel = next(c for c in range(1, channels) if index < c * (c + 1) // 2)
            column_channel = index - row_channel * (row_channel - 1) // 2
            drow, dcol = 0, 0
        else:
            offset, rest = divmod(index - num_same, channels * channels)
            row_channel, column_channel = divmod(rest, channels)
            drow, dcol = forward_offsets(radius)[offset]

        column_index = (row * width + col) * channels + column_channel
        row_index = ((row + drow) * width + col + dcol) * channels + row_channel
        assert dense[row_index, column_index] == 0.5, f"off_diag channel {index}"
        assert int((dense != 0).sum()) == 1, f"off_diag channel {index}"


def test_weights_pointing_outside_are_ignored():
    # Only the weight of the last pixel is non-zero; every neighbour is outside.
    off_diag = torch.zeros(1, 4, 3, 3, dtype=DTYPE)
    off_diag[0, :, 2, 2] = 7.0
    mean = torch.zeros(1, 1, 3, 3, dtype=DTYPE)
    distribution = SUPNormal(mean, torch.zeros_like(mean), off_diag, 1)
    x = torch.randn(1, 1, 3, 3, dtype=DTYPE)
    assert torch.equal(distribution.precision_cholesky_dense()[0], torch.eye(9, dtype=DTYPE))
    assert torch.allclose(distribution.whiten(x), x)


# --------------------------------------------------------------------------
# Against dense linear algebra
# --------------------------------------------------------------------------


@pytest.mark.parametrize("channels, radius, height, width", CASES)
def test_whiten_equals_dense_transpose_product(channels, radius, height, width):
    distribution = make_supn(channels, radius, height, width)
    x = torch.randn(3, 2, channels, height, width, dtype=DTYPE)
    dense = distribution.precision_cholesky_dense()
    residual = to_dense_vector(x - distribution.mean)
    expected = torch.einsum("bji,sbj->sbi", dense, residual)
    assert torch.allclose(to_dense_vector(distribution.whiten(x)), expected, atol=1e-12)


@pytest.mark.parametrize("channels, radius, height, width", CASES)
def test_log_prob_equals_multivariate_normal(channels, radius, height, width):
    distribution = make_supn(channels, radius, height, width)
    dense = distribution.precision_cholesky_dense()
    reference = torch.distributions.MultivariateNormal(
        to_dense_vector(distribution.mean), precision_matrix=dense @ dense.transpose(-1, -2)
    )
    x = torch.randn(4, 2, channels, height, width, dtype=DTYPE)
    log_prob = distribution.log_prob(x)
    assert log_prob.shape == (4, 2)
    assert torch.allclose(log_prob, reference.log_prob(to_dense_vector(x)), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("channels, radius, height, width", CASES)
def test_unwhiten_inverts_whiten(channels, radius, height, width):
    distribution = make_supn(channels, radius, height, width)
    x = torch.randn(2, channels, height, width, dtype=DTYPE)
    whitened = torch.randn(5, 2, channels, height, width, dtype=DTYPE)
    assert torch.allclose(distribution.unwhiten(distribution.whiten(x)), x, atol=1e-10)
    assert torch.allclose(distribution.whiten(distribution.unwhiten(whitened)), whitened, atol=1e-10)


@pytest.mark.parametrize("channels, radius, height, width", CASES)
def test_unwhiten_equals_dense_triangular_solve(channels, radius, height, width):
    distribution = make_supn(channels, radius, height, width)
    whitened = torch.randn(2, channels, height, width, dtype=DTYPE)
    dense = distribution.precision_cholesky_dense()
    solved = torch.linalg.solve_triangular(
        dense.transpose(-1, -2), to_dense_vector(whitened).unsqueeze(-1), upper=True
    ).squeeze(-1)
    expected = solved + to_dense_vector(distribution.mean)
    assert torch.allclose(to_dense_vector(distribution.unwhiten(whitened)), expected, atol=1e-10)


def test_unwhiten_accepts_several_sample_dims():
    distribution = make_supn(1, 1, 3, 4)
    whitened = torch.randn(2, 3, 2, 1, 3, 4, dtype=DTYPE)
    x = distribution.unwhiten(whitened)
    assert x.shape == whitened.shape
    assert torch.allclose(x[1, 2], distribution.unwhiten(whitened[1, 2]), atol=1e-12)


@pytest.mark.parametrize("channels, radius", [(1, 1), (3, 1), (2, 2)])
def test_sample_covariance_matches_inverse_precision(channels, radius):
    torch.manual_seed(1234)
    height, width = 2, 3
    distribution = make_supn(channels, radius, height, width, batch=1, seed=5)
    dense = distribution.precision_cholesky_dense()[0]
    covariance = torch.cholesky_inverse(dense)
    num_samples = 40_000

    samples = to_dense_vector(distribution.sample((num_samples,))[:, 0])
    assert samples.shape == (num_samples, channels * height * width)
    centred = samples - to_dense_vector(distribution.mean[0])
    empirical = centred.T @ centred / num_samples

    # Standard error of each sample covariance entry of a Gaussian.
    variances = torch.diagonal(covariance)
    standard_error = torch.sqrt((covariance**2 + torch.outer(variances, variances)) / num_samples)
    z_scores = (empirical - covariance).abs() / standard_error
    assert float(z_scores.max()) < 5.5

    mean_error = centred.mean(0).abs() / torch.sqrt(variances / num_samples)
    assert float(mean_error.max()) < 5.5


def test_sample_shapes_and_no_grad():
    distribution = make_supn(3, 1, 3, 4)
    distribution.off_diag.requires_grad_(True)
    assert distribution.sample().shape == (2, 3, 3, 4)
    samples = distribution.sample((4, 5))
    assert samples.shape == (4, 5, 2, 3, 3, 4)
    assert not samples.requires_grad
    assert distribution.batch_shape == (2,)
    assert distribution.event_shape == (3, 3, 4)


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2])
def test_gradcheck_log_prob_and_unwhiten(channels):
    radius, height, width = 1, 3, 3
    shape = (1, channels, height, width)
    num_weights = num_off_diagonal(radius, channels)
    mean = torch.randn(shape, dtype=DTYPE, requires_grad=True)
    log_diag = (0.3 * torch.randn(shape, dtype=DTYPE)).requires_grad_()
    off_diag = (0.3 * torch.randn(1, num_weights, height, width, dtype=DTYPE)).requires_grad_()
    x = torch.randn(2, *shape, dtype=DTYPE, requires_grad=True)

    def log_prob(mean, log_diag, off_diag, x):
        return SUPNormal(mean, log_diag, off_diag, radius).log_prob(x)

    def unwhiten(mean, log_diag, off_diag, x):
        return SUPNormal(mean, log_diag, off_diag, radius).unwhiten(x)

    assert torch.autograd.gradcheck(log_prob, (mean, log_diag, off_diag, x))
    assert torch.autograd.gradcheck(unwhiten, (mean, log_diag, off_diag, x))


def test_rsample_is_differentiable():
    shape = (1, 1, 3, 4)
    mean = torch.randn(shape, dtype=DTYPE, requires_grad=True)
    log_diag = (0.3 * torch.randn(shape, dtype=DTYPE)).requires_grad_()
    off_diag = (0.3 * torch.randn(1, 4, 3, 4, dtype=DTYPE)).requires_grad_()

    def draw(mean, log_diag, off_diag):
        torch.manual_seed(7)
        return SUPNormal(mean, log_diag, off_diag, 1).rsample((2,))

    assert torch.autograd.gradcheck(draw, (mean, log_diag, off_diag))


# --------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------


def test_spherical_matches_closed_form():
    mean = torch.randn(2, 1, 3, 4, dtype=DTYPE)
    x = torch.randn(5, 2, 1, 3, 4, dtype=DTYPE)
    variance = 0.11
    distribution = SphericalNormal(mean, variance=variance)
    sigma = math.sqrt(variance)

    expected = torch.distributions.Normal(mean, sigma).log_prob(x).sum(dim=(-3, -2, -1))
    assert torch.allclose(distribution.log_prob(x), expected, atol=1e-10)
    assert torch.allclose(distribution.whiten(x), (x - mean) / sigma)
    assert torch.allclose(distribution.unwhiten(distribution.whiten(x)), x)
    assert torch.allclose(
        distribution.precision_cholesky_dense(), torch.eye(12, dtype=DTYPE).expand(2, 12, 12) / sigma
    )

    from_log_sigma = SphericalNormal(mean, log_sigma=math.log(sigma))
    assert torch.allclose(from_log_sigma.log_prob(x), expected, atol=1e-10)


def test_spherical_accepts_one_sigma_per_image():
    mean = torch.zeros(2, 1, 2, 2, dtype=DTYPE)
    log_sigma = torch.tensor([0.0, math.log(2.0)], dtype=DTYPE)
    distribution = SphericalNormal(mean, log_sigma=log_sigma)
    x = torch.ones(2, 1, 2, 2, dtype=DTYPE)
    assert torch.allclose(distribution.whiten(x)[1], torch.full((1, 2, 2), 0.5, dtype=DTYPE))
    assert torch.allclose(distribution.whiten(x)[0], x[0])


def test_diagonal_matches_closed_form():
    mean = torch.randn(2, 3, 3, 2, dtype=DTYPE)
    log_diag = 0.5 * torch.randn(2, 3, 3, 2, dtype=DTYPE)
    x = torch.randn(4, 2, 3, 3, 2, dtype=DTYPE)
    distribution = DiagonalNormal(mean, log_diag)
    sigma = torch.exp(-log_diag)

    expected = torch.distributions.Normal(mean, sigma).log_prob(x).sum(dim=(-3, -2, -1))
    assert torch.allclose(distribution.log_prob(x), expected, atol=1e-10)
    assert torch.allclose(distribution.whiten(x), (x - mean) / sigma)
    assert torch.allclose(distribution.unwhiten(distribution.whiten(x)), x)
    assert torch.allclose(distribution.variance, sigma**2)

    dense = distribution.precision_cholesky_dense()
    assert torch.allclose(torch.diagonal(dense, dim1=-2, dim2=-1), to_dense_vector(1 / sigma))
    assert torch.count_nonzero(dense - torch.diag_embed(torch.diagonal(dense, dim1=-2, dim2=-1))) == 0


def test_supn_with_zero_weights_equals_diagonal():
    mean = torch.randn(2, 3, 4, 3, dtype=DTYPE)
    log_diag = 0.5 * torch.randn(2, 3, 4, 3, dtype=DTYPE)
    off_diag = torch.zeros(2, num_off_diagonal(2, 3), 4, 3, dtype=DTYPE)
    x = torch.randn(2, 3, 4, 3, dtype=DTYPE)
    supn = SUPNormal(mean, log_diag, off_diag, 2)
    diagonal = DiagonalNormal(mean, log_diag)
    assert torch.allclose(supn.log_prob(x), diagonal.log_prob(x))
    assert torch.allclose(supn.unwhiten(x), diagonal.unwhiten(x))


def test_baseline_samples_have_closed_form_moments():
    torch.manual_seed(99)
    mean = torch.tensor([1.0, -2.0], dtype=DTYPE).reshape(1, 1, 1, 2)
    log_diag = torch.tensor([0.0, math.log(2.0)], dtype=DTYPE).reshape(1, 1, 1, 2)
    samples = DiagonalNormal(mean, log_diag).sample((40_000,))[:, 0, 0, 0]
    standard_deviation = torch.tensor([1.0, 0.5], dtype=DTYPE)
    assert torch.allclose(samples.mean(0), mean.flatten(), atol=5 * 1.0 / 200)
    assert torch.allclose(samples.std(0), standard_deviation, rtol=0.03)


@pytest.mark.parametrize(
    "distribution",
    [
        SphericalNormal(torch.zeros(1, 1, 2, 2), variance=0.06),
        DiagonalNormal(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)),
        SUPNormal(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 4, 2, 2), 1),
    ],
    ids=["spherical", "diagonal", "supn"],
)
def test_common_interface(distribution):
    assert isinstance(distribution, StructuredNormal)
    assert isinstance(distribution, torch.distributions.Distribution)
    assert distribution.sample((3,)).shape == (3, 1, 1, 2, 2)
    assert distribution.log_prob(torch.zeros(1, 1, 2, 2)).shape == (1,)
    assert distribution.mean.shape == (1, 1, 2, 2)
    assert distribution.precision_cholesky_dense().shape == (1, 4, 4)


# --------------------------------------------------------------------------
# Dtypes and devices
# --------------------------------------------------------------------------


def test_float32_matches_float64():
    distribution = make_supn(3, 2, 6, 5)
    single = SUPNormal(
        distribution.mean.float(), distribution.log_diag.float(), distribution.off_diag.float(), 2
    )
    whitened = torch.randn(2, 3, 6, 5, dtype=DTYPE)
    result = single.unwhiten(whitened.float())
    assert result.dtype == torch.float32
    assert torch.allclose(result.double(), distribution.unwhiten(whitened), atol=1e-4)
    assert torch.allclose(single.log_prob(result).double(), distribution.log_prob(result.double()), rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_cuda_matches_cpu():
    distribution = make_supn(3, 2, 6, 5)
    device = torch.device("cuda")
    on_device = SUPNormal(
        distribution.mean.to(device), distribution.log_diag.to(device), distribution.off_diag.to(device), 2
    )
    x = torch.randn(4, 2, 3, 6, 5, dtype=DTYPE)
    assert torch.allclose(on_device.whiten(x.to(device)).cpu(), distribution.whiten(x))
    assert torch.allclose(on_device.unwhiten(x.to(device)).cpu(), distribution.unwhiten(x))
    assert on_device.sample((2,)).device.type == "cuda"


# --------------------------------------------------------------------------
# Invalid input
# --------------------------------------------------------------------------


def zeros(*shape):
    return torch.zeros(shape, dtype=DTYPE)


def test_wrong_off_diagonal_count_raises():
    with pytest.raises(ValueError, match=r"off_diag has shape \(1, 4, 3, 3\).*radius=2.*\(1, 12, 3, 3\)"):
        SUPNormal(zeros(1, 1, 3, 3), zeros(1, 1, 3, 3), zeros(1, 4, 3, 3), 2)


def test_mismatched_log_diag_raises():
    with pytest.raises(ValueError, match=r"log_diag has shape \(1, 1, 3, 4\).*\(1, 1, 3, 3\)"):
        SUPNormal(zeros(1, 1, 3, 3), zeros(1, 1, 3, 4), zeros(1, 4, 3, 3), 1)
    with pytest.raises(ValueError, match=r"log_diag has shape \(2, 1, 3, 3\)"):
        DiagonalNormal(zeros(1, 1, 3, 3), zeros(2, 1, 3, 3))


def test_mean_not_four_dimensional_raises():
    with pytest.raises(ValueError, match=r"mean has shape \(3, 3\).*4-D"):
        DiagonalNormal(zeros(3, 3), zeros(3, 3))


@pytest.mark.parametrize("radius", [0, -1, 1.5, True])
def test_invalid_radius_raises(radius):
    with pytest.raises(ValueError, match="radius must be an integer >= 1"):
        SUPNormal(zeros(1, 1, 3, 3), zeros(1, 1, 3, 3), zeros(1, 4, 3, 3), radius)
    with pytest.raises(ValueError, match="radius must be an integer >= 1"):
        num_off_diagonal(radius)


def test_non_finite_parameters_raise():
    off_diag = zeros(1, 4, 3, 3)
    off_diag[0, 2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"off_diag of shape \(1, 4, 3, 3\) contains 1 non-finite"):
        SUPNormal(zeros(1, 1, 3, 3), zeros(1, 1, 3, 3), off_diag, 1)

    log_diag = zeros(1, 1, 3, 3)
    log_diag[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="log_diag .* non-finite"):
        DiagonalNormal(zeros(1, 1, 3, 3), log_diag)


def test_non_finite_input_raises():
    distribution = SUPNormal(zeros(1, 1, 3, 3), zeros(1, 1, 3, 3), zeros(1, 4, 3, 3), 1)
    x = zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="x of shape .* non-finite"):
        distribution.whiten(x)


def test_wrong_input_shape_raises():
    distribution = SUPNormal(zeros(2, 1, 3, 3), zeros(2, 1, 3, 3), zeros(2, 4, 3, 3), 1)
    with pytest.raises(ValueError, match=r"x has shape \(1, 1, 3, 3\).*\(\*sample_shape, 2, 1, 3, 3\)"):
        distribution.log_prob(zeros(1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"whitened has shape \(2, 3, 3\)"):
        distribution.unwhiten(zeros(2, 3, 3))


def test_mismatched_dtype_raises():
    with pytest.raises(ValueError, match="off_diag has dtype torch.float32 but mean has torch.float64"):
        SUPNormal(zeros(1, 1, 3, 3), zeros(1, 1, 3, 3), torch.zeros(1, 4, 3, 3), 1)


def test_spherical_invalid_arguments_raise():
    with pytest.raises(ValueError, match="exactly one of log_sigma or variance"):
        SphericalNormal(zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="variance must be > 0"):
        SphericalNormal(zeros(1, 1, 2, 2), variance=0.0)
    with pytest.raises(ValueError, match=r"log_sigma has shape \(3,\)"):
        SphericalNormal(zeros(2, 1, 2, 2), log_sigma=torch.zeros(3))


def test_dense_factor_too_large_raises():
    side = int(math.isqrt(MAX_DENSE_SIZE)) + 1
    distribution = DiagonalNormal(torch.zeros(1, 1, side, side), torch.zeros(1, 1, side, side))
    with pytest.raises(ValueError, match=f"N = {side * side}.*MAX_DENSE_SIZE"):
        distribution.precision_cholesky_dense()
