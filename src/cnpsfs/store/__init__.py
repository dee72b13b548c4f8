"""The store layer: where objects and chunks live, and how they are found.

Everything above talks to a store through what this package exports; the local store's
layout (packs, SQLite index, block records) stays inside it.
"""

from cnpsfs.store.local import (
    BLOCK_TARGET,
    META_BLOCK_TARGET,
    T_CHUNK,
    T_DIR,
    T_EXTENTS,
    T_FILESET,
    T_IMAGE,
    TYPE_CODES,
    TYPE_NAMES,
    BlockStream,
    Location,
    NotCached,
    Store,
    StoreWriter,
    Tag,
    check_tag_name,
    check_tag_version,
    default_store_path,
)

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
    "BlockStream",
    "Location",
    "NotCached",
    "Store",
    "StoreWriter",
    "Tag",
    "check_tag_name",
    "check_tag_version",
    "default_store_path",
]
