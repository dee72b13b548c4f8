"""``cnpsfs service`` (what systemd's ``cnpsfs@.service`` runs) and ``cnpsfs bundle``.

Both are thin: ``service run`` is ``cnpsfs mount --foreground`` with its options read
from ``/etc/cnpsfs/mounts/NAME.toml`` (service.py), ``service reload`` is ``cnpsfs
upgrade``, ``service stop`` is ``cnpsfs umount``; ``bundle`` is ``cnpsfs mount`` plus the
config.json bundle.py writes. Imports of cli.py happen inside the commands: cli.py
registers these commands at its end.
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

from cnpsfs.errors import CnpsfsError, UsageError

log = logging.getLogger(__name__)

SERVICE_HELP = """\
Run mounts as systemd services: cnpsfs@NAME.service reads /etc/cnpsfs/mounts/NAME.toml.

\b
  image = "example.org/web@2"          # reference or manifest file (required)
  mountpoint = "/var/lib/machines/%i"  # default (%i is NAME)
  writable = "/var/lib/cnpsfs/upper/%i"  # optional overlayfs upper directory
  allow_other = true                   # default false
  store = "/var/lib/cnpsfs"            # default: the usual store
  fuse_mode = "auto"                   # or "stock"
  threads = 4
  cache_mib = 128

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
@click.pass_context
def service_run(ctx: click.Context, name: str) -> None:
    """Mount NAME in the foreground (ExecStart, Type=notify).

    Creates the mountpoint if needed, detaches a dead mount a killed predecessor left,
    then serves until stopped: READY=1 once the mount answers, STATUS= after every
    swap, WATCHDOG=1 while it serves, STOPPING=1 on the way out. SIGHUP re-reads a
    manifest-file image; SIGUSR1 dumps the threads' stacks to the journal.
    """
    from cnpsfs.cli.app import App, mount_cmd
    from cnpsfs.fs.unit import load_config

    config = load_config(name, _config_dir(ctx))
    app = ctx.find_object(App)
    assert app is not None
    if not app.debug:
        logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    faulthandler.enable()  # SIGABRT from a watchdog timeout leaves the stacks in the journal
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    os.makedirs(config.mountpoint, exist_ok=True)
    _detach_dead(config.mountpoint)
    ctx.obj = App(Path(config.store) if config.store else app.store_path, app.debug)
    log.info("mount %s: %s at %s%s", name, config.image, config.mountpoint,
             f" (writable, upper {config.writable})" if config.writable else "")
    ctx.invoke(mount_cmd, ref=config.image, mountpoint=config.mountpoint, foreground=True,
               allow_other=config.allow_other, fuse_mode=config.fuse_mode, threads=config.threads,
               cache_mib=config.cache_mib, upperdir=config.writable)


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
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def service_reload(ctx: click.Context, name: str, as_json: bool) -> None:
    """Live-upgrade mount NAME to the image its file names now (ExecReload).

    A reference is resolved again (a NAME without @VERSION follows its newest tag); a
    manifest file is re-read (what SIGHUP does). Same as `cnpsfs upgrade MOUNTPOINT
    REF`: atomic, and a failed composition leaves the mount as it was. Writable mounts
    cannot change their lower layers: restart those instead.
    """
    from cnpsfs.cli.app import _control, _report_swap
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
    _report_swap(config.mountpoint, _control(real, request), as_json)


@service_group.command("stop")
@click.argument("name")
@click.pass_context
def service_stop(ctx: click.Context, name: str) -> None:
    """Unmount NAME and wait for its daemon (ExecStop and ExecStopPost).

    Not mounted is success (ExecStopPost runs after a clean stop too); a dead mount is
    detached; a mount still in use is detached lazily, with a warning, so a stop
    always completes: its users keep what they hold open until they let go.
    """
    from cnpsfs.fs.daemon import MountRecord, mounted_fstype, unmount
    from cnpsfs.fs.unit import load_config

    config = load_config(name, _config_dir(ctx))
    real = os.path.realpath(config.mountpoint)
    if MountRecord.load(real) is None and mounted_fstype(real) is None:
        click.echo(f"mount {name}: {config.mountpoint} is not mounted", err=True)
        return
    try:
        unmount(real)
    except CnpsfsError as exc:
        if "busy" not in str(exc):
            raise
        log.warning("mount %s: %s; detaching it lazily", name, exc)
        unmount(real, lazy=True)
    click.echo(f"mount {name}: unmounted {config.mountpoint}", err=True)


