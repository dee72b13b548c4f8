"""The remote wire format: what a pushed image looks like on a web server, a file system or
in an OCI registry (docs/format.md, "Remote stores", is normative).

Everything a remote holds is an **immutable blob** named by the sha256 of its bytes, plus
**mutable tags** that name an image manifest:

- *packs*: the local pack format (``CNPSPK01`` and block records, docs/format.md 2.1), so a
  block travels as the same bytes it has on disk and a reader fetches one record with one
  HTTP Range request;
- *index shards*: sorted fixed-size records mapping a member's BLAKE3 digest to its block
  and its slice of the decoded block, partitioned by digest so a reader fetches only the
  part it needs (objects apart from chunks: a mount needs the objects first);
- the *image index* (the manifest's config): which packs, where each block's record is, and
  which shard covers which digests;
- the *manifest*: an OCI image manifest with ``artifactType``
  ``application/vnd.cnpsfs.image.v1+json`` whose config is the image index and whose layers
  are every shard and pack the image reaches, so registry gc keeps them and ``skopeo copy``
  moves them.

sha256 names blobs because registries and HTTP caches speak it; BLAKE3 stays the identity
of everything inside, and every member fetched is verified against it.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from cnpsfs import format as fmt
from cnpsfs.errors import CorruptObjectError
from cnpsfs.store.names import NAME_RE, VERSION_RE
from cnpsfs.store.protocol import T_CHUNK, T_FILESET, T_IMAGE, TYPE_NAMES

REMOTE_MARKER = "cnpsfs-remote"
REMOTE_LAYOUT = "cnpsfs remote layout 1\n"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_IMAGE = "application/vnd.cnpsfs.image.v1+json"
ARTIFACT_FILESET = "application/vnd.cnpsfs.fileset.v1+json"
MT_INDEX = "application/vnd.cnpsfs.index.v1+cbor"
MT_SHARD = "application/vnd.cnpsfs.shard.v1"
MT_PACK = "application/vnd.cnpsfs.pack.v1"

ANN_ROOT = "org.cnpsfs.root"
ANN_REF = "org.cnpsfs.ref"
ANN_CREATED = "org.opencontainers.image.created"
#: Where the image's metadata blocks are (docs/format.md 3.5): advice that lets a mount fetch
#: them in the same round as the image index instead of one round after its shards.
ANN_META_RANGES = "org.cnpsfs.meta-ranges"
#: A reader ignores a meta-ranges annotation with more ranges or bytes than this.
META_RANGES_MAX = 256
META_RANGES_BYTES_MAX = 32 << 20

INDEX_TYPE = "cnpsfs/remote-index"
SHARD_MAGIC = b"CNPSIS01"
SHARD_HEADER = struct.Struct("<8sI")  # magic, entry count
SHARD_ENTRY = struct.Struct("<32sIBII")  # digest, block number, type code, inner offset, length
BLOB_ENTRY = struct.Struct("<32sQ")  # sha256, size
BLOCK_ENTRY = struct.Struct("<IQIIIB")  # blob number, header offset, member count, stored, raw, codec
ATTACHMENT_ENTRY = struct.Struct("<32s32s")  # subject digest, detached object digest
RECORD_HEADER_SIZE = 17
MEMBER_HEADER_SIZE = 37

#: Entries per shard (45 bytes each: about 90 KiB).
SHARD_TARGET = 2048
#: Registries refuse manifests above 4 MiB; we stay well below.
MANIFEST_MAX = 2 * 1024 * 1024
#: Largest index root or shard a reader accepts (a hostile remote cannot make it allocate more).
INDEX_BLOB_MAX = 256 * 1024 * 1024

_TAG_ESCAPES = {"_": "_u", "/": "_s", "+": "_p", "~": "_t", ":": "_c", "@": "_a"}
_TAG_UNESCAPES = {v[1]: k for k, v in _TAG_ESCAPES.items()}
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_TAG_RE = re.compile(r"blake3-([0-9a-f]{64})")
_SHA256_RE = re.compile(r"sha256:([0-9a-f]{64})")
_META_RANGE_RE = re.compile(r"(sha256:[0-9a-f]{64})@([0-9]{1,15})\+([0-9]{1,15})")


# --------------------------------------------------------------------------- tags


def ref_tag(name: str, version: str) -> str:
    """The OCI tag (and static-layout tag file name) of NAME@VERSION.

    Reversible: ``_`` ``/`` ``+`` ``~`` ``:`` and the ``@`` between name and version become
    ``_u`` ``_s`` ``_p`` ``_t`` ``_c`` ``_a``; everything else in a valid name or version is
    already allowed in a tag. A result longer than 128 characters becomes ``h-`` and the
    sha256 of NAME@VERSION (the manifest's ``org.cnpsfs.ref`` annotation still names it).
    """
    text = "".join(_TAG_ESCAPES.get(c, c) for c in name) + "_a" + "".join(_TAG_ESCAPES.get(c, c) for c in version)
    if len(text) > 128:
        return "h-" + hashlib.sha256(f"{name}@{version}".encode()).hexdigest()
    return text


def parse_ref_tag(tag: str) -> tuple[str, str] | None:
    """NAME and VERSION of a tag made by :func:`ref_tag`, or None for any other tag."""
    if "_a" not in tag or not _TAG_RE.fullmatch(tag):
        return None
    out: list[str] = []
    i = 0
    while i < len(tag):
        c = tag[i]
        if c == "_":
            if i + 1 >= len(tag) or tag[i + 1] not in _TAG_UNESCAPES:
                return None
            out.append("\0" if tag[i + 1] == "a" else _TAG_UNESCAPES[tag[i + 1]])
            i += 2
            continue
        out.append(c)
        i += 1
    text = "".join(out)
    if text.count("\0") != 1:
        return None
    name, version = text.split("\0")
    # Only what a local tag could be: a remote's tags must not bring in names the store refuses.
    if not (NAME_RE.fullmatch(name) and VERSION_RE.fullmatch(version)):
        return None
    return name, version


def digest_tag(digest: bytes) -> str:
    """The tag naming the manifest of the image (or FileSet) *digest*: ``blake3-<hex>``."""
    return f"blake3-{digest.hex()}"


def parse_digest_tag(tag: str) -> bytes | None:
    m = _DIGEST_TAG_RE.fullmatch(tag)
    return bytes.fromhex(m.group(1)) if m else None


def sha256_name(data: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_sha256_name(text: str, where: str) -> str:
    if not isinstance(text, str) or not _SHA256_RE.fullmatch(text):
        raise CorruptObjectError(f"{where}: {text!r} is not a sha256 digest")
    return text


# --------------------------------------------------------------------------- the image index


@dataclass(frozen=True, slots=True)
class BlobRef:
    """A blob by its sha256 (``sha256:<hex>``) and size."""

    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class BlockEntry:
    """Where one block record is: in blob number *blob*, from byte *header* on."""

    blob: int
    header: int
    count: int
    stored: int
    raw: int
    codec: int

    @property
    def header_size(self) -> int:
        return RECORD_HEADER_SIZE + MEMBER_HEADER_SIZE * self.count

    @property
    def length(self) -> int:
        """Bytes of the whole record: record header, member headers, payload."""
        return self.header_size + self.stored


@dataclass(frozen=True, slots=True)
class ShardRef:
    """A shard covering digests from *first* up to the next shard's first."""

    first: bytes
    blob: BlobRef
    count: int


@dataclass(frozen=True)
class IndexRoot:
    """The image index: the root object, its packs, their blocks, and the shards."""

    root: bytes
    root_type: int
    blobs: tuple[BlobRef, ...]
    blocks: tuple[BlockEntry, ...]
    object_shards: tuple[ShardRef, ...]
    chunk_shards: tuple[ShardRef, ...]
    #: Detached objects (signatures, provenance) filed under subjects the root reaches.
    attachments: tuple[tuple[bytes, bytes], ...] = ()

    def shard_for(self, digest: bytes, *, chunk: bool) -> int | None:
        """Position of the shard that would hold *digest* in the chunk or object list."""
        shards = self.chunk_shards if chunk else self.object_shards
        if not shards:
            return None
        firsts = [s.first for s in shards]
        i = bisect.bisect_right(firsts, digest) - 1
        return i if i >= 0 else None


def encode_index(index: IndexRoot) -> bytes:
    """Deterministic CBOR (docs/format.md 1.2) with the two big tables as packed byte strings."""
    obj: dict[int, Any] = {
        0: INDEX_TYPE,
        1: 1,
        2: index.root,
        3: index.root_type,
        4: b"".join(BLOB_ENTRY.pack(_sha_bytes(b.digest), b.size) for b in index.blobs),
        5: b"".join(BLOCK_ENTRY.pack(b.blob, b.header, b.count, b.stored, b.raw, b.codec) for b in index.blocks),
        6: [[s.first, _sha_bytes(s.blob.digest), s.blob.size, s.count] for s in index.object_shards],
        7: [[s.first, _sha_bytes(s.blob.digest), s.blob.size, s.count] for s in index.chunk_shards],
        8: b"".join(ATTACHMENT_ENTRY.pack(s, d) for s, d in sorted(set(index.attachments))),
    }
    return fmt.encode_canonical(obj)


def decode_index(data: bytes, where: str) -> IndexRoot:
    """Parse and check an image index; anything malformed is a CorruptObjectError naming *where*."""
    def bad(problem: str) -> CorruptObjectError:
        return CorruptObjectError(f"{where}: malformed image index: {problem}")

    try:
        obj = cbor2.loads(data)
    except Exception:  # cbor2 raises several types for garbage
        raise bad("not CBOR") from None
    if not isinstance(obj, dict) or obj.get(0) != INDEX_TYPE or obj.get(1) != 1:
        raise bad("not a cnpsfs/remote-index version 1")
    root, root_type, blobs_raw, blocks_raw = obj.get(2), obj.get(3), obj.get(4), obj.get(5)
    if not isinstance(root, bytes) or len(root) != 32:
        raise bad("no root digest")
    if root_type not in (T_FILESET, T_IMAGE):
        raise bad(f"root type {root_type!r} is not a FileSet or an image")
    if not isinstance(blobs_raw, bytes) or len(blobs_raw) % BLOB_ENTRY.size:
        raise bad("blob table")
    if not isinstance(blocks_raw, bytes) or len(blocks_raw) % BLOCK_ENTRY.size:
        raise bad("block table")
    blobs = tuple(BlobRef("sha256:" + sha.hex(), size) for sha, size in BLOB_ENTRY.iter_unpack(blobs_raw))
    blocks = tuple(BlockEntry(*row) for row in BLOCK_ENTRY.iter_unpack(blocks_raw))
    for n, block in enumerate(blocks):
        if block.blob >= len(blobs):
            raise bad(f"block {n} names blob {block.blob} of {len(blobs)}")
        if block.codec not in (0, 1) or block.header + block.length > blobs[block.blob].size:
            raise bad(f"block {n} does not fit its blob")
    shard_lists = []
    for key in (6, 7):
        raw = obj.get(key)
        if not isinstance(raw, list):
            raise bad("shard list")
        shards = []
        for item in raw:
            if (not isinstance(item, list) or len(item) != 4 or not isinstance(item[0], bytes) or len(item[0]) != 32
                    or not isinstance(item[1], bytes) or len(item[1]) != 32 or not isinstance(item[2], int)
                    or not isinstance(item[3], int) or item[2] < 0 or item[3] < 0):
                raise bad("shard entry")
            shards.append(ShardRef(item[0], BlobRef("sha256:" + item[1].hex(), item[2]), item[3]))
        if any(a.first >= b.first for a, b in itertools.pairwise(shards)):
            raise bad("shards out of order")
        shard_lists.append(tuple(shards))
    attached = obj.get(8, b"")
    if not isinstance(attached, bytes) or len(attached) % ATTACHMENT_ENTRY.size:
        raise bad("attachment table")
    attachments = tuple(ATTACHMENT_ENTRY.iter_unpack(attached))
    if any(a >= b for a, b in itertools.pairwise(attachments)):
        raise bad("attachments out of order or repeated")
    return IndexRoot(root, root_type, blobs, blocks, shard_lists[0], shard_lists[1], attachments)


def _sha_bytes(name: str) -> bytes:
    return bytes.fromhex(name.split(":", 1)[1])


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True, slots=True)
class ShardEntry:
    digest: bytes
    block: int
    type: int
    inner: int
    length: int


