"""Issue 15: mounts as an adversarial user drives them.

Two mounts started at once on one directory (bug 5), a daemon killed with SIGKILL
(bug 10), an unsafe runtime directory for a non-root user (bug 8) and the causes of a
non-root mount failure (bug 9). Everything is real: ``cnpsfs`` in subprocesses, real FUSE
mounts, and a real unprivileged user (``setpriv``) in a private mount namespace.

The namespace is what lets an unprivileged user run at all on a machine whose Python
lives under root's 0700 home (pyenv): ``/root`` is replaced, inside the namespace only,
by a 0711 directory holding a bind mount of the real ``/root/.pyenv``. The same namespace
gives the user a ``/dev/fuse`` of the mode a test needs and, for one test, an
``/etc/fuse.conf`` with ``user_allow_other``. Nothing outside the namespace changes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cnpsfs_testlib import CNPSFS, IS_ROOT, Cli, digest_of
from mountutil import IN_CI, is_mounted, mount_image, needs_root

from cnpsfs.fs.daemon import MountRecord, pid_alive

pytestmark = [needs_root]


def mount_count(path: Path) -> int:
    real = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        return sum(1 for line in f if line.split()[4] == real)


@pytest.fixture
def image(tmp_path: Path, cli: Cli) -> str:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello").write_text("hello\n")
    return digest_of(cli.ok("import", "dir", tree, "--name", "example.org/hard", "--version", "1"))


# --------------------------------------------------------------------------- bug 5: two mounts at once


@pytest.mark.fuse
def test_two_mounts_started_at_once_exactly_one_wins(tmp_path: Path, cli: Cli, image: str) -> None:
    """Both used to succeed, stacked on one directory with one record; one umount removed both."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for round_ in range(5):
        procs = [cli.popen("mount", image, mnt, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs if p.stderr]
        try:
            codes = sorted(rc for rc, _err in results)
            assert codes == [0, 1], f"round {round_}: {results}"
            loser = next(err for rc, err in results if rc == 1)
            assert loser.count("\n") == 1 and f"mountpoint {mnt} is busy" in loser, loser
            assert mount_count(mnt) == 1, f"round {round_}: {mount_count(mnt)} mounts stacked at {mnt}"
            assert (mnt / "etc" / "hello").read_text() == "hello\n"
        finally:
            for _ in range(mount_count(mnt)):
                cli("umount", mnt)
        assert mount_count(mnt) == 0, "one umount must remove the (only) mount"


@pytest.mark.fuse
def test_mount_over_a_running_mount_is_busy(tmp_path: Path, cli: Cli, image: str) -> None:
    mnt = tmp_path / "mnt"
    with mount_image(cli.store_path, image, mnt) as m:
        again = cli("mount", image, mnt)
        assert again.rc == 1 and f"mountpoint {mnt} is busy" in again.stderr, again
        assert mount_count(mnt) == 1
        m.assert_alive()


# --------------------------------------------------------------------------- bug 10: a killed daemon


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid)


def _killed_mount(cli: Cli, image: str, mnt: Path) -> tuple[MountRecord, Path, Path]:
    mnt.mkdir(exist_ok=True)
    cli.ok("mount", image, mnt)
    record = MountRecord.load(str(mnt))
    assert record is not None
    roots = cli.store_path / "run" / f"{record.pid}.roots"
    control = Path(record.control)
    assert roots.exists() and control.exists()
    _kill(record.pid)
    assert roots.exists() and control.exists(), "the kill itself cleans nothing: that is the bug's premise"
    return record, roots, control


@pytest.mark.fuse
def test_next_command_cleans_up_after_a_killed_daemon(tmp_path: Path, cli: Cli, image: str) -> None:
    mnt = tmp_path / "mnt"
    try:
        record, roots, control = _killed_mount(cli, image, mnt)
        status = cli("status", mnt)
        assert status.rc == 1 and f"pid {record.pid}" in status.stderr and "gone" in status.stderr, status
        assert not control.exists(), "the dead daemon's control socket is left behind"
        assert not roots.exists(), "the dead daemon's gc roots file is left behind"
        cli.ok("umount", mnt)
        assert not is_mounted(mnt) and MountRecord.load(str(mnt)) is None
        assert cli("mount", image, mnt).rc == 0  # the mountpoint is usable again
    finally:
        cli("umount", mnt)
    assert not is_mounted(mnt)


