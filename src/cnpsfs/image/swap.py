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
from cnpsfs.image.view import Generation, Node, signature
from cnpsfs.image.walk import changed_dirs


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
    """
    plan = SwapPlan()
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
        _check_files(new, new_children.values(), old_node)
        # Loaded before the walk (it loads old directories only to pair their children):
        # only what the kernel may have looked up needs invalidating.
        if old_node is not None and old_node.children is not None:
            old_children = old_node.children
            plan.dirs.append(old_node.ino)
            for name, old_child in old_children.items():
                new_child = new_children.get(name)
                if new_child is None or new_child.ino != old_child.ino:
                    plan.entries.append((old_node.ino, name))
                elif (new_child.is_dir and new_child is not old_child
                      and (new_child.attr is None or old_child.attr is None or new_child.entry != old_child.entry)):
                    plan.dirs.append(old_child.ino)
            # New names: the kernel may hold a cached negative lookup for them.
            plan.entries.extend((old_node.ino, name) for name in new_children if name not in old_children)
    new.previous = None
    if held is not None and new.inodes.sweep_due():
        plan.dropped_keys = new.inodes.retain(new.loaded_inodes() | set(held))
    return plan


def _check_files(new: Generation, children: object, old_parent: Node | None) -> None:
    """Every chunk of a new or changed file must be in the store before we switch to it."""
    store = new.store
    old_children = old_parent.children if old_parent is not None else None
    for child in children:  # type: ignore[attr-defined]
        if child.entry.kind is not fmt.Kind.FILE or not child.entry.size:
            continue
        if old_children is not None:
            previous = old_children.get(child.entry.name)
            if previous is not None and previous.ino == child.ino:
                continue  # same object as before: already known to be readable
        try:
            extents = store.file_extents(child.entry)
        except MissingObjectError as exc:
            raise CnpsfsError(f"{fmt.show_path(child.path)}: {exc}") from None
        digests = {e.digest for e in extents if e.digest is not None}
        missing = digests - store.existing(digests)
        if missing:
            raise CnpsfsError(f"{fmt.show_path(child.path)}: {len(missing)} chunk(s) missing from the store, "
                              f"e.g. {fmt.format_digest(next(iter(missing)))}")
