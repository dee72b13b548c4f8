"""Walking trees: a stored tree (path lookup, canonical iteration over directory
objects), and two compositions side by side (what changed from one to the other)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from cnpsfs import format as fmt
from cnpsfs.errors import NotFoundError
from cnpsfs.image.view import Children, Generation, Node, signature
from cnpsfs.store import Store


def split(path: str | bytes) -> tuple[bytes, ...]:
    raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
    return tuple(p for p in raw.split(b"/") if p not in (b"", b"."))


def lookup(store: Store, root: fmt.Entry, path: str | bytes) -> fmt.Entry:
    """The entry at *path* inside the tree whose root entry is *root*."""
    entry = root
    parts = split(path)
    for depth, part in enumerate(parts):
        if entry.kind is not fmt.Kind.DIR or entry.tree is None:
            raise NotFoundError(f"{fmt.show_path(parts[:depth])} is not a directory")
        found = next((e for e in store.get_directory(entry.tree).entries if e.name == part), None)
        if found is None or found.kind is fmt.Kind.WHITEOUT:
            raise NotFoundError(f"no such path: {fmt.show_path(parts[: depth + 1])}")
        entry = found
    return entry


def walk(store: Store, root: fmt.Entry) -> Iterator[tuple[tuple[bytes, ...], fmt.Entry, bool]]:
    """Yield ``(path parts, entry, opaque)`` in canonical pre-order; *opaque* for directories."""
    stack: list[tuple[tuple[bytes, ...], fmt.Entry]] = [((), root)]
    while stack:
        parts, entry = stack.pop()
        if entry.kind is fmt.Kind.DIR and entry.tree is not None:
            directory = store.get_directory(entry.tree)
            yield parts, entry, directory.opaque
            for child in reversed(directory.entries):
                stack.append(((*parts, child.name), child))
        else:
            yield parts, entry, False


@dataclass(slots=True)
class DirPair:
    """One directory path in two generations, as :func:`changed_dirs` visits it."""

    path: tuple[bytes, ...]  # carried along: a node's own path is its first hard link's
    old: Node | None  # None: the old generation has no directory there
    new: Node
    changed: bool = True  # False: same node or same signature, so the same subtree


def changed_dirs(old: Generation, new: Generation, *, into_added: bool = True) -> Iterator[DirPair]:
    """Walk two generations side by side from the root, each directory before its children.

    A pair whose composition signature is equal (same layers, placements and tree
    digests: the same subtree) is yielded with ``changed=False`` and not entered, so the
    walk costs what changed, not the size of the image; this is what live swaps (which
    check and invalidate only there) and ``cnpsfs diff`` (which reports only there) share.

    Children are composed only after the consumer has seen a pair, so it can tell what
    was loaded before the walk: the new directory's always, the old one's only to pair
    child directories by name. Directories only the new generation has are entered too
    (with ``old=None``) unless *into_added* is false.
    """
    stack = [DirPair((), old.root, new.root)]
    while stack:
        pair = stack.pop()
        was = pair.old
        pair.changed = not (was is pair.new or (was is not None
                                                and signature(was, old.mode) == signature(pair.new, new.mode)))
        yield pair
        if not pair.changed:
            continue
        old_children: Children | None = None
        for child in new.load_children(pair.new).dirs.values():
            name = child.path[-1]
            counterpart = None
            if was is not None:
                if old_children is None:
                    old_children = old.load_children(was)
                index = old_children.index(name)
                counterpart = old_children.dirs.get(index) if index is not None else None
            if counterpart is not None or into_added:
                stack.append(DirPair((*pair.path, name), counterpart, child))
