"""Shipped sample fields: files, sizes, ground truth, manifest and napari's Open Sample."""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
import sys

import numpy as np
import pytest

from napari_supn._sample_data import SAMPLE_DIR, SAMPLES, load_sample, sample_paths

REPO_ROOT = pathlib.Path(__file__).parent.parent
SOURCE_DATA = REPO_ROOT.parent / "shared" / "data"

EXPECTED = {
    # key: (image shape, cells, infected)
    "fluorescence": ((560, 672), 30, 4),
    "giemsa": ((576, 720, 3), 20, 4),
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_sample_files_match_csv(key):
    shape, n_cells, n_infected = EXPECTED[key]
    image, labels, cells = load_sample(key)

    assert image.shape == shape
    assert image.dtype == np.uint8
    assert labels.shape == shape[:2]
    assert len(cells) == n_cells
    assert int(cells["infected"].sum()) == n_infected
    assert set(np.unique(labels)) - {0} == set(cells["position"])
    for path in sample_paths(key).values():
        assert path.stat().st_size < 1_000_000, path

    # Each recorded centroid and area describes the pasted mask at that position.
    for row in cells.itertuples():
        rows, cols = np.nonzero(labels == row.position)
        assert rows.size == row.area
        assert abs(rows.mean() - row.centroid_y) < 0.01
        assert abs(cols.mean() - row.centroid_x) < 0.01


def test_sample_provenance_names_sources():
    text = (SAMPLE_DIR / "PROVENANCE.md").read_text()

    assert "CC BY 4.0" in text
    assert "Vodenicharski" in text
    assert "Zenodo, record 6645803" in text
    assert "Rajaraman" in text
    assert "PeerJ 6:e4568" in text


def test_manifest_lists_widgets_and_samples():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-supn")
    widgets = {widget.display_name for widget in manifest.contributions.widgets}
    samples = {sample.key: sample.display_name for sample in manifest.contributions.sample_data}

    assert widgets == {"Find anomalous cells", "Review suspects", "Train SUPN model"}
    assert set(samples) == set(SAMPLES)
    assert "CC BY 4.0" in samples["fluorescence"]
    assert "public domain" in samples["giemsa"]


def test_open_sample_adds_layers(make_napari_viewer):
    viewer = make_napari_viewer()

    viewer.open_sample("napari-supn", "giemsa")

    image = viewer.layers["assembled Giemsa field"]
    truth = viewer.layers["assembled Giemsa field known infected"]
    assert image.rgb
    assert image.data.shape == (576, 720, 3)
    assert "Rajaraman" in image.metadata["attribution"]
    assert len(truth.data) == 4
    assert not truth.visible


@pytest.mark.skipif(not SOURCE_DATA.is_dir(), reason="source crops (fl_supn, nih_malaria_cells) not present")
def test_sample_script_is_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("make_sample_fields", REPO_ROOT / "scripts" / "make_sample_fields.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up here
    try:
        spec.loader.exec_module(script)
        script.write_field(tmp_path, "fluorescence_field", *script.build_fluorescence(SOURCE_DATA))
    finally:
        del sys.modules[spec.name]

    for name in ("fluorescence_field.png", "fluorescence_field_labels.png", "fluorescence_field_cells.csv"):
        rebuilt = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        shipped = hashlib.sha256((SAMPLE_DIR / name).read_bytes()).hexdigest()
        assert rebuilt == shipped, name
