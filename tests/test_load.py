"""Load (issue 15): 32 readers of random ranges while the mount swaps images every second and
an import and a gc run beside it, bounded in time.

Every read must return exactly the bytes of one of the two images at that range (a file
is opened per read, so it may see either generation, never a mix), no reader may see an
error, and the daemon's RSS must stay flat. The default suite runs a 20 s smoke;
``scripts/test --long`` runs the issue's 5 minutes.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli
from mountutil import mount_image, write_manifest

pytestmark = [pytest.mark.fuse]

READERS = 32
FILES = 40


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _version(cli: Cli, root: Path, tag: str, seed: int) -> tuple[str, dict[str, bytes]]:
    """A FileSet of FILES files (half of them differ between versions) and an image of it."""
    rnd = random.Random(seed)
    same = random.Random(1)
    files: dict[str, bytes] = {}
    tree = root / f"tree-{tag}"
    tree.mkdir()
    for i in range(FILES):
        size = same.randrange(4 << 10, 768 << 10)
        data = same.randbytes(size) if i % 2 == 0 else rnd.randbytes(size)
        files[f"f{i:02d}"] = data
        (tree / f"f{i:02d}").write_bytes(data)
    cli.ok("import", "dir", tree, "--name", "example.org/load-files", "--version", tag)
    manifest = write_manifest(root / f"{tag}.toml", "example.org/load", [f"example.org/load-files@{tag}"],
                              version=tag)
    cli.ok("image", "create", manifest)
    return f"example.org/load@{tag}", files


@pytest.mark.parametrize("seconds", [
    pytest.param(15, id="smoke"),
    pytest.param(300, id="5min", marks=pytest.mark.long),
])
def test_readers_swaps_import_and_gc_together(cli: Cli, tmp_path: Path, seconds: int) -> None:
    ref_a, files_a = _version(cli, tmp_path, "a", 11)
    ref_b, files_b = _version(cli, tmp_path, "b", 22)
    names = sorted(files_a)
    errors: list[str] = []
    reads = [0] * READERS
    stop = threading.Event()
    with mount_image(cli.store_path, ref_a, tmp_path / "mnt") as m:
        def reader(k: int) -> None:
            rnd = random.Random(k)
            while not stop.is_set():
                name = rnd.choice(names)
                a, b = files_a[name], files_b[name]
                size = len(a)
                offset = rnd.randrange(size)
                length = rnd.randrange(1, 256 << 10)
                try:
                    fd = os.open(m.mountpoint / name, os.O_RDONLY)
                    try:
                        got = os.pread(fd, length, offset)
                    finally:
                        os.close(fd)
                except OSError as exc:
                    errors.append(f"{name} [{offset}, +{length}): {exc}")
                    return
                if got != a[offset : offset + length] and got != b[offset : offset + length]:
                    errors.append(f"{name} [{offset}, +{length}): bytes of neither image")
                    return
                reads[k] += 1

        swaps: list[int] = []

        def swapper() -> None:
            # A swap starts every second (the rate): the time one takes counts.
            while not stop.is_set():
                started = time.monotonic()
                try:
                    swaps.append(m.upgrade(ref_b if len(swaps) % 2 == 0 else ref_a)["generation"])
                except Exception as exc:  # reported by the test thread
                    errors.append(f"swap {len(swaps) + 1}: {exc}")
                    return
                stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

        imports = [0]

        def importer() -> None:
            rnd = random.Random(99)
            while not stop.is_set():
                tree = tmp_path / f"extra-{imports[0]}"
                tree.mkdir()
                for i in range(20):
                    (tree / f"x{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 200 << 10)))
                for args in (("import", "dir", str(tree), "--name", "example.org/load-extra",
                              "--version", str(imports[0])),
                             ("tag", "rm", f"example.org/load-extra@{imports[0]}"),
                             ("gc",)):
                    result = cli(*args)
                    if result.rc != 0:
                        errors.append(f"{' '.join(args)}: {result.stderr.strip()}")
                        return
                imports[0] += 1

        threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(READERS)]
        threads += [threading.Thread(target=swapper, daemon=True), threading.Thread(target=importer, daemon=True)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + seconds
        time.sleep(min(5.0, seconds / 4))
        rss_start = _rss_kib(m.pid)
        while time.monotonic() < deadline and not errors:
            time.sleep(0.5)
        rss_end = _rss_kib(m.pid)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a load thread did not stop"
        m.assert_alive()
        # For docs/reliability.md (pytest -s shows it).
        print(f"\nload: {seconds} s: {sum(reads)} reads by {READERS} readers, {len(swaps)} swaps,"
              f" {imports[0]} import/gc rounds, {len(errors)} errors; daemon RSS {rss_start} KiB after"
              f" warm-up, {rss_end} KiB at the end")
        assert not errors, errors[:5]
        assert min(reads) > 0 and sum(reads) > 1000, reads
        assert len(swaps) >= seconds // 2, f"only {len(swaps)} swaps in {seconds} s"
        assert swaps == sorted(swaps)
        assert imports[0] >= 1
        # Flat: what the daemon holds does not grow with the swaps and reads it served.
        allowed = 0.10 if seconds >= 120 else 0.25
        assert rss_end <= rss_start * (1 + allowed) + 4096, (rss_start, rss_end)
    # The two images survived every gc: both still verify.
    assert "no problems" in cli.ok("verify", ref_a, ref_b).stderr
