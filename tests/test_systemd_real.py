"""``cnpsfs@.service`` under a real systemd: PID 1 of its own namespaces (tests/systemdns.py).

The shipped units run unchanged, with this checkout's cnpsfs at /usr/local/bin/cnpsfs, on
a store the host fills. The tests share one booted namespace and run in file order, each
leaving ``cnpsfs@app`` active on test.example/app@1 (the mount file's image) for the next:
start, the sandbox in force, live reloads (under an exec loop), reloads refused (a missing
image, the trust policy), kill -9, a watchdog timeout, stop with a file held open, writable
mounts, wrong and edited mount files, boot ordering of consumers across isolate,
daemon-reexec and a reboot of the namespace, and mounts from remote stores (nginx and
docker-registry on 127.0.0.1). docs/systemd.md describes what these tests show.
"""

from __future__ import annotations

import json
import re
import selectors
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import Cli
from remoteutil import NGINX_REMOTE_CONF
from servers import RegistryServer, start_nginx, stop_process
from systemdns import SystemdNamespace, message, wait_for

# Each test bounds its own waits; the first one may also build ROOT (debootstrap, minutes).
pytestmark = [pytest.mark.fuse, pytest.mark.timeout(900)]

UNIT = "cnpsfs@app.service"
MP = "/var/lib/machines/app"  # the default mountpoint
CONFIG = "/etc/cnpsfs/mounts/app.toml"
LIBDIR = "usr/lib/x86_64-linux-gnu"
STATUS_RE = r"serving test\.example/app@{version} generation {generation} \((kernel-cache[^)]*|stock)\)"
RESTART_TIMEOUT = 45.0


# --------------------------------------------------------------------------- the images and the mount file


@pytest.fixture(scope="module")
def ns(systemd_ns: SystemdNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdNamespace]:
    """The namespace, its store holding test.example/app@1 and @2, and ``app.toml`` naming @1.

    Each version is a tiny runnable root (dash, cat, true and the C library, from ROOT), a
    ``hello.txt`` that says its version, and a 4 MiB ``big.bin``; test.example/ctr@1 is an
    image over app@1 with a command, for ``cnpsfs bundle``.
    """
    top = tmp_path_factory.mktemp("systemd-real")
    cli = Cli(systemd_ns.store)
    wanted = ["bin", "lib", "lib64", "usr/lib64", "usr/bin/dash", "usr/bin/sh", "usr/bin/cat", "usr/bin/true",
              f"{LIBDIR}/ld-linux-x86-64.so.2", f"{LIBDIR}/libc.so.6"]
    for version in ("1", "2"):
        tree = top / f"app{version}"
        tree.mkdir()
        subprocess.run(["cp", "-a", "--parents", *wanted, str(tree)], cwd=systemd_ns.root, check=True)
        for d in ("proc", "sys", "dev", "tmp", "run", "etc"):
            (tree / d).mkdir()
        (tree / "hello.txt").write_text(f"v{version}\n")
        (tree / "big.bin").write_bytes(bytes(range(256)) * 4096 * 4)
        cli.ok("import", "dir", tree, "--name", "test.example/app", "--version", version)
    manifest = top / "ctr.toml"
    manifest.write_text('name = "test.example/ctr"\nversion = "1"\n[[layers]]\nfileset = "test.example/app@1"\n'
                        '[config]\ncmd = ["/bin/sh", "-c", "cat /hello.txt"]\n')
    cli.ok("image", "create", manifest)
    set_image(systemd_ns, "test.example/app@1")
    systemd_ns.daemon_reload()  # a new mount file: the generator writes its sandbox drop-in
    yield systemd_ns
    systemd_ns.systemctl("stop", UNIT, check=False)


def set_image(ns: SystemdNamespace, ref: str) -> None:
    ns.write(CONFIG, f'image = "{ref}"\n')


def show(ns: SystemdNamespace, *props: str) -> dict[str, str]:
    return ns.show(UNIT, *props)


def status(ns: SystemdNamespace) -> str:
    return show(ns, "StatusText")["StatusText"]


def generation(ns: SystemdNamespace) -> int:
    match = re.search(r"generation (\d+)", status(ns))
    assert match, status(ns)
    return int(match.group(1))


def hello(ns: SystemdNamespace) -> str:
    return ns.path(f"{MP}/hello.txt").read_text()


