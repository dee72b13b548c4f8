"""Walking a stored tree: path lookup and canonical iteration over directory objects."""

from __future__ import annotations

from collections.abc import Iterator

from cnpsfs import format as fmt
from cnpsfs.errors import NotFoundError
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
            raise NotFoundError(f"{_show(parts[:depth])} is not a directory")
        found = next((e for e in store.get_directory(entry.tree).entries if e.name == part), None)
        if found is None or found.kind is fmt.Kind.WHITEOUT:
            raise NotFoundError(f"no such path: /{_show(parts[: depth + 1])}")
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


def _show(parts: tuple[bytes, ...]) -> str:
    return "/".join(p.decode("utf-8", "backslashreplace") for p in parts)
