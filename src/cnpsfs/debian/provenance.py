"""Recording and re-proving where package FileSets came from (docs/trust.md, "Provenance").

At build time (:func:`record_provenance`) each package FileSet imported from apt gets a
``cnpsfs/provenance`` record pointing into an *index FileSet*: the suite's ``InRelease``
and the ``Packages`` files that list the chosen packages, copied from apt's private lists
into the store (deduplicated like any file: a rebuild against the same lists stores
nothing new). The checks themselves live in :mod:`cnpsfs.trust.provenance`, so the
daemon can apply a ``debian-provenance`` policy; this module adds what only the Debian
layer knows: apt's index targets, merged-/usr views (:func:`merged_usr_derivation`), and
re-importing a .deb to prove a FileSet's digest (:func:`refetch`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cnpsfs import format as fmt
from cnpsfs.debian.apt import AptEnv, Candidate, parse_stanzas, sha256_file
from cnpsfs.errors import CnpsfsError, FormatError
from cnpsfs.store import LocalStore, Store, StoreWriter
from cnpsfs.trust.provenance import (
    INDEX_NAME,
    ChainResult,
    DebianProvenance,
    ProvenanceError,
    parse_stanza,
    posix_join,
    provenance_records,
    stanza_at,
)

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class IndexTarget:
    """One Packages index apt downloaded (``apt-get indextargets``)."""

    filename: Path  # the file in apt's lists directory
    metakey: str  # its path in the Release file, e.g. main/binary-amd64/Packages
    repo: str  # repository URI, e.g. http://deb.debian.org/debian/
    release_dir: str  # where the Release file is under the repository, e.g. dists/bookworm/

    @property
    def inrelease(self) -> Path:
        """apt's copy of the suite's InRelease: same lists-file prefix, metakey replaced."""
        suffix = self.metakey.replace("/", "_")
        return self.filename.with_name(self.filename.name[: -len(suffix)] + "InRelease")


def index_targets(env: AptEnv) -> list[IndexTarget]:
    out = []
    for stanza in parse_stanzas(env._run(["apt-get", "indextargets"]).encode()):
        if stanza.get("Identifier") != "Packages" or not stanza.get("Filename"):
            continue
        path = Path(stanza["Filename"])
        repo, base = stanza.get("Repo-URI", ""), stanza.get("Base-URI", "")
        if not path.is_file() or not base.startswith(repo):
            continue
        out.append(IndexTarget(path, stanza["MetaKey"], repo, base[len(repo):]))
    return out


def _has_record(store: Store, digest: bytes, sha256: str) -> bool:
    return any(isinstance(r, DebianProvenance) and r.deb_sha256.hex() == sha256
               for _d, r in provenance_records(store, digest))


def _find_stanzas(path: Path, wanted: dict[tuple[str, str, str], Candidate]) -> dict[tuple[str, str, str], int]:
    """Offsets of the stanzas of *wanted* (package, version, arch) whose SHA256 matches."""
    data = path.read_bytes()
    names = {key[0] for key in wanted}
    found: dict[tuple[str, str, str], int] = {}
    pos, size = 0, len(data)
    while pos < size:
        end = data.find(b"\n\n", pos)
        if end < 0:
            end = size
        if data.startswith(b"Package: ", pos):
            line_end = data.find(b"\n", pos, end)
            name = data[pos + 9 : line_end if line_end >= 0 else end].decode("utf-8", "replace").strip()
            if name in names:
                try:
                    stanza = parse_stanza(stanza_at(data, pos))
                except FormatError:
                    stanza = {}
                key = (name, stanza.get("version", ""), stanza.get("architecture", ""))
                cand = wanted.get(key)
                if cand is not None and stanza.get("sha256", "").lower() == cand.sha256 and key not in found:
                    found[key] = pos
        pos = end + 2
        while pos < size and data[pos] == 0x0A:
            pos += 1
    return found


def record_provenance(store: Store, env: AptEnv, candidates: Sequence[Candidate],
                      filesets: dict[str, bytes]) -> int:
    """Record the archive chain of every candidate's FileSet that lacks one; returns how many.

    *filesets* maps candidate keys (``pkg:arch``) to the imported FileSet digests. A
    package no index lists (a local repository without InRelease, say) is logged and
    left without a record: ``verify --provenance`` then names it.
    """
    todo = [c for c in candidates if not _has_record(store, filesets[c.key], c.sha256)]
    if not todo:
        return 0
    wanted = {(c.package, c.version, c.arch): c for c in todo}
    located: dict[tuple[str, str, str], tuple[IndexTarget, int]] = {}
    for target in index_targets(env):
        if not target.inrelease.is_file():
            log.warning("provenance: %s has no InRelease (only Release and Release.gpg?): not recorded",
                        target.repo + target.release_dir)
            continue
        remaining = {k: c for k, c in wanted.items() if k not in located}
        if not remaining:
            break
        for key, offset in _find_stanzas(target.filename, remaining).items():
            located[key] = (target, offset)
    for key in wanted.keys() - located.keys():
        log.warning("provenance: %s %s %s is in no signed index apt has: not recorded", *key)
    by_release: dict[Path, list[tuple[Candidate, IndexTarget, int]]] = {}
    for key, (target, offset) in located.items():
        by_release.setdefault(target.inrelease, []).append((wanted[key], target, offset))
    written = 0
    # Held across both commits: gc must not sweep the index FileSet before the records name it.
    with store.shared_lock() if isinstance(store, LocalStore) else contextlib.nullcontext():
        records = []
        for inrelease, items in sorted(by_release.items()):
            targets = {t.metakey: t for _c, t, _o in items}
            release_dir = items[0][1].release_dir.strip("/")
            index = _store_index(store, inrelease, release_dir, targets)
            for cand, target, offset in items:
                records.append(DebianProvenance(
                    filesets[cand.key], cand.package, cand.version, cand.arch, bytes.fromhex(cand.sha256), cand.size,
                    target.repo, index, posix_join(release_dir, "InRelease"), target.metakey, offset,
                    cand.filename))
        with store.writer() as writer:
            attach = [(r.subject, writer.add_object(r.encode())) for r in records]
            writer.commit(attach=attach)
            written = len(attach)
    return written


def _store_index(store: Store, inrelease: Path, release_dir: str, targets: dict[str, IndexTarget]) -> bytes:
    """The index FileSet: InRelease and the Packages files, at their archive paths, mtime 0."""
    from cnpsfs.ingest.directory import PathSource
    from cnpsfs.ingest.tree import ImportOptions, TreeBuilder, split_path, write_fileset

    builder = TreeBuilder(ImportOptions(name=INDEX_NAME, version=""), source_name=str(inrelease))
    files = [(posix_join(release_dir, "InRelease"), inrelease)]
    files += [(posix_join(release_dir, metakey), t.filename) for metakey, t in sorted(targets.items())]
    for inner, path in files:
        size = path.stat().st_size
        builder.add(split_path(inner.encode(), what=inner), fmt.Entry(b"", fmt.Kind.FILE, 0o644, size=size),
                    source=PathSource(os.fsencode(path), size), what=str(path))
    return write_fileset(store, builder).digest


# --------------------------------------------------------------------------- merged /usr


class _DigestWriter:
    """Stands in for a StoreWriter when recomputing a view: names objects, stores nothing."""

    def add_object(self, encoded: bytes) -> bytes:
        return fmt.digest_bytes(encoded)


def merged_usr_derivation(store: Store, digest: bytes, fs: fmt.FileSet) -> bytes | None:
    """For a merged-/usr view, the package FileSet it is a view of, after recomputing the
    view from it and finding the same digest (so the view hides nothing of its own)."""
    from cnpsfs.debian.usrmerge import MergedUsr

    meta = fs.metadata.get("cnpsfs")
    if not isinstance(meta, dict) or meta.get("view") != "merged-usr":
        return None
    try:
        origin = fmt.parse_digest(str(meta.get("of")))
    except FormatError:
        raise ProvenanceError(f"{fs.name}@{fs.version}: a merged-/usr view naming no FileSet") from None
    original = store.get_fileset(origin)
    view = MergedUsr(store, cast(StoreWriter, _DigestWriter())).merged_view(original, origin)
    if view is None or fmt.digest_bytes(fmt.encode_fileset(view)) != digest:
        raise ProvenanceError(f"{fs.name}@{fs.version} claims to be the merged-/usr view of "
                              f"{fmt.format_digest(origin)[:23]} but is not")
    return origin


DERIVATIONS: tuple[Callable[[Store, bytes, fmt.FileSet], bytes | None], ...] = (merged_usr_derivation,)


# --------------------------------------------------------------------------- refetch


def _download(url: str, dest: Path, timeout: float) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CnpsfsError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from None


def refetch(results: Iterable[ChainResult], cache: Path, *, timeout: float = DOWNLOAD_TIMEOUT,
            on_step: Callable[[str], None] | None = None) -> dict[bytes, str | None]:
    """Re-import each proven package's .deb into a scratch store; its FileSet must have the
    recorded digest. The .deb comes from the build cache (``CACHE/debs/<sha256>.deb``) or,
    when absent there, from the archive the record names; either way it must have the
    SHA-256 the signed index lists. Returns FileSet digest -> problem (None: proven)."""
    from cnpsfs.debian.deb import import_deb

    out: dict[bytes, str | None] = {}
    debs = cache / "debs"
    with tempfile.TemporaryDirectory(prefix="cnpsfs-refetch-") as tmp:
        scratch = LocalStore(Path(tmp) / "store", create=True)
        try:
            for result in results:
                record = result.record
                if record is None:
                    continue
                origin = record.subject
                path = debs / f"{record.deb_sha256.hex()}.deb"
                try:
                    if not path.is_file():
                        url = record.archive.rstrip("/") + "/" + record.filename
                        if on_step:
                            on_step(f"downloading {url}")
                        debs.mkdir(parents=True, exist_ok=True)
                        _download(url, path, timeout)
                    actual = sha256_file(path)
                    if actual != record.deb_sha256.hex():
                        out[origin] = (f"the .deb at {path} has SHA-256 {actual}, the signed index says "
                                       f"{record.deb_sha256.hex()} (remove it to download it again)")
                        continue
                    imported = import_deb(scratch, path).digest
                except CnpsfsError as exc:
                    out[origin] = str(exc)
                    continue
                out[origin] = None if imported == origin else (
                    f"re-importing {path.name} gives FileSet {fmt.format_digest(imported)[:23]}, not "
                    f"{fmt.format_digest(origin)[:23]}")
        finally:
            scratch.close()
    return out


@dataclass
class ProvenanceReport:
    """``cnpsfs verify --provenance``: one row per package layer, and what was not checked."""

    rows: list[dict[str, Any]]
    other_layers: list[str]  # NAME@VERSION of layers that are not Debian packages
    indices: int  # distinct signed indices the packages came from
    seconds: float

    @property
    def broken(self) -> int:
        return sum(not row["ok"] for row in self.rows)


def check_images(store: Store, refs: Sequence[str], *, keyrings: Sequence[str] = (), refetch_debs: bool = False,
                 cache: Path | None = None, on_step: Callable[[str], None] | None = None) -> ProvenanceReport:
    """The archive chain of every package layer of the images (or FileSets) *refs*.

    Offline unless *refetch_debs*: then each proven package's .deb is re-imported as well
    (:func:`refetch`), from *cache* (default: the build cache) or the archive.
    """
    import time

    from cnpsfs.debian.apt import DEFAULT_CACHE
    from cnpsfs.image.manifest import all_filesets, load_image
    from cnpsfs.trust.provenance import ChainVerifier

    start = time.monotonic()
    verifier = ChainVerifier(list(keyrings) or None, DERIVATIONS)
    results: list[ChainResult] = []
    skipped: list[str] = []
    for ref in refs:
        image, _digest = load_image(store, ref)
        for fileset in all_filesets(store, image):  # nested images seen through
            fs = store.get_fileset(fileset)
            if not verifier.is_package(fs):
                skipped.append(f"{fs.name}@{fs.version}")
                continue
            results.append(verifier.verify(store, fileset))
    refetched = refetch([r for r in results if r.ok], cache or DEFAULT_CACHE, on_step=on_step) if refetch_debs \
        else {}
    rows = []
    for r in results:
        problem = r.problem
        if problem is None and r.record is not None and refetch_debs:
            problem = refetched.get(r.record.subject)
        rows.append({"package": r.package, "fileset": fmt.format_digest(r.fileset), "ok": problem is None,
                     "problem": problem, "archive": r.record.archive if r.record else None,
                     "release": r.record.release if r.record else None, "signers": list(r.signers),
                     "refetched": refetch_debs and r.record is not None and problem is None})
    indices = len({(r.record.index, r.record.release) for r in results if r.record is not None})
    return ProvenanceReport(rows, skipped, indices, time.monotonic() - start)

