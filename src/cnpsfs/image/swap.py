"""Live generation swaps: prepare a new composition beside the current one, then diff.

Preparing walks both generations together from the root, skipping every directory
whose composition signature is unchanged (same layers, same tree digests): such a
subtree is shared, not read. So the cost of a swap grows with the size of the change,
not of the image. The walk

* composes every changed directory of the new generation and checks it (a union
  conflict, a missing directory object or a missing chunk of a changed file fails the
  swap before anything is installed), and
* lists what the kernel must forget: the directories whose listing or attributes
  changed, and the names whose inode changed, but only where the old generation was
  loaded, because the kernel cannot cache what it never looked up.

Once the walk is done the new generation needs nothing more from the old one (every
directory the old one had loaded is now shared or composed anew), so it lets go of it,
and the inode table drops the keys of nodes neither the new tree nor the kernel holds:
what a mount keeps does not grow with the number of swaps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, MissingObjectError
from cnpsfs.image.view import Children, Generation, signature
from cnpsfs.image.walk import changed_dirs
from cnpsfs.store import Store


@dataclass(slots=True)
class SwapPlan:
    """What installing the new generation requires the kernel to forget."""

    dirs: list[int] = field(default_factory=list)  # invalidate_inode: listing and attributes
    entries: list[tuple[int, bytes]] = field(default_factory=list)  # invalidate_entry(parent, name)
    changed_dirs: int = 0
    shared_dirs: int = 0
    dropped_keys: int = 0  # inode table keys of nodes nothing holds any more


def prepare(old: Generation, new: Generation, *, held: Iterable[int] | None = None) -> SwapPlan:
    """Check the new generation where it differs and compute the invalidations.

    With *held*, the inode numbers the kernel still holds (lookups not yet forgotten),
    the inode table is swept if that is due; their keys are kept, so a name that comes
    back gets its old number. Without, no sweep (the caller had no snapshot to give).

    Directories are compared on their packed children (names, inode numbers, records)
    without making a node or an entry per name; the chunks of the files to check are
    looked up in the store once for the whole swap.
    """
    plan = SwapPlan()
    chunks = _Chunks(new.store)
    for pair in changed_dirs(old, new):
        old_node, new_node = pair.old, pair.new
        if not pair.changed:
            plan.shared_dirs += 1
            if old_node is not None and old_node.children is not None:
                new.load_children(new_node)  # shares the old children, reads nothing
            continue
        plan.changed_dirs += 1
        if old_node is not None and old_node.children is None \
                and old.inodes.remembers((old_node.path, signature(old_node, old.mode))):
            # Composed before and let go of (the kernel forgot it): again, with the numbers
            # it had, so unchanged files keep theirs. Reads what a changed directory costs.
            old.load_children(old_node)
        new_children = new.load_children(new_node)
        # Loaded before the walk (it loads old directories only to pair their children):
        # only what the kernel may have looked up needs invalidating.
        old_children = old_node.children if old_node is not None else None
        if old_node is None or old_children is None:
            chunks.add(new_children, None, None)
            continue
        # Old index by name; None when both list the same names (most changed directories
        # of an upgrade), so index i is the same name on both sides.
        old_pos = None if old_children.names == new_children.names else old_children.positions()
        chunks.add(new_children, old_children, old_pos)
        _diff(plan, old_node.ino, old_children, old_pos, new_children)
    chunks.check()
    new.previous = None
    if held is not None and new.inodes.sweep_due():
        plan.dropped_keys = new.inodes.retain(new.loaded_inodes() | set(held))
    return plan


def _diff(plan: SwapPlan, parent: int, old: Children, old_pos: dict[bytes, int] | None, new: Children) -> None:
    """What the kernel must forget of a directory it may have seen: names whose number
    changed or that went or came, and subdirectories whose attributes changed.
    *old_pos*: the old directory's index by name, None if it has the new one's names."""
    plan.dirs.append(parent)
    old_inos, new_inos = old.inos, new.inos
    entries = plan.entries
    if old_pos is None:
        if old_inos != new_inos:
            names = old.names
            entries.extend((parent, names[i]) for i in range(len(names)) if old_inos[i] != new_inos[i])
        for i, new_child in new.dirs.items():
            old_child = old.dirs.get(i)
            if old_child is not None and old_inos[i] == new_inos[i] and new_child is not old_child and (
                    new_child.attr is None or old_child.attr is None or new_child.entry != old_child.entry):
                plan.dirs.append(old_child.ino)
        return
    new_pos = new.positions()
    for j, name in enumerate(old.names):
        at = new_pos.get(name)
        if at is None or new_inos[at] != old_inos[j]:
            entries.append((parent, name))
    for i, new_child in new.dirs.items():
        was = old_pos.get(new.names[i])
        if was is None or old_inos[was] != new_inos[i]:
            continue  # a new name (invalidated as one below) or another inode (above)
        old_child = old.dirs.get(was)
        if old_child is not None and new_child is not old_child and (
                new_child.attr is None or old_child.attr is None or new_child.entry != old_child.entry):
            plan.dirs.append(old_child.ino)
    # New names: the kernel may hold a cached negative lookup for them.
    entries.extend((parent, name) for name in new.names if name not in old_pos)


class _Chunks:
    """Every chunk of a new or changed file must be in the store before we switch to it.

    A file is skipped when the old generation's directory, loaded, shows the same inode
    there (the same object as before: already known to be readable); the others' chunk
    digests are gathered from their records (or extents) and looked up in one has-many
    at the end, which names the first file, in walk order, that lacks one.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.wanted: dict[bytes, tuple[Children, int]] = {}  # digest -> first file that needs it

    def add(self, children: Children, old: Children | None, old_pos: dict[bytes, int] | None) -> None:
        """The files of *children* to check; *old*: the old directory, loaded (*old_pos* as
        for :func:`_diff`), else every file with data is checked."""
        wanted = self.wanted
        names, inos = children.names, children.inos
        old_inos = old.inos if old is not None else None

        def unchanged(i: int) -> bool:
            if old_inos is None:
                return False
            j = i if old_pos is None else old_pos.get(names[i])
            return j is not None and old_inos[j] == inos[i]

        for i, digest in children.packed_chunks():
            if old_inos is not None and unchanged(i):
                continue
            if digest not in wanted:
                wanted[digest] = (children, i)
        for i, entry in children.extras.items():
            if entry.kind is not fmt.Kind.FILE or not entry.size or unchanged(i):
                continue
            for digest in self._digests(children, i):
                if digest not in wanted:
                    wanted[digest] = (children, i)

    def _digests(self, children: Children, i: int) -> set[bytes]:
        try:
            extents = self.store.file_extents(children.entry_at(i))
        except MissingObjectError as exc:
            raise CnpsfsError(f"{fmt.show_path((*children.path, children.names[i]))}: {exc}") from None
        return {e.digest for e in extents if e.digest is not None}

    def check(self) -> None:
        wanted = self.wanted
        if not wanted:
            return
        missing = wanted.keys() - self.store.existing(wanted)
        if not missing:
            return
        children, i = next(wanted[d] for d in wanted if d in missing)
        lacks = len(self._digests(children, i) & missing) if i in children.extras else 1
        raise CnpsfsError(f"{fmt.show_path((*children.path, children.names[i]))}: {lacks} chunk(s) missing from "
                          f"the store, e.g. {fmt.format_digest(next(d for d in wanted if d in missing))}")
