"""Import a tar archive (plain, gzip, xz, bzip2 or zstd; OCI layer whiteouts) as a FileSet.

The archive is read once, as a stream, so ``-`` (a pipe) works. Large members are cut as
they arrive (their chunks do not depend on order); small members are spooled and cut in
canonical order at the end. Every member is checked before anything is committed: one
bad member rejects the whole archive and nothing becomes visible in the store.
"""

from __future__ import annotations

import base64
import concurrent.futures
import gzip
import lzma
import os
import sys
import tarfile
import tempfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, Literal, cast

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import ImportRejected
from cnpsfs.format.chunker import LARGE_FILE
from cnpsfs.ingest.content import ContentWriter
from cnpsfs.ingest.layout import in_cold_tree
from cnpsfs.ingest.tree import ImportOptions, ImportResult, SpoolSource, TreeBuilder, split_path, write_fileset
from cnpsfs.store import Store, StoreWriter

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
SPOOL_MEMORY = 256 << 20
_PIECE = 4 << 20

_CORRUPT = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, zstandard.ZstdError, ValueError)


class _StrictTarInfo(tarfile.TarInfo):
    """Fails on a damaged or cut-off header instead of ending the archive there.

    tarfile treats an invalid or truncated header after the first member as the end of
    the archive, so a corrupt or partly downloaded layer would import as a smaller tree.
    A clean end of data without the end-of-archive blocks is still accepted, as GNU tar does.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> _StrictTarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:  # type: ignore[attr-defined]
            raise tarfile.ReadError(f"damaged member header at offset {tarfile_.offset}: {exc}") from None


def open_tar_stream(raw: IO[bytes], label: str) -> tuple[tarfile.TarFile, list[IO[bytes]]]:
    """Detect the compression from magic bytes and open a streaming TarFile.

    Python's tarfile has no zstd in 3.11, so zstd goes through zstandard's stream reader.
    """
    buffered = raw if hasattr(raw, "peek") else open(raw.fileno(), "rb", closefd=False)  # noqa: SIM115
    head = buffered.peek(6)[:6]  # type: ignore[attr-defined]
    extra: list[IO[bytes]] = []
    stream: IO[bytes] = buffered
    mode: Literal["r|", "r|xz", "r|bz2"] = "r|"
    if head.startswith(b"\x1f\x8b"):
        # Not tarfile's "r|gz": it never checks the gzip CRC, so flipped bits import silently.
        stream = cast(IO[bytes], gzip.GzipFile(fileobj=buffered, mode="rb"))
        extra.append(stream)
    elif head.startswith(b"\xfd7zXZ\x00"):
        mode = "r|xz"
    elif head.startswith(b"BZh"):
        mode = "r|bz2"
    elif head.startswith(b"\x28\xb5\x2f\xfd"):
        stream = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
        extra.append(stream)
    try:
        # The caller owns and closes the TarFile (it streams members across the import).
        tf = tarfile.open(fileobj=stream, mode=mode, encoding="utf-8", errors="surrogateescape",  # noqa: SIM115
                          tarinfo=_StrictTarInfo)
    except _CORRUPT as exc:
        raise ImportRejected(f"{label}: not a readable tar archive ({exc})") from None
    return tf, extra


def drain_compressed(streams: list[IO[bytes]], label: str) -> None:
    """Read decompressors to their end, where gzip checks its CRC and truncation shows.

    tarfile stops at the end-of-archive blocks, before a compressed stream's trailer.
    """
    try:
        for stream in streams:
            while stream.read(1 << 20):
                pass
    except _CORRUPT as exc:
        raise ImportRejected(f"{label}: corrupt compressed data after the last member ({exc})") from None


def _mtime_ns(member: tarfile.TarInfo) -> int:
    exact = member.pax_headers.get("mtime")
    if exact:
        sec, _, frac = exact.partition(".")
        sign = -1 if sec.startswith("-") else 1
        try:
            return int(sec) * 1_000_000_000 + sign * int((frac + "000000000")[:9] or 0)
        except ValueError:
            raise ImportRejected(f"member {member.name!r}: bad PAX mtime {exact!r}") from None
    return int(member.mtime) * 1_000_000_000


def _xattrs(member: tarfile.TarInfo) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")] = \
                value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
            try:
                out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                raise ImportRejected(f"member {member.name!r}: bad xattr encoding for {name!r}") from None
    return out


def _name_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class TarImporter:
    """Reads members into a TreeBuilder; large file data goes straight to the store."""

    def __init__(self, builder: TreeBuilder, label: str, spool: IO[bytes]) -> None:
        self.builder = builder
        self.label = label
        self.spool = spool
        self.last = "(start of archive)"

    def member_parts(self, member: tarfile.TarInfo) -> tuple[bytes, ...]:
        return split_path(_name_bytes(member.name), what=f"{self.label}: member {member.name!r}")

    def run(self, tf: tarfile.TarFile, writer: StoreWriter, content: ContentWriter) -> None:
        try:
            for member in self._members(tf):
                self.last = member.name
                self.add(member, tf, content)
        except ImportRejected:
            raise
        except _CORRUPT as exc:
            raise ImportRejected(f"{self.label}: corrupt or truncated archive after member {self.last!r}"
                                 f" ({exc})") from None

    @staticmethod
    def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        while True:
            member = tf.next()
            if member is None:
                return
            yield member

    def add(self, member: tarfile.TarInfo, tf: tarfile.TarFile, content: ContentWriter) -> None:
        what = f"{self.label}: member {member.name!r}"
        parts = self.member_parts(member)
        base = parts[-1] if parts else b""
        if base == OPAQUE_MARKER:
            self.builder.mark_opaque(parts[:-1], what)
            return
        if base.startswith(WHITEOUT_PREFIX):
            if self._below_non_directory(parts[:-1]):
                # umoci writes the whiteouts of a replaced directory's children after the file
                # that replaced it: they hide nothing the file does not already hide.
                return
            target = base[len(WHITEOUT_PREFIX):]
            entry = fmt.Entry(b"", fmt.Kind.WHITEOUT, 0)
            self.builder.add((*parts[:-1], target), entry, what=what)
            return
        entry = fmt.Entry(b"", fmt.Kind.FILE, member.mode & 0o7777, member.uid, member.gid,
                          _mtime_ns(member), _xattrs(member))
        if member.islnk():
            self._hardlink(parts, member, entry, what)
            return
        if member.isreg():
            entry.size = member.size
            node = self.builder.add(parts, entry, what=what)
            node.link_group = node  # a later hard link may join this group
            data = tf.extractfile(member)
            assert data is not None
            if member.size >= LARGE_FILE:
                # Cut as it arrives, before its siblings are known: only the path rule applies.
                node.extents, entry.hash = content.add_large(self._pieces(data, member.size, what), member.size,
                                                             cold=in_cold_tree(parts))
            else:
                buf = data.read(member.size)
                if len(buf) != member.size:
                    raise ImportRejected(f"{what}: truncated data")
                self.spool.seek(0, os.SEEK_END)
                offset = self.spool.tell()
                self.spool.write(buf)
                node.source = SpoolSource(self.spool, offset, member.size)
            return
        if member.isdir():
            entry.kind = fmt.Kind.DIR
        elif member.issym():
            entry.kind = fmt.Kind.SYMLINK
            entry.target = _name_bytes(member.linkname)
            if not entry.target or b"\0" in entry.target:
                raise ImportRejected(f"{what}: invalid symlink target")
        elif member.ischr() or member.isblk():
            entry.kind = fmt.Kind.CHARDEV if member.ischr() else fmt.Kind.BLOCKDEV
            entry.rdev = (member.devmajor, member.devminor)
        elif member.isfifo():
            entry.kind = fmt.Kind.FIFO
        else:
            raise ImportRejected(f"{what}: unsupported member type {member.type!r}")
        self.builder.add(parts, entry, what=what)

    def _below_non_directory(self, parts: tuple[bytes, ...]) -> bool:
        for depth in range(1, len(parts) + 1):
            node = self.builder.lookup(parts[:depth])
            if node is None:
                return False
            if node.entry.kind is not fmt.Kind.DIR:
                return True
        return False

    def _hardlink(self, parts: tuple[bytes, ...], member: tarfile.TarInfo, entry: fmt.Entry, what: str) -> None:
        target_parts = split_path(_name_bytes(member.linkname), what=f"{what}: hard link target {member.linkname!r}")
        target = self.builder.lookup(target_parts)
        if target is None or target.implicit:
            raise ImportRejected(f"{what}: hard link to missing or later member {member.linkname!r}")
        if target.entry.kind is fmt.Kind.DIR:
            raise ImportRejected(f"{what}: hard link to a directory")
        src = target.entry
        linked = fmt.Entry(b"", src.kind, src.mode, src.uid, src.gid, src.mtime_ns, dict(src.xattrs),
                           src.size, target=src.target, rdev=src.rdev)
        if target.link_group is None:
            target.link_group = target
        node = self.builder.add(parts, linked, source=target.source, link_group=target.link_group, what=what)
        node.extents = target.extents
        linked.hash = src.hash

    @staticmethod
    def _pieces(data: IO[bytes], size: int, what: str) -> Iterator[bytes]:
        remaining = size
        while remaining:
            piece = data.read(min(_PIECE, remaining))
            if not piece:
                raise ImportRejected(f"{what}: truncated data")
            remaining -= len(piece)
            yield piece


def import_tar(store: Store, source: str, options: ImportOptions,
               on_progress: Callable[[int], None] | None = None) -> ImportResult:
    label = "stdin" if source == "-" else source
    if source == "-":
        raw: Any = sys.stdin.buffer
    else:
        try:
            raw = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise ImportRejected(f"cannot open {source}: {exc.strerror}") from None
    try:
        return import_tar_stream(store, raw, options, label, on_progress=on_progress)
    finally:
        if source != "-":
            raw.close()


def import_tar_stream(store: Store, raw: IO[bytes], options: ImportOptions, label: str, *,
                      importer_class: type[TarImporter] = TarImporter,
                      pool: concurrent.futures.Executor | None = None,
                      on_progress: Callable[[int], None] | None = None,
                      finish: Callable[[], None] | None = None) -> ImportResult:
    """Import the tar archive read from *raw* (compressed or not) as one FileSet.

    *finish* runs after the last member, before anything is committed (a .deb importer
    drains its ar member there, so a corrupt trailer still rejects the whole package).
    """
    builder = TreeBuilder(options, source_name=label)
    with tempfile.SpooledTemporaryFile(SPOOL_MEMORY, dir=str(store.scratch_dir()), prefix="spool-") as spool:
        tf, extra = open_tar_stream(raw, label)
        importer = importer_class(builder, label, spool)  # type: ignore[arg-type]

        def prepare(writer: StoreWriter, content: ContentWriter) -> None:
            importer.run(tf, writer, content)
            drain_compressed(extra, label)
            if finish is not None:
                finish()

        try:
            return write_fileset(store, builder, pool=pool, on_progress=on_progress, prepare=prepare)
        finally:
            tf.close()
            for f in extra:
                f.close()

