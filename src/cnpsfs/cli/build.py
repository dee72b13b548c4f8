"""Package-built images: ``cnpsfs build``, and ``packages``, ``query``, ``diff`` and ``why``
to look into them (``import deb`` is with the other importers)."""

from __future__ import annotations

from pathlib import Path

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import App, emit_json, json_option, pass_app, recorded_line


@click.command("build")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="apt state and .deb cache (default: $CNPSFS_BUILD_CACHE or /var/cache/cnpsfs).")
@click.option("--refresh", is_flag=True, help="Download the package lists even if the cached ones are fresh.")
@click.option("--record-profile", "record", is_flag=True,
              help="Then run the image's command once on a mount of it and store what it read as the image's "
                   "prefetch profile 'default' (needs root; see `cnpsfs profile`).")
@click.option("--record-seconds", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
              metavar="SECONDS", help="With --record-profile: stop the command after SECONDS.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@pass_app
def build_cmd(app: App, recipe: str, cache_dir: Path | None, refresh: bool, record: bool, record_seconds: float,
              as_json: bool) -> None:
    """Build an image from a Debian package list (RECIPE, TOML; see docs/recipe.md).

    apt (in private state) resolves the list plus the Essential set; each package is a
    FileSet composed in union mode; the dpkg database and the output of `dpkg --configure`
    are override layers on top. The same recipe gives the same image digest, whatever
    the order of its package list. Prints the image digest last on stdout.

    With --record-profile the image's command (config entrypoint + cmd) then runs once,
    chrooted into a mount of the image, and what it read becomes the image's prefetch
    profile (a profile is not part of the image: the digest is the same either way).
    """
    from cnpsfs.debian.apt import DEFAULT_CACHE
    from cnpsfs.debian.build import build, load_recipe

    spec = load_recipe(recipe)
    store = app.store(create=True)
    result = build(store, spec, cache=cache_dir or DEFAULT_CACHE, refresh=refresh,
                   on_step=lambda message: click.echo(f"build: {message}", err=True))
    ref = fmt.format_digest(result.digest)
    profile = None
    if record:
        from cnpsfs.fs.record import record_image_command

        profile = record_image_command(store, ref, seconds=record_seconds,
                                       say=lambda message: click.echo(f"build: {message}", err=True))
    if as_json:
        emit_json({"digest": ref, "name": spec.name, "version": spec.version, "imported": result.imported,
                   "reused": result.reused, "configured": result.configured,
                   "timings": {k: round(v, 3) for k, v in result.timings.items()},
                   **({"profile": profile} if profile is not None else {})})
        return
    if profile is not None:
        click.echo(f"build: {recorded_line(profile)}", err=True)
    click.echo(f"built {spec.name}@{spec.version}: {len(result.image.layers)} layers, {result.imported} "
               f"packages imported, {result.reused} reused, {result.timings['total']:.1f}s", err=True)
    click.echo(ref)


@click.command("packages")
@click.argument("ref")
@json_option
@pass_app
def packages_cmd(app: App, ref: str, as_json: bool) -> None:
    """List the Debian packages of image REF: version, architecture, source package and
    the FileSet digest of each."""
    from cnpsfs.debian.introspect import image_packages
    from cnpsfs.store import T_IMAGE

    store = app.store()
    image = store.get_image(store.resolve(ref, want=T_IMAGE))
    pkgs = image_packages(store, image)
    if as_json:
        emit_json([p.as_dict() for p in pkgs])
        return
    for p in pkgs:
        click.echo(f"{p.package:<32} {p.version:<28} {p.arch:<6} {p.source:<24} {p.fileset[:23]}")


@click.command("query")
@click.argument("spec", metavar="PACKAGE[OP VERSION]")
@json_option
@pass_app
def query_cmd(app: App, spec: str, as_json: bool) -> None:
    """List every stored image holding a package matching PACKAGE[OP VERSION].

    OP is one of = < <= > >= (Debian version order; < and > are strict). Exits 1 when
    no image matches.
    """
    from cnpsfs.debian.introspect import query

    hits = query(app.store(), spec)
    if as_json:
        emit_json(hits)
    else:
        for hit in hits:
            click.echo(f"{hit['image']}  {hit['package']} {hit['version']} {hit['arch']}  {hit['digest'][:23]}")
    if not hits:
        raise SystemExit(1)


@click.command("diff")
@click.argument("ref_a")
@click.argument("ref_b")
@json_option
@pass_app
def diff_cmd(app: App, ref_a: str, ref_b: str, as_json: bool) -> None:
    """Packages added, removed and changed from image A to image B, then file-level
    changes (subtrees composed from the same layers and trees are skipped unread)."""
    from cnpsfs.debian.introspect import diff

    result = diff(app.store(), ref_a, ref_b)
    if as_json:
        emit_json(result)
        return
    pk = result["packages"]
    for p in pk["added"]:
        click.echo(f"+ {p['package']} {p['version']}")
    for p in pk["removed"]:
        click.echo(f"- {p['package']} {p['version']}")
    for p in pk["changed"]:
        click.echo(f"~ {p['package']} {p['from']} -> {p['to']} ({p['change']})")
    for f in result["files"]:
        click.echo(f"{f['change']:<9} {f['path']}")


@click.command("why")
@click.argument("ref")
@click.argument("path")
@json_option
@pass_app
def why_cmd(app: App, ref: str, path: str, as_json: bool) -> None:
    """Name the layer (FileSet and, for a package, the package) that provides PATH in REF."""
    from cnpsfs.debian.introspect import why

    result = why(app.store(), ref, path)
    if as_json:
        emit_json(result)
        return
    if result["fileset"] is None:
        click.echo(f"{path}: synthesised directory (no layer provides it)")
        return
    who = f"package {result['package']}, " if result["package"] else ""
    via = f" in {' -> '.join(result['via'])}" if result.get("via") else ""
    click.echo(f"{path}: {who}layer {result['layer']}{via} {result['name']} ({result['fileset'][:23]})")


COMMANDS = [build_cmd, packages_cmd, query_cmd, diff_cmd, why_cmd]
