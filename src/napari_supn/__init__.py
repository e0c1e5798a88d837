"""napari-supn: find anomalous red blood cells with a structured-uncertainty VAE."""

import logging

__version__ = "0.1.0"

logging.getLogger("napari_supn").addHandler(logging.NullHandler())
