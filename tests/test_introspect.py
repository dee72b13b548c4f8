"""Introspection of built images: packages, query, diff and why, checked against facts
about the packages (hello ships /usr/bin/hello; libc6 is glibc's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cnpsfs_testlib import IS_ROOT
from mountutil import FUSE

from cnpsfs.debian.build import build, parse_recipe
from cnpsfs.debian.introspect import diff, image_packages, query, why
from cnpsfs.store import LocalStore, Store

pytestmark = [*FUSE, pytest.mark.skipif(not IS_ROOT, reason="building needs root")]

RECIPE = """
name = "example.org/intro"
version = "{version}"
[debian]
essential = false
packages = [{packages}]
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    store = LocalStore(tmp_path_factory.mktemp("intro") / "store", create=True)
    base = ["dpkg", "dash", "coreutils", "libc-bin", "sed", "grep", "diffutils"]
    build(store, parse_recipe(RECIPE.format(version="1", packages=", ".join(f'"{p}"' for p in base))))
    build(store, parse_recipe(RECIPE.format(version="2", packages=", ".join(f'"{p}"' for p in [*base, "hello"]))))
    yield store
    store.close()


def test_packages_have_sources_and_filesets(built: Store) -> None:
    image = built.get_image(built.resolve("example.org/intro@2"))
    pkgs = {p.package: p for p in image_packages(built, image)}
    assert pkgs["libc6"].source == "glibc"
    assert pkgs["hello"].fileset.startswith("blake3:")
    assert len(pkgs["hello"].sha256) == 64


def test_query(built: Store) -> None:
    assert [h["image"] for h in query(built, "hello")] == ["example.org/intro@2"]
    assert [h["image"] for h in query(built, "hello>=2.10")] == ["example.org/intro@2"]
    assert query(built, "hello<2.10") == []
    assert {h["image"] for h in query(built, "libc6>2.0")} == {"example.org/intro@1", "example.org/intro@2"}


def test_diff(built: Store) -> None:
    result = diff(built, "example.org/intro@1", "example.org/intro@2")
    assert [p["package"] for p in result["packages"]["added"]] == ["hello"]
    assert result["packages"]["removed"] == [] and result["packages"]["changed"] == []
    paths = {f["path"]: f["change"] for f in result["files"]}
    assert paths.get("/usr/bin/hello") == "added"
    assert result["skipped_subtrees"] > 0


def test_why(built: Store) -> None:
    answer = why(built, "example.org/intro@2", "/usr/bin/hello")
    assert answer["package"].startswith("hello ")
    answer = why(built, "example.org/intro@2", "/var/lib/dpkg/status")
    assert answer["package"] is None and answer["label"] in ("configure", "dpkg database")


def test_cli(built: Store, tmp_path: Path) -> None:
    from cnpsfs_testlib import Cli

    cli = Cli(built.path)
    out = cli("query", "hello>=2")
    assert out.rc == 0 and "example.org/intro@2" in out.stdout
    assert cli("query", "hello>>99").rc == 1
    assert "package hello" in cli("why", "example.org/intro@2", "/usr/bin/hello").stdout
    assert "+ hello" in cli("diff", "example.org/intro@1", "example.org/intro@2").stdout


def test_packages_query_and_why_see_through_nesting(built: Store, tmp_path: Path) -> None:
    """An app image nesting the built image (union, nested in layers mode as a group)."""
    from cnpsfs_testlib import Cli

    from cnpsfs.ingest.directory import import_directory
    from cnpsfs.ingest.tree import ImportOptions

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "run").write_text("#!/bin/sh\necho app\n")
    import_directory(built, str(tmp_path / "code"), ImportOptions(name="example.org/intro-code", version="1"))
    (tmp_path / "app.toml").write_text('name = "example.org/intro-app"\nversion = "1"\n'
                                       '[[layers]]\nimage = "example.org/intro@2"\n'
                                       '[[layers]]\nfileset = "example.org/intro-code@1"\nat = "/opt/app"\n')
    cli = Cli(built.path)
    cli.ok("image", "create", tmp_path / "app.toml")
    app = built.get_image(built.resolve("example.org/intro-app@1"))
    base = built.get_image(built.resolve("example.org/intro@2"))
    assert image_packages(built, app) == image_packages(built, base)
    assert [h["image"] for h in query(built, "hello")] == ["example.org/intro-app@1", "example.org/intro@2"]
    answer = why(built, "example.org/intro-app@1", "/usr/bin/hello")
    assert answer["package"].startswith("hello ") and answer["via"] == ["example.org/intro@2"]
    assert answer["layer"] == 1
    answer = why(built, "example.org/intro-app@1", "/opt/app/run")
    assert answer["package"] is None and answer["name"] == "example.org/intro-code@1" and answer["via"] == []
    assert "hello" in cli.ok("packages", "example.org/intro-app@1").stdout
    assert "layer 1 in example.org/intro@2 " in cli.ok("why", "example.org/intro-app@1", "/usr/bin/hello").stdout
