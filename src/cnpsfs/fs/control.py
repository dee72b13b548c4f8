"""The client side of a mount daemon's control socket: one JSON line each way.

Kept apart from :mod:`cnpsfs.mount` so that ``cnpsfs status``, ``upgrade``, ``link``,
``unlink`` and ``rollback`` do not import pyfuse3 and trio (about 90 ms of start-up):
for a live upgrade the CLI's start-up is most of the wall time.

Protocol: the client connects to the daemon's AF_UNIX stream socket (mode 0600, path in
the mount's runtime record), sends one JSON object and a newline, and reads one JSON
object and a newline: ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

from cnpsfs.errors import CnpsfsError

#: Longest reply read (a status with a long history is a few KiB).
REPLY_MAX = 16 << 20


def control_path_for(runtime: Path, key: str) -> str:
    """Where the daemon of the mount with runtime key *key* listens."""
    return str(runtime / f"{key}.sock")


def control_request(path: str, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to a daemon's control socket and return its reply (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise CnpsfsError(f"the mount daemon is not answering on {path} (is it running?)") from None
            raise
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) < REPLY_MAX:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    try:
        response = json.loads(data)
    except ValueError:
        raise CnpsfsError("the mount daemon sent an unreadable reply") from None
    if not response.get("ok"):
        raise CnpsfsError(response.get("error", "the mount daemon refused the request"))
    return response
