"""Swap preparation over packed directories, in-process (no FUSE): what changes between two
generations (deleted, added and type-changed names, hard links, whiteouts and opaque
directories in layers mode, unions), checked against a fresh composition of the new image
and against the diff computed the plain way, through the ``Mapping`` face of the packed
children (the way ``swap.prepare`` did before it compared records).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from mountutil import manifest_text
from test_compose import WH, D, F, H, L, make_fileset
from test_ops_inprocess import drop_rows

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.image.manifest import compose, image_from_manifest, parse_manifest
from cnpsfs.image.swap import SwapPlan, prepare
from cnpsfs.image.view import Children, Generation, Node, identity
from cnpsfs.store import LocalStore, Store


@pytest.fixture
def store(tmp_path: Any) -> Any:
    s = LocalStore(tmp_path / "store", create=True)
    try:
        yield s
    finally:
        s.close()


def image(store: Store, layers: Sequence[Mapping[str, Any] | str], mode: str | None, version: str) -> fmt.Image:
    spec = parse_manifest(manifest_text("example.org/image", layers, mode=mode, version=version), "t.toml")
    return image_from_manifest(store, spec, "t.toml")


def walk(gen: Generation) -> dict[tuple[bytes, ...], Node]:
    return dict(gen.walk())


def row(gen: Generation, node: Node) -> tuple[Any, ...]:
    """What a path shows, with the FileSet that provides it (directories: their sources')."""
    provider = node.layer.fileset if node.layer is not None else tuple(sorted(s.layer.fileset for s in node.sources))
    return (node.entry.kind, identity(node.entry), node.entry.extents, node.nlink, node.size, provider)


def reference_invalidations(old: Generation, old_loaded: dict[int, Children], new: Generation,
                            plan: SwapPlan) -> tuple[set[tuple[int, bytes]], set[int]]:
    """The names and directories a swap must invalidate, computed name by name through
    the Mapping face of the old directories the kernel could have seen (those loaded
    before the swap) and of their new counterparts."""
    entries: set[tuple[int, bytes]] = set()
    dirs: set[int] = set()
    for ino, old_children in old_loaded.items():
        new_node = new.nodes.get(ino)
        if new_node is None or new_node.children is None:
            continue  # gone from the new tree, or shared unread (then unchanged)
        new_children = new_node.children
        if new_children is old_children:
            continue
        dirs.add(ino)
        for name, old_child in old_children.items():
            new_child = new_children.get(name)
            if new_child is None or new_child.ino != old_child.ino:
                entries.add((ino, name))
            elif new_child.is_dir and new_child is not old_child and (
                    new_child.attr is None or old_child.attr is None or new_child.entry != old_child.entry):
                dirs.add(old_child.ino)
        entries.update((ino, name) for name in new_children if name not in old_children)
    return entries, dirs


def swap(store: Store, old_image: fmt.Image, new_image: fmt.Image, *, load_old: bool = True,
         hold: Sequence[str] = ()) -> tuple[Generation, Generation, SwapPlan, dict[tuple[bytes, ...], Node],
                                            dict[str, int]]:
    """Compose the old image (fully loaded, or not), let the "kernel" hold the files *hold*,
    swap to the new one and check what must hold of any swap; returns both generations,
    the plan, the old tree as it was and the held numbers."""
    old = compose(store, old_image)
    before = walk(old) if load_old else {}
    held: dict[str, int] = {}
    for path in hold:
        node = old.resolve(path)
        where = old.inodes.locate(node.ino)
        assert where is not None
        old.inodes.count(node.ino, where[0], where[1], 2)
        held[path] = node.ino
    loaded = {ino: node.children for ino, node in old.nodes.items() if node.children is not None}
    new = compose(store, new_image, old.inodes, number=2, previous=old)
    plan = prepare(old, new)
    new.install(old)
    fresh = compose(store, new_image)
    after, expected = walk(new), walk(fresh)
    # The new tree is the new image's, provider included: nothing from the old generation.
    assert after.keys() == expected.keys()
    for path, node in after.items():
        assert row(new, node) == row(fresh, expected[path]), path
        # Every number answers with this generation's entry.
        if not node.is_dir:
            located = new.node(node.ino)
            assert located is not None and identity(located.entry) == identity(node.entry), path
    # Numbers: a directory keeps its path's; a file without hard links keeps its number
    # exactly when it is the same file at the same path (if the old one was loaded).
    old_numbers = {n.ino for n in before.values()}
    for path, node in after.items():
        was = before.get(path)
        if was is None:
            continue
        if node.is_dir and was.is_dir:
            assert node.ino == was.ino, path
        elif not node.is_dir and not was.is_dir and node.entry.link is None and was.entry.link is None:
            same = identity(node.entry) == identity(was.entry)
            assert (node.ino == was.ino) == same, path
    for path, node in after.items():
        if path not in before or before[path].ino != node.ino:
            assert node.is_dir or node.entry.link is not None or node.ino not in old_numbers, path
    # The invalidations are what the name-by-name diff finds.
    entries, dirs = reference_invalidations(old, loaded, new, plan)
    assert set(plan.entries) == entries
    assert set(plan.dirs) == dirs
    assert len(plan.entries) == len(set(plan.entries))
    # What the kernel held still answers, with what it held: unchanged files from the new
    # directory (their counts moved along), the others from the old one, with old content.
    for path, ino in held.items():
        parts = tuple(path.strip("/").encode().split(b"/"))
        assert new.inodes.held_count(ino) == 2, path
        node = new.node(ino)
        assert node is not None and identity(node.entry) == identity(before[parts].entry), path
        if parts in after and after[parts].ino == ino:  # kept: counted where the new tree shows it
            where = new.inodes.locate(ino)
            assert where is not None and where[0] is new.resolve("/" + path.strip("/").rsplit("/", 1)[0]).children
    # ... and is listed as held (what drop_kernel_caches invalidates, what status counts).
    assert {ino for ino, _parent, _name in new.inodes.held_files()} == set(held.values())
    assert new.inodes.stats()["references"] == 2 * len(held)
    return old, new, plan, before, held


# --------------------------------------------------------------------------- layers mode


def test_layers_deleted_added_and_type_changed_names(store: Store) -> None:
    base = make_fileset(store, "base", {
        "etc/keep": "keep\n", "etc/gone": "gone\n", "etc/changes": "v1\n", "etc/becomes-dir": "file\n",
        "etc/dir-becomes-link/inner": "x\n", "etc/link": L("keep"), "usr/bin/tool": "tool\n",
        **{f"usr/share/many/f{i:02d}": f"{i}\n" for i in range(30)}})
    top1 = make_fileset(store, "top", {"etc/added-by-top": "top1\n"})
    top2 = make_fileset(store, "top", {
        "etc/gone": WH, "etc/changes": "v2\n", "etc/becomes-dir/now": "inside\n",
        "etc/dir-becomes-link": L("keep"), "etc/new": "new\n", "etc/link": L("changes"),
        "usr/share/many/f07": "seven, changed\n", "usr/share/many/f31": "added\n"}, version="2")
    old, new, plan, _before, _held = swap(store, image(store, [base, top1], None, "1"),
                                          image(store, [base, top2], None, "2"),
                                          hold=["/etc/keep", "/etc/gone", "/usr/share/many/f07", "/usr/share/many/f08"])
    assert plan.changed_dirs >= 4  # /, /etc, /usr, /usr/share, /usr/share/many
    etc = new.resolve("/etc").ino
    assert {(etc, b"gone"), (etc, b"new"), (etc, b"becomes-dir"), (etc, b"dir-becomes-link"),
            (etc, b"link")} <= set(plan.entries)
    assert (etc, b"keep") not in plan.entries
    # /usr/share/many changed two of 31 names: it took the old directory's block over.
    many_old, many_new = old.resolve("/usr/share/many").children, new.resolve("/usr/share/many").children
    assert many_old is not None and many_new is not None and many_new is not many_old
    assert many_new.base == many_old.base


def test_layers_opaque_directory_and_hard_links(store: Store) -> None:
    base = make_fileset(store, "base", {"opt/app/a": "a\n", "opt/app/b": "b\n", "srv/x": "x\n"})
    top1 = make_fileset(store, "top", {"srv/data": "data\n", "srv/data-link": H("srv/data"), "srv/other": "o\n"})
    top2 = make_fileset(store, "top", {"opt/app/c": "c\n", "srv/data": "data\n", "srv/data-link": H("srv/data"),
                                       "srv/other": "o, changed\n"}, opaque=["opt/app"], version="2")
    old, new, _plan, _before, _held = swap(store, image(store, [base, top1], None, "1"),
                                           image(store, [base, top2], None, "2"), hold=["/srv/x", "/opt/app/a"])
    assert sorted(new.load_children(new.resolve("/opt/app"))) == [b"c"]
    link = new.resolve("/srv/data-link")
    assert link.ino == new.resolve("/srv/data").ino and link.nlink == 2
    assert link.ino != old.resolve("/srv/data").ino  # another FileSet's link group


def test_layers_cold_swap_checks_and_numbers_everything_anew(store: Store) -> None:
    base = make_fileset(store, "base", {f"d/f{i}": f"{i}\n" for i in range(20)})
    top = make_fileset(store, "top", {"d/f3": "changed\n", "d/f99": WH}, version="2")
    _old, new, plan, _before, _held = swap(store, image(store, [base], None, "1"),
                                           image(store, [base, top], None, "2"), load_old=False)
    assert plan.entries == [] and plan.dirs == []  # the kernel saw nothing
    assert len(new.load_children(new.resolve("/d"))) == 20


# --------------------------------------------------------------------------- union mode


def test_union_package_upgrade(store: Store) -> None:
    def pkg(n: int, version: int) -> str:
        files: dict[str, Any] = {f"usr/share/pkg{n}/f{i:02d}": f"pkg{n} {i}\n" for i in range(40)}
        files[f"usr/share/pkg{n}/f00"] = f"pkg{n} version {version}\n"
        files[f"usr/bin/pkg{n}"] = F(f"#!/bin/sh\necho {version}\n", mode=0o755)
        if version == 1:
            files[f"usr/share/pkg{n}/only-v1"] = "old\n"
            files[f"usr/lib/pkg{n}.so"] = "lib\n"
        else:
            files[f"usr/share/pkg{n}/only-v2"] = "new\n"
            files[f"usr/lib/pkg{n}"] = D()  # a file became a directory (another name)
            files[f"usr/lib/pkg{n}.so"] = L(f"pkg{n}/real.so")  # and a file became a symlink
            files[f"usr/lib/pkg{n}/real.so"] = "lib\n"
        return make_fileset(store, f"pkg{n}", files, version=str(version))

    v1 = [pkg(n, 1) for n in range(4)]
    v2 = [pkg(0, 2), *v1[1:]]
    hold = ["/usr/share/pkg0/f00", "/usr/share/pkg0/f01", "/usr/share/pkg0/only-v1", "/usr/share/pkg1/f00"]
    old, new, plan, before, _held = swap(store, image(store, v1, "union", "1"), image(store, v2, "union", "2"),
                                         hold=hold)
    share = new.resolve("/usr/share/pkg0").ino
    assert {(share, b"f00"), (share, b"only-v1"), (share, b"only-v2")} <= set(plan.entries)
    assert (share, b"f01") not in plan.entries
    # The other packages' directories are shared, unread; pkg0's took its old block over.
    assert new.resolve("/usr/share/pkg1").children is old.resolve("/usr/share/pkg1").children
    children = new.resolve("/usr/share/pkg0").children
    assert children is not None and children.base == before[(b"usr", b"share", b"pkg0")].children.base  # type: ignore[union-attr]
    assert new.resolve("/usr/share/pkg0/f01").layer.fileset == new.layers[0].fileset  # type: ignore[union-attr]
    # Back to the old image: what was there before comes back with the numbers... of
    # the generation it replaces where unchanged, and fresh ones where it changed.
    back = compose(store, image(store, v1, "union", "1"), new.inodes, number=3, previous=new)
    walk(new)
    prepare(new, back)
    back.install(new)
    assert back.resolve("/usr/share/pkg0/f01").ino == before[(b"usr", b"share", b"pkg0", b"f01")].ino
    assert back.resolve("/usr/share/pkg0/f00").ino != before[(b"usr", b"share", b"pkg0", b"f00")].ino
    assert back.inodes.held_count(before[(b"usr", b"share", b"pkg0", b"f01")].ino) == 2


def test_union_missing_chunk_of_a_changed_file_fails_the_swap(store: Store) -> None:
    a1 = make_fileset(store, "a", {"usr/share/a/f": "one\n", "usr/share/a/g": "same\n"})
    a2 = make_fileset(store, "a", {"usr/share/a/f": "two, missing\n", "usr/share/a/g": "same\n"}, version="2")
    b = make_fileset(store, "b", {"usr/share/b/f": "b\n"})
    old = compose(store, image(store, [a1, b], "union", "1"))
    old.check()
    new_image = image(store, [a2, b], "union", "2")
    entry = compose(store, new_image).resolve("/usr/share/a/f").entry
    digests = [e.digest for e in store.file_extents(entry) if e.digest is not None]
    assert isinstance(store, LocalStore)
    drop_rows(store, digests)
    new = compose(store, new_image, old.inodes, number=2, previous=old)
    with pytest.raises(CnpsfsError, match=r"^/usr/share/a/f: 1 chunk\(s\) missing from the store"):
        prepare(old, new)
