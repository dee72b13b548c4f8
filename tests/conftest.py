"""Shared fixtures: a fresh store, the CLI in a subprocess, tree builders, and a cached
Debian root filesystem. The plain helpers behind them live in cnpsfs_testlib.py; the
real-server fixtures (registries, token server, fault proxy, nginx) in servers.py; a real
systemd in its own namespaces in systemdns.py.

Everything here is generic: no fixture is autouse, and each builds what it needs in the
test's own tmp_path, so test modules elsewhere (mounts, composition) can use them too.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import IS_ROOT, Cli, CliResult, Meta, Node, build_tree, digest_of, snapshot, synthetic_nodes
from servers import fault_proxy, nginx, registry, tls_registry, token_registry  # noqa: F401 (fixtures for every module)
from systemdns import systemd_ns  # noqa: F401 (a booted systemd namespace, tests/systemdns.py)

from cnpsfs.store import LocalStore, Store

ROOTFS_CACHE = Path(os.environ.get("CNPSFS_TEST_ROOTFS", "/var/cache/cnpsfs-tests/rootfs"))
DEBIAN_SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"


# --------------------------------------------------------------------------- FUSE tests never skip in CI


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A ``fuse``-marked test runs only where FUSE works (mountutil's probe really opens
    /dev/fuse and finds fusermount3): elsewhere it skips with the reason, and under CI=true
    it fails, so a CI runner without FUSE cannot pass by skipping."""
    if item.get_closest_marker("fuse") is not None:
        from mountutil import require_fuse

        require_fuse()


# --------------------------------------------------------------------------- long runs


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="also run the long fuzz runs (tests marked 'long'; scripts/test --long)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``long`` run only with --long (the default suite keeps their short smoke)."""
    if config.getoption("--long"):
        return
    skipped = [item for item in items if item.get_closest_marker("long")]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if not item.get_closest_marker("long")]


# --------------------------------------------------------------------------- store and CLI


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh, empty store in tmp_path/store (the same path the ``cli`` fixture uses)."""
    s = LocalStore(tmp_path / "store", create=True)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """``cli(*args)`` runs ``cnpsfs --store tmp_path/store args`` and returns rc/stdout/stderr."""
    return Cli(tmp_path / "store")


@pytest.fixture
def imported_digest() -> Callable[[CliResult], str]:
    return digest_of


@pytest.fixture
def synthetic_tree(tmp_path: Path) -> Callable[..., Path]:
    """``synthetic_tree(name="tree", **options)`` builds :func:`synthetic_nodes` under tmp_path/name.

    Options: ``seed``, ``large``, ``sparse`` (a 5 GiB sparse file), ``devices``, and
    ``extra`` (more :class:`Node` values). Needs root (owners, devices, security.* xattrs).
    """
    if not IS_ROOT:
        pytest.skip("the synthetic tree needs root (chown, mknod, security.capability)")

    def make(name: str = "tree", *, extra: Sequence[Node] = (), **options: Any) -> Path:
        nodes = synthetic_nodes(**options) + list(extra)
        return build_tree(tmp_path / name, nodes, root_mode=0o755, root_mtime_ns=1_600_000_000_000_000_001)

    return make


@pytest.fixture
def tree_snapshot() -> Callable[..., dict[bytes, Meta]]:
    """:func:`snapshot` as a fixture, for test modules elsewhere in the tree."""
    return snapshot


# --------------------------------------------------------------------------- a real Debian root filesystem


def host_mirror() -> str:
    """The main Debian mirror from the host's apt sources (deb822 first, then one-line lists)."""
    candidates: list[str] = []
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in src.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.M))
            if "deb" in fields.get("Types", "").split() and DEBIAN_SUITE in fields.get("Suites", "").split():
                candidates += fields.get("URIs", "").split()
    for listing in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if listing.exists():
            pattern = rf"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+{DEBIAN_SUITE}\s"
            candidates += re.findall(pattern, listing.read_text(), flags=re.M)
    return next((uri for uri in candidates if "security" not in uri), FALLBACK_MIRROR)


def _mirror_unreachable(mirror: str) -> str | None:
    url = f"{mirror.rstrip('/')}/dists/{DEBIAN_SUITE}/Release"
    try:
        with urllib.request.urlopen(url, timeout=20) as resp:
            resp.read(64)
    except Exception as exc:
        return f"{url}: {exc}"
    return None


def build_debian_rootfs(dest: Path = ROOTFS_CACHE, include: Sequence[str] = ()) -> Path:
    """``debootstrap --variant=minbase bookworm`` into *dest*, once; later calls reuse it.

    *include* adds packages (``--include``, with their dependencies); a different list
    wants a different *dest*, since the cache is keyed by the path alone.

    Built in ``dest.tmp`` and renamed when complete, under a lock, so an interrupted or
    concurrent build is never mistaken for a finished one. Skips (not fails) only when the
    mirror cannot be reached.
    """
    if dest.is_dir():
        return dest
    if not IS_ROOT:
        pytest.skip("building the Debian root filesystem needs root (debootstrap)")
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_dir():
            return dest
        mirror = host_mirror()
        unreachable = _mirror_unreachable(mirror)
        if unreachable:
            pytest.skip(f"debootstrap cannot reach the Debian mirror ({unreachable})")
        tmp = dest.with_name(dest.name + ".tmp")
        if tmp.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(tmp)], check=True)
        extra = [f"--include={','.join(include)}"] if include else []
        proc = subprocess.run(["debootstrap", "--variant=minbase", *extra, DEBIAN_SUITE, str(tmp), mirror],
                              capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            log_file = tmp / "debootstrap" / "debootstrap.log"
            tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
            if _mirror_unreachable(mirror):
                pytest.skip(f"debootstrap cannot reach the Debian mirror {mirror}")
            pytest.fail(f"debootstrap failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}\n{tail}")
        tmp.rename(dest)
    return dest


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    """A Debian bookworm minbase tree, cached in /var/cache/cnpsfs-tests/rootfs (read-only: do not modify)."""
    return build_debian_rootfs()
