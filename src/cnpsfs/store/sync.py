"""Push and pull: move what an image reaches between the local store and a remote, and
only what the other side lacks.

**Push** (docs/remote.md): the remote's catalogue is the union of the indexes of the
images already pushed there (their digest tags), read one image and one shard at a time
for the digests the pushed image reaches (:func:`_catalogue`). The image's DAG is walked level by level
from the root, one has-many round against the catalogue per level; everything already
there is only located (its subtree is there too: an index lists all its image reaches),
everything else is read from local blocks, verified, and packed. A local block whose
members are all wanted travels as its exact record; the wanted members of any other block
are re-blocked and compressed afresh. Packs are built in a fixed order, so a push killed
half-way and run again produces the same packs, finds the ones already uploaded (HEAD)
and sends only the rest. Then the index shards, the image index and the manifest, the
digest tag, and the NAME@VERSION tag **last**: a reader never sees a tag whose objects
are missing.

**Pull**: the image index lists every member the image reaches; what the local store
lacks is fetched block by block (merged ranges, in parallel), verified, and written as
the records the remote holds, committed in batches as cache packs (so a killed pull keeps
what it fetched), then checked complete and tagged, and its packs become ordinary packs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, CorruptObjectError, MissingObjectError, UsageError
from cnpsfs.store.backends import Backend, FileBackend
from cnpsfs.store.blocks import compress_block, decompress_block
from cnpsfs.store.index import Location
from cnpsfs.store.local import LocalStore
from cnpsfs.store.packs import PACK_MAGIC, atomic_write, encode_record_header, write_all
from cnpsfs.store.protocol import T_CHUNK, T_FILESET, T_IMAGE, TYPE_NAMES
from cnpsfs.store.remote import RemoteLocation, RemoteStore
from cnpsfs.store.wire import (
    MANIFEST_MAX,
    MT_PACK,
    MT_SHARD,
    BlobRef,
    BlockEntry,
    IndexRoot,
    ShardEntry,
    ShardRef,
    digest_tag,
    encode_index,
    encode_manifest,
    encode_shard,
    meta_ranges,
    parse_ref_tag,
    ref_tag,
    sha256_name,
    split_shards,
)
from cnpsfs.store.writer import BLOCK_TARGET, DEFAULT_ZSTD_LEVEL, META_BLOCK_TARGET

log = logging.getLogger(__name__)

#: Pack blobs are cut at this size: big enough that a 1 TB image stays under a few thousand
#: layers (manifests well below 4 MiB), small enough for one monolithic registry upload.
PACK_TARGET = 32 * 1024 * 1024
#: A pull commits what it fetched every this many bytes.
PULL_BATCH = 32 * 1024 * 1024


@dataclass
class TransferReport:
    """What a push or pull moved (``sent`` is bytes uploaded or fetched)."""

    root: bytes = b""
    ref: str | None = None
    manifest: str = ""
    sent: int = 0
    skipped: int = 0
    members_sent: int = 0
    members_skipped: int = 0
    blobs_sent: int = 0
    blobs_skipped: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {"root": fmt.format_digest(self.root), "ref": self.ref, "manifest": self.manifest,
                "bytes_sent": self.sent, "bytes_skipped": self.skipped, "members_sent": self.members_sent,
                "members_skipped": self.members_skipped, "blobs_sent": self.blobs_sent,
                "blobs_skipped": self.blobs_skipped, "seconds": round(self.seconds, 3)}


def _tag_of(store: LocalStore, ref: str, root: bytes) -> tuple[str, str] | None:
    """The NAME@VERSION a reference means (None for a digest reference)."""
    if ref.startswith(fmt.DIGEST_PREFIX):
        return None
    name, _, version = ref.partition("@")
    if version:
        return name, version
    tags = [t for t in store.tags() if t.name == name and t.digest == root]
    if not tags:
        return None
    return name, max(tags, key=lambda t: t.created_ns).version


# --------------------------------------------------------------------------- packing


#: emit(codec, payload, raw length, [(digest, type, length)]): one finished block record.
Emit = Callable[[int, bytes, int, list[tuple[bytes, int, int]]], None]


class _PackSpool:
    """Pack files being built in the local scratch directory, cut at *target* bytes."""

    def __init__(self, directory: Path, target: int, on_done: Callable[[Path, BlobRef], None]) -> None:
        self.directory = directory
        self.target = target
        self.on_done = on_done
        self.finished: list[tuple[Path, BlobRef]] = []
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._hash = hashlib.sha256()

    def add(self, record: bytes) -> tuple[int, int]:
        """Append a record; (pack number, record offset) — the pack number counts from 0."""
        if self._fd is None:
            self._path = self.directory / f"push-{secrets.token_hex(8)}.pack"
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            self._hash = hashlib.sha256(PACK_MAGIC)
            write_all(self._fd, PACK_MAGIC)
            self._size = len(PACK_MAGIC)
        at = self._size
        write_all(self._fd, record)
        self._hash.update(record)
        self._size += len(record)
        number = len(self.finished)
        if self._size >= self.target:
            self.close()
        return number, at

    def close(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        assert self._path is not None
        ref = BlobRef("sha256:" + self._hash.hexdigest(), self._size)
        self.finished.append((self._path, ref))
        self.on_done(self._path, ref)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for path in [p for p, _r in self.finished] + ([self._path] if self._path else []):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class _Reblocker:
    """Members of partly wanted blocks, grouped into new blocks (data and metadata apart)."""

    def __init__(self, emit: Emit, block_size: int | None = None) -> None:
        self.emit = emit
        self.targets = {False: block_size or BLOCK_TARGET, True: min(block_size or META_BLOCK_TARGET,
                                                                      META_BLOCK_TARGET)}
        self.cctx = zstandard.ZstdCompressor(level=DEFAULT_ZSTD_LEVEL)
        self.open: dict[bool, list[tuple[bytes, int, bytes]]] = {False: [], True: []}
        self.size = {False: 0, True: 0}

    def add(self, digest: bytes, type_code: int, data: bytes) -> None:
        meta = type_code != T_CHUNK
        self.open[meta].append((digest, type_code, data))
        self.size[meta] += len(data)
        if self.size[meta] >= self.targets[meta]:
            self.seal(meta)

    def seal(self, meta: bool) -> None:
        members = self.open[meta]
        if not members:
            return
        self.open[meta], self.size[meta] = [], 0
        codec, payload, raw = compress_block(members, self.cctx)
        self.emit(codec, payload, raw, [(d, t, len(data)) for d, t, data in members])

    def flush(self) -> None:
        self.seal(False)
        self.seal(True)


# --------------------------------------------------------------------------- push


def push(local: LocalStore, ref: str, backend: Backend, *, name: str | None = None, pack_size: int = PACK_TARGET,
         block_size: int | None = None, parallel: int = 8, state_dir: Path | None = None,
         progress: Callable[[int], object] | None = None) -> TransferReport:
    """Push everything *ref* reaches that the remote lacks, then its tags (see the module doc)."""
    started = time.monotonic()
    remote_name = name or backend.url
    if not backend.writable:
        backend.put_tag("", b"")  # raises the backend's read-only error
    if isinstance(backend, FileBackend):
        backend.initialise()
    root = local.resolve(ref)
    root_type = local.object_type(root)
    if root_type not in (T_FILESET, T_IMAGE):
        raise UsageError(f"{ref} is a {TYPE_NAMES.get(root_type or -1, 'object')}: push an image or a FileSet")
    tag = _tag_of(local, ref, root)
    report = TransferReport(root=root, ref=f"{tag[0]}@{tag[1]}" if tag else None)
    remote = RemoteStore(remote_name, [backend], state_dir=state_dir, parallel=parallel)
    # Detached objects (signatures, provenance) of what the image reaches travel with it.
    pairs = _attachments(local, root)
    extra_roots = sorted({d for _s, d in pairs})

    # Level 0: the image itself. Pushed before (its digest tag exists), with every
    # signature we have: only the tag moves.
    existing = backend.get_tag(digest_tag(root))
    pushed = None
    if existing is not None:
        try:
            pushed = remote.open_manifest(existing, f"image {fmt.format_digest(root)}")
        except CnpsfsError as exc:
            log.warning("%s: the image pushed before is unusable (%s); pushing it again", remote_name, exc)
        if pushed is not None and not set(pairs) <= set(pushed.root.attachments):
            pushed = None  # signed since: push again, so the new index carries the signatures
    if pushed is not None:
        try:
            report.members_skipped = sum(1 for _ in pushed.entries())
            report.skipped = sum(b.size for b in pushed.root.blobs)
            manifest = existing
            assert manifest is not None
            if tag is not None:
                manifest = _retag(manifest, f"{tag[0]}@{tag[1]}")
                backend.put_manifest(manifest)
                backend.put_tag(ref_tag(*tag), manifest)
                report.sent += len(manifest)
            report.manifest = sha256_name(manifest)
            report.seconds = time.monotonic() - started
            pending = _pending_push(state_dir, remote_name, root)
            if pending is not None:
                pending.unlink(missing_ok=True)  # a killed run's, which got as far as the digest tag
            return report
        finally:
            remote.close()

    # Held like any writer's: gc would sweep the spool packs waiting for upload (they are
    # in the store's tmp/) and repack the blocks being read, so it waits for the push.
    with local.shared_lock():
        roots = [root, *extra_roots]
        catalogue = _catalogue(local, remote, roots, tag[0] if tag else None, parallel)
        present, lacking = _walk(local, catalogue, roots)
        del catalogue
        report.members_skipped = len(present)
        report.members_sent = len(lacking)

        # New packs, uploaded as each one is finished.
        pool = concurrent.futures.ThreadPoolExecutor(max(1, parallel), thread_name_prefix="cnpsfs-push")
        uploads: list[concurrent.futures.Future[bool]] = []

        def upload(path: Path, blob: BlobRef) -> bool:
            if backend.has_blobs([blob.digest]):
                return False
            backend.put_blob(blob.digest, path, blob.size)
            if progress is not None:
                progress(blob.size)
            return True

        spool = _PackSpool(local.scratch_dir(), pack_size, lambda path, blob: uploads.append(pool.submit(upload, path,
                                                                                                          blob)))
        new_blocks: list[tuple[int, int, int, int, int, int]] = []  # (pack#, header, count, stored, raw, codec)
        new_entries: dict[bytes, tuple[int, int, int, int]] = {}  # digest -> (new block#, type, inner, length)
        try:
            def emit(codec: int, payload: bytes, raw: int, headers: list[tuple[bytes, int, int]]) -> None:
                record = encode_record_header(codec, len(payload), raw, headers) + payload
                pack_no, at = spool.add(record)
                block_no = len(new_blocks)
                new_blocks.append((pack_no, at, len(headers), len(payload), raw, codec))
                inner = 0
                for digest, type_code, length in headers:
                    if digest in lacking:
                        new_entries.setdefault(digest, (block_no, type_code, inner, length))
                    inner += length

            _pack_lacking(local, lacking, emit, block_size)
            spool.close()
            for fut in uploads:
                if fut.result():
                    report.blobs_sent += 1
                else:
                    report.blobs_skipped += 1
            pool.shutdown(wait=True)
            packs = [blob for _path, blob in spool.finished]
            report.sent += sum(b.size for b, f in zip(packs, uploads, strict=True) if f.result())
            report.skipped += sum(b.size for b, f in zip(packs, uploads, strict=True) if not f.result())

            index, shard_blobs = _build_index(root, root_type, present, new_blocks, new_entries, packs, pairs)
            for data in shard_blobs:
                report.sent += _put_once(backend, data, report)
            index_bytes = encode_index(index)
            report.sent += _put_once(backend, index_bytes, report)
            index_ref = BlobRef(sha256_name(index_bytes), len(index_bytes))
            layers = [(MT_SHARD, BlobRef(sha256_name(d), len(d))) for d in shard_blobs]
            layers += [(MT_PACK, blob) for blob in index.blobs]
            pending = _pending_push(state_dir, remote_name, root)
            created = _created(pending)
            manifest = encode_manifest(index_ref, layers, root, root_type, report.ref, created,
                                       meta_ranges(index, shard_blobs))
            if len(manifest) > MANIFEST_MAX:
                raise CnpsfsError(f"{ref}: its manifest would be {len(manifest)} bytes ({len(layers)} blobs), more "
                                  f"than {MANIFEST_MAX}: push with a larger --pack-size")
            backend.put_manifest(manifest)
            report.sent += len(manifest)
            if existing is None or index.attachments != _index_attachments(remote, existing):
                backend.put_tag(digest_tag(root), manifest)  # new, or now with more signatures
            if tag is not None:
                backend.put_tag(ref_tag(*tag), manifest)  # last: every object it names is there now
            report.manifest = sha256_name(manifest)
            if pending is not None:
                pending.unlink(missing_ok=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            spool.discard()
            remote.close()
    report.skipped += sum(loc.record_length for loc in {loc.block: loc for loc in present.values()}.values())
    report.seconds = time.monotonic() - started
    return report


def _pending_push(state_dir: Path | None, remote: str, root: bytes) -> Path | None:
    """Where a push of *root* to *remote* keeps the creation time of the manifest it writes."""
    if state_dir is None:
        return None
    return state_dir / "pushing" / hashlib.sha256(remote.encode()).hexdigest()[:16] / root.hex()


def _created(pending: Path | None) -> str:
    """The manifest's creation time: the one an earlier, killed push of the same image to the
    same remote chose, so the re-run writes the same manifest (the same blob) and the killed
    run's manifest is not left on the remote unreferenced; else now, kept for a re-run."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if pending is None:
        return now
    try:
        kept = pending.read_text()
        if len(kept) == len(now) and datetime.datetime.strptime(kept, "%Y-%m-%dT%H:%M:%SZ"):
            return kept
    except (OSError, ValueError):
        pass
    try:
        pending.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(pending, now.encode())
    except OSError as exc:
        log.warning("cannot keep %s: %s", pending, exc.strerror)
    return now