@pytest.mark.fuse
def test_gc_recognises_a_dead_daemon(tmp_path: Path, cli: Cli, image: str) -> None:
    """gc keeps what live mounts serve, and forgets the roots of a daemon that was killed."""
    mnt = tmp_path / "mnt"
    try:
        _record, roots, control = _killed_mount(cli, image, mnt)
        cli.ok("tag", "rm", "example.org/hard@1")
        gc = json.loads(cli.ok("gc", "--json").stdout)
        assert not roots.exists(), "gc kept the roots of a killed daemon"
        assert not control.exists(), "gc left the killed daemon's control socket"
        assert gc["removed_objects"] > 0, f"gc kept what only the dead mount used: {gc}"
    finally:
        cli("umount", mnt)


# --------------------------------------------------------------------------- a real unprivileged user


class User:
    """An unprivileged uid running ``cnpsfs`` in a private mount namespace (see the module doc)."""

    def __init__(self, uid: int, home: Path) -> None:
        self.uid = uid
        self.home = home  # owned by the user: its store, mountpoints, manifests
        self.store = home / "store"
        self.fallback_runtime = Path(f"/tmp/cnpsfs-{uid}")

    def run(self, *args: str | os.PathLike[str], fuse_mode: int | None = None, fuse_conf: str | None = None,
            env: dict[str, str] | None = None, then: str = "",
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``cnpsfs --store STORE ARGS`` as the user; *then* is more shell run as the user after it."""
        ns = Path(tempfile.mkdtemp(prefix="cnpsfs-ns-"))
        try:
            os.chmod(ns, 0o711)
            (ns / "root").mkdir(mode=0o711)
            (ns / "root" / ".pyenv").mkdir()
            setup = [f"mount --bind /root/.pyenv {ns}/root/.pyenv", f"mount --rbind {ns}/root /root"]
            # fusermount3 needs the user to have a name.
            for name, line in (("passwd", f"cnpsfs-test:x:{self.uid}:{self.uid}::{self.home}:/bin/sh\n"),
                               ("group", f"cnpsfs-test:x:{self.uid}:\n")):
                (ns / name).write_text(Path(f"/etc/{name}").read_text() + line)
                os.chmod(ns / name, 0o644)
                setup.append(f"mount --bind {ns}/{name} /etc/{name}")
            if fuse_mode is not None:
                os.mknod(ns / "fuse", stat.S_IFCHR | fuse_mode, os.makedev(10, 229))
                os.chmod(ns / "fuse", fuse_mode)
                setup.append(f"mount --bind {ns}/fuse /dev/fuse")
            if fuse_conf is not None:
                (ns / "fuse.conf").write_text(fuse_conf)
                os.chmod(ns / "fuse.conf", 0o644)
                setup.append(f"mount --bind {ns}/fuse.conf /etc/fuse.conf")
            user_env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(self.home),
                        "LC_ALL": "C.UTF-8", **(env or {})}
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in user_env.items())
            command = shlex.join([*CNPSFS, "--store", str(self.store), *map(os.fspath, args)])
            as_user = f"setpriv --reuid={self.uid} --regid={self.uid} --clear-groups env -i {exports}"
            body = f"{command}; rc=$?; {then}\nexit $rc" if then else command
            script = "set -e\n" + "\n".join(setup) + "\nset +e\n" + f"{as_user} sh -c {shlex.quote(body)}"
            return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                  capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        finally:
            shutil.rmtree(ns, ignore_errors=True)

    def chown(self, path: Path) -> None:
        os.chown(path, self.uid, self.uid)

    def remove_runtime(self) -> None:
        if self.fallback_runtime.is_symlink():
            self.fallback_runtime.unlink()
        shutil.rmtree(self.fallback_runtime, ignore_errors=True)


@pytest.fixture
def user() -> Iterator[User]:
    if not IS_ROOT or shutil.which("setpriv") is None or shutil.which("unshare") is None:
        reason = "needs root, setpriv and unshare (util-linux) to run as another user"
        if IN_CI:
            pytest.fail(f"must not skip in CI: {reason}", pytrace=False)
        pytest.skip(reason)
    uid = 70000 + os.getpid() % 20000
    home = Path(tempfile.mkdtemp(prefix=f"cnpsfs-user{uid}-"))
    os.chmod(home, 0o755)
    u = User(uid, home)
    u.remove_runtime()
    u.chown(home)
    try:
        yield u
    finally:
        with open("/proc/self/mountinfo", "rb") as f:
            leftovers = [line.split()[4].decode() for line in f if line.split()[4].startswith(os.fsencode(home))]
        for mounted in leftovers:
            subprocess.run(["umount", "-l", mounted], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
        u.remove_runtime()


def user_image(user: User) -> str:
    tree = user.home / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello").write_text("hello\n")
    for path in (tree, tree / "etc", tree / "etc" / "hello"):
        user.chown(path)
    result = user.run("import", "dir", tree, "--name", "example.org/user", "--version", "1")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def user_mountpoint(user: User) -> Path:
    mnt = user.home / "mnt"
    mnt.mkdir()
    user.chown(mnt)
    return mnt


def test_a_user_can_run_cnpsfs(user: User) -> None:
    """The harness itself: the user runs the CLI and gets its own fallback runtime dir, 0700."""
    result = user.run("status", user.home)
    assert result.returncode == 2 and "no cnpsfs mount is recorded" in result.stderr, result.stderr
    st = os.lstat(user.fallback_runtime)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o700)


# --------------------------------------------------------------------------- bug 8: the runtime directory


@pytest.mark.parametrize("owner, mode, why", [
    ("root", 0o777, "owned by uid 0"),
    ("user", 0o777, "writable by group or others (mode 0777)"),
    ("user", 0o775, "writable by group or others (mode 0775)"),
])
def test_unsafe_fallback_runtime_dir_is_refused(user: User, owner: str, mode: int, why: str) -> None:
    image = user_image(user)
    mnt = user_mountpoint(user)
    planted = user.fallback_runtime
    planted.mkdir()
    os.chmod(planted, mode)
    if owner == "user":
        user.chown(planted)
    for args in (("status", mnt), ("mount", image, mnt), ("umount", mnt)):
        result = user.run(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
        assert f"unsafe runtime directory {planted}" in result.stderr and why in result.stderr, result.stderr
    assert list(planted.iterdir()) == [], "records, sockets or logs were written into the unsafe directory"


def test_unsafe_xdg_runtime_dir_is_refused(user: User) -> None:
    xdg = user.home / "xdg"
    xdg.mkdir(mode=0o700)  # owned by root, not the user
    result = user.run("status", user.home, env={"XDG_RUNTIME_DIR": str(xdg)})
    assert result.returncode == 1 and f"unsafe runtime directory {xdg}" in result.stderr, result.stderr
    user.chown(xdg)
    result = user.run("status", user.home, env={"XDG_RUNTIME_DIR": str(xdg)})
    assert result.returncode == 2 and "no cnpsfs mount is recorded" in result.stderr, result.stderr
    assert stat.S_IMODE(os.lstat(xdg / "cnpsfs").st_mode) == 0o700


def test_runtime_dir_symlink_is_refused(user: User) -> None:
    target = user.home / "elsewhere"
    target.mkdir(mode=0o700)
    user.chown(target)
    user.fallback_runtime.symlink_to(target)
    result = user.run("status", user.home)
    assert result.returncode == 1 and "is a symbolic link" in result.stderr, result.stderr
    assert list(target.iterdir()) == []


# --------------------------------------------------------------------------- bug 9: why a user's mount failed


@pytest.mark.fuse
def test_user_mount_without_access_to_dev_fuse_names_it(user: User) -> None:
    image = user_image(user)
    mnt = user_mountpoint(user)
    result = user.run("mount", image, mnt, fuse_mode=0o600)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot open /dev/fuse: Permission denied" in result.stderr, result.stderr
    assert "fuse_session_mount failed" not in result.stderr


@pytest.mark.fuse
def test_user_allow_other_without_fuse_conf_names_it(user: User) -> None:
    image = user_image(user)
    mnt = user_mountpoint(user)
    result = user.run("mount", "--allow-other", image, mnt, fuse_mode=0o666, fuse_conf="# no options\n")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "user_allow_other" in result.stderr and "/etc/fuse.conf" in result.stderr, result.stderr


@pytest.mark.fuse
def test_user_mounts_and_unmounts(user: User) -> None:
    """With /dev/fuse usable, a non-root user mounts, reads, and unmounts (fusermount3), and
    --allow-other works once /etc/fuse.conf has user_allow_other."""
    image = user_image(user)
    mnt = user_mountpoint(user)
    for extra, conf in (((), None), (("--allow-other",), "user_allow_other\n")):
        read = f"cat {mnt}/etc/hello; {shlex.join([*CNPSFS, 'umount', str(mnt)])}"
        result = user.run("mount", *extra, image, mnt, fuse_mode=0o666, fuse_conf=conf, then=read)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "hello\n", (result.stdout, result.stderr)
        assert f"log {user.fallback_runtime}/cnpsfs/" in result.stderr, result.stderr
    assert [p.name for p in (user.fallback_runtime / "cnpsfs").iterdir() if p.suffix in (".json", ".sock")] == []


