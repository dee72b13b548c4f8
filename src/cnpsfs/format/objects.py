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
import io
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import itemgetter, lt
from typing import TYPE_CHECKING, Any, NamedTuple

import blake3
import cbor2

from cnpsfs.errors import FormatError
from cnpsfs.format.chunker import CDC_MAX

if TYPE_CHECKING:
    import struct

FORMAT_VERSION = 1
DIGEST_SIZE = 32
DIGEST_PREFIX = "blake3:"
NAME_MAX = 255
#: Longest path in bytes (Linux PATH_MAX less the terminating NUL): layer placements,
#: hard-link paths and symlink targets.
PATH_MAX = 4095
#: Linux's limits on one extended attribute (XATTR_NAME_MAX, XATTR_SIZE_MAX).
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
#: Limits (docs/format.md §1.11): an encoder never writes an object past one of them and
#: a reader refuses one, naming the limit. Decoding costs up to ~70 bytes of memory per
#: byte of a hostile object (empty containers), so the object size bounds a reader's memory.
MAX_OBJECT_SIZE = 32 << 20
MAX_DIR_ENTRIES = 1 << 18
MAX_EXTENTS = 1 << 19
MAX_LAYERS = 4096
#: How deep images may nest images (an image layer naming an image that names an image
#: ...). The flattened composition is bounded by MAX_LAYERS FileSet layers as well.
MAX_NESTING = 16
#: How deep maps and arrays may nest in an object (metadata and config included).
MAX_DEPTH = 64
#: No chunk is longer than the chunker's maximum (§1.9, CDC_MAX), so no data extent
#: reaches past it: a reader refuses one that does before it reads anything.
CHUNK_MAX = CDC_MAX
_U32 = 1 << 32  # uid, gid, device numbers, nlink
_I64 = 1 << 63  # sizes, lengths, mtimes (off_t, time in ns)
#: A regular file whose extent list is longer than this keeps it in its own object,
#: so a directory object stays small however large its files are.
INLINE_EXTENTS_MAX = 16

TYPE_DIR = "cnpsfs/dir"
TYPE_EXTENTS = "cnpsfs/extents"
TYPE_FILESET = "cnpsfs/fileset"
TYPE_IMAGE = "cnpsfs/image"
#: Detached objects: they name a subject (an image or FileSet) but are not part of its
#: digest, like OSTree's commitmeta. Their fields are defined, encoded and checked by
#: cnpsfs.trust (docs/trust.md); here only what gc and verify need to walk them.
TYPE_SIGNATURE = "cnpsfs/signature"
TYPE_PROVENANCE = "cnpsfs/provenance"
#: Also detached: a prefetch profile (§1.13, format/profile.py), about an image.
TYPE_PROFILE = "cnpsfs/profile"


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


def show_path(parts: Sequence[bytes], *, relative: bool = False) -> str:
    """A path of entry names for messages: ``/usr/bin`` (``usr/bin`` when *relative*; the
    empty path is ``/`` or ``.``). Names are bytes; what is not UTF-8 shows escaped."""
    text = "/".join(p.decode("utf-8", "backslashreplace") for p in parts)
    return (text or ".") if relative else "/" + text


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
    """One entry of an image's layer list: a FileSet, or another image whose layers are
    placed here (``image``; then ``fileset`` is None). Exactly one of the two is set."""

    fileset: bytes | None
    at: str = "/"
    unlinked: bool = False
    override: bool = False
    label: str = ""
    image: bytes | None = None

    @property
    def digest(self) -> bytes:
        """What the layer names: its FileSet, or its nested image."""
        named = self.image if self.image is not None else self.fileset
        if named is None:
            raise FormatError("a layer names neither a FileSet nor an image")
        return named


class CompositionMode(enum.StrEnum):
    """How an image composes its layers (docs/manifest.md): stacked, later layers winning
    ("layers", as overlayfs does), or merged, with different content at one path an error
    unless one layer is an override ("union", for packages)."""

    LAYERS = "layers"
    UNION = "union"

    @classmethod
    def parse(cls, value: str) -> CompositionMode:
        try:
            return cls(value)
        except ValueError:
            raise FormatError(f"unknown composition mode {value!r}") from None


@dataclass(slots=True)
class Image:
    name: str
    version: str
    mode: CompositionMode  # a plain "layers" or "union" is converted
    layers: list[Layer]
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Nested images this one names that are not in a store (yet): images read from
    #: manifest files, by digest, at any depth. Not part of the encoding; storing the
    #: image stores them first (cnpsfs.image.manifest.store_image).
    unstored: dict[bytes, Image] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.mode = CompositionMode.parse(self.mode)


# --------------------------------------------------------------------------- encoding


