"""systemd integration: the sd_notify protocol on a real socket, the service commands, the unit.

The real-mount tests start ``cnpsfs mount --foreground`` (and ``cnpsfs service run``, what
ExecStart runs) exactly as systemd would: with ``$NOTIFY_SOCKET`` naming a datagram socket
the test reads, and ``$WATCHDOG_USEC``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cnpsfs_testlib import CNPSFS, Cli
from mountutil import IN_CI, is_mounted

from cnpsfs.errors import NotFoundError, UsageError
from cnpsfs.fs.notify import Notifier
from cnpsfs.fs.unit import load_config, missing_capabilities, parse_config, sandbox_dropin

REPO = Path(__file__).resolve().parents[1]
UNIT_DIR = REPO / "systemd"


# --------------------------------------------------------------------------- the protocol, in-process


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_sends_one_datagram_per_message(tmp_path: Path) -> None:
    with _receiver(str(tmp_path / "n.sock")) as sock:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
        assert notifier.ready("serving x")
        assert notifier.watchdog()
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving x\n"
        assert sock.recv(4096) == b"WATCHDOG=1\n"
        notifier.close()


def test_notify_abstract_namespace() -> None:
    name = f"cnpsfs-test-{os.getpid()}-{time.monotonic_ns()}"
    with _receiver(b"\0" + name.encode()) as sock:
        notifier = Notifier(f"@{name}")
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=unmounting\n"
        notifier.close()


def test_notify_reloading_carries_monotonic_time(tmp_path: Path) -> None:
    with _receiver(str(tmp_path / "n.sock")) as sock:
        notifier = Notifier(str(tmp_path / "n.sock"))
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.reloading()
        lines = sock.recv(4096).decode().split()
        assert lines[0] == "RELOADING=1"
        usec = int(lines[1].removeprefix("MONOTONIC_USEC="))
        assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_notify_without_socket_is_a_no_op(tmp_path: Path) -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "500000"})
    assert not notifier.enabled and not notifier.send("READY=1")
    assert notifier.watchdog_interval is None
    # A socket that vanished costs nothing but a debug line.
    assert not Notifier(str(tmp_path / "gone.sock")).ready("x")


def test_watchdog_interval_and_pid() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "500000"}
    assert Notifier.from_environment(env).watchdog_interval == 0.25
    assert Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 0.25
    assert Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    assert Notifier.from_environment({**env, "WATCHDOG_USEC": "junk"}).watchdog_interval is None


# --------------------------------------------------------------------------- the service config, in-process


def test_service_config_defaults_and_substitution(tmp_path: Path) -> None:
    config = parse_config('image = "example.org/web@1"\nwritable = "/var/lib/cnpsfs/upper/%i"\n', "web",
                          tmp_path / "web.toml")
    assert config.mountpoint == "/var/lib/machines/web"
    assert config.writable == "/var/lib/cnpsfs/upper/web"
    assert (config.allow_other, config.fuse_mode, config.threads, config.cache_mib, config.store) == (
        False, "auto", 4, 128, None)


def test_service_config_manifest_is_relative_to_the_file(tmp_path: Path) -> None:
    config = parse_config('image = "images/web.toml"\nmountpoint = "/mnt/x"\n', "web", tmp_path / "web.toml")
    assert config.image == str(tmp_path / "images" / "web.toml")


@pytest.mark.parametrize(("text", "message"), [
    ("", "image is required"),
    ('image = "x"\nmountpoit = "/m"\n', "unknown key 'mountpoit'"),
    ('image = "x"\nmountpoint = "rel"\n', "absolute path"),
    ('image = "x"\nallow_other = "yes"\n', "true or false"),
    ('image = "x"\nfuse_mode = "fast"\n', "fuse_mode"),
    ('image = "x"\nthreads = 0\n', "threads"),
    ('image = "x"\nthreads = true\n', "threads"),
    ("image = ", "not valid TOML"),
    ('image = "x"\ninit_layer = "yes"\n', "init_layer must be"),
    ('image = "x"\nremote_timeout = inf\n', "remote_timeout must be"),
    ('image = "x"\nremote_timeout = nan\n', "remote_timeout must be"),
    ('image = "x"\nremote_timeout = 0\n', "remote_timeout must be"),
    ('image = "x"\ninit_layer = ["data"]\n', "mount destination 'data'"),
])
def test_service_config_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        parse_config(text, "web", tmp_path / "web.toml")
    assert str(tmp_path / "web.toml") in str(info.value)


def test_service_config_init_layer(tmp_path: Path) -> None:
    """The mount file gives a unit what `cnpsfs mount --init-layer --init-dir` gives a shell."""
    from cnpsfs.image.initlayer import CONTAINER_FILES, CONTAINER_TMPFS

    plain = parse_config('image = "x@1"\n', "web", tmp_path / "web.toml").mount_options()
    assert plain.init_layer is None and plain.init_files == ()
    on = parse_config('image = "x@1"\ninit_layer = true\n', "web", tmp_path / "web.toml").mount_options()
    assert on.init_layer == CONTAINER_TMPFS and on.init_files == CONTAINER_FILES
    extra = parse_config('image = "x@1"\ninit_layer = ["/srv/%i/", "/data"]\n', "web", tmp_path / "web.toml")
    assert extra.mount_options().init_layer == (*CONTAINER_TMPFS, "/srv/web", "/data")


def test_service_config_names(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_config("../etc/passwd", tmp_path)
    with pytest.raises(NotFoundError, match="does not exist"):
        load_config("absent", tmp_path)


def test_sandbox_dropin_by_mount_kind(tmp_path: Path) -> None:
    read_only = parse_config('image = "x@1"\n', "web", tmp_path / "web.toml")
    writable = parse_config('image = "x@1"\nwritable = "/var/lib/cnpsfs/upper/%i"\n', "web", tmp_path / "web.toml")
    text = sandbox_dropin(read_only)
    assert "\n[Service]\nCapabilityBoundingSet=CAP_SYS_ADMIN\n" in text and str(tmp_path / "web.toml") in text
    assert "CapabilityBoundingSet" not in sandbox_dropin(writable).replace("# ", "")
    full = "CapBnd:\t000001ffffffffff\n"
    admin_only = f"CapBnd:\t{1 << 21:016x}\n"
    assert missing_capabilities(writable, full) == [] and missing_capabilities(read_only, admin_only) == []
    assert missing_capabilities(writable, admin_only) == ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER",
                                                          "CAP_FSETID", "CAP_MKNOD", "CAP_SETFCAP"]


def test_sandbox_dropin_opens_the_network_only_for_network_remotes(tmp_path: Path) -> None:
    def dropin(remotes: str) -> str:
        return sandbox_dropin(parse_config(f'image = "x@1"\nremotes = {remotes}\n', "web", tmp_path / "web.toml"))

    assert "AF_INET" not in dropin("[]") and "AF_INET" not in dropin('["file:///srv/remote"]')
    for remotes in ('["http://127.0.0.1:8080/r"]', '["file:///srv/r", "docker://127.0.0.1:5000/x/y"]',
                    '["no-such-configured-remote"]'):
        text = dropin(remotes)
        assert "\nRestrictAddressFamilies=AF_INET AF_INET6\n" in text, remotes
        assert text.index("[Unit]\nWants=network-online.target\nAfter=network-online.target\n") < text.index(
            "[Service]")


def test_service_generate_writes_a_dropin_per_good_file(tmp_path: Path) -> None:
    confdir, out = tmp_path / "mounts", tmp_path / "generator"
    confdir.mkdir()
    (confdir / "web.toml").write_text('image = "x@1"\n')
    (confdir / "rw.toml").write_text('image = "x@1"\nwritable = "/var/lib/cnpsfs/upper/%i"\n')
    (confdir / "bad.toml").write_text('image = "x@1"\nmountpoit = "/m"\n')
    result = Cli(tmp_path / "store").ok("service", "--config-dir", confdir, "generate", out, out / "early",
                                        out / "late")
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*.conf"))
    assert made == ["cnpsfs@rw.service.d/50-cnpsfs-sandbox.conf", "cnpsfs@web.service.d/50-cnpsfs-sandbox.conf"]
    assert "CapabilityBoundingSet=CAP_SYS_ADMIN" in (out / made[1]).read_text()
    assert "cnpsfs@bad.service: no sandbox drop-in" in result.stderr and "mountpoit" in result.stderr


# --------------------------------------------------------------------------- the unit files


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The shipped units, with ExecStart pointing at this checkout's cnpsfs (verify checks it exists)."""
    if shutil.which("systemd-analyze") is None:
        if IN_CI:
            pytest.fail("systemd-analyze must run in CI (CI=true): apt-get install systemd (scripts/install --test)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    binary = Path(CNPSFS[0])
    assert binary.is_absolute() and os.access(binary, os.X_OK), CNPSFS
    for unit in UNIT_DIR.iterdir():
        text = unit.read_text()
        if unit.name.endswith(".service"):
            assert text.count("/usr/local/bin/cnpsfs ") == 4  # ExecStart, ExecReload, ExecStop, ExecStopPost
        (tmp_path / unit.name).write_text(text.replace("/usr/local/bin/cnpsfs", str(binary)))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "cnpsfs@web.service"),
                             str(tmp_path / "cnpsfs.target")], capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "cnpsfs" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def test_unit_keeps_the_mount_visible_on_the_host() -> None:
    """No option that gives the service a private mount namespace: its mounts would vanish."""
    text = (UNIT_DIR / "cnpsfs@.service").read_text()
    settings = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line and not line.startswith("#")}
    private_ns = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ReadWritePaths", "ReadOnlyPaths",
                  "InaccessiblePaths", "ProtectKernelModules", "ProtectKernelLogs", "ProtectKernelTunables",
                  "ProtectControlGroups", "PrivateMounts", "MountFlags", "TemporaryFileSystem", "BindPaths",
                  "ProtectProc", "PrivateUsers", "RootDirectory"}
    assert not settings & private_ns
    assert {"Type", "NotifyAccess", "ExecReload", "ExecStop", "ExecStopPost", "DeviceAllow"} <= settings
    assert "Type=notify\n" in text and "NotifyAccess=main\n" in text and "DeviceAllow=/dev/fuse rwm\n" in text
    # What tests/test_systemd_real.py showed a mount lives with (docs/systemd.md, "Hardening").
    assert {"MemoryDenyWriteExecute", "ProtectClock", "SystemCallFilter", "SystemCallErrorNumber",
            "RestrictAddressFamilies", "NoNewPrivileges", "RestartPreventExitStatus"} <= settings
    assert "CapabilityBoundingSet" not in settings  # per mount, from systemd/cnpsfs-generator


