"""The store protocol: what every layer above needs from a store, and nothing of its layout.

The local store (:class:`cnpsfs.store.local.LocalStore`) implements it today; a remote
store (a registry, a static HTTP layout) and a cache that puts a local store in front of
a remote must each be one new module that implements the same protocol, so the image
view, the FUSE fetcher, importers and exporters never learn which one they talk to.

The shape follows desync's ``Store``/``WriteStore`` split and restic's backend/repository
layering: reads are by digest and batch-friendly (``existing`` is has-many,
``locate_many`` is locate-many), and a chunk's location is an opaque block key plus the
member's place in that block's decoded bytes. That is all the fetcher needs for single
flight (one load per block) and for partial decoding (decode as far as the wanted
members end); what a block key means (a pack and an offset, a blob and a range) stays
inside the store that made it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cnpsfs import format as fmt

# Type codes of stored records (index rows and block member headers; docs/format.md 2.1).
T_CHUNK = 0
T_DIR = 1
T_EXTENTS = 2
T_FILESET = 3
T_IMAGE = 4
T_SIGNATURE = 5
T_PROVENANCE = 6
T_PROFILE = 7
TYPE_CODES = {fmt.TYPE_DIR: T_DIR, fmt.TYPE_EXTENTS: T_EXTENTS, fmt.TYPE_FILESET: T_FILESET,
              fmt.TYPE_IMAGE: T_IMAGE, fmt.TYPE_SIGNATURE: T_SIGNATURE, fmt.TYPE_PROVENANCE: T_PROVENANCE,
              fmt.TYPE_PROFILE: T_PROFILE}
TYPE_NAMES = {T_CHUNK: "chunk", T_DIR: "directory", T_EXTENTS: "extents", T_FILESET: "fileset",
              T_IMAGE: "image", T_SIGNATURE: "signature", T_PROVENANCE: "provenance", T_PROFILE: "profile"}


class NotCached(Exception):
    """Raised in :meth:`Store.cache_only` mode when a read would need the index, disk or network."""


@dataclass(frozen=True, slots=True)
class Tag:
    """A mutable name for an object: NAME@VERSION -> digest."""

    name: str
    version: str
    type: int
    digest: bytes
    created_ns: int

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class ChunkLocation(Protocol):
    """Where a stored member is: an opaque, hashable block key and its slice of that block."""

    @property
    def block(self) -> Hashable: ...
    @property
    def type(self) -> int: ...
    @property
    def inner(self) -> int: ...
    @property
    def length(self) -> int: ...


class BlockReader(Protocol):
    """A block decoded front to back, only as far as readers have needed so far.

    Not thread-safe: one load of a block runs at a time (the fetcher's single flight).
    """

    @property
    def done(self) -> bool: ...
    @property
    def decoded(self) -> int:
        """How far the block is decoded: members ending there or before are complete."""
        ...
    @property
    def members(self) -> list[tuple[bytes, int, int, int]]:
        """Every member of the block: (digest, type code, offset in the block, length), in order."""
        ...

    def advance(self, upto: int) -> dict[bytes, bytes | memoryview | None]:
        """Decode through byte *upto* of the block; the members completed, verified (None if bad).

        A member may be a read-only view of the decoded block (which it keeps alive) rather
        than a copy: :class:`~cnpsfs.image.reader.ChunkCache` counts such blocks whole."""
        ...


class DataStream(enum.IntEnum):
    """Which open data block a writer puts a chunk in (docs/format.md 2.1). It decides only
    which chunks share a block (what a cold read decodes or fetches), never a digest."""

    DATA = 0  # large files' chunks, and chunks added without a stream (gc's repack)
    HOT = 1  # chunks of small files, unless every file they hold is cold
    COLD = 2  # chunks only of files unlikely to be read when a program starts


class StoreWriter(Protocol):
    """Adds chunks and objects; nothing is visible to readers until :meth:`commit`."""

    bytes_written: int

    def has(self, digest: bytes) -> bool: ...
    def add(self, data: bytes, type_code: int) -> bytes: ...
    def add_chunk(self, digest: bytes, data: bytes, type_code: int = T_CHUNK,
                  stream: DataStream = DataStream.DATA) -> None: ...
    def add_object(self, encoded: bytes) -> bytes: ...
    def commit(self, tags: Iterable[tuple[str, str, int, bytes]] = (), *,
               attach: Iterable[tuple[bytes, bytes]] = ()) -> object:
        """Publish, tag, and file detached objects under subjects: (subject, object digest)."""
        ...


@runtime_checkable
class Store(Protocol):
    """A content store: verified objects and chunks by digest, tags, and writers."""

    # ------------------------------------------------------------ reading by digest
    def get(self, digest: bytes) -> bytes:
        """The verified bytes of a chunk or object (CorruptObjectError, never wrong bytes)."""
        ...

    def get_directory(self, digest: bytes) -> fmt.Directory: ...
    def get_directory_items(self, digest: bytes) -> tuple[list[Any], bool]:
        """A directory object's entry maps undecoded, and its opaque flag (fmt.directory_items)."""
        ...

    def directory_checked(self, digest: bytes) -> bool:
        """Whether directory object *digest* is known to pass every check of
        fmt.decode_directory (under fmt.DIRECTORY_RULES): a writer of this store decoded it
        in full. False when not known: the reader checks it."""
        ...

    def get_fileset(self, digest: bytes) -> fmt.FileSet: ...
    def get_image(self, digest: bytes) -> fmt.Image: ...
    def file_extents(self, entry: fmt.Entry) -> tuple[fmt.Extent, ...]: ...
    def contains(self, digest: bytes) -> bool: ...

    def existing(self, digests: Iterable[bytes]) -> set[bytes]:
        """Has-many: the subset of *digests* this store holds."""
        ...

    def object_type(self, digest: bytes) -> int | None: ...

    def cache_only(self) -> contextlib.AbstractContextManager[None]:
        """On this thread, make reads that would touch the index, disk or network raise NotCached."""
        ...

    # ------------------------------------------------------------ blocks (the read path)
    def locate_many(self, digests: Iterable[bytes]) -> Mapping[bytes, ChunkLocation]:
        """Locate-many: where each stored digest is (absent ones are left out)."""
        ...

    def open_block(self, loc: ChunkLocation) -> BlockReader:
        """The block holding *loc*, ready to decode front to back (blocking I/O: call on a worker)."""
        ...

    def prefetch(self, locs: Iterable[ChunkLocation]) -> None:
        """A hint that these blocks are opened next: a remote-backed store starts fetching them
        together (merged, in parallel), a local store asks the kernel to start reading them.
        Must not block: the FUSE loop may call it."""
        ...

    def describe(self, loc: ChunkLocation) -> str:
        """Where a block is, for messages (``<pack>.pack offset <n>``, a blob and range, ...)."""
        ...

    # ------------------------------------------------------------ names
    def resolve(self, ref: str, *, want: int | None = None) -> bytes: ...
    def tags(self, type_code: int | None = None) -> list[Tag]: ...
    def tags_for(self, digest: bytes) -> list[Tag]: ...
    def set_tag(self, name: str, version: str, type_code: int, digest: bytes) -> None: ...
    def remove_tag(self, name: str, version: str) -> bool: ...

    # ------------------------------------------------------------ detached objects and revisions
    def attachments(self, subject: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """(subject, object digest) of the detached objects (signatures, provenance) filed
        under *subject*, or of all of them. They are not part of the subject's digest."""
        ...

    def detach(self, subject: bytes, digest: bytes) -> bool: ...

    def accepted_revision(self, name: str) -> tuple[int, bytes] | None:
        """The highest signed revision of *name* a trust decision accepted here (rollback protection)."""
        ...

    def record_revision(self, name: str, revision: int, digest: bytes) -> None:
        """Remember an accepted revision; the stored value only ever grows."""
        ...

    # ------------------------------------------------------------ writing
    def writer(self, *, pool: concurrent.futures.Executor | None = None, level: int | None = None
               ) -> contextlib.AbstractContextManager[StoreWriter, Any]:
        """A writer whose objects become visible at its commit; *pool* runs its compression,
        at zstd *level* (None: the store's default)."""
        ...

    def scratch_dir(self) -> Path:
        """A directory for spool files of this store's writers (same file system as the store)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class HostedStore(Store, Protocol):
    """A store with a directory on this host: a local store, or a cache in front of remotes.

    What mounts (gc roots of a live mount), importers (the gc interlock) and messages
    need beyond :class:`Store`; a bare remote store has none of it, which is why it is
    not part of the protocol every store implements.
    """

    @property
    def path(self) -> Path: ...
    @property
    def run_dir(self) -> Path:
        """Where live mounts register the roots gc must keep (``run/`` in the store)."""
        ...
    @property
    def read_only(self) -> str | None:
        """Why the store cannot be written (a read-only file system...), or None."""
        ...

    def check_writable(self, what: str = "this command") -> None: ...

    def shared_lock(self) -> contextlib.AbstractContextManager[None]:
        """Held by writers so gc, which takes it exclusively, never sweeps under them."""
        ...


class DecodedReads:
    """The typed reads every store derives from its verified ``get``: one copy for all of them."""

    def get(self, digest: bytes) -> bytes:
        raise NotImplementedError

    def get_directory(self, digest: bytes) -> fmt.Directory:
        return fmt.decode_directory(self.get(digest))

    def get_directory_items(self, digest: bytes) -> tuple[list[Any], bool]:
        return fmt.directory_items(self.get(digest))

    def directory_checked(self, digest: bytes) -> bool:
        return False  # a store that records nothing about its objects: check them

    def get_fileset(self, digest: bytes) -> fmt.FileSet:
        return fmt.decode_fileset(self.get(digest))

    def get_image(self, digest: bytes) -> fmt.Image:
        return fmt.decode_image(self.get(digest))

    def file_extents(self, entry: fmt.Entry) -> tuple[fmt.Extent, ...]:
        if entry.content is not None:
            return fmt.decode_extents_object(self.get(entry.content))
        return entry.extents or ()