@service_group.command("show")
@click.argument("name")
@click.pass_context
def service_show(ctx: click.Context, name: str) -> None:
    """Print NAME's configuration with every default filled in (JSON)."""
    from cnpsfs.fs.unit import load_config

    click.echo(json.dumps(load_config(name, _config_dir(ctx)).as_dict(), indent=2, sort_keys=True))


# --------------------------------------------------------------------------- OCI bundles


@click.command("bundle")
@click.argument("ref", metavar="REF")
@click.argument("directory", metavar="DIR", required=False)
@click.option("--remove", is_flag=True, help="Unmount DIR/rootfs and delete DIR/config.json (give only DIR).")
@click.option("--writable", "upperdir", type=click.Path(file_okay=False), default=None, metavar="UPPERDIR",
              help="Mount the rootfs writable, changes in UPPERDIR (as `cnpsfs mount --writable`).")
@click.option("--allow-other", is_flag=True, help="Let users other than root use the rootfs mount.")
@click.pass_context
def bundle_cmd(ctx: click.Context, ref: str, directory: str | None, remove: bool, upperdir: str | None,
               allow_other: bool) -> None:
    """Make DIR an OCI runtime bundle of image REF: `runc run --bundle DIR ID`.

    Mounts REF at DIR/rootfs (read-only, or overlayfs over it with --writable) and writes
    DIR/config.json from the image's run config: args = entrypoint + cmd, env (PATH by
    default), cwd = workdir, user resolved through the image's /etc/passwd and
    /etc/group, and runc's default namespaces (a network namespace with loopback only),
    mounts and capabilities. `cnpsfs bundle --remove DIR` undoes it; it refuses a
    directory that is not a cnpsfs bundle.
    """
    if remove:
        if directory is not None or upperdir is not None or allow_other:
            raise UsageError("--remove takes only DIR: cnpsfs bundle --remove DIR")
        _remove_bundle(ref)
        return
    if directory is None:
        raise UsageError("missing DIR: cnpsfs bundle REF DIR")
    _create_bundle(ctx, ref, directory, upperdir, allow_other)


def _create_bundle(ctx: click.Context, ref: str, directory: str, upperdir: str | None, allow_other: bool) -> None:
    from cnpsfs.cli.app import App, mount_cmd
    from cnpsfs.fs.daemon import unmount
    from cnpsfs.image.manifest import load_image, looks_like_file
    from cnpsfs.oci.bundle import build_config, hostname_for

    bundle = Path(directory).absolute()
    config_path = bundle / "config.json"
    if config_path.exists():
        raise UsageError(f"{bundle} already has a config.json (cnpsfs bundle --remove {directory} first)")
    app = ctx.find_object(App)
    assert app is not None
    if looks_like_file(ref):
        ref = os.path.abspath(ref)
    image, digest = load_image(app.store(), ref)
    config, user = build_config(app.store(), image, digest, hostname=hostname_for(bundle.name),
                                writable=os.path.abspath(upperdir) if upperdir else None)
    if user.uid != 0 and not allow_other and upperdir is None:
        raise UsageError(f"{image.name}@{image.version} runs as uid {user.uid}, but a FUSE mount admits only "
                         "root without --allow-other (or use --writable: overlayfs reads it as root)")
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    ctx.invoke(mount_cmd, ref=ref, mountpoint=str(bundle / "rootfs"), foreground=False, allow_other=allow_other,
               fuse_mode="auto", threads=4, cache_mib=128, upperdir=upperdir)
    try:
        tmp = config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, config_path)
    except OSError:
        unmount(str(bundle / "rootfs"), lazy=True)
        raise
    click.echo(f"bundle {bundle}: run it with `runc run --bundle {bundle} ID`", err=True)
    click.echo(str(bundle))


def _remove_bundle(directory: str) -> None:
    from cnpsfs.fs.daemon import MountRecord, mounted_fstype, unmount
    from cnpsfs.oci.bundle import is_cnpsfs_bundle

    bundle = Path(directory).absolute()
    config_path = bundle / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{bundle} is not a bundle: it has no config.json") from None
    except ValueError:
        config = None
    if not is_cnpsfs_bundle(config):
        raise UsageError(f"{bundle} is not a cnpsfs bundle (its config.json was not written by cnpsfs bundle)")
    rootfs = str(bundle / "rootfs")
    if MountRecord.load(os.path.realpath(rootfs)) is not None or mounted_fstype(rootfs) is not None:
        unmount(rootfs)
    config_path.unlink()
    with contextlib.suppress(OSError):
        os.rmdir(rootfs)
    click.echo(f"removed bundle {bundle}", err=True)
