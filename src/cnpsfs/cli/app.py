"""The ``cnpsfs`` command line.

Every command resolves its store the same way and reports errors the same way: one
line on stderr naming the culprit, a non-zero exit, and a traceback only with --debug.
Machine-readable output (``--json``) goes to stdout; references a script wants (the
digest an import produced) are the last line of stdout.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from cnpsfs import __version__
from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, NotFoundError, UsageError
from cnpsfs.store import (
    T_FILESET,
    T_IMAGE,
    TYPE_NAMES,
    Store,
    check_tag_name,
    check_tag_version,
    default_store_path,
)

log = logging.getLogger("cnpsfs")

MAIN_HELP = """\
Mount root filesystems composed from content-addressed FileSets.

cnpsfs keeps files in a deduplicating content store: every file is cut into
content-defined chunks named by their BLAKE3 digest and kept zstd-compressed;
directories, FileSets (a named, versioned set of files such as a Debian package
or an OCI layer) and images (an ordered list of FileSets plus run config) are
canonical objects named by their digest. `cnpsfs mount` serves an image over
FUSE without extracting anything: directories are read when looked up, chunks
when their bytes are read, each verified before use.

\b
STORE
  --store DIR, else $CNPSFS_STORE, else /var/lib/cnpsfs (root) or
  $XDG_DATA_HOME/cnpsfs (other users).

\b
REFERENCES
  blake3:<hex>     a digest; a unique prefix of 4 or more hex digits is enough
  NAME@VERSION     a tag, e.g. debian.org/bash@5.2.15-2+b7_amd64
  NAME             the most recently tagged version of NAME

\b
EXIT STATUS
  0 success, 1 failure (the message names the culprit), 2 usage error.

\b
EXAMPLES
  cnpsfs import dir ./rootfs --name example.org/rootfs --version 1
  cnpsfs import tar layer.tar.gz --name example.org/layer --version 1
  cnpsfs ls -l example.org/rootfs /etc
  cnpsfs export tar example.org/rootfs@1 - | tar -t
  cnpsfs verify && cnpsfs df

Run `cnpsfs COMMAND --help` for each command's options. docs/cli.md has the
full reference.
"""


@dataclass
class App:
    store_path: Path
    debug: bool
    _store: Store | None = None

    def store(self, *, create: bool = False) -> Store:
        if self._store is None:
            self._store = Store(self.store_path, create=create)
        return self._store


class CnpsfsGroup(click.Group):
    """Translates domain errors into one-line messages and exit codes."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Click's standalone mode, except that a usage error is one line, like every other error."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `cnpsfs` or `cnpsfs import`: the help
                click.echo(exc.format_message())
                sys.exit(exc.exit_code)
            command = exc.ctx.command_path if exc.ctx is not None else "cnpsfs"
            message = exc.format_message().rstrip(".")
            click.echo(f"cnpsfs: error: {message[:1].lower()}{message[1:]} (see '{command} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("cnpsfs: error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CnpsfsError as exc:
            _fail(ctx, str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", 130)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(1)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:
            _fail(ctx, f"internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)", 70)


def _fail(ctx: click.Context, message: str, code: int) -> NoReturn:
    app = ctx.obj
    if isinstance(app, App) and app.debug:
        traceback.print_exc()
    click.echo(f"cnpsfs: error: {message}", err=True)
    sys.exit(code)


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("cnpsfs: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


@click.group(cls=CnpsfsGroup, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                                   "max_content_width": 100})
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Content store directory (default: $CNPSFS_STORE, /var/lib/cnpsfs for root).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, help="Logging threshold for messages on stderr.")
@click.version_option(__version__, prog_name="cnpsfs")
@click.pass_context
def main(ctx: click.Context, store_path: Path | None, debug: bool, log_level: str) -> None:
    _configure_logging("debug" if debug else log_level)
    ctx.obj = App(store_path or default_store_path(), debug)


pass_app = click.make_pass_decorator(App)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- import


@main.group("import")
def import_group() -> None:
    """Import a directory tree, a tar archive or Debian packages as FileSets."""


def _import_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--name", help="FileSet name, DNS-rooted (e.g. example.org/app). Tagged NAME@VERSION."),
        click.option("--version", "version_", metavar="VERSION",
                     help="FileSet version (default: 'latest' when --name is given)."),
        click.option("--source-date-epoch", type=int, default=None, envvar="SOURCE_DATE_EPOCH",
                     help="Clamp every mtime to this Unix time (default: $SOURCE_DATE_EPOCH)."),
        click.option("--strip-volatile", is_flag=True,
                     help="Drop paths that differ on every build (machine-id, logs, caches; see docs)."),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _make_options(name: str | None, version: str | None, sde: int | None, strip: bool, default_name: str) -> Any:
    from cnpsfs.ingest.tree import ImportOptions

    if version and not name:
        raise UsageError("--version needs --name")
    name = name or default_name
    version = version or "latest"
    check_tag_name(name)
    check_tag_version(version)
    return ImportOptions(source_date_epoch=sde, strip_volatile=strip, name=name, version=version)


def _default_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(os.path.abspath(path))) or "root"
    clean = "".join(c if c.isalnum() or c in "._+-" else "-" for c in base) or "root"
    return f"localhost/{clean}"