def encode_canonical(value: Any) -> bytes:
    """Deterministic CBOR, after checking the value stays inside the format's subset."""
    _check_value(value)
    data = cbor2.dumps(value, canonical=True)
    if len(data) > MAX_OBJECT_SIZE:
        raise FormatError(f"object of {len(data)} bytes exceeds the limit of {MAX_OBJECT_SIZE} bytes per object")
    return data


def _check_value(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise FormatError(f"value nests deeper than the limit of {MAX_DEPTH} levels")
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
    out = []
    for e in extents:
        if e.length <= 0 or e.length >= _I64:
            raise FormatError(f"extent length {e.length} out of range")
        if e.digest is None:
            if e.offset != 0:
                raise FormatError("a hole extent has offset 0")
        elif len(e.digest) != DIGEST_SIZE or not 0 <= e.offset < CHUNK_MAX or e.offset + e.length > CHUNK_MAX:
            raise FormatError(f"extent [{e.offset}, +{e.length}) does not lie inside one chunk")
        out.append([e.digest, e.offset, e.length])
    return out


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
    if len(directory.entries) > MAX_DIR_ENTRIES:
        raise FormatError(f"directory of {len(directory.entries)} entries exceeds the limit of {MAX_DIR_ENTRIES} "
                          "entries per directory object")
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
    if len(extents) > MAX_EXTENTS:
        raise FormatError(f"{len(extents)} extents exceed the limit of {MAX_EXTENTS} (a file of about "
                          f"{MAX_EXTENTS * 65536 >> 30} GiB at the average chunk size)")
    return encode_canonical({0: TYPE_EXTENTS, 1: FORMAT_VERSION, 2: _encode_extents(extents)})


def encode_fileset(fs: FileSet) -> bytes:
    if fs.root.kind is not Kind.DIR or fs.root.tree is None:
        raise FormatError("a FileSet's root must be a directory entry")
    check_entry(fs.root)  # the root's owner, mtime and xattrs obey the entry rules like any other
    root = entry_to_cbor(fs.root)
    root[0] = b""
    obj: dict[int, Any] = {0: TYPE_FILESET, 1: FORMAT_VERSION, 2: fs.name, 3: fs.version, 4: root}
    if fs.metadata:
        obj[5] = fs.metadata
    return encode_canonical(obj)


def layer_to_cbor(layer: Layer) -> dict[int, Any]:
    out: dict[int, Any] = {0: layer.fileset} if layer.image is None else {5: layer.image}
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
    if len(image.layers) > MAX_LAYERS:
        raise FormatError(f"image of {len(image.layers)} layers exceeds the limit of {MAX_LAYERS} layers per image")
    for layer in image.layers:
        if normalize_at(layer.at) != layer.at:
            raise FormatError(f"layer placement {layer.at[:80]!r} is not normalised")
        if (layer.fileset is None) == (layer.image is None):
            raise FormatError("a layer names exactly one of a FileSet and an image")
        if len(layer.digest) != DIGEST_SIZE:
            raise FormatError("a layer's FileSet or image is not a digest")
    obj: dict[int, Any] = {
        0: TYPE_IMAGE,
        1: FORMAT_VERSION,
        2: image.name,
        3: image.version,
        4: CompositionMode.parse(image.mode).value,  # a plain str for the encoder
        5: [layer_to_cbor(layer) for layer in image.layers],
    }
    if image.config:
        obj[6] = image.config
    if image.metadata:
        obj[7] = image.metadata
    return encode_canonical(obj)


def check_entry(entry: Entry) -> None:
    """What a decoder checks too (§1.4), so an encoder never writes what a reader refuses."""
    if entry.mode & ~0o7777 or entry.mode < 0:
        raise FormatError(f"{entry.name!r}: mode has bits outside 0o7777")
    if not (0 <= entry.uid < _U32 and 0 <= entry.gid < _U32):
        raise FormatError(f"{entry.name!r}: uid and gid must be unsigned 32-bit integers")
    if not -_I64 <= entry.mtime_ns < _I64:
        raise FormatError(f"{entry.name!r}: mtime_ns does not fit 64 bits")
    if entry.xattrs and entry.kind is not Kind.WHITEOUT:
        _check_xattrs(entry.xattrs)
    if entry.link is not None and not (0 < len(entry.link[0]) <= PATH_MAX and 2 <= entry.link[1] < _U32):
        raise FormatError(f"{entry.name!r}: a hard link needs a path and at least 2 names")
    if entry.kind is Kind.SYMLINK and not (0 < len(entry.target) <= PATH_MAX and b"\0" not in entry.target):
        raise FormatError(f"{entry.name!r}: symlink target is not 1 to {PATH_MAX} bytes without NUL")
    if entry.kind in (Kind.CHARDEV, Kind.BLOCKDEV) and not all(0 <= n < _U32 for n in entry.rdev):
        raise FormatError(f"{entry.name!r}: device numbers must be unsigned 32-bit integers")
    if entry.kind is Kind.FILE:
        if not 0 <= entry.size < _I64:
            raise FormatError(f"{entry.name!r}: size does not fit 63 bits")
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
#
# Objects may come from a remote store, so decoding trusts nothing but the digest: the
# CBOR must stay inside the subset (no tags, no indefinite lengths, no duplicate keys,
# nothing after the item), every field must have its type and range, and the limits
# hold. Anything else is a FormatError naming what is wrong, never another exception or
# a value that breaks a caller later. The checks are type() tests and comparisons: a cold
# lookup decodes a directory per name, and this is on that path.

#: Tags cbor2 decodes itself (dates, bignums, shared and string references, ...): each is
#: refused, so a shared reference cannot build a cyclic or exponentially large value.
_CBOR2_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 43000, 55799)


