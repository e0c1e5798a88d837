"""napari docks of napari-supn: find, review and train (see napari.yaml)."""
