"""Section ``import``: how long each system takes to ingest a root filesystem and what it stores.

Two scenarios on the same trees in the same run: v2 alone into an empty output, and v1 then v2
into one shared output (the second import shows what an image update costs once the previous
version is stored). Every timed import starts with cold caches.
"""

from __future__ import annotations

import logging
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cnpsfs_cli import CnpsfsCli
from .common import BenchError, drop_caches, du_bytes, ensure_packages, median, rmtree, run, timed
from .corpus import Corpus

log = logging.getLogger(__name__)


class Importer(ABC):
    """One system that turns a directory tree into stored bytes, possibly deduplicated."""

    name: str
    label: str

    def unavailable(self) -> str | None:
        """Why this system cannot run here, or None when it can."""
        return None

    @abstractmethod
    def import_tree(self, src: Path, out: Path, version: str) -> None:
        """Import ``src`` as ``version`` into ``out``, which earlier versions may already populate."""


class TarGz(Importer):
    name, label = "tar", "tar -czf"

    def import_tree(self, src: Path, out: Path, version: str) -> None:
        run(["tar", "-czf", out / f"{version}.tar.gz", "-C", src, "."])


class Squashfs(Importer):
    name, label = "squashfs", "mksquashfs (zstd)"

    def import_tree(self, src: Path, out: Path, version: str) -> None:
        run(["mksquashfs", src, out / f"{version}.squashfs", "-comp", "zstd", "-noappend", "-no-progress"])


class Casync(Importer):
    name, label = "casync", "casync make (one store)"

    def import_tree(self, src: Path, out: Path, version: str) -> None:
        run(["casync", "make", f"--store={out / 'store'}", out / f"{version}.caidx", src])


class Cnpsfs(Importer):
    name, label = "cnpsfs", "cnpsfs import dir (one store)"

    def __init__(self, cli: CnpsfsCli) -> None:
        self.cli = cli
        self.refs: dict[str, str] = {}

    def unavailable(self) -> str | None:
        return self.cli.unavailable()

    def import_tree(self, src: Path, out: Path, version: str) -> None:
        self.refs[version] = self.cli.import_dir(out / "store", src, version)


def importers(cli: CnpsfsCli) -> list[Importer]:
    return [TarGz(), Squashfs(), Casync(), Cnpsfs(cli)]


@dataclass
class ImportRow:
    """Raw numbers for one system; lists hold one value per repetition."""

    name: str
    label: str
    skipped: str | None = None
    v2_seconds: list[float] = field(default_factory=list)
    v2_bytes: list[int] = field(default_factory=list)
    v2_apparent: list[int] = field(default_factory=list)
    v1_seconds: list[float] = field(default_factory=list)
    v1_bytes: list[int] = field(default_factory=list)
    pair_v2_seconds: list[float] = field(default_factory=list)
    pair_bytes: list[int] = field(default_factory=list)
    pair_apparent: list[int] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Medians of every measure; the v1+v2 time is the median of per-rep sums."""
        pair_total = [a + b for a, b in zip(self.v1_seconds, self.pair_v2_seconds, strict=True)]
        pair_increment = [p - v for p, v in zip(self.pair_bytes, self.v1_bytes, strict=True)]
        return {
            "v2_seconds": median(self.v2_seconds),
            "v2_bytes": median(self.v2_bytes),
            "pair_seconds": median(pair_total),
            "pair_bytes": median(self.pair_bytes),
            "increment_seconds": median(self.pair_v2_seconds),
            "increment_bytes": median(pair_increment),
        }


def _fresh(path: Path) -> Path:
    rmtree(path)
    path.mkdir(parents=True)
    return path


def _timed_cold_import(imp: Importer, src: Path, out: Path, version: str) -> float:
    drop_caches()
    return timed(imp.import_tree, src, out, version)


def measure_one(imp: Importer, corpus: Corpus, work: Path, reps: int) -> ImportRow:
    row = ImportRow(imp.name, imp.label)
    for rep in range(reps):
        log.info("import: %s rep %d/%d", imp.name, rep + 1, reps)
        alone = _fresh(work / imp.name / "v2-alone")
        row.v2_seconds.append(_timed_cold_import(imp, corpus.v2, alone, "v2"))
        row.v2_apparent.append(du_bytes([alone])[0])
        row.v2_bytes.append(du_bytes([alone])[1])
        rmtree(alone)

        pair = _fresh(work / imp.name / "v1-v2")
        row.v1_seconds.append(_timed_cold_import(imp, corpus.v1, pair, "v1"))
        row.v1_bytes.append(du_bytes([pair])[1])
        row.pair_v2_seconds.append(_timed_cold_import(imp, corpus.v2, pair, "v2"))
        apparent, blocks = du_bytes([pair])
        row.pair_apparent.append(apparent)
        row.pair_bytes.append(blocks)
        rmtree(pair)
    if isinstance(imp, Cnpsfs):
        row.notes["refs"] = dict(imp.refs)
    return row


def run_import(
    corpus: Corpus, work: Path, reps: int, cli: CnpsfsCli, systems: set[str] | None
) -> list[ImportRow]:
    """Measure every importer; a system that cannot run becomes a skipped row, not a failed run."""
    ensure_packages({"tar": "tar", "gzip": "gzip", "mksquashfs": "squashfs-tools", "casync": "casync"})
    rows: list[ImportRow] = []
    for imp in importers(cli):
        if systems is not None and imp.name not in systems:
            continue
        reason = imp.unavailable()
        if reason is None:
            try:
                rows.append(measure_one(imp, corpus, work / "import", reps))
                continue
            except BenchError as exc:
                reason = f"failed: {exc}"
        log.warning("import: %s skipped: %s", imp.name, reason)
        rows.append(ImportRow(imp.name, imp.label, skipped=reason))
    shutil.rmtree(work / "import", ignore_errors=True)
    return rows
