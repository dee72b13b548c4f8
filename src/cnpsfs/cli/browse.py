"""``cnpsfs ls`` and ``cnpsfs cat``: looking inside a stored FileSet or image without mounting it."""

from __future__ import annotations

import os
import shutil
import stat
import sys
import time
from typing import Any

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import App, emit_json, fileset_root, json_option, pass_app, remote_options
from cnpsfs.errors import UsageError
from cnpsfs.store import T_IMAGE, Store


def _lookup_path(store: Store, ref: str, path: str) -> tuple[fmt.Entry, list[tuple[bytes, fmt.Entry]] | None, Any]:
    """The entry at *path* in a FileSet or a composed image; its children when a directory.

    Also returns how to read file contents (the image's generation, or None for a FileSet).
    """
    from cnpsfs.image.manifest import compose
    from cnpsfs.image.walk import lookup

    digest = store.resolve(ref)
    if store.object_type(digest) == T_IMAGE:
        generation = compose(store, store.get_image(digest))
        node = generation.resolve(path)
        children = [(name, child.entry) for name, child in generation.listing(node).pairs()] if node.is_dir else None
        return node.entry, children, generation
    entry = lookup(store, fileset_root(store, ref), path)
    if entry.kind is fmt.Kind.DIR and entry.tree is not None:
        return entry, [(e.name, e) for e in store.get_directory(entry.tree).entries], None
    return entry, None, None


def _mode_string(entry: fmt.Entry) -> str:
    return stat.filemode(entry.st_mode) if entry.kind is not fmt.Kind.WHITEOUT else "c-wh------"


def _entry_json(entry: fmt.Entry, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "type": entry.kind.name.lower(), "mode": f"{entry.mode:04o}",
                           "uid": entry.uid, "gid": entry.gid, "mtime_ns": entry.mtime_ns}
    if entry.kind is fmt.Kind.FILE:
        out["size"] = entry.size
    if entry.kind is fmt.Kind.SYMLINK:
        out["target"] = entry.target.decode("utf-8", "surrogateescape")
    if entry.kind in (fmt.Kind.CHARDEV, fmt.Kind.BLOCKDEV):
        out["rdev"] = list(entry.rdev)
    if entry.xattrs:
        out["xattrs"] = sorted(k.decode("utf-8", "backslashreplace") for k in entry.xattrs)
    if entry.link:
        out["nlink"] = entry.link[1]
    return out


def _ls_line(entry: fmt.Entry, name: str) -> str:
    size = entry.size if entry.kind is fmt.Kind.FILE else 0
    if entry.kind in (fmt.Kind.CHARDEV, fmt.Kind.BLOCKDEV):
        size_text = f"{entry.rdev[0]}, {entry.rdev[1]}"
    else:
        size_text = str(size)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry.mtime_ns // 1_000_000_000))
    nlink = entry.link[1] if entry.link else 1
    line = f"{_mode_string(entry)} {nlink:>2} {entry.uid:>5} {entry.gid:>5} {size_text:>10} {when} {name}"
    if entry.kind is fmt.Kind.SYMLINK:
        line += " -> " + entry.target.decode("utf-8", "backslashreplace")
    return line


@click.command("ls")
@remote_options
@click.argument("ref")
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True, help="Long listing: mode, links, owner, size, mtime.")
@json_option
@pass_app
def ls_cmd(app: App, ref: str, path: str, long: bool, as_json: bool) -> None:
    """List PATH (default /) inside REF, a FileSet or an image (composed as mounted)."""
    store = app.store()
    entry, children, _gen = _lookup_path(store, ref, path)
    if children is None:
        children = [(os.path.basename(path.rstrip("/")).encode("utf-8", "surrogateescape"), entry)]
    named = [(name.decode("utf-8", "surrogateescape"), child) for name, child in children]
    if as_json:
        emit_json([_entry_json(e, n) for n, e in named])
        return
    for name, child in named:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        click.echo(_ls_line(child, shown) if long else shown)


@click.command("cat")
@remote_options
@click.argument("ref")
@click.argument("path")
@pass_app
def cat_cmd(app: App, ref: str, path: str) -> None:
    """Write the contents of the regular file PATH inside REF (FileSet or image) to stdout."""
    from cnpsfs.image.reader import FileReader

    store = app.store()
    entry, _children, _gen = _lookup_path(store, ref, path)
    if entry.kind is not fmt.Kind.FILE:
        raise UsageError(f"{path} is a {entry.kind.name.lower()}, not a regular file")
    shutil.copyfileobj(FileReader(store).open(entry), sys.stdout.buffer, 1 << 20)
    sys.stdout.buffer.flush()


COMMANDS = [ls_cmd, cat_cmd]