class _TagRefused(Exception):
    pass


def _refuse_tag(*_args: Any) -> Any:
    raise _TagRefused


_NO_TAGS = {tag: _refuse_tag for tag in _CBOR2_TAGS}
#: Nesting a decoder accepts (cbor2 counts the top level as 1; the encoder allows 0..MAX_DEPTH).
_DECODE_DEPTH = MAX_DEPTH + 1
_KIND_BY_VALUE = {kind.value: kind for kind in Kind}


def decode_object(data: bytes) -> dict[int, Any]:
    """The top-level map of an encoded object, with its type name and version checked."""
    obj = decode_cbor(data)
    if (type(obj) is not dict or type(obj.get(0)) is not str or obj[0] not in _TYPE_NAMES
            or type(obj.get(1)) is not int or obj[1] != FORMAT_VERSION):
        raise FormatError("object lacks a known type and format version")
    return obj


def decode_cbor(data: bytes) -> Any:
    """One CBOR item, strictly: the subset of §1.2 (no tags, no indefinite lengths, no
    duplicate keys, nothing after it) and the size and depth limits of objects. For
    objects and for other canonical maps (a signature's payload, docs/trust.md)."""
    if len(data) > MAX_OBJECT_SIZE:
        raise FormatError(f"object of {len(data)} bytes exceeds the limit of {MAX_OBJECT_SIZE} bytes per object")
    stream = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(stream, semantic_decoders=_NO_TAGS, tag_hook=_refuse_tag, allow_indefinite=False,
                                allow_duplicate_keys=False, max_depth=_DECODE_DEPTH).decode()
    except Exception as exc:  # cbor2 raises several types for malformed input
        if isinstance(exc.__cause__, _TagRefused) or isinstance(exc, _TagRefused):
            raise FormatError("object is not valid: CBOR tags are not allowed") from None
        if "nesting depth" in str(exc):
            raise FormatError(f"object nests deeper than the limit of {MAX_DEPTH} levels") from None
        raise FormatError(f"object is not valid CBOR: {exc}") from None
    if stream.tell() != len(data):
        raise FormatError(f"object is not valid: {len(data) - stream.tell()} bytes after its CBOR item")
    return obj


_TYPE_NAMES = frozenset((TYPE_DIR, TYPE_EXTENTS, TYPE_FILESET, TYPE_IMAGE, TYPE_SIGNATURE, TYPE_PROVENANCE,
                         TYPE_PROFILE))


def object_type(data: bytes) -> str:
    return decode_object(data)[0]


def _expect(obj: dict[int, Any], type_name: str) -> dict[int, Any]:
    if obj[0] != type_name:
        raise FormatError(f"expected a {type_name} object, found {obj[0]}")
    return obj


def _field(obj: dict[int, Any], key: int, kind: type, what: str) -> Any:
    value = obj.get(key)
    if type(value) is not kind:
        raise FormatError(f"{what} (key {key}) is missing or not a {kind.__name__}")
    return value


def _digest(value: Any, what: str) -> bytes:
    if type(value) is not bytes or len(value) != DIGEST_SIZE:
        raise FormatError(f"{what} is not a {DIGEST_SIZE}-byte digest")
    return value


def _decode_extents(raw: Any, limit: int) -> tuple[Extent, ...]:
    if type(raw) is not list:
        raise FormatError("extent list is not an array")
    if len(raw) > limit:
        raise FormatError(f"{len(raw)} extents exceed the limit of {limit}")
    out = []
    for item in raw:
        if type(item) is not list or len(item) != 3:
            raise FormatError("malformed extent list: an extent is not [digest, offset, length]")
        digest, offset, length = item
        if type(offset) is not int or type(length) is not int or length <= 0 or length >= _I64:
            raise FormatError("malformed extent list: offset or length out of range")
        if digest is None:
            if offset != 0:
                raise FormatError("malformed extent list: a hole with an offset")
        elif type(digest) is not bytes or len(digest) != DIGEST_SIZE or not 0 <= offset < CHUNK_MAX:
            raise FormatError("malformed extent list: bad chunk digest or offset")
        elif offset + length > CHUNK_MAX:
            raise FormatError("malformed extent list: an extent runs past the largest possible chunk")
        out.append(Extent(digest, offset, length))
    return tuple(out)


