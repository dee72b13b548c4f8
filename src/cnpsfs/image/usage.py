"""What a store holds, in logical and stored bytes (``cnpsfs df``).

Logical bytes need the trees (hard links counted once per FileSet), so this sits above
the store, beside the other tree walks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.image.walk import walk
from cnpsfs.store import T_FILESET, T_IMAGE, LocalStore, Store


@dataclass(slots=True)
class Usage:
    filesets: int
    images: int
    logical_bytes: int
    stored_bytes: int
    chunks: int
    objects: int
    packs: int

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 0.0


def usage(store: LocalStore) -> Usage:
    """Logical bytes: file data of every tagged FileSet (each counted once)."""
    filesets = {t.digest for t in store.tags(T_FILESET)}
    images = {t.digest for t in store.tags(T_IMAGE)}
    pending, seen = list(images), set(images)
    while pending:  # nested images too
        with contextlib.suppress(CnpsfsError):
            for layer in store.get_image(pending.pop()).layers:
                if layer.image is None:
                    filesets.add(layer.digest)
                elif layer.image not in seen:
                    seen.add(layer.image)
                    pending.append(layer.image)
    logical = 0
    for digest in filesets:
        with contextlib.suppress(CnpsfsError):
            logical += fileset_bytes(store, digest)
    chunks, objects, packs = store.counts()
    return Usage(len(filesets), len(images), logical, store.disk_usage(), chunks, objects, packs)


def fileset_bytes(store: Store, digest: bytes) -> int:
    fs = store.get_fileset(digest)
    seen_links: set[bytes] = set()
    total = 0
    for _parts, entry, _opaque in walk(store, fs.root):
        if entry.kind is fmt.Kind.FILE:
            if entry.link is not None:
                if entry.link[0] in seen_links:
                    continue
                seen_links.add(entry.link[0])
            total += entry.size
    return total

