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
    from cnpsfs.fs.unit import load_config
    from cnpsfs.store import LocalStore, Store

    config = load_config(name, _config_dir(ctx))
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
        store: Store = open_cached(local, remotes, timeout=config.remote_timeout or app.remote_timeout,
                                   cache_size=parse_size(config.cache_size) if config.cache_size else app.cache_size)
    else:
        store = LocalStore(Path(config.store)) if config.store else app.store()
    serve_image(store, config.image, config.mountpoint, config.mount_options(), trust=app.checker())


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

    Not mounted is success (ExecStopPost runs after a clean stop too); a dead mount is
    detached; a mount still in use is detached lazily, with a warning, and its daemon
    stopped, so a stop always completes at once: what its users still hold open there
    fails with ENOTCONN from then on (a service's daemon has to exit for the unit to stop).
    """
    from cnpsfs.fs.daemon import MountRecord, mounted_fstype, unmount
    from cnpsfs.fs.unit import load_config

    config = load_config(name, _config_dir(ctx))
    real = os.path.realpath(config.mountpoint)
    if MountRecord.load(real) is None and mounted_fstype(real) is None:
        if not stream_is_journal(sys.stderr):  # ExecStopPost after a clean stop: nothing to say
            click.echo(f"mount {name}: {config.mountpoint} is not mounted", err=True)
        return
    try:
        unmount(real)
    except MountpointBusyError as exc:
        log.warning("mount %s: %s; detaching it lazily and stopping the daemon (files still open there "
                    "fail with ENOTCONN)", name, exc)
        unmount(real, lazy=True, terminate=True)
    click.echo(f"mount {name}: unmounted {config.mountpoint}", err=True)


@service_group.command("show")
@click.argument("name")
@click.pass_context
def service_show(ctx: click.Context, name: str) -> None:
    """Print NAME's configuration with every default filled in (JSON)."""
    from cnpsfs.fs.unit import load_config

    click.echo(json.dumps(load_config(name, _config_dir(ctx)).as_dict(), indent=2, sort_keys=True))


COMMANDS = [service_group]
