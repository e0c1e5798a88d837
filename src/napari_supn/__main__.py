import sys

from napari_supn.cli import main

sys.exit(main())
