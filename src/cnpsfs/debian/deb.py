"""Import Debian binary packages (.deb) as FileSets, one per package.

A .deb is an ar archive of ``debian-binary`` (format ``2.x``), ``control.tar[.gz|.xz|.zst]``
and ``data.tar[.gz|.xz|.zst|.bz2|.lzma]`` (deb(5)). The FileSet's tree is exactly what
``dpkg-deb -x`` extracts from data.tar; the control archive (control file, md5sums,
conffiles, maintainer scripts, triggers, shlibs, symbols, templates...) goes into the
FileSet's metadata, laid out as docs/debian.md describes. The tag is
``debian.org/<Package>@<Version>_<Architecture>`` (:mod:`cnpsfs.debian.naming`).

Nothing in the metadata depends on when or from where a package was imported (no
time, no path), so importing the same .deb again yields the same digest and stores
nothing new. A package that is damaged in any way -- ar structure, members, control
file, compressed streams, tar members, unsafe paths -- is rejected as a whole with
:class:`ImportRejected` naming the file and the member, before anything is committed.

Members are decompressed according to their name, as dpkg does, rather than sniffed:
a member whose content does not match its name is corrupt, and decompressing it
ourselves means the compressed stream's own integrity check (gzip CRC, xz/zstd
checksums) is read to its end even when the tar inside ends early.
"""

from __future__ import annotations

import bz2
import concurrent.futures
import contextlib
import gzip
import hashlib
import io
import logging
import lzma
import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, cast

import zstandard

from cnpsfs.debian import naming
from cnpsfs.debian.ar import ArError, ArMember, MemberReader, read_member, read_members
from cnpsfs.debian.control import ControlError, ControlValue, parse_control
from cnpsfs.debian.version import VersionError, parse_version
from cnpsfs.errors import ImportRejected, UsageError
from cnpsfs.ingest.content import ContentWriter
from cnpsfs.ingest.tar import _CORRUPT, WHITEOUT_PREFIX, TarImporter, import_tar_stream, open_tar_stream
from cnpsfs.ingest.tree import ImportOptions, ImportResult, split_path
from cnpsfs.store import Store, check_tag_name, check_tag_version

log = logging.getLogger(__name__)