def daemon_lines(ns: SystemdNamespace, after: str, count: int | None = None, timeout: float = 15.0,
                 unit: str = UNIT) -> list[tuple[str, str]]:
    """(priority, message) of the lines cnpsfs (daemon and helpers) wrote to *unit*'s journal.

    journald takes stream lines asynchronously: with *count*, wait (bounded) until that
    many are there, then a moment more, so a line too many is seen too.
    """
    ident = "cnpsfs-" + unit.removeprefix("cnpsfs@").removesuffix(".service")  # SyslogIdentifier=cnpsfs-%i

    def lines() -> list[tuple[str, str]]:
        return [(e.get("PRIORITY", ""), message(e)) for e in ns.journal("-u", unit, after=after)
                if e.get("SYSLOG_IDENTIFIER") == ident]

    if count is not None:
        wait_for(f"{count} cnpsfs journal lines (have {lines()})", lambda: len(lines()) >= count, timeout)
        time.sleep(0.5)
    return lines()


def systemd_lines(ns: SystemdNamespace, after: str, unit: str = UNIT) -> list[str]:
    return [message(e) for e in ns.journal("-u", unit, after=after) if e.get("SYSLOG_IDENTIFIER") == "systemd"]


def cnpsfs_mounts(ns: SystemdNamespace) -> list[tuple[str, str]]:
    return [(where, fstype) for where, fstype in ns.mounts() if fstype.startswith("fuse.")]


def assert_serving(ns: SystemdNamespace, version: str) -> None:
    """Active, one live FUSE mount at MP and no other, answering with *version*'s bytes."""
    assert show(ns, "ActiveState")["ActiveState"] == "active"
    assert cnpsfs_mounts(ns) == [(MP, "fuse.cnpsfs")], ns.mounts()
    assert hello(ns) == f"v{version}\n"
    ns.run("stat", "-f", MP)  # statfs always goes to the daemon


def wait_restarted(ns: SystemdNamespace, before: dict[str, str]) -> dict[str, str]:
    def restarted() -> dict[str, str] | None:
        now = show(ns, "ActiveState", "SubState", "MainPID", "NRestarts")
        if (now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])
                and int(now["NRestarts"]) == int(before["NRestarts"]) + 1):
            return now
        return None

    return wait_for(f"{UNIT} restarted after its daemon died", restarted, RESTART_TIMEOUT, interval=0.2)


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"no output from {proc.args} within {timeout:.0f} s")
    return proc.stdout.readline()


# --------------------------------------------------------------------------- start


def test_start_is_active_only_once_the_mount_answers(ns: SystemdNamespace) -> None:
    cursor = ns.cursor()
    ns.systemctl("start", "--no-block", UNIT)
    # One observation per line, in one process inside: the unit's state first, then
    # whether the mount answers. "active" before the mount answers would be a lie.
    watch = (f"end=$(($(date +%s) + 60)); while [ $(date +%s) -lt $end ]; do "
             f"s=$(systemctl show -P ActiveState {UNIT}); "
             f"if [ -e {MP}/hello.txt ]; then m=answers; else m=no; fi; echo $s $m; "
             f'case $s in active|failed) break;; esac; done')
    seen = ns.run("sh", "-c", watch, timeout=90).stdout.split("\n")
    seen = [line for line in seen if line]
    assert seen[-1] == "active answers", seen
    assert all(line.endswith("answers") for line in seen if line.startswith("active")), seen
    assert "activating no" in seen, f"the start was not observed before the mount answered: {seen}"
    assert re.fullmatch(STATUS_RE.format(version="1", generation=1), status(ns)), status(ns)
    assert_serving(ns, "1")
    lines = daemon_lines(ns, cursor, 2)
    assert [text for _p, text in lines] == [
        f"INFO cnpsfs.cli.service: mount app: test.example/app@1 at {MP}",
        f"INFO cnpsfs.fs.mounting: mounted at {MP}: {status(ns)}",
    ], lines
    assert {p for p, _text in lines} == {"6"}  # info


