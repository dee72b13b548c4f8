"""CLI commands for package-built images: ``import deb``, ``build``, ``packages``,
``query``, ``diff`` and ``why``. Registered on the main group from cli.py."""

from __future__ import annotations

import time
from pathlib import Path

import click

from . import format as fmt
from .cli import App, _report_import, emit_json, import_group, pass_app


@click.command("deb")
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
    from .importers.deb import import_debs

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


@click.command("build")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="apt state and .deb cache (default: $CNPSFS_BUILD_CACHE or /var/cache/cnpsfs).")
@click.option("--refresh", is_flag=True, help="Download the package lists even if the cached ones are fresh.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@pass_app
def build_cmd(app: App, recipe: str, cache_dir: Path | None, refresh: bool, as_json: bool) -> None:
    """Build an image from a Debian package list (RECIPE, TOML; see docs/recipe.md).

    apt (in private state) resolves the list plus the Essential set; each package is a
    FileSet composed in union mode; the dpkg database and the output of `dpkg --configure`
    are override layers on top. The same recipe gives the same image digest, whatever
    the order of its package list. Prints the image digest last on stdout.
    """
    from .build import build, load_recipe
    from .debian.apt import DEFAULT_CACHE

    spec = load_recipe(recipe)
    store = app.store(create=True)
    result = build(store, spec, cache=cache_dir or DEFAULT_CACHE, refresh=refresh,
                   on_step=lambda message: click.echo(f"build: {message}", err=True))
    ref = fmt.format_digest(result.digest)
    if as_json:
        emit_json({"digest": ref, "name": spec.name, "version": spec.version, "imported": result.imported,
                   "reused": result.reused, "configured": result.configured,
                   "timings": {k: round(v, 3) for k, v in result.timings.items()}})
        return
    click.echo(f"built {spec.name}@{spec.version}: {len(result.image.layers)} layers, {result.imported} "
               f"packages imported, {result.reused} reused, {result.timings['total']:.1f}s", err=True)
    click.echo(ref)


import_group.add_command(import_deb_cmd)
COMMANDS = [build_cmd]
