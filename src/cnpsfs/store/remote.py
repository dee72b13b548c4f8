"""A remote store: pushed images read over HTTP, from a directory or from an OCI registry.

:class:`RemoteStore` implements the read half of the :class:`~cnpsfs.store.Store`
protocol over one remote (its mirrors are tried in order). An image becomes readable
once its reference is resolved: the tag gives the manifest, the manifest the image index
(docs/format.md, "Remote stores"), and from then on a digest is located through the
index's shards (fetched once each, on first need) and read by fetching its block record
with one Range request. Adjacent records wanted together are merged into one request, up
to :data:`MERGE_MAX` bytes, and requests run in parallel on a bounded pool.

The remote is untrusted. Everything fetched is verified before use: manifests' and index
blobs' sha256 (the manifest names them), each block record's header against the index,
and every member's BLAKE3 against its name. A record that fails is fetched once more from
the next mirror (the same one when there is only one), then reported as corrupt, naming
the remote, the blob and the byte range. A malformed manifest, index or shard is an error
naming the remote and the object, never a crash. A fetch that cannot finish within the
remote's timeout (default 30 s, retries and mirrors included) is an
:class:`~cnpsfs.errors.UnavailableError`, which the mount turns into EIO.

What was fetched of an index (manifests, index roots, shards) is kept in *state_dir*
(``<store>/remote/`` for a cached store), named by sha256, so a remount reads it without
the network, and the last answer for each tag is remembered for when the remote is down.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import (
    CorruptObjectError,
    MissingObjectError,
    NotFoundError,
    RegistryError,
    RemoteDataError,
    RemoteNotFoundError,
    TransportError,
    UnavailableError,
    UsageError,
)
from cnpsfs.store.backends import Backend
from cnpsfs.store.blocks import CODEC_RAW, CODEC_ZSTD
from cnpsfs.store.packs import MEMBER_HEADER, RECORD_HEADER, atomic_write
from cnpsfs.store.protocol import T_CHUNK, T_FILESET, TYPE_NAMES, ChunkLocation, DecodedReads, NotCached, Tag
from cnpsfs.store.wire import (
    INDEX_BLOB_MAX,
    BlobRef,
    IndexRoot,
    ManifestInfo,
    Shard,
    decode_index,
    decode_manifest,
    digest_tag,
    parse_digest_tag,
    parse_ref_tag,
    ref_tag,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
DEFAULT_PARALLEL = 8
#: Raw bytes of the blocks after a missed small data block that are fetched with it
#: (:meth:`ImageIndex.following`; ``read-ahead`` in remotes.toml, 0: none).
DEFAULT_READ_AHEAD = 512 * 1024
#: Records closer than this are fetched in one request (the gap is read and dropped).
MERGE_GAP = 16 * 1024
#: Longest merged request.
MERGE_MAX = 4 * 1024 * 1024
#: What :meth:`RemoteStore.counters` always reports (``cnpsfs status``).
COUNTERS = ("requests", "bytes", "errors", "retries", "blocks", "block_bytes", "range_requests", "index_bytes",
            "corrupt", "mirror_switches", "early_runs")
#: After a mirror failed to answer, requests skip it for this long (every mirror down: they
#: fail at once), so a dead server costs one timeout, not one per uncached read.
DOWN_SECONDS = 2.0
#: A tag's answer is reused for this long: one command resolves a reference more than once
#: (checking what it names, then loading it), and each answer is a round trip.
TAG_FRESH_SECONDS = 2.0
#: :meth:`ImageIndex.preload` fetches every shard at once (in parallel) when they total at
#: most this, so no lookup or read waits for a shard later.
PRELOAD_SHARDS_MAX = 16 << 20
#: ... and names every metadata block (directories, extents, FileSets, images) for a cache
#: to fetch at once when they total at most this: metadata is a few per cent of an image,
#: and each directory fetched on lookup would cost a round trip on the critical path.
PRELOAD_META_MAX = 32 << 20


@dataclass(frozen=True, slots=True)
class RemoteLocation:
    """Where a member is on a remote: its block record in a blob, and its slice of the block."""

    blob: str
    blob_size: int
    header: int
    count: int
    stored: int
    raw: int
    codec: int
    type: int
    inner: int
    length: int
    #: The remote whose index gave this location, and the member it was asked for.
    remote: str = ""
    digest: bytes = b""

    @property
    def block(self) -> tuple[str, int]:
        return (self.blob, self.header)

    @property
    def record_length(self) -> int:
        return RECORD_HEADER.size + MEMBER_HEADER.size * self.count + self.stored


Member = tuple[bytes, int, int, int]


class DecodedBlock:
    """A block fetched and verified whole: the BlockReader the fetcher gets for remote blocks.

    A remote block is decoded completely before it is handed out (and before it may enter
    a local cache), so a member is known good or bad at once and a bad block can be
    fetched again from another mirror in one place.
    """

    def __init__(self, members: list[Member], data: dict[bytes, bytes | None], record: bytes | None = None, *,
                 advice: bool = False) -> None:
        self.members = members
        self._data = data
        self._given = False
        #: The record as fetched (header and payload), for a cache to store verbatim; None if bad.
        self.record = record
        #: Fetched as a read-ahead and bad, not fetched again: a reader that wants it must.
        self.advice = advice

    @property
    def done(self) -> bool:
        return self._given

    @property
    def decoded(self) -> int:
        return sum(m[3] for m in self.members)

    def advance(self, upto: int) -> dict[bytes, bytes | memoryview | None]:
        if self._given:
            return {}
        self._given = True
        return dict(self._data)

    def advance_all(self) -> dict[bytes, bytes | None]:
        """Every member, whether or not handed out already (for another reader of the same block)."""
        return dict(self._data)

    @property
    def intact(self) -> bool:
        return not self.advice and all(v is not None for v in self._data.values())

    def member(self, digest: bytes) -> bytes | None:
        return self._data.get(digest)


def parse_record(data: bytes, loc: RemoteLocation, where: str) -> tuple[list[Member], dict[bytes, bytes | None]]:
    """Check a fetched block record against the index and verify every member.

    Raises CorruptObjectError when the record header disagrees with the index or the
    payload does not decode; a member whose BLAKE3 does not match is None.
    """
    if len(data) != loc.record_length:
        raise CorruptObjectError(f"{where}: the record is {len(data)} bytes, not {loc.record_length}")
    magic, codec, stored, raw, count = RECORD_HEADER.unpack_from(data, 0)
    if (magic, codec, stored, raw, count) != (b"BLK1", loc.codec, loc.stored, loc.raw, loc.count):
        raise CorruptObjectError(f"{where}: the record header does not match the index")
    members: list[Member] = []
    inner = 0
    header_end = RECORD_HEADER.size + MEMBER_HEADER.size * count
    for digest, type_code, length in MEMBER_HEADER.iter_unpack(data[RECORD_HEADER.size:header_end]):
        members.append((digest, type_code, inner, length))
        inner += length
    if inner != raw:
        raise CorruptObjectError(f"{where}: the record's member lengths do not add up")
    payload = data[header_end:]
    if codec == CODEC_ZSTD:
        try:
            block = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw)
        except zstandard.ZstdError:
            raise CorruptObjectError(f"{where}: the block does not decompress") from None
    elif codec == CODEC_RAW:
        block = payload
    else:
        raise CorruptObjectError(f"{where}: unknown codec {codec}")
    if len(block) != raw:
        raise CorruptObjectError(f"{where}: the block decodes to {len(block)} bytes, not {raw}")
    view = memoryview(block)
    out: dict[bytes, bytes | None] = {}
    for digest, _type, start, length in members:
        piece = bytes(view[start:start + length])
        out[digest] = piece if fmt.digest_bytes(piece) == digest else None
    view.release()
    return members, out


class ImageIndex:
    """One pushed image's index: the root, and its shards loaded on first need."""

    def __init__(self, remote: RemoteStore, manifest: ManifestInfo, root: IndexRoot,
                 started: Mapping[str, concurrent.futures.Future[bytes]] | None = None) -> None:
        self.remote = remote
        self.manifest = manifest
        self.root = root
        #: Shard blobs whose fetch began with the index's (by sha256), taken on first need.
        self._started = dict(started or {})
        self._shards: dict[tuple[bool, int], Shard] = {}
        self._lock = threading.Lock()
        self._loading: dict[tuple[bool, int], threading.Lock] = {}
        #: For :meth:`following`, built on first need: each blob's blocks in offset order
        #: (blob digest -> record offsets, block numbers), a chunk of each block (from the
        #: shards loaded so far, which :attr:`_indexed` names) and the blocks holding objects.
        self._layout_lock = threading.Lock()
        self._by_blob: dict[str, tuple[list[int], list[int]]] | None = None
        self._a_chunk: dict[int, tuple[bytes, int, int]] = {}
        self._meta_blocks: set[int] = set()
        self._indexed: set[tuple[bool, int]] = set()

    @property
    def digest(self) -> bytes:
        return self.root.root

    def _shard(self, chunk: bool, number: int) -> Shard:
        key = (chunk, number)
        shard = self._shards.get(key)
        if shard is not None:
            return shard
        with self._lock:
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:  # one load per shard however many threads miss it
            shard = self._shards.get(key)
            if shard is None:
                ref = self._shard_ref(chunk, number)
                started = self._started.pop(ref.digest, None)
                data = started.result() if started is not None else self.remote.index_blob(ref, "index shard")
                shard = Shard(data, f"{self.remote.name}: index shard {ref.digest}", self.root)
                self._shards[key] = shard
            return shard

    def _shard_ref(self, chunk: bool, number: int) -> BlobRef:
        return (self.root.chunk_shards if chunk else self.root.object_shards)[number].blob

    def find(self, digest: bytes, *, chunk_first: bool = True) -> RemoteLocation | None:
        for chunk in ((True, False) if chunk_first else (False, True)):
            number = self.root.shard_for(digest, chunk=chunk)
            if number is None:
                continue
            row = self._shard(chunk, number).find(digest)
            if row is not None:
                return self.location(digest, *row)
        return None

    def location(self, digest: bytes, block_no: int, type_code: int, inner: int, length: int) -> RemoteLocation:
        block = self.root.blocks[block_no]
        blob = self.root.blobs[block.blob]
        return RemoteLocation(blob.digest, blob.size, block.header, block.count, block.stored, block.raw,
                              block.codec, type_code, inner, length, self.remote.name, digest)

    def following(self, loc: RemoteLocation, budget: int, *, window: int = MERGE_MAX, step: int = 1
                  ) -> list[RemoteLocation]:
        """Data blocks stored after *loc*'s in its blob, up to *budget* raw bytes: a read-ahead.

        A block's stream (docs/format.md 2.1) is recorded nowhere, but the writer seals
        each stream's blocks in order, so the hot small-file blocks after a missed one hold
        the files after its files (in path order), with blocks of other streams in
        between. So: the blocks whose record starts within *window* bytes of *loc*'s end,
        in offset order; a block larger than *budget* on its own (a large or cold file's,
        of another stream) is skipped, and the first one that no longer fits what is left
        of *budget* ends the list. Skipped too are blocks holding objects (metadata, which
        a mount fetches on its own) and blocks none of whose chunks the shards loaded so
        far name: the caller checks by a chunk whether it has a block already. Each
        location returned names one chunk of its block.
        """
        if budget <= 0:
            return []
        layout = self._blob_layout(loc.blob)
        if layout is None:
            return []
        headers, numbers = layout
        i = bisect.bisect_left(headers, loc.header)
        if i >= len(headers) or headers[i] != loc.header:
            return []
        a_chunk, meta = self._chunks_of_blocks()
        end = loc.header + loc.record_length
        left = budget
        out: list[RemoteLocation] = []
        for j in (range(i + 1, len(headers)) if step > 0 else range(i - 1, -1, -1)):
            number = numbers[j]
            block = self.root.blocks[number]
            if (block.header - end if step > 0 else loc.header - block.header - block.length) > window:
                break
            if block.raw > budget or number in meta:
                continue
            if block.raw > left:
                break
            member = a_chunk.get(number)
            if member is None:
                continue
            out.append(self.location(member[0], number, T_CHUNK, member[1], member[2]))
            left -= block.raw
        return out

    def _blob_layout(self, blob: str) -> tuple[list[int], list[int]] | None:
        with self._layout_lock:
            if self._by_blob is None:
                numbers: dict[int, list[int]] = {}
                for number, block in enumerate(self.root.blocks):
                    numbers.setdefault(block.blob, []).append(number)
                by_blob: dict[str, tuple[list[int], list[int]]] = {}
                for blob_no, blocks in numbers.items():
                    blocks.sort(key=lambda n: self.root.blocks[n].header)
                    by_blob[self.root.blobs[blob_no].digest] = ([self.root.blocks[n].header for n in blocks], blocks)
                self._by_blob = by_blob
            return self._by_blob.get(blob)

    def _chunks_of_blocks(self) -> tuple[dict[int, tuple[bytes, int, int]], set[int]]:
        """A chunk of each block and the blocks holding objects, from the shards loaded so far."""
        with self._layout_lock:
            for key, shard in list(self._shards.items()):
                if key in self._indexed:
                    continue
                self._indexed.add(key)
                for digest, (number, type_code, inner, length) in shard:
                    if type_code != T_CHUNK:
                        self._meta_blocks.add(number)
                    elif number not in self._a_chunk:
                        self._a_chunk[number] = (digest, inner, length)
            return self._a_chunk, self._meta_blocks

    def load_shards(self) -> None:
        """Fetch every shard now (a push's catalogue needs them all)."""
        for chunk, shards in ((False, self.root.object_shards), (True, self.root.chunk_shards)):
            for number in range(len(shards)):
                self._shard(chunk, number)

    def preload(self, *, shards_max: int = PRELOAD_SHARDS_MAX, meta_max: int = PRELOAD_META_MAX
                ) -> list[RemoteLocation]:
        """Fetch the shards in parallel now; return a location in each metadata block.

        What a lazy mount does first: a shard fetched on first need is a round trip on
        the path of a lookup or a read, and so is each directory's block, while all the
        shards and all the metadata of an image are small beside its data. Object shards
        come first and always (they are what names the metadata blocks); chunk shards too
        when all the shards together are at most *shards_max*. The metadata blocks are
        returned (not fetched: the caller's cache fetches them, single flight) when they
        total at most *meta_max*, else none.
        """
        todo = [(False, n) for n in range(len(self.root.object_shards))]
        if sum(s.blob.size for s in (*self.root.object_shards, *self.root.chunk_shards)) <= shards_max:
            todo += [(True, n) for n in range(len(self.root.chunk_shards))]
        todo = [key for key in todo if key not in self._shards]
        for key in [k for k in todo if self._shard_ref(*k).digest in self._started]:
            self._shard(*key)  # fetched beside the index already: only waited for
            todo.remove(key)
        if len(todo) > 1:
            list(self.remote._executor().map(lambda key: self._shard(*key), todo))
        elif todo:
            self._shard(*todo[0])
        blocks: dict[int, RemoteLocation] = {}
        for number in range(len(self.root.object_shards)):
            for digest, row in self._shard(False, number):
                if row[0] not in blocks:
                    blocks[row[0]] = self.location(digest, *row)
        if sum(loc.record_length for loc in blocks.values()) > meta_max:
            return []
        return list(blocks.values())

    def scan(self, wanted: Container[bytes]) -> Iterator[tuple[bytes, RemoteLocation]]:
        """The members of *wanted* this image has, with their locations: each shard fetched,
        searched and dropped in turn, so a scan holds one shard at a time, not the index."""
        for chunk, shards in ((False, self.root.object_shards), (True, self.root.chunk_shards)):
            for number, ref in enumerate(shards):
                shard = self._shards.get((chunk, number))
                if shard is None:
                    data = self.remote.index_blob(ref.blob, "index shard")
                    shard = Shard(data, f"{self.remote.name}: index shard {ref.blob.digest}", self.root)
                for digest, row in shard:
                    if digest in wanted:
                        yield digest, self.location(digest, *row)

    def entries(self) -> Iterator[tuple[bytes, RemoteLocation]]:
        """Every member the image reaches, with its location (loads every shard)."""
        for chunk, shards in ((False, self.root.object_shards), (True, self.root.chunk_shards)):
            for number in range(len(shards)):
                for digest, row in self._shard(chunk, number):
                    yield digest, self.location(digest, *row)


