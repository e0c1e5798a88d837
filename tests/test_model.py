import pytest
import torch

from napari_supn.model import ModelConfig, SUPNVAE, kl_divergence
from napari_supn.supn import DiagonalNormal, SphericalNormal, SUPNormal, num_off_diagonal


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        in_channels=1, image_size=16, latent_size=4, depth=2, base_width=4, fc_width=16,
        likelihood="supn", radius=1,
    )
    values.update(overrides)
    return ModelConfig(**values)


@pytest.mark.parametrize(
    "likelihood, channels, expected_type",
    [
        ("supn", 1, SUPNormal),
        ("supn", 3, SUPNormal),
        ("diagonal", 1, DiagonalNormal),
        ("diagonal", 3, DiagonalNormal),
        ("spherical", 1, SphericalNormal),
    ],
)
def test_likelihood_heads_shapes_and_gradients(likelihood, channels, expected_type):
    torch.manual_seed(0)
    model = SUPNVAE(tiny_config(likelihood=likelihood, in_channels=channels, radius=2))
    x = torch.rand(3, channels, 16, 16) * 2 - 1

    z_mean, z_logvar = model.encode(x)
    assert z_mean.shape == (3, 4)
    assert z_logvar.shape == (3, 4)
    z = model.reparameterize(z_mean, z_logvar)
    mean = model.decode_mean(z)
    assert mean.shape == (3, channels, 16, 16)

    distribution = model.likelihood(z, mean)
    assert isinstance(distribution, expected_type)
    if likelihood == "supn":
        assert distribution.off_diag.shape == (3, num_off_diagonal(2, channels), 16, 16)
    log_prob = distribution.log_prob(x)
    assert log_prob.shape == (3,)
    assert torch.isfinite(log_prob).all()

    loss = -log_prob.sum() + kl_divergence(z_mean, z_logvar).sum()
    loss.backward()
    for parameter in model.mean_parameters():
        assert parameter.grad is not None
    likelihood_parameters = list(model.likelihood_parameters())
    assert (len(likelihood_parameters) == 0) == (likelihood == "spherical")
    # The head starts at zero weights, so only its gradient is guaranteed nonzero.
    if likelihood_parameters:
        head_grad = model.likelihood_decoder.head.weight.grad
        assert head_grad is not None
        assert head_grad.abs().sum() > 0


def test_log_diag_stays_in_configured_range():
    model = SUPNVAE(tiny_config(log_diag_min=-2.0, log_diag_max=1.0))
    raw = torch.tensor([-1e4, -1.0, 0.0, 1.0, 1e4])
    log_diag = model.log_diag_from_raw(raw)
    assert log_diag.min() >= -2.0
    assert log_diag.max() <= 1.0
    assert log_diag[2].item() == pytest.approx(-0.5)


@pytest.mark.parametrize("likelihood", ["supn", "diagonal"])
def test_untrained_likelihood_matches_stage1(likelihood):
    torch.manual_seed(1)
    model = SUPNVAE(tiny_config(likelihood=likelihood, variance=0.11))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    z = torch.randn(2, 4)
    mean = model.decode_mean(z)
    structured = model.likelihood(z, mean).log_prob(x)
    spherical = model.stage1_likelihood(mean).log_prob(x)
    assert torch.allclose(structured, spherical, rtol=1e-4)


def test_spherical_likelihood_uses_fixed_variance():
    model = SUPNVAE(tiny_config(likelihood="spherical", variance=0.06))
    mean = torch.zeros(1, 1, 16, 16)
    x = torch.full((1, 1, 16, 16), 0.3)
    log_prob = model.likelihood(torch.zeros(1, 4), mean).log_prob(x)
    expected = -0.5 * 256 * (torch.log(torch.tensor(2 * torch.pi * 0.06)) + 0.09 / 0.06)
    assert log_prob.item() == pytest.approx(expected.item(), rel=1e-5)


def test_parameter_groups_are_disjoint_and_complete():
    model = SUPNVAE(tiny_config())
    mean_ids = {id(p) for p in model.mean_parameters()}
    likelihood_ids = {id(p) for p in model.likelihood_parameters()}
    assert not mean_ids & likelihood_ids
    assert mean_ids | likelihood_ids == {id(p) for p in model.parameters()}


def test_encode_rejects_wrong_input_shape():
    model = SUPNVAE(tiny_config())
    with pytest.raises(ValueError, match=r"\(batch, 1, 16, 16\)"):
        model.encode(torch.zeros(2, 3, 16, 16))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"in_channels": 2}, "in_channels"),
        ({"likelihood": "gaussian"}, "'gaussian'"),
        ({"image_size": 18}, "divisible"),
        ({"radius": 0}, "radius"),
        ({"log_diag_min": 5.0}, "log_diag_min"),
        ({"variance": 0.0}, "variance"),
        ({"latent_size": 0}, "latent_size"),
    ],
)
def test_config_rejects_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_round_trips_through_dict():
    config = tiny_config(likelihood="diagonal", variance=0.06)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ModelConfig keys: colour"):
        ModelConfig.from_dict({**config.to_dict(), "colour": 1})


def test_reparameterize_with_generator_is_reproducible():
    z_mean, z_logvar = torch.zeros(2, 4), torch.zeros(2, 4)
    first = SUPNVAE.reparameterize(z_mean, z_logvar, torch.Generator().manual_seed(3))
    second = SUPNVAE.reparameterize(z_mean, z_logvar, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert not torch.equal(first, z_mean)


def test_kl_divergence_zero_at_prior():
    assert torch.allclose(kl_divergence(torch.zeros(2, 4), torch.zeros(2, 4)), torch.zeros(2))
    assert (kl_divergence(torch.ones(2, 4), torch.zeros(2, 4)) > 0).all()