_new_tuple = tuple.__new__
#: The kinds the shapes build, as plain globals: ``Kind.FILE`` is an enum class attribute
#: lookup (~70 ns on 3.11), paid per entry on the decoding path.
_FILE, _DIR, _SYMLINK = Kind.FILE, Kind.DIR, Kind.SYMLINK
_DOTS = frozenset((b".", b".."))
#: Keys, in canonical order, of the entry shapes entry_from_cbor recognises whole.
_SHAPE_FILE = (0, 1, 2, 5, 7, 8, 14)
_SHAPE_DIR = (0, 1, 2, 5, 12)
_SHAPE_SYMLINK = (0, 1, 2, 5, 10)


def _fast_extents(raw: list[Any], size: int) -> tuple[Extent, ...] | None:
    """An inline extent list that passes every check of :func:`_decode_extents` and covers
    *size*, or None to let the field-by-field path decide (and name what is wrong)."""
    out = []
    total = 0
    for item in raw:
        if type(item) is not list or len(item) != 3:
            return None
        digest, offset, length = item
        if type(offset) is not int or type(length) is not int or not 0 < length < _I64:
            return None
        if digest is None:
            if offset != 0:
                return None
        elif type(digest) is not bytes or len(digest) != DIGEST_SIZE or offset < 0 or offset + length > CHUNK_MAX:
            return None
        total += length
        out.append(_new_tuple(Extent, item))  # Extent(*item) without the Python-level __new__
    return tuple(out) if total == size else None


def plain_file_fields(raw: Any) -> tuple[bytes, int, int, int, bytes, int, int, bytes] | None:
    """(name, mode, mtime_ns, size, chunk digest, offset, length, content hash) of an entry
    that is a file of one chunk range (owner root, no xattrs, no hard link: most entries
    of a tree), every check of :func:`entry_from_cbor` passed; None for anything else, which
    :func:`entry_from_cbor` then decides (and names what is wrong).

    For decoders that pack such entries without making an :class:`Entry` (a cold mount's
    directories); :func:`entry_from_cbor` builds its own from it, so both accept the same.
    """
    if type(raw) is not dict or tuple(raw) != _SHAPE_FILE:
        return None
    name, kind_value, mode, mtime, size, extents, content_hash = raw.values()
    if not (type(kind_value) is int and kind_value == 1 and type(size) is int and 0 < size < _I64
            and type(content_hash) is bytes and len(content_hash) == DIGEST_SIZE
            and type(extents) is list and len(extents) == 1):
        return None
    item = extents[0]
    if type(item) is not list or len(item) != 3:
        return None
    digest, offset, length = item
    if (type(digest) is bytes and len(digest) == DIGEST_SIZE and type(offset) is int and type(length) is int
            and length == size and offset >= 0 and offset + length <= CHUNK_MAX
            and type(name) is bytes and 0 < len(name) <= NAME_MAX and b"/" not in name and b"\0" not in name
            and name not in _DOTS and type(mode) is int and 0 <= mode <= 0o7777
            and type(mtime) is int and -_I64 <= mtime < _I64):
        return name, mode, mtime, size, digest, offset, length, content_hash
    return None


#: The values of a file of one chunk range, in the order of _SHAPE_FILE: a map of seven
#: keys from which this takes all seven has exactly these keys.
_PLAIN_VALUES = itemgetter(*_SHAPE_FILE)


#: The version of the rules a directory object is checked by (§1.4, as decode_directory
#: checks them). A store remembers which directory objects passed them (docs/format.md
#: §2.2, ``checked``), under this number: marks made under other rules are not trusted.
DIRECTORY_RULES = 1