def test_the_daemon_runs_in_the_sandbox(ns: SystemdNamespace) -> None:
    """The unit's hardening and the generated drop-in are in force in the running daemon."""
    props = show(ns, "CapabilityBoundingSet", "DropInPaths", "MainPID", "RestrictAddressFamilies",
                 "SystemCallFilter", "MemoryDenyWriteExecute", "ProtectClock", "NoNewPrivileges")
    assert props["CapabilityBoundingSet"] == "cap_sys_admin", props  # read-only: generated
    assert props["DropInPaths"].split() == ["/run/systemd/generator/cnpsfs@app.service.d/50-cnpsfs-sandbox.conf"]
    assert props["RestrictAddressFamilies"] == "AF_UNIX"
    assert (props["MemoryDenyWriteExecute"], props["ProtectClock"], props["NoNewPrivileges"]) == ("yes",) * 3
    assert " mount " in f" {props['SystemCallFilter']} " and " reboot " not in f" {props['SystemCallFilter']} "
    status_lines = dict(line.split(":\t", 1) for line in
                        ns.path(f"/proc/{props['MainPID']}/status").read_text().splitlines() if ":\t" in line)
    assert int(status_lines["CapBnd"], 16) == 1 << 21  # CAP_SYS_ADMIN
    assert status_lines["NoNewPrivs"].strip() == "1" and status_lines["Seccomp"].strip() == "2"
    # Nothing of that hides the mount: it is in PID 1's mount namespace, where containers see it.
    assert_serving(ns, "1")


def test_a_private_mount_namespace_would_hide_the_mount(ns: SystemdNamespace) -> None:
    """Why the unit has no ProtectSystem= (nor any option that implies a mount namespace):
    the unit starts and reports serving, and the mount exists only inside the service."""
    dropin = "/etc/systemd/system/cnpsfs@app.service.d/protect.conf"
    # Stopped and started on each side of the change, so no stop runs in another mount
    # namespace than the daemon it stops (it could not unmount, and would wait in vain).
    ns.systemctl("stop", UNIT)
    ns.write(dropin, "[Service]\nProtectSystem=strict\nReadWritePaths=/var/lib/cnpsfs /run/cnpsfs /var/lib/machines\n")
    try:
        ns.daemon_reload()
        ns.systemctl("start", UNIT)
        assert show(ns, "ActiveState")["ActiveState"] == "active"
        assert re.fullmatch(STATUS_RE.format(version="1", generation=1), status(ns)), status(ns)
        assert cnpsfs_mounts(ns) == [] and not ns.path(f"{MP}/hello.txt").exists()
        inside = ns.path(f"/proc/{show(ns, 'MainPID')['MainPID']}/mountinfo").read_text()
        assert f" {MP} " in inside and "fuse.cnpsfs" in inside
        # Each Exec line gets a namespace of its own, so even ExecStop could not unmount it
        # (it would wait out its 30 s for the daemon): the daemon unmounts itself on SIGTERM.
        ns.systemctl("kill", "--kill-who=main", "--signal=SIGTERM", UNIT)
        wait_for("the daemon exited on SIGTERM", lambda: ns.state(UNIT) == "inactive", 30, interval=0.2)
    finally:
        ns.remove(dropin)
        ns.daemon_reload()
    ns.systemctl("start", UNIT)
    assert_serving(ns, "1")


# --------------------------------------------------------------------------- reload


