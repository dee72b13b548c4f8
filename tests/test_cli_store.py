"""The store-facing CLI: references, tags, names, errors a user can make, and the
commands that report on a store (ls, cat, df, verify, gc).

Every failure must be one line on stderr, a non-zero exit (2 for usage errors), and no
traceback; commands that only read a store must never create one.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli, CliResult, Node, build_tree, digest_of, index_counts

from cnpsfs import format as fmt
from cnpsfs.store import LocalStore


def one_line_error(result: CliResult, rc: int, *needles: str) -> None:
    assert result.rc == rc, str(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnpsfs: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def shared_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


@pytest.fixture
def two_versions(tmp_path: Path, cli: Cli) -> tuple[str, str]:
    v1 = build_tree(tmp_path / "v1", [Node(b"version", "file", data=b"one\n", mtime_ns=1)], root_mtime_ns=1)
    v2 = build_tree(tmp_path / "v2", [Node(b"version", "file", data=b"two\n", mtime_ns=2)], root_mtime_ns=2)
    d1 = digest_of(cli.ok("import", "dir", v1, "--name", "example.org/app", "--version", "1.0"))
    d2 = digest_of(cli.ok("import", "dir", v2, "--name", "example.org/app", "--version", "2.0"))
    return d1, d2


# --------------------------------------------------------------------------- references


def test_name_resolves_to_the_newest_tag(cli: Cli, two_versions: tuple[str, str]) -> None:
    d1, d2 = two_versions
    assert cli.ok("cat", "example.org/app", "version").stdout == "two\n"
    assert cli.ok("cat", "example.org/app@1.0", "version").stdout == "one\n"
    # Newest means most recently tagged, not the highest version string.
    cli.ok("tag", "set", "example.org/app@0.9-rollback", d1)
    assert cli.ok("cat", "example.org/app", "version").stdout == "one\n"
    tags = json.loads(cli.ok("tag", "list", "--json").stdout)
    assert {(t["version"], t["digest"], t["type"]) for t in tags} == {
        ("1.0", d1, "fileset"), ("2.0", d2, "fileset"), ("0.9-rollback", d1, "fileset")}
    assert "example.org/app@2.0" in cli.ok("tag", "list").stdout


def test_digest_prefixes(cli: Cli, two_versions: tuple[str, str]) -> None:
    d1, d2 = two_versions
    hex1 = d1[len("blake3:"):]
    # Enough digits to be unique among FileSets and images (the two share no long prefix).
    common = shared_prefix(hex1, d2[len("blake3:"):])
    for n in sorted({max(4, common + 1), max(5, common + 2), 11, 64}):
        assert cli.ok("cat", "blake3:" + hex1[:n], "version").stdout == "one\n", n
    assert cli.ok("cat", "blake3:" + hex1[:12].upper(), "version").stdout == "one\n"
    one_line_error(cli("ls", "blake3:" + hex1[:3]), 2, "4 to 64 hex digits")
    one_line_error(cli("ls", "blake3:" + "z" * 8), 2, "hex digits")
    one_line_error(cli("ls", "blake3:" + hex1 + "0"), 2, "4 to 64")


def test_ambiguous_and_unknown_prefixes(tmp_path: Path, cli: Cli) -> None:
    d = digest_of(cli.ok("import", "dir", build_tree(tmp_path / "t", [Node(b"f", "file", data=b"f")]),
                         "--name", "example.org/base"))
    store = LocalStore(cli.store_path)
    root = store.get_fileset(fmt.parse_digest(d)).root
    with store.writer() as w:
        made = [w.add_object(fmt.encode_fileset(fmt.FileSet("example.org/amb", str(i), root))) for i in range(3000)]
        w.commit()
    store.close()
    by_prefix = collections.defaultdict(list)
    for digest in [*made, fmt.parse_digest(d)]:
        by_prefix[digest.hex()[:4]].append(digest)
    shared = next(p for p, ds in sorted(by_prefix.items()) if len(ds) > 1)
    one_line_error(cli("ls", "blake3:" + shared), 2, "ambiguous reference", shared)
    # A longer prefix picks one of them.
    first = by_prefix[shared][0].hex()
    second = by_prefix[shared][1].hex()
    n = shared_prefix(first, second) + 1
    assert cli.ok("ls", "blake3:" + first[:n]).stdout == "f\n"
    unused = next(f"{i:04x}" for i in range(1 << 16) if f"{i:04x}" not in by_prefix)
    one_line_error(cli("ls", "blake3:" + unused), 1, "unknown reference", unused)


def test_unknown_references(cli: Cli, two_versions: tuple[str, str]) -> None:
    for ref in ("example.org/nothing", "example.org/app@9.9", "blake3:" + "f" * 64):
        one_line_error(cli("ls", ref), 1, "unknown reference", ref)
        one_line_error(cli("cat", ref, "version"), 1, "unknown reference")
        one_line_error(cli("export", "tar", ref, "-"), 1, "unknown reference")
    one_line_error(cli("verify", "example.org/nothing"), 1, "unknown reference")


def test_a_digest_that_is_not_a_fileset(tmp_path: Path, cli: Cli, two_versions: tuple[str, str]) -> None:
    d1, _d2 = two_versions
    store = LocalStore(cli.store_path)
    tree = store.get_fileset(fmt.parse_digest(d1)).root.tree
    store.close()
    assert tree is not None
    one_line_error(cli("ls", fmt.format_digest(tree)), 2, "directory", "expected a FileSet")
    one_line_error(cli("tag", "set", "example.org/x@1", fmt.format_digest(tree)), 2, "not a FileSet or an image")


def test_paths_inside_a_fileset(cli: Cli, two_versions: tuple[str, str]) -> None:
    one_line_error(cli("ls", "example.org/app", "/nope"), 1, "no such path", "/nope")
    one_line_error(cli("ls", "example.org/app", "/version/below"), 1, "not a directory")
    one_line_error(cli("cat", "example.org/app", "/"), 2, "not a regular file")
    assert cli.ok("ls", "example.org/app", "version").stdout == "version\n"
    long = cli.ok("ls", "-l", "example.org/app").stdout
    assert long.startswith("-rw-") and long.rstrip().endswith("version")


# --------------------------------------------------------------------------- names and tags


@pytest.mark.parametrize("name", ["Bad_Name", "example.org", "example.org/", "-x.org/a", "example.org/a b",
                                  "EXAMPLE.org/a", "example..org/a", "example.org//a", "/example.org/a"])
def test_bad_names_are_usage_errors(tmp_path: Path, cli: Cli, name: str) -> None:
    tree = build_tree(tmp_path / "t", [Node(b"f", "file", data=b"f")])
    one_line_error(cli("import", "dir", tree, "--name", name), 2, "invalid name", repr(name))
    assert not cli.store_path.exists() or index_counts(cli.store_path)["objects"] == 0
    one_line_error(cli("tag", "set", "--", f"{name}@1", "blake3:" + "0" * 64), 2, "invalid name")


@pytest.mark.parametrize("version", ["1 2", "a/b", "", "ü"])
def test_bad_versions(tmp_path: Path, cli: Cli, version: str) -> None:
    tree = build_tree(tmp_path / "t", [Node(b"f", "file", data=b"f")])
    result = cli("import", "dir", tree, "--name", "example.org/ok", "--version", version)
    if version == "":  # an empty --version means the default, "latest"
        assert result.rc == 0
        return
    one_line_error(result, 2, "invalid version")


def test_good_names(tmp_path: Path, cli: Cli) -> None:
    tree = build_tree(tmp_path / "t", [Node(b"f", "file", data=b"f")])
    for name, version in (("debian.org/bash", "5.2.15-2+b7_amd64"), ("a.b-c.io/x/Y_z.1", "1:2.3~rc1"),
                          ("localhost/x", "latest")):
        cli.ok("import", "dir", tree, "--name", name, "--version", version)
    refs = {f"{t['name']}@{t['version']}" for t in json.loads(cli.ok("tag", "list", "--json").stdout)}
    assert refs == {"debian.org/bash@5.2.15-2+b7_amd64", "a.b-c.io/x/Y_z.1@1:2.3~rc1", "localhost/x@latest"}
    # The default name comes from the directory, the default version is "latest".
    cli.ok("import", "dir", tree)
    assert "localhost/t@latest" in cli.ok("tag", "list").stdout


def test_version_needs_a_name(tmp_path: Path, cli: Cli) -> None:
    tree = build_tree(tmp_path / "t", [Node(b"f", "file", data=b"f")])
    one_line_error(cli("import", "dir", tree, "--version", "1"), 2, "--version needs --name")


def test_tag_set_and_rm(cli: Cli, two_versions: tuple[str, str]) -> None:
    d1, _d2 = two_versions
    one_line_error(cli("tag", "set", "example.org/app", d1), 2, "NAME@VERSION")
    one_line_error(cli("tag", "set", "example.org/app@bad version", d1), 2, "invalid version")
    cli.ok("tag", "set", "example.org/other@1", d1[:14])
    assert cli.ok("cat", "example.org/other@1", "version").stdout == "one\n"
    cli.ok("tag", "rm", "example.org/other@1")
    one_line_error(cli("tag", "rm", "example.org/other@1"), 1, "no such tag")
    one_line_error(cli("cat", "example.org/other", "version"), 1, "unknown reference")
    # Removing a tag removes only the name: the objects stay until gc.
    assert cli.ok("cat", d1, "version").stdout == "one\n"


# --------------------------------------------------------------------------- stores


@pytest.mark.parametrize("args", [["ls", "example.org/x"], ["tag", "list"], ["verify"], ["df"], ["gc"],
                                  ["cat", "example.org/x", "f"], ["export", "tar", "example.org/x", "-"],
                                  ["tag", "rm", "example.org/x@1"]])
def test_missing_store(tmp_path: Path, cli: Cli, args: list[str]) -> None:
    one_line_error(cli(*args), 1, "no cnpsfs store at", str(cli.store_path))
    assert not cli.store_path.exists(), "reading commands must not create a store"


def test_store_from_environment(tmp_path: Path, cli: Cli) -> None:
    tree = build_tree(tmp_path / "t", [Node(b"f", "file", data=b"env")])
    env_store = tmp_path / "env-store"
    import subprocess

    from cnpsfs_testlib import CNPSFS

    proc = subprocess.run([*CNPSFS, "import", "dir", str(tree), "--name", "example.org/env"], capture_output=True,
                          env={**os.environ, "CNPSFS_STORE": str(env_store)})
    assert proc.returncode == 0, proc.stderr
    assert (env_store / "cnpsfs-store").exists()
    assert cli.ok("cat", "example.org/env", "f", store=env_store).stdout == "env"


def test_store_path_that_cannot_be_created(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "plain-file").write_text("")
    tree = build_tree(tmp_path / "t", [Node(b"f", "file", data=b"f")])
    one_line_error(cli("import", "dir", tree, store=tmp_path / "plain-file" / "store"), 1, "cannot create store")


def test_export_refuses_a_non_empty_directory(tmp_path: Path, cli: Cli, two_versions: tuple[str, str]) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "precious").write_text("keep me")
    one_line_error(cli("export", "dir", "example.org/app", dest), 1, "not an empty directory")
    assert (dest / "precious").read_text() == "keep me"
    cli.ok("export", "dir", "example.org/app", tmp_path / "fresh")
    assert (tmp_path / "fresh" / "version").read_text() == "two\n"


# --------------------------------------------------------------------------- reports


def test_verify_gc_df_reports(tmp_path: Path, cli: Cli, two_versions: tuple[str, str]) -> None:
    d1, _d2 = two_versions
    result = cli.ok("verify")
    assert result.stdout == "" and "no problems" in result.stderr
    report = json.loads(cli.ok("verify", "--json").stdout)
    assert report == {"checked": index_counts(cli.store_path)["objects"], "problems": [], "repairable": False,
                      "leftovers": []}
    scoped = json.loads(cli.ok("verify", "--json", d1).stdout)
    assert 0 < scoped["checked"] < report["checked"]
    df = json.loads(cli.ok("df", "--json").stdout)
    assert df["filesets"] == 2 and df["images"] == 0 and df["logical_bytes"] == 8
    assert df["objects"] == 4 and df["chunks"] == 2 and df["packs"] == 2  # 2 FileSets, 2 directories
    gc = json.loads(cli.ok("gc", "--json").stdout)
    assert (gc["removed_objects"], gc["removed_packs"], gc["removed_tmp"]) == (0, 0, 0)
    assert "would remove 0 objects" in cli.ok("gc", "--dry-run").stdout
    cli.ok("tag", "rm", "example.org/app@1.0")
    dry = json.loads(cli.ok("gc", "--dry-run", "--json").stdout)
    assert dry["removed_objects"] == 3  # FileSet, root directory, chunk
    assert cli.ok("cat", d1, "version").stdout == "one\n", "a dry run removes nothing"
    assert json.loads(cli.ok("gc", "--json").stdout)["removed_objects"] == 3
    one_line_error(cli("cat", d1, "version"), 1, "unknown reference")


@pytest.mark.parametrize(("argv", "culprit"), [
    (("mount",), "missing argument 'REF|MANIFEST'"),
    (("ls", "--bogus", "x"), "no such option '--bogus'"),
    (("frobnicate",), "no such command 'frobnicate'"),
    (("--log-level", "loud", "ls", "x"), "invalid value for '--log-level'"),
])
def test_click_usage_errors_are_one_line(cli: Cli, argv: tuple[str, ...], culprit: str) -> None:
    """Mistyped command lines get the same one-line treatment as every other error."""
    one_line_error(cli(*argv), 2, culprit)
