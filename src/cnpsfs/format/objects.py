"""The canonical object format (see docs/format.md, which is normative).

Every object is a CBOR map encoded with RFC 8949 core deterministic encoding and named
by the BLAKE3-256 digest of those bytes; chunks are named by the digest of their raw
bytes. Maps carry either only small unsigned-integer keys (structure) or only text keys
(free-form metadata), so length-first and bytewise key ordering coincide and every
conforming encoder produces the same bytes. Floats, tags and indefinite lengths never
appear. Optional fields are omitted when they hold their default, never written as
defaults, so one logical value has exactly one encoding.

This module is pure: it turns values into bytes and back and checks invariants, it
does no I/O.
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import blake3
import cbor2

from cnpsfs.errors import FormatError

FORMAT_VERSION = 1
DIGEST_SIZE = 32
DIGEST_PREFIX = "blake3:"
NAME_MAX = 255
#: Longest path in bytes (Linux PATH_MAX less the terminating NUL): layer placements,
#: hard-link paths and symlink targets.
PATH_MAX = 4095
#: A regular file whose extent list is longer than this keeps it in its own object,
#: so a directory object stays small however large its files are.
INLINE_EXTENTS_MAX = 16

TYPE_DIR = "cnpsfs/dir"
TYPE_EXTENTS = "cnpsfs/extents"
TYPE_FILESET = "cnpsfs/fileset"
TYPE_IMAGE = "cnpsfs/image"


class Kind(enum.IntEnum):
    """Entry types. Values are part of the format."""

    FILE = 1
    DIR = 2
    SYMLINK = 3
    CHARDEV = 4
    BLOCKDEV = 5
    FIFO = 6
    SOCKET = 7
    WHITEOUT = 8


#: st_mode type bits for each kind (a whiteout shows as overlayfs does: char 0:0).
KIND_IFMT = {
    Kind.FILE: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.CHARDEV: stat.S_IFCHR,
    Kind.BLOCKDEV: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCKET: stat.S_IFSOCK,
    Kind.WHITEOUT: stat.S_IFCHR,
}
IFMT_KIND = {v: k for k, v in KIND_IFMT.items() if k is not Kind.WHITEOUT}


def digest_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3-256 of *data*; large inputs hash on several threads."""
    if len(data) >= 1 << 20:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    return blake3.blake3(data).digest()


def format_digest(digest: bytes) -> str:
    return DIGEST_PREFIX + digest.hex()


def parse_digest(text: str) -> bytes:
    """Parse a full ``blake3:<64 hex>`` reference; prefixes are resolved by the store."""
    if not text.startswith(DIGEST_PREFIX):
        raise FormatError(f"not a digest reference: {text!r}")
    hexpart = text[len(DIGEST_PREFIX) :]
    if len(hexpart) != 2 * DIGEST_SIZE:
        raise FormatError(f"digest must have {2 * DIGEST_SIZE} hex digits: {text!r}")
    try:
        return bytes.fromhex(hexpart)
    except ValueError:
        raise FormatError(f"digest is not hexadecimal: {text!r}") from None


class Extent(NamedTuple):
    """A byte range of one chunk; ``digest is None`` marks a hole (zeros).

    A named tuple rather than a frozen dataclass: a directory decodes one per chunk
    range of every small file, and on a cold mount that construction is hot.
    """

    digest: bytes | None
    offset: int
    length: int


@dataclass(slots=True)
class Entry:
    """One name in a directory, with everything needed to present it."""

    name: bytes
    kind: Kind
    mode: int = 0o644  # permission bits only (0o7777)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    size: int = 0  # regular files
    extents: tuple[Extent, ...] | None = None  # inline extent list (regular files)
    content: bytes | None = None  # digest of an extents object (long extent lists)
    target: bytes = b""  # symlinks
    rdev: tuple[int, int] = (0, 0)  # devices: (major, minor)
    tree: bytes | None = None  # directories: digest of the directory object
    link: tuple[bytes, int] | None = None  # hard links: (first path in the FileSet, nlink)
    hash: bytes | None = None  # regular files with data: BLAKE3-256 of the whole content

    def same_content(self, other: Entry) -> bool:
        """True when both entries present the same object (name and mtime aside).

        Extents are not compared: the same bytes can be cut differently in two FileSets
        (small files share a per-FileSet stream), so file identity is the content hash.
        """
        return (self.kind is other.kind and self.mode == other.mode and self.uid == other.uid
                and self.gid == other.gid and self.size == other.size and self.hash == other.hash
                and self.target == other.target and self.rdev == other.rdev and self.xattrs == other.xattrs)

    @property
    def st_mode(self) -> int:
        return KIND_IFMT[self.kind] | self.mode


