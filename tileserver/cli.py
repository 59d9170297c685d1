"""The ``tileserver`` command.

Each sub-command lives with the code it drives (``tileserver.server`` for
``serve``, ``tileserver.convert`` for ``convert`` and ``info``); every module
exposes ``add_cli(subparsers)`` which registers its parser and sets ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .errors import TileServerError

__all__ = ["build_parser", "main"]

# (module, attribute) pairs that register sub-commands, in help order.
_COMMANDS: tuple[str, ...] = (
    "tileserver.server.cli",
    "tileserver.convert",
    "tileserver.info",
    "tileserver.tissue.cli",
    "tileserver.report",
    "tileserver.train",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="tileserver",
        description="Deep Zoom tile server and neural-codec compression for whole-slide images.",
    )
    parser.add_argument("--version", action="version", version=f"tileserver {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in _COMMANDS:
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue  # command not part of this build
            raise
        add_cli = getattr(module, "add_cli", None)
        if add_cli is not None:
            add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tileserver`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except TileServerError as exc:
        print(f"tileserver: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tileserver: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
