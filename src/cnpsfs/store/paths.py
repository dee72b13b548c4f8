"""Where the store is by default: a module of its own, so every command learns it cheaply.

The root ``cnpsfs`` group asks on every command, including those that never open the
store (``cnpsfs status`` talks to a daemon); the store's own code stays unloaded.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_store_path() -> Path:
    """``$CNPSFS_STORE``, else /var/lib/cnpsfs for root, else ``$XDG_DATA_HOME/cnpsfs``."""
    env = os.environ.get("CNPSFS_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/cnpsfs")
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data_home) / "cnpsfs"
