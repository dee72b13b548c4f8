"""``cnpsfs bundle``: an OCI runtime bundle (``runc run --bundle DIR``) over a cnpsfs mount.

Thin: the rootfs is what ``cnpsfs mount`` mounts (:func:`cnpsfs.fs.mounting.mount_image`),
config.json is what :mod:`cnpsfs.oci.bundle` writes from the image's run config.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import click

from cnpsfs.cli.context import App, pass_app, recorded_line, remote_options, report_mounted
from cnpsfs.errors import UsageError


@click.command("bundle")
@remote_options
@click.argument("ref", metavar="REF")
@click.argument("directory", metavar="DIR", required=False)
@click.option("--remove", is_flag=True, help="Unmount DIR/rootfs and delete DIR/config.json (give only DIR).")
@click.option("--writable", "upperdir", type=click.Path(file_okay=False), default=None, metavar="UPPERDIR",
              help="Mount the rootfs writable, changes in UPPERDIR (as `cnpsfs mount --writable`).")
@click.option("--allow-other", is_flag=True, help="Let users other than root use the rootfs mount.")
@click.option("--record-profile", "record", is_flag=True,
              help="First run the image's command once on a mount of it and store what it read as the image's "
                   "prefetch profile 'default', which the bundle's mount then replays.")
@click.option("--record-seconds", type=click.FloatRange(1, 3600), default=30.0, show_default=True,
              metavar="SECONDS", help="With --record-profile: stop the command after SECONDS.")
@pass_app
def bundle_cmd(app: App, ref: str, directory: str | None, remove: bool, upperdir: str | None,
               allow_other: bool, record: bool, record_seconds: float) -> None:
    """Make DIR an OCI runtime bundle of image REF: `runc run --bundle DIR ID`.

    Mounts REF at DIR/rootfs (read-only, or overlayfs over it with --writable), with an
    init layer giving config.json's mount destinations (/proc, /dev, /sys, ...) and
    /etc/hostname, /etc/hosts, /etc/resolv.conf and /etc/mtab a place where the image lacks
    them, and writes DIR/config.json from the image's run config: args = entrypoint + cmd, env (PATH by
    default), cwd = workdir, user resolved through the image's /etc/passwd and
    /etc/group, and runc's default namespaces (a network namespace with loopback only),
    mounts and capabilities. `cnpsfs bundle --remove DIR` undoes it; it refuses a
    directory that is not a cnpsfs bundle.

    With --record-profile the image's command first runs once, chrooted into a private
    mount of the image (as root, for at most --record-seconds), and what it read becomes
    the image's prefetch profile, which the bundle's own mount then replays.
    """
    if remove:
        if directory is not None or upperdir is not None or allow_other or record:
            raise UsageError("--remove takes only DIR: cnpsfs bundle --remove DIR")
        _remove_bundle(ref)
        return
    if directory is None:
        raise UsageError("missing DIR: cnpsfs bundle REF DIR")
    _create_bundle(app, ref, directory, upperdir, allow_other, record_seconds if record else None)


def _create_bundle(app: App, ref: str, directory: str, upperdir: str | None, allow_other: bool,
                   record_seconds: float | None) -> None:
    from cnpsfs.fs.daemon import unmount
    from cnpsfs.fs.mounting import mount_image
    from cnpsfs.fs.options import MountOptions
    from cnpsfs.image.manifest import load_image, looks_like_file
    from cnpsfs.oci.bundle import build_config, hostname_for

    bundle = Path(directory).absolute()
    config_path = bundle / "config.json"
    if config_path.exists():
        raise UsageError(f"{bundle} already has a config.json (cnpsfs bundle --remove {directory} first)")
    if looks_like_file(ref):
        ref = os.path.abspath(ref)
    image, digest = load_image(app.store(), ref)
    trust = app.checker()
    if trust is not None:
        trust.check(app.store(), image, digest, record=False)  # refused before anything is made
    config, user = build_config(app.store(), image, digest, hostname=hostname_for(bundle.name),
                                writable=os.path.abspath(upperdir) if upperdir else None)
    if user.uid != 0 and not allow_other and upperdir is None:
        raise UsageError(f"{image.name}@{image.version} runs as uid {user.uid}, but a FUSE mount admits only "
                         "root without --allow-other (or use --writable: overlayfs reads it as root)")
    if record_seconds is not None:
        from cnpsfs.fs.record import record_image_command

        store = app.store()
        profile = record_image_command(store, ref, seconds=record_seconds,
                                       say=lambda message: click.echo(f"bundle: {message}", err=True))
        click.echo(f"bundle: {recorded_line(profile)}", err=True)
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    # The init layer gives every mount destination of config.json a place to land, so an
    # image without /proc or /dev (FROM scratch) runs on the read-only rootfs.
    destinations = tuple(mount["destination"] for mount in config["mounts"])
    mounted = mount_image(app.store(), ref, str(bundle / "rootfs"),
                          MountOptions(allow_other=allow_other, writable=upperdir, init_layer=destinations),
                          trust=trust)
    report_mounted(mounted)
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


COMMANDS = [bundle_cmd]
