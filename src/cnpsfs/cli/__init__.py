"""The ``cnpsfs`` command line: the top layer, one module per command group."""

from cnpsfs.cli.app import main

__all__ = ["main"]
