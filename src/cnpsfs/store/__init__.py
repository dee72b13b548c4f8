"""The store layer: where objects and chunks live, and how they are found.

Everything above talks to a store through :class:`Store` (the protocol in
:mod:`cnpsfs.store.protocol`) and the few names exported here; the local store's layout
(packs, SQLite index, block records) stays inside this package.
"""

from cnpsfs.store.local import LocalStore, default_store_path
from cnpsfs.store.names import check_tag_name, check_tag_version
from cnpsfs.store.protocol import (
    T_CHUNK,
    T_DIR,
    T_EXTENTS,
    T_FILESET,
    T_IMAGE,
    T_PROFILE,
    T_PROVENANCE,
    T_SIGNATURE,
    TYPE_CODES,
    TYPE_NAMES,
    BlockReader,
    ChunkLocation,
    HostedStore,
    NotCached,
    Store,
    StoreWriter,
    Tag,
)
from cnpsfs.store.writer import BLOCK_TARGET, META_BLOCK_TARGET

__all__ = [
    "BLOCK_TARGET",
    "META_BLOCK_TARGET",
    "TYPE_CODES",
    "TYPE_NAMES",
    "T_CHUNK",
    "T_DIR",
    "T_EXTENTS",
    "T_FILESET",
    "T_IMAGE",
    "T_PROFILE",
    "T_PROVENANCE",
    "T_SIGNATURE",
    "BlockReader",
    "ChunkLocation",
    "HostedStore",
    "LocalStore",
    "NotCached",
    "Store",
    "StoreWriter",
    "Tag",
    "check_tag_name",
    "check_tag_version",
    "default_store_path",
]
