"""Layer semantics seen through a real mount: OCI tar layers with whiteouts and opaque
directories, replacement both ways, `at` placement, an unlinked layer, and a union of
packages with an override layer, in both FUSE modes (tests/test_compose.py has the rules
case by case, in-process).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cnpsfs_testlib import Cli
from mountutil import FUSE, FUSE_MODES_STOCK_LONG, Mount, mount_image, write_manifest

pytestmark = FUSE

MTIME = 1_700_000_000


def make_tar(path: Path, members: dict[str, bytes | str | None]) -> Path:
    """A tar of *members*: bytes/str are files, None a directory, "->x" a symlink to x."""
    with tarfile.open(path, "w") as tf:
        for name, value in members.items():
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            if value is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif isinstance(value, str) and value.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, value[2:]
                tf.addfile(info)
            else:
                data = value.encode() if isinstance(value, str) else value
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("layers")
    cli = Cli(base / "store")
    layers = {
        "base": {"etc/": None, "etc/hostname": "base\n", "etc/motd": "hello\n", "etc/conf.d/a": "a\n",
                 "etc/conf.d/b": "b\n", "var/": None, "var/thing": "file below\n", "srv/data/": None,
                 "srv/data/x": "x\n", "lib": "->usr/lib", "usr/lib/libc.so": "libc\n"},
        "update": {"etc/.wh.motd": "", "etc/hostname": "updated\n", "etc/conf.d/.wh..wh..opq": "",
                   "etc/conf.d/c": "c\n", "var/thing/": None, "var/thing/inside": "now a dir\n",
                   "srv/data": "now a file\n"},
        "junk": {"etc/hostname": "junk\n", "etc/.wh.conf.d": ""},
        "app": {"bin/app": "#!/bin/sh\necho app\n", "share/readme": "app docs\n"},
    }
    for name, members in layers.items():
        cli.ok("import", "tar", make_tar(base / f"{name}.tar", members), "--name", f"example.org/{name}",
               "--version", "1")
    write_manifest(base / "layers.toml", "example.org/layered", [
        "example.org/base@1", "example.org/update@1", {"fileset": "example.org/junk@1", "unlinked": True},
        {"fileset": "example.org/app@1", "at": "/opt/app"}])
    cli.ok("image", "create", base / "layers.toml")
    packages = {
        "pkg-a": {"usr/bin/a": "a\n", "usr/share/doc/common": "same\n", "var/lib/dpkg/status": "a\n"},
        "pkg-b": {"usr/bin/b": "b\n", "usr/share/doc/common": "same\n", "var/lib/dpkg/info/b.list": "b\n"},
        "dpkg-db": {"var/lib/dpkg/status": "a and b\n", "usr/bin/.wh.b": ""},
    }
    for name, members in packages.items():
        cli.ok("import", "tar", make_tar(base / f"{name}.tar", members), "--name", f"example.org/{name}",
               "--version", "1")
    write_manifest(base / "union.toml", "example.org/union", [
        "example.org/pkg-a@1", "example.org/pkg-b@1", {"fileset": "example.org/dpkg-db@1", "override": True}],
        mode="union")
    cli.ok("image", "create", base / "union.toml")
    return base / "store"


@pytest.fixture(scope="module", params=FUSE_MODES_STOCK_LONG)
def layered(images: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    fuse_mode = request.param
    with mount_image(images, "example.org/layered@1", tmp_path_factory.mktemp(f"layered-{fuse_mode}"),
                     mode=fuse_mode) as m:
        yield m


@pytest.fixture(scope="module", params=FUSE_MODES_STOCK_LONG)
def union(images: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    fuse_mode = request.param
    with mount_image(images, "example.org/union@1", tmp_path_factory.mktemp(f"union-{fuse_mode}"),
                     mode=fuse_mode) as m:
        yield m


def read(path: Path) -> str:
    return path.read_text()


def test_upper_file_wins_and_whiteout_hides(layered: Mount) -> None:
    assert read(layered / "etc/hostname") == "updated\n"
    assert sorted(os.listdir(layered / "etc")) == ["conf.d", "hostname"]
    assert not os.path.lexists(layered / "etc/motd")
    assert not any(name.startswith(".wh.") for _d, dirs, files in os.walk(layered.mountpoint) for name in dirs + files)


def test_opaque_directory(layered: Mount) -> None:
    assert os.listdir(layered / "etc/conf.d") == ["c"]
    assert not os.path.lexists(layered / "etc/conf.d/a")


def test_replacement_both_ways(layered: Mount) -> None:
    assert stat.S_ISDIR(os.lstat(layered / "var/thing").st_mode)
    assert read(layered / "var/thing/inside") == "now a dir\n"
    assert stat.S_ISREG(os.lstat(layered / "srv/data").st_mode)
    assert read(layered / "srv/data") == "now a file\n"
    assert os.lstat(layered / "srv").st_nlink == 2, "srv has no subdirectory any more"
    assert os.readlink(layered / "lib") == "usr/lib" and read(layered / "lib/libc.so") == "libc\n"


def test_unlinked_layer_is_absent_and_at_places_a_layer(layered: Mount) -> None:
    assert sorted(os.listdir(layered.mountpoint)) == ["etc", "lib", "opt", "srv", "usr", "var"]
    assert os.listdir(layered / "opt") == ["app"]
    assert sorted(os.listdir(layered / "opt/app")) == ["bin", "share"]
    assert read(layered / "opt/app/share/readme") == "app docs\n"
    opt = os.lstat(layered / "opt")
    assert (stat.S_IMODE(opt.st_mode), opt.st_uid, opt.st_gid, opt.st_nlink) == (0o755, 0, 0, 3)
    status = layered.status()
    assert [layer["unlinked"] for layer in status["layers"]] == [False, False, True, False]
    assert [layer["at"] for layer in status["layers"]][-1] == "/opt/app"


def test_union_of_packages_with_an_override_layer(union: Mount) -> None:
    assert sorted(os.listdir(union / "usr/bin")) == ["a"], "a whiteout in an override layer works"
    assert os.listdir(union / "var/lib/dpkg/info") == ["b.list"]
    assert read(union / "usr/share/doc/common") == "same\n"
    assert read(union / "var/lib/dpkg/status") == "a and b\n", "the override layer wins"
    assert union.status()["image"]["mode"] == "union"