def test_reload_is_a_live_upgrade_under_an_exec_loop(ns: SystemdNamespace) -> None:
    """20 reloads between app@2 and app@1 while programs of the image run from the mount."""
    reloads = 20
    first = generation(ns)
    cursor = ns.cursor()
    ns.remove("/run/stop-loop")
    loop = ns.popen("sh", "-c",
                    f"n=0; f=0; end=$(($(date +%s) + 120)); "
                    f"while [ ! -e /run/stop-loop ] && [ $(date +%s) -lt $end ]; do "
                    f"if chroot {MP} /bin/sh -c 'cat /hello.txt && /bin/true' >/dev/null; "
                    f"then n=$((n+1)); else f=$((f+1)); fi; done; echo $n $f",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for i in range(reloads):
            version = "2" if i % 2 == 0 else "1"
            set_image(ns, f"test.example/app@{version}")
            ns.systemctl("reload", UNIT)
            assert re.fullmatch(STATUS_RE.format(version=version, generation=first + i + 1), status(ns)), status(ns)
            assert hello(ns) == f"v{version}\n"
    finally:
        ns.write("/run/stop-loop", "")
        out, err = loop.communicate(timeout=60)
    runs, failures = (int(x) for x in out.split())
    assert failures == 0 and not err, f"{failures} of {runs + failures} execs failed: {err[-2000:]}"
    assert runs >= reloads, f"only {runs} execs ran during {reloads} reloads"
    assert_serving(ns, "1")
    lines = daemon_lines(ns, cursor, reloads)
    assert len(lines) == reloads, lines  # the daemon's line only: ExecReload's report would repeat it
    for i, (priority, text) in enumerate(lines):
        version = "2" if i % 2 == 0 else "1"
        assert priority == "6" and re.fullmatch(
            rf"INFO cnpsfs\.fs\.mount: generation {first + i + 1}: test\.example/app@{version} "
            rf"\(upgrade to test\.example/app@{version}\) in [\d.]+ ms: .*", text), (i, text)


def test_reload_to_a_missing_image_keeps_the_old_one(ns: SystemdNamespace) -> None:
    before = status(ns)
    cursor = ns.cursor()
    set_image(ns, "test.example/absent@3")
    try:
        refused = ns.systemctl("reload", UNIT, check=False)
    finally:
        set_image(ns, "test.example/app@1")
    assert refused.returncode != 0, refused
    assert status(ns) == before
    assert_serving(ns, "1")
    lines = daemon_lines(ns, cursor, 1)
    assert lines == [("3", "cnpsfs: error: mount app: reload to test.example/absent@3 failed, the mount is "
                           "unchanged: unknown reference 'test.example/absent@3': no such tag in /var/lib/cnpsfs")
                     ], lines
    assert any("Reload failed" in line for line in systemd_lines(ns, cursor))


def test_reload_refused_by_the_trust_policy_keeps_the_old_one(ns: SystemdNamespace, tmp_path: Path) -> None:
    """With a policy requiring signatures, a reload to an unsigned image is refused with the reason."""
    cli = Cli(ns.store)
    key = tmp_path / "test"
    cli.ok("key", "generate", key)
    cli.ok("sign", "test.example/app@1", "--key", f"{key}.key")
    ns.write("/etc/cnpsfs/keys/test.pub", Path(f"{key}.pub").read_text())
    ns.write("/etc/cnpsfs/policy.toml", 'default = "reject"\n[[rule]]\nnames = "test.example/*"\n'
             'require = "signed"\nkeys = ["/etc/cnpsfs/keys/test.pub"]\n')
    try:
        ns.systemctl("restart", UNIT)  # the policy in force from the start: app@1 is signed
        assert_serving(ns, "1")
        trust = json.loads(ns.run("/usr/local/bin/cnpsfs", "status", MP, "--json").stdout)["trust"]
        assert trust["verified"] is True, trust
        before = status(ns)
        cursor = ns.cursor()
        set_image(ns, "test.example/app@2")
        assert ns.systemctl("reload", UNIT, check=False).returncode != 0
        assert status(ns) == before
        assert_serving(ns, "1")
        lines = daemon_lines(ns, cursor, 1)
        assert len(lines) == 1 and lines[0][0] == "3", lines
        assert re.fullmatch(r"cnpsfs: error: mount app: reload to test\.example/app@2 failed, the mount is "
                            r"unchanged: .*test\.example/app@2.* refused by policy .*unsigned.*", lines[0][1]), lines
    finally:
        set_image(ns, "test.example/app@1")
        ns.remove("/etc/cnpsfs/policy.toml")
        ns.systemctl("restart", UNIT)
    assert_serving(ns, "1")


# --------------------------------------------------------------------------- the daemon dies


def test_kill_9_ends_in_a_restarted_serving_mount(ns: SystemdNamespace) -> None:
    before = show(ns, "MainPID", "NRestarts")
    cursor = ns.cursor()
    ns.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", UNIT)
    wait_restarted(ns, before)
    assert_serving(ns, "1")  # one mount: ExecStopPost detached the dead one
    assert re.fullmatch(STATUS_RE.format(version="1", generation=1), status(ns)), status(ns)
    events = systemd_lines(ns, cursor)
    assert any("status=9/KILL" in line for line in events), events
    assert any("Scheduled restart job" in line for line in events), events
    texts = [text for _p, text in daemon_lines(ns, cursor, 3)]
    assert texts[0] == "mount app: unmounted /var/lib/machines/app", texts  # ExecStopPost, on the dead mount
    assert texts[1:] == [f"INFO cnpsfs.cli.service: mount app: test.example/app@1 at {MP}",
                         f"INFO cnpsfs.fs.mounting: mounted at {MP}: {status(ns)}"], texts


def test_watchdog_restarts_a_stopped_daemon(ns: SystemdNamespace) -> None:
    """SIGSTOP: no more pings, so systemd aborts the daemon (its stacks go to the journal) and restarts it."""
    dropin = "/etc/systemd/system/cnpsfs@app.service.d/watchdog.conf"
    # LimitCORE=0: this host writes cores to the cwd; the abort is expected here.
    ns.write(dropin, "[Service]\nWatchdogSec=3s\nLimitCORE=0\n")
    try:
        ns.daemon_reload()
        ns.systemctl("restart", UNIT)
        assert show(ns, "WatchdogUSec")["WatchdogUSec"] == "3s"
        time.sleep(4)  # longer than WatchdogSec: the pings keep it alive
        assert_serving(ns, "1")
        before = show(ns, "MainPID", "NRestarts")
        cursor = ns.cursor()
        ns.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", UNIT)
        wait_restarted(ns, before)
        assert_serving(ns, "1")
        events = systemd_lines(ns, cursor)
        assert any("Watchdog timeout" in line for line in events), events
        assert any("Failed with result 'watchdog'" in line for line in events), events
        texts = [text for _p, text in daemon_lines(ns, cursor, 3)]
        assert "Fatal Python error: Aborted" in texts, texts  # faulthandler: the stacks follow
        assert any(re.match(r"(Current thread|Thread) 0x[0-9a-f]+", t) for t in texts), texts
    finally:
        ns.remove(dropin)
        ns.daemon_reload()
    ns.systemctl("restart", UNIT)
    assert show(ns, "WatchdogUSec")["WatchdogUSec"] == "0"
    assert_serving(ns, "1")


# --------------------------------------------------------------------------- stop


def test_stop_with_a_file_held_open(ns: SystemdNamespace) -> None:
    """Documented: the stop completes at once, the mount is detached lazily (with a warning) and
    the daemon exits; the holder's next read that needs the daemon fails with ENOTCONN."""
    assert_serving(ns, "1")
    holder = ns.popen("sh", "-c", f"exec 3< {MP}/big.bin; cd {MP}; echo held; read x; "
                      "cat <&3 >/dev/null; echo cat=$?; ls . >/dev/null; echo ls=$?",
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert readline(holder, 30) == "held\n"
        cursor = ns.cursor()
        started = time.monotonic()
        ns.systemctl("stop", UNIT, timeout=120)
        took = time.monotonic() - started
        state = show(ns, "ActiveState", "Result", "MainPID")
        assert state == {"ActiveState": "inactive", "Result": "success", "MainPID": "0"}, state
        assert took < 5, (f"stop took {took:.1f} s", [message(e) for e in ns.journal("-u", UNIT, after=cursor)])
        assert cnpsfs_mounts(ns) == []
        lines = daemon_lines(ns, cursor, 3)
        assert lines[0][0] == "4" and re.fullmatch(
            r"WARNING cnpsfs\.cli\.service: mount app: /var/lib/machines/app is busy: .*; detaching it lazily "
            r"and stopping the daemon \(files still open there fail with ENOTCONN\)", lines[0][1]), lines
        assert lines[1:] == [("6", "INFO cnpsfs.fs.mount: signal 15: unmounting"),
                             ("6", f"mount app: unmounted {MP}")], lines
        assert holder.poll() is None  # not in the unit's cgroup: systemd leaves it alone
        # While the holder still holds the old mount, the unit starts again on the mountpoint.
        ns.systemctl("start", UNIT)
        assert_serving(ns, "1")
        out, err = holder.communicate("\n", timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert out.splitlines() == ["cat=1", "ls=2"], (out, err)
    assert err.count("Transport endpoint is not connected") == 2, err


# --------------------------------------------------------------------------- writable mounts and bad files


def test_writable_mount_under_the_unit(ns: SystemdNamespace) -> None:
    """Copy-up, whiteouts, chown and mknod in a writable mount; a mount file made writable
    without daemon-reload is refused with the reason (its sandbox is still the read-only one)."""
    unit, mnt, upper = "cnpsfs@rw.service", "/var/lib/machines/rw", "/var/lib/cnpsfs-upper/rw"
    ns.write("/etc/cnpsfs/mounts/rw.toml", 'image = "test.example/app@1"\n')
    ns.daemon_reload()
    assert ns.show(unit, "CapabilityBoundingSet")["CapabilityBoundingSet"] == "cap_sys_admin"
    ns.write("/etc/cnpsfs/mounts/rw.toml", f'image = "test.example/app@1"\nwritable = "{upper}"\n')
    try:
        cursor = ns.cursor()
        assert ns.systemctl("start", unit, check=False).returncode != 0
        assert ns.show(unit, "ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": "0"}
        errors = daemon_lines(ns, cursor, 1, unit=unit)
        assert errors == [("3", "cnpsfs: error: mount rw is writable (/etc/cnpsfs/mounts/rw.toml) but this process "
                                "may not use CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID, CAP_MKNOD, "
                                "CAP_SETFCAP: the unit's sandbox was generated for a read-only mount; run `systemctl "
                                "daemon-reload` after changing writable (docs/systemd.md)")], errors
        ns.systemctl("reset-failed", unit)
        ns.daemon_reload()
        assert ns.show(unit, "CapabilityBoundingSet")["CapabilityBoundingSet"].count("cap_") > 30
        ns.systemctl("start", unit)
        assert ns.state(unit) == "active"
        assert [m for m in ns.mounts() if m[0] == mnt] == [(mnt, "overlay")]
        done = ns.run("sh", "-c", f"cd {mnt} && echo more >> hello.txt && echo new > new.txt && chmod 600 big.bin "
                      "&& chown 5:5 big.bin && rm usr/bin/true && mknod null c 1 3 && mkdir d && chown 7:7 d "
                      "&& cat hello.txt")
        assert done.stdout == "v1\nmore\n"
        on_disk = ns.path(f"{upper}/upper")
        assert (on_disk / "hello.txt").read_text() == "v1\nmore\n" and (on_disk / "new.txt").exists()
        assert (on_disk / "big.bin").stat().st_uid == 5 and (on_disk / "d").stat().st_uid == 7
        assert (on_disk / "usr/bin/true").is_char_device()  # the whiteout
        ns.systemctl("stop", unit)
        assert [m for m in ns.mounts() if m[0] == mnt or m[0].startswith("/run/cnpsfs/")] == []
        assert ns.state(unit) == "inactive"
    finally:
        ns.systemctl("stop", unit, check=False)
        ns.remove("/etc/cnpsfs/mounts/rw.toml")
        ns.daemon_reload()


def test_a_bad_mount_file_fails_the_start_naming_the_file(ns: SystemdNamespace) -> None:
    unit = "cnpsfs@bad.service"
    ns.write("/etc/cnpsfs/mounts/bad.toml", 'image = "test.example/app@1"\nmountpoit = "/srv/x"\n')
    try:
        ns.daemon_reload()  # the generator skips it (no drop-in)
        assert ns.show(unit, "DropInPaths")["DropInPaths"] == ""
        cursor = ns.cursor()
        assert ns.systemctl("start", unit, check=False).returncode != 0
        # Exit 2 (RestartPreventExitStatus=2): failed at once, not restarted until the start limit.
        assert ns.show(unit, "ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": "0"}
        lines = daemon_lines(ns, cursor, 1, unit=unit)
        assert len(lines) == 1 and lines[0][0] == "3", lines
        assert lines[0][1].startswith("cnpsfs: error: /etc/cnpsfs/mounts/bad.toml: unknown key 'mountpoit' (allowed: "
                                      "allow_other, "), lines
        assert ns.systemctl("start", "cnpsfs@nothing.service", check=False).returncode != 0
        assert ns.show("cnpsfs@nothing.service", "AssertResult")["AssertResult"] == "no"  # AssertPathExists=
    finally:
        ns.remove("/etc/cnpsfs/mounts/bad.toml")
        ns.systemctl("reset-failed", unit, "cnpsfs@nothing.service", check=False)
        ns.daemon_reload()


def test_stop_takes_down_the_running_mount_whatever_the_file_says_now(ns: SystemdNamespace) -> None:
    """The file edited while mounted (another mountpoint, then a typo): stop still unmounts MP."""
    assert_serving(ns, "1")
    for edited in ('image = "test.example/app@1"\nmountpoint = "/srv/elsewhere"\n',
                   'image = "test.example/app@1"\nmountpoit = "/srv/elsewhere"\n'):
        ns.write(CONFIG, edited)
        cursor = ns.cursor()
        try:
            ns.systemctl("stop", UNIT)
        finally:
            set_image(ns, "test.example/app@1")
        assert daemon_lines(ns, cursor, 1) == [("6", f"mount app: unmounted {MP}")]
        assert cnpsfs_mounts(ns) == [] and show(ns, "Result")["Result"] == "success"
        ns.systemctl("start", UNIT)
        assert_serving(ns, "1")


# --------------------------------------------------------------------------- boot order


CONSUMER_CAT = f"""[Unit]
Description=a oneshot that reads the app mount
Requires={UNIT}
After={UNIT}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'cat {MP}/hello.txt > /run/consumer-cat.out'

[Install]
WantedBy=multi-user.target
"""

CONSUMER_RUNC = f"""[Unit]
Description=a runc container whose root is the app mount
Requires={UNIT}
After={UNIT}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/runc run --bundle /srv/ctr cnpsfs-ctr
ExecStopPost=-/usr/sbin/runc delete --force cnpsfs-ctr
StandardOutput=file:/run/consumer-runc.out

[Install]
WantedBy=multi-user.target
"""

IDLE_TARGET = """[Unit]
Description=everything but the mounts and their consumers
Requires=basic.target
After=basic.target
AllowIsolate=yes
"""

CONSUMERS = ("consumer-cat.service", "consumer-runc.service")


def timestamp(ns: SystemdNamespace, unit: str, prop: str) -> int:
    return int(ns.show(unit, prop)[prop])


def assert_consumers_after_the_mount(ns: SystemdNamespace) -> None:
    """Both consumers ran, read v1 from the mount, and started after the mount was ready."""
    def settled() -> bool:
        states = [ns.state(u) for u in CONSUMERS]
        assert "failed" not in states, {u: ns.systemctl("status", u, check=False).stdout for u in CONSUMERS}
        return states == ["active", "active"]

    wait_for("the consumers are active", settled, 60, interval=0.2)
    ready = timestamp(ns, UNIT, "ActiveEnterTimestampMonotonic")
    assert ready > 0
    for unit in CONSUMERS:
        assert timestamp(ns, unit, "ExecMainStartTimestampMonotonic") >= ready, unit
    assert ns.path("/run/consumer-cat.out").read_text() == "v1\n"
    assert ns.path("/run/consumer-runc.out").read_text() == "v1\n"


def test_consumers_start_only_once_the_mount_is_ready(ns: SystemdNamespace) -> None:
    """Requires=/After= the mount, across isolate, daemon-reexec and a reboot of the namespace."""
    made = ns.run("/usr/local/bin/cnpsfs", "bundle", "test.example/ctr@1", "/srv/ctr-made")
    assert made.stdout.strip().splitlines()[-1] == "/srv/ctr-made", made
    config: dict[str, Any] = json.loads(ns.path("/srv/ctr-made/config.json").read_text())
    ns.run("/usr/local/bin/cnpsfs", "bundle", "--remove", "/srv/ctr-made")
    config["root"] = {"path": MP, "readonly": True}  # the container runs from the unit's mount
    ns.write("/srv/ctr/config.json", json.dumps(config, indent=2))
    ns.write("/etc/systemd/system/consumer-cat.service", CONSUMER_CAT)
    ns.write("/etc/systemd/system/consumer-runc.service", CONSUMER_RUNC)
    ns.write("/etc/systemd/system/cnpsfs-test-idle.target", IDLE_TARGET)
    ns.daemon_reload()
    ns.systemctl("enable", UNIT, "cnpsfs.target", *CONSUMERS)

    # isolate: everything stops (consumers first), then comes back in order.
    ns.systemctl("isolate", "cnpsfs-test-idle.target", timeout=120)
    # systemctl waits for the target's job; the stop jobs may still run.
    wait_for("isolate stopped the mount", lambda: ns.state(UNIT) == "inactive", 60, interval=0.2)
    assert cnpsfs_mounts(ns) == [] and [ns.state(u) for u in CONSUMERS] == ["inactive", "inactive"]
    for out in ("/run/consumer-cat.out", "/run/consumer-runc.out"):
        ns.remove(out)
    ns.systemctl("isolate", "multi-user.target", timeout=120)
    assert ns.state("cnpsfs.target") == "active"
    assert_consumers_after_the_mount(ns)
    assert_serving(ns, "1")

    # daemon-reexec: the new manager takes over the running daemon and its notify socket.
    main_pid = show(ns, "MainPID")["MainPID"]
    ns.systemctl("daemon-reexec", timeout=120)
    wait_for("systemd answers after daemon-reexec",
             lambda: ns.systemctl("is-active", UNIT, check=False).stdout.strip() == "active", 30)
    assert show(ns, "MainPID")["MainPID"] == main_pid
    set_image(ns, "test.example/app@2")
    try:
        ns.systemctl("reload", UNIT)
        assert re.fullmatch(STATUS_RE.format(version="2", generation=2), status(ns)), status(ns)
    finally:
        set_image(ns, "test.example/app@1")
    ns.systemctl("reload", UNIT)
    ns.systemctl("restart", "consumer-cat.service")
    assert ns.path("/run/consumer-cat.out").read_text() == "v1\n"

    # A reboot of the namespace: a clean shutdown, then a boot that starts them all again.
    cursor = ns.cursor()
    ns.reboot()
    stopped = systemd_lines(ns, cursor, UNIT)
    assert any(line.startswith("Stopped cnpsfs@app.service") for line in stopped), stopped
    assert_consumers_after_the_mount(ns)
    assert_serving(ns, "1")
    assert re.fullmatch(STATUS_RE.format(version="1", generation=1), status(ns)), status(ns)
    # The shutdown stopped the consumers before the mount they use.
    order = [message(e) for e in ns.journal(after=cursor) if e.get("SYSLOG_IDENTIFIER") == "systemd"]
    stop_mount = next(i for i, line in enumerate(order) if line.startswith("Stopping cnpsfs@app.service"))
    for unit in CONSUMERS:
        assert any(line.startswith(f"Stopped {unit}") for line in order[:stop_mount]), (unit, order)


# --------------------------------------------------------------------------- remote stores


@pytest.fixture(scope="module")
def remote_urls(ns: SystemdNamespace, registry: RegistryServer,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """test.example/ctr@1 pushed to an HTTP store (nginx over a file:// remote) and to docker-registry."""
    cli = Cli(ns.store)
    directory = tmp_path_factory.mktemp("remote") / "r"
    cli.ok("push", "test.example/ctr@1", f"file://{directory}")
    repo = f"docker://{registry.host}/cnpsfs-systemd/ctr"
    cli.ok("push", "test.example/ctr@1", repo)
    server = start_nginx(directory, tmp_path_factory.mktemp("nginx"), server_conf=NGINX_REMOTE_CONF)
    try:
        yield {"http": server.url, "registry": repo}
    finally:
        stop_process(server.proc)


@pytest.mark.parametrize("kind", ["http", "registry"])
def test_mount_from_a_remote_store(ns: SystemdNamespace, remote_urls: dict[str, str], kind: str) -> None:
    """Into an empty store, from 127.0.0.1: refused by the unit's AF_UNIX alone, served once the
    generator's drop-in (daemon-reload) adds AF_INET and AF_INET6 for this mount only."""
    name, url = f"remote-{kind}", remote_urls[kind]
    unit, mnt, store = f"cnpsfs@{name}.service", f"/var/lib/machines/{name}", f"/var/lib/cnpsfs-upper/store-{kind}"
    ns.write(f"/etc/cnpsfs/mounts/{name}.toml", f'image = "test.example/ctr@1"\nstore = "{store}"\n'
             f'remotes = ["{url}"]\nremote_timeout = 10\n')
    try:
        # Before daemon-reload there is no drop-in for it: the unit's AF_UNIX forbids the socket.
        cursor = ns.cursor()
        assert ns.systemctl("start", unit, check=False).returncode != 0
        ns.systemctl("stop", unit)  # and no more restarts
        errors = [text for prio, text in daemon_lines(ns, cursor, 1, unit=unit) if prio == "3"]
        assert errors and "address family not supported" in errors[0].lower(), errors
        assert url.split("//")[1] in errors[0], errors  # names the remote
        ns.systemctl("reset-failed", unit, check=False)

        ns.daemon_reload()
        props = ns.show(unit, "RestrictAddressFamilies", "After", "CapabilityBoundingSet")
        assert props["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"], props
        assert "network-online.target" in props["After"].split() and props["CapabilityBoundingSet"] == "cap_sys_admin"
        assert show(ns, "RestrictAddressFamilies")["RestrictAddressFamilies"] == "AF_UNIX"  # the local mount
        ns.systemctl("start", unit)
        assert ns.state(unit) == "active"
        assert ns.path(f"{mnt}/hello.txt").read_text() == "v1\n"
        assert ns.run("chroot", mnt, "/bin/sh", "-c", "cat /hello.txt").stdout == "v1\n"
        remote = json.loads(ns.run("/usr/local/bin/cnpsfs", "status", mnt, "--json").stdout)["remote"]
        assert remote["remotes"][0]["requests"] > 0, remote
        ns.systemctl("stop", unit)
        assert [m for m in ns.mounts() if m[0] == mnt] == []
    finally:
        ns.systemctl("stop", unit, check=False)
        ns.remove(f"/etc/cnpsfs/mounts/{name}.toml")
        ns.daemon_reload()


def test_a_clean_stop_is_one_journal_line(ns: SystemdNamespace) -> None:
    """ExecStop unmounts and says so; ExecStopPost, which runs after every stop, finds nothing to do."""
    cursor = ns.cursor()
    ns.systemctl("stop", UNIT)
    assert daemon_lines(ns, cursor, 1) == [("6", f"mount app: unmounted {MP}")]
    assert cnpsfs_mounts(ns) == []
    ns.systemctl("start", UNIT)
    assert_serving(ns, "1")
