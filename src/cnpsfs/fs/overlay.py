"""Writable mounts: a kernel overlayfs over the read-only composition, and commit.

``cnpsfs mount --writable UPPERDIR`` serves the image over FUSE at a private lower
mountpoint and mounts overlayfs on the requested mountpoint with its upper and work
directories under UPPERDIR, so an instance's changes live in one directory that is easy
to move, back up, or turn into a FileSet:

    UPPERDIR/upper    overlayfs upper directory (the changes)
    UPPERDIR/work     overlayfs work directory
    UPPERDIR/cnpsfs-upper.json   what it was mounted over (image, time), for `commit`

overlayfs is mounted with redirect_dir, metacopy and index off, so a renamed lower
directory is copied up whole and every upper file holds its full data: the upper
directory is then a plain tree plus overlayfs whiteouts (0:0 character devices) and
opaque markers (the trusted.overlay.opaque xattr), exactly what `commit` translates into
format whiteouts and opaque directories.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from cnpsfs.errors import CnpsfsError, MountpointBusyError

UPPER = "upper"
WORK = "work"
STATE = "cnpsfs-upper.json"


def prepare_upperdir(upperdir: str, image_label: str, image_digest: str | None) -> tuple[str, str]:
    base = Path(upperdir)
    if base.exists() and not base.is_dir():
        raise CnpsfsError(f"{upperdir} exists and is not a directory")
    for sub in (UPPER, WORK):
        (base / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
    state = {"image": image_label, "digest": image_digest, "mounted": time.time()}
    (base / STATE).write_text(json.dumps(state, indent=2) + "\n")
    return str(base / UPPER), str(base / WORK)


def overlay_options(lower: str, upper: str, work: str) -> str:
    for path in (lower, upper, work):
        if "," in path or ":" in path:
            raise CnpsfsError(f"overlayfs cannot use a path containing ',' or ':': {path}")
    return f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off,metacopy=off,index=off,xino=off"


def mount_overlay(lower: str, upperdir: str, target: str) -> None:
    base = Path(upperdir)
    options = overlay_options(lower, str(base / UPPER), str(base / WORK))
    result = subprocess.run(["mount", "-t", "overlay", "cnpsfs-overlay", "-o", options, target],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise CnpsfsError(f"cannot mount overlayfs at {target}: {result.stderr.strip() or 'mount failed'}")


def unmount_overlay(target: str, *, lazy: bool = False) -> None:
    result = subprocess.run(["umount", *(["-l"] if lazy else []), target], capture_output=True, text=True)
    if result.returncode != 0:
        message = result.stderr.strip()
        if "busy" in message.lower():
            raise MountpointBusyError(f"{target} is busy: a process still uses it (use --lazy to detach it anyway)",
                                      path=target)
        raise CnpsfsError(f"cannot unmount overlayfs at {target}: {message}")


def upper_state(upperdir: str) -> dict[str, Any]:
    try:
        return json.loads((Path(upperdir) / STATE).read_text())
    except (OSError, ValueError):
        return {}