#: Version of the ``metadata["debian"]`` layout (docs/debian.md).
METADATA_LAYOUT = 1
#: Members dpkg accepts, by the compression their name announces.
CONTROL_CODECS = {"": None, ".gz": "gzip", ".xz": "xz", ".zst": "zstd"}
DATA_CODECS = {**CONTROL_CODECS, ".bz2": "bzip2", ".lzma": "lzma"}
#: The control archive is read into memory (it becomes metadata), so it is bounded.
CONTROL_MAX = 64 << 20
DEBIAN_BINARY_MAX = 4096
_BINARY_FORMAT = re.compile(rb"2\.(\d+)\n")
_MAGICS = {b"\x1f\x8b": "gzip", b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2", b"\x28\xb5\x2f\xfd": "zstd"}
_READ = 4 << 20
_XATTR_PAX = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")


@dataclass(slots=True)
class DebPackage:
    """A .deb whose structure and control archive have been read and checked.

    The data tar is not read yet; :func:`import_deb` streams it from ``fd``.
    """

    path: str
    fd: int
    size: int
    members: list[ArMember]
    format: str
    control_member: ArMember
    data_member: ArMember
    fields: list[tuple[str, ControlValue]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    sha256: str = ""

    @property
    def control(self) -> dict[str, ControlValue]:
        return dict(self.fields)

    @property
    def package(self) -> str:
        return str(self.control["Package"])

    @property
    def version(self) -> str:
        return str(self.control["Version"])

    @property
    def architecture(self) -> str:
        return str(self.control["Architecture"])

    @property
    def tag(self) -> tuple[str, str]:
        return naming.tag_name(self.package), naming.tag_version(self.version, self.architecture)

    def metadata(self) -> dict[str, Any]:
        """The FileSet metadata (docs/debian.md); deterministic for a given .deb."""
        return {
            "debian": {
                "layout": METADATA_LAYOUT,
                "format": self.format,
                "members": [m.name for m in self.members],
                "control": self.control,
                "fields": [name for name, _value in self.fields],
                "files": {name: _text_or_bytes(data) for name, data in self.files.items()},
                "modes": dict(self.modes),
                "archive": {"sha256": self.sha256, "size": self.size},
            }
        }


def _text_or_bytes(data: bytes) -> str | bytes:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data


def _reject(deb: str, member: str | None, message: str) -> ImportRejected:
    return ImportRejected(f"{deb}: {member}: {message}" if member else f"{deb}: {message}")


@contextlib.contextmanager
def open_deb(path: str | os.PathLike[str]) -> Iterator[DebPackage]:
    """Open and check a .deb: ar structure, debian-binary, control archive and fields."""
    label = os.fspath(path)
    fd = _open(label)
    try:
        try:
            deb = _read_structure(label, fd)
            _read_control(deb)
            deb.sha256 = _sha256(fd, deb.size, label)
        except OSError as exc:  # I/O errors; corrupt compressed data is reported by member
            raise ImportRejected(f"{label}: cannot read: {exc.strerror or exc}") from None
        yield deb
    finally:
        os.close(fd)


def _open(label: str) -> int:
    """Open a .deb for ``pread``: it must be a regular file (not a pipe or directory)."""
    try:
        fd = os.open(label, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImportRejected(f"cannot open {label}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImportRejected(f"{label}: not a regular file")
    return fd


def _read_structure(label: str, fd: int) -> DebPackage:
    size = os.fstat(fd).st_size
    try:
        members = read_members(fd, size)
    except ArError as exc:
        raise _reject(label, None, f"not a valid .deb: {exc}") from None
    if not members:
        raise _reject(label, None, "not a valid .deb: the ar archive is empty")
    first = members[0]
    if first.name != "debian-binary":
        raise _reject(label, first.name, "the first member must be 'debian-binary' (is this a .deb?)")
    if first.size > DEBIAN_BINARY_MAX:
        raise _reject(label, first.name, f"{first.size} bytes is too large for a format version")
    binary = read_member(fd, first)
    m = _BINARY_FORMAT.match(binary)
    if m is None:
        raise _reject(label, first.name, f"unsupported package format {binary[:20]!r} (only 2.x is)")
    control: ArMember | None = None
    data: ArMember | None = None
    for member in members[1:]:
        name = member.name
        if name.startswith("_"):
            continue  # optional extensions (deb(5)), e.g. _gpgbuilder signatures
        if name == "debian-binary":
            raise _reject(label, name, "duplicate member")
        if name.startswith("control.tar"):
            if name[len("control.tar"):] not in CONTROL_CODECS:
                raise _reject(label, name, "unknown compression for the control archive")
            if control is not None:
                raise _reject(label, name, f"a second control archive (after {control.name!r})")
            if data is not None:
                raise _reject(label, name, "control archive after the data archive")
            control = member
        elif name.startswith("data.tar"):
            if name[len("data.tar"):] not in DATA_CODECS:
                raise _reject(label, name, "unknown compression for the data archive")
            if control is None:
                raise _reject(label, name, "data archive before the control archive")
            if data is not None:
                raise _reject(label, name, f"a second data archive (after {data.name!r})")
            data = member
        elif data is None:
            raise _reject(label, name, "unexpected member before the data archive")
        # Other members after data.tar are ignored, as deb(5) asks of readers.
    if control is None:
        raise _reject(label, None, "missing member control.tar[.gz|.xz|.zst]")
    if data is None:
        raise _reject(label, None, "missing member data.tar[.gz|.xz|.zst|.bz2|.lzma]")
    return DebPackage(label, fd, size, members, f"2.{m.group(1).decode()}", control, data)


@contextlib.contextmanager
def _member_stream(deb: DebPackage, member: ArMember,
                   codecs: dict[str, str | None]) -> Iterator[IO[bytes]]:
    """The decompressed bytes of a member, as a buffered stream that can ``peek``."""
    label = f"{deb.path}: {member.name}"
    ext = member.name[member.name.index(".tar") + len(".tar"):]
    codec = codecs[ext]
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(io.BufferedReader(MemberReader(deb.fd, member), 1 << 20))
        stream: io.BufferedIOBase
        if codec is None:
            stream = raw
        elif codec == "gzip":
            stream = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif codec == "xz":
            stream = stack.enter_context(lzma.LZMAFile(raw, format=lzma.FORMAT_XZ))
        elif codec == "lzma":
            stream = stack.enter_context(lzma.LZMAFile(raw, format=lzma.FORMAT_ALONE))
        elif codec == "bzip2":
            stream = stack.enter_context(bz2.BZ2File(raw))
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            stream = stack.enter_context(io.BufferedReader(reader, 1 << 20))  # type: ignore[arg-type]
        try:
            head = stream.peek(6)[:6]  # type: ignore[attr-defined]
        except _CORRUPT as exc:
            raise ImportRejected(f"{label}: cannot decompress ({exc or type(exc).__name__})") from None
        for magic, name in _MAGICS.items():
            if head.startswith(magic):
                # A tar never starts like this; taking it for one more layer of
                # compression would accept content dpkg rejects.
                raise ImportRejected(f"{label}: content is {name}-compressed, which the member name does not say")
        yield cast(IO[bytes], stream)  # typeshed does not count GzipFile & co as IO[bytes]


def _drain(stream: IO[bytes], label: str) -> None:
    """Read a compressed member to its end, so its checksum and trailer are verified."""
    try:
        while stream.read(_READ):
            pass
    except _CORRUPT as exc:
        raise ImportRejected(f"{label}: corrupt compressed data ({exc or type(exc).__name__})") from None


def _read_control(deb: DebPackage) -> None:
    member = deb.control_member
    label = f"{deb.path}: {member.name}"
    if member.size > CONTROL_MAX:
        raise ImportRejected(f"{label}: control archive of {member.size} bytes is implausibly large")
    total = 0
    with _member_stream(deb, member, CONTROL_CODECS) as stream:
        tf, extra = open_tar_stream(stream, label)
        try:
            while True:
                info = tf.next()
                if info is None:
                    break
                total += _control_member(deb, tf, info, label)
                if total > CONTROL_MAX:
                    raise ImportRejected(f"{label}: control files exceed {CONTROL_MAX >> 20} MiB")
        except ImportRejected:
            raise
        except _CORRUPT as exc:
            raise ImportRejected(f"{label}: corrupt or truncated archive ({exc or type(exc).__name__})") from None
        finally:
            tf.close()
            for f in extra:
                f.close()
        _drain(stream, label)
    if "control" not in deb.files:
        raise ImportRejected(f"{label}: no 'control' file in the control archive")
    try:
        fields = parse_control(deb.files["control"])
    except ControlError as exc:
        raise ImportRejected(f"{label}: control: {exc}") from None
    deb.fields = fields
    _check_identity(deb, f"{label}: control")


def _control_member(deb: DebPackage, tf: tarfile.TarFile, info: tarfile.TarInfo, label: str) -> int:
    """Record one member of control.tar; returns its size."""
    what = f"{label}: member {info.name!r}"
    parts = split_path(info.name.encode("utf-8", "surrogateescape"), what=what)
    if not parts:
        if not info.isdir():
            raise ImportRejected(f"{what}: the top of the control archive must be a directory")
        return 0
    if len(parts) != 1:
        raise ImportRejected(f"{what}: the control archive holds files only at its top level")
    if not info.isreg():
        raise ImportRejected(f"{what}: only regular files are allowed in the control archive")
    try:
        name = parts[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ImportRejected(f"{what}: file name is not UTF-8") from None
    if name in deb.files:
        raise ImportRejected(f"{what}: duplicate member")
    if info.size > CONTROL_MAX:
        raise ImportRejected(f"{what}: {info.size} bytes is implausibly large for a control file")
    reader = tf.extractfile(info)
    assert reader is not None
    data = reader.read(info.size)
    if len(data) != info.size:
        raise ImportRejected(f"{what}: truncated data")
    deb.files[name] = data
    deb.modes[name] = info.mode & 0o7777
    return info.size


def _check_identity(deb: DebPackage, what: str) -> None:
    """Package, Version and Architecture must exist and make a valid tag."""
    control = deb.control
    for name in ("Package", "Version", "Architecture"):
        value = control.get(name)
        if not isinstance(value, str) or not value or "\n" in value:
            raise ImportRejected(f"{what}: missing or invalid {name!r} field")
    if not naming.PACKAGE_RE.fullmatch(deb.package):
        raise ImportRejected(f"{what}: invalid package name {deb.package!r}")
    if not naming.ARCH_RE.fullmatch(deb.architecture):
        raise ImportRejected(f"{what}: invalid architecture {deb.architecture!r}")
    try:
        parse_version(deb.version)
        name, version = deb.tag
        check_tag_name(name)
        check_tag_version(version)
    except (VersionError, UsageError) as exc:
        raise ImportRejected(f"{what}: {exc}") from None


def _sha256(fd: int, size: int, label: str) -> str:
    digest = hashlib.sha256()
    pos = 0
    while pos < size:
        piece = os.pread(fd, min(_READ, size - pos), pos)
        if not piece:
            raise ImportRejected(f"{label}: file shrank while reading")
        digest.update(piece)
        pos += len(piece)
    return digest.hexdigest()


class _DataImporter(TarImporter):
    """TarImporter reading a data.tar the way dpkg does.

    dpkg knows no OCI whiteouts, so a ``.wh.`` name would be a plain file to it; we
    have no way to store such a name, and refuse it rather than turn it into a
    whiteout. Extended attributes in PAX headers are dropped: neither dpkg nor
    ``dpkg-deb -x`` (GNU tar without ``--xattrs``) applies them.
    """

    def add(self, member: tarfile.TarInfo, tf: tarfile.TarFile, content: ContentWriter) -> None:
        parts = self.member_parts(member)
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            raise ImportRejected(f"{self.label}: member {member.name!r}: names starting with '.wh.' are "
                                 "reserved for whiteouts and cannot be imported from a .deb")
        if any(key.startswith(_XATTR_PAX) for key in member.pax_headers):
            log.debug("%s: ignoring extended attributes of %r, as dpkg does", self.label, member.name)
            member.pax_headers = {k: v for k, v in member.pax_headers.items() if not k.startswith(_XATTR_PAX)}
        super().add(member, tf, content)


def import_deb(store: Store, path: str | os.PathLike[str], *, source_date_epoch: int | None = None,
               on_progress: Callable[[int], None] | None = None,
               pool: concurrent.futures.Executor | None = None) -> ImportResult:
    """Import one .deb as ``debian.org/<Package>@<Version>_<Architecture>``.

    *on_progress* is called with byte counts of file data as it is stored (as for the
    other importers); *pool* lets several imports share one thread pool.
    """
    with open_deb(path) as deb:
        name, version = deb.tag
        options = ImportOptions(source_date_epoch=source_date_epoch, name=name, version=version,
                                metadata=deb.metadata())
        label = f"{deb.path}: {deb.data_member.name}"
        with _member_stream(deb, deb.data_member, DATA_CODECS) as stream:
            result = import_tar_stream(store, stream, options, label, importer_class=_DataImporter, pool=pool,
                                       on_progress=on_progress, finish=lambda: _drain(stream, label))
    log.debug("imported %s as %s@%s (%d entries, %d new bytes)", deb.path, name, version, result.entries,
              result.new_bytes)
    return result


def import_debs(store: Store, paths: Iterable[str | os.PathLike[str]], *, source_date_epoch: int | None = None,
                on_progress: Callable[[int], None] | None = None) -> list[ImportResult]:
    """Import several .debs, one FileSet each; results are in input order.

    Every file's ar structure is checked before the first import starts, so a wrong
    path or a file that is not a .deb fails fast. A package found damaged later
    (corrupt control or data) raises :class:`ImportRejected` naming it; the packages
    before it stay imported -- each import commits on its own -- and since imports are
    idempotent, running the command again after fixing the input costs little.
    """
    paths = list(paths)
    for path in paths:
        label = os.fspath(path)
        fd = _open(label)
        try:
            _read_structure(label, fd)
        except OSError as exc:
            raise ImportRejected(f"{label}: cannot read: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="cnpsfs-deb")
    try:
        return [import_deb(store, path, source_date_epoch=source_date_epoch, on_progress=on_progress, pool=pool)
                for path in paths]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