@dataclass(slots=True)
class Directory:
    entries: list[Entry]
    opaque: bool = False


@dataclass(slots=True)
class FileSet:
    name: str
    version: str
    root: Entry  # kind DIR, name b"", tree = root directory digest
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Layer:
    fileset: bytes
    at: str = "/"
    unlinked: bool = False
    override: bool = False
    label: str = ""


@dataclass(slots=True)
class Image:
    name: str
    version: str
    mode: str  # "layers" or "union"
    layers: list[Layer]
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- encoding


def encode_canonical(value: Any) -> bytes:
    """Deterministic CBOR, after checking the value stays inside the format's subset."""
    _check_value(value)
    return cbor2.dumps(value, canonical=True)


def _check_value(value: Any, depth: int = 0) -> None:
    if depth > 64:
        raise FormatError("value nests too deeply")
    if value is None or isinstance(value, (bool, bytes)):
        return
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise FormatError(f"text is not valid UTF-8 (use a byte string): {value!r}") from None
        return
    if isinstance(value, int):
        # Outside major types 0 and 1 cbor2 would emit a bignum tag, which the format forbids.
        if not -(1 << 64) <= value < 1 << 64:
            raise FormatError(f"integer {value} does not fit CBOR's 64-bit major types")
        return
    if isinstance(value, float):
        raise FormatError("floats are not allowed in canonical objects")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_value(item, depth + 1)
        return
    if isinstance(value, dict):
        key_types = {type(k) for k in value}
        if not (key_types <= {int} or key_types <= {str} or key_types <= {bytes}):
            raise FormatError("a map's keys must all be integers, all text or all bytes")
        if key_types == {int} and any(k < 0 for k in value):
            raise FormatError("integer map keys must be unsigned")
        for key, item in value.items():
            if isinstance(key, bool):
                raise FormatError("booleans cannot be map keys")
            _check_value(item, depth + 1)
        return
    raise FormatError(f"type {type(value).__name__} is not allowed in canonical objects")


def check_name(name: bytes) -> None:
    if not name or name in (b".", b".."):
        raise FormatError(f"invalid entry name {name!r}")
    if len(name) > NAME_MAX:
        raise FormatError(f"entry name longer than {NAME_MAX} bytes: {name[:40]!r}...")
    if b"/" in name or b"\0" in name:
        raise FormatError(f"entry name contains '/' or NUL: {name!r}")


def normalize_at(at: str) -> str:
    """The canonical form of a layer's placement (``/opt//app/`` is ``/opt/app``), or FormatError.

    Every component obeys the entry name rules (§1.4: no NUL, 1-255 bytes, not ``.`` or
    ``..``) because the mount shows each one as a directory name, and the whole path
    fits PATH_MAX: a placement no kernel could look up is refused when it is written,
    not found out when a mount cannot show it.
    """
    if not isinstance(at, str) or not at.startswith("/"):
        raise FormatError(f"layer placement {at!r} is not an absolute path")
    try:
        raw = at.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"layer placement {at[:80]!r} is not valid UTF-8") from None
    if len(raw) > PATH_MAX:
        raise FormatError(f"layer placement {at[:40]!r}... is longer than {PATH_MAX} bytes")
    parts = [p for p in raw.split(b"/") if p]
    for part in parts:
        if part in (b".", b".."):
            raise FormatError(f"layer placement {at[:80]!r} contains a {part.decode()!r} component")
        if b"\0" in part:
            raise FormatError(f"layer placement {at[:80]!r} contains a NUL byte")
        if len(part) > NAME_MAX:
            raise FormatError(f"layer placement {at[:40]!r}...: a component is longer than {NAME_MAX} bytes")
    return "/" + "/".join(p.decode("utf-8") for p in parts)


