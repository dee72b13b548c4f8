"""The only place the harness talks to cnpsfs: through its CLI, exactly as a user would.

The CLI is still being written, so every call is probed first and a missing command turns the
cnpsfs rows into "not available" notes instead of failing the run. The calls assumed are:

* ``cnpsfs --store STORE import dir DIR --name NAME --version VERSION`` (last stdout line = ref)
* ``cnpsfs --store STORE mount REF MNT`` (returns once MNT is mounted)
* ``cnpsfs umount MNT``
* ``cnpsfs status MNT --json`` (optional: FUSE request counters, see :meth:`CnpsfsCli.counters`)
* ``cnpsfs profile record MNT --name NAME --json -- COMMAND`` and ``mount --profile NAME`` / ``--no-prefetch``
  (optional: the mount section's profiled measure)
* ``cnpsfs --store STORE build RECIPE --cache DIR --json`` and ``cnpsfs --store STORE packages REF --json``
* ``cnpsfs --store STORE import oci docker://HOST/REPO:TAG --json``
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .common import BenchError, is_mounted, last_line, run, umount

log = logging.getLogger(__name__)

IMAGE_NAME = "bench.example/rootfs"


class CnpsfsCli:
    def __init__(self, repo: Path) -> None:
        self.exe = repo / ".venv" / "bin" / "cnpsfs"

    @functools.cache  # noqa: B019 - one probe per command per run is the point
    def _missing(self, *subcommand: str) -> str | None:
        """Probe ``cnpsfs SUBCOMMAND --help``; return why it is unusable, or None."""
        if not os.access(self.exe, os.X_OK):
            return f"cnpsfs CLI not available ({self.exe.name} not installed in .venv)"
        argv = [os.fspath(self.exe), *subcommand, "--help"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"cnpsfs CLI not available ({exc})"
        if proc.returncode != 0:
            what = " ".join(["cnpsfs", *subcommand, "--help"])
            why = f"`{what}` exited {proc.returncode}: {last_line(proc.stderr)}"
            return f"cnpsfs CLI not available ({why})"
        return None

    def unavailable(self) -> str | None:
        return self._missing("import", "dir")

    def mount_unavailable(self) -> str | None:
        return self._missing("import", "dir") or self._missing("mount") or self._missing("umount")

    def oci_unavailable(self) -> str | None:
        return self._missing("import", "oci")

    def import_oci(self, store: Path, source: str, *options: str) -> dict[str, Any]:
        """``cnpsfs import oci SOURCE --json``: digest, layers (with ``reused``), new_bytes."""
        proc = run([self.exe, "--store", store, "import", "oci", source, "--json", *options], capture=True,
                   timeout=3600)
        return self._json(proc.stdout, "import oci")

    def build_unavailable(self) -> str | None:
        return self._missing("build") or self._missing("packages")

    def build(self, store: Path, recipe: Path, cache: Path) -> dict[str, Any]:
        """``cnpsfs build --json``: digest, imported, reused and per-step timings."""
        proc = run([self.exe, "--store", store, "build", recipe, "--cache", cache, "--json"], capture=True,
                   timeout=3600)
        return self._json(proc.stdout, "build")

    def packages(self, store: Path, ref: str) -> list[dict[str, str]]:
        proc = run([self.exe, "--store", store, "packages", ref, "--json"], capture=True, timeout=300)
        return self._json(proc.stdout, "packages")

    @staticmethod
    def _json(text: str, what: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise BenchError(f"cnpsfs {what} --json printed no JSON: {last_line(text)}") from None

    def import_argv(self, store: Path, src: Path, version: str) -> list[str | os.PathLike[str]]:
        """The command line :meth:`import_dir` runs (for callers that run it themselves)."""
        return [self.exe, "--store", store, "import", "dir", src, "--name", IMAGE_NAME, "--version", version]

    def import_dir(self, store: Path, src: Path, version: str) -> str:
        proc = run(
            [self.exe, "--store", store, "import", "dir", src, "--name", IMAGE_NAME, "--version", version],
            capture=True,
        )
        ref = last_line(proc.stdout)
        if ref == "(no message)":
            raise BenchError("cnpsfs import printed no FileSet reference")
        return ref

    def profile_unavailable(self) -> str | None:
        return self._missing("profile", "record")

    def record_profile(self, mnt: Path, name: str, argv: list[str], env: Mapping[str, str]) -> dict[str, Any]:
        """``cnpsfs profile record MNT --name NAME --json -- ARGV``: what was stored (entries, bytes, digest)."""
        proc = run([self.exe, "profile", "record", mnt, "--name", name, "--json", "--", *argv], capture=True,
                   env=env, timeout=600)
        return self._json(proc.stdout[proc.stdout.find("{"):], "profile record")

    def mount(self, store: Path, ref: str, mnt: Path, *args: str) -> None:
        run([self.exe, "--store", store, "mount", *args, ref, mnt], timeout=300)

    def umount(self, mnt: Path) -> None:
        run([self.exe, "umount", mnt], timeout=120)

    def detach(self, mnt: Path) -> None:
        """``cnpsfs umount`` when something is mounted, falling back to a plain umount."""
        if is_mounted(mnt):
            try:
                self.umount(mnt)
            except BenchError as exc:
                log.warning("cnpsfs umount failed, falling back: %s", exc)
        umount(mnt)

    def status(self, mnt: Path) -> dict[str, Any] | None:
        """``cnpsfs status MNT --json``, or None when it is missing or fails."""
        if self._missing("status"):
            return None
        proc = subprocess.run([os.fspath(self.exe), "status", os.fspath(mnt), "--json"], capture_output=True,
                              text=True, timeout=60, check=False)
        if proc.returncode != 0:
            return None
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError:
            return None
        return data if isinstance(data, dict) else None

    def counters(self, mnt: Path) -> dict[str, int] | None:
        """FUSE request counts per operation, or None while ``cnpsfs status`` does not exist.

        Accepted shapes: ``{"requests": {"lookup": 12, ...}}`` or a flat ``{"lookup": 12, ...}``;
        non-integer values are ignored so the status output can carry other fields too.
        """
        data: Any = self.status(mnt)
        if isinstance(data, dict) and isinstance(data.get("requests"), dict):
            data = data["requests"]
        if not isinstance(data, dict):
            return None
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}
