"""A real Debian root filesystem, imported and mounted: identical to its source path by
path, usable as a chroot, and consistent under 32 concurrent readers, in both FUSE modes.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli
from mountutil import (
    FUSE,
    FUSE_MODES_STOCK_LONG,
    Mount,
    compare_mount,
    file_digest,
    mount_image,
    needs_root,
    walk_lstat,
)

pytestmark = [*FUSE, needs_root]

BENCH_V2 = Path(os.environ.get("CNPSFS_BENCH_CORPUS", "/var/cache/cnpsfs-bench")) / "v2"


@pytest.fixture(scope="module")
def debian_store(debian_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("debian")
    cli = Cli(base / "store")
    cli.ok("import", "dir", debian_rootfs, "--name", "example.org/debian", "--version", "bookworm")
    (base / "image.toml").write_text('name = "example.org/debian-image"\nversion = "1"\n'
                                     '[[layers]]\nfileset = "example.org/debian@bookworm"\n')
    cli.ok("image", "create", base / "image.toml")
    return base / "store"


@pytest.fixture(scope="module")
def source_stats(debian_rootfs: Path) -> dict[bytes, os.stat_result]:
    return walk_lstat(debian_rootfs)


@pytest.fixture(scope="module")
def source_digests() -> dict[bytes, str]:
    """File digests of the source, filled by the first comparison and reused by the second mode."""
    return {}


@pytest.fixture(scope="module", params=FUSE_MODES_STOCK_LONG)
def mnt(debian_store: Path, request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    fuse_mode = request.param
    with mount_image(debian_store, "example.org/debian-image@1", tmp_path_factory.mktemp(f"mnt-{fuse_mode}"),
                     mode=fuse_mode) as mount:
        yield mount


def test_rootfs_matches_source(debian_rootfs: Path, mnt: Mount, source_stats: dict[bytes, os.stat_result],
                               source_digests: dict[bytes, str]) -> None:
    assert len(source_stats) > 5000
    problems = compare_mount(debian_rootfs, mnt.mountpoint, source_stats=source_stats,
                             source_digests=source_digests)
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:40])


def _chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
    return subprocess.run(["chroot", str(root), *argv], capture_output=True, env=env, timeout=120)


def test_chroot_runs_bash(mnt: Mount) -> None:
    result = _chroot(mnt.mountpoint, "/bin/bash", "-c",
                     'echo "$((6 * 7))"; read -r v < /etc/debian_version; echo "debian $v"; '
                     'for f in /usr/bin/*; do n=$((n+1)); done; echo "$n programs"; id -un; '
                     'sha256sum /bin/ls | cut -c1-16; test -u /usr/bin/su && echo suid-ok')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "42"
    assert re.fullmatch(r"debian 12\.\d+", lines[1]), lines
    assert int(lines[2].split()[0]) > 100
    assert lines[3] == "root"
    assert lines[5] == "suid-ok"


def _normalise_ls(text: bytes) -> list[bytes]:
    """``ls -lR`` output minus what legitimately differs: directory sizes and block totals."""
    out = []
    for line in text.splitlines():
        if line.startswith(b"total "):
            continue
        fields = line.split(None, 8)  # mode links owner group size date time zone name
        if line.startswith(b"d") and len(fields) == 9:
            fields[4] = b"-"
        out.append(b" ".join(fields))  # ls pads columns to the widest size in each directory
    return out


def test_chroot_ls_lR_is_identical_to_the_source(debian_rootfs: Path, mnt: Mount) -> None:
    mounted = _chroot(mnt.mountpoint, "ls", "-lR", "--time-style=full-iso", "/")
    assert mounted.returncode == 0, mounted.stderr
    source = _chroot(debian_rootfs, "ls", "-lR", "--time-style=full-iso", "/")
    assert source.returncode == 0, source.stderr
    got, want = _normalise_ls(mounted.stdout), _normalise_ls(source.stdout)
    assert len(got) > 5000
    if got != want:
        diff = [f"- {w!r}\n+ {g!r}" for w, g in zip(want, got, strict=False) if w != g][:10]
        pytest.fail(f"ls -lR differs ({len(want)} vs {len(got)} lines):\n" + "\n".join(diff))


@pytest.mark.parametrize("fuse_mode", FUSE_MODES_STOCK_LONG)
def test_32_concurrent_readers_agree_with_the_source(debian_store: Path, debian_rootfs: Path,
                                                     source_stats: dict[bytes, os.stat_result],
                                                     fuse_mode: str, tmp_path: Path) -> None:
    """A fresh mount (cold caches), 32 threads checksumming random files at the same time."""
    files = sorted(rel for rel, st in source_stats.items() if stat.S_ISREG(st.st_mode) and st.st_size)
    rng = random.Random(32)
    big = sorted(files, key=lambda rel: -source_stats[rel].st_size)[:40]
    chosen = sorted(set(rng.sample(files, 600) + big))
    src = os.fsencode(debian_rootfs)
    want = {rel: file_digest(os.path.join(src, rel)) for rel in chosen}
    with mount_image(debian_store, "example.org/debian-image@1", tmp_path / "mnt", mode=fuse_mode) as mount:
        root = os.fsencode(mount.mountpoint)

        def reader(seed: int) -> list[bytes]:
            mine = random.Random(seed).sample(chosen, 60) + big[seed % 8 :: 8]
            return [rel for rel in mine if file_digest(os.path.join(root, rel)) != want[rel]]

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            wrong = [rel for result in pool.map(reader, range(32)) for rel in result]
        assert not wrong, f"{len(wrong)} reads disagree with the source: {sorted(set(wrong))[:10]}"
        mount.assert_alive()


# --------------------------------------------------------------------------- python3 (bench corpus v2)


@pytest.fixture(scope="module")
def bench_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (BENCH_V2 / "usr/bin/python3").exists():
        pytest.skip(f"the bench corpus {BENCH_V2} (a Debian tree with python3) is not there; "
                    "scripts/bench builds it")
    base = tmp_path_factory.mktemp("v2")
    Cli(base / "store").ok("import", "dir", BENCH_V2, "--name", "example.org/bench", "--version", "2")
    return base


@pytest.fixture(scope="module", params=FUSE_MODES_STOCK_LONG)
def python_mount(bench_store: Path, request: pytest.FixtureRequest) -> Iterator[Mount]:
    base, fuse_mode = bench_store, request.param
    (base / "image.toml").write_text('name = "example.org/bench-image"\nversion = "2"\n'
                                     '[[layers]]\nfileset = "example.org/bench@2"\n')
    with mount_image(base / "store", base / "image.toml", base / f"mnt-{fuse_mode}", mode=fuse_mode) as mount:
        yield mount  # a manifest file, mounted directly


def test_chroot_runs_python3(python_mount: Mount) -> None:
    code = ("import hashlib, json, sqlite3, ssl, sys; "
            "db = sqlite3.connect(':memory:'); db.execute('create table t(x)'); "
            "print(json.dumps({'v': sys.version_info[:2], 'h': hashlib.sha256(b'x').hexdigest()[:8], "
            "'ssl': ssl.OPENSSL_VERSION.split()[0]}))")
    result = _chroot(python_mount.mountpoint, "/usr/bin/python3", "-c", code)
    assert result.returncode == 0, result.stderr.decode()
    assert b'"h": "2d711642"' in result.stdout and b'"ssl": "OpenSSL"' in result.stdout, result.stdout
