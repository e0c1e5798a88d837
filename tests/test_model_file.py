import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_supn.data import load_crops
from napari_supn.model import ModelConfig, SUPNVAE
from napari_supn.model_file import (
    FORMAT_VERSION,
    METADATA_KEY,
    ModelFileError,
    list_shipped_models,
    load_model,
    save_model,
)
from napari_supn.preprocessing import Preprocessing, fit_preprocessing

DATA = Path(__file__).parent / "data" / "fl_supn"


def tiny_model(likelihood="supn") -> SUPNVAE:
    torch.manual_seed(0)
    config = ModelConfig(
        image_size=32, latent_size=4, depth=2, base_width=4, fc_width=16, likelihood=likelihood
    )
    model = SUPNVAE(config)
    # Give the likelihood head nonzero weights so the round trip covers them.
    if model.likelihood_decoder is not None:
        with torch.no_grad():
            model.likelihood_decoder.head.weight.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def crops():
    return load_crops(DATA, limit=4)


@pytest.fixture
def saved(tmp_path, crops):
    model = tiny_model()
    preprocessing = fit_preprocessing(crops.images, crops.masks, downsample=4)
    path = save_model(tmp_path / "tiny.supn", model, preprocessing, {"threshold": 1.5})
    return path, model, preprocessing


def test_round_trip_gives_identical_outputs(saved, crops):
    path, model, preprocessing = saved
    loaded = load_model(path)
    x, _ = loaded.preprocessing.prepare(crops.images, crops.masks)

    with torch.no_grad():
        expected_z, _ = model.encode(x)
        actual_z, _ = loaded.model.encode(x)
        expected = model.likelihood(expected_z, model.decode_mean(expected_z)).whiten(x)
        actual = loaded.model.likelihood(actual_z, loaded.model.decode_mean(actual_z)).whiten(x)
    assert torch.equal(expected_z, actual_z)
    assert torch.equal(expected, actual)
    assert loaded.config == model.config
    assert loaded.preprocessing == preprocessing
    assert loaded.metadata == {"threshold": 1.5}
    assert loaded.path == path
    assert not loaded.model.training


def test_save_leaves_no_temporary_files(saved):
    path, _, _ = saved
    assert sorted(os.listdir(path.parent)) == ["tiny.supn"]


def test_saved_file_mode_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_model(tmp_path / "mode.supn", tiny_model(), Preprocessing(downsample=4))
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_loaded_model_moves_to_device(saved):
    loaded = load_model(saved[0], device="cpu")
    assert next(loaded.model.parameters()).device.type == "cpu"


def test_truncated_file_names_file(saved, tmp_path):
    path = saved[0]
    truncated = tmp_path / "truncated.supn"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated.supn is not a readable .supn model file"):
        load_model(truncated)


def test_garbage_file_names_file(tmp_path):
    path = tmp_path / "garbage.supn"
    path.write_bytes(b"\x00\x01 this is not safetensors" * 10)
    with pytest.raises(ModelFileError, match="garbage.supn"):
        load_model(path)


def test_foreign_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "foreign.supn"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelFileError, match="without napari-supn metadata"):
        load_model(path)


def _rewrite_header(source: Path, target: Path, change) -> Path:
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        header = json.loads(handle.metadata()[METADATA_KEY])
    change(header, tensors)
    save_file(tensors, str(target), metadata={METADATA_KEY: json.dumps(header)})
    return target


def test_newer_format_version_is_rejected(saved, tmp_path):
    def bump(header, tensors):
        header["format_version"] = FORMAT_VERSION + 1

    path = _rewrite_header(saved[0], tmp_path / "future.supn", bump)
    with pytest.raises(ModelFileError, match="future.supn has model format version 2"):
        load_model(path)


def test_missing_preprocessing_is_rejected(saved, tmp_path):
    def drop(header, tensors):
        del header["preprocessing"]

    path = _rewrite_header(saved[0], tmp_path / "partial.supn", drop)
    with pytest.raises(ModelFileError, match="missing the 'preprocessing' entry"):
        load_model(path)


def test_missing_weight_is_rejected(saved, tmp_path):
    def drop(header, tensors):
        tensors.pop("encoder.to_mean.weight")

    path = _rewrite_header(saved[0], tmp_path / "noweight.supn", drop)
    with pytest.raises(ModelFileError, match="noweight.supn has weights that do not match"):
        load_model(path)


def test_invalid_config_is_rejected(saved, tmp_path):
    def corrupt(header, tensors):
        header["model_config"]["likelihood"] = "laplace"

    path = _rewrite_header(saved[0], tmp_path / "badconfig.supn", corrupt)
    with pytest.raises(ModelFileError, match="invalid configuration.*'laplace'"):
        load_model(path)


def test_grey_model_rejects_rgb_crops(saved):
    loaded = load_model(saved[0])
    rgb = np.random.default_rng(0).integers(0, 255, size=(1, 128, 128, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="expects grey crops"):
        loaded.preprocessing.prepare(rgb)


def test_save_rejects_preprocessing_model_mismatch(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="expects 32"):
        save_model(tmp_path / "x.supn", model, Preprocessing(downsample=2))
    with pytest.raises(ValueError, match="channels 'rgb'"):
        save_model(tmp_path / "x.supn", model, Preprocessing(channels="rgb", downsample=4))


def test_unknown_model_name_lists_shipped(tmp_path):
    with pytest.raises(ModelFileError, match="neither a file nor a shipped model name"):
        load_model("no-such-model")
    assert not list(tmp_path.iterdir())


def test_shipped_models_are_supn_files():
    shipped = list_shipped_models()
    assert isinstance(shipped, dict)
    for name, path in shipped.items():
        assert path.suffix == ".supn"
        assert path.stem == name
