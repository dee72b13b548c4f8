"""A real systemd for the tests: PID 1 of its own namespaces, on a cached Debian root.

systemd cannot be PID 1 of this host (something else is), and ``systemd-nspawn`` fails
here, so :class:`SystemdNamespace` does by hand the part of nspawn the tests need:

ROOT
    ``debootstrap --variant=minbase bookworm`` with :data:`PACKAGES`, built once and cached
    beside the tests' other Debian root (:func:`conftest.build_debian_rootfs`; the cache
    directory's name carries a digest of the package list, so changing the list rebuilds).
    Never written: every boot runs on an overlayfs whose upper directory belongs to the
    session, so /etc, /var and the journal start clean, and a reboot keeps them.
cnpsfs inside
    This checkout's: the repository (with its .venv) is bound read-only at the same path,
    and so is the prefix of the Python the venv was made from (``sys.base_prefix``, pyenv's
    on these machines), because the venv's interpreter is a symlink into it. That Python
    links only glibc itself; its extension modules link libssl3, libffi8, libsqlite3-0,
    libexpat1, liblzma5, libbz2 and zlib, which ROOT's python3 pulls in (bookworm's glibc
    and libraries, as on the host), and pyfuse3 links libfuse3-3 (fuse3). When the venv
    was made from Debian's own /usr/bin/python3 nothing is bound: ROOT's python3 is the same
    interpreter at the same path. ``/usr/local/bin/cnpsfs`` is the symlink docs/systemd.md
    tells a host to make; the shipped units are copied to /etc/systemd/system and the
    generator to /etc/systemd/system-generators, as they are.
the store
    A directory of the test's, bound at /var/lib/cnpsfs (root's default store), so the host
    side can import images into it while the namespace runs; and a host directory at
    /var/lib/cnpsfs-upper for writable mounts' upper directories, since overlayfs refuses
    an upper directory on overlayfs (the namespace's root).
boot
    A fresh cgroup v2 directory under this process's own cgroup, then ``unshare --cgroup
    --uts --ipc --fork --pid --mount --mount-proc --propagation private``, in which a small
    script mounts the overlay; /proc, with /proc/sys read-only (so no sysctl unit can change
    the host's settings); a read-only /sys with a cgroup2 at /sys/fs/cgroup (the cgroup
    namespace makes its root the fresh directory, so systemd runs in unified mode and owns
    that subtree only, whatever the host's layout); a /dev tmpfs with only null, zero, full,
    random, urandom, tty and fuse bound from the host, plus its own devpts and shm; and the
    binds. Then ``chroot ROOT /lib/systemd/systemd --system`` with ``container=cnpsfs-test``
    in its environment: systemd knows it runs in a container and skips the units that
    would touch the machine (``ConditionVirtualization=!container``). ``--uts``: systemd
    sets the hostname. Units that would still touch host-wide state, or run maintenance
    in the middle of a test, are masked (:data:`MASKED`). Ready means ``basic.target`` is
    active (``is-system-running`` may stay "starting" in a namespace).
inside
    ``nsenter -t PID -p -m -r -w`` runs systemctl, journalctl and anything else there;
    :meth:`SystemdNamespace.path` reaches a path inside from the host (through
    ``/proc/PID/root``, which follows the namespace's mounts).
the end
    ``setpriv --pdeathsig KILL`` and ``unshare --kill-child`` tie the namespace's life to
    pytest's, so a killed test run leaves no systemd behind. :meth:`SystemdNamespace.kill`
    kills PID 1: the kernel then kills every process of the PID namespace, and the mount
    namespace, with every mount made in it (FUSE mounts included), goes with its last
    process. Then the cgroup directories are removed. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cnpsfs_testlib import IS_ROOT, REPO
from mountutil import IN_CI

PACKAGES = ("systemd", "systemd-sysv", "dbus", "fuse3", "python3", "runc")

#: Units that would change host-wide state from inside (sysctls, kernel modules, binfmt
#: handlers, the random seed, the RTC), or start maintenance in the middle of a test.
MASKED = (
    "systemd-sysctl.service", "procps.service", "systemd-modules-load.service", "kmod-static-nodes.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    "systemd-random-seed.service", "hwclock.service", "systemd-remount-fs.service", "systemd-firstboot.service",
    "systemd-pstore.service", "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "dev-hugepages.mount", "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
    "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer", "systemd-tmpfiles-clean.timer",
    "getty.target", "console-getty.service",
)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty", "fuse")
STORE = "/var/lib/cnpsfs"  # root's default store
UPPERDIRS = "/var/lib/cnpsfs-upper"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0

T = TypeVar("T")


def unavailable() -> str | None:
    """Why a systemd namespace cannot run here, or None."""
    if not IS_ROOT:
        return "a systemd namespace needs root (unshare, mount, chroot)"
    for tool in ("unshare", "nsenter", "setpriv", "chroot", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install --test installs util-linux, coreutils, debootstrap)"
    if not Path("/dev/fuse").exists():
        return "/dev/fuse does not exist"
    if cgroup2_mount() is None:
        return "no cgroup2 hierarchy is mounted (systemd in the namespace needs one)"
    return None


def require() -> None:
    problem = unavailable()
    if problem:
        if IN_CI:
            pytest.fail(f"the systemd tests must run in CI (CI=true): {problem}")
        pytest.skip(problem)


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup2":
            return Path(fields[4])
    return None


def own_cgroup2() -> Path:
    """This process's cgroup in the v2 hierarchy (the ``0::`` line), as a directory."""
    mount = cgroup2_mount()
    assert mount is not None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return mount / line[3:].lstrip("/")
    return mount


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll *check* until it returns something true; fail naming *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # a probe that fails is a "not yet"
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s" + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