def encode_shard(entries: Sequence[ShardEntry]) -> bytes:
    """``CNPSIS01``, the entry count, then the entries in ascending digest order."""
    parts = [SHARD_HEADER.pack(SHARD_MAGIC, len(entries))]
    parts += [SHARD_ENTRY.pack(e.digest, e.block, e.type, e.inner, e.length) for e in entries]
    return b"".join(parts)


class Shard:
    """A decoded shard: binary search over its sorted digests."""

    def __init__(self, data: bytes, where: str, index: IndexRoot) -> None:
        if len(data) < SHARD_HEADER.size:
            raise CorruptObjectError(f"{where}: malformed index shard: too short")
        magic, count = SHARD_HEADER.unpack_from(data)
        if magic != SHARD_MAGIC or len(data) != SHARD_HEADER.size + count * SHARD_ENTRY.size:
            raise CorruptObjectError(f"{where}: malformed index shard: bad header or length")
        digests: list[bytes] = []
        rows: list[tuple[int, int, int, int]] = []
        blocks = index.blocks
        for digest, block, type_code, inner, length in SHARD_ENTRY.iter_unpack(data[SHARD_HEADER.size:]):
            if digests and digest <= digests[-1]:
                raise CorruptObjectError(f"{where}: malformed index shard: digests out of order")
            if type_code not in TYPE_NAMES:
                raise CorruptObjectError(f"{where}: malformed index shard: entry {fmt.format_digest(digest)} "
                                         f"has the unknown type code {type_code}")
            if block >= len(blocks) or inner + length > blocks[block].raw:
                raise CorruptObjectError(f"{where}: malformed index shard: entry "
                                         f"{fmt.format_digest(digest)} does not fit its block")
            digests.append(digest)
            rows.append((block, type_code, inner, length))
        self.digests = digests
        self.rows = rows

    def find(self, digest: bytes) -> tuple[int, int, int, int] | None:
        """(block number, type, inner, length) of *digest*, if this shard has it."""
        i = bisect.bisect_left(self.digests, digest)
        if i < len(self.digests) and self.digests[i] == digest:
            return self.rows[i]
        return None

    def __iter__(self) -> Any:
        return iter(zip(self.digests, self.rows, strict=True))


