"""Composition rules, in-process (no FUSE): FileSets built with the importer's TreeBuilder,
images from manifest text, trees read through Generation.resolve/walk.

docs/manifest.md is the specification these tests check.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import Cli
from mountutil import manifest_text

from cnpsfs import format as fmt
from cnpsfs.errors import ConflictError, NotFoundError, UsageError
from cnpsfs.image.manifest import compose, image_from_manifest, parse_manifest
from cnpsfs.image.view import Generation, Node
from cnpsfs.image.walk import changed_dirs
from cnpsfs.ingest.tree import ImportOptions, TreeBuilder, write_fileset
from cnpsfs.store import Store

T = 1_700_000_000_000_000_000


# --------------------------------------------------------------------------- building FileSets


@dataclass(frozen=True)
class F:
    """A regular file."""

    data: bytes | str = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = T
    xattrs: Mapping[bytes, bytes] | None = None


@dataclass(frozen=True)
class D:
    """A directory (parents not listed are implicit: 0755, root, mtime 0)."""

    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = T
    xattrs: Mapping[bytes, bytes] | None = None


@dataclass(frozen=True)
class L:
    """A symlink."""

    target: str
    mtime: int = T


@dataclass(frozen=True)
class H:
    """A hard link to an earlier path of the same FileSet."""

    to: str


WH = object()  # a whiteout


@dataclass
class _Data:
    data: bytes

    def read_all(self) -> bytes:
        return self.data

    def pieces(self) -> Iterator[bytes]:
        yield self.data


def _parts(path: str) -> tuple[bytes, ...]:
    return tuple(p.encode("utf-8", "surrogateescape") for p in path.split("/") if p)


def make_fileset(store: Store, name: str, spec: Mapping[str, Any], *, opaque: Sequence[str] = (),
                 root: D = D(), version: str = "1") -> str:
    """Store a FileSet ``example.org/NAME@VERSION`` from *spec* (path -> F/D/L/H/WH/bytes/str)."""
    builder = TreeBuilder(ImportOptions(name=f"example.org/{name}", version=version), source_name=name)
    builder.set_root(fmt.Entry(b"", fmt.Kind.DIR, root.mode, root.uid, root.gid, root.mtime,
                               dict(root.xattrs or {})))
    groups: dict[str, object] = {}
    for path, value in spec.items():
        parts = _parts(path)
        if isinstance(value, (bytes, str)):
            value = F(value)
        source = None
        group = None
        if isinstance(value, F):
            data = value.data.encode() if isinstance(value.data, str) else value.data
            entry = fmt.Entry(b"", fmt.Kind.FILE, value.mode, value.uid, value.gid, value.mtime,
                              dict(value.xattrs or {}), size=len(data))
            source = _Data(data)
            group = groups.setdefault(path, object())
        elif isinstance(value, D):
            entry = fmt.Entry(b"", fmt.Kind.DIR, value.mode, value.uid, value.gid, value.mtime,
                              dict(value.xattrs or {}))
        elif isinstance(value, L):
            entry = fmt.Entry(b"", fmt.Kind.SYMLINK, 0o777, mtime_ns=value.mtime, target=value.target.encode())
        elif isinstance(value, H):
            first = builder.lookup(_parts(value.to))
            assert first is not None
            src = first.entry
            entry = fmt.Entry(b"", src.kind, src.mode, src.uid, src.gid, src.mtime_ns, dict(src.xattrs), src.size)
            source, group = first.source, groups[value.to]
            first.link_group = group
        elif value is WH:
            entry = fmt.Entry(b"", fmt.Kind.WHITEOUT, 0)
        else:
            raise TypeError(value)
        builder.add(parts, entry, source=source, link_group=group, what=path)
    for path in opaque:
        builder.mark_opaque(_parts(path), path)
    write_fileset(store, builder)
    return f"example.org/{name}@{version}"


def generation(store: Store, layers: Sequence[Mapping[str, Any] | str], *, mode: str | None = None) -> Generation:
    """Compose an image given as manifest layers (references or tables), through the manifest code."""
    spec = parse_manifest(manifest_text("example.org/image", layers, mode=mode), "test.toml")
    return compose(store, image_from_manifest(store, spec, "test.toml"))


Row = tuple[Any, ...]


def tree(gen: Generation) -> dict[str, Row]:
    """The whole composed tree: path -> (kind, mode, uid, gid, mtime, size, hash, target, nlink, xattrs)."""
    out = {}
    for path, node in list(gen.walk()):  # walk first: a directory's nlink is known once its children are
        e = node.entry
        out["/" + "/".join(p.decode("utf-8", "surrogateescape") for p in path)] = (
            e.kind.name, oct(e.mode), e.uid, e.gid, e.mtime_ns, node.size, e.hash, e.target, node.nlink,
            tuple(sorted(e.xattrs.items())))
    return out


def names(gen: Generation, path: str) -> list[str]:
    node = gen.resolve(path)
    return sorted(n.decode() for n in gen.load_children(node))


def read(gen: Generation, path: str) -> bytes:
    node = gen.resolve(path)
    assert node.entry.kind is fmt.Kind.FILE
    return b"".join(gen.store.get(e.digest) [e.offset : e.offset + e.length] if e.digest else bytes(e.length)
                    for e in gen.extent_map(node).extents)


def kind(gen: Generation, path: str) -> str:
    return gen.resolve(path).entry.kind.name


def missing(gen: Generation, path: str) -> bool:
    try:
        gen.resolve(path)
    except NotFoundError:
        return True
    return False


# --------------------------------------------------------------------------- layers mode


def test_layers_merge_directories_and_upper_files_win(store: Store) -> None:
    base = make_fileset(store, "base", {"etc/a": "a1", "etc/b": "b1", "usr/bin/sh": "sh"})
    top = make_fileset(store, "top", {"etc/b": "b2", "etc/c": "c2"})
    gen = generation(store, [base, top])
    assert names(gen, "/") == ["etc", "usr"]
    assert names(gen, "/etc") == ["a", "b", "c"]
    assert (read(gen, "/etc/a"), read(gen, "/etc/b"), read(gen, "/etc/c")) == (b"a1", b"b2", b"c2")
    assert read(gen, "/usr/bin/sh") == b"sh"
    assert gen.layer_for("/etc/b")[1].name == "example.org/top@1"
    assert gen.layer_for("/etc/a")[1].name == "example.org/base@1"


def test_whiteout_hides_a_lower_name(store: Store) -> None:
    base = make_fileset(store, "base", {"etc/a": "a", "etc/b": "b", "var/lib/x/y": "y", "var/lib/z": "z"})
    top = make_fileset(store, "top", {"etc/a": WH, "var/lib/x": WH, "etc/never": WH})
    gen = generation(store, [base, top])
    assert names(gen, "/etc") == ["b"]
    assert names(gen, "/var/lib") == ["z"]
    assert missing(gen, "/etc/a") and missing(gen, "/var/lib/x/y") and missing(gen, "/etc/never")
    assert all(row[0] != "WHITEOUT" for row in tree(gen).values())


def test_whiteout_only_hides_below(store: Store) -> None:
    base = make_fileset(store, "base", {"etc/a": "old"})
    wh = make_fileset(store, "wh", {"etc/a": WH})
    again = make_fileset(store, "again", {"etc/a": "new"})
    assert read(generation(store, [base, wh, again]), "/etc/a") == b"new"
    assert missing(generation(store, [base, again, wh]), "/etc/a")


def test_opaque_directory_hides_everything_below(store: Store) -> None:
    base = make_fileset(store, "base", {"etc/a": "a", "etc/sub/deep": "d", "etc/keep": "k", "other": "o"})
    mid = make_fileset(store, "mid", {"etc/own": "own", "etc/sub/x": "x"}, opaque=["etc"])
    top = make_fileset(store, "top", {"etc/top": "t"})
    gen = generation(store, [base, mid, top])
    assert names(gen, "/etc") == ["own", "sub", "top"]
    assert names(gen, "/etc/sub") == ["x"]
    assert read(gen, "/other") == b"o"


def test_opaque_directory_of_a_lower_layer_is_only_about_lower_layers(store: Store) -> None:
    base = make_fileset(store, "base", {"etc/a": "a"}, opaque=["etc"])
    top = make_fileset(store, "top", {"etc/b": "b"})
    assert names(generation(store, [base, top]), "/etc") == ["a", "b"]


def test_file_replaces_directory(store: Store) -> None:
    base = make_fileset(store, "base", {"x/child": "c", "x/sub/deeper": "d"})
    top = make_fileset(store, "top", {"x": "now a file"})
    gen = generation(store, [base, top])
    assert kind(gen, "/x") == "FILE" and read(gen, "/x") == b"now a file"
    assert missing(gen, "/x/child")
    assert set(tree(gen)) == {"/", "/x"}


def test_directory_replaces_file_and_only_layers_above_contribute(store: Store) -> None:
    base = make_fileset(store, "base", {"x/old": "o"})
    file = make_fileset(store, "file", {"x": "a file", "y": L("x")})
    dir_again = make_fileset(store, "dir", {"x/new": "n", "y/z": "z"})
    more = make_fileset(store, "more", {"x/more": "m"})
    gen = generation(store, [base, file, dir_again, more])
    assert kind(gen, "/x") == "DIR" and kind(gen, "/y") == "DIR"
    assert names(gen, "/x") == ["more", "new"]
    assert names(gen, "/y") == ["z"]


def test_symlink_replaces_directory(store: Store) -> None:
    base = make_fileset(store, "base", {"lib/a": "a"})
    top = make_fileset(store, "top", {"lib": L("usr/lib")})
    gen = generation(store, [base, top])
    assert kind(gen, "/lib") == "SYMLINK" and gen.resolve("/lib").entry.target == b"usr/lib"


def test_merged_directory_shows_topmost_metadata(store: Store) -> None:
    base = make_fileset(store, "base", {"etc": D(0o755, 1, 2, T + 5), "etc/a": "a"},
                        root=D(0o700, mtime=T + 1))
    top = make_fileset(store, "top", {"etc": D(0o750, 3, 4, T + 1, {b"user.x": b"1"}), "etc/b": "b"},
                       root=D(0o755, mtime=T))
    gen = generation(store, [base, top])
    etc = gen.resolve("/etc").entry
    assert (etc.mode, etc.uid, etc.gid, etc.mtime_ns, etc.xattrs) == (0o750, 3, 4, T + 1, {b"user.x": b"1"})
    assert (gen.root.entry.mode, gen.root.entry.mtime_ns) == (0o755, T)


def test_unlinked_layer_is_ignored(store: Store) -> None:
    base = make_fileset(store, "base", {"etc/a": "a", "etc/b": "b"}, root=D(0o755, mtime=T))
    junk = make_fileset(store, "junk", {"etc/a": WH, "etc/junk": "j", "etc": D(0o700)}, opaque=["etc"],
                        root=D(0o700, mtime=T + 99))
    top = make_fileset(store, "top", {"etc/c": "c"}, root=D(0o755, mtime=T))
    with_unlinked = generation(store, [base, {"fileset": junk, "unlinked": True}, top])
    assert tree(with_unlinked) == tree(generation(store, [base, top]))
    assert names(with_unlinked, "/etc") == ["a", "b", "c"]
    assert [layer.name for layer in with_unlinked.layers] == ["example.org/base@1", "example.org/top@1"]


def test_hard_links_share_a_node(store: Store) -> None:
    fs = make_fileset(store, "links", {"a/one": "same", "b/two": H("a/one"), "b/three": H("a/one"), "c": "same"})
    gen = generation(store, [fs])
    one, two, three, c = (gen.resolve(p) for p in ("/a/one", "/b/two", "/b/three", "/c"))
    assert one.ino == two.ino == three.ino != c.ino
    assert (one.nlink, c.nlink) == (3, 1)


# --------------------------------------------------------------------------- `at` placement


def test_at_places_a_fileset_and_synthesises_parents(store: Store) -> None:
    base = make_fileset(store, "base", {"etc/a": "a"})
    app = make_fileset(store, "app", {"bin/app": F("app", 0o755), "share": D(0o700)}, root=D(0o750, 5, 6, T + 7))
    gen = generation(store, [base, {"fileset": app, "at": "/opt//app/"}])
    assert names(gen, "/") == ["etc", "opt"]
    assert names(gen, "/opt") == ["app"]
    opt = gen.resolve("/opt").entry
    assert (opt.kind, opt.mode, opt.uid, opt.gid) == (fmt.Kind.DIR, 0o755, 0, 0)
    app_dir = gen.resolve("/opt/app").entry
    assert (app_dir.mode, app_dir.uid, app_dir.gid, app_dir.mtime_ns) == (0o750, 5, 6, T + 7), \
        "the FileSet's root metadata becomes the `at` directory's"
    assert read(gen, "/opt/app/bin/app") == b"app"
    assert gen.resolve("/opt/app/share").entry.mode == 0o700


def test_at_nested_path_and_two_layers_at_different_places(store: Store) -> None:
    base = make_fileset(store, "base", {"opt": D(0o711, 1, 1, T + 3), "opt/existing": "e"})
    one = make_fileset(store, "one", {"f1": "1"})
    two = make_fileset(store, "two", {"f2": "2"})
    deep = make_fileset(store, "deep", {"f3": "3"})
    gen = generation(store, [base, {"fileset": one, "at": "/opt/one"}, {"fileset": two, "at": "/opt/two"},
                             {"fileset": deep, "at": "/a/b/c/d"}])
    assert names(gen, "/opt") == ["existing", "one", "two"]
    opt = gen.resolve("/opt").entry
    assert (opt.mode, opt.uid, opt.mtime_ns) == (0o711, 1, T + 3), "a synthesised parent never overrides real metadata"
    assert (read(gen, "/opt/one/f1"), read(gen, "/opt/two/f2"), read(gen, "/a/b/c/d/f3")) == (b"1", b"2", b"3")
    for synthetic in ("/a", "/a/b", "/a/b/c"):
        entry = gen.resolve(synthetic).entry
        assert (entry.kind, entry.mode, entry.uid, entry.gid) == (fmt.Kind.DIR, 0o755, 0, 0), synthetic
    assert names(gen, "/a/b") == ["c"]
    assert gen.resolve("/a/b").nlink == 3


def test_at_merges_with_an_existing_directory(store: Store) -> None:
    base = make_fileset(store, "base", {"usr/share/doc/old": "o"})
    docs = make_fileset(store, "docs", {"new": "n", "old": WH})
    gen = generation(store, [base, {"fileset": docs, "at": "/usr/share/doc"}])
    assert names(gen, "/usr/share/doc") == ["new"]


def test_at_layer_below_a_whiteout_is_hidden(store: Store) -> None:
    app = make_fileset(store, "app", {"f": "f"})
    wh = make_fileset(store, "wh", {"opt": WH})
    gen = generation(store, [{"fileset": app, "at": "/opt/app"}, wh])
    assert names(gen, "/") == []


# --------------------------------------------------------------------------- union mode


def test_union_identical_content_is_fine_even_with_different_mtimes(store: Store) -> None:
    a = make_fileset(store, "a", {"usr/share/common": F("same", mtime=T + 1), "usr/bin/a": "a",
                                  "etc/link": L("target", T + 5)})
    b = make_fileset(store, "b", {"usr/share/common": F("same", mtime=T + 9), "usr/bin/b": "b",
                                  "etc/link": L("target", T + 2)})
    gen = generation(store, [a, b], mode="union")
    gen.check()
    assert names(gen, "/usr/bin") == ["a", "b"]
    assert gen.resolve("/usr/share/common").entry.mtime_ns == T + 9, "the newest mtime is shown"
    assert gen.resolve("/etc/link").entry.mtime_ns == T + 5


@pytest.mark.parametrize(("left", "right", "what"), [
    (F("one"), F("two"), "different content"),
    (F("same", mode=0o644), F("same", mode=0o755), "different content"),
    (F("same", uid=0), F("same", uid=1), "different content"),
    (F("same"), F("same", xattrs={b"user.a": b"1"}), "different content"),
    (L("one"), L("two"), "different content"),
    (F("x"), L("x"), "different content"),
    (F("x"), D(), "a directory and a file"),
    (L("x"), D(), "a directory and a file"),
], ids=["content", "mode", "owner", "xattrs", "symlink", "file-vs-symlink", "file-vs-dir", "symlink-vs-dir"])
def test_union_conflicts_name_both_filesets_and_the_path(store: Store, left: Any, right: Any, what: str) -> None:
    a = make_fileset(store, "pkg-a", {"usr/lib/x/thing": left, "usr/lib/ok": "ok"})
    b = make_fileset(store, "pkg-b", {"usr/lib/x/thing": right, "usr/lib/ok": "ok"})
    gen = generation(store, [a, b], mode="union")
    assert names(gen, "/usr/lib") == ["ok", "x"], "conflicts are found where they are, lazily"
    with pytest.raises(ConflictError) as info:
        gen.check()
    message = str(info.value)
    assert "/usr/lib/x/thing" in message
    assert "example.org/pkg-a@1" in message and "example.org/pkg-b@1" in message
    assert what in message
    # The same, as attributes a caller can use without parsing the message (cnpsfs build does).
    conflict = info.value
    assert conflict.path == "/usr/lib/x/thing" and conflict.what == what
    assert [layer.label for layer in conflict.layers] == ["example.org/pkg-a@1", "example.org/pkg-b@1"]
    assert [layer.fileset for layer in conflict.layers] == [store.resolve(a), store.resolve(b)]
    with pytest.raises(ConflictError):
        generation(store, [b, a], mode="union").check()


def test_union_conflict_in_the_cli(store: Store, tmp_path: Path) -> None:
    a = make_fileset(store, "pkg-a", {"usr/bin/tool": "one"})
    b = make_fileset(store, "pkg-b", {"usr/bin/tool": "two"})
    manifest = tmp_path / "union.toml"
    manifest.write_text(manifest_text("example.org/union", [a, b], mode="union"))
    result = Cli(store.path)("image", "create", manifest)
    assert result.rc == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(r"/usr/bin/tool: example\.org/pkg-a@1 and example\.org/pkg-b@1 provide different content",
                     lines[0]), lines[0]
    assert Cli(store.path)("inspect", "example.org/union@1").rc != 0, "no image was stored"


def test_union_override_layer_wins(store: Store) -> None:
    a = make_fileset(store, "pkg-a", {"usr/bin/tool": "one", "var/lib/dpkg/status": "a", "etc/x": "x"})
    b = make_fileset(store, "pkg-b", {"usr/bin/tool": "two", "etc/y": "y"})
    fix = make_fileset(store, "fix", {"var/lib/dpkg/status": "configured", "etc/x": WH})
    for layers in ([a, {"fileset": b, "override": True}, fix], [{"fileset": b, "override": True}, a, fix]):
        layers[-1] = {"fileset": fix, "override": True}
        gen = generation(store, layers, mode="union")
        gen.check()
        assert read(gen, "/usr/bin/tool") == b"two"
        assert read(gen, "/var/lib/dpkg/status") == b"configured"
        assert names(gen, "/etc") == ["y"], "whiteouts work in override layers"
    # Override layers stack in list order.
    gen = generation(store, [a, {"fileset": fix, "override": True}, {"fileset": b, "override": True}], mode="union")
    assert read(gen, "/usr/bin/tool") == b"two"


def test_union_ignores_whiteouts_and_opaque_markers_between_union_layers(store: Store) -> None:
    a = make_fileset(store, "pkg-a", {"etc/a": "a"})
    b = make_fileset(store, "pkg-b", {"etc/a": WH, "etc/b": "b"}, opaque=["etc"])
    for order in ([a, b], [b, a]):
        assert names(generation(store, order, mode="union"), "/etc") == ["a", "b"]


def test_union_directory_metadata_rule(store: Store) -> None:
    """Greatest (mtime, mode, uid, gid, xattrs) wins, whatever the order."""
    cases = {
        "newer": D(0o700, 9, 9, T + 1),
        "older": D(0o755, 0, 0, T),
    }
    a = make_fileset(store, "a", {"etc": cases["newer"], "etc/a": "a", "same": D(0o755, 1, 1, T),
                                  "tie": D(0o700, 5, 5, T), "tie2": D(0o755, 1, 2, T)})
    b = make_fileset(store, "b", {"etc": cases["older"], "etc/b": "b", "same": D(0o755, 1, 1, T),
                                  "tie": D(0o750, 0, 0, T), "tie2": D(0o755, 1, 1, T, {b"user.z": b"1"})})
    for order in ([a, b], [b, a]):
        gen = generation(store, order, mode="union")

        def meta(path: str, gen: Generation = gen) -> tuple[int, int, int, int]:
            e = gen.resolve(path).entry
            return e.mode, e.uid, e.gid, e.mtime_ns

        assert meta("/etc") == (0o700, 9, 9, T + 1), "newest mtime"
        assert meta("/tie") == (0o750, 0, 0, T), "same mtime: greater mode"
        assert meta("/tie2") == (0o755, 1, 2, T), "same mtime and mode: greater uid, then gid"
        assert names(gen, "/etc") == ["a", "b"]


def test_union_directory_metadata_from_override_layer(store: Store) -> None:
    a = make_fileset(store, "a", {"etc": D(0o755, mtime=T + 50), "etc/a": "a"})
    top = make_fileset(store, "top", {"etc": D(0o700, mtime=T), "etc/t": "t"})
    gen = generation(store, [a, {"fileset": top, "override": True}], mode="union")
    assert gen.resolve("/etc").entry.mode == 0o700, "an override layer stacks: its metadata is the topmost"


def _union_layers(store: Store) -> list[str]:
    return [
        make_fileset(store, "p1", {"usr": D(0o755, mtime=T + 1), "usr/bin/one": F("1", 0o755, mtime=T + 1),
                                   "usr/share/doc/common": F("shared", mtime=T + 3), "etc/p1": "p1",
                                   "usr/lib/libx.so": L("libx.so.1")},
                     root=D(0o755, mtime=T + 1)),
        make_fileset(store, "p2", {"usr": D(0o755, mtime=T + 4), "usr/bin/two": F("2", 0o755),
                                   "usr/share/doc/common": F("shared", mtime=T + 1),
                                   "usr/share": D(0o775, 0, 50, T + 2), "var/cache": D(0o700, mtime=T)},
                     root=D(0o700, mtime=T + 1)),
        make_fileset(store, "p3", {"usr/bin/three": "3", "usr/share/doc/common": F("shared", mtime=T + 3),
                                   "usr/lib/libx.so": L("libx.so.1", T + 9), "var/cache": D(0o755, mtime=T),
                                   "etc/p3": F("p3", xattrs={b"user.k": b"v"})}),
        make_fileset(store, "p4", {"usr/share": D(0o755, 1, 1, T + 2), "etc": D(0o755, mtime=T + 9),
                                   "etc/p1": "p1"}),
    ]


def test_union_permuted_layer_list_gives_an_identical_tree(store: Store) -> None:
    layers = _union_layers(store)
    expected = tree(generation(store, layers, mode="union"))
    assert len(expected) == 16
    for order in itertools.permutations(layers):
        assert tree(generation(store, list(order), mode="union")) == expected, order


def test_union_with_at_placement(store: Store) -> None:
    a = make_fileset(store, "a", {"opt/tools/a": "a"})
    b = make_fileset(store, "b", {"b": "b"})
    gen = generation(store, [a, {"fileset": b, "at": "/opt/tools"}], mode="union")
    assert names(gen, "/opt/tools") == ["a", "b"]
    assert tree(gen) == tree(generation(store, [{"fileset": b, "at": "/opt/tools"}, a], mode="union"))


# --------------------------------------------------------------------------- manifest errors


BASE_MANIFEST = 'name = "example.org/m"\nversion = "1"\n'


@pytest.mark.parametrize(("text", "pattern"), [
    (BASE_MANIFEST + 'colour = "red"\n[[layers]]\nfileset = "x"\n', r"^m\.toml: unknown key colour \(allowed: "),
    (BASE_MANIFEST + '[[layers]]\nfileset = "x"\n[[layers]]\nfileset = "y"\noffset = 3\n',
     r"^m\.toml: unknown key layers\[2\]\.offset \(allowed: "),
    (BASE_MANIFEST + '[[layers]]\nfileset = "x"\n[config]\nshell = "sh"\n', r"unknown key config\.shell"),
    (BASE_MANIFEST + 'mode = "stack"\n[[layers]]\nfileset = "x"\n', r"mode must be one of layers, union.*'stack'"),
    (BASE_MANIFEST, r"needs at least one \[\[layers\]\] entry"),
    (BASE_MANIFEST + "layers = []\n", r"needs at least one \[\[layers\]\] entry"),
    (BASE_MANIFEST + '[[layers]]\nat = "/opt"\n', r"layers\[1\]\.fileset or layers\[1\]\.image is required"),
    (BASE_MANIFEST + '[[layers]]\nfileset = "x"\nat = "opt"\n', r"layers\[1\]\.at must be an absolute path"),
    (BASE_MANIFEST + '[[layers]]\nfileset = "x"\nat = "/opt/../etc"\n', r"layers\[1\]\.at must be an absolute"),
    # Issue 15 bug 6: the format's name rules apply to every component of `at`.
    (BASE_MANIFEST + '[[layers]]\nfileset = "x"\nat = "/a\\u0000b"\n', r"layers\[1\]\.at: .*NUL"),
    (BASE_MANIFEST + '[[layers]]\nfileset = "x"\nat = "/opt/' + "n" * 300 + '"\n',
     r"layers\[1\]\.at: .*longer than 255 bytes"),
    (BASE_MANIFEST + '[[layers]]\nfileset = "x"\nat = "/opt/' + "é" * 128 + '"\n',
     r"layers\[1\]\.at: .*longer than 255 bytes"),
    (BASE_MANIFEST + '[[layers]]\nfileset = "x"\nat = "' + "/abcdefgh" * 500 + '"\n',
     r"layers\[1\]\.at: .*longer than 4095 bytes"),
    (BASE_MANIFEST + '[[layers]]\nfileset = "x"\noverride = "yes"\n', r"layers\[1\]\.override must be true or false"),
    ('version = "1"\n[[layers]]\nfileset = "x"\n', r"missing string key 'name'"),
    ('name = "example.org/m"\n[[layers]]\nfileset = "x"\n', r"missing string key 'version'"),
    ('name = "Not A Name"\nversion = "1"\n[[layers]]\nfileset = "x"\n', r"invalid name"),
    (BASE_MANIFEST + "[[layers]\n", r"not valid TOML"),
], ids=["top-key", "layer-key", "config-key", "mode", "no-layers", "empty-layers", "no-fileset", "relative-at",
        "dotdot-at", "nul-at", "long-name-at", "long-utf8-name-at", "long-path-at",
        "override-type", "no-name", "no-version", "bad-name", "toml"])
def test_manifest_errors_name_the_problem(text: str, pattern: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_manifest(text, "m.toml")
    message = str(info.value)
    assert re.search(pattern, message), message
    assert "\n" not in message


@pytest.mark.parametrize("ref", ["example.org/nothing@1", "example.org/nothing", "blake3:0123456789abcdef",
                                 "blake3:zz"])
def test_manifest_bad_reference_is_named(store: Store, ref: str) -> None:
    make_fileset(store, "real", {"a": "a"})
    spec = parse_manifest(manifest_text("example.org/m", ["example.org/real@1", ref]), "m.toml")
    with pytest.raises(UsageError) as info:
        image_from_manifest(store, spec, "m.toml")
    message = str(info.value)
    assert message.startswith("m.toml: layers[2].fileset: "), message
    assert ref in message or ref.split("@")[0] in message, message


def test_manifest_reference_to_an_image_is_refused(store: Store, tmp_path: Path) -> None:
    fs = make_fileset(store, "real", {"a": "a"})
    manifest = tmp_path / "image.toml"
    manifest.write_text(manifest_text("example.org/img", [fs]))
    Cli(store.path).ok("image", "create", manifest)
    spec = parse_manifest(manifest_text("example.org/m", ["example.org/img@1"]), "m.toml")
    with pytest.raises(UsageError, match=r"layers\[1\]\.fileset"):
        image_from_manifest(store, spec, "m.toml")


def test_manifest_errors_in_the_cli_are_one_line(store: Store, tmp_path: Path) -> None:
    manifest = tmp_path / "bad.toml"
    manifest.write_text(BASE_MANIFEST + 'mode = "stack"\n[[layers]]\nfileset = "x"\n')
    result = Cli(store.path)("image", "create", manifest)
    assert result.rc == 2, result
    assert result.stderr.count("\n") == 1 and "mode must be one of" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_lazy_resolve_agrees_with_a_full_walk(store: Store) -> None:
    layers = _union_layers(store)
    walked: dict[tuple[bytes, ...], Node] = dict(generation(store, layers, mode="union").walk())
    fresh = generation(store, layers, mode="union")  # nothing loaded yet: resolve composes lazily
    for path, node in sorted(walked.items(), reverse=True):
        other = fresh.resolve(b"/" + b"/".join(path))
        assert (other.entry, other.nlink, other.size) == (node.entry, node.nlink, node.size), path


# --------------------------------------------------------------------------- two generations side by side


def test_changed_dirs_enters_only_what_changed(store: Store) -> None:
    """The walk live swaps and `cnpsfs diff` share: an unchanged subtree is skipped unread."""
    base = make_fileset(store, "base", {"etc/a": "a1", "usr/bin/sh": "sh", "usr/lib/x": "x"})
    top = make_fileset(store, "top", {"etc/a": "a2"})
    old, new = generation(store, [base]), generation(store, [base, top])
    visited = {fmt.show_path(p.path): p.changed for p in changed_dirs(old, new)}
    assert visited == {"/": True, "/etc": True, "/usr": False}
    for gen in (old, new):
        assert gen.root.children is not None
        assert gen.root.children[b"usr"].children is None, "an unchanged directory is not composed"

    extra = make_fileset(store, "extra", {"opt/tool/bin": "t"})
    added = {fmt.show_path(p.path): p.old is None for p in changed_dirs(old, generation(store, [base, extra]))}
    assert added["/opt"] and added["/opt/tool"] and not added["/"]
    shallow = {fmt.show_path(p.path) for p in changed_dirs(old, generation(store, [base, extra]), into_added=False)}
    assert "/opt" not in shallow and "/" in shallow
