"""``napari-supn demo``: open napari on a sample field and find its anomalous cells."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("napari_supn")

#: Milliseconds to let napari draw the result layers before a screenshot.
SCREENSHOT_DELAY_MS = 1000

#: Window size (width, height) in pixels for screenshots.
SCREENSHOT_SIZE = (1400, 860)

#: Environment variables that name a display, or a Qt platform that needs none.
DISPLAY_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")


class NoDisplayError(RuntimeError):
    """Raised when the demo would open a window on a machine without a display."""


def check_display() -> None:
    """Raise NoDisplayError on Linux when no display and no Qt platform are set.

    Without a display, Qt's default xcb platform aborts the whole process
    (exit status 134, core dump) when napari creates its application, so the
    check runs before any Qt object exists. Other systems are not checked.
    """
    if not sys.platform.startswith("linux"):
        return
    if any(os.environ.get(name) for name in DISPLAY_VARIABLES):
        return
    raise NoDisplayError(
        "no display found: DISPLAY and WAYLAND_DISPLAY are unset, so napari cannot open "
        "a window. On a headless machine run the demo under a virtual display, e.g. "
        "`xvfb-run -a napari-supn demo --screenshot out.png`, or run scripts/demo.sh, "
        "which does that and also writes the scores to out/demo/"
    )


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="open napari with a sample field and score it",
        description=(
            "Open napari with an assembled sample field, dock the Find and Review "
            "widgets, and score every cell with a model; the result layers appear "
            "when scoring ends. With --screenshot, save a picture of the window and "
            "exit (needs a display; on a headless machine use xvfb-run -a)."
        ),
    )
    parser.add_argument(
        "--sample",
        choices=("fluorescence", "giemsa"),
        default="fluorescence",
        help="sample field to open (default fluorescence)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model file or shipped model name (default: the shipped model named like the sample)",
    )
    parser.add_argument(
        "--segmenter",
        choices=("auto", "cellpose", "classical"),
        default="auto",
        help="segmenter (default auto: Cellpose when local weights exist, else classical)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="save a screenshot of the window once scoring ends, then exit",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    check_display()

    import napari
    from qtpy.QtCore import QTimer

    from napari_supn._sample_data import SAMPLES
    from napari_supn._widgets.find import FindCellsWidget
    from napari_supn._widgets.review import ReviewWidget
    from napari_supn.model_file import resolve_model_path

    model = args.model or args.sample
    model_path = resolve_model_path(model)
    if args.screenshot is not None and args.screenshot.suffix.lower() != ".png":
        raise ValueError(f"--screenshot must name a .png file, got {args.screenshot}")

    viewer = napari.Viewer(title="napari-supn demo")
    if args.screenshot is not None:
        viewer.window.resize(*SCREENSHOT_SIZE)
    viewer.open_sample("napari-supn", args.sample)
    source = viewer.layers[SAMPLES[args.sample][1]]

    find = FindCellsWidget(viewer)
    review = ReviewWidget(viewer)
    viewer.window.add_dock_widget(find, name="Find anomalous cells", area="right")
    viewer.window.add_dock_widget(review, name="Review suspects", area="right", tabify=True)
    find.select_layer(source)
    find.set_model(model_path)
    find.segmenter_combo.setCurrentText(args.segmenter)
    if args.device not in [find.device_combo.itemText(i) for i in range(find.device_combo.count())]:
        raise ValueError(f"--device {args.device!r} is not available here; use auto or cpu")
    find.device_combo.setCurrentText(args.device)

    status = {"code": 0}

    def finished(outcome) -> None:
        if outcome.error is not None:
            logger.error("Demo scoring failed: %s", outcome.error)
            status["code"] = 2
        if args.screenshot is None:
            return
        viewer.reset_view()
        QTimer.singleShot(SCREENSHOT_DELAY_MS, save_and_close)

    def save_and_close() -> None:
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(args.screenshot), canvas_only=False, flash=False)
        logger.info("Saved screenshot %s", args.screenshot)
        viewer.close()

    find.run_finished.connect(finished)
    # Start scoring once the event loop runs, so the window is drawn first.
    QTimer.singleShot(0, find.run)
    napari.run()
    return status["code"]