def split_shards(entries: Iterable[ShardEntry], target: int = SHARD_TARGET) -> list[tuple[bytes, list[ShardEntry]]]:
    """Sorted *entries* cut into shards of at most *target*: (first digest, entries) each.

    The first shard starts at the all-zero digest, so every digest falls in some shard.
    """
    ordered = sorted(entries, key=lambda e: e.digest)
    out: list[tuple[bytes, list[ShardEntry]]] = []
    for start in range(0, len(ordered), target):
        part = ordered[start:start + target]
        out.append((bytes(32) if start == 0 else part[0].digest, part))
    return out


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class ManifestInfo:
    """What a reader needs from an image manifest."""

    digest: str
    index: BlobRef
    root: bytes
    root_type: int
    ref: str | None
    created: str | None
    layers: tuple[BlobRef, ...]
    #: The layers whose media type is a shard's (the index says which kind each is).
    shards: tuple[BlobRef, ...] = ()
    #: ``org.cnpsfs.meta-ranges``, checked against the layers: (pack blob, offset, length); ()
    #: when absent or not usable (it is advice: everything fetched is verified anyway).
    meta_ranges: tuple[tuple[BlobRef, int, int], ...] = ()


def encode_meta_ranges(ranges: Iterable[tuple[str, int, int]]) -> str:
    """The ``org.cnpsfs.meta-ranges`` value: ``sha256:<hex>@OFFSET+LENGTH``, space-separated."""
    return " ".join(f"{blob}@{offset}+{length}" for blob, offset, length in ranges)


