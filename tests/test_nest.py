"""Images that nest images (docs/manifest.md, "Images that nest images"), in-process:
the composition rules, cycles and limits, manifest files naming manifest files, the
export stacking order, swaps that share what a new base left alone; then through the
CLI: image create, inspect --tree, gc.

Trees are compared with the same image written out flat, so "places that image's layers
there" is checked against the flat composition it must equal.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from cnpsfs_testlib import Cli
from mountutil import compare_mount, manifest_text, mount_image
from ociimages import busybox_image  # noqa: F401 (fixture)
from test_compose import WH, D, F, kind, make_fileset, missing, names, read, tree

from cnpsfs import format as fmt
from cnpsfs.errors import ConflictError, NestingError, UsageError
from cnpsfs.image.manifest import (
    active_layers,
    compose,
    image_from_manifest,
    load_manifest_file,
    parse_manifest,
    stacking_order,
    store_image,
)
from cnpsfs.image.swap import prepare
from cnpsfs.image.view import Generation
from cnpsfs.store import T_IMAGE, Store

T = 1_700_000_000_000_000_000


def image_of(store: Store, name: str, layers: Sequence[Mapping[str, Any] | str], *, mode: str | None = None,
             version: str = "1") -> fmt.Image:
    spec = parse_manifest(manifest_text(f"example.org/{name}", layers, mode=mode, version=version), "test.toml")
    return image_from_manifest(store, spec, "test.toml")


def stored(store: Store, name: str, layers: Sequence[Mapping[str, Any] | str], *, mode: str | None = None,
           version: str = "1") -> str:
    """Store (and check) an image; returns its NAME@VERSION."""
    image = image_of(store, name, layers, mode=mode, version=version)
    compose(store, image).check()
    store_image(store, image)
    return f"example.org/{name}@{version}"


def gen(store: Store, name: str, layers: Sequence[Mapping[str, Any] | str], *, mode: str | None = None) -> Generation:
    return compose(store, image_of(store, name, layers, mode=mode))


# --------------------------------------------------------------------------- same mode: layers placed there


def test_a_layers_image_nested_in_a_layers_image_equals_its_layers_written_out(store: Store) -> None:
    lower = make_fileset(store, "lower", {"etc/motd": "lower", "etc/gone": "deleted by the base", "srv/x": "x"})
    b1 = make_fileset(store, "b1", {"etc/passwd": "root", "usr/bin/sh": "sh", "opt/old/a": "a"})
    b2 = make_fileset(store, "b2", {"etc/gone": WH, "opt/old": D(0o750), "opt/old/c": "c"}, opaque=["opt/old"])
    top = make_fileset(store, "top", {"etc/motd": "top", "usr/bin/app": "app"})
    base = stored(store, "base", [b1, b2])
    nested = gen(store, "app", [lower, {"image": base}, top])
    flat = gen(store, "flat", [lower, b1, b2, top])
    assert tree(nested) == tree(flat)
    # The base's whiteout reaches the layer below the base too: the layers are placed there.
    assert missing(nested, "/etc/gone") and names(nested, "/opt/old") == ["c"]
    assert read(nested, "/etc/motd") == b"top"
    layers = active_layers(store, image_of(store, "app", [lower, {"image": base}, top]))
    assert [(info.name, info.index, info.via, info.groups) for info in layers] == [
        ("example.org/lower@1", 0, (), ()), ("example.org/b1@1", 1, ("example.org/base@1",), ()),
        ("example.org/b2@1", 1, ("example.org/base@1",), ()), ("example.org/top@1", 2, (), ())]


def test_nested_image_placement_and_unlinked(store: Store) -> None:
    b1 = make_fileset(store, "b1", {"bin/tool": "tool"})
    b2 = make_fileset(store, "b2", {"share/data": "data"})
    base = stored(store, "base", [b1, {"fileset": b2, "at": "/lib"}])
    placed = gen(store, "app", [{"image": base, "at": "/opt/base"}])
    assert tree(placed) == tree(gen(store, "flat", [{"fileset": b1, "at": "/opt/base"},
                                                    {"fileset": b2, "at": "/opt/base/lib"}]))
    assert read(placed, "/opt/base/lib/share/data") == b"data"
    hidden = gen(store, "app2", [b1, {"image": base, "unlinked": True, "at": "/x"}])
    assert names(hidden, "/") == ["bin"]
    # An unlinked layer of the nested image stays unlinked.
    partial = stored(store, "partial", [b1, {"fileset": b2, "unlinked": True}])
    assert names(gen(store, "app3", [{"image": partial}]), "/") == ["bin"]


def test_union_images_nested_in_a_union_are_flattened(store: Store) -> None:
    p1 = make_fileset(store, "p1", {"usr/bin/a": "a", "etc/conf": "one"})
    p2 = make_fileset(store, "p2", {"usr/bin/b": "b"})
    p3 = make_fileset(store, "p3", {"etc/conf": "three"})
    inner = stored(store, "inner", [p1], mode="union")
    nested = gen(store, "outer", [{"image": inner}, p2], mode="union")
    assert tree(nested) == tree(gen(store, "flat", [p1, p2], mode="union"))
    assert nested.layers[0].groups == ()  # same mode: no group
    # Its layers are members of the outer union: a conflict with them is found and named.
    with pytest.raises(ConflictError) as info:
        gen(store, "bad", [{"image": inner}, p3], mode="union").check()
    assert info.value.path == "/etc/conf"
    assert {layer.label for layer in info.value.layers} == {"example.org/p1@1", "example.org/p3@1"}


def test_an_override_union_image_in_a_union_is_stacked_on_top(store: Store) -> None:
    p1 = make_fileset(store, "p1", {"etc/conf": "one", "usr/bin/a": "a"})
    p3 = make_fileset(store, "p3", {"etc/conf": "three"})
    fix = stored(store, "fix", [p3], mode="union")
    g = gen(store, "outer", [p1, {"image": fix, "override": True}], mode="union")
    g.check()
    assert read(g, "/etc/conf") == b"three" and read(g, "/usr/bin/a") == b"a"
    assert [info.groups[0].override for info in g.layers if info.groups] == [True]


# --------------------------------------------------------------------------- the other mode: a group


def test_a_union_image_nested_in_a_layers_image_composes_by_its_own_rules(store: Store) -> None:
    # Union rules that layers mode would not follow: whiteouts between union layers mean
    # nothing; a directory's metadata is the greatest source's, not the topmost's; of
    # identical files the newest mtime shows.
    p1 = make_fileset(store, "p1", {"var": D(0o755, mtime=T + 50), "var/lib/a": F("same", mtime=T + 9),
                                    "usr/bin/a": "a", "usr/share/doc/a": "doc"})
    p2 = make_fileset(store, "p2", {"var": D(0o700, mtime=T), "var/lib/a": F("same", mtime=T + 1),
                                    "usr/bin/a": WH, "usr/bin/b": "b"})
    union = stored(store, "pkgs", [p1, p2], mode="union")
    top = make_fileset(store, "top", {"usr/bin/b": "patched", "usr/share/doc/a": WH, "app/run": "run"})
    alone = compose(store, store.get_image(store.resolve(union)))
    nested = gen(store, "app", [{"image": union}, top])
    assert nested.layers[0].groups[0].mode is fmt.CompositionMode.UNION
    var = nested.resolve("/var").entry
    assert (var.mode, var.mtime_ns) == (0o755, T + 50)  # the greatest source's, as the union alone shows it
    assert nested.resolve("/var/lib/a").entry.mtime_ns == T + 9  # the newest of identical files
    assert read(nested, "/usr/bin/a") == b"a"  # p2's whiteout is ignored inside the union
    assert read(nested, "/usr/bin/b") == b"patched"  # the layer above replaces
    assert missing(nested, "/usr/share/doc/a")  # and its whiteout hides the union's file
    # Where the top layer does not reach, the nested union shows exactly as mounted alone.
    only = {p: row for p, row in tree(alone).items() if p.startswith("/var")}
    assert {p: row for p, row in tree(nested).items() if p.startswith("/var")} == only
    flat = gen(store, "flat", [p1, p2, top])
    assert tree(flat) != tree(nested), "flattening would have changed the union's meaning"


def test_a_layers_image_nested_in_a_union_is_one_member(store: Store) -> None:
    l1 = make_fileset(store, "l1", {"etc/conf": "A", "etc/old": "old", "bin/sh": "sh"})
    l2 = make_fileset(store, "l2", {"etc/conf": "B", "etc/old": WH})
    base = stored(store, "base", [l1, l2])  # layers mode: l2 replaces /etc/conf, deletes /etc/old
    same = make_fileset(store, "same", {"etc/conf": "B", "usr/bin/tool": "tool"})
    g = gen(store, "pkgs", [same, {"image": base}], mode="union")
    g.check()  # no conflict: the base is composed first, and there /etc/conf is B
    assert read(g, "/etc/conf") == b"B" and missing(g, "/etc/old") and kind(g, "/usr/bin/tool") == "FILE"
    clash = make_fileset(store, "clash", {"etc/conf": "A"})
    with pytest.raises(ConflictError) as info:
        gen(store, "bad", [clash, {"image": base}], mode="union").check()
    assert info.value.path == "/etc/conf"
    assert {layer.label for layer in info.value.layers} == {"example.org/clash@1", "example.org/l2@1"}


def test_groups_nest_and_directory_metadata_follows_each_level(store: Store) -> None:
    # layers image ⊃ union image ⊃ layers image: each level by its own rule.
    a = make_fileset(store, "a", {"srv": D(0o711, mtime=T + 5), "srv/a": "a1"})
    b = make_fileset(store, "b", {"srv": D(0o755, mtime=T + 1), "srv/a": "a2"})
    inner = stored(store, "inner", [a, b])  # layers: b on top, /srv is 0755
    c = make_fileset(store, "c", {"srv": D(0o750, mtime=T + 3), "srv/c": "c"})
    middle = stored(store, "middle", [{"image": inner}, c], mode="union")  # union: greatest mtime wins
    top = make_fileset(store, "top", {"opt/t": "t"})
    g = gen(store, "outer", [{"image": middle}, top])
    g.check()
    srv = g.resolve("/srv").entry
    # c's (T+3) beats the inner image's composed /srv (b's, T+1); flattened, a's T+5 would win.
    assert (srv.mode, srv.mtime_ns) == (0o750, T + 3)
    assert read(g, "/srv/a") == b"a2" and names(g, "/srv") == ["a", "c"]
    assert [len(info.groups) for info in g.layers] == [2, 2, 1, 0]


# --------------------------------------------------------------------------- cycles, limits, errors


def test_manifest_files_nest_and_cycles_are_named(store: Store, tmp_path: Path) -> None:
    fs = make_fileset(store, "fs", {"a": "a"})
    (tmp_path / "base.toml").write_text(manifest_text("example.org/base", [fs]))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/app.toml").write_text(manifest_text("example.org/app", [{"image": "../base.toml"}]))
    image = load_manifest_file(store, tmp_path / "sub/app.toml")
    nested = image.layers[0].image
    assert nested is not None and image.unstored[nested].name == "example.org/base"
    assert read(compose(store, image), "/a") == b"a"

    (tmp_path / "a.toml").write_text(manifest_text("example.org/a", [fs, {"image": "b.toml"}]))
    (tmp_path / "b.toml").write_text(manifest_text("example.org/b", [{"image": "c.toml"}]))
    (tmp_path / "c.toml").write_text(manifest_text("example.org/c", [{"image": "a.toml"}]))
    with pytest.raises(UsageError) as info:
        load_manifest_file(store, tmp_path / "a.toml")
    chain = " -> ".join(str(tmp_path / f"{n}.toml") for n in "abca")
    assert str(info.value) == f"manifest cycle: {chain}"
    (tmp_path / "self.toml").write_text(manifest_text("example.org/self", [{"image": "self.toml"}]))
    with pytest.raises(UsageError, match=r"manifest cycle: (\S+)/self\.toml -> \1/self\.toml$"):
        load_manifest_file(store, tmp_path / "self.toml")
    result = Cli(store.path)("image", "create", tmp_path / "a.toml")
    assert result.rc == 2 and result.stderr.strip() == f"cnpsfs: error: manifest cycle: {chain}", result.stderr
    assert store.tags(T_IMAGE) == [] or not any(t.name == "example.org/a" for t in store.tags(T_IMAGE))


def test_a_stored_image_cycle_is_named(store: Store) -> None:
    """Content addressing makes a cycle of stored images impossible to build (an image's
    digest covers its nested image's); the check still guards a composition that is
    handed one, naming it."""
    fs = make_fileset(store, "fs", {"a": "a"})
    image = image_of(store, "loop", [fs])
    digest = bytes(range(32))
    image.layers.append(fmt.Layer(None, image=digest))
    image.unstored[digest] = image  # the image names itself
    with pytest.raises(NestingError, match=r"^image cycle: example\.org/loop@1 -> example\.org/loop@1$"):
        active_layers(store, image, digest)


def test_nesting_depth_is_limited(store: Store) -> None:
    ref = stored(store, "level0", [make_fileset(store, "fs", {"a": "a"})])
    for level in range(1, fmt.MAX_NESTING + 1):
        ref = stored(store, f"level{level}", [{"image": ref}])
    deepest = compose(store, image_of(store, "ok", [{"image": f"example.org/level{fmt.MAX_NESTING - 1}@1"}]))
    assert read(deepest, "/a") == b"a" and len(deepest.layers[0].via) == fmt.MAX_NESTING
    with pytest.raises(NestingError) as info:
        compose(store, image_of(store, "deep", [{"image": ref}]))
    message = str(info.value)
    assert f"limit of {fmt.MAX_NESTING} levels" in message and message.startswith("example.org/deep@1 -> "), message


def test_manifest_file_nesting_depth_is_limited(store: Store, tmp_path: Path) -> None:
    fs = make_fileset(store, "fs", {"a": "a"})
    (tmp_path / "m0.toml").write_text(manifest_text("example.org/m0", [fs]))
    for level in range(1, fmt.MAX_NESTING + 2):
        (tmp_path / f"m{level}.toml").write_text(manifest_text(f"example.org/m{level}",
                                                               [{"image": f"m{level - 1}.toml"}]))
    assert read(compose(store, load_manifest_file(store, tmp_path / f"m{fmt.MAX_NESTING}.toml")), "/a") == b"a"
    with pytest.raises(UsageError, match=f"deeper than the limit of {fmt.MAX_NESTING} images"):
        load_manifest_file(store, tmp_path / f"m{fmt.MAX_NESTING + 1}.toml")


def test_flattened_layers_are_limited(store: Store) -> None:
    fs = store.resolve(make_fileset(store, "fs", {"a": "a"}))
    half = fmt.MAX_LAYERS // 2 + 1
    big = fmt.Image("example.org/big", "1", "layers", [fmt.Layer(fs)] * half)
    store_image(store, big)
    with pytest.raises(NestingError, match=f"more than the limit of {fmt.MAX_LAYERS} layers per image"):
        compose(store, image_of(store, "twice", [{"image": "example.org/big@1"}, {"image": "example.org/big@1"}]))


def test_manifest_image_errors_name_the_layer(store: Store) -> None:
    fs = make_fileset(store, "fs", {"a": "a"})
    with pytest.raises(UsageError, match=r"layers\[1\]\.image: unknown reference 'example\.org/none@1'"):
        image_of(store, "app", [{"image": "example.org/none@1"}])
    with pytest.raises(UsageError, match=r"layers\[1\]\.image: example\.org/fs@1 is a fileset, not a"):
        image_of(store, "app", [{"image": fs}])
    base = stored(store, "base", [fs])
    with pytest.raises(UsageError, match=r"layers\[1\]\.fileset: example\.org/base@1 is an image: nest it with "
                                         r'image = "example\.org/base@1"'):
        image_of(store, "app", [base])
    with pytest.raises(UsageError, match=r"layers\[1\]\.fileset or layers\[1\]\.image is required, not both"):
        parse_manifest(manifest_text("example.org/x", [{"fileset": fs, "image": base}]), "m.toml")
    with pytest.raises(UsageError, match=r"cannot read manifest .*/nowhere\.toml"):
        image_of(store, "app", [{"image": "/nowhere.toml"}])


def test_placement_past_the_path_limit_is_an_error(store: Store) -> None:
    fs = make_fileset(store, "fs", {"a": "a"})
    deep = "/" + "/".join(["d" * 200] * 11)  # 2,211 bytes: fine alone, past PATH_MAX twice
    base = stored(store, "base", [{"fileset": fs, "at": deep}])
    with pytest.raises(NestingError, match=r"example\.org/app@1 -> example\.org/base@1: layer 1: .*longer than 4095"):
        compose(store, image_of(store, "app", [{"image": base, "at": deep}]))


# --------------------------------------------------------------------------- export order and swaps


def test_stacking_order_puts_a_unions_overrides_above_it_group_by_group(store: Store) -> None:
    p1 = make_fileset(store, "p1", {"a": "a"})
    o1 = make_fileset(store, "o1", {"db": "db"})
    p2 = make_fileset(store, "p2", {"b": "b"})
    pkgs = stored(store, "pkgs", [p1, {"fileset": o1, "override": True}, p2], mode="union")
    top = make_fileset(store, "top", {"c": "c"})
    image = image_of(store, "app", [{"image": pkgs}, top])
    order = stacking_order(image, active_layers(store, image))
    assert [(info.name, whiteouts) for info, whiteouts in order] == [
        ("example.org/p1@1", False), ("example.org/p2@1", False), ("example.org/o1@1", True),
        ("example.org/top@1", True)]


def test_upgrading_to_an_app_on_a_new_base_shares_what_the_base_left(store: Store) -> None:
    os = make_fileset(store, "os", {f"usr/share/doc/pkg{i}/README": f"readme {i}" for i in range(30)}
                      | {"etc/os-release": "ID=test"})
    tool1 = make_fileset(store, "tool", {"usr/bin/tool": "tool 1"})
    tool2 = make_fileset(store, "tool", {"usr/bin/tool": "tool 2"}, version="2")
    app_code = make_fileset(store, "code", {"run": "run"})
    base1 = stored(store, "base", [os, tool1])  # the base is upgraded: one package changes
    base2 = stored(store, "base", [os, tool2], version="2")
    app1 = stored(store, "app", [{"image": base1}, {"fileset": app_code, "at": "/opt/app"}])
    app2 = stored(store, "app", [{"image": base2}, {"fileset": app_code, "at": "/opt/app"}], version="2")
    old = compose(store, store.get_image(store.resolve(app1)))
    list(old.walk())  # the kernel has seen everything
    new = compose(store, store.get_image(store.resolve(app2)), old.inodes, previous=old)
    plan = prepare(old, new)
    assert plan.changed_dirs == 3, plan  # /, /usr, /usr/bin: where the changed package is
    assert plan.shared_dirs == 3, plan  # /etc, /opt, /usr/share (and all below): not even read
    assert [name for _parent, name in plan.entries] == [b"tool"]
    assert read(new, "/usr/bin/tool") == b"tool 2" and read(new, "/opt/app/run") == b"run"


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def nested_store(store: Store, tmp_path: Path) -> tuple[Cli, Path]:
    """base.toml (two FileSets), tools.toml (union) and app.toml nesting both, the base twice."""
    os_fs = make_fileset(store, "os", {"etc/os-release": "ID=test", "bin/sh": "sh"})
    libs = make_fileset(store, "libs", {"usr/lib/libx.so": "x"})
    tool = make_fileset(store, "tool", {"usr/bin/tool": "tool"})
    code = make_fileset(store, "code", {"run": "run"})
    (tmp_path / "base.toml").write_text(manifest_text("example.org/base", [os_fs, libs]))
    (tmp_path / "tools.toml").write_text(manifest_text("example.org/tools", [tool, {"image": "base.toml"}],
                                                       mode="union"))
    (tmp_path / "app.toml").write_text(manifest_text(
        "example.org/app", [{"image": "base.toml"}, {"image": "tools.toml", "label": "tools"},
                            {"fileset": code, "at": "/opt/app"}], extra='[config]\ncmd = ["/opt/app/run"]\n'))
    return Cli(store.path), tmp_path


def test_image_create_stores_and_tags_nested_manifests(nested_store: tuple[Cli, Path], store: Store) -> None:
    cli, base = nested_store
    digest = cli.ok("image", "create", base / "app.toml").last_line
    tags = {f"{t.name}@{t.version}" for t in store.tags(T_IMAGE)}
    assert tags == {"example.org/app@1", "example.org/base@1", "example.org/tools@1"}
    app = store.get_image(fmt.parse_digest(digest))
    assert app.layers[0].image == store.resolve("example.org/base@1")
    assert cli.ok("cat", "example.org/app@1", "usr/bin/tool").stdout == "tool"
    # The base is upgraded (a new FileSet, a new base image); rebuilding the app from the
    # same app.toml adds the new base image and the new app image, nothing else.
    make_fileset(store, "libs", {"usr/lib/libx.so": "x2"}, version="2")
    (base / "base.toml").write_text((base / "base.toml").read_text().replace("example.org/libs@1",
                                                                             "example.org/libs@2"))
    _chunks, objects, _packs = store.counts()
    cli.ok("image", "create", base / "app.toml")
    # base@1 -> base@2, tools@1 (nests the base) -> a new tools@1, app@1 -> a new app@1.
    assert store.counts()[1] == objects + 3
    assert cli.ok("cat", "example.org/app@1", "usr/lib/libx.so").stdout == "x2"


def test_inspect_tree_shows_the_dag(nested_store: tuple[Cli, Path]) -> None:
    cli, base = nested_store
    cli.ok("image", "create", base / "app.toml")
    text = cli.ok("inspect", "--tree", "example.org/app@1").stdout
    lines = [re.sub(r"blake3:[0-9a-f]{16}", "D", line) for line in text.splitlines()]
    assert lines == [
        "example.org/app@1  (layers)  D",
        "├── example.org/base@1  image (layers)  D",
        "│   ├── example.org/os@1  D",
        "│   └── example.org/libs@1  D",
        "├── example.org/tools@1  image (union)  D  ['tools']",
        "│   ├── example.org/tool@1  D",
        "│   └── example.org/base@1  image (layers)  D  (see above)",
        "└── example.org/code@1  D  [at /opt/app]",
    ], text
    tree_json = json.loads(cli.ok("inspect", "--tree", "--json", "example.org/app@1").stdout)
    assert [layer["type"] for layer in tree_json["layers"]] == ["image", "image", "fileset"]
    assert [layer["name"] for layer in tree_json["layers"][0]["layers"]] == ["example.org/os", "example.org/libs"]
    assert tree_json["layers"][1]["layers"][1]["seen"] is True
    plain = json.loads(cli.ok("inspect", "--json", "example.org/app@1").stdout)
    assert [layer.get("image", layer.get("fileset"))[:7] for layer in plain["layers"]] == ["blake3:"] * 3
    assert [layer["name"] for layer in plain["layers"]] == ["example.org/base", "example.org/tools", "example.org/code"]
    # A manifest file works too, its nested images not stored.
    text = cli.ok("inspect", "--tree", base / "app.toml").stdout
    assert text.splitlines()[0] == "example.org/app@1  (layers)  (from manifest)"


def test_gc_keeps_nested_images(nested_store: tuple[Cli, Path], store: Store) -> None:
    cli, base = nested_store
    cli.ok("image", "create", base / "app.toml")
    for ref in ("example.org/base@1", "example.org/tools@1", "example.org/os@1", "example.org/libs@1",
                "example.org/tool@1", "example.org/code@1"):
        cli.ok("tag", "rm", ref)
    cli.ok("gc")
    assert cli.ok("verify").rc == 0
    assert cli.ok("cat", "example.org/app@1", "etc/os-release").stdout == "ID=test"
    assert "example.org/libs@1" in cli.ok("inspect", "--tree", "example.org/app@1").stdout
    cli.ok("tag", "rm", "example.org/app@1")
    cli.ok("gc")
    assert store.tags() == []
    assert store.counts()[:2] == (0, 0), "nothing is left once the app's tag is gone"


# --------------------------------------------------------------------------- real mounts and the OCI tools


@pytest.fixture
def busybox_app(cli: Cli, tmp_path: Path, busybox_image: Path) -> dict[str, Any]:  # noqa: F811
    """The busybox OCI image (3 layers, whiteouts, an opaque directory) imported as the base
    of an app image that adds its code at /opt/app and a union image of two packages."""
    cli.ok("import", "oci", f"oci:{busybox_image}:full", "--name", "example.org/busybox", "--version", "1")
    for name, body in (("code", "echo app v1"), ("pkg-a", "a"), ("pkg-b", "b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.txt").write_text(body + "\n")
        cli.ok("import", "dir", tmp_path / name, "--name", f"example.org/{name}", "--version", "1")
    (tmp_path / "pkgs.toml").write_text(manifest_text(
        "example.org/pkgs", [{"fileset": "example.org/pkg-a@1", "at": "/usr/share/a"},
                             {"fileset": "example.org/pkg-b@1", "at": "/usr/share/b"}], mode="union"))
    (tmp_path / "app.toml").write_text(manifest_text(
        "example.org/app", [{"image": "example.org/busybox@1"}, {"image": "pkgs.toml"},
                            {"fileset": "example.org/code@1", "at": "/opt/app"}],
        extra='[config]\ncmd = ["/bin/cat", "/opt/app/code.txt"]\n'))
    cli.ok("image", "create", tmp_path / "app.toml")
    return {"cli": cli, "store": tmp_path / "store", "dir": tmp_path, "layout": busybox_image}


@pytest.mark.fuse
def test_nested_image_mount_upgrade_swaps_only_what_changed(busybox_app: dict[str, Any], tmp_path: Path) -> None:
    cli = busybox_app["cli"]
    (tmp_path / "code2").mkdir()
    (tmp_path / "code2/code.txt").write_text("echo app v1\n")
    # The base is upgraded: a new version of one of the union's packages.
    (tmp_path / "pkg-b2").mkdir()
    (tmp_path / "pkg-b2/pkg-b.txt").write_text("b2\n")
    cli.ok("import", "dir", tmp_path / "pkg-b2", "--name", "example.org/pkg-b", "--version", "2")
    pkgs2 = (tmp_path / "pkgs.toml").read_text().replace("pkg-b@1", "pkg-b@2").replace('version = "1"',
                                                                                     'version = "2"')
    (tmp_path / "pkgs2.toml").write_text(pkgs2)
    (tmp_path / "app2.toml").write_text((tmp_path / "app.toml").read_text().replace("pkgs.toml", "pkgs2.toml")
                                        .replace('version = "1"', 'version = "2"'))
    cli.ok("image", "create", tmp_path / "app2.toml")
    with mount_image(busybox_app["store"], "example.org/app@1", tmp_path / "mnt") as mnt:
        root = mnt.mountpoint
        before = {p: os.lstat(root / p).st_ino for p in ("bin/busybox", "opt/app/code.txt", "usr/share/a/pkg-a.txt")}
        assert (root / "usr/share/b/pkg-b.txt").read_text() == "b\n"
        status = json.loads(cli.ok("status", root, "--json").stdout)
        assert [layer.get("image") is not None for layer in status["layers"]] == [True, True, False]
        assert status["init_layer"] is None and not (root / "proc").exists()
        swap = json.loads(cli.ok("upgrade", root, "example.org/app@2", "--json").stdout)
        assert (root / "usr/share/b/pkg-b.txt").read_text() == "b2\n"
        after = {p: os.lstat(root / p).st_ino for p in before}
        assert after == before  # unchanged files keep their inodes (and kernel caches)
        # /, /usr, /usr/share, /usr/share/b changed; /bin, /etc, /opt and the rest shared unread.
        assert swap["changed_dirs"] == 4, swap
        assert swap["shared_dirs"] >= 8, swap
        cli.ok("rollback", root)
        assert (root / "usr/share/b/pkg-b.txt").read_text() == "b\n"
        # A nested image is one layer of the mounted image: unlink and link address it
        # by position, digest or label, and take all of its layers with it.
        cli.ok("unlink", root, "2")
        assert not (root / "usr/share").exists() and (root / "bin/busybox").exists()
        cli.ok("link", root, "2")
        assert (root / "usr/share/a/pkg-a.txt").read_text() == "a\n"
        cli.ok("unlink", root, status["layers"][0]["image"])
        assert not (root / "bin").exists() and (root / "opt/app/code.txt").exists()


@pytest.mark.fuse
def test_nested_image_exports_flattened_and_umoci_unpacks_the_mount(busybox_app: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    from ociimages import run, skopeo_config
    from test_oci import BUSYBOX_NLINK, root_differences

    cli = busybox_app["cli"]
    out = json.loads(cli.ok("export", "oci", "example.org/app@1", f"oci:{tmp_path / 'out'}:app", "--json").stdout)
    assert len(out["layers"]) == 3 + 2 + 1  # busybox's three, the union's two, the app's code
    config = skopeo_config(f"oci:{tmp_path / 'out'}:app")
    assert config["config"]["Cmd"] == ["/bin/cat", "/opt/app/code.txt"]  # type: ignore[index]
    run("umoci", "unpack", "--image", f"{tmp_path / 'out'}:app", tmp_path / "bundle")
    with mount_image(busybox_app["store"], "example.org/app@1", tmp_path / "mnt") as mnt:
        problems = set(root_differences(compare_mount(tmp_path / "bundle/rootfs", mnt.mountpoint)))
        # umoci makes the parents of /opt/app and /usr/share/{a,b} at unpack time, with the
        # time of the unpack: the export writes no entry for a parent no layer has.
        problems = {p for p in problems if not re.match(r"b'(opt|usr|usr/share)': st_mtime_ns", p)}
        assert problems == BUSYBOX_NLINK, "\n".join(sorted(problems ^ BUSYBOX_NLINK)[:40])


def test_push_and_pull_carry_nested_images(nested_store: tuple[Cli, Path], tmp_path: Path) -> None:
    """A remote holds what an image reaches, nested images included (docs/remote.md)."""
    cli, base = nested_store
    cli.ok("image", "create", base / "app.toml")
    remote = f"file://{tmp_path / 'remote'}"
    cli.ok("push", "example.org/app@1", remote)
    other = Cli(tmp_path / "other")
    other.ok("pull", "example.org/app@1", remote)
    other.ok("verify")
    assert other.ok("cat", "example.org/app@1", "usr/lib/libx.so").stdout == "x"
    tree_lines = other.ok("inspect", "--tree", "example.org/app@1").stdout.splitlines()
    assert [re.findall(r"example\.org/[a-z-]+@1", line)[0] for line in tree_lines][:4] == [
        "example.org/app@1", "example.org/base@1", "example.org/os@1", "example.org/libs@1"]