def _report_import(result: Any, as_json: bool, seconds: float) -> None:
    ref = fmt.format_digest(result.digest)
    summary = {"digest": ref, "name": result.fileset.name, "version": result.fileset.version,
               "entries": result.entries, "logical_bytes": result.logical_bytes,
               "new_bytes": result.new_bytes, "seconds": round(seconds, 3)}
    if as_json:
        emit_json(summary)
        return
    click.echo(f"imported {result.fileset.name}@{result.fileset.version}: {result.entries} entries, "
               f"{_human(result.logical_bytes)} of data, {_human(result.new_bytes)} newly stored "
               f"in {seconds:.2f}s", err=True)
    click.echo(ref)


@import_group.command("dir")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@_import_options
@pass_app
def import_dir(app: App, path: str, name: str | None, version_: str | None, source_date_epoch: int | None,
               strip_volatile: bool, as_json: bool) -> None:
    """Import the directory tree at PATH as a FileSet.

    Keeps contents, types, modes (with setuid/setgid/sticky), owners, nanosecond
    mtimes, symlink targets, hard links, devices, FIFOs and extended attributes
    (security.selinux and trusted.overlay.* are host state and are skipped). Does not
    descend into other mounted filesystems. Prints the FileSet digest last on stdout.
    """
    from cnpsfs.ingest.directory import import_directory, tree_size
    from cnpsfs.progress import byte_progress

    options = _make_options(name, version_, source_date_epoch, strip_volatile, _default_name(path))
    store = app.store(create=True)
    start = time.monotonic()
    total = tree_size(path) if sys.stderr.isatty() else None
    with byte_progress(f"importing {path}", total) as advance:
        result = import_directory(store, path, options, on_progress=advance)
    _report_import(result, as_json, time.monotonic() - start)


@import_group.command("tar")
@click.argument("file", metavar="FILE|-")
@_import_options
@pass_app
def import_tar_cmd(app: App, file: str, name: str | None, version_: str | None, source_date_epoch: int | None,
                   strip_volatile: bool, as_json: bool) -> None:
    """Import a tar archive (plain, gzip, xz, bzip2 or zstd; '-' reads stdin).

    OCI layer whiteouts (.wh.NAME) and opaque markers (.wh..wh..opq) become format
    whiteouts. Members with absolute paths, '..', paths through symlinks, duplicate
    names, hard links to missing members or unknown types reject the whole archive:
    nothing is stored. Prints the FileSet digest last on stdout.
    """
    from cnpsfs.ingest.tar import import_tar
    from cnpsfs.progress import byte_progress

    default = "localhost/stdin" if file == "-" else _default_name(file.split(".tar")[0].split(".tgz")[0])
    options = _make_options(name, version_, source_date_epoch, strip_volatile, default)
    store = app.store(create=True)
    start = time.monotonic()
    with byte_progress(f"importing {file}", None) as advance:
        result = import_tar(store, file, options, on_progress=advance)
    _report_import(result, as_json, time.monotonic() - start)


