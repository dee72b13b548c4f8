"""Helpers for the live-upgrade tests: real mounts, images from directories, tree digests.

A :class:`Mounted` is a ``cnpsfs mount`` daemon in the background, started by
:func:`mounted`, which waits until the mountpoint answers, fails at once with the
daemon's log if it did not, and always unmounts (``cnpsfs umount``, then
``fusermount3 -u -z``). Swaps go through the ``cnpsfs`` CLI like a user's, or straight
to the control socket (:meth:`Mounted.request`, the same JSON request the CLI sends)
where a test needs many of them quickly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import Cli, digest_of

FUSE_MODES = ("auto", "stock")


def fuse_unavailable() -> str | None:
    """Why real mounts cannot run here, or None (really opens /dev/fuse)."""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse does not open: {exc.strerror}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not on PATH (apt-get install fuse3)"
    if os.geteuid() != 0:
        return "the live-upgrade tests need root (chroot, owners)"
    return None


needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))


@dataclass
class Mounted:
    cli: Cli
    path: Path
    log: Path | None

    def cnpsfs(self, *args: str | os.PathLike[str], check: bool = True) -> Any:
        return self.cli(*args, check=check)

    def upgrade(self, ref: str | os.PathLike[str]) -> dict[str, Any]:
        return json.loads(self.cli.ok("upgrade", self.path, ref, "--json").stdout)

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli.ok("status", self.path, "--json").stdout)

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control-socket request without starting a CLI process (raises CnpsfsError)."""
        from cnpsfs.fs.control import control_request
        from cnpsfs.fs.daemon import status_record

        record = status_record(os.path.realpath(self.path))
        return control_request(record["control"], request)

    def log_problems(self) -> list[str]:
        if self.log is None or not self.log.exists():
            return []
        return [ln for ln in self.log.read_text(errors="replace").splitlines()
                if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|^Traceback", ln)]


@contextlib.contextmanager
def mounted(cli: Cli, ref: str | os.PathLike[str], mnt: Path, *, fuse_mode: str = "auto",
            check_log: bool = True) -> Iterator[Mounted]:
    """Mount *ref* at *mnt* for the duration of the block; fail on daemon WARNING/ERROR lines."""
    mnt.mkdir(parents=True, exist_ok=True)
    result = cli("mount", "--fuse-mode", fuse_mode, ref, mnt, timeout=120)
    if result.rc != 0 or not os.path.ismount(mnt):
        _force_unmount(mnt)
        pytest.fail(f"mount failed:\n{result}")
    log = None
    for word in (result.stdout + result.stderr).replace(")", " ").split():
        if word.endswith(".log"):
            log = Path(word)
    handle = Mounted(cli, mnt, log)
    try:
        yield handle
        if check_log:
            problems = handle.log_problems()
            assert not problems, "daemon logged problems:\n" + "\n".join(problems[-20:])
    finally:
        cli("umount", mnt, timeout=120)
        _force_unmount(mnt)


def _force_unmount(mnt: Path) -> None:
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, check=False)


# --------------------------------------------------------------------------- FileSets and images


def import_dir(cli: Cli, src: Path, name: str, version: str) -> str:
    """Import *src* as NAME@VERSION; returns the reference ``NAME@VERSION``."""
    digest_of(cli.ok("import", "dir", src, "--name", name, "--version", version))
    return f"{name}@{version}"


def write_manifest(path: Path, name: str, version: str, layers: list[dict[str, Any]], mode: str = "layers") -> Path:
    lines = [f'name = "{name}"', f'version = "{version}"', f'mode = "{mode}"']
    for layer in layers:
        lines.append("[[layers]]")
        for key, value in layer.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def create_image(cli: Cli, manifest: Path) -> str:
    """``cnpsfs image create``; returns the ``NAME@VERSION`` it tagged."""
    cli.ok("image", "create", manifest)
    text = manifest.read_text()
    fields = dict(ln.split(" = ", 1) for ln in text.splitlines() if ln.startswith(("name =", "version =")))
    return f"{json.loads(fields['name'])}@{json.loads(fields['version'])}"


# --------------------------------------------------------------------------- trees


@dataclass(frozen=True)
class Meta:
    kind: str
    mode: int
    size: int
    content: str  # sha256 of a file, a symlink's target, "" otherwise


def tree_meta(root: Path) -> dict[str, Meta]:
    """Every path below *root* (relative) with type, permission bits, size and content."""
    out: dict[str, Meta] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                out[rel] = Meta("f", stat.S_IMODE(st.st_mode), st.st_size, file_hash(path))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = Meta("l", 0, 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = Meta("d", stat.S_IMODE(st.st_mode), 0, "")
            else:
                out[rel] = Meta("o", stat.S_IMODE(st.st_mode), st.st_size, "")
    return out


def file_hash(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def overlay_meta(*roots: Path) -> dict[str, Meta]:
    """What stacking plain directories (no whiteouts) in order looks like."""
    out: dict[str, Meta] = {}
    for root in roots:
        out.update(tree_meta(root))
    return out