def _encode_extents(extents: Iterable[Extent]) -> list[list[Any]]:
    return [[e.digest, e.offset, e.length] for e in extents]


def entry_to_cbor(entry: Entry) -> dict[int, Any]:
    out: dict[int, Any] = {0: entry.name, 1: int(entry.kind)}
    if entry.kind is not Kind.WHITEOUT:
        out[2] = entry.mode
        if entry.uid:
            out[3] = entry.uid
        if entry.gid:
            out[4] = entry.gid
        if entry.mtime_ns:
            out[5] = entry.mtime_ns
        if entry.xattrs:
            out[6] = dict(entry.xattrs)
    if entry.kind is Kind.FILE:
        if entry.size:
            out[7] = entry.size
        if entry.content is not None:
            out[9] = entry.content
        elif entry.extents:
            out[8] = _encode_extents(entry.extents)
    elif entry.kind is Kind.SYMLINK:
        out[10] = entry.target
    elif entry.kind in (Kind.CHARDEV, Kind.BLOCKDEV):
        out[11] = [entry.rdev[0], entry.rdev[1]]
    elif entry.kind is Kind.DIR:
        out[12] = entry.tree
    if entry.link is not None:
        out[13] = [entry.link[0], entry.link[1]]
    if entry.kind is Kind.FILE and entry.size:
        out[14] = entry.hash
    return out


def encode_directory(directory: Directory) -> bytes:
    entries = sorted(directory.entries, key=lambda e: e.name)
    previous = None
    for entry in entries:
        check_name(entry.name)
        if entry.name == previous:
            raise FormatError(f"duplicate entry name {entry.name!r}")
        previous = entry.name
        check_entry(entry)
    obj: dict[int, Any] = {0: TYPE_DIR, 1: FORMAT_VERSION, 2: [entry_to_cbor(e) for e in entries]}
    if directory.opaque:
        obj[3] = True
    return encode_canonical(obj)


def encode_extents_object(extents: Sequence[Extent]) -> bytes:
    return encode_canonical({0: TYPE_EXTENTS, 1: FORMAT_VERSION, 2: _encode_extents(extents)})


def encode_fileset(fs: FileSet) -> bytes:
    if fs.root.kind is not Kind.DIR or fs.root.tree is None:
        raise FormatError("a FileSet's root must be a directory entry")
    root = entry_to_cbor(fs.root)
    root[0] = b""
    obj: dict[int, Any] = {0: TYPE_FILESET, 1: FORMAT_VERSION, 2: fs.name, 3: fs.version, 4: root}
    if fs.metadata:
        obj[5] = fs.metadata
    return encode_canonical(obj)


def layer_to_cbor(layer: Layer) -> dict[int, Any]:
    out: dict[int, Any] = {0: layer.fileset}
    if layer.at != "/":
        out[1] = layer.at
    if layer.unlinked:
        out[2] = True
    if layer.override:
        out[3] = True
    if layer.label:
        out[4] = layer.label
    return out


def encode_image(image: Image) -> bytes:
    if image.mode not in ("layers", "union"):
        raise FormatError(f"unknown composition mode {image.mode!r}")
    obj: dict[int, Any] = {
        0: TYPE_IMAGE,
        1: FORMAT_VERSION,
        2: image.name,
        3: image.version,
        4: image.mode,
        5: [layer_to_cbor(layer) for layer in image.layers],
    }
    if image.config:
        obj[6] = image.config
    if image.metadata:
        obj[7] = image.metadata
    return encode_canonical(obj)


def check_entry(entry: Entry) -> None:
    if entry.mode & ~0o7777:
        raise FormatError(f"{entry.name!r}: mode has bits outside 0o7777")
    if entry.kind is Kind.FILE:
        if entry.size and (entry.hash is None or len(entry.hash) != DIGEST_SIZE):
            raise FormatError(f"{entry.name!r}: a non-empty file needs its content hash")
        if entry.content is None:
            covered = sum(e.length for e in entry.extents or ())
            if covered != entry.size:
                raise FormatError(f"{entry.name!r}: extents cover {covered} bytes, size is {entry.size}")
            if entry.extents and len(entry.extents) > INLINE_EXTENTS_MAX:
                raise FormatError(f"{entry.name!r}: more than {INLINE_EXTENTS_MAX} inline extents")
    elif entry.kind is Kind.DIR and (entry.tree is None or len(entry.tree) != DIGEST_SIZE):
        raise FormatError(f"{entry.name!r}: directory without a tree digest")