# --------------------------------------------------------------------------- browsing


def _resolve_root(store: Store, ref: str) -> fmt.Entry:
    digest = store.resolve(ref)
    type_code = store.object_type(digest)
    if type_code == T_FILESET:
        return store.get_fileset(digest).root
    raise UsageError(f"{ref} is a {TYPE_NAMES.get(type_code or -1, 'object')}; expected a FileSet")


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
        children = [(name, child.entry) for name, child in generation.listing(node)] if node.is_dir else None
        return node.entry, children, generation
    entry = lookup(store, _resolve_root(store, ref), path)
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


@main.command("ls")
@click.argument("ref")
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True, help="Long listing: mode, links, owner, size, mtime.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
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


@main.command("cat")
@click.argument("ref")
@click.argument("path")
@pass_app
def cat_cmd(app: App, ref: str, path: str) -> None:
    """Write the contents of the regular file PATH inside REF (FileSet or image) to stdout."""
    from cnpsfs.image.reader import ChunkCache, ExtentMap, cached_getter, read_range

    store = app.store()
    entry, _children, _gen = _lookup_path(store, ref, path)
    if entry.kind is not fmt.Kind.FILE:
        raise UsageError(f"{path} is a {entry.kind.name.lower()}, not a regular file")
    emap = ExtentMap(store.file_extents(entry))
    get = cached_getter(store.get, ChunkCache(16 << 20))
    out = sys.stdout.buffer
    step = 1 << 20
    for offset in range(0, emap.size, step):
        out.write(read_range(emap, offset, step, get))
    out.flush()


@main.group("export")
def export_group() -> None:
    """Write a stored FileSet out as a directory or a tar archive."""


@export_group.command("dir")
@click.argument("ref")
@click.argument("dest", type=click.Path())
@pass_app
def export_dir_cmd(app: App, ref: str, dest: str) -> None:
    """Recreate REF's tree in DEST (new or empty): contents, modes, owners (as root),
    mtimes, symlinks, hard links, devices, FIFOs and xattrs. Whiteouts become
    overlayfs whiteouts (0:0 character devices)."""
    from cnpsfs.export import export_dir
    from cnpsfs.progress import byte_progress

    store = app.store()
    root = _resolve_root(store, ref)
    with byte_progress(f"exporting to {dest}", None) as advance:
        export_dir(store, root, dest, on_progress=advance)


@export_group.command("tar")
@click.argument("ref")
@click.argument("dest", metavar="FILE|-")
@pass_app
def export_tar_cmd(app: App, ref: str, dest: str) -> None:
    """Write REF as a PAX tar archive to FILE or stdout ('-'); xattrs and nanosecond
    mtimes are kept in PAX headers, whiteouts use OCI names."""
    from cnpsfs.export import export_tar

    store = app.store()
    export_tar(store, _resolve_root(store, ref), dest)


# --------------------------------------------------------------------------- store maintenance


