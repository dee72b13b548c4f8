"""``cnpsfs profile``: record prefetch profiles on live mounts; list, show and remove them.

A profile (docs/format.md §1.13) lists what a program touched on a mount, in the order it
touched it; it is filed under the image, and later mounts of that image (and upgrades to
it) replay it in the background so the program finds its directories composed and its
data decoded, or already in the kernel's page cache.
"""

from __future__ import annotations

import os

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import App, emit_json, json_option, pass_app, profile_lines, recorded_line
from cnpsfs.errors import CnpsfsError, FormatError, UsageError
from cnpsfs.store import T_FILESET, T_IMAGE, TYPE_NAMES, Store

#: The longest a recording may run (the daemon's own limit too; fs/record.py).
RECORD_MAX_SECONDS = 3600.0


def say(message: str) -> None:
    click.echo(f"cnpsfs: {message}", err=True)


@click.group("profile")
def profile_group() -> None:
    """Prefetch profiles: what a program reads as it starts, replayed by later mounts.

    `cnpsfs mount` replays the image's profile named `default` (`--profile NAME` for
    another, `--no-prefetch` for none) in the background: directories composed, chunks
    decoded and verified, pages stored in the kernel's cache, in the recorded order,
    always after the program's own requests. A profile is advice: a stale or wrong one
    costs time, never correctness.
    """


def _name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return fmt.check_profile_name(value)
    except FormatError as exc:
        raise click.BadParameter(str(exc)) from None


@profile_group.command("record", context_settings={"ignore_unknown_options": True})
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND...]")
@click.option("--for", "seconds", type=click.FloatRange(0.1, RECORD_MAX_SECONDS), default=None, metavar="SECONDS",
              help="Record for SECONDS, then store the profile.")
@click.option("--until-idle", is_flag=True, help="Record until no request has reached the mount for --idle seconds.")
@click.option("--idle", type=click.FloatRange(0.1, 600), default=2.0, show_default=True, metavar="SECONDS",
              help="With --until-idle: how long without a request ends the recording.")
@click.option("--name", default=fmt.DEFAULT_PROFILE, show_default=True, callback=_name,
              help="The profile's name; it replaces the image's profile of that name.")
@json_option
def record_cmd(mountpoint: str, command: tuple[str, ...], seconds: float | None, until_idle: bool, idle: float,
               name: str, as_json: bool) -> None:
    """Record which directories and file ranges programs read on the live mount at
    MOUNTPOINT, and store that as a profile of the mounted image.

    Recording starts by dropping the mount's kernel caches, so everything touched from
    then on reaches the daemon. It ends after --for SECONDS, once the mount has been idle
    for --idle seconds (--until-idle), or when COMMAND exits (run it after `--`, e.g.
    `cnpsfs profile record /mnt/app -- chroot /mnt/app /opt/app/run --selftest`; with
    --for too, the command is stopped after that long: the start of a server);
    Ctrl-C ends it early and stores what was recorded. Directories and files are kept
    in first-access order, a file's ranges merged, within the limits of docs/format.md
    §1.13 (at most 65,536 paths). Prints the profile's digest last on stdout.
    """
    if until_idle and (seconds or command):
        raise UsageError("--until-idle goes alone: --for SECONDS bounds a COMMAND, or is the recording's length")
    if not (seconds or until_idle or command):
        raise UsageError("say how long to record: --for SECONDS, --until-idle, or a COMMAND after `--`")
    from cnpsfs.fs.record import record_profile

    result = record_profile(mountpoint, name, seconds=seconds, until_idle=until_idle, idle=idle,
                            command=list(command) or None, say=say if not as_json else lambda _m: None)
    if as_json:
        emit_json(result)
        return
    say(recorded_line(result))
    if result["exit_status"]:
        say(f"note: {command[0]} exited with status {result['exit_status']}")
    click.echo(result["digest"])


def _image(store: Store, ref: str) -> bytes:
    """An image, or a FileSet (whose profiles are those of mounts of it alone)."""
    digest = store.resolve(ref)
    if store.object_type(digest) not in (T_IMAGE, T_FILESET):
        raise UsageError(f"{ref} is a {TYPE_NAMES.get(store.object_type(digest) or -1, 'object')}: profiles are "
                         "filed under images and FileSets")
    return digest


@profile_group.command("ls")
@click.argument("image", metavar="IMAGE")
@json_option
@pass_app
def ls_cmd(app: App, image: str, as_json: bool) -> None:
    """List the profiles of IMAGE."""
    from cnpsfs.image.profiles import describe_profiles

    rows = describe_profiles(app.store(), _image(app.store(), image))
    if as_json:
        emit_json(rows)
        return
    for line in profile_lines(rows):
        click.echo(line)


@profile_group.command("show")
@click.argument("image", metavar="IMAGE")
@click.argument("name", default=fmt.DEFAULT_PROFILE, callback=_name)
@json_option
@pass_app
def show_cmd(app: App, image: str, name: str, as_json: bool) -> None:
    """Print profile NAME of IMAGE: one path a line in replay order, `dir`, `list`
    (a listing), `file` with its byte ranges, or `name` (looked up only: a file that was
    not read, a symlink, or a name that does not exist)."""
    from cnpsfs.image.profiles import find_profile

    store = app.store()
    chosen, _bad = find_profile(store, _image(store, image), name)
    if chosen is None or chosen.profile is None:
        raise CnpsfsError(f"{image} has no profile named {name!r}")
    profile = chosen.profile
    words = {fmt.Touch.DIR: "dir", fmt.Touch.LISTED: "list", fmt.Touch.FILE: "file", fmt.Touch.LOOKUP: "name"}
    if as_json:
        emit_json({"digest": fmt.format_digest(chosen.digest), "name": profile.name,
                   "recorded_on": fmt.format_digest(profile.image), "created_ns": profile.created_ns,
                   "metadata": profile.metadata,
                   "entries": [{"touch": words[e.touch], "path": "/" + os.fsdecode(e.path),
                                **({"ranges": [list(s) for s in e.spans()]} if e.ranges else {})}
                               for e in profile.entries]})
        return
    for entry in profile.entries:
        spans = " ".join(f"{o}+{n}" for o, n in entry.spans())
        click.echo(f"{words[entry.touch]:<4}  /{entry.path.decode('utf-8', 'backslashreplace')}"
                   + (f"  {spans}" if spans else ""))


@profile_group.command("rm")
@click.argument("image", metavar="IMAGE")
@click.argument("name", callback=_name)
@pass_app
def rm_cmd(app: App, image: str, name: str) -> None:
    """Remove profile NAME from IMAGE (its object goes at the next `cnpsfs gc`)."""
    from cnpsfs.image.profiles import remove_profile

    store = app.store()
    remove_profile(store, _image(store, image), name)
    click.echo(f"removed profile {name} of {image}", err=True)


COMMANDS = [profile_group]
