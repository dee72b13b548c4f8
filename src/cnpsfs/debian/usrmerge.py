"""Merged /usr, as debootstrap builds bookworm and later: ``/bin``, ``/sbin``, ``/lib*``
are symlinks into ``/usr`` and packages' files in them live under ``/usr``.

debootstrap gets there by creating the symlinks before extracting anything, so dpkg
writes ``/bin/bash`` through the link into ``/usr/bin/bash`` while its database still
lists ``/bin/bash``. We do the same in the composition: each package FileSet that ships
one of those directories gets a *merged view*, a FileSet whose tree has them moved
under ``usr/`` (only directory objects are rewritten; file data is shared), and one
small layer provides the symlinks. The imported FileSet itself stays exactly what
``dpkg-deb -x`` gives; the merged view records its origin in its metadata.
"""

from __future__ import annotations

import dataclasses

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.store import Store, StoreWriter

MERGED = (b"bin", b"sbin", b"lib", b"lib32", b"lib64", b"libx32", b"libo32")


class MergedUsr:
    """Writes merged views and the symlink layer through one store writer.

    Directories the writer has not committed yet cannot be read back from the store, so the
    ones written here are remembered (by digest: identical content, identical children) for
    as long as this object lives: one per writer, dropped once it committed.
    """

    def __init__(self, store: Store, writer: StoreWriter) -> None:
        self.store = store
        self.writer = writer
        self._pending: dict[bytes, dict[bytes, fmt.Entry]] = {}

    def _dir(self, entry: fmt.Entry) -> dict[bytes, fmt.Entry]:
        assert entry.tree is not None
        pending = self._pending.get(entry.tree)
        if pending is not None:
            return dict(pending)
        return {e.name: e for e in self.store.get_directory(entry.tree).entries}

    def _store_dir(self, entry: fmt.Entry, children: dict[bytes, fmt.Entry]) -> fmt.Entry:
        digest = self.writer.add_object(fmt.encode_directory(fmt.Directory(list(children.values()))))
        self._pending[digest] = dict(children)
        return dataclasses.replace(entry, tree=digest)

    def _merge(self, into: fmt.Entry, other: fmt.Entry, where: str) -> fmt.Entry:
        """Merge directory *other* into directory *into* (which keeps its metadata)."""
        children = self._dir(into)
        for name, entry in self._dir(other).items():
            have = children.get(name)
            if have is None:
                children[name] = entry
            elif have.kind is fmt.Kind.DIR and entry.kind is fmt.Kind.DIR:
                children[name] = self._merge(have, entry, f"{where}/{name.decode(errors='replace')}")
            else:
                raise CnpsfsError(f"merged /usr: {where}/{name.decode(errors='replace')} exists both in / and /usr")
        return self._store_dir(into, children)

    def _relink_tree(self, entry: fmt.Entry) -> fmt.Entry:
        """Hard-link references name a path in the FileSet; moved paths get ``usr/`` in front."""
        children = {}
        changed = False
        for name, child in self._dir(entry).items():
            new = self._relink_tree(child) if child.kind is fmt.Kind.DIR else _relink(child)
            changed |= new != child
            children[name] = new
        return self._store_dir(entry, children) if changed else entry

    def has_hardlinks(self, entry: fmt.Entry) -> bool:
        for child in self._dir(entry).values():
            if child.link is not None or (child.kind is fmt.Kind.DIR and self.has_hardlinks(child)):
                return True
        return False

    def merged_view(self, fs: fmt.FileSet, source: bytes) -> fmt.FileSet | None:
        """The package's tree with /bin, /sbin, /lib* moved under /usr, or None if it has none."""
        root = self._dir(fs.root)
        moving = {n: e for n, e in root.items() if n in MERGED and e.kind is fmt.Kind.DIR}
        if not moving:
            return None
        usr = root.pop(b"usr", None) or fmt.Entry(b"usr", fmt.Kind.DIR, 0o755, 0, 0, fs.root.mtime_ns)
        if usr.tree is None:
            usr = self._store_dir(usr, {})
        for name, entry in sorted(moving.items()):
            del root[name]
            usr_children = self._dir(usr)
            if name in usr_children:
                usr_children[name] = self._merge(usr_children[name], entry, f"/usr/{name.decode()}")
            else:
                usr_children[name] = entry
            usr = self._store_dir(usr, usr_children)
        root[b"usr"] = usr
        new_root = self._store_dir(fs.root, root)
        if self.has_hardlinks(new_root):
            new_root = self._relink_tree(new_root)
        metadata = dict(fs.metadata)
        metadata["cnpsfs"] = {"view": "merged-usr", "of": fmt.format_digest(source)}
        return fmt.FileSet(fs.name, fs.version, new_root, metadata)

    def symlink_tree(self, arch: str, mtime_ns: int) -> fmt.Entry:
        """The root directory of the symlink layer: bin, sbin, lib and the arch's lib64."""
        links = [b"bin", b"sbin", b"lib"] + ([b"lib64"] if arch in ("amd64", "arm64", "ppc64el", "s390x") else [])
        entries = [fmt.Entry(name, fmt.Kind.SYMLINK, 0o777, 0, 0, mtime_ns, target=b"usr/" + name)
                   for name in links]
        usr = fmt.Entry(b"usr", fmt.Kind.DIR, 0o755, 0, 0, mtime_ns)
        usr_children = {name: self._store_dir(fmt.Entry(name, fmt.Kind.DIR, 0o755, 0, 0, mtime_ns), {})
                        for name in links}
        entries.append(self._store_dir(usr, usr_children))
        return self._store_dir(fmt.Entry(b"", fmt.Kind.DIR, 0o755, 0, 0, mtime_ns), {e.name: e for e in entries})


def _relink(entry: fmt.Entry) -> fmt.Entry:
    if entry.link is not None and entry.link[0].split(b"/", 1)[0] in MERGED:
        return dataclasses.replace(entry, link=(b"usr/" + entry.link[0], entry.link[1]))
    return entry