@main.command("verify")
@click.argument("refs", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def verify_cmd(app: App, refs: tuple[str, ...], as_json: bool) -> None:
    """Rehash every stored chunk and object (or those REFS reach) and check that
    every referenced object exists. Names each corrupt or missing one; exits 1 if any."""
    from cnpsfs.progress import byte_progress
    from cnpsfs.store.maintenance import verify

    store = app.store()
    roots = [store.resolve(r) for r in refs] if refs else None
    with byte_progress("verifying", None) as advance:
        report = verify(store, roots, on_progress=advance)
    if as_json:
        emit_json({"checked": report.checked, "problems": report.problems})
    else:
        for problem in report.problems:
            click.echo(problem)
        click.echo(f"checked {report.checked} records: "
                   f"{len(report.problems) or 'no'} problem{'s' if len(report.problems) != 1 else ''}", err=True)
    if report.problems:
        sys.exit(1)


@main.command("df")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def df_cmd(app: App, as_json: bool) -> None:
    """Show logical bytes (file data of all tagged FileSets and images), bytes stored on
    disk, and the resulting deduplication ratio."""
    from cnpsfs.image.usage import usage

    u = usage(app.store())
    data = {"filesets": u.filesets, "images": u.images, "logical_bytes": u.logical_bytes,
            "stored_bytes": u.stored_bytes, "dedup_ratio": round(u.dedup_ratio, 3), "chunks": u.chunks,
            "objects": u.objects, "packs": u.packs}
    if as_json:
        emit_json(data)
        return
    click.echo(f"store        {app.store_path}")
    click.echo(f"filesets     {u.filesets}   images {u.images}")
    click.echo(f"logical      {_human(u.logical_bytes)}")
    click.echo(f"stored       {_human(u.stored_bytes)}   ({u.chunks} chunks, {u.objects} objects, {u.packs} packs)")
    click.echo(f"dedup ratio  {u.dedup_ratio:.2f}x")


@main.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def gc_cmd(app: App, dry_run: bool, as_json: bool) -> None:
    """Remove every object no tag, image or running mount reaches, leftovers of
    killed imports, and repack packs that are mostly garbage. Waits for running imports."""
    from cnpsfs.store.maintenance import gc

    r = gc(app.store(), dry_run=dry_run)
    data = {"removed_objects": r.removed_objects, "removed_packs": r.removed_packs, "repacked": r.repacked,
            "removed_tmp": r.removed_tmp, "bytes_before": r.bytes_before, "bytes_after": r.bytes_after}
    if as_json:
        emit_json(data)
    else:
        verb = "would remove" if dry_run else "removed"
        click.echo(f"{verb} {r.removed_objects} objects, {r.removed_packs} packs, {r.removed_tmp} temporary files;"
                   f" repacked {r.repacked}; {_human(r.bytes_before)} -> {_human(r.bytes_after)}")


@main.group("tag")
def tag_group() -> None:
    """List, set and remove tags (NAME@VERSION -> digest)."""


@tag_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def tag_list(app: App, as_json: bool) -> None:
    """List every tag with its type and digest."""
    tags = app.store().tags()
    if as_json:
        emit_json([{"name": t.name, "version": t.version, "type": TYPE_NAMES[t.type],
                    "digest": fmt.format_digest(t.digest), "created_ns": t.created_ns} for t in tags])
        return
    for t in tags:
        click.echo(f"{t.ref:<50} {TYPE_NAMES[t.type]:<8} {fmt.format_digest(t.digest)}")


@tag_group.command("set")
@click.argument("tag")
@click.argument("ref")
@pass_app
def tag_set(app: App, tag: str, ref: str) -> None:
    """Point TAG (NAME@VERSION) at the FileSet or image REF."""
    name, _, version = tag.partition("@")
    if not version:
        raise UsageError(f"tag {tag!r} must be NAME@VERSION")
    check_tag_name(name)
    check_tag_version(version)
    store = app.store()
    digest = store.resolve(ref)
    type_code = store.object_type(digest)
    if type_code not in (T_FILESET, T_IMAGE):
        raise UsageError(f"{ref} is not a FileSet or an image")
    store.set_tag(name, version, type_code, digest)


@tag_group.command("rm")
@click.argument("tag")
@pass_app
def tag_rm(app: App, tag: str) -> None:
    """Remove TAG (NAME@VERSION); its objects go at the next gc unless reachable otherwise."""
    name, _, version = tag.partition("@")
    if not app.store().remove_tag(name, version):
        raise NotFoundError(f"no such tag {tag!r}")


# --------------------------------------------------------------------------- images


@main.group("image")
def image_group() -> None:
    """Create images (an ordered list of FileSets plus run config) from manifests."""


@image_group.command("create")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def image_create(app: App, manifest: str, as_json: bool) -> None:
    """Store MANIFEST (TOML, see docs/manifest.md) as an image object tagged
    NAME@VERSION. Every reference is resolved to a digest and the whole composition is
    checked (union conflicts fail here, naming both FileSets and the path). Prints the
    image digest last on stdout."""
    from cnpsfs.image.manifest import compose, load_manifest_file, store_image

    store = app.store()
    image = load_manifest_file(store, manifest)
    compose(store, image).check()
    digest = store_image(store, image)
    if as_json:
        emit_json({"digest": fmt.format_digest(digest), "name": image.name, "version": image.version})
        return
    click.echo(f"created image {image.name}@{image.version} ({len(image.layers)} layers)", err=True)
    click.echo(fmt.format_digest(digest))


@main.command("inspect")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def inspect_cmd(app: App, ref: str, as_json: bool) -> None:
    """Show an image's layers and run config, or a FileSet's name, version and metadata.
    REF may also be a manifest file."""
    from cnpsfs.image.manifest import describe_layers, load_image

    store = app.store()
    if ref.endswith(".toml") or os.path.isfile(ref):
        image, digest = load_image(store, ref)
    else:
        digest = store.resolve(ref)
        if store.object_type(digest) == T_FILESET:
            fs = store.get_fileset(digest)
            data = {"type": "fileset", "digest": fmt.format_digest(digest), "name": fs.name,
                    "version": fs.version, "root": fmt.format_digest(fs.root.tree or b""),
                    "metadata": _jsonable(fs.metadata)}
            if as_json:
                emit_json(data)
            else:
                click.echo(f"fileset  {fs.name}@{fs.version}\ndigest   {data['digest']}\nroot     {data['root']}")
                for key, value in sorted(fs.metadata.items()):
                    click.echo(f"{key}: {json.dumps(_jsonable(value))[:200]}")
            return
        image = store.get_image(digest)
    data = {"type": "image", "digest": fmt.format_digest(digest) if digest else None, "name": image.name,
            "version": image.version, "mode": image.mode, "layers": describe_layers(store, image.layers),
            "config": image.config, "metadata": _jsonable(image.metadata)}
    if as_json:
        emit_json(data)
        return
    click.echo(f"image    {image.name}@{image.version}  ({image.mode} mode)")
    if digest:
        click.echo(f"digest   {data['digest']}")
    click.echo("layers")
    for number, layer in enumerate(data["layers"], 1):
        flags = [f for f in ("unlinked", "override") if layer[f]]
        place = f" at {layer['at']}" if layer["at"] != "/" else ""
        click.echo(f"  {number:>3}. {layer['name']}@{layer['version']}  {layer['fileset'][:23]}{place}"
                   + (f"  [{', '.join(flags)}]" if flags else ""))
    if image.config:
        click.echo("config")
        for key, value in sorted(image.config.items()):
            click.echo(f"  {key}: {json.dumps(value)}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


@main.command("commit")
@click.argument("upperdir", type=click.Path(exists=True, file_okay=False))
@click.option("--onto", metavar="REF", help="Also create an image: REF with the new FileSet on top.")
@click.option("--name", help="FileSet name (default localhost/<UPPERDIR name>); with --onto, the image's too.")
@click.option("--version", "version_", metavar="VERSION", help="Version (default 'latest').")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def commit_cmd(app: App, upperdir: str, onto: str | None, name: str | None, version_: str | None,
               as_json: bool) -> None:
    """Turn a writable mount's changes (UPPERDIR) into a FileSet.

    overlayfs whiteouts and opaque directories become format whiteouts and opaque
    directories, so the FileSet stacked on its base reproduces what the instance saw.
    With --onto, also store an image: REF's layers plus this one on top (an override
    layer for union-mode images), tagged NAME@VERSION (default: REF's name, version
    REF-version+commit.<digest prefix>). The last line on stdout is the new image's
    digest with --onto, else the FileSet's.
    """
    from cnpsfs.fs.overlay import UPPER
    from cnpsfs.image.manifest import compose, store_image
    from cnpsfs.ingest.upper import commit_upper

    store = app.store()
    base = store.get_image(store.resolve(onto, want=T_IMAGE)) if onto is not None else None
    fileset_name = name
    if base is not None:
        # The image takes NAME@VERSION; the FileSet is tagged NAME/changes@VERSION beside it.
        fileset_name = f"{name or base.name}/changes"
    options = _make_options(fileset_name, version_, None, False, _default_name(upperdir))
    result = commit_upper(store, Path(upperdir) / UPPER, options)
    out: dict[str, Any] = {"fileset": fmt.format_digest(result.digest), "name": options.name,
                           "version": options.version, "entries": result.entries}
    if base is not None:
        layer = fmt.Layer(result.digest, "/", False, base.mode == "union", "commit")
        image_name = name or base.name
        image_version = version_ or f"{base.version}+commit.{result.digest.hex()[:12]}"
        check_tag_version(image_version)
        image = fmt.Image(image_name, image_version, base.mode, [*base.layers, layer], dict(base.config),
                          dict(base.metadata))
        compose(store, image).check()
        image_digest = store_image(store, image)
        out["image"] = {"digest": fmt.format_digest(image_digest), "name": image_name, "version": image_version}
    if as_json:
        emit_json(out)
        return
    click.echo(f"committed {result.entries} entries as {options.name}@{options.version}", err=True)
    click.echo(out["fileset"] if onto is None else out["image"]["digest"])


# --------------------------------------------------------------------------- mounting


@main.command("mount")
@click.argument("ref", metavar="REF|MANIFEST")
@click.argument("mountpoint", type=click.Path())
@click.option("--foreground", "-f", is_flag=True, help="Stay attached (for systemd); log to stderr.")
@click.option("--allow-other", is_flag=True, help="Let other users (container processes) use the mount.")
@click.option("--fuse-mode", type=click.Choice(["auto", "stock"]), default="auto", show_default=True,
              help="'auto' uses the kernel-cache extensions when the installed pyfuse3 has them.")
@click.option("--threads", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Worker threads for reading and decompressing chunks.")
@click.option("--cache-mib", type=click.IntRange(8, 1 << 20), default=128, show_default=True,
              help="Decompressed chunk cache size in MiB.")
@click.option("--writable", "upperdir", type=click.Path(file_okay=False), default=None, metavar="UPPERDIR",
              help="Put a kernel overlayfs on top, with its upper and work directories in UPPERDIR "
                   "(kept across remounts; `cnpsfs commit UPPERDIR` makes a FileSet of it).")
@pass_app
def mount_cmd(app: App, ref: str, mountpoint: str, foreground: bool, allow_other: bool, fuse_mode: str,
              threads: int, cache_mib: int, upperdir: str | None) -> None:
    """Mount the image REF (or a manifest file) read-only at MOUNTPOINT.

    Returns once the mount answers, with the daemon in the background (its log and
    control socket are under /run/cnpsfs). Nothing is extracted: directories are read
    when looked up and chunks when read, each verified against its digest; a corrupt
    chunk gives EIO for that read, never wrong bytes. Unmount with `cnpsfs umount`.
    """
    from cnpsfs.fs.mounting import mount_image, serve_image
    from cnpsfs.fs.options import MountOptions

    options = MountOptions(allow_other=allow_other, use_extensions=fuse_mode == "auto", threads=threads,
                           cache_mib=cache_mib, writable=upperdir)
    if foreground:
        serve_image(app.store(), ref, mountpoint, options)
        return
    mounted = mount_image(app.store(), ref, mountpoint, options)
    record = mounted.record
    click.echo(f"mounted {mounted.label} at {record.mountpoint} (daemon pid {record.pid}, log {record.log_file})",
               err=True)


@main.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.option("--lazy", is_flag=True, help="Detach even if processes still use the mount.")
def umount_cmd(mountpoint: str, lazy: bool) -> None:
    """Unmount MOUNTPOINT and wait for its daemon to exit. Also cleans up after a
    daemon that was killed (the dead mount is detached)."""
    from cnpsfs.fs.daemon import unmount

    unmount(mountpoint, lazy=lazy)


@main.command("status")
@click.argument("mountpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status_cmd(mountpoint: str, as_json: bool) -> None:
    """Show a mount's image, generation, layers, FUSE mode and request counters."""
    status = _control(mountpoint, {"op": "status"})
    if as_json:
        emit_json(status)
        return
    image = status["image"]
    click.echo(f"mountpoint  {status['mountpoint']}  (pid {status['pid']}, {status['fuse_mode']} mode)")
    click.echo(f"image       {image['name']}@{image['version']}  {image['digest'] or '(from manifest)'}")
    click.echo(f"generation  {status['generation']}")
    for number, layer in enumerate(status["layers"], 1):
        mark = " [unlinked]" if layer["unlinked"] else ""
        click.echo(f"  {number:>3}. {layer['name']}@{layer['version']}{mark}")
    click.echo("history")
    for item in status["history"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item["time"]))
        click.echo(f"  {item['generation']:>3}. {when}  {item['image']}  ({item['reason']})")
    click.echo("requests    " + ", ".join(f"{k}={v}" for k, v in sorted(status["requests"].items())))


def _control(mountpoint: str, request: dict[str, Any]) -> dict[str, Any]:
    from cnpsfs.fs.control import control_request
    from cnpsfs.fs.daemon import status_record

    record = status_record(os.path.realpath(mountpoint))
    if record.get("upperdir") and request["op"] != "status":
        raise CnpsfsError(f"{mountpoint} is writable: overlayfs does not allow its lower layers to change "
                          "under it; commit the upper directory and remount instead")
    if not record["alive"]:
        raise CnpsfsError(f"the daemon of {mountpoint} (pid {record['pid']}) is gone: run `cnpsfs umount`")
    response = control_request(record["control"], request)
    response.pop("ok", None)
    return response


def _report_swap(mountpoint: str, result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(result)
        return
    click.echo(f"{mountpoint}: generation {result['generation']} in {result['seconds'] * 1000:.1f} ms "
               f"({result['changed_dirs']} changed, {result['shared_dirs']} shared directories; "
               f"{result['invalidated_entries']} names invalidated)")


@main.command("upgrade")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("ref", metavar="REF|MANIFEST")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def upgrade_cmd(mountpoint: str, ref: str, as_json: bool) -> None:
    """Swap the live mount at MOUNTPOINT to another image, atomically.

    The new composition is built beside the current one, checked (union conflicts,
    missing objects or chunks leave the mount untouched), and made current in one step:
    every lookup, listing and read sees the old tree or the new one, never a mix. Files
    open before the swap keep reading their old content; unchanged entries keep their
    inode numbers and kernel caches. The cost grows with the change, not the image.
    """
    if os.path.isfile(ref):
        ref = os.path.abspath(ref)
    _report_swap(mountpoint, _control(mountpoint, {"op": "upgrade", "ref": ref}), as_json)


@main.command("unlink")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("layer")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def unlink_cmd(mountpoint: str, layer: str, as_json: bool) -> None:
    """Hide LAYER of the live mount (1-based position, FileSet reference or label), atomically."""
    _report_swap(mountpoint, _control(mountpoint, {"op": "unlink", "layer": layer}), as_json)


@main.command("link")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("layer")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def link_cmd(mountpoint: str, layer: str, as_json: bool) -> None:
    """Show an unlinked LAYER of the live mount again, atomically."""
    _report_swap(mountpoint, _control(mountpoint, {"op": "link", "layer": layer}), as_json)


@main.command("rollback")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rollback_cmd(mountpoint: str, as_json: bool) -> None:
    """Return the live mount to the image it served before the last swap."""
    _report_swap(mountpoint, _control(mountpoint, {"op": "rollback"}), as_json)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


from cnpsfs.cli.service import bundle_cmd, service_group  # noqa: E402 (they import from this module lazily)

main.add_command(service_group)
main.add_command(bundle_cmd)

from cnpsfs.cli.build import COMMANDS as _BUILD_COMMANDS  # noqa: E402  (build, import deb, introspection)

for _command in _BUILD_COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":
    main()
