"""``cnpsfs service``: what systemd's ``cnpsfs@.service`` runs.

Thin: ``service run`` is ``cnpsfs mount --foreground`` with its options read from
``/etc/cnpsfs/mounts/NAME.toml`` (:mod:`cnpsfs.fs.unit`), ``service reload`` is ``cnpsfs
upgrade``, ``service stop`` is ``cnpsfs umount``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from cnpsfs.cli.context import App, control, json_option, remote_options, report_swap, stream_is_journal
from cnpsfs.errors import CnpsfsError, MountpointBusyError, UsageError
from cnpsfs.fs.options import DEFAULT_CACHE_MIB, DEFAULT_THREADS

log = logging.getLogger(__name__)

SERVICE_HELP = f"""\
Run mounts as systemd services: cnpsfs@NAME.service reads /etc/cnpsfs/mounts/NAME.toml.

\b
  image = "example.org/web@2"          # reference or manifest file (required)
  mountpoint = "/var/lib/machines/%i"  # default (%i is NAME)
  writable = "/var/lib/cnpsfs/upper/%i"  # optional overlayfs upper directory
  allow_other = true                   # default false
  store = "/var/lib/cnpsfs"            # default: the usual store
  fuse_mode = "auto"                   # or "stock"
  threads = {DEFAULT_THREADS}
  cache_mib = {DEFAULT_CACHE_MIB}
  remotes = ["origin"]                 # read what the store lacks from these (remotes.toml)
  remote_timeout = 30
  cache_size = "20G"                   # bound on blocks kept from remotes
  profile = "web"                      # prefetch profile to replay (default "default")
  prefetch = false                     # replay none (default true)

