"""Processes: whether a pid still runs (a leaf every layer may use, like cnpsfs.errors).

The store (gc roots of mounts) and the daemon plumbing (records, control sockets) both ask
whether the process that left a file behind is alive; a zombie is not: a killed daemon is
no child of the command asking, and on hosts whose PID 1 does not reap, it stays a zombie.
"""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while *pid* runs; a zombie counts as gone (the daemon is not our child to reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state follows the command name, which is in parentheses and may hold spaces.
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
