"""The ``cnpsfs`` command line: the top layer, one module per command group.

:mod:`cnpsfs.cli.root` is the root group and registers every command group;
:mod:`cnpsfs.cli.context` is what the group modules share.
"""

from cnpsfs.cli.root import main

__all__ = ["main"]