See docs/systemd.md for installing the unit and boot ordering.
"""


def _config_dir(ctx: click.Context) -> Path:
    from cnpsfs.fs.unit import config_dir

    return ctx.meta.get("cnpsfs.service_dir") or config_dir()


@click.group("service", help=SERVICE_HELP)
@click.option("--config-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Where NAME.toml files live (default: $CNPSFS_SERVICE_DIR, else /etc/cnpsfs/mounts).")
@click.pass_context
def service_group(ctx: click.Context, config_dir: Path | None) -> None:
    if config_dir is not None:
        ctx.meta["cnpsfs.service_dir"] = config_dir


@service_group.command("run")
@click.argument("name")
@remote_options
@click.pass_context
def service_run(ctx: click.Context, name: str) -> None:
    """Mount NAME in the foreground (ExecStart, Type=notify).

    Creates the mountpoint if needed, detaches a dead mount a killed predecessor left,
    then serves until stopped: READY=1 once the mount answers, STATUS= after every
    swap, WATCHDOG=1 while it serves, STOPPING=1 on the way out. SIGHUP re-reads a
    manifest-file image; SIGUSR1 dumps the threads' stacks to the journal.
    """
    from cnpsfs.fs.mounting import serve_image
    from cnpsfs.fs.unit import load_config, missing_capabilities
    from cnpsfs.store import HostedStore, LocalStore

    config = load_config(name, _config_dir(ctx))
    missing = missing_capabilities(config)
    if missing:
        raise UsageError(f"mount {name} is writable ({config.source}) but this process may not use "
                          f"{', '.join(missing)}: the unit's sandbox was generated for a read-only mount; "
                          "run `systemctl daemon-reload` after changing writable (docs/systemd.md)")
    app = ctx.find_object(App)
    assert app is not None
    if not app.debug:
        logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    faulthandler.enable()  # SIGABRT from a watchdog timeout leaves the stacks in the journal
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    os.makedirs(config.mountpoint, exist_ok=True)
    _detach_dead(config.mountpoint)
    log.info("mount %s: %s at %s%s", name, config.image, config.mountpoint,
             f" (writable, upper {config.writable})" if config.writable else "")
    remotes = config.remotes or app.remotes
    if remotes:
        from cnpsfs.store.cached import open_cached, parse_size

        local = LocalStore(Path(config.store) if config.store else app.store_path, create=True)
        store: HostedStore = open_cached(local, remotes, timeout=config.remote_timeout or app.remote_timeout,
                                   cache_size=parse_size(config.cache_size) if config.cache_size else app.cache_size)
    else:
        store = LocalStore(Path(config.store)) if config.store else app.store()
    state = _state_path(config.source)
    _write_state(state, {"name": name, "mountpoint": os.path.realpath(config.mountpoint), "pid": os.getpid()})
    try:
        serve_image(store, config.image, config.mountpoint, config.mount_options(), trust=app.checker())
    finally:
        state.unlink(missing_ok=True)  # a killed daemon leaves it: ExecStopPost or the restart use it


def _state_path(source: Path) -> Path:
    """Where ``service run`` notes what it mounted, for ``service stop``: keyed by the mount file.

    Stop acts on what runs, not on what the file says now: the file may have been edited
    since (another mountpoint, a typo) while the old mount still has to come down.
    """
    import hashlib

    from cnpsfs.fs.daemon import runtime_dir

    key = hashlib.blake2b(os.fsencode(os.path.realpath(source)), digest_size=8).hexdigest()
    directory = runtime_dir() / "services"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory / f"{source.stem}-{key}.json"


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("mountpoint"), str) else None


def _detach_dead(mountpoint: str) -> None:
    """A daemon killed by the watchdog (or SIGKILL) leaves a dead mount and its record."""
    from cnpsfs.fs.daemon import MountRecord, mounted_fstype, status_record, unmount

    real = os.path.realpath(mountpoint)
    if MountRecord.load(real) is None:
        if mounted_fstype(real) == "fuse.cnpsfs":
            with contextlib.suppress(OSError):
                os.statvfs(real)  # stat may be answered from the kernel's cache; statfs never is
                return  # a live mount someone else made: check_mountpoint reports it
            log.warning("detaching a dead cnpsfs mount at %s", real)
            unmount(real, lazy=True)
        return
    if not status_record(real)["alive"]:
        log.warning("cleaning up after a cnpsfs daemon that died at %s", real)
        unmount(real, lazy=True)


@service_group.command("reload")
@click.argument("name")
@json_option
@click.pass_context
def service_reload(ctx: click.Context, name: str, as_json: bool) -> None:
    """Live-upgrade mount NAME to the image its file names now (ExecReload).

    A reference is resolved again (a NAME without @VERSION follows its newest tag); a
    manifest file is re-read (what SIGHUP does). Same as `cnpsfs upgrade MOUNTPOINT
    REF`: atomic, and a failed composition leaves the mount as it was. Writable mounts
    cannot change their lower layers: restart those instead.
    """
    from cnpsfs.fs.daemon import status_record
    from cnpsfs.fs.unit import load_config

    config = load_config(name, _config_dir(ctx))
    real = os.path.realpath(config.mountpoint)
    try:
        record = status_record(real)
    except UsageError:
        raise CnpsfsError(f"mount {name} is not running at {config.mountpoint} (was the mountpoint changed? "
                          "that needs a restart)") from None
    if config.store and os.path.realpath(config.store) != os.path.realpath(record["store"]):
        raise CnpsfsError(f"mount {name} serves store {record['store']} but {config.source} names {config.store}: "
                          "a different store needs a restart")
    if config.image == record["ref"] and os.path.isfile(config.image):
        request: dict[str, Any] = {"op": "reload"}
    else:
        request = {"op": "upgrade", "ref": config.image}
    try:
        result = control(real, request)
    except CnpsfsError as exc:
        raise CnpsfsError(f"mount {name}: reload to {config.image} failed, the mount is unchanged: {exc}",
                          exit_code=exc.exit_code) from None
    if as_json or not stream_is_journal(sys.stdout):
        report_swap(config.mountpoint, result, as_json)
    # Under systemd (ExecReload) the daemon's own journal line says what the swap did.


@service_group.command("stop")
@click.argument("name")
@click.pass_context
def service_stop(ctx: click.Context, name: str) -> None:
    """Unmount NAME and wait for its daemon (ExecStop and ExecStopPost).

    Acts on the mount `service run` made (its mountpoint is noted in /run/cnpsfs), even
    when the file changed since; without one, on the file's mountpoint. Not mounted is
    success (ExecStopPost runs after a clean stop too), and so is a file that does not
    parse when nothing was mounted from it (its error was ExecStart's to report); a dead
    mount is detached; a mount still in use is detached lazily, with a warning, and its
    daemon stopped, so a stop always completes at once: what its users still hold open
    there fails with ENOTCONN from then on (a service's daemon has to exit for the unit
    to stop).
    """
    from cnpsfs.fs.daemon import MountRecord, mounted_fstype, unmount
    from cnpsfs.fs.unit import check_name, load_config

    check_name(name)
    state_path = _state_path(_config_dir(ctx) / f"{name}.toml")
    state = _read_state(state_path)
    quiet = stream_is_journal(sys.stderr)  # ExecStopPost after a clean stop: nothing to say
    if state is not None:
        real = state["mountpoint"]
    else:
        try:
            real = os.path.realpath(load_config(name, _config_dir(ctx)).mountpoint)
        except CnpsfsError as exc:
            if not quiet:
                click.echo(f"mount {name}: not running ({exc})", err=True)
            return
    if MountRecord.load(real) is None and mounted_fstype(real) is None:
        state_path.unlink(missing_ok=True)
        if not quiet:
            click.echo(f"mount {name}: {real} is not mounted", err=True)
        return
    try:
        unmount(real)
    except MountpointBusyError as exc:
        log.warning("mount %s: %s; detaching it lazily and stopping the daemon (files still open there "
                    "fail with ENOTCONN)", name, exc)
        unmount(real, lazy=True, terminate=True)
    state_path.unlink(missing_ok=True)
    click.echo(f"mount {name}: unmounted {real}", err=True)


@service_group.command("generate")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("unused", nargs=-1, type=click.Path(), metavar="[EARLY LATE]")
@click.pass_context
def service_generate(ctx: click.Context, directory: Path, unused: tuple[str, ...]) -> None:
    """Write each mount's sandbox drop-in into DIRECTORY (a systemd generator).

    systemd runs systemd/cnpsfs-generator (this command) at boot and at every
    `systemctl daemon-reload`, with its generator directories; for every NAME.toml a
    cnpsfs@NAME.service.d/50-cnpsfs-sandbox.conf says what that mount needs and the unit
    cannot know: a read-only mount keeps only CAP_SYS_ADMIN. A file that does not parse is
    skipped with a warning (its unit then fails to start, naming the file).
    """
    from cnpsfs.fs.unit import DROPIN_NAME, load_config, sandbox_dropin

    config_dir = _config_dir(ctx)
    for path in sorted(config_dir.glob("*.toml")) if config_dir.is_dir() else []:
        try:
            config = load_config(path.stem, config_dir)
        except CnpsfsError as exc:
            log.warning("cnpsfs@%s.service: no sandbox drop-in: %s", path.stem, exc)
            continue
        dropin_dir = directory / f"cnpsfs@{config.name}.service.d"
        dropin_dir.mkdir(parents=True, exist_ok=True)
        (dropin_dir / DROPIN_NAME).write_text(sandbox_dropin(config))


@service_group.command("show")
@click.argument("name")
@click.pass_context
def service_show(ctx: click.Context, name: str) -> None:
    """Print NAME's configuration with every default filled in (JSON)."""
    from cnpsfs.fs.unit import load_config

    click.echo(json.dumps(load_config(name, _config_dir(ctx)).as_dict(), indent=2, sort_keys=True))


COMMANDS = [service_group]