class RemoteStore(DecodedReads):
    """The read side of the Store protocol over one remote and its mirrors (*backends*, in order)."""

    def __init__(self, name: str, backends: Sequence[Backend], *, state_dir: Path | None = None,
                 timeout: float = DEFAULT_TIMEOUT, parallel: int = DEFAULT_PARALLEL,
                 read_ahead: int = DEFAULT_READ_AHEAD) -> None:
        if not backends:
            raise UsageError(f"remote {name}: no URL")
        self.name = name
        self.backends = list(backends)
        self.state_dir = state_dir
        self.timeout = timeout
        self.parallel = max(1, parallel)
        #: Raw bytes of following blocks a cache in front fetches with a missed one (:meth:`following`).
        self.read_ahead = max(0, read_ahead)
        self.stats: Counter[str] = Counter()
        self._indexes: dict[bytes, ImageIndex] = {}
        self._lock = threading.Lock()
        self._preferred = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: For index blobs fetched beside the index (shards): not block requests, so not
        #: counted against :attr:`parallel`, which the mount's meta-ranges fill in that round.
        self._index_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._checked: set[int] = set()
        self._down: dict[int, tuple[float, BaseException]] = {}  # mirror -> (until, why)
        self._local = threading.local()
        self._tag_answers: dict[str, tuple[float, bytes | None]] = {}
        #: Byte ranges of pack blobs fetched ahead (a manifest's meta-ranges): blob -> [(start, end, bytes)].
        self._early: dict[str, list[tuple[int, int, concurrent.futures.Future[bytes]]]] = {}
        #: NAME and VERSION of the tag the last :meth:`resolve` went through (None for a digest).
        self.last_ref: tuple[str, str] | None = None
        #: Lookups begun by :meth:`resolve_ahead`, by reference: the thread and its answer.
        self._ahead: dict[str, tuple[threading.Thread, concurrent.futures.Future[bytes]]] = {}

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"RemoteStore({self.name!r})"

    def close(self) -> None:
        """Release connections and threads; the store stays usable (they are made again on demand).

        A lookup begun by :meth:`resolve_ahead` and never asked for is waited for first (it
        ends within the remote's timeout): no thread of ours may outlive this, since a
        mount forks its daemon right after.
        """
        with self._lock:
            ahead, self._ahead = list(self._ahead.values()), {}
        for thread, _answer in ahead:
            thread.join()
        with self._lock:
            pools, self._pool, self._index_pool = (self._pool, self._index_pool), None, None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        for backend in self.backends:
            backend.close()

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.parallel, thread_name_prefix="cnpsfs-fetch")
            return self._pool

    def _index_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._index_pool is None:
                self._index_pool = concurrent.futures.ThreadPoolExecutor(DEFAULT_PARALLEL,
                                                                         thread_name_prefix="cnpsfs-index")
            return self._index_pool

    def counters(self) -> dict[str, int]:
        """Requests, bytes, errors and retries of every mirror, plus blocks fetched and corrupt."""
        out: Counter[str] = Counter({key: 0 for key in COUNTERS})
        out.update(self.stats)
        for backend in self.backends:
            out.update(backend.stats)
            session = getattr(backend, "session", None) or getattr(getattr(backend, "client", None), "session", None)
            if session is not None and hasattr(session, "stats"):
                out["retries"] += session.stats.get("retries", 0)
        return dict(out)

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    def _mirrors(self, t_end: float, what: str, call: Callable[[Backend, float], T], *,
                 not_found_is_final: bool = False, start: int | None = None) -> T:
        """*call(backend, seconds left)* on the preferred mirror, then the others, until one answers.

        A switch to another mirror is logged. A 404 is final when the caller says so (a tag
        that does not exist), else the next mirror may still have the object.
        """
        first = self._preferred if start is None else start % len(self.backends)
        order = [(first + i) % len(self.backends) for i in range(len(self.backends))]
        now = time.monotonic()
        up = [n for n in order if self._down.get(n, (0.0, None))[0] <= now]
        if not up:
            _until, why = self._down[order[0]]
            raise UnavailableError(f"{self.name}: {what}: {why} (not retried for {DOWN_SECONDS:g} s)")
        order = up
        last: BaseException | None = None
        position = 0
        refetched = False
        while position < len(order):
            number = order[position]
            backend = self.backends[number]
            left = t_end - time.monotonic()
            if left <= 0:
                break
            try:
                result = self._call_checked(number, backend, call, left)
            except RemoteNotFoundError as exc:
                if not_found_is_final:
                    raise
                last = exc
            except (TransportError, CorruptObjectError) as exc:
                last = exc
                if isinstance(exc, TransportError) and not isinstance(exc, (RemoteDataError, RegistryError)):
                    self._down[number] = (time.monotonic() + DOWN_SECONDS, exc)  # no answer at all
            else:
                self._down.pop(number, None)
                if number != self._preferred and start is None:
                    log.warning("%s: using mirror %s from now on", self.name, backend.url)
                    self._preferred = number
                    self.stats["mirror_switches"] += 1
                return result
            if isinstance(last, RemoteDataError) and not refetched and position + 1 == len(order):
                # Wrong bytes from the last mirror there is: fetch once more (a proxy's glitch
                # heals; a damaged copy does not, and is then reported as corrupt).
                refetched = True
                self.stats["corrupt"] += 1
                log.warning("%s: %s; fetching it again", self.name, last)
                continue
            position += 1
            if position < len(order):
                log.warning("%s: %s; trying mirror %s", self.name, last, self.backends[order[position]].url)
        if last is None:
            raise UnavailableError(f"{self.name}: {what}: no answer within {self.timeout:g} s")
        if isinstance(last, (RemoteNotFoundError, CorruptObjectError)):
            raise last
        if isinstance(last, RemoteDataError):
            raise CorruptObjectError(f"{self.name}: {what}: {last}") from None
        raise UnavailableError(f"{self.name}: {what}: {last}") from None

    def _call_checked(self, number: int, backend: Backend, call: Callable[[Backend, float], T], left: float) -> T:
        """*call*, and the first time for this mirror its check (is it a cnpsfs remote?) beside it.

        The check runs in parallel with the call, so it costs no round trip of its own;
        its error, when it fails, is the one reported (clearer than the call's 404).
        """
        if number in self._checked:
            return call(backend, left)
        checking = self._executor().submit(backend.check)
        try:
            result = call(backend, left)
        except BaseException:
            checking.result()
            raise
        checking.result()
        self._checked.add(number)
        return result

    # ------------------------------------------------------------------ index blobs and refs

    def _state_path(self, *parts: str) -> Path | None:
        return self.state_dir.joinpath(*parts) if self.state_dir is not None else None

    def index_blob(self, ref: BlobRef, what: str) -> bytes:
        """A manifest-named blob (index root or shard), verified; kept in the state dir."""
        if ref.size > INDEX_BLOB_MAX:
            raise CorruptObjectError(f"{self.name}: {what} {ref.digest} claims {ref.size} bytes")
        cached = self._state_path("blobs", "sha256", ref.digest.split(":", 1)[1])
        if cached is not None:
            with contextlib.suppress(FileNotFoundError):
                data = cached.read_bytes()
                if len(data) == ref.size and "sha256:" + hashlib.sha256(data).hexdigest() == ref.digest:
                    return data
                log.warning("%s: the kept copy of %s is damaged; fetching it again", cached, ref.digest)
        data = self._mirrors(self._deadline(), f"{what} {ref.digest}",
                             lambda b, left: b.get_blob(ref.digest, ref.size, deadline=left))
        self.stats["index_bytes"] += len(data)
        if cached is not None:
            self._keep(cached, data)
        return data

    @staticmethod
    def _keep(path: Path, data: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        except OSError as exc:
            log.warning("cannot keep %s: %s", path, exc.strerror)

    def _ref_cache(self, tag: str) -> Path | None:
        key = hashlib.sha256(self.name.encode()).hexdigest()[:16]
        return self._state_path("refs", key, tag)

    def _manifest_for_tag(self, tag: str, what: str) -> bytes | None:
        """The manifest a tag names now; the last one seen when the remote cannot be reached."""
        fresh = self._tag_answers.get(tag)
        if fresh is not None and time.monotonic() - fresh[0] < TAG_FRESH_SECONDS:
            return fresh[1]
        cached = self._ref_cache(tag)
        try:
            data = self._mirrors(self._deadline(), what, lambda b, left: b.get_tag(tag, deadline=left),
                                 not_found_is_final=True)
        except RemoteNotFoundError:
            return None
        except UnavailableError as exc:
            if cached is not None and cached.exists():
                age = time.time() - cached.stat().st_mtime
                log.warning("%s (using the answer seen %.0f s ago)", exc, age)
                return cached.read_bytes()
            raise
        if data is not None and cached is not None:
            self._keep(cached, data)
        self._tag_answers[tag] = (time.monotonic(), data)
        return data

    def open_manifest(self, data: bytes, what: str, *, warm: bool = False) -> ImageIndex:
        """Parse a manifest, fetch and check its image index, and make the image readable.

        *warm* (a lazy mount's resolve): the index's shards and the manifest's meta-ranges
        are fetched in parallel with the index itself, so the mount's metadata takes one
        round after the tag instead of three (docs/format.md 3.7).
        """
        manifest = decode_manifest(data, f"{self.name}: {what}")
        with self._lock:
            known = self._indexes.get(manifest.root)
        if known is not None and known.manifest == manifest:
            return known  # read already (a second resolve of the same tag)
        index = self.read_manifest(data, what, warm=warm)
        with self._lock:
            return self._indexes.setdefault(index.digest, index)

    def read_index(self, digest: bytes) -> ImageIndex | None:
        """The index of pushed image *digest* without keeping it (what a push's catalogue scans)."""
        index = self._indexes.get(digest)
        if index is not None:
            return index
        data = self._manifest_for_tag(digest_tag(digest), f"image {fmt.format_digest(digest)}")
        return self.read_manifest(data, f"image {fmt.format_digest(digest)}") if data is not None else None

    def read_manifest(self, data: bytes, what: str, *, warm: bool = False) -> ImageIndex:
        """A manifest's image index, fetched and checked, not kept by this store."""
        manifest = decode_manifest(data, f"{self.name}: {what}")
        started: dict[str, concurrent.futures.Future[bytes]] = {}
        if warm and manifest.root not in self._indexes:
            if sum(b.size for b in manifest.shards) <= PRELOAD_SHARDS_MAX:
                pool = self._index_executor()
                for ref in manifest.shards:
                    started[ref.digest] = pool.submit(self.index_blob, ref, "index shard")
            self._start_early(manifest.meta_ranges)
        try:
            root = decode_index(self.index_blob(manifest.index, "image index"), f"{self.name}: image index "
                                f"{manifest.index.digest}")
        except BaseException:
            self.drop_early()
            raise
        if root.root != manifest.root:
            raise CorruptObjectError(f"{self.name}: {what}: the manifest names {fmt.format_digest(manifest.root)} "
                                     f"but its index is for {fmt.format_digest(root.root)}")
        listed = set(manifest.layers)
        missing = [s.blob for s in (*root.object_shards, *root.chunk_shards) if s.blob not in listed]
        missing += [b for b in root.blobs if b not in listed]
        if missing:
            raise CorruptObjectError(f"{self.name}: {what}: the index names blob {missing[0].digest}, which the "
                                     "manifest does not list")
        shard_digests = {s.blob.digest for s in (*root.object_shards, *root.chunk_shards)}
        return ImageIndex(self, manifest, root, {k: f for k, f in started.items() if k in shard_digests})

    def open_image(self, digest: bytes, *, warm: bool = False) -> ImageIndex:
        """The index of the pushed image (or FileSet) *digest*, through its digest tag."""
        index = self._indexes.get(digest)
        if index is not None:
            return index
        what = f"image {fmt.format_digest(digest)}"
        data = self._manifest_for_tag(digest_tag(digest), what)
        if data is None:
            raise NotFoundError(f"{self.name}: no pushed image or FileSet {fmt.format_digest(digest)}")
        return self.open_manifest(data, what, warm=warm)

    def loaded(self) -> list[ImageIndex]:
        with self._lock:
            return list(self._indexes.values())

    # ------------------------------------------------------------------ names

    def resolve_ahead(self, ref: str) -> None:
        """Begin ``resolve(ref, warm=True)`` on a thread of its own; :meth:`resolve` takes its answer.

        What a lazy mount does first, so the tag, the index, its shards and the meta-ranges
        are on their way while the command still imports and prepares the daemon's modules
        (hundreds of milliseconds of a cold start; the lookup is two or three round trips).
        The thread does network and state-directory work only, never the local store's
        SQLite (connections must not cross the daemon's fork); :meth:`close` waits for it.
        """
        answer: concurrent.futures.Future[bytes] = concurrent.futures.Future()

        def work() -> None:
            try:
                answer.set_result(self.resolve(ref, warm=True))
            except BaseException as exc:  # handed to whoever resolves ref next
                answer.set_exception(exc)

        thread = threading.Thread(target=work, name="cnpsfs-resolve", daemon=True)
        with self._lock:
            if ref in self._ahead:
                return
            self._ahead[ref] = (thread, answer)
        thread.start()

    def resolve(self, ref: str, *, want: int | None = None, warm: bool = False) -> bytes:
        """A reference's digest on this remote (``blake3:<hex>``, ``NAME@VERSION`` or ``NAME``).

        *warm*: see :meth:`open_manifest`. A lookup of *ref* begun by :meth:`resolve_ahead`
        is waited for, and its failure is this call's; its answers (the tag's manifest, the
        index) are then reused, not fetched again.
        """
        with self._lock:
            ahead = self._ahead.get(ref)
            if ahead is not None and ahead[0] is not threading.current_thread():  # not the lookup itself
                del self._ahead[ref]
            else:
                ahead = None
        if ahead is not None:
            ahead[0].join()
            ahead[1].result()
        if ref.startswith(fmt.DIGEST_PREFIX):
            hexpart = ref[len(fmt.DIGEST_PREFIX):].lower()
            if len(hexpart) != 64:
                raise UsageError(f"{ref}: a remote needs the full 64 hex digits of a digest")
            index = self.open_image(fmt.parse_digest(fmt.DIGEST_PREFIX + hexpart), warm=warm)
            self.last_ref = None
        else:
            name, _, version = ref.partition("@")
            if not version:
                version = self._latest_version(name)
            data = self._manifest_for_tag(ref_tag(name, version), f"tag {name}@{version}")
            if data is None:
                raise NotFoundError(f"unknown reference {name}@{version}: no such tag on {self.name}")
            index = self.open_manifest(data, f"tag {name}@{version}", warm=warm)
            if index.manifest.ref not in (None, f"{name}@{version}"):
                raise CorruptObjectError(f"{self.name}: tag {name}@{version} names a manifest for "
                                         f"{index.manifest.ref}")
            self.last_ref = (name, version)
        if want is not None and index.root.root_type != want:
            if want == T_FILESET:
                raise UsageError(f"{ref} is an image, not a FileSet")
            raise UsageError(f"{ref} is a {TYPE_NAMES.get(index.root.root_type)}, not a {TYPE_NAMES.get(want)}")
        return index.digest

    def _latest_version(self, name: str) -> str:
        """NAME alone: the version pushed last (by the manifests' creation time)."""
        versions = [v for n, v in (parse_ref_tag(t) or ("", "") for t in self.list_tags()) if n == name]
        if not versions:
            raise NotFoundError(f"unknown reference {name!r}: no such tag on {self.name}")
        best: tuple[str, str] | None = None
        for version in versions:
            data = self._manifest_for_tag(ref_tag(name, version), f"tag {name}@{version}")
            if data is None:
                continue
            created = decode_manifest(data, f"{self.name}: tag {name}@{version}").created or ""
            if best is None or (created, version) > best:
                best = (created, version)
        if best is None:
            raise NotFoundError(f"unknown reference {name!r}: no such tag on {self.name}")
        return best[1]

    def tag_root(self, tag: str) -> bytes | None:
        """The digest of what *tag* names (its manifest's root), or None without such a tag."""
        data = self._manifest_for_tag(tag, f"tag {tag}")
        return decode_manifest(data, f"{self.name}: tag {tag}").root if data is not None else None

    def list_tags(self) -> list[str]:
        return self._mirrors(self._deadline(), "tags", lambda b, _left: b.list_tags())

    def tags(self, type_code: int | None = None) -> list[Tag]:
        """NAME@VERSION tags of the remote (each one's manifest is fetched)."""
        out = []
        for tag in self.list_tags():
            parsed = parse_ref_tag(tag)
            if parsed is None:
                continue
            data = self._manifest_for_tag(tag, f"tag {tag}")
            if data is None:
                continue
            manifest = decode_manifest(data, f"{self.name}: tag {tag}")
            out.append(Tag(parsed[0], parsed[1], manifest.root_type, manifest.root, 0))
        return [t for t in out if type_code is None or t.type == type_code]

    def tags_for(self, digest: bytes) -> list[Tag]:
        return [t for t in self.tags() if t.digest == digest]

    def attachments(self, subject: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """Detached objects the loaded images' indexes file under *subject* (or all of them)."""
        pairs = {p for index in self.loaded() for p in index.root.attachments}
        return sorted(p for p in pairs if subject is None or p[0] == subject)

    def image_digests(self) -> list[bytes]:
        """Every image (and FileSet) pushed to this remote, from its digest tags."""
        return [d for d in (parse_digest_tag(t) for t in self.list_tags()) if d is not None]

    # ------------------------------------------------------------------ locating

    def locate(self, digest: bytes, *, chunk_first: bool = True) -> RemoteLocation | None:
        for index in self.loaded():
            loc = index.find(digest, chunk_first=chunk_first)
            if loc is not None:
                return loc
        return None

    def locate_many(self, digests: Iterable[bytes]) -> dict[bytes, RemoteLocation]:
        found = {}
        for digest in digests:
            loc = self.locate(digest)
            if loc is not None:
                found[digest] = loc
        return found

    def contains(self, digest: bytes) -> bool:
        return self.locate(digest, chunk_first=False) is not None

    def existing(self, digests: Iterable[bytes]) -> set[bytes]:
        return {d for d in digests if self.contains(d)}

    def object_type(self, digest: bytes) -> int | None:
        loc = self.locate(digest, chunk_first=False)
        return loc.type if loc is not None else None

    def describe(self, loc: ChunkLocation) -> str:
        assert isinstance(loc, RemoteLocation), "a location from another store"
        end = loc.header + loc.record_length - 1
        return f"{self.name}: blob {loc.blob} bytes {loc.header}-{end}"

    # ------------------------------------------------------------------ fetching blocks

    def around(self, loc: RemoteLocation, budget: int | None = None, *, behind: bool = True
               ) -> list[RemoteLocation]:
        """The blocks to fetch with *loc*'s as a read-ahead: up to *budget* raw bytes
        (default :attr:`read_ahead`) of those stored after it, and with *behind* as much of
        those before it (:meth:`ImageIndex.following`), from the first loaded index that
        has *loc*'s blob."""
        budget = self.read_ahead if budget is None else budget
        if budget <= 0:
            return []
        for index in self.loaded():
            if any(blob.digest == loc.blob for blob in index.root.blobs):
                found = index.following(loc, budget)
                if behind:
                    found += index.following(loc, budget, step=-1)
                return found
        return []

    def start_fetch(self, locs: Iterable[RemoteLocation], *,
                    futures: dict[Any, concurrent.futures.Future[Any]] | None = None,
                    ahead: Container[Any] = ()) -> dict[Any, concurrent.futures.Future[Any]]:
        """Fetch the blocks of *locs* in the background: one future per block key.

        Records of one blob that lie close together are merged into one request (up to
        :data:`MERGE_MAX`); the requests run on the remote's pool (:attr:`parallel` at
        once). A future's result is a :class:`DecodedBlock`, or the error that ended it.
        *futures* may supply the future objects (by block key) the caller already holds.
        The blocks whose keys are in *ahead* are a read-ahead (advice): one that fails its
        check is not fetched again here but handed out as bad (:attr:`DecodedBlock.advice`),
        for a reader that wants it to fetch it again in earnest.
        """
        blocks: dict[tuple[str, int], RemoteLocation] = {}
        for loc in locs:
            blocks.setdefault(loc.block, loc)
        futures = dict(futures or {})
        for key in blocks:
            futures.setdefault(key, concurrent.futures.Future())
        t_end = self._deadline()
        pool = self._executor()
        for run in merge_runs(blocks.values()):
            pool.submit(self._fetch_run, run, {loc.block: futures[loc.block] for loc in run}, t_end,
                        {loc.block for loc in run if loc.block in ahead})
        return futures

    def fetch_blocks(self, locs: Iterable[RemoteLocation]) -> dict[tuple[str, int], DecodedBlock]:
        """The blocks of *locs*, fetched (merged, in parallel) and verified; raises the first failure."""
        futures = self.start_fetch(locs)
        return {key: fut.result() for key, fut in futures.items()}

    def _fetch_run(self, run: list[RemoteLocation], futures: Mapping[tuple[str, int], concurrent.futures.Future[Any]],
                   t_end: float, ahead: Container[tuple[str, int]] = ()) -> None:
        """On a pool thread: one request for a run of records, then each record checked
        (in offset order: a read-ahead's blocks come after the block wanted)."""
        first, last = run[0], run[-1]
        start, end = first.header, last.header + last.record_length
        what = f"blob {first.blob} bytes {start}-{end - 1}"
        try:
            data = self._early_bytes(first.blob, start, end, t_end) if self._early else None
            if data is None:
                data = self._mirrors(t_end, what, lambda b, left: b.read_range(first.blob, start, end - start,
                                                                              blob_size=first.blob_size, deadline=left))
                self.stats["range_requests"] += 1
            else:
                self.stats["early_runs"] += 1
        except BaseException as exc:  # every waiter must hear of it
            err = exc if isinstance(exc, (CorruptObjectError, UnavailableError, NotFoundError)) else \
                UnavailableError(f"{self.name}: {what}: {exc}")
            for fut in futures.values():
                fut.set_exception(err)
            return
        for loc in run:
            record = data[loc.header - start:loc.header - start + loc.record_length]
            try:
                block = self._check(record, loc, t_end, advice=loc.block in ahead)
            except BaseException as exc:
                futures[loc.block].set_exception(exc)
            else:
                futures[loc.block].set_result(block)

    def _check(self, record: bytes, loc: RemoteLocation, t_end: float, *, advice: bool = False) -> DecodedBlock:
        """Verify a record; a bad one is fetched once more, from the next mirror (unless *advice*)."""
        where = self.describe(loc)
        members: list[Member] = []
        data: dict[bytes, bytes | None] = {}
        try:
            members, data = parse_record(record, loc, where)
        except CorruptObjectError as exc:
            problem: str = str(exc)
        else:
            if all(v is not None for v in data.values()):
                self.stats["blocks"] += 1
                self.stats["block_bytes"] += len(record)
                return DecodedBlock(members, data, record)
            bad = next(d for d, v in data.items() if v is None)
            problem = f"{where}: member {fmt.format_digest(bad)} does not match its digest"
        self.stats["corrupt"] += 1
        if advice:
            log.debug("%s (a block read ahead: dropped)", problem)
            return DecodedBlock(members, data, None, advice=True)
        retry_from = (self._preferred + 1) % len(self.backends)
        log.warning("%s; fetching it again from %s", problem, self.backends[retry_from].url)
        record = self._mirrors(t_end, f"blob {loc.blob} bytes {loc.header}-{loc.header + loc.record_length - 1}",
                               lambda b, left: b.read_range(loc.blob, loc.header, loc.record_length,
                                                            blob_size=loc.blob_size, deadline=left),
                               start=retry_from)
        members, data = parse_record(record, loc, where)
        if all(v is not None for v in data.values()):
            self.stats["blocks"] += 1
            self.stats["block_bytes"] += len(record)
            return DecodedBlock(members, data, record)
        self.stats["corrupt"] += 1
        return DecodedBlock(members, data, None)

    def _start_early(self, ranges: Iterable[tuple[BlobRef, int, int]]) -> None:
        """Fetch a manifest's meta-ranges now, on the pool; :meth:`_fetch_run` takes its
        records from them. Advice: a range that fails is fetched again as usual."""
        t_end = self._deadline()
        pool = self._executor()
        for blob, offset, length in ranges:
            def fetch(blob: BlobRef = blob, offset: int = offset, length: int = length) -> bytes:
                what = f"blob {blob.digest} bytes {offset}-{offset + length - 1}"
                data = self._mirrors(t_end, what, lambda b, left: b.read_range(blob.digest, offset, length,
                                                                              blob_size=blob.size, deadline=left))
                self.stats["range_requests"] += 1
                return data
            with self._lock:
                self._early.setdefault(blob.digest, []).append((offset, offset + length, pool.submit(fetch)))

    def _early_bytes(self, blob: str, start: int, end: int, t_end: float) -> bytes | None:
        """Bytes *start*..*end* of *blob* from a range fetched ahead, or None (not covered, or it failed)."""
        with self._lock:
            ranges = list(self._early.get(blob, ()))
        for r_start, r_end, fut in ranges:
            if r_start <= start and end <= r_end:
                try:
                    data = fut.result(timeout=max(0.0, t_end - time.monotonic()))
                except Exception as exc:  # advice: the caller fetches it again
                    log.debug("%s: a range fetched ahead failed (%s); fetching again", self.name, exc)
                    return None
                if len(data) != r_end - r_start:
                    return None
                return data[start - r_start:end - r_start]
        return None

    def drop_early(self) -> None:
        """Forget the ranges fetched ahead (the mount's metadata is in the cache by now)."""
        with self._lock:
            self._early.clear()

    def open_block(self, loc: ChunkLocation) -> DecodedBlock:
        assert isinstance(loc, RemoteLocation), "a location from another store"
        return self.fetch_blocks([loc])[loc.block]

    def prefetch(self, locs: Iterable[Any]) -> None:
        """Nothing is kept between calls here (a cached store in front keeps what is fetched)."""

    # ------------------------------------------------------------------ reading by digest

    def get(self, digest: bytes) -> bytes:
        if getattr(self._local, "cache_only", False):
            raise NotCached
        loc = self.locate(digest, chunk_first=False)
        if loc is None:
            raise MissingObjectError(f"{fmt.format_digest(digest)} is not on {self.name}")
        block = self.open_block(loc)
        data = block.member(digest)
        if data is None:
            what = TYPE_NAMES.get(loc.type, "object")
            raise CorruptObjectError(f"{what} {fmt.format_digest(digest)} is corrupt: its bytes do not match "
                                     f"its digest (block at {self.describe(loc)})")
        return data

    @contextlib.contextmanager
    def cache_only(self) -> Iterator[None]:
        """Nothing of a remote is in memory to serve inline: on this thread every read says NotCached."""
        self._local.cache_only = True
        try:
            yield
        finally:
            self._local.cache_only = False

    # ------------------------------------------------------------------ not for a read-only store

    def _read_only(self) -> UsageError:
        return UsageError(f"{self.name} is read here: use `cnpsfs push` to write to a remote")

    def set_tag(self, name: str, version: str, type_code: int, digest: bytes) -> None:
        raise self._read_only()

    def remove_tag(self, name: str, version: str) -> bool:
        raise self._read_only()

    def detach(self, subject: bytes, digest: bytes) -> bool:
        raise self._read_only()

    def accepted_revision(self, name: str) -> tuple[int, bytes] | None:
        return None  # a client's memory of what it accepted is local (CachedStore keeps it)

    def record_revision(self, name: str, revision: int, digest: bytes) -> None:
        raise self._read_only()

    def writer(self, *, pool: Any = None, level: int | None = None) -> Any:
        raise self._read_only()

    def scratch_dir(self) -> Path:
        raise self._read_only()


def merge_runs(locs: Iterable[RemoteLocation], *, gap: int = MERGE_GAP, limit: int = MERGE_MAX
               ) -> list[list[RemoteLocation]]:
    """Group records of the same blob into runs one request can fetch: sorted, close, bounded."""
    by_blob: dict[str, list[RemoteLocation]] = {}
    for loc in locs:
        by_blob.setdefault(loc.blob, []).append(loc)
    runs: list[list[RemoteLocation]] = []
    for blob_locs in by_blob.values():
        blob_locs.sort(key=lambda loc: loc.header)
        run: list[RemoteLocation] = []
        for loc in blob_locs:
            if run:
                run_end = run[-1].header + run[-1].record_length
                if loc.header - run_end > gap or loc.header + loc.record_length - run[0].header > limit:
                    runs.append(run)
                    run = []
            run.append(loc)
        if run:
            runs.append(run)
    return runs
