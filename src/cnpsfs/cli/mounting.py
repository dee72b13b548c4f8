"""``cnpsfs mount``, ``umount`` and ``status``, and the live swaps ``upgrade``, ``link``,
``unlink`` and ``rollback`` (requests to a running daemon over its control socket)."""

from __future__ import annotations

import os
import time
from typing import Any

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import (
    EXIT_NOW,
    App,
    control,
    emit_json,
    human_size,
    json_option,
    pass_app,
    remote_options,
    report_mounted,
    report_swap,
)
from cnpsfs.errors import CnpsfsError, UsageError
from cnpsfs.fs.options import (
    CACHE_MIB_RANGE,
    DEFAULT_CACHE_MIB,
    DEFAULT_THREADS,
    FUSE_MODES,
    PREFETCH_MIB_RANGE,
    THREADS_RANGE,
    WAIT_PREFETCH_RANGE,
    MountOptions,
)


@click.command("mount")
@remote_options
@click.argument("ref", metavar="REF|MANIFEST")
@click.argument("mountpoint", type=click.Path())
@click.option("--foreground", "-f", is_flag=True, help="Stay attached (for systemd); log to stderr.")
@click.option("--allow-other", is_flag=True, help="Let other users (container processes) use the mount.")
@click.option("--fuse-mode", type=click.Choice(FUSE_MODES), default="auto", show_default=True,
              help="'auto' uses the kernel-cache extensions when the installed pyfuse3 has them.")
@click.option("--threads", type=click.IntRange(*THREADS_RANGE), default=DEFAULT_THREADS, show_default=True,
              help="Worker threads for reading and decompressing chunks.")
@click.option("--cache-mib", type=click.IntRange(*CACHE_MIB_RANGE), default=DEFAULT_CACHE_MIB, show_default=True,
              help="Decompressed chunk cache size in MiB.")
@click.option("--writable", "upperdir", type=click.Path(file_okay=False), default=None, metavar="UPPERDIR",
              help="Put a kernel overlayfs on top, with its upper and work directories in UPPERDIR "
                   "(kept across remounts; `cnpsfs commit UPPERDIR` makes a FileSet of it).")
@click.option("--allow-downgrade", is_flag=True,
              help="Serve a signed revision older than one accepted before (rollback protection off, once).")
@click.option("--init-layer", is_flag=True,
              help="Add an init layer on top: empty /proc, /sys, /dev, /run, /tmp, /var/tmp, /etc/hostname, "
                   "/etc/hosts, /etc/resolv.conf, /run/.containerenv and /etc/mtab -> /proc/mounts where the image "
                   "lacks them, so a "
                   "container runtime (podman run --rootfs, runc) can mount over them. The image itself is "
                   "unchanged.")
@click.option("--init-dir", "init_dirs", multiple=True, metavar="PATH",
              help="Another directory the init layer provides where the image lacks it (a volume's mount "
                   "destination); implies --init-layer. Repeatable.")
@click.option("--profile", "profile_name", default=None, metavar="NAME",
              help="Prefetch the image's profile NAME (it must exist); default: its profile 'default', if any.")
@click.option("--no-prefetch", is_flag=True, help="Replay no profile (for measuring and debugging).")
@click.option("--prefetch-mib", type=click.IntRange(*PREFETCH_MIB_RANGE), default=None, metavar="MIB",
              help="Stop a replay after MIB of pages (default: a quarter of the available memory).")
@click.option("--wait-prefetch", type=click.FloatRange(*WAIT_PREFETCH_RANGE), default=None, metavar="SECONDS",
              help="Return only once the profile's replay is done, or after SECONDS at most. Default: "
                   "return as soon as the mount answers, the replay going on in the background.")
