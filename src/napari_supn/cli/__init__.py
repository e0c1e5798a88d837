"""Command-line interface: ``napari-supn <command>``.

Each command lives in its own module of this package and provides two
functions: ``add_parser(subparsers)`` registers its arguments, and
``run(args) -> int`` does the work. Modules import torch, cellpose and napari
inside ``run`` only, so ``napari-supn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from napari_supn import __version__

# Command modules, in the order ``--help`` lists them. A module that does not
# exist yet is skipped, so commands can land one at a time.
COMMAND_MODULES = ("train", "evaluate", "score", "calibrate", "experiment", "demo")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one subparser per available command."""
    parser = argparse.ArgumentParser(
        prog="napari-supn",
        description=(
            "Find anomalous red blood cells (for example malaria parasites) in "
            "microscopy images with a VAE whose likelihood is a Structured "
            "Uncertainty Prediction Network (SUPN)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages as well as progress"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"napari_supn.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"napari_supn.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )

    if args.command is None:
        parser.print_help()
        return 0

    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        # Errors raised for bad input carry a message meant for the user; show it
        # without a traceback (use --verbose for the traceback).
        logging.getLogger("napari_supn").debug("command failed", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