# --------------------------------------------------------------------------- real mounts


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cli, Path]:
    """A store with test.example/app@1 and @2 (hello.txt says v1 / v2), and a manifest over @1."""
    base = tmp_path_factory.mktemp("systemd")
    cli = Cli(base / "store")
    for version in ("1", "2"):
        tree = base / f"tree{version}"
        (tree / "etc").mkdir(parents=True)
        (tree / "hello.txt").write_text(f"v{version}\n")
        cli.ok("import", "dir", tree, "--name", "test.example/app", "--version", version)
    manifest = base / "image.toml"
    _write_manifest(manifest, "1")
    return cli, manifest


def _write_manifest(path: Path, version: str) -> None:
    path.write_text(f'name = "test.example/image"\nversion = "{version}"\n'
                    f'[[layers]]\nfileset = "test.example/app@{version}"\n')


class Messages:
    """What arrives on a notify socket, one datagram per message, in order."""

    def __init__(self, path: Path) -> None:
        self.sock = _receiver(str(path))
        self.seen: list[list[str]] = []

    def next(self, timeout: float = 30.0, *, skip_watchdog: bool = True) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no notify message within {timeout}s; so far: {self.seen}")
            self.sock.settimeout(remaining)
            try:
                lines = self.sock.recv(65536).decode().splitlines()
            except TimeoutError:
                continue
            self.seen.append(lines)
            if not (skip_watchdog and lines == ["WATCHDOG=1"]):
                return lines

    def watchdog_pings(self, count: int, timeout: float = 30.0) -> float:
        """Wait for *count* WATCHDOG=1 pings; returns the seconds they took. Other messages
        fail the test: none is due while the mount just serves."""
        started = time.monotonic()
        for n in range(count):
            lines = self.next(max(0.1, timeout - (time.monotonic() - started)), skip_watchdog=False)
            assert lines == ["WATCHDOG=1"], f"ping {n + 1}: {lines} (so far: {self.seen})"
        return time.monotonic() - started