def _retag(manifest: bytes, ref: str) -> bytes:
    """The same manifest naming another NAME@VERSION (the image was pushed under another name)."""
    import json

    doc = json.loads(manifest)
    doc.setdefault("annotations", {})["org.cnpsfs.ref"] = ref
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _put_once(backend: Backend, data: bytes, report: TransferReport) -> int:
    digest = sha256_name(data)
    if backend.has_blobs([digest]):
        report.blobs_skipped += 1
        return 0
    backend.put_blob(digest, data, len(data))
    report.blobs_sent += 1
    return len(data)


def _attachments(local: LocalStore, root: bytes) -> list[tuple[bytes, bytes]]:
    """(subject, object) pairs of the detached objects filed under anything *root* reaches."""
    from cnpsfs.store.maintenance import reachable, with_attachments

    if not local.attachments():
        return []
    full = with_attachments(local, reachable(local, [root]))
    return sorted((s, d) for s, d in local.attachments() if s in full and d in full)


def _index_attachments(remote: RemoteStore, manifest: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        return remote.open_manifest(manifest, "the image pushed before").root.attachments
    except CnpsfsError:
        return ()


def _catalogue(local: LocalStore, remote: RemoteStore, roots: list[bytes], name: str | None,
               parallel: int) -> dict[bytes, RemoteLocation]:
    """Where the remote already has what *roots* reach: the has-many answers for the whole walk.

    The images pushed there are scanned one at a time (a few at once), shard by shard,
    keeping only the locations of digests *roots* reach, so what this holds grows with
    the image pushed, not with the remote: its other images' indexes are read and dropped.
    Images of the same name come first (the previous version shares the most), and the
    scan stops once everything is found.
    """
    from cnpsfs.store.maintenance import reachable

    wanted = reachable(local, roots)
    # A root the remote had would have been taken whole before: the scan is done when
    # everything below the roots is found.
    below = len(wanted - set(roots))
    digests = remote.image_digests()
    same: set[bytes] = set()
    if name is not None:
        for tag in remote.list_tags():
            parsed = parse_ref_tag(tag)
            if parsed is None or parsed[0] != name:
                continue
            with contextlib.suppress(CnpsfsError):
                digest = remote.tag_root(tag)
                if digest is not None:
                    same.add(digest)
    found: dict[bytes, RemoteLocation] = {}
    top = set(roots)

    def scan(digest: bytes) -> None:
        if sum(1 for d in found if d not in top) >= below:
            return
        try:
            index = remote.read_index(digest)
            if index is None:
                return
            for member, loc in index.scan(wanted):
                found.setdefault(member, loc)
        except CnpsfsError as exc:
            log.warning("%s: image %s is not usable for deduplication: %s", remote.name,
                        fmt.format_digest(digest), exc)

    with concurrent.futures.ThreadPoolExecutor(max(1, min(parallel, 4)), thread_name_prefix="cnpsfs-catalogue") as pool:
        list(pool.map(scan, [d for d in digests if d in same]))  # first, and alone: they may be all it takes
        list(pool.map(scan, [d for d in digests if d not in same]))
    return found


def _walk(local: LocalStore, catalogue: dict[bytes, RemoteLocation], roots: list[bytes]
          ) -> tuple[dict[bytes, RemoteLocation], dict[bytes, int]]:
    """Level by level from *roots*: what the remote has (with where) and what it lacks (with its type).

    One has-many round per level decides which digests are there. Below a digest the
    remote has, everything is there too, so those subtrees are only located (no rounds).
    """
    present: dict[bytes, RemoteLocation] = {}
    lacking: dict[bytes, int] = {}
    level: dict[bytes, bool] = dict.fromkeys(roots, False)  # digest -> is a chunk
    located_below: list[bytes] = []
    while level:
        found = {d: loc for d in level if (loc := catalogue.get(d)) is not None}
        nxt: dict[bytes, bool] = {}
        for digest, is_chunk in level.items():
            loc = found.get(digest)
            if loc is not None:
                present[digest] = loc
                if not is_chunk:
                    located_below.append(digest)
                continue
            if is_chunk:
                lacking[digest] = T_CHUNK
                continue
            data = local.get(digest)
            lacking[digest] = _object_type(data)
            for child, child_is_chunk in fmt.referenced_digests(data):
                if child not in present and child not in lacking and child not in level:
                    nxt[child] = child_is_chunk
        level = nxt
    # The subtrees the remote has: every member is in its catalogue (or, from a damaged
    # remote index, it is not: then it is sent like anything new).
    stack = [(d, False) for d in located_below]
    seen = set(present)
    while stack:
        digest, is_chunk = stack.pop()
        if not is_chunk:
            data = local.get(digest)
            for child, child_is_chunk in fmt.referenced_digests(data):
                if child in seen or child in lacking:
                    continue
                seen.add(child)
                loc = catalogue.get(child)
                if loc is None:
                    log.warning("%s is missing below an object the remote has; sending it",
                                fmt.format_digest(child))
                    lacking[child] = T_CHUNK if child_is_chunk else _object_type(local.get(child))
                    if not child_is_chunk:
                        for grandchild, gc_chunk in fmt.referenced_digests(local.get(child)):
                            stack.append((grandchild, gc_chunk))
                    continue
                present[child] = loc
                stack.append((child, child_is_chunk))
    return present, lacking


def _object_type(data: bytes) -> int:
    from cnpsfs.store.protocol import TYPE_CODES

    return TYPE_CODES[fmt.object_type(data)]


def _pack_lacking(local: LocalStore, lacking: dict[bytes, int], emit: Emit, block_size: int | None = None) -> None:
    """Read the blocks holding *lacking* members in a fixed order, verify them, and emit records.

    With *block_size*, every member is re-blocked into blocks of that target (a remote read
    lazily fetches whole blocks: smaller ones mean fewer bytes per cold read).
    """
    locs = local.locate_many(lacking)
    absent = [d for d in lacking if d not in locs]
    if absent:
        raise MissingObjectError(f"{fmt.format_digest(absent[0])} is not in the local store: "
                                 f"cannot push an incomplete image ({len(absent)} missing)")
    names = local.pack_files()
    blocks: dict[tuple[int, int], list[bytes]] = {}
    first: dict[tuple[int, int], Location] = {}
    for digest, loc in locs.items():
        blocks.setdefault(loc.block, []).append(digest)
        first.setdefault(loc.block, loc)
    dctx = zstandard.ZstdDecompressor()
    reblock = _Reblocker(emit, block_size)
    for key in sorted(blocks, key=lambda k: (names.get(k[0], ""), k[1])):
        loc = first[key]
        payload, members = local.packs.read_record(loc)
        where = local.describe(loc)
        raw = decompress_block(loc, payload, dctx, where)
        wanted = set(blocks[key])
        for digest, type_code, inner, length in members:
            if digest in wanted and fmt.digest_bytes(raw[inner:inner + length]) != digest:
                raise CorruptObjectError(f"{TYPE_NAMES.get(type_code, 'object')} {fmt.format_digest(digest)} is "
                                         f"corrupt in the local store (block at {where}): not pushing it")
        if block_size is None and all(m[0] in wanted for m in members):
            # Every member is wanted (and verified): the record travels as it is on disk.
            emit(loc.codec, payload, loc.raw, [(d, t, n) for d, t, _i, n in members])
            continue
        for digest, type_code, inner, length in members:
            if digest in wanted:
                reblock.add(digest, type_code, raw[inner:inner + length])
    reblock.flush()


def _build_index(root: bytes, root_type: int, present: dict[bytes, RemoteLocation],
                 new_blocks: list[tuple[int, int, int, int, int, int]],
                 new_entries: dict[bytes, tuple[int, int, int, int]], packs: list[BlobRef],
                 attachments: list[tuple[bytes, bytes]]) -> tuple[IndexRoot, list[bytes]]:
    """The image index and its shards (encoded) for everything *root* reaches."""
    blobs: list[BlobRef] = []
    blob_no: dict[str, int] = {}
    blocks: list[BlockEntry] = []
    block_no: dict[tuple[str, int], int] = {}

    def blob_number(blob: BlobRef) -> int:
        n = blob_no.get(blob.digest)
        if n is None:
            n = blob_no[blob.digest] = len(blobs)
            blobs.append(blob)
        return n

    entries: list[ShardEntry] = []
    for digest, loc in sorted(present.items()):
        key = loc.block
        n = block_no.get(key)
        if n is None:
            n = block_no[key] = len(blocks)
            blocks.append(BlockEntry(blob_number(BlobRef(loc.blob, loc.blob_size)), loc.header, loc.count,
                                     loc.stored, loc.raw, loc.codec))
        entries.append(ShardEntry(digest, n, loc.type, loc.inner, loc.length))
    renumber: dict[int, int] = {}
    for i, (pack_no, header, count, stored, raw, codec) in enumerate(new_blocks):
        renumber[i] = len(blocks)
        blocks.append(BlockEntry(blob_number(packs[pack_no]), header, count, stored, raw, codec))
    for digest, (i, type_code, inner, length) in new_entries.items():
        entries.append(ShardEntry(digest, renumber[i], type_code, inner, length))
    object_shards = split_shards(e for e in entries if e.type != T_CHUNK)
    chunk_shards = split_shards(e for e in entries if e.type == T_CHUNK)
    shard_blobs: list[bytes] = []
    refs: list[list[ShardRef]] = [[], []]
    for kind, shards in enumerate((object_shards, chunk_shards)):
        for first, part in shards:
            data = encode_shard(part)
            shard_blobs.append(data)
            refs[kind].append(ShardRef(first, BlobRef(sha256_name(data), len(data)), len(part)))
    index = IndexRoot(root, root_type, tuple(blobs), tuple(blocks), tuple(refs[0]), tuple(refs[1]),
                      tuple(attachments))
    return index, shard_blobs


# --------------------------------------------------------------------------- pull


def pull(local: LocalStore, ref: str, remote: RemoteStore, *, batch: int = PULL_BATCH,
         progress: Callable[[int], object] | None = None,
         check: Callable[[bytes, str | None], object] | None = None) -> TransferReport:
    """Fetch everything *ref* reaches that the local store lacks, then tag it (see the module doc).

    The image's detached objects (signatures, provenance) come with it and are filed under
    their subjects. *check(root, name)* runs once everything is stored and before the tag
    is set (the trust policy's decision: raising leaves the data untagged, as cache).
    """
    from cnpsfs.store.maintenance import reachable

    started = time.monotonic()
    root = remote.resolve(ref)
    index = remote.open_image(root)
    tag = remote.last_ref if not ref.startswith(fmt.DIGEST_PREFIX) else None
    report = TransferReport(root=root, ref=f"{tag[0]}@{tag[1]}" if tag else None, manifest=index.manifest.digest)
    entries = dict(index.entries())
    have = local.existing(entries)
    report.members_skipped = len(have)
    need = {d: loc for d, loc in entries.items() if d not in have}
    report.members_sent = len(need)
    blocks = list({loc.block: loc for loc in need.values()}.values())
    blocks.sort(key=lambda loc: (loc.blob, loc.header))
    report.skipped = sum(loc.record_length for loc in {loc.block: loc for d, loc in entries.items()
                                                         if d in have}.values())
    adopted: list[int] = []
    pending: list[tuple[int, bytes, int, list[tuple[bytes, int, int]]]] = []
    pending_bytes = 0

    def commit(tags: Iterable[tuple[str, str, int, bytes]] = (), *, final: bool = False) -> None:
        nonlocal pending_bytes
        with local.writer() as writer:
            for codec, payload, raw, members in pending:
                writer.add_record(codec, payload, raw, members)
            ids = writer.commit(tags, cache=None if final else remote.name, adopt=adopted if final else ())
        adopted.extend(ids)
        pending.clear()
        pending_bytes = 0

    start = 0
    while start < len(blocks):
        # One batch of requests at a time keeps memory bounded; the remote merges and parallelises.
        part: list[RemoteLocation] = []
        size = 0
        while start < len(blocks) and size < batch:
            part.append(blocks[start])
            size += blocks[start].record_length
            start += 1
        fetched = remote.fetch_blocks(part)
        for loc in part:
            block = fetched[loc.block]
            if not block.intact or block.record is None:
                bad = next(d for d, _t, _i, _n in block.members if block.member(d) is None)
                raise CorruptObjectError(f"{fmt.format_digest(bad)} is corrupt on {remote.describe(loc)}")
            header_size = loc.record_length - loc.stored
            pending.append((loc.codec, block.record[header_size:], loc.raw,
                            [(d, t, n) for d, t, _i, n in block.members]))
            pending_bytes += loc.record_length
            report.sent += loc.record_length
            if progress is not None:
                progress(loc.record_length)
        if pending_bytes >= batch:
            commit()
    if pending:
        commit()
    # The remote's index must have been complete: check before the tag makes it count.
    missing: list[str] = []
    attach = [(s, d) for s, d in index.root.attachments if s in entries and d in entries]
    reachable(local, [root, *(d for _s, d in attach)],
              on_missing=lambda d, _p, _c: missing.append(fmt.format_digest(d)))
    if missing:
        raise CorruptObjectError(f"{remote.name}: the index of {fmt.format_digest(root)} is incomplete: "
                                 f"{missing[0]} is missing ({len(missing)} in all); nothing was tagged")
    if attach:
        with local.writer() as writer:
            writer.commit(attach=attach)  # filed before the decision, which reads them
    if check is not None:
        check(root, tag[0] if tag else None)
    tags = [(tag[0], tag[1], index.root.root_type, root)] if tag else []
    commit(tags, final=True)
    report.blobs_sent = len({loc.blob for loc in blocks})
    report.seconds = time.monotonic() - started
    return report