def decode_meta_ranges(text: Any, layers: Sequence[tuple[str, BlobRef]]) -> tuple[tuple[BlobRef, int, int], ...]:
    """The ranges of a meta-ranges annotation, or () when it breaks a rule of docs/format.md 3.5."""
    if not isinstance(text, str) or not text:
        return ()
    packs = {b.digest: b for mt, b in layers if mt == MT_PACK}
    out: list[tuple[BlobRef, int, int]] = []
    total = 0
    for item in text.split(" "):
        m = _META_RANGE_RE.fullmatch(item)
        blob = packs.get(m.group(1)) if m else None
        if m is None or blob is None:
            return ()
        offset, length = int(m.group(2)), int(m.group(3))
        total += length
        if length == 0 or offset + length > blob.size or len(out) >= META_RANGES_MAX or total > META_RANGES_BYTES_MAX:
            return ()
        out.append((blob, offset, length))
    return tuple(out)


def meta_ranges(index: IndexRoot, shard_blobs: Iterable[bytes], *, gap: int = 16 * 1024,
                limit: int = 4 * 1024 * 1024) -> str | None:
    """A pusher's ``org.cnpsfs.meta-ranges`` for *index*: every block holding an object (the
    blocks its object shards name), as byte ranges of its packs, records less than *gap*
    apart merged up to *limit* bytes a range; None when there are more ranges or bytes than
    a reader takes (docs/format.md 3.5) or a shard is not among *shard_blobs*."""
    by_digest = {sha256_name(data): data for data in shard_blobs}
    numbers: set[int] = set()
    for ref in index.object_shards:
        data = by_digest.get(ref.blob.digest)
        if data is None:
            return None
        numbers.update(row[0] for _digest, row in Shard(data, "the pushed index", index))
    spans = sorted((index.blocks[n].blob, index.blocks[n].header, index.blocks[n].header + index.blocks[n].length)
                   for n in numbers)
    runs: list[list[int]] = []  # [blob number, start, end]
    for blob, start, end in spans:
        last = runs[-1] if runs else None
        if last is not None and last[0] == blob and start - last[2] <= gap and end - last[1] <= limit:
            last[2] = max(last[2], end)
        else:
            runs.append([blob, start, end])
    if not runs or len(runs) > META_RANGES_MAX or sum(e - s for _b, s, e in runs) > META_RANGES_BYTES_MAX:
        return None
    return encode_meta_ranges((index.blobs[b].digest, s, e - s) for b, s, e in runs)