def pack_directory(entries: list[Any], record: struct.Struct, flags: int, *, checked: bool = False
                   ) -> tuple[list[bytes], bytearray, list[tuple[int, Entry]]]:
    """A directory object's entries (:func:`directory_items`) checked as
    :func:`decode_directory` checks them, the files of one chunk range (owner root, no
    xattrs, no hard link: most entries of a tree) packed without an :class:`Entry`.

    Returns every name in object order; a buffer of ``len(entries)`` records of *record*,
    where the entry at position *i* that is such a file has ``(flags, mode, 0, 0, mtime_ns,
    size, chunk offset, chunk length, chunk digest, content hash)`` at ``i * record.size``
    (zeros elsewhere); and every other entry decoded (:func:`entry_from_cbor`) with its
    position. A FormatError names the first entry that is wrong, as decode_directory's does.

    Why not :func:`plain_file_fields` per entry: on a cold walk of a million files the
    call, its tuple and its unpacking cost as much as the checks. Here the checks are
    inline, the record packed at once, and the four checks of a name that C can make over
    the whole directory (a byte string of 1 to 255 bytes, no ``/`` or NUL, not ``.`` or
    ``..``) are made once on all names (:func:`check_names`). A map that is not exactly
    such a file, or that fails any check, goes to entry_from_cbor, which decides and
    names what is wrong; so both accept exactly the same entries.

    *checked*: these entries are known to pass every check (their object passed
    decode_directory before, under :data:`DIRECTORY_RULES`: validity is a function of
    the bytes, and the bytes are the digest's). Then the files are packed without the
    checks, which are most of the work; the result is the same for any valid object. Should
    the knowledge be wrong (a damaged index), anything that goes wrong on the way sends the
    entries through the checked path, which refuses them as it would have.
    """
    if checked:
        try:
            return _pack_valid_directory(entries, record, flags)
        except Exception:  # only a damaged index gets here: check everything
            pass
    size = record.size
    recs = bytearray(size * len(entries))
    pack, values = record.pack_into, _PLAIN_VALUES
    names: list[bytes] = []
    others: list[tuple[int, Entry]] = []
    at = 0
    for raw in entries:
        if type(raw) is dict and len(raw) == 7:
            try:
                name, kind, mode, mtime, fsize, extents, content_hash = values(raw)
            except KeyError:  # seven keys, but not these
                pass
            else:
                if type(extents) is list and len(extents) == 1:
                    extent = extents[0]
                    if type(extent) is list and len(extent) == 3:
                        digest, offset, length = extent
                        if (type(name) is bytes and type(kind) is int and kind == 1 and type(mode) is int
                                and 0 <= mode <= 0o7777 and type(mtime) is int and -_I64 <= mtime < _I64
                                and type(fsize) is int and 0 < fsize < _I64 and type(length) is int
                                and length == fsize and type(offset) is int and offset >= 0
                                and offset + length <= CHUNK_MAX and type(digest) is bytes
                                and len(digest) == DIGEST_SIZE and type(content_hash) is bytes
                                and len(content_hash) == DIGEST_SIZE):
                            pack(recs, at, flags, mode, 0, 0, mtime, fsize, offset, length, digest, content_hash)
                            names.append(name)
                            at += size
                            continue
        entry = entry_from_cbor(raw)
        others.append((len(names), entry))
        names.append(entry.name)
        at += size
    check_names(names)
    check_sorted_names(names)
    return names, recs, others


def _pack_valid_directory(entries: list[Any], record: struct.Struct, flags: int
                          ) -> tuple[list[bytes], bytearray, list[tuple[int, Entry]]]:
    """:func:`pack_directory` for entries known to be valid: a valid map with the seven
    keys of the common shape, kind 1 and one extent that is not a hole is exactly what
    the checked loop packs, so only that is tested here."""
    size = record.size
    recs = bytearray(size * len(entries))
    pack, values = record.pack_into, _PLAIN_VALUES
    names: list[bytes] = []
    others: list[tuple[int, Entry]] = []
    at = 0
    for raw in entries:
        if len(raw) == 7:
            try:
                name, kind, mode, mtime, fsize, extents, content_hash = values(raw)
            except KeyError:  # seven keys, but not these
                pass
            else:
                if kind == 1 and len(extents) == 1:
                    digest, offset, length = extents[0]
                    if digest is not None:
                        pack(recs, at, flags, mode, 0, 0, mtime, fsize, offset, length, digest, content_hash)
                        names.append(name)
                        at += size
                        continue
        entry = entry_from_cbor(raw)
        others.append((len(names), entry))
        names.append(entry.name)
        at += size
    return names, recs, others


def check_names(names: list[bytes]) -> None:
    """Byte strings that are each a valid entry name (:func:`check_name`), checked over the
    whole list in C; the first wrong one is named."""
    try:
        joined = b"".join(names)
    except TypeError:
        raise FormatError("an entry name is not a byte string") from None
    if names and (b"/" in joined or b"\0" in joined or b"" in names or max(map(len, names)) > NAME_MAX
                  or not _DOTS.isdisjoint(names)):
        for name in names:
            check_name(name)
        raise FormatError("invalid entry name")  # not reached: check_name names it


