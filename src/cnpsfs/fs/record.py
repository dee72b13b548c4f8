"""Recording a profile, the client's side: what ``cnpsfs profile record`` and ``build
--record-profile`` do over a mount daemon's control socket (fs/mount.py is the other side).

The daemon records (fs/recorder.py) and hands the encoded profile back; the client checks
it decodes, and files it under the image in the daemon's store, so the daemon itself never
writes to the store.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
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


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """End the command's process group (the command, and what it started): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the command itself: a zombie would keep its group alive
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        else:
            continue
        break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def record_profile(mountpoint: str, name: str, *, seconds: float | None = None, until_idle: bool = False,
                   idle: float = 2.0, command: list[str] | None = None, env: dict[str, str] | None = None,
                   chroot: str | None = None, cwd: str = "/", stdout: int | None = None,
                   say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Record a profile on the mount at *mountpoint* and store it; returns what was stored.

    The recording lasts *seconds*, or until the mount has been idle for *idle* seconds
    (*until_idle*), or while *command* runs (then for at most *seconds*, after which the
    command is killed: a server's start is what a profile wants); Ctrl-C ends it early and
    stores what was recorded. With *chroot*, *command* runs with that root and *cwd*.
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
    limit = min(seconds + 5, RECORD_MAX_SECONDS) if seconds is not None else RECORD_MAX_SECONDS
    started = _request(control, {"op": "record-start", "max_seconds": limit})
    say(f"recording on {mountpoint} (generation {started['generation']}); Ctrl-C stops and stores")
    exit_status = None
    try:
        if command:
            def enter() -> None:  # in the child, before exec
                if chroot is not None:
                    os.chroot(chroot)
                    os.chdir(cwd)

            # A session of its own, so that whatever it starts is stopped with it.
            proc = subprocess.Popen(command, env=env, stdout=stdout, start_new_session=True,
                                    preexec_fn=enter if chroot is not None else None)
            try:
                exit_status = proc.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                exit_status = None
                say(f"{command[0]} still ran after {seconds:.0f} s: stopped it, storing what it read")
            finally:
                _stop_group(proc)
        elif not until_idle:
            # Polled, so that a recording a swap abandoned says so now, not when its time is up.
            deadline = time.monotonic() + (seconds or 0)
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(POLL_SECONDS, left))
                if _request(control, {"op": "record-status"}).get("aborted"):
                    break
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


#: How long ``--record-profile`` lets the image's command run (a server never exits).
RECORD_COMMAND_SECONDS = 30.0
#: The PATH the command gets when the image's config sets none (as runtimes do).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def record_image_command(store: Any, ref: str, name: str = fmt.DEFAULT_PROFILE, *,
                         seconds: float = RECORD_COMMAND_SECONDS,
                         say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Mount image *ref* on a private mountpoint, run its command once (entrypoint + cmd,
    with its env and workdir, chrooted, as root) while recording, store the profile, and
    unmount: what ``build`` and ``bundle --record-profile`` do. *store* is closed (a mount
    forks; see :func:`cnpsfs.fs.mounting.mount_image`)."""
    import tempfile

    from cnpsfs.errors import UsageError
    from cnpsfs.fs.daemon import unmount
    from cnpsfs.fs.mounting import mount_image
    from cnpsfs.fs.options import MountOptions
    from cnpsfs.image.manifest import load_image
    from cnpsfs.image.profiles import profile_subject

    image, digest = load_image(store, ref)
    label = f"{image.name}@{image.version}"
    if profile_subject(image, digest) is None:
        raise UsageError(f"{label} is not stored: a profile is filed under a stored image")
    config = image.config
    argv = [str(a) for a in (config.get("entrypoint") or [])] + [str(a) for a in (config.get("cmd") or [])]
    if not argv:
        raise UsageError(f"{label} has no command (its config has no entrypoint or cmd): nothing to record")
    if os.geteuid() != 0:
        raise UsageError("recording a profile runs the image's command in a chroot: that needs root")
    env = {"PATH": DEFAULT_PATH}
    for item in config.get("env") or []:
        key, _sep, value = str(item).partition("=")
        if key:
            env[key] = value
    workdir = str(config.get("workdir") or "/")
    mountpoint = tempfile.mkdtemp(prefix="cnpsfs-record-")
    try:
        mount_image(store, ref, mountpoint, MountOptions(prefetch=False))
        try:
            say(f"recording profile {name} of {label}: running {' '.join(argv)} (at most {seconds:.0f} s)")
            # The command's output goes to stderr: stdout is the caller's (a digest, --json).
            return record_profile(mountpoint, name, command=argv, env=env, chroot=mountpoint, cwd=workdir,
                                  seconds=seconds, stdout=2, say=say)
        finally:
            unmount(mountpoint, lazy=True)
    finally:
        os.rmdir(mountpoint)
