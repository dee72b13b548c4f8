"""Shared by the remote-store tests: the Debian images they push, and an nginx that serves a
``file://`` remote the way docs/remote.md says to.

v1 is the tests' debootstrap minbase tree; v2 is the same tree plus python3 (the python3
packages from the Debian mirror, extracted as dpkg would, usr-merged), so v2 after v1 is
the realistic update the issue measures: a new FileSet that shares most chunks with v1.
Both are imported once per session into a source store, each as a FileSet and a one-layer
image (``example.org/debian-image@1`` and ``@2``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli

ROOTFS_PYTHON = Path(os.environ.get("CNPSFS_TEST_ROOTFS_PYTHON", "/var/cache/cnpsfs-tests/rootfs-python"))
PYTHON_PACKAGES = ["libssl3", "libexpat1", "libpython3.11-minimal", "python3.11-minimal", "python3-minimal",
                   "libpython3.11-stdlib", "media-types"]
IMAGE_V1 = "example.org/debian-image@1"
IMAGE_V2 = "example.org/debian-image@2"
#: What the chroot test runs (the issue's command).
PYTHON_CODE = "import json, email, http.client, asyncio; print(json.dumps({'ok': True}))"

#: How nginx serves a remote: blobs are immutable (cacheable forever), tags short-lived.
NGINX_REMOTE_CONF = """
location /blobs/ {
    add_header Cache-Control "public, max-age=31536000, immutable";
    default_type application/octet-stream;
}
location /tags/ {
    add_header Cache-Control "public, max-age=10";
    default_type application/vnd.oci.image.manifest.v1+json;
}
location = /cnpsfs-remote {
    add_header Cache-Control "public, max-age=300";
    default_type text/plain;
}
"""


def build_rootfs_python(rootfs: Path, debs: list[Path], dest: Path = ROOTFS_PYTHON) -> Path:
    """*rootfs* plus *debs* extracted (usr-merged), once; later calls reuse it (built aside, renamed)."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_dir():
            return dest
        tmp = dest.with_name(dest.name + ".tmp")
        if tmp.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(tmp)], check=True)
        subprocess.run(["cp", "-a", str(rootfs), str(tmp)], check=True)
        for deb in debs:
            staging = tmp.with_name(tmp.name + ".deb")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
            for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
                src = staging / top
                if src.is_dir() and not src.is_symlink() and (tmp / top).is_symlink():
                    (staging / "usr").mkdir(exist_ok=True)
                    subprocess.run(["cp", "-a", f"{src}/.", str(staging / "usr" / top)], check=True)
                    shutil.rmtree(src)
            subprocess.run(["cp", "-a", f"{staging}/.", str(tmp)], check=True)
            shutil.rmtree(staging)
        assert (tmp / "usr/bin/python3").exists(), "python3 did not land in the tree"
        tmp.rename(dest)
    return dest


@dataclass
class SourceStore:
    """The store images are pushed from: v1 and v2, each a FileSet and an image."""

    path: Path
    cli: Cli
    v1_tree: Path
    v2_tree: Path
    v1_new_bytes: int
    v2_new_bytes: int  # what importing v2 after v1 stored anew: what a push of v2 after v1 should send


def make_source_store(base: Path, v1_tree: Path, v2_tree: Path) -> SourceStore:
    import json

    cli = Cli(base / "store")
    sizes = []
    for version, tree in (("1", v1_tree), ("2", v2_tree)):
        out = cli.ok("import", "dir", tree, "--name", "example.org/debian", "--version", version, "--json")
        sizes.append(json.loads(out.stdout)["new_bytes"])
        manifest = base / f"image{version}.toml"
        manifest.write_text(f'name = "example.org/debian-image"\nversion = "{version}"\n'
                            f'[[layers]]\nfileset = "example.org/debian@{version}"\n')
        cli.ok("image", "create", manifest)
    return SourceStore(base / "store", cli, v1_tree, v2_tree, sizes[0], sizes[1])


def python_debs() -> list[Path]:
    if shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None:
        pytest.skip("needs dpkg-deb and apt-get (Debian) to add python3 to the test tree")
    from test_import_deb import fetch_debs

    return fetch_debs(PYTHON_PACKAGES)


# --------------------------------------------------------------------------- squid


#: A regional cache in front of an origin: keeps what the origin says is cacheable, answers
#: a Range request from the whole object it fetches once (range_offset_limit -1), and
#: collapses concurrent misses for one object into one origin request.
SQUID_CONF = """
http_port 127.0.0.1:{port}
pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log squid
cache_store_log none
coredump_dir {dir}
cache_mem 1024 MB
maximum_object_size 512 MB
maximum_object_size_in_memory 256 MB
range_offset_limit -1
collapsed_forwarding on
quick_abort_min -1 KB
acl localnet src 127.0.0.0/8
http_access allow localnet
http_access deny all
refresh_pattern . 0 20% 4320
shutdown_lifetime 1 seconds
pinger_enable off
"""


@dataclass
class SquidServer:
    url: str
    directory: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        from servers import stop_process

        stop_process(self.proc)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_squid() -> SquidServer:
    """squid in the foreground (``-N``) on a free loopback port, memory cache only."""
    import socket
    import tempfile
    import time

    from servers import free_port, require_program

    program = require_program("squid", "squid")
    # squid drops to its own user: its directory must not be under pytest's 0700 temp dirs
    directory = Path(tempfile.mkdtemp(prefix="cnpsfs-squid-"))
    directory.chmod(0o777)
    port = free_port()
    (directory / "squid.conf").write_text(SQUID_CONF.format(port=port, dir=directory))
    log = open(directory / "stdout.log", "wb")  # noqa: SIM115 (the child's)
    proc = subprocess.Popen([program, "-N", "-f", str(directory / "squid.conf")], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=directory)
    log.close()
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            text = (directory / "stdout.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"squid exited with {proc.returncode}:\n{text}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("squid did not listen within 30 s") from None
            time.sleep(0.1)
    return SquidServer(f"http://127.0.0.1:{port}", directory, proc)
