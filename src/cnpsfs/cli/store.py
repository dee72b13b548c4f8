"""``cnpsfs store``: operations on the store as a whole that are not part of daily use.

``store repair`` rebuilds the index from the packs (docs/format.md 2.8) when ``verify``
reports a damaged index. Like every command module it shares only
:mod:`cnpsfs.cli.context`; :mod:`cnpsfs.cli.root` registers it.
"""

from __future__ import annotations

import sys

import click

from cnpsfs.cli.context import App, emit_json, json_option, pass_app


@click.group("store")
def store_group() -> None:
    """Repair the store's index."""


@store_group.command("repair")
@click.option("--dry-run", is_flag=True, help="Read every pack and report, but change nothing.")
@json_option
@pass_app
def repair_cmd(app: App, dry_run: bool, as_json: bool) -> None:
    """Rebuild the index from the packs, keeping what verifies and naming what is lost.

    Reads every pack front to back, keeps each block member that hashes to its digest,
    and restores the tags from the tags journal (tags.log), or, in a store without one,
    from what of the old index's tags table still reads. The damaged index is kept beside
    the new one as index.sqlite.damaged-TIME. Waits for running imports and gc; mounts
    running meanwhile go on with the old index until they are remounted. Exits 1 when
    anything was lost.
    """
    from cnpsfs.progress import byte_progress
    from cnpsfs.store import LocalStore
    from cnpsfs.store.repair import repair

    store = app.store()
    assert isinstance(store, LocalStore)
    total = sum(p.stat().st_size for p in store.packs_dir.glob("*.pack")) if sys.stderr.isatty() else None
    with byte_progress("reading packs", total) as advance:
        report = repair(store, dry_run=dry_run, on_progress=advance)
    lost = bool(report.lost or report.tags_dropped or report.incomplete)
    if as_json:
        emit_json({"packs": report.packs, "records": report.records, "objects": report.objects,
                   "duplicates": report.duplicates, "lost": report.lost, "lost_members": report.lost_members,
                   "tag_source": report.tag_source, "tags_restored": report.tags_restored,
                   "tags_dropped": report.tags_dropped, "incomplete": report.incomplete, "unread": report.unread,
                   "backup": report.backup, "dry_run": dry_run})
    else:
        for line in report.lost + report.tags_dropped + report.incomplete + report.unread:
            click.echo(line)
        verb = "would rebuild" if dry_run else "rebuilt"
        click.echo(f"{verb} the index from {report.packs} packs: {report.objects} objects in {report.records}"
                   f" blocks ({report.lost_members} members lost), {len(report.tags_restored)} tags from"
                   f" {report.tag_source}" + (f"; the old index is {report.backup}" if report.backup else ""),
                   err=True)
    if lost:
        sys.exit(1)


COMMANDS = [store_group]
