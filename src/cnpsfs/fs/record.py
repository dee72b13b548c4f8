"""Recording a profile, the client's side: what ``cnpsfs profile record`` and ``build
--record-profile`` do over a mount daemon's control socket (fs/mount.py is the other side).

The daemon records (fs/recorder.py) and hands the encoded profile back; the client checks
it decodes, and files it under the image in the daemon's store, so the daemon itself never
writes to the store.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.fs.control import control_request

#: How often --until-idle asks the daemon how long it has been idle.
POLL_SECONDS = 0.2
#: The longest a recording may run (the daemon's own limit too).
RECORD_MAX_SECONDS = 3600.0


def _request(control: str, request: dict[str, Any]) -> dict[str, Any]:
    response = control_request(control, request)
    response.pop("ok", None)
    return response


def record_profile(mountpoint: str, name: str, *, seconds: float | None = None, until_idle: bool = False,
                   idle: float = 2.0, command: list[str] | None = None, env: dict[str, str] | None = None,
                   say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Record a profile on the mount at *mountpoint* and store it; returns what was stored.

    The recording lasts *seconds*, or until the mount has been idle for *idle* seconds
    (*until_idle*), or while *command* runs; Ctrl-C ends it early and stores what was
    recorded.
    """
    from cnpsfs.fs.daemon import status_record
    from cnpsfs.image.profiles import store_profile
    from cnpsfs.store import LocalStore

    fmt.check_profile_name(name)
    record = status_record(os.path.realpath(mountpoint))
    if not record["alive"]:
        raise CnpsfsError(f"the daemon of {mountpoint} (pid {record['pid']}) is gone: run `cnpsfs umount`")
    control = record["control"]
    status = _request(control, {"op": "status"})
    limit = seconds if seconds is not None and not command else RECORD_MAX_SECONDS
    started = _request(control, {"op": "record-start", "max_seconds": limit})
    say(f"recording on {mountpoint} (generation {started['generation']}); Ctrl-C stops and stores")
    exit_status = None
    try:
        if command:
            exit_status = subprocess.run(command, env=env).returncode
        elif not until_idle:
            time.sleep(seconds or 0)
        else:
            deadline = time.monotonic() + RECORD_MAX_SECONDS
            while time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
                state = _request(control, {"op": "record-status"})
                if state.get("aborted") or (state["events"] and state["idle"] >= idle):
                    break
    except KeyboardInterrupt:
        say("interrupted: storing what was recorded")
    except OSError as exc:  # the command could not be started: nothing to keep
        _request(control, {"op": "record-stop", "name": name})
        assert command is not None
        raise CnpsfsError(f"cannot run {command[0]}: {exc.strerror}") from None
    metadata: dict[str, Any] = {}
    if command:
        metadata["command"] = [str(a) for a in command]
        metadata["exit_status"] = exit_status
    stopped = _request(control, {"op": "record-stop", "name": name, "metadata": metadata})
    profile = fmt.decode_profile(base64.b64decode(stopped["object"]))  # never store what a mount would refuse
    if not profile.entries:
        why = f" ({command[0]} exited with status {exit_status})" if command and exit_status else ""
        raise CnpsfsError(f"nothing reached {mountpoint} while recording{why}: no profile stored "
                          f"(the image's profile {name!r}, if any, is kept)")
    image = fmt.parse_digest(stopped["image"])
    store = LocalStore(status["store"])
    try:
        digest = store_profile(store, image, profile)
    finally:
        store.close()
    files = sum(1 for e in profile.entries if e.touch is fmt.Touch.FILE)
    lookups = sum(1 for e in profile.entries if e.touch is fmt.Touch.LOOKUP)
    return {"digest": fmt.format_digest(digest), "name": name, "image": stopped["image"],
            "label": f"{status['image']['name']}@{status['image']['version']}", "entries": len(profile.entries),
            "directories": len(profile.entries) - files - lookups, "files": files, "lookups": lookups,
            "ranges": profile.ranges,
            "bytes": profile.data_bytes, "seconds": stopped["seconds"], "truncated": stopped["truncated"],
            "exit_status": exit_status}