def entry_from_cbor(raw: Any, *, root: bool = False) -> Entry:
    """An entry from its decoded CBOR map, every field checked.

    Hot on cold mounts: the common shapes (a directory; a symlink; a file without xattrs
    or hard links, empty or with inline extents) are checked and built in one go, and anything else
    goes through :func:`_entry_fields`, which checks field by field and names what is
    wrong. Both accept exactly the same entries.
    """
    if type(raw) is not dict:
        raise FormatError("malformed directory entry: not a map")
    if not root:
        plain = plain_file_fields(raw)
        if plain is not None:  # most entries
            return Entry(plain[0], _FILE, plain[1], 0, 0, plain[2], {}, plain[3], (_new_tuple(Extent, plain[4:7]),),
                         None, b"", (0, 0), None, None, plain[7])
        # The three shapes nearly every entry has (a file with one or more inline
        # extents, a directory, a symlink; owner root, no xattrs, no hard link) are known
        # by their keys alone: the values then unpack in order, without a lookup each.
        keys = tuple(raw)
        shaped: Entry | None = None
        if keys == _SHAPE_FILE:
            name, kind_value, mode, mtime, size, extents, content_hash = raw.values()
            if (type(kind_value) is int and kind_value == 1 and type(size) is int and 0 < size < _I64
                    and type(content_hash) is bytes and len(content_hash) == DIGEST_SIZE and type(extents) is list):
                decoded: tuple[Extent, ...] | None = None
                if 0 < len(extents) <= INLINE_EXTENTS_MAX:  # one chunk range: plain_file_fields said no
                    decoded = _fast_extents(extents, size)
                if decoded is not None:
                    shaped = Entry(name, _FILE, mode, 0, 0, mtime, {}, size, decoded, None, b"", (0, 0), None,
                                   None, content_hash)
        elif keys == _SHAPE_DIR:
            name, kind_value, mode, mtime, tree = raw.values()
            if type(kind_value) is int and kind_value == 2 and type(tree) is bytes and len(tree) == DIGEST_SIZE:
                shaped = Entry(name, _DIR, mode, 0, 0, mtime, {}, 0, None, None, b"", (0, 0), tree)
        elif keys == _SHAPE_SYMLINK:
            name, kind_value, mode, mtime, target = raw.values()
            if (type(kind_value) is int and kind_value == 3 and type(target) is bytes
                    and 0 < len(target) <= PATH_MAX and b"\0" not in target):
                shaped = Entry(name, _SYMLINK, mode, 0, 0, mtime, {}, 0, None, None, target)
        if (shaped is not None and type(name) is bytes and 0 < len(name) <= NAME_MAX and b"/" not in name
                and b"\0" not in name and name not in _DOTS and type(mode) is int
                and 0 <= mode <= 0o7777 and type(mtime) is int and -_I64 <= mtime < _I64):
            return shaped
    get = raw.get
    name, kind_value = get(0), get(1)
    if type(name) is not bytes:
        raise FormatError("malformed directory entry: its name is not a byte string")
    kind = _KIND_BY_VALUE.get(kind_value) if type(kind_value) is int else None
    if kind is None:
        raise FormatError(f"malformed directory entry {name[:64]!r}: unknown or missing kind")
    if not root and (not 0 < len(name) <= NAME_MAX or b"/" in name or b"\0" in name or name == b"." or name == b".."):
        check_name(name)
    mode, uid, gid, mtime = get(2, 0), get(3, 0), get(4, 0), get(5, 0)
    if (type(mode) is int and type(uid) is int and type(gid) is int and type(mtime) is int and 0 <= mode <= 0o7777
            and 0 <= uid < _U32 and 0 <= gid < _U32 and -_I64 <= mtime < _I64 and get(6) is None):
        if kind is Kind.FILE:
            if get(9) is None and get(13) is None:
                size, extents, content_hash = get(7, 0), get(8), get(14)
                if (type(extents) is list and 0 < len(extents) <= INLINE_EXTENTS_MAX and type(size) is int
                        and 0 < size < _I64 and type(content_hash) is bytes and len(content_hash) == DIGEST_SIZE):
                    decoded = _fast_extents(extents, size)
                    if decoded is not None:
                        return Entry(name, kind, mode, uid, gid, mtime, {}, size, decoded, None, b"", (0, 0), None,
                                     None, content_hash)
                elif extents is None and content_hash is None and size == 0:
                    return Entry(name, kind, mode, uid, gid, mtime, {})
        elif kind is Kind.DIR:
            tree = get(12)
            if type(tree) is bytes and len(tree) == DIGEST_SIZE:
                return Entry(name, kind, mode, uid, gid, mtime, {}, 0, None, None, b"", (0, 0), tree)
        elif kind is Kind.SYMLINK and get(13) is None:
            target = get(10)
            if type(target) is bytes and 0 < len(target) <= PATH_MAX and b"\0" not in target:
                return Entry(name, kind, mode, uid, gid, mtime, {}, 0, None, None, target)
    try:
        return _entry_fields(raw, name, kind)
    except FormatError as exc:
        raise FormatError(f"malformed directory entry {name[:64]!r}: {exc}") from None


