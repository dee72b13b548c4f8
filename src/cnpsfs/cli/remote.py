"""``cnpsfs push``, ``pull``, ``remote list|tags`` and ``cache``: moving images to and from
remotes (docs/remote.md), and the bound on what reading from remotes keeps locally."""

from __future__ import annotations

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import App, emit_json, human_size, json_option, pass_app
from cnpsfs.errors import UsageError
from cnpsfs.store import LocalStore


def _local(app: App, *, create: bool = False) -> LocalStore:
    store = app.store(create=create)
    local = getattr(store, "local", store)
    if not isinstance(local, LocalStore):
        raise UsageError("this command needs a local store")
    return local


@click.command("push")
@click.argument("ref")
@click.argument("remote", metavar="REMOTE")
@click.option("--pack-size", default="32M", show_default=True, metavar="SIZE",
              help="Cut new pack blobs at this size (smaller: finer resumption; larger: fewer blobs).")
@click.option("--block-size", default=None, metavar="SIZE",
              help="Re-block what is sent into blocks of this size (a lazy reader fetches whole blocks; "
                   "default: the blocks of the local store, 1 MiB).")
@click.option("--parallel", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Uploads at once (default: the remote's parallel setting, 8).")
@json_option
@pass_app
def push_cmd(app: App, ref: str, remote: str, pack_size: str, block_size: str | None, parallel: int | None,
             as_json: bool) -> None:
    """Push image (or FileSet) REF to REMOTE, sending only what the remote lacks.

    REMOTE is docker://HOST/REPO, file:///DIR or a name from remotes.toml (http(s)://
    remotes are read-only: serve a file:// remote with a web server). The image's objects are
    compared with what the remote already has level by level (one has-many round per
    level); what is missing is packed (blocks travel as stored), uploaded in parallel,
    then the image index, the manifest, and the NAME@VERSION tag last, so a reader never
    sees a tag whose objects are missing. A killed push run again uploads only what is
    still missing. Prints the bytes sent and skipped.
    """
    from cnpsfs.progress import byte_progress
    from cnpsfs.store.cached import parse_size
    from cnpsfs.store.remoteconf import remote_spec
    from cnpsfs.store.sync import push

    local = _local(app)
    spec = remote_spec(remote)
    if len(spec.urls) > 1:
        click.echo(f"cnpsfs: pushing to {spec.url} only (mirrors are copies of it)", err=True)
    backend = spec.backends()[0]
    try:
        with byte_progress(f"pushing {ref}", None) as advance:
            report = push(local, ref, backend, name=spec.name, pack_size=max(1 << 20, parse_size(pack_size)),
                          block_size=max(16 << 10, parse_size(block_size)) if block_size else None,
                          parallel=parallel or spec.parallel, state_dir=local.path / "remote", progress=advance)
    finally:
        backend.close()
    if as_json:
        emit_json({"remote": spec.name, **report.as_json()})
        return
    what = report.ref or fmt.format_digest(report.root)
    click.echo(f"pushed {what} to {spec.name}: {human_size(report.sent)} sent, {human_size(report.skipped)} "
               f"skipped ({report.members_sent} objects and chunks new, {report.members_skipped} already there; "
               f"{report.blobs_sent} blobs uploaded, {report.blobs_skipped} present) in {report.seconds:.1f}s",
               err=True)
    click.echo(report.manifest)


@click.command("pull")
@click.argument("ref")
@click.argument("remote", metavar="REMOTE")
@json_option
@pass_app
def pull_cmd(app: App, ref: str, remote: str, as_json: bool) -> None:
    """Fetch image (or FileSet) REF from REMOTE into the local store, for offline use.

    Only blocks holding what the local store lacks are fetched (merged ranges, in
    parallel), each verified; the local tag NAME@VERSION is set once everything the
    image reaches is present — and, under a trust policy (--policy), accepted by it: the
    image's signatures come with it. A killed pull keeps what it had fetched (as cache).
    Prints the bytes fetched and those already present.
    """
    from cnpsfs.progress import byte_progress
    from cnpsfs.store.remoteconf import remote_spec
    from cnpsfs.store.sync import pull
    from cnpsfs.trust.policy import policy_path

    local = _local(app, create=True)
    rs = remote_spec(remote).open(local.path / "remote")
    policy = policy_path(app.policy_arg)
    check = None
    if policy is not None:
        from cnpsfs.trust import check_image

        def check(root: bytes, name: str | None) -> None:
            # The same decision a mount makes, on what was pulled (signatures came with it).
            check_image(local, policy, root, name)

    try:
        with byte_progress(f"pulling {ref}", None) as advance:
            report = pull(local, ref, rs, progress=advance, check=check)
    finally:
        rs.close()
    if as_json:
        emit_json({"remote": rs.name, **report.as_json()})
        return
    what = report.ref or fmt.format_digest(report.root)
    click.echo(f"pulled {what} from {rs.name}: {human_size(report.sent)} fetched, {human_size(report.skipped)} "
               f"already present ({report.members_sent} objects and chunks fetched, {report.members_skipped} "
               f"present) in {report.seconds:.1f}s", err=True)
    click.echo(fmt.format_digest(report.root))


@click.group("remote")
def remote_group() -> None:
    """Configured remotes (remotes.toml) and what a remote holds."""


@remote_group.command("list")
@json_option
def remote_list(as_json: bool) -> None:
    """List the remotes named in /etc/cnpsfs/remotes.toml and $XDG_CONFIG_HOME/cnpsfs/remotes.toml."""
    from cnpsfs.store.remoteconf import load_remotes

    remotes = load_remotes()
    if as_json:
        emit_json([{"name": s.name, "urls": list(s.urls), "timeout": s.timeout, "parallel": s.parallel,
                    "proxy": s.proxy, "source": s.source} for s in remotes.values()])
        return
    for spec in remotes.values():
        mirrors = f" (+{len(spec.urls) - 1} mirrors)" if len(spec.urls) > 1 else ""
        click.echo(f"{spec.name:<20} {spec.url}{mirrors}")


@remote_group.command("tags")
@click.argument("remote", metavar="REMOTE")
@json_option
def remote_tags(remote: str, as_json: bool) -> None:
    """List the NAME@VERSION tags on REMOTE (docker:// and file:// remotes can list)."""
    from cnpsfs.store.remoteconf import remote_spec

    rs = remote_spec(remote).open()
    try:
        tags = rs.tags()
    finally:
        rs.close()
    if as_json:
        emit_json([{"name": t.name, "version": t.version, "digest": fmt.format_digest(t.digest)} for t in tags])
        return
    for t in tags:
        click.echo(f"{t.ref:<50} {fmt.format_digest(t.digest)}")


@click.group("cache")
def cache_group() -> None:
    """The local cache of blocks fetched from remotes: its size, its bound, eviction."""


@cache_group.command("show")
@json_option
@pass_app
def cache_show(app: App, as_json: bool) -> None:
    """Show how much of the store is cache (refetchable from a remote) and its bound."""
    from cnpsfs.store.cached import cache_summary

    summary = cache_summary(_local(app))
    if as_json:
        emit_json(summary)
        return
    limit = summary["limit"]
    click.echo(f"cache        {human_size(summary['bytes'])} in {summary['packs']} packs"
               f" (limit {human_size(limit) if limit is not None else 'none'})")
    for remote, size in sorted(summary["by_remote"].items()):
        click.echo(f"  {remote}  {human_size(size)}")


@cache_group.command("set-size")
@click.argument("size", metavar="SIZE|none")
@pass_app
def cache_set_size(app: App, size: str) -> None:
    """Bound the cache at SIZE (e.g. 20G) for every mount of this store; 'none' removes the bound."""
    from cnpsfs.store.cached import SETTING_CACHE_SIZE, parse_size

    local = _local(app, create=True)
    value = None if size.lower() == "none" else str(parse_size(size))
    local.index.set_setting(SETTING_CACHE_SIZE, value)


@cache_group.command("evict")
@click.option("--all", "everything", is_flag=True, help="Evict every cache pack that is not pinned.")
@json_option
@pass_app
def cache_evict(app: App, everything: bool, as_json: bool) -> None:
    """Evict least recently used cache packs down to the bound (or all with --all).

    Never evicts a pack holding anything a local tag reaches, the metadata of an image
    a running mount serves, or a pack read in the last 10 seconds.
    """
    from cnpsfs.store.cached import cache_summary, evict

    local = _local(app)
    limit = cache_summary(local)["limit"]
    if not everything and limit is None:
        raise UsageError("the cache has no bound: give --all, or set one with `cnpsfs cache set-size`")
    freed = evict(local, 0 if everything else int(limit), to=0.0 if everything else None)
    if as_json:
        emit_json({"freed_bytes": freed})
        return
    click.echo(f"evicted {human_size(freed)}")


COMMANDS = [push_cmd, pull_cmd, remote_group, cache_group]
