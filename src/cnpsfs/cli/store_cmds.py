"""Store maintenance: ``cnpsfs verify``, ``df``, ``gc`` and ``tag list|set|rm``."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import App, emit_json, human_size, json_option, pass_app
from cnpsfs.errors import CnpsfsError, NotFoundError, UsageError
from cnpsfs.store import T_FILESET, T_IMAGE, TYPE_NAMES, LocalStore, check_tag_name, check_tag_version


@click.command("verify")
@click.argument("refs", nargs=-1)
@click.option("--provenance", is_flag=True,
              help="Instead: re-check the Debian archive chain of every package layer of the images REFS.")
@click.option("--refetch", is_flag=True, help="With --provenance: re-import each .deb to prove its FileSet digest.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --refetch: the .deb cache (default: $CNPSFS_BUILD_CACHE or /var/cache/cnpsfs).")
@click.option("--keyring", "keyrings", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="With --provenance: OpenPGP keyring(s) to check InRelease with (default: apt's).")
@json_option
@pass_app
def verify_cmd(app: App, refs: tuple[str, ...], provenance: bool, refetch: bool, cache_dir: Path | None,
               keyrings: tuple[str, ...], as_json: bool) -> None:
    """Rehash every stored chunk and object (or those REFS reach) and check that
    every referenced object exists. Names each corrupt or missing one; exits 1 if any.

    With --provenance, check instead, offline, that every package layer of the images
    REFS came from the Debian archive: the suite's InRelease is validly signed (gpgv,
    apt's keyring), it lists the stored Packages index by SHA-256, and that index lists
    the package's .deb as the FileSet records it (docs/trust.md). --refetch also
    re-imports each .deb (from the build cache, else the archive) and compares the
    FileSet digest. Names every package whose chain is broken; exits 1 if any.
    """
    from cnpsfs.progress import byte_progress
    from cnpsfs.store.maintenance import verify

    if provenance:
        _verify_provenance(app, refs, refetch, cache_dir, keyrings, as_json)
        return
    if refetch or keyrings or cache_dir:
        raise UsageError("--refetch, --cache and --keyring go with --provenance")
    store = app.local_store()
    roots = [store.resolve(r) for r in refs] if refs else None
    with byte_progress("verifying", None) as advance:
        report = verify(store, roots, on_progress=advance)
    if as_json:
        emit_json({"checked": report.checked, "problems": report.problems, "repairable": report.repairable,
                   "leftovers": report.leftovers})
    else:
        for problem in report.problems:
            click.echo(problem)
        for leftover in report.leftovers:
            click.echo(f"note: {leftover}", err=True)
        click.echo(f"checked {report.checked} records: "
                   f"{len(report.problems) or 'no'} problem{'s' if len(report.problems) != 1 else ''}", err=True)
        if report.repairable:
            click.echo("the index is damaged or disagrees with packs/: `cnpsfs store repair` rebuilds it from the"
                       " packs, keeping what verifies and naming what is lost", err=True)
    if report.problems:
        sys.exit(1)


def _verify_provenance(app: App, refs: tuple[str, ...], refetch: bool, cache: Path | None,
                       keyrings: tuple[str, ...], as_json: bool) -> None:
    from cnpsfs.debian.provenance import check_images

    if not refs:
        raise UsageError("--provenance needs an IMAGE (or FileSet) reference")
    for ring in keyrings:
        if not Path(ring).is_file():
            raise UsageError(f"keyring {ring} does not exist")
    report = check_images(app.store(), refs, keyrings=keyrings, refetch_debs=refetch, cache=cache,
                          on_step=lambda m: click.echo(f"verify: {m}", err=True))
    if as_json:
        emit_json({"packages": report.rows, "other_layers": report.other_layers, "broken": report.broken,
                   "seconds": round(report.seconds, 3)})
    else:
        for row in report.rows:
            if row["ok"]:
                proof = "re-imported" if row["refetched"] else "chain holds"
                click.echo(f"ok      {row['package']}  ({proof}: {row['archive']} {row['release']})")
            else:
                click.echo(f"BROKEN  {row['package']}: {row['problem']}")
        click.echo(f"{len(report.rows)} packages: {len(report.rows) - report.broken} proven, {report.broken} broken "
                   f"({report.indices} signed indices; {len(report.other_layers)} other layers not from the "
                   f"archive) in {report.seconds:.2f}s", err=True)
    if report.broken:
        sys.exit(1)


@click.command("df")
@json_option
@pass_app
def df_cmd(app: App, as_json: bool) -> None:
    """Show logical bytes (file data of all tagged FileSets and images), bytes stored on
    disk, and the resulting deduplication ratio."""
    from cnpsfs.image.usage import usage
    from cnpsfs.store.cached import cache_summary

    store = app.local_store()
    u = usage(store)
    cache = cache_summary(store)
    data = {"filesets": u.filesets, "images": u.images, "logical_bytes": u.logical_bytes,
            "stored_bytes": u.stored_bytes, "dedup_ratio": round(u.dedup_ratio, 3), "chunks": u.chunks,
            "objects": u.objects, "packs": u.packs,
            "cache": {"bytes": cache["bytes"], "packs": cache["packs"], "limit": cache["limit"]}}
    if as_json:
        emit_json(data)
        return
    click.echo(f"store        {app.store_path}")
    click.echo(f"filesets     {u.filesets}   images {u.images}")
    click.echo(f"logical      {human_size(u.logical_bytes)}")
    click.echo(f"stored       {human_size(u.stored_bytes)}   ({u.chunks} chunks, {u.objects} objects, {u.packs} packs)")
    click.echo(f"dedup ratio  {u.dedup_ratio:.2f}x")
    if cache["packs"] or cache["limit"] is not None:
        limit = human_size(cache["limit"]) if cache["limit"] is not None else "none"
        click.echo(f"cache        {human_size(cache['bytes'])} fetched from remotes, refetchable   "
                   f"({cache['packs']} packs, limit {limit})")


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@json_option
@pass_app
def gc_cmd(app: App, dry_run: bool, as_json: bool) -> None:
    """Remove every object no tag, image or running mount reaches, leftovers of
    killed imports, and repack packs that are mostly garbage. Waits for running imports."""
    from cnpsfs.fs.daemon import forget_dead_mounts, forget_dead_roots, runtime_dir
    from cnpsfs.store.maintenance import gc, roots_dirs

    store = app.store()
    assert isinstance(store, LocalStore)
    store.check_writable("gc")
    runtime = None
    with contextlib.suppress(CnpsfsError):  # an unsafe runtime dir is for mount to refuse
        runtime = runtime_dir()
    if not dry_run:
        # Killed daemons leave their roots behind (and a zombie nobody reaps still answers
        # kill(pid, 0)): what only they served is garbage now.
        with contextlib.suppress(CnpsfsError):
            forget_dead_mounts()
        for directory in roots_dirs(store, runtime):
            forget_dead_roots(directory)
    r = gc(store, dry_run=dry_run, runtime=runtime)
    data = {"removed_objects": r.removed_objects, "removed_packs": r.removed_packs, "repacked": r.repacked,
            "removed_tmp": r.removed_tmp, "bytes_before": r.bytes_before, "bytes_after": r.bytes_after,
            "cache_packs": r.cache_packs, "cache_bytes": r.cache_bytes}
    if as_json:
        emit_json(data)
    else:
        verb = "would remove" if dry_run else "removed"
        click.echo(f"{verb} {r.removed_objects} objects, {r.removed_packs} packs, {r.removed_tmp} temporary files;"
                   f" repacked {r.repacked}; {human_size(r.bytes_before)} -> {human_size(r.bytes_after)}"
                   + (f"; kept {human_size(r.cache_bytes)} of cache packs (refetchable: `cnpsfs cache evict`)"
                      if r.cache_packs else ""))


@click.group("tag")
def tag_group() -> None:
    """List, set and remove tags (NAME@VERSION -> digest)."""


@tag_group.command("list")
@json_option
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


COMMANDS = [verify_cmd, df_cmd, gc_cmd, tag_group]
