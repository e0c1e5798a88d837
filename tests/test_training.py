from pathlib import Path

import numpy as np
import pytest
import torch

from napari_supn.cli import main
from napari_supn.data import load_crops
from napari_supn.model import ModelConfig, SUPNVAE
from napari_supn.model_file import load_model
from napari_supn.preprocessing import fit_preprocessing
from napari_supn.progress import Cancelled
from napari_supn.training import (
    TrainingConfig,
    augment,
    read_checkpoint,
    seed_everything,
    split_train_validation,
    stage_loss,
    train,
)

DATA = Path(__file__).parent / "data" / "fl_supn"


@pytest.fixture(scope="module")
def images():
    crops = load_crops(DATA)
    preprocessing = fit_preprocessing(crops.images, crops.masks, downsample=4)
    x, _ = preprocessing.prepare(crops.images, crops.masks)
    return x


def tiny_model(likelihood="supn", seed=0) -> SUPNVAE:
    seed_everything(seed)
    return SUPNVAE(
        ModelConfig(
            image_size=32, latent_size=8, depth=2, base_width=8, fc_width=32, likelihood=likelihood
        )
    )


def fast_config(**overrides) -> TrainingConfig:
    values = dict(stage1_iterations=6, stage2_iterations=6, batch_size=8, log_every=2, checkpoint_every=2)
    values.update(overrides)
    return TrainingConfig(**values)


def evaluation_loss(model, images, stage, config) -> float:
    model.eval()
    with torch.no_grad():
        loss, _ = stage_loss(model, images, stage, config, torch.Generator().manual_seed(0))
    return float(loss)


def snapshot(module) -> dict:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def test_short_real_run_lowers_loss(images):
    model = tiny_model()
    config = fast_config(stage1_iterations=40, stage2_iterations=20, batch_size=8, log_every=10)
    before_stage1 = evaluation_loss(model, images, 1, config)
    result = train(model, images, config, stage=1)
    after_stage1 = evaluation_loss(model, images, 1, config)
    assert after_stage1 < 0.5 * before_stage1
    assert result.iterations == 40
    assert len(result.losses) == 4

    before_stage2 = evaluation_loss(model, images, 2, config)
    train(model, images, config, stage=2)
    after_stage2 = evaluation_loss(model, images, 2, config)
    assert after_stage2 < before_stage2


def test_stage2_leaves_encoder_and_mean_decoder_unchanged(images):
    model = tiny_model()
    train(model, images, fast_config(), stage=1)
    encoder, mean_decoder = snapshot(model.encoder), snapshot(model.mean_decoder)
    likelihood_decoder = snapshot(model.likelihood_decoder)

    train(model, images, fast_config(), stage=2)

    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, encoder[name]), name
    for name, tensor in model.mean_decoder.state_dict().items():
        assert torch.equal(tensor, mean_decoder[name]), name
    changed = [
        name
        for name, tensor in model.likelihood_decoder.state_dict().items()
        if not torch.equal(tensor, likelihood_decoder[name])
    ]
    assert "head.weight" in changed
    assert not any(p.requires_grad for p in model.mean_parameters())


def test_stage1_leaves_likelihood_decoder_unchanged(images):
    model = tiny_model(likelihood="diagonal")
    before = snapshot(model.likelihood_decoder)
    train(model, images, fast_config(), stage=1)
    for name, tensor in model.likelihood_decoder.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_spherical_model_has_no_stage2(images):
    with pytest.raises(ValueError, match="no stage 2"):
        train(tiny_model(likelihood="spherical"), images, fast_config(), stage=2)


def test_progress_reports_every_iteration(images):
    calls = []
    train(tiny_model(), images, fast_config(), stage=1, progress=lambda *args: calls.append(args))
    assert [call[1] for call in calls] == [1, 2, 3, 4, 5, 6]
    assert all(call[0] == 1 and call[2] == 6 for call in calls)
    assert all(np.isfinite(call[3]) for call in calls)


