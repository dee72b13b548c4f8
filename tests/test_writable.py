"""Writable mounts (overlayfs over the FUSE composition) and `cnpsfs commit`, on real mounts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mountutil import cnpsfs, is_mounted, mount_fstype, mount_image, needs_root, require_fuse

pytestmark = [needs_root, pytest.mark.fuse]


def _last(result) -> str:  # type: ignore[no-untyped-def]
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, str]:
    """A two-layer image: a base tree, and an app layer at /opt/app."""
    require_fuse()
    store = tmp_path / "store"
    base = tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "hostname").write_text("base\n")
    (base / "etc" / "keep").write_text("kept\n")
    (base / "usr" / "share" / "doc" / "pkg").mkdir(parents=True)
    (base / "usr" / "share" / "doc" / "pkg" / "README").write_text("old docs\n")
    (base / "usr" / "share" / "doc" / "other").write_text("other\n")
    app = tmp_path / "app"
    app.mkdir()
    (app / "run").write_text("#!/bin/sh\necho app\n")
    _last(cnpsfs("import", "dir", base, "--name", "example.org/base", "--version", "1", store=store))
    _last(cnpsfs("import", "dir", app, "--name", "example.org/app", "--version", "1", store=store))
    manifest = tmp_path / "image.toml"
    manifest.write_text('name = "example.org/img"\nversion = "1"\n'
                        '[[layers]]\nfileset = "example.org/base@1"\n'
                        '[[layers]]\nfileset = "example.org/app@1"\nat = "/opt/app"\n')
    _last(cnpsfs("image", "create", manifest, store=store))
    return store, "example.org/img@1"


def _cnpsfs_mounts() -> set[bytes]:
    """Mount points of the cnpsfs FUSE mounts in this namespace."""
    found = set()
    for line in Path("/proc/self/mountinfo").read_bytes().splitlines():
        fields = line.split(b" - ", 1)
        if len(fields) == 2 and fields[1].split()[0].startswith(b"fuse") and b"cnpsfs" in fields[1]:
            found.add(fields[0].split()[4])
    return found


def _change(root: Path) -> None:
    (root / "etc" / "hostname").write_text("changed\n")  # copy-up of a lower file
    (root / "etc" / "new").write_text("new file\n")  # a new file
    (root / "etc" / "keep").unlink()  # a whiteout
    doc = root / "usr" / "share" / "doc"
    for child in doc.iterdir():  # an opaque directory: everything below replaced
        if child.is_dir():
            for inner in child.iterdir():
                inner.unlink()
            child.rmdir()
        else:
            child.unlink()
    doc.rmdir()
    doc.mkdir()
    (doc / "only").write_text("only this\n")
    (root / "opt" / "app" / "run").unlink()


def _expected(root: Path) -> None:
    assert (root / "etc" / "hostname").read_text() == "changed\n"
    assert (root / "etc" / "new").read_text() == "new file\n"
    assert not (root / "etc" / "keep").exists()
    assert sorted(os.listdir(root / "usr" / "share" / "doc")) == ["only"]
    assert not (root / "opt" / "app" / "run").exists()


def test_writes_persist_in_the_upper_dir_and_not_in_the_image(image: tuple[Path, str], tmp_path: Path) -> None:
    store, ref = image
    upper = tmp_path / "upper"
    mnt = tmp_path / "mnt"
    before = _cnpsfs_mounts()
    with mount_image(store, ref, mnt, args=["--writable", str(upper)]):
        assert mount_fstype(mnt) == "overlay"
        # Only the private lower of this mount: other runs on the host mount and unmount meanwhile.
        ours = {m for m in _cnpsfs_mounts() - before if m.endswith(b".lower")}
        assert ours, "the FUSE lower of a writable mount is not in mountinfo"
        _change(mnt)
        _expected(mnt)
        state = json.loads((upper / "cnpsfs-upper.json").read_text())
        assert state["image"] == ref
        refused = cnpsfs("upgrade", mnt, ref)
        assert refused.returncode != 0
        assert "writable" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not is_mounted(mnt)
    # The lower FUSE mount went down too (other tests' mounts may come and go meanwhile).
    assert not ours & _cnpsfs_mounts()
    assert (upper / "upper" / "etc" / "new").read_text() == "new file\n"
    listing = cnpsfs("ls", ref, "/etc", store=store)
    assert "new" not in listing.stdout.split() and "keep" in listing.stdout.split()
    # Remounting over the same upper dir shows the same changes.
    with mount_image(store, ref, mnt, args=["--writable", str(upper)]):
        _expected(mnt)


def test_commit_turns_whiteouts_and_opaque_dirs_into_a_layer(image: tuple[Path, str], tmp_path: Path) -> None:
    store, ref = image
    upper = tmp_path / "upper"
    mnt = tmp_path / "mnt"
    with mount_image(store, ref, mnt, args=["--writable", str(upper)]):
        _change(mnt)
    result = cnpsfs("commit", upper, "--onto", ref, "--name", "example.org/img", "--version", "2", "--json",
                    store=store)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["name"] == "example.org/img/changes" and out["image"]["name"] == "example.org/img"
    layer = cnpsfs("ls", "--json", out["fileset"], "/etc", store=store)
    kinds = {e["name"]: e["type"] for e in json.loads(layer.stdout)}
    assert kinds["keep"] == "whiteout" and kinds["new"] == "file"
    inspect = json.loads(cnpsfs("inspect", "--json", "example.org/img@2", store=store).stdout)
    assert [layer["name"] for layer in inspect["layers"]] == ["example.org/base", "example.org/app",
                                                             "example.org/img/changes"]
    # The committed image, mounted read-only, shows exactly what the instance saw.
    with mount_image(store, "example.org/img@2", mnt):
        _expected(mnt)
        assert (mnt / "etc" / "keep").exists() is False


def test_commit_of_a_directory_that_is_not_an_upper_dir_is_refused(image: tuple[Path, str], tmp_path: Path) -> None:
    store, _ref = image
    plain = tmp_path / "plain"
    plain.mkdir()
    result = cnpsfs("commit", plain, store=store)
    assert result.returncode != 0
    assert "not a cnpsfs writable upper dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