def _entry_fields(raw: dict[int, Any], name: bytes, kind: Kind) -> Entry:
    get = raw.get
    if kind is Kind.WHITEOUT:
        return Entry(name, kind, 0)
    mode, uid, gid, mtime = get(2, 0), get(3, 0), get(4, 0), get(5, 0)
    if type(mode) is not int or not 0 <= mode <= 0o7777:
        raise FormatError("mode is not a permission value (0 to 0o7777)")
    if type(uid) is not int or type(gid) is not int or not 0 <= uid < _U32 or not 0 <= gid < _U32:
        raise FormatError("uid or gid is not an unsigned 32-bit integer")
    if type(mtime) is not int or not -_I64 <= mtime < _I64:
        raise FormatError("mtime_ns is not a signed 64-bit integer")
    xattrs = get(6)
    if xattrs is None:
        xattrs = {}
    else:
        _check_xattrs(xattrs)
    entry = Entry(name, kind, mode, uid, gid, mtime, xattrs)
    if kind is Kind.FILE:
        size = get(7, 0)
        if type(size) is not int or not 0 <= size < _I64:
            raise FormatError("size is not a signed 64-bit length")
        entry.size = size
        extents, content = get(8), get(9)
        if content is not None:
            if extents is not None:
                raise FormatError("both inline extents and an extents object")
            entry.content = _digest(content, "extents object")
        elif extents is not None:
            entry.extents = _decode_extents(extents, INLINE_EXTENTS_MAX)
            if sum(e.length for e in entry.extents) != size:
                raise FormatError(f"extents do not cover its {size} bytes")
        elif size:
            raise FormatError(f"{size} bytes but no extents")
        if size:
            entry.hash = _digest(get(14), "content hash")
    elif kind is Kind.DIR:
        entry.tree = _digest(get(12), "tree")
        return entry
    elif kind is Kind.SYMLINK:
        target = get(10)
        if type(target) is not bytes or not 0 < len(target) <= PATH_MAX or b"\0" in target:
            raise FormatError(f"symlink target is not 1 to {PATH_MAX} bytes without NUL")
        entry.target = target
    elif kind is Kind.CHARDEV or kind is Kind.BLOCKDEV:
        rdev = get(11)
        if (type(rdev) is not list or len(rdev) != 2 or type(rdev[0]) is not int or type(rdev[1]) is not int
                or not 0 <= rdev[0] < _U32 or not 0 <= rdev[1] < _U32):
            raise FormatError("rdev is not [major, minor] of unsigned 32-bit integers")
        entry.rdev = (rdev[0], rdev[1])
    link = get(13)
    if link is not None:
        if (type(link) is not list or len(link) != 2 or type(link[0]) is not bytes or type(link[1]) is not int
                or not 0 < len(link[0]) <= PATH_MAX or b"\0" in link[0] or not 2 <= link[1] < _U32):
            raise FormatError("link is not [path, nlink >= 2]")
        entry.link = (link[0], link[1])
    return entry


def _check_xattrs(xattrs: Any) -> None:
    if type(xattrs) is not dict:
        raise FormatError("xattrs is not a map")
    for key, value in xattrs.items():
        if (type(key) is not bytes or type(value) is not bytes or not 0 < len(key) <= XATTR_NAME_MAX
                or b"\0" in key or len(value) > XATTR_SIZE_MAX):
            raise FormatError(f"xattr {str(key)[:64]} is not a name of 1 to {XATTR_NAME_MAX} bytes with a value "
                              f"of at most {XATTR_SIZE_MAX} bytes")


def _metadata(obj: dict[int, Any], key: int, what: str) -> dict[str, Any]:
    """A text-keyed map inside the CBOR subset (no floats, undefined or simple values)."""
    value = obj.get(key)
    if value is None:
        return {}
    if type(value) is not dict or not all(type(k) is str for k in value):
        raise FormatError(f"{what} (key {key}) is not a map with text keys")
    _check_value(value, 1)
    return value


def directory_items(data: bytes) -> tuple[list[Any], bool]:
    """A directory object's entry maps, undecoded, and its opaque flag: the object's own
    checks done. Each entry must still pass :func:`entry_from_cbor` (or
    :func:`plain_file_fields`), and the names :func:`check_sorted_names`."""
    obj = _expect(decode_object(data), TYPE_DIR)
    entries = _field(obj, 2, list, "directory entries")
    if len(entries) > MAX_DIR_ENTRIES:
        raise FormatError(f"directory of {len(entries)} entries exceeds the limit of {MAX_DIR_ENTRIES} "
                          "entries per directory object")
    opaque = obj.get(3, False)
    if type(opaque) is not bool:
        raise FormatError("directory opaque flag (key 3) is not a boolean")
    return entries, opaque


