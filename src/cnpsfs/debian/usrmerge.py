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

from .. import format as fmt
from ..errors import CnpsfsError
from ..store import Store, StoreWriter

MERGED = (b"bin", b"sbin", b"lib", b"lib32", b"lib64", b"libx32", b"libo32")


#: Directories written by a writer that has not committed yet are not readable from the
#: store; they are remembered here (by digest: identical content, identical children).
_PENDING: dict[bytes, dict[bytes, fmt.Entry]] = {}


def _dir(store: Store, entry: fmt.Entry) -> dict[bytes, fmt.Entry]:
    assert entry.tree is not None
    pending = _PENDING.get(entry.tree)
    if pending is not None:
        return dict(pending)
    return {e.name: e for e in store.get_directory(entry.tree).entries}


def _store_dir(writer: StoreWriter, entry: fmt.Entry, children: dict[bytes, fmt.Entry]) -> fmt.Entry:
    digest = writer.add_object(fmt.encode_directory(fmt.Directory(list(children.values()))))
    _PENDING[digest] = dict(children)
    return dataclasses.replace(entry, tree=digest)


def _merge(store: Store, writer: StoreWriter, into: fmt.Entry, other: fmt.Entry, where: str) -> fmt.Entry:
    """Merge directory *other* into directory *into* (which keeps its metadata)."""
    children = _dir(store, into)
    for name, entry in _dir(store, other).items():
        have = children.get(name)
        if have is None:
            children[name] = entry
        elif have.kind is fmt.Kind.DIR and entry.kind is fmt.Kind.DIR:
            children[name] = _merge(store, writer, have, entry, f"{where}/{name.decode(errors='replace')}")
        else:
            raise CnpsfsError(f"merged /usr: {where}/{name.decode(errors='replace')} exists both in / and /usr")
    return _store_dir(writer, into, children)


def _relink(entry: fmt.Entry) -> fmt.Entry:
    if entry.link is not None and entry.link[0].split(b"/", 1)[0] in MERGED:
        return dataclasses.replace(entry, link=(b"usr/" + entry.link[0], entry.link[1]))
    return entry


def _relink_tree(store: Store, writer: StoreWriter, entry: fmt.Entry) -> fmt.Entry:
    """Hard-link references name a path in the FileSet; moved paths get ``usr/`` in front."""
    children = {}
    changed = False
    for name, child in _dir(store, entry).items():
        new = _relink_tree(store, writer, child) if child.kind is fmt.Kind.DIR else _relink(child)
        changed |= new != child
        children[name] = new
    return _store_dir(writer, entry, children) if changed else entry


def has_hardlinks(store: Store, entry: fmt.Entry) -> bool:
    for child in _dir(store, entry).values():
        if child.link is not None or (child.kind is fmt.Kind.DIR and has_hardlinks(store, child)):
            return True
    return False


def merged_view(store: Store, writer: StoreWriter, fs: fmt.FileSet, source: bytes) -> fmt.FileSet | None:
    """The package's tree with /bin, /sbin, /lib* moved under /usr, or None if it has none."""
    root = _dir(store, fs.root)
    moving = {n: e for n, e in root.items() if n in MERGED and e.kind is fmt.Kind.DIR}
    if not moving:
        return None
    usr = root.pop(b"usr", None) or fmt.Entry(b"usr", fmt.Kind.DIR, 0o755, 0, 0, fs.root.mtime_ns)
    if usr.tree is None:
        usr = _store_dir(writer, usr, {})
    for name, entry in sorted(moving.items()):
        del root[name]
        usr_children = _dir(store, usr)
        if name in usr_children:
            usr_children[name] = _merge(store, writer, usr_children[name], entry, f"/usr/{name.decode()}")
        else:
            usr_children[name] = entry
        usr = _store_dir(writer, usr, usr_children)
    root[b"usr"] = usr
    new_root = _store_dir(writer, fs.root, root)
    if has_hardlinks(store, new_root):
        new_root = _relink_tree(store, writer, new_root)
    metadata = dict(fs.metadata)
    metadata["cnpsfs"] = {"view": "merged-usr", "of": fmt.format_digest(source)}
    return fmt.FileSet(fs.name, fs.version, new_root, metadata)


def symlink_tree(writer: StoreWriter, arch: str, mtime_ns: int) -> fmt.Entry:
    """The root directory of the symlink layer: bin, sbin, lib and the arch's lib64."""
    links = [b"bin", b"sbin", b"lib"] + ([b"lib64"] if arch in ("amd64", "arm64", "ppc64el", "s390x") else [])
    entries = [fmt.Entry(name, fmt.Kind.SYMLINK, 0o777, 0, 0, mtime_ns, target=b"usr/" + name) for name in links]
    usr = fmt.Entry(b"usr", fmt.Kind.DIR, 0o755, 0, 0, mtime_ns)
    usr_children = {}
    for name in links:
        usr_children[name] = _store_dir(writer, fmt.Entry(name, fmt.Kind.DIR, 0o755, 0, 0, mtime_ns), {})
    entries.append(_store_dir(writer, usr, usr_children))
    return _store_dir(writer, fmt.Entry(b"", fmt.Kind.DIR, 0o755, 0, 0, mtime_ns), {e.name: e for e in entries})


def clear_pending() -> None:
    """Forget written directories once their writer committed (they are in the store now)."""
    _PENDING.clear()
