"""``cnpsfs import dir|tar|deb``: trees, tar archives and Debian packages into FileSets."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import App, default_name, emit_json, human_size, import_settings, pass_app


@click.group("import")
def import_group() -> None:
    """Import a directory tree, a tar archive, Debian packages or an OCI image."""


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


def _report_import(result: Any, as_json: bool, seconds: float) -> None:
    """An import's summary: JSON, or a line on stderr and the FileSet digest last on stdout."""
    ref = fmt.format_digest(result.digest)
    summary = {"digest": ref, "name": result.fileset.name, "version": result.fileset.version,
               "entries": result.entries, "logical_bytes": result.logical_bytes,
               "new_bytes": result.new_bytes, "seconds": round(seconds, 3)}
    if as_json:
        emit_json(summary)
        return
    click.echo(f"imported {result.fileset.name}@{result.fileset.version}: {result.entries} entries, "
               f"{human_size(result.logical_bytes)} of data, {human_size(result.new_bytes)} newly stored "
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

    options = import_settings(name, version_, source_date_epoch, strip_volatile, default_name(path))
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

    default = "localhost/stdin" if file == "-" else default_name(file.split(".tar")[0].split(".tgz")[0])
    options = import_settings(name, version_, source_date_epoch, strip_volatile, default)
    store = app.store(create=True)
    start = time.monotonic()
    with byte_progress(f"importing {file}", None) as advance:
        result = import_tar(store, file, options, on_progress=advance)
    _report_import(result, as_json, time.monotonic() - start)


@import_group.command("deb")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--source-date-epoch", type=int, default=None, envvar="SOURCE_DATE_EPOCH",
              help="Clamp every mtime to this Unix time (default: $SOURCE_DATE_EPOCH).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@pass_app
def import_deb_cmd(app: App, files: tuple[str, ...], source_date_epoch: int | None, as_json: bool) -> None:
    """Import Debian packages, one FileSet each, tagged debian.org/PACKAGE@VERSION_ARCH.

    The tree is what `dpkg-deb -x` extracts; the control archive (control fields,
    md5sums, conffiles, maintainer scripts) is kept in the FileSet metadata
    (docs/debian.md). Prints each FileSet digest on stdout, in argument order.
    """
    from cnpsfs.debian.deb import import_debs

    store = app.store(create=True)
    start = time.monotonic()
    results = import_debs(store, files, source_date_epoch=source_date_epoch)
    seconds = time.monotonic() - start
    if as_json:
        emit_json([{"digest": fmt.format_digest(r.digest), "name": r.fileset.name, "version": r.fileset.version,
                    "entries": r.entries, "logical_bytes": r.logical_bytes, "new_bytes": r.new_bytes}
                   for r in results])
        return
    for result in results:
        _report_import(result, False, seconds / max(len(results), 1))


COMMANDS = [import_group]