def check_sorted_names(names: list[bytes]) -> None:
    """A directory's names, in object order, must be strictly increasing."""
    # Pair by pair in C: sorted and without duplicates, as ``names == sorted(set(names))``
    # says, without building the set and the sorted copy.
    if not all(map(lt, names, islice(names, 1, None))):
        raise FormatError("directory entries are not sorted by name, or a name appears twice")


def decode_directory(data: bytes) -> Directory:
    entries, opaque = directory_items(data)
    decoded = list(map(entry_from_cbor, entries))
    check_sorted_names([e.name for e in decoded])
    return Directory(decoded, opaque)


def decode_extents_object(data: bytes) -> tuple[Extent, ...]:
    return _decode_extents(_expect(decode_object(data), TYPE_EXTENTS).get(2), MAX_EXTENTS)


def decode_fileset(data: bytes) -> FileSet:
    obj = _expect(decode_object(data), TYPE_FILESET)
    name = _field(obj, 2, str, "FileSet name")
    version = _field(obj, 3, str, "FileSet version")
    root = entry_from_cbor(obj.get(4), root=True)
    if root.kind is not Kind.DIR or root.name != b"":
        raise FormatError("a FileSet's root (key 4) must be a directory entry named ''")
    return FileSet(name, version, root, _metadata(obj, 5, "FileSet metadata"))


def decode_image(data: bytes) -> Image:
    obj = _expect(decode_object(data), TYPE_IMAGE)
    name = _field(obj, 2, str, "image name")
    version = _field(obj, 3, str, "image version")
    mode = obj.get(4)
    if type(mode) is not str or mode not in tuple(CompositionMode):
        raise FormatError(f"unknown composition mode {str(mode)[:40]}")
    raw_layers = _field(obj, 5, list, "image layers")
    if len(raw_layers) > MAX_LAYERS:
        raise FormatError(f"image of {len(raw_layers)} layers exceeds the limit of {MAX_LAYERS} layers per image")
    layers = []
    for number, raw in enumerate(raw_layers, 1):
        if type(raw) is not dict:
            raise FormatError(f"image layer {number} is not a map")
        at, unlinked, override, label = raw.get(1, "/"), raw.get(2, False), raw.get(3, False), raw.get(4, "")
        if type(at) is not str or normalize_at(at) != at:
            raise FormatError(f"image layer {number}: placement is not a normalised absolute path")
        if type(unlinked) is not bool or type(override) is not bool or type(label) is not str:
            raise FormatError(f"image layer {number}: unlinked, override or label has the wrong type")
        if 5 in raw:
            if 0 in raw:
                raise FormatError(f"image layer {number} names both a FileSet (key 0) and an image (key 5)")
            layers.append(Layer(None, at, unlinked, override, label, _digest(raw[5], f"image layer {number}: image")))
        else:
            layers.append(Layer(_digest(raw.get(0), f"image layer {number}: FileSet"), at, unlinked, override, label))
    return Image(name, version, CompositionMode(mode), layers, _metadata(obj, 6, "image config"),
                 _metadata(obj, 7, "image metadata"))


def referenced_digests(data: bytes) -> list[tuple[bytes, bool]]:
    """The digests an encoded object names, each with ``True`` when it is a chunk.

    Used by gc and verify to walk the DAG without knowing each object's meaning; the
    object is fully decoded, so a malformed one is a FormatError here too.
    """
    kind = decode_object(data)[0]
    out: list[tuple[bytes, bool]] = []
    if kind == TYPE_DIR:
        for entry in decode_directory(data).entries:
            _entry_refs(entry, out)
    elif kind == TYPE_EXTENTS:
        out.extend((e.digest, True) for e in decode_extents_object(data) if e.digest is not None)
    elif kind == TYPE_FILESET:
        _entry_refs(decode_fileset(data).root, out)
    elif kind == TYPE_IMAGE:
        out.extend((layer.digest, False) for layer in decode_image(data).layers)
    elif kind == TYPE_PROVENANCE:  # the FileSet holding the signed archive index (docs/trust.md)
        out.append((_digest(decode_object(data).get(10), "provenance index (key 10)"), False))
    return out  # a signature names its subject but does not reach it; a profile names paths


def _entry_refs(entry: Entry, out: list[tuple[bytes, bool]]) -> None:
    if entry.tree is not None:
        out.append((entry.tree, False))
    if entry.content is not None:
        out.append((entry.content, False))
    for extent in entry.extents or ():
        if extent.digest is not None:
            out.append((extent.digest, True))