@pass_app
def mount_cmd(app: App, ref: str, mountpoint: str, foreground: bool, allow_other: bool, fuse_mode: str,
              threads: int, cache_mib: int, upperdir: str | None, allow_downgrade: bool, init_layer: bool,
              init_dirs: tuple[str, ...], profile_name: str | None, no_prefetch: bool,
              prefetch_mib: int | None, wait_prefetch: float | None) -> str | None:
    """Mount the image REF (or a manifest file) read-only at MOUNTPOINT.

    Returns once the mount answers, with the daemon in the background (its log and
    control socket are under /run/cnpsfs). Nothing is extracted: directories are read
    when looked up and chunks when read, each verified against its digest; a corrupt
    chunk gives EIO for that read, never wrong bytes. Unmount with `cnpsfs umount`.

    With a trust policy (--policy, docs/trust.md) the image must pass it first; the
    refusal names the image, the rule and the reason, and nothing is mounted.
    Without --init-layer the mount shows the image exactly as stored.

    The image's prefetch profile (`cnpsfs profile record`) is replayed in the
    background, on mount and after every live upgrade: directories composed, chunks
    decoded and verified, pages stored in the kernel's cache, always after the
    program's own requests (`cnpsfs status` shows the progress and the hits). The
    replay starts while the mount comes up and the mount returns without waiting for
    it, unless --wait-prefetch is given.
    """
    if profile_name is not None:
        if no_prefetch:
            raise UsageError("--profile and --no-prefetch exclude each other")
        try:
            fmt.check_profile_name(profile_name)
        except CnpsfsError as exc:
            raise UsageError(str(exc)) from None
    if app.remotes:
        from cnpsfs.image.manifest import looks_like_file

        if not looks_like_file(ref):
            app.resolve_ahead(ref)  # the remote's round trips overlap the imports below
    from cnpsfs.fs.mounting import mount_image, serve_image
    from cnpsfs.image.initlayer import CONTAINER_FILES, CONTAINER_TMPFS, check_destination

    init = (*CONTAINER_TMPFS, *(check_destination(d) for d in init_dirs)) if init_layer or init_dirs else None
    options = MountOptions(allow_other=allow_other, use_extensions=fuse_mode == "auto", threads=threads,
                           cache_mib=cache_mib, writable=upperdir, init_layer=init,
                           init_files=CONTAINER_FILES if init is not None else (), prefetch=not no_prefetch,
                           profile=profile_name, prefetch_mib=prefetch_mib, wait_prefetch=wait_prefetch)
    trust = app.checker()
    if foreground:
        serve_image(app.store(), ref, mountpoint, options, trust=trust, allow_downgrade=allow_downgrade)
        return None
    mounted = mount_image(app.store(), ref, mountpoint, options, trust=trust, allow_downgrade=allow_downgrade)
    report_mounted(mounted)
    return EXIT_NOW  # the daemon serves: this process need not tear its Python down


@click.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.option("--lazy", is_flag=True, help="Detach even if processes still use the mount.")
def umount_cmd(mountpoint: str, lazy: bool) -> None:
    """Unmount MOUNTPOINT and wait for its daemon to exit. Also cleans up after a
    daemon that was killed (the dead mount is detached)."""
    from cnpsfs.fs.daemon import unmount

    unmount(mountpoint, lazy=lazy)


@click.command("status")
@click.argument("mountpoint", type=click.Path())
@json_option
def status_cmd(mountpoint: str, as_json: bool) -> None:
    """Show a mount's image, generation, layers, FUSE mode and request counters."""
    status = control(mountpoint, {"op": "status"})
    if as_json:
        emit_json(status)
        return
    image = status["image"]
    click.echo(f"mountpoint  {status['mountpoint']}  (pid {status['pid']}, {status['fuse_mode']} mode)")
    click.echo(f"image       {image['name']}@{image['version']}  {image['digest'] or '(from manifest)'}")
    click.echo(f"generation  {status['generation']}")
    trust = status.get("trust") or {}
    click.echo(f"trust       {trust.get('reason') if trust.get('policy') else 'unverified (no trust policy)'}"
               + (f"  [policy {trust['policy']}]" if trust.get("policy") else ""))
    for number, layer in enumerate(status["layers"], 1):
        mark = " [unlinked]" if layer["unlinked"] else ""
        kind = "  (image)" if "image" in layer else ""
        click.echo(f"  {number:>3}. {layer['name']}@{layer['version']}{kind}{mark}")
    init = status.get("init_layer")
    if init is not None:
        click.echo(f"init layer  {init['fileset']}  adds {', '.join(init['added']) or 'nothing'}")
    click.echo("history")
    for item in status["history"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item["time"]))
        click.echo(f"  {item['generation']:>3}. {when}  {item['image']}  ({item['reason']})")
    click.echo("requests    " + ", ".join(f"{k}={v}" for k, v in sorted(status["requests"].items())))
    remote = status.get("remote")
    if remote:
        cache = remote["cache"]
        limit = f"limit {cache['limit']}" if cache.get("limit") is not None else "no limit"
        click.echo(f"cache       hits={cache.get('hits', 0)} misses={cache.get('misses', 0)} "
                   f"bytes={cache.get('bytes', 0)} packs={cache.get('packs', 0)} ({limit})")
        for r in remote["remotes"]:
            click.echo(f"remote      {r['name']}: bytes={r.get('bytes', 0)} requests={r.get('requests', 0)} "
                       f"errors={r.get('errors', 0)} retries={r.get('retries', 0)} blocks={r.get('blocks', 0)} "
                       f"corrupt={r.get('corrupt', 0)}")
    click.echo("prefetch    " + prefetch_line(status.get("prefetch") or {}))
    recording = status.get("recording")
    if recording:
        state = f"abandoned: {recording['aborted']}" if recording["aborted"] else "running"
        click.echo(f"recording   {state}: {recording['entries']} paths, {recording['events']} requests in "
                   f"{recording['seconds']:.1f} s")


