"""Bounds of a remote's settings (docs/remote.md), in a module that imports nothing.

``remotes.toml``, ``--remote-timeout`` and a mount file's ``remote_timeout`` share them; the
command line reads them at start-up, which must not load the HTTP stack for every command.
"""

from __future__ import annotations

#: The longest a read may wait for a remote, retries included: never an endless wait.
MAX_TIMEOUT = 3600.0
#: The most requests a remote may have in flight at once.
MAX_PARALLEL = 64
#: The most retries of one request.
MAX_RETRIES = 100
#: The most raw bytes a remote's read-ahead may fetch on each side of a missed block.
MAX_READ_AHEAD = 16 << 20