def test_cancel_keeps_checkpoint(images, tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    model = tiny_model()
    iterations = []

    def progress(stage, iteration, total, loss):
        iterations.append(iteration)

    with pytest.raises(Cancelled):
        train(
            model, images, fast_config(checkpoint_every=100), stage=1,
            progress=progress, cancel=lambda: len(iterations) >= 3, checkpoint_path=checkpoint,
        )
    tensors, header = read_checkpoint(checkpoint)
    assert header["iteration"] == 3
    assert header["stage"] == 1
    assert torch.equal(tensors["model.encoder.to_mean.weight"], model.encoder.to_mean.weight.detach())


def test_resume_continues_exactly(images, tmp_path):
    config = fast_config(stage1_iterations=6, checkpoint_every=100)
    uninterrupted = tiny_model()
    train(uninterrupted, images, config, stage=1)

    checkpoint = tmp_path / "run.ckpt"
    interrupted = tiny_model()
    count = []
    with pytest.raises(Cancelled):
        train(
            interrupted, images, config, stage=1, checkpoint_path=checkpoint,
            progress=lambda *args: count.append(1), cancel=lambda: len(count) >= 3,
        )
    resumed = tiny_model(seed=99)
    result = train(resumed, images, config, stage=1, checkpoint_path=checkpoint, resume=True)

    assert result.iterations == 6
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert read_checkpoint(checkpoint)[1]["iteration"] == 6


def test_resume_rejects_other_stage(images, tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    model = tiny_model()
    train(model, images, fast_config(), stage=1, checkpoint_path=checkpoint)
    with pytest.raises(ValueError, match="from stage 1, not stage 2"):
        train(model, images, fast_config(), stage=2, checkpoint_path=checkpoint, resume=True)


def test_non_finite_loss_stops_without_overwriting_checkpoint(images, tmp_path):
    checkpoint = tmp_path / "run.ckpt"
    model = tiny_model()
    train(model, images, fast_config(stage1_iterations=2), stage=1, checkpoint_path=checkpoint)
    before = checkpoint.read_bytes()
    bad = torch.full_like(images, float("inf"))
    with pytest.raises((RuntimeError, ValueError)):
        train(model, bad, fast_config(), stage=1, checkpoint_path=checkpoint)
    assert checkpoint.read_bytes() == before


def test_augment_flips_and_rotations_preserve_values():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    generator = torch.Generator().manual_seed(0)
    augmented = augment(x, generator, flips=True, rotations=True)
    assert augmented.shape == x.shape
    for index in range(2):
        assert torch.equal(augmented[index].flatten().sort().values, x[index].flatten().sort().values)


def test_split_is_disjoint_and_sized():
    train_index, validation_index = split_train_validation(100, 0.1, seed=0)
    assert len(validation_index) == 10
    assert len(train_index) == 90
    assert not set(train_index) & set(validation_index)
    again = split_train_validation(100, 0.1, seed=0)
    assert np.array_equal(again[1], validation_index)


def test_training_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="batch_size"):
        TrainingConfig(batch_size=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        TrainingConfig(validation_fraction=1.0)


TINY_CLI = [
    "--iterations", "3", "--batch-size", "4", "--downsample", "4", "--depth", "2",
    "--base-width", "4", "--latent-size", "8", "--samples", "2", "--validation-fraction", "0.25",
    "--log-every", "1", "--device", "cpu",
]


def test_cli_train_end_to_end(tmp_path):
    spherical = tmp_path / "spherical.supn"
    status = main(["train", "--data", str(DATA), "--out", str(spherical), "--likelihood", "spherical", *TINY_CLI])
    assert status == 0
    loaded = load_model(spherical)
    assert loaded.config.likelihood == "spherical"
    assert loaded.config.image_size == 32
    metadata = loaded.metadata
    assert metadata["stages"]["1"]["iterations"] == 3
    assert metadata["training_data"]["validation_crops"] == 4
    assert metadata["training_data"]["training_crops"] == 12
    assert set(metadata["healthy_score_quantiles"]) == {"0.5", "0.9", "0.95", "0.99", "0.999"}
    assert metadata["threshold"] == metadata["healthy_score_quantiles"]["0.99"]
    assert metadata["scoring"] == {"samples": 2, "tile": 4, "mask_erosion": 0}
    assert 40 < metadata["cell_diameter_px"] < 100
    assert "hardware" in metadata

    supn = tmp_path / "supn.supn"
    status = main(["train", "--data", str(DATA), "--out", str(supn), "--init", str(spherical), *TINY_CLI])
    assert status == 0
    stage2 = load_model(supn)
    assert stage2.config.likelihood == "supn"
    assert stage2.metadata["stages"]["2"]["iterations"] == 3
    assert stage2.metadata["stages"]["1"]["iterations"] == 3
    assert stage2.metadata["training_data"]["validation_names"] == metadata["training_data"]["validation_names"]
    for name, tensor in loaded.model.encoder.state_dict().items():
        assert torch.equal(tensor, stage2.model.encoder.state_dict()[name]), name
    assert (tmp_path / "supn.supn.ckpt").exists()


def test_cli_resume_after_finished_run_keeps_model(tmp_path):
    out = tmp_path / "model.supn"
    args = ["train", "--data", str(DATA), "--out", str(out), "--likelihood", "diagonal", *TINY_CLI]
    assert main(args) == 0
    first = load_model(out)
    assert main([*args, "--resume"]) == 0
    second = load_model(out)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_cli_reports_bad_arguments(tmp_path, capsys):
    status = main(["train", "--data", str(DATA), "--out", str(tmp_path / "m.supn"), "--likelihood", "spherical", "--stage", "2"])
    assert status == 2
    assert "no stage 2" in capsys.readouterr().err
    status = main(["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "m.supn")])
    assert status == 2


def test_cli_help_states_units_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--iterations" in text
    assert "model pixels" in text
    assert "default: 32" in text