def prefetch_line(p: dict[str, Any]) -> str:
    """What `cnpsfs status` says of the replay of a profile."""
    if p.get("state", "none") in ("none", "loading"):
        return f"{p.get('state', 'none')} ({p.get('reason') or 'no profile'})"
    why = f" ({p['reason']})" if p.get("reason") else ""
    pushed = f", {human_size(p['pushed_bytes'])} of pages in the kernel" if p.get("pushed_bytes") else ""
    return (f"profile {p['profile']} {p['state']}{why}: {p['walked']} of {p['entries']} paths, {p['chunks']} chunks "
            f"({human_size(p['bytes'])}){pushed}; {p['hits']} hits, {p['demand_misses']} chunks loaded on demand")


@click.command("upgrade")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("ref", metavar="REF|MANIFEST")
@click.option("--allow-downgrade", is_flag=True, help="Accept a signed revision older than one accepted before.")
@json_option
def upgrade_cmd(mountpoint: str, ref: str, allow_downgrade: bool, as_json: bool) -> None:
    """Swap the live mount at MOUNTPOINT to another image, atomically.

    The new composition is built beside the current one, checked (union conflicts,
    missing objects or chunks leave the mount untouched), and made current in one step:
    every lookup, listing and read sees the old tree or the new one, never a mix. Files
    open before the swap keep reading their old content; unchanged entries keep their
    inode numbers and kernel caches. The cost grows with the change, not the image.
    The mount's trust policy (the one it was mounted with, re-read now) decides first: a
    refused image leaves the mount serving what it served.
    """
    if os.path.isfile(ref):
        ref = os.path.abspath(ref)
    request = {"op": "upgrade", "ref": ref, "allow_downgrade": allow_downgrade}
    report_swap(mountpoint, control(mountpoint, request), as_json)


@click.command("unlink")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("layer")
@json_option
def unlink_cmd(mountpoint: str, layer: str, as_json: bool) -> None:
    """Hide LAYER of the live mount (1-based position, FileSet reference or label), atomically."""
    report_swap(mountpoint, control(mountpoint, {"op": "unlink", "layer": layer}), as_json)


@click.command("link")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("layer")
@json_option
def link_cmd(mountpoint: str, layer: str, as_json: bool) -> None:
    """Show an unlinked LAYER of the live mount again, atomically."""
    report_swap(mountpoint, control(mountpoint, {"op": "link", "layer": layer}), as_json)


@click.command("rollback")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--allow-downgrade", is_flag=True, help="Go back to an older signed revision (rollback protection).")
@json_option
def rollback_cmd(mountpoint: str, allow_downgrade: bool, as_json: bool) -> None:
    """Return the live mount to the image it served before the last swap.

    Under a trust policy, going back to an older signed revision needs --allow-downgrade,
    like any downgrade (docs/trust.md).
    """
    report_swap(mountpoint, control(mountpoint, {"op": "rollback", "allow_downgrade": allow_downgrade}), as_json)


COMMANDS = [mount_cmd, umount_cmd, status_cmd, upgrade_cmd, unlink_cmd, link_cmd, rollback_cmd]