@dataclass(frozen=True)
class Bind:
    """A host path bound inside, at *inside* (default: the same path)."""

    path: Path
    read_only: bool = True
    inside: str | None = None

    @property
    def target(self) -> str:
        return self.inside or str(self.path)


class SystemdNamespace:
    """systemd as PID 1 of new PID, mount, cgroup, UTS and IPC namespaces over ROOT (see the module doc)."""

    def __init__(self, root: Path, base: Path, binds: Sequence[Bind], store: Path) -> None:
        self.root = root
        self.base = base
        self.binds = list(binds)
        self.store = store
        self.upper, self.work, self.merged = base / "upper", base / "work", base / "merged"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.boots = 0
        self.cgroup: Path | None = None
        self._log: Any = None

    # ------------------------------------------------------------------ before the first boot

    def prepare(self) -> None:
        """Lay the session's files into the upper directory (only while nothing is mounted on it)."""
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        etc = self.upper / "etc"
        (etc / "systemd" / "system").mkdir(parents=True, exist_ok=True)
        (etc / "hostname").write_text("cnpsfs-test\n")
        # Fixed, so a reboot finds the same journal directory (/var/log/journal/MACHINE-ID).
        (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
        for unit in MASKED:
            link = etc / "systemd" / "system" / unit
            if not link.is_symlink():
                link.symlink_to("/dev/null")
        for unit in (REPO / "systemd").iterdir():
            if unit.suffix in (".service", ".target"):
                shutil.copy(unit, etc / "systemd" / "system" / unit.name)
        generators = etc / "systemd" / "system-generators"
        generators.mkdir(exist_ok=True)
        shutil.copy(REPO / "systemd" / "cnpsfs-generator", generators / "cnpsfs-generator")
        (etc / "cnpsfs" / "mounts").mkdir(parents=True, exist_ok=True)
        local_bin = self.upper / "usr" / "local" / "bin"
        local_bin.mkdir(parents=True, exist_ok=True)
        if not (local_bin / "cnpsfs").is_symlink():
            (local_bin / "cnpsfs").symlink_to(REPO / ".venv" / "bin" / "cnpsfs")
        for bind in self.all_binds():
            (self.upper / bind.target.lstrip("/")).mkdir(parents=True, exist_ok=True)
            if not bind.read_only:
                bind.path.mkdir(parents=True, exist_ok=True)

    def all_binds(self) -> list[Bind]:
        """The binds, and the two of every namespace: the store, and a place for writable mounts'
        upper directories (overlayfs refuses an upper directory on overlayfs, as the root is here)."""
        return [*self.binds, Bind(self.store, read_only=False, inside=STORE),
                Bind(self.base / "upperdirs", read_only=False, inside=UPPERDIRS)]

    def _inner_script(self) -> str:
        """What runs inside the new namespaces, as their PID 1, before it becomes systemd."""
        q = shlex.quote
        m = q(str(self.merged))
        lines = [
            "set -eu",
            f"mount -t overlay cnpsfs-test-root -o lowerdir={q(str(self.root))},upperdir={q(str(self.upper))},"
            f"workdir={q(str(self.work))} {m}",
            f"mount -t proc proc {m}/proc",
            f"mount --bind {m}/proc/sys {m}/proc/sys",
            f"mount -o remount,bind,ro {m}/proc/sys",
            f"mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {m}/sys",
            f"mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 {m}/sys/fs/cgroup",
            f"mount -t tmpfs -o mode=755,nosuid,size=4m tmpfs {m}/dev",
        ]
        for dev in DEVICES:
            lines += [f"touch {m}/dev/{dev}", f"mount --bind /dev/{dev} {m}/dev/{dev}"]
        lines += [
            f"mkdir {m}/dev/pts {m}/dev/shm",
            f"mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts {m}/dev/pts",
            f"ln -s pts/ptmx {m}/dev/ptmx",
            f"ln -s /proc/self/fd {m}/dev/fd",
            f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {m}/dev/shm",
        ]
        for bind in self.all_binds():
            target = q(str(self.merged) + bind.target)
            lines.append(f"mount --bind {q(str(bind.path))} {target}")
            if bind.read_only:
                lines.append(f"mount -o remount,bind,ro {target}")
        # Shared, as systemd makes / on a host: mount propagation inside is then the host's.
        lines.append(f"mount --make-rshared {m}")
        lines.append(f"exec chroot {m} /lib/systemd/systemd --system")
        return "\n".join(lines)

    # ------------------------------------------------------------------ life

    def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Start systemd and wait until basic.target is active."""
        assert self.proc is None, "already booted"
        self.boots += 1
        self.cgroup = own_cgroup2() / f"cnpsfs-systemd-test-{os.getpid()}-{self.boots}"
        self.cgroup.mkdir()
        self._log = open(self.base / f"boot-{self.boots}.log", "wb")  # noqa: SIM115 (closed in kill)
        argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.cgroup),
                "env", "-i", "container=cnpsfs-test", f"PATH={PATH}", "LANG=C.UTF-8",
                "setpriv", "--pdeathsig", "KILL",
                "unshare", "--kill-child=SIGKILL", "--cgroup", "--uts", "--ipc", "--fork", "--pid", "--mount",
                "--mount-proc", "--propagation", "private", "sh", "-c", self._inner_script()]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.pid = wait_for("systemd is PID 1 of the namespace", self._systemd_pid, timeout)
            wait_for("basic.target is active", lambda: self.systemctl(
                "is-active", "basic.target", check=False, timeout=10).stdout.strip() == "active", timeout)
        except BaseException:
            self.kill()
            raise

    def _systemd_pid(self) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the namespace exited (rc {self.proc.returncode}) before systemd ran: "
                                 f"{self.boot_log()}")
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for child in children:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return None

    def boot_log(self) -> str:
        path = self.base / f"boot-{self.boots}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def shutdown(self, verb: str = "poweroff", timeout: float = STOP_TIMEOUT) -> None:
        """A clean shutdown (``systemctl poweroff`` or ``reboot``): units stop in order."""
        assert self.proc is not None
        self.systemctl(verb, "--no-block")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"systemctl {verb}: the namespace did not end within {timeout:.0f} s") from None
        self.kill()  # nothing left to kill; removes the cgroups and closes the log

    def reboot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """``systemctl reboot`` (a clean shutdown), then boot again on the same upper directory."""
        self.shutdown("reboot")
        self.boot(timeout)

    def kill(self) -> None:
        """End the namespace at once: SIGKILL to its PID 1 takes every process with it."""
        if self.proc is not None:
            if self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)  # --kill-child takes the namespace with it
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        self.pid = 0
        if self.cgroup is not None:
            cgroup = self.cgroup

            def gone() -> bool:
                for d in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(FileNotFoundError):
                    cgroup.rmdir()
                return not cgroup.exists()

            wait_for(f"{cgroup} removed (its processes gone)", gone, STOP_TIMEOUT, interval=0.2)
            self.cgroup = None
        if self._log is not None:
            self._log.close()
            self._log = None
        leaked = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if str(self.merged) in line]
        assert not leaked, f"mounts of the namespace visible on the host: {leaked}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ inside

    def path(self, inside: str) -> Path:
        """*inside* (an absolute path in the namespace) as seen from the host."""
        assert self.pid, "not booted"
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def argv(self, *argv: str) -> list[str]:
        assert self.pid, "not booted"
        return ["nsenter", "-t", str(self.pid), "-p", "-m", "-r", "-w", "--", *argv]

    def env(self) -> dict[str, str]:
        return {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb"}

    def run(self, *argv: str, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run *argv* inside (PID and mount namespaces, root), outside any unit."""
        proc = subprocess.run(self.argv(*argv), capture_output=True, text=True, timeout=timeout,
                              input=input if input is not None else "", env=self.env())
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> rc {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def popen(self, *argv: str, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*argv), env=self.env(), text=True, **kwargs)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def state(self, unit: str) -> str:
        return self.show(unit, "ActiveState")["ActiveState"]

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def write(self, inside: str, text: str) -> None:
        path = self.path(inside)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.rename(path)  # a reload never reads a half-written file

    def remove(self, inside: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(inside).unlink()

    def cursor(self) -> str:
        """The journal's position now: :meth:`journal` after it sees only what comes next."""
        out = self.run("journalctl", "--no-pager", "-n", "0", "--show-cursor").stdout
        return next(line.split("cursor: ", 1)[1] for line in out.splitlines() if "cursor: " in line)

    def journal(self, *args: str, after: str | None = None) -> list[dict[str, Any]]:
        """Journal entries (JSON objects) matching *args*, e.g. ``("-u", "x.service")``."""
        argv = ["journalctl", "--no-pager", "-o", "json", *args]
        if after is not None:
            argv.append(f"--after-cursor={after}")
        out = self.run(*argv).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def mounts(self) -> list[tuple[str, str]]:
        """(mountpoint, fstype) of every mount in the namespace, in mount order."""
        out = []
        for line in Path(f"/proc/{self.pid}/mountinfo").read_text().splitlines():
            fields = line.split()
            sep = fields.index("-")
            out.append((fields[4].encode().decode("unicode_escape"), fields[sep + 1]))
        return out


def message(entry: dict[str, Any]) -> str:
    """An entry's MESSAGE as text (journald gives a byte list for non-UTF-8 messages)."""
    value = entry.get("MESSAGE", "")
    return bytes(value).decode("utf-8", "replace") if isinstance(value, list) else str(value)


def python_prefix() -> Path | None:
    """The prefix of the Python this venv runs, when it must be bound in (not Debian's /usr)."""
    prefix = Path(sys.base_prefix).resolve()
    return None if prefix == Path("/usr") else prefix


@pytest.fixture(scope="session")
def systemd_ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdNamespace]:
    """One booted systemd namespace for the session (see the module doc), killed at the end.

    ``.store`` is the host directory the namespace sees as /var/lib/cnpsfs.
    """
    from conftest import ROOTFS_CACHE, build_debian_rootfs  # conftest imports this module

    require()
    key = hashlib.blake2b(" ".join(sorted(PACKAGES)).encode(), digest_size=4).hexdigest()
    root = build_debian_rootfs(ROOTFS_CACHE.parent / f"systemd-root-{key}", include=PACKAGES)
    base = tmp_path_factory.mktemp("systemdns")
    binds = [Bind(REPO)]
    prefix = python_prefix()
    if prefix is not None:
        binds.append(Bind(prefix))
    ns = SystemdNamespace(root, base, binds, base / "store")
    ns.prepare()
    ns.boot()
    try:
        yield ns
    finally:
        ns.kill()
        subprocess.run(["rm", "-rf", "--one-file-system", str(base / "upper"), str(base / "work")],
                       capture_output=True, timeout=120)