def encode_manifest(index: BlobRef, layers: Sequence[tuple[str, BlobRef]], root: bytes, root_type: int,
                    ref: str | None, created: str | None, meta_ranges: str | None = None) -> bytes:
    """The OCI image manifest of a pushed image: compact JSON, keys sorted."""
    annotations = {ANN_ROOT: fmt.format_digest(root)}
    if meta_ranges:
        annotations[ANN_META_RANGES] = meta_ranges
    if ref:
        annotations[ANN_REF] = ref
    if created:
        annotations[ANN_CREATED] = created
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_IMAGE if root_type == T_IMAGE else ARTIFACT_FILESET,
        "config": {"mediaType": MT_INDEX, "digest": index.digest, "size": index.size},
        "layers": [{"mediaType": mt, "digest": b.digest, "size": b.size} for mt, b in layers],
        "annotations": annotations,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def decode_manifest(data: bytes, where: str) -> ManifestInfo:
    """Parse a pushed image's manifest; anything else is a CorruptObjectError naming *where*."""
    def bad(problem: str) -> CorruptObjectError:
        return CorruptObjectError(f"{where}: not a cnpsfs image manifest: {problem}")

    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise bad("not JSON") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise bad("not an OCI manifest")
    if doc.get("artifactType") not in (ARTIFACT_IMAGE, ARTIFACT_FILESET):
        raise bad(f"artifactType {str(doc.get('artifactType'))[:80]!r}")
    config = doc.get("config")
    if not isinstance(config, dict) or config.get("mediaType") != MT_INDEX:
        raise bad("config is not a cnpsfs image index")
    index = _descriptor(config, bad)
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise bad("no layers")
    blobs = tuple(_descriptor(layer, bad) for layer in layers)
    typed = [(layer.get("mediaType"), blob) for layer, blob in zip(layers, blobs, strict=True)]
    annotations = doc.get("annotations")
    if not isinstance(annotations, dict):
        raise bad("no annotations")
    try:
        root = fmt.parse_digest(str(annotations.get(ANN_ROOT)))
    except fmt.FormatError:
        raise bad(f"annotation {ANN_ROOT} is not a blake3 digest") from None
    ref = annotations.get(ANN_REF)
    created = annotations.get(ANN_CREATED)
    root_type = T_IMAGE if doc["artifactType"] == ARTIFACT_IMAGE else T_FILESET
    return ManifestInfo(sha256_name(data), index, root, root_type, ref if isinstance(ref, str) else None,
                        created if isinstance(created, str) else None, blobs,
                        tuple(b for mt, b in typed if mt == MT_SHARD),
                        decode_meta_ranges(annotations.get(ANN_META_RANGES), typed))


def _descriptor(desc: Any, bad: Any) -> BlobRef:
    if not isinstance(desc, dict):
        raise bad("a descriptor is not an object")
    digest, size = desc.get("digest"), desc.get("size")
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise bad(f"descriptor digest {str(digest)[:80]!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad(f"descriptor size {size!r}")
    return BlobRef(digest, size)


def chunk_kind(type_code: int) -> bool:
    """Whether an index entry goes in the chunk shards (else the object shards)."""
    return type_code == T_CHUNK