@contextlib.contextmanager
def foreground(argv: list[str], mnt: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A foreground daemon that is always gone afterwards, mount included."""
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def _status(lines: list[str]) -> str:
    return next((line.removeprefix("STATUS=") for line in lines if line.startswith("STATUS=")), "")


@pytest.mark.parametrize("fuse_mode", ["auto", "stock"])
@pytest.mark.fuse
def test_foreground_mount_speaks_sd_notify(app: tuple[Cli, Path], tmp_path: Path, fuse_mode: str) -> None:
    cli, manifest = app
    image = tmp_path / "image.toml"
    shutil.copy(manifest, image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    messages = Messages(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "500000"}
    with foreground(cli.argv("mount", "--foreground", "--fuse-mode", fuse_mode, image, mnt), mnt, env) as proc:
        ready = messages.next()
        # Checked the moment READY=1 arrives: the mount must already answer.
        assert is_mounted(mnt) and (mnt / "hello.txt").read_text() == "v1\n"
        assert ready[0] == "READY=1", messages.seen
        assert re.fullmatch(r"serving test\.example/image@1 generation 1 \(.+\)", _status(ready)), ready
        assert ("stock" in _status(ready)) == (fuse_mode == "stock")

        # WATCHDOG_USEC 0.5 s: the daemon pings every 0.25 s, so three pings take well under 1.5 s.
        assert messages.watchdog_pings(3) < 1.5, messages.seen

        _write_manifest(image, "2")
        proc.send_signal(signal.SIGHUP)
        reloading = messages.next()
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC="), reloading
        swapped = messages.next()
        assert _status(swapped).startswith("serving test.example/image@2 generation 2"), swapped
        ready_again = messages.next()
        assert ready_again[0] == "READY=1" and "generation 2" in _status(ready_again), ready_again
        assert (mnt / "hello.txt").read_text() == "v2\n"

        proc.send_signal(signal.SIGTERM)
        stopping = messages.next()
        assert stopping[0] == "STOPPING=1", stopping
        assert proc.wait(30) == 0, proc.stderr.read().decode() if proc.stderr else ""
        assert not is_mounted(mnt)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert not re.search(r"WARNING|ERROR|Traceback", stderr), stderr
    messages.sock.close()


@pytest.mark.fuse
def test_service_run_reload_stop(app: tuple[Cli, Path], tmp_path: Path) -> None:
    """What cnpsfs@web.service does: ExecStart, then ExecReload twice, then ExecStop and ExecStopPost."""
    cli, _manifest = app
    confdir = tmp_path / "mounts"
    confdir.mkdir()
    mnt = tmp_path / "machines" / "web"  # created by service run
    config = confdir / "web.toml"
    config.write_text(f'image = "test.example/app@1"\nmountpoint = "{tmp_path}/machines/%i"\n'
                      f'store = "{cli.store_path}"\nfuse_mode = "stock"\n')
    service = ["service", "--config-dir", str(confdir)]
    messages = Messages(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "JOURNAL_STREAM": "8:1234"}
    with foreground([*CNPSFS, *service, "run", "web"], mnt, env) as proc:
        ready = messages.next()
        assert ready[0] == "READY=1" and "test.example/app@1" in _status(ready), messages.seen
        assert (mnt / "hello.txt").read_text() == "v1\n"

        shown = json.loads(cli.ok(*service, "show", "web").stdout)
        assert shown["mountpoint"] == str(mnt) and shown["fuse_mode"] == "stock"

        config.write_text(config.read_text().replace("app@1", "app@2"))
        result = cli.ok(*service, "reload", "web", "--json")
        assert json.loads(result.stdout)["generation"] == 2
        assert "generation 2" in _status(messages.next())
        assert (mnt / "hello.txt").read_text() == "v2\n"

        config.write_text(config.read_text().replace(f'store = "{cli.store_path}"', 'store = "/elsewhere"'))
        refused = cli(*service, "reload", "web")
        assert refused.rc == 1 and "needs a restart" in refused.stderr

        stop = cli.ok(*service, "stop", "web")
        assert "unmounted" in stop.stderr
        assert proc.wait(30) == 0
        assert not is_mounted(mnt)
        assert messages.next()[0] == "STOPPING=1"
        # ExecStopPost after a clean stop: nothing to do, and that is success.
        assert "not mounted" in cli.ok(*service, "stop", "web").stderr
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert "INFO cnpsfs" in stderr, stderr  # journald-style lines: level and logger, no timestamp
        assert not re.search(r"WARNING|ERROR|Traceback", stderr), stderr
    messages.sock.close()


@pytest.mark.fuse
def test_service_run_recovers_from_a_killed_daemon(app: tuple[Cli, Path], tmp_path: Path) -> None:
    """A watchdog SIGABRT (here SIGKILL) leaves a dead mount; ExecStopPost and the restart clean it up."""
    cli, _manifest = app
    confdir = tmp_path / "mounts"
    confdir.mkdir()
    mnt = tmp_path / "mnt"
    (confdir / "db.toml").write_text(f'image = "test.example/app@1"\nmountpoint = "{mnt}"\n'
                                     f'store = "{cli.store_path}"\n')
    service = ["service", "--config-dir", str(confdir)]
    messages = Messages(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}

    def start_and_kill() -> None:
        with foreground([*CNPSFS, *service, "run", "db"], tmp_path / "not-this", env) as proc:
            assert messages.next()[0] == "READY=1", messages.seen
            proc.kill()
            proc.wait()
        with pytest.raises(OSError) as info:
            os.statvfs(mnt)  # statfs always asks the daemon
        assert info.value.errno == errno.ENOTCONN  # what SIGKILL leaves

    try:
        start_and_kill()
        assert "unmounted" in cli.ok(*service, "stop", "db").stderr  # ExecStopPost
        assert not is_mounted(mnt)
        start_and_kill()  # and this time ExecStopPost never ran: the restart cleans up
        with foreground([*CNPSFS, *service, "run", "db"], mnt, env) as proc:
            assert messages.next()[0] == "READY=1", messages.seen
            assert (mnt / "hello.txt").read_text() == "v1\n"
            cli.ok(*service, "stop", "db")
            assert proc.wait(30) == 0
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            assert "cleaning up after a cnpsfs daemon that died" in stderr, stderr
    finally:
        cli(*service, "stop", "db")  # whatever a failure left: a dead mount, a stale record
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        messages.sock.close()


@pytest.mark.fuse
def test_service_stop_detaches_a_mount_in_use_lazily(app: tuple[Cli, Path], tmp_path: Path) -> None:
    """ExecStop always completes, at once: a mount a process still uses (the unmount raises
    MountpointBusyError) is detached lazily with a warning and its daemon stopped; the user's
    next request that needs the daemon fails with ENOTCONN (docs/systemd.md, "Stopping")."""
    cli, _manifest = app
    confdir = tmp_path / "mounts"
    confdir.mkdir()
    mnt = tmp_path / "mnt"
    (confdir / "held.toml").write_text(f'image = "test.example/app@1"\nmountpoint = "{mnt}"\n'
                                       f'store = "{cli.store_path}"\n')
    service = ["service", "--config-dir", str(confdir)]
    messages = Messages(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    try:
        with foreground([*CNPSFS, *service, "run", "held"], mnt, env) as proc:
            assert messages.next()[0] == "READY=1", messages.seen
            # Its working directory is the mount: a plain unmount is refused while it lives.
            holder = subprocess.Popen(["sh", "-c", "cat hello.txt; read x; cat never-looked-up; echo rc=$?"],
                                      cwd=mnt, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
            try:
                assert holder.stdout is not None
                assert holder.stdout.readline() == b"v1\n"
                started = time.monotonic()
                stop = cli.ok(*service, "stop", "held")
                assert time.monotonic() - started < 10, "a busy stop waited for a daemon that cannot exit"
                assert "is busy" in stop.stderr and "detaching it lazily and stopping the daemon" in stop.stderr
                assert "unmounted" in stop.stderr
                assert not is_mounted(mnt)
                assert proc.wait(30) == 0
                out, err = holder.communicate(b"\n", timeout=30)
                assert out == b"rc=1\n" and b"Transport endpoint is not connected" in err, (out, err)
            finally:
                if holder.poll() is None:
                    holder.kill()
                    holder.wait()
    finally:
        cli(*service, "stop", "held")
        messages.sock.close()
