"""``python -m cnpsfs.cli``: the same as the ``cnpsfs`` command."""

from cnpsfs.cli import main

main()