# --------------------------------------------------------------------------- decoding


def decode_object(data: bytes) -> dict[int, Any]:
    try:
        obj = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise FormatError(f"object is not valid CBOR: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(0), str) or obj.get(1) != FORMAT_VERSION:
        raise FormatError("object lacks a known type and format version")
    return obj


def object_type(data: bytes) -> str:
    return decode_object(data)[0]


def _expect(obj: dict[int, Any], type_name: str) -> dict[int, Any]:
    if obj[0] != type_name:
        raise FormatError(f"expected a {type_name} object, found {obj[0]}")
    return obj


_make_extent = Extent._make
_KIND_BY_VALUE = {kind.value: kind for kind in Kind}


def _decode_extents(raw: Any) -> tuple[Extent, ...]:
    try:
        extents = tuple(map(_make_extent, raw))  # _make refuses items that are not 3 long
    except TypeError:
        raise FormatError("malformed extent list") from None
    return extents


def entry_from_cbor(raw: Mapping[int, Any]) -> Entry:
    """An entry from its decoded CBOR map (hot on cold mounts: positional, no enum call)."""
    get = raw.get
    try:
        kind = _KIND_BY_VALUE[raw[1]]
        extents = get(8)
        rdev = get(11)
        link = get(13)
        return Entry(
            raw[0], kind, get(2, 0), get(3, 0), get(4, 0), get(5, 0), get(6) or {}, get(7, 0),
            _decode_extents(extents) if extents is not None else None,
            get(9), get(10, b""),
            (rdev[0], rdev[1]) if rdev else (0, 0),
            get(12),
            (link[0], link[1]) if link else None,
            get(14),
        )
    except (KeyError, ValueError, TypeError, IndexError, FormatError):
        raise FormatError(f"malformed directory entry {get(0)!r}") from None


def decode_directory(data: bytes) -> Directory:
    obj = _expect(decode_object(data), TYPE_DIR)
    return Directory([entry_from_cbor(e) for e in obj[2]], bool(obj.get(3, False)))


def decode_extents_object(data: bytes) -> tuple[Extent, ...]:
    return _decode_extents(_expect(decode_object(data), TYPE_EXTENTS)[2])


def decode_fileset(data: bytes) -> FileSet:
    obj = _expect(decode_object(data), TYPE_FILESET)
    return FileSet(obj[2], obj[3], entry_from_cbor(obj[4]), obj.get(5) or {})


def decode_image(data: bytes) -> Image:
    obj = _expect(decode_object(data), TYPE_IMAGE)
    layers = [
        Layer(raw[0], raw.get(1, "/"), bool(raw.get(2, False)), bool(raw.get(3, False)), raw.get(4, ""))
        for raw in obj[5]
    ]
    return Image(obj[2], obj[3], obj[4], layers, obj.get(6) or {}, obj.get(7) or {})


def referenced_digests(data: bytes) -> list[tuple[bytes, bool]]:
    """The digests an encoded object names, each with ``True`` when it is a chunk.

    Used by gc and verify to walk the DAG without knowing each object's meaning.
    """
    obj = decode_object(data)
    out: list[tuple[bytes, bool]] = []
    kind = obj[0]
    if kind == TYPE_DIR:
        for raw in obj[2]:
            _entry_refs(raw, out)
    elif kind == TYPE_EXTENTS:
        out.extend((d, True) for d, _o, _n in obj[2] if d is not None)
    elif kind == TYPE_FILESET:
        _entry_refs(obj[4], out)
    elif kind == TYPE_IMAGE:
        out.extend((raw[0], False) for raw in obj[5])
    return out


def _entry_refs(raw: Mapping[int, Any], out: list[tuple[bytes, bool]]) -> None:
    if 12 in raw:
        out.append((raw[12], False))
    if 9 in raw:
        out.append((raw[9], False))
    for d, _o, _n in raw.get(8, ()):
        if d is not None:
            out.append((d, True))
