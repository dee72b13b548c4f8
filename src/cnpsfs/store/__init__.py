"""The store layer: where objects and chunks live, and how they are found.

Everything above talks to a store through :class:`Store` (the protocol in
:mod:`cnpsfs.store.protocol`) and the few names exported here; the local store's layout
(packs, SQLite index, block records) stays inside this package.

The names below load their module on first use (PEP 562): ``cnpsfs status`` and the CLI's
option declarations import :mod:`.remotelimits` and :mod:`.names`, which import nothing,
and should not pay for SQLite, zstandard and the pack files' code on the way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnpsfs import lazy

if TYPE_CHECKING:
    from cnpsfs.store.local import LocalStore
    from cnpsfs.store.names import check_tag_name, check_tag_version
    from cnpsfs.store.paths import default_store_path
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
        DataStream,
        HostedStore,
        NotCached,
        Store,
        StoreWriter,
        Tag,
    )
    from cnpsfs.store.writer import BLOCK_TARGET, COLD_BLOCK_TARGET, META_BLOCK_TARGET, SMALL_BLOCK_TARGET

#: Where each name lives: the submodule of this package loaded when the name is first used.
_WHERE = {
    "LocalStore": "local",
    **dict.fromkeys(("check_tag_name", "check_tag_version"), "names"),
    "default_store_path": "paths",
    **dict.fromkeys(("T_CHUNK", "T_DIR", "T_EXTENTS", "T_FILESET", "T_IMAGE", "T_PROFILE", "T_PROVENANCE",
                     "T_SIGNATURE", "TYPE_CODES", "TYPE_NAMES", "BlockReader", "ChunkLocation", "DataStream",
                     "HostedStore", "NotCached", "Store", "StoreWriter", "Tag"), "protocol"),
    **dict.fromkeys(("BLOCK_TARGET", "COLD_BLOCK_TARGET", "META_BLOCK_TARGET", "SMALL_BLOCK_TARGET"), "writer"),
}

__all__ = [
    "BLOCK_TARGET",
    "COLD_BLOCK_TARGET",
    "META_BLOCK_TARGET",
    "SMALL_BLOCK_TARGET",
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
    "DataStream",
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


def __getattr__(name: str) -> Any:
    return lazy.load(__name__, _WHERE, name)
