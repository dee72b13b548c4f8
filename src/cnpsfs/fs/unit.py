"""Mounts run by systemd: one ``cnpsfs@NAME.service`` per ``/etc/cnpsfs/mounts/NAME.toml``.

The file says what ``cnpsfs mount`` would be told on its command line (docs/systemd.md)::

    image = "example.org/web"            # a reference, or a manifest file (relative: to this file)
    mountpoint = "/var/lib/machines/%i"  # default; %i is the instance NAME
    writable = "/var/lib/cnpsfs/upper/%i"  # optional: overlayfs upper directory
    allow_other = true                   # optional, default false
    store = "/var/lib/cnpsfs"            # optional, default: the usual store
    fuse_mode = "auto"                   # or "stock"
    threads = 4
    cache_mib = 128
    remotes = ["origin"]                 # optional: remotes.toml names or URLs, tried in order
    remote_timeout = 30                  # optional: seconds a read may wait for a remote
    cache_size = "20G"                   # optional: bound on the blocks kept from remotes
    profile = "web"                      # optional: the prefetch profile to replay (default: "default")
    prefetch = false                     # optional: replay none (default true)
    init_layer = true                    # optional: compose the init layer (or a list of extra
                                         # mount destinations, which implies it); default false

Unknown keys are errors, so a typo never silently means a default.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnpsfs.errors import CnpsfsError, NotFoundError, UsageError
from cnpsfs.format.profile import check_profile_name
from cnpsfs.fs.options import (
    CACHE_MIB_RANGE,
    DEFAULT_CACHE_MIB,
    DEFAULT_THREADS,
    FUSE_MODES,
    THREADS_RANGE,
    MountOptions,
)
from cnpsfs.image.initlayer import CONTAINER_FILES, CONTAINER_TMPFS, check_destination
from cnpsfs.image.manifest import looks_like_file
from cnpsfs.store.remotelimits import MAX_TIMEOUT

DEFAULT_CONFIG_DIR = Path("/etc/cnpsfs/mounts")
DEFAULT_MOUNTPOINT = "/var/lib/machines/%i"
KEYS = {"image", "mountpoint", "writable", "allow_other", "store", "fuse_mode", "threads", "cache_mib", "remotes",
        "remote_timeout", "cache_size", "profile", "prefetch", "init_layer"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    source: Path
    image: str
    mountpoint: str
    writable: str | None = None
    allow_other: bool = False
    store: str | None = None
    fuse_mode: str = "auto"
    threads: int = DEFAULT_THREADS
    cache_mib: int = DEFAULT_CACHE_MIB
    remotes: tuple[str, ...] = ()
    remote_timeout: float | None = None
    cache_size: str | None = None
    profile: str | None = None
    prefetch: bool = True
    #: None: the image exactly as stored; else the init layer with these destinations
    #: beyond the container defaults (as ``cnpsfs mount --init-layer --init-dir``).
    init_layer: tuple[str, ...] | None = None

    def mount_options(self) -> MountOptions:
        init = None if self.init_layer is None else (*CONTAINER_TMPFS, *self.init_layer)
        return MountOptions(allow_other=self.allow_other, use_extensions=self.fuse_mode == "auto",
                            threads=self.threads, cache_mib=self.cache_mib, writable=self.writable,
                            prefetch=self.prefetch, profile=self.profile, init_layer=init,
                            init_files=CONTAINER_FILES if init is not None else ())

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def config_dir() -> Path:
    return Path(os.environ.get("CNPSFS_SERVICE_DIR") or DEFAULT_CONFIG_DIR)


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise UsageError(f"bad mount name {name!r}: letters, digits and . _ : - only (it names a file)")
    return name


def load_config(name: str, directory: Path | None = None) -> ServiceConfig:
    check_name(name)
    path = (directory or config_dir()) / f"{name}.toml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise NotFoundError(f"no configuration for mount {name!r}: {path} does not exist") from None
    return parse_config(text, name, path)


def parse_config(text: str, name: str, source: Path) -> ServiceConfig:
    def fail(message: str) -> UsageError:
        return UsageError(f"{source}: {message}")

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"not valid TOML: {exc}") from None
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(KEYS))})")

    def string(key: str, default: str | None = None) -> str | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise fail(f"{key} must be a non-empty string")
        return value.replace("%i", name)

    def absolute(key: str, default: str | None = None) -> str | None:
        value = string(key, default)
        if value is not None and not value.startswith("/"):
            raise fail(f"{key} must be an absolute path, not {value!r}")
        return value

    image = string("image")
    if image is None:
        raise fail("image is required (a reference such as example.org/app@1, or a manifest file)")
    if looks_like_file(image) or image.endswith(".toml"):
        image = str((source.parent / image).resolve()) if not image.startswith("/") else image
    mountpoint = absolute("mountpoint", DEFAULT_MOUNTPOINT)
    assert mountpoint is not None
    allow_other = raw.get("allow_other", False)
    if not isinstance(allow_other, bool):
        raise fail("allow_other must be true or false")
    fuse_mode = raw.get("fuse_mode", "auto")
    if fuse_mode not in FUSE_MODES:
        raise fail(f"fuse_mode must be 'auto' or 'stock', not {fuse_mode!r}")
    numbers = {}
    for key, (low, high), default in (("threads", THREADS_RANGE, DEFAULT_THREADS),
                                      ("cache_mib", CACHE_MIB_RANGE, DEFAULT_CACHE_MIB)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise fail(f"{key} must be an integer from {low} to {high}")
        numbers[key] = value
    remotes = raw.get("remotes", [])
    if not isinstance(remotes, list) or not all(isinstance(r, str) and r for r in remotes):
        raise fail("remotes must be a list of remote names or URLs")
    remote_timeout = raw.get("remote_timeout")
    if remote_timeout is not None and (not isinstance(remote_timeout, (int, float)) or isinstance(remote_timeout, bool)
                                       or not 0 < remote_timeout <= MAX_TIMEOUT):  # also false for nan
        raise fail(f"remote_timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds")
    cache_size = raw.get("cache_size")
    if cache_size is not None and not isinstance(cache_size, str):
        raise fail('cache_size must be a size such as "20G"')
    prefetch = raw.get("prefetch", True)
    if not isinstance(prefetch, bool):
        raise fail("prefetch must be true or false")
    profile = string("profile")
    if profile is not None:
        try:
            check_profile_name(profile)
        except CnpsfsError as exc:
            raise fail(str(exc)) from None
        if not prefetch:
            raise fail("profile and prefetch = false exclude each other")
    init_raw = raw.get("init_layer", False)
    init_layer: tuple[str, ...] | None
    if isinstance(init_raw, bool):
        init_layer = () if init_raw else None
    elif isinstance(init_raw, list) and all(isinstance(d, str) for d in init_raw):
        try:
            init_layer = tuple(check_destination(d.replace("%i", name)) for d in init_raw)
        except CnpsfsError as exc:
            raise fail(str(exc)) from None
    else:
        raise fail("init_layer must be true, false or a list of absolute directories")
    extra = {"init_layer": init_layer, "remotes": tuple(remotes),
             "remote_timeout": float(remote_timeout) if remote_timeout else None, "cache_size": cache_size,
             "profile": profile, "prefetch": prefetch}
    return ServiceConfig(name, source, image, os.path.normpath(mountpoint), absolute("writable"), allow_other,
                         absolute("store"), fuse_mode, numbers["threads"], numbers["cache_mib"], **extra)


# --------------------------------------------------------------------------- the generated sandbox

#: Capabilities a writable mount's daemon must keep: overlayfs copies up, creates
#: whiteouts and changes owners and modes with the credentials of the process that
#: mounted it (CAP_MKNOD for the whiteout of a deleted file, CAP_CHOWN/CAP_FOWNER/
#: CAP_FSETID/CAP_DAC_OVERRIDE to copy up and change other users' files, CAP_SETFCAP for
#: file capabilities), besides CAP_SYS_ADMIN for mount(2) itself. docs/systemd.md.
WRITABLE_CAPABILITIES = {"CAP_SYS_ADMIN": 21, "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3,
                         "CAP_FSETID": 4, "CAP_MKNOD": 27, "CAP_SETFCAP": 31}
#: What a read-only mount needs: mount(2) and umount(2).
READ_ONLY_CAPABILITIES = ("CAP_SYS_ADMIN",)
DROPIN_NAME = "50-cnpsfs-sandbox.conf"


def sandbox_dropin(config: ServiceConfig) -> str:
    """The drop-in ``cnpsfs service generate`` writes for ``cnpsfs@NAME.service``.

    The unit file holds the sandbox every mount can live with; what depends on the mount
    file is here, because systemd cannot read it: a read-only mount gives up every
    capability but CAP_SYS_ADMIN, a writable one keeps the full set (see
    :data:`WRITABLE_CAPABILITIES`); a mount with a remote that needs the network gets
    AF_INET and AF_INET6 (added to the unit's AF_UNIX: the setting is a list that adds
    up) and waits for network-online.target (:func:`needs_network`).
    """
    lines = [f"# Generated by `cnpsfs service generate` from {config.source}: edit that file and run",
             "# `systemctl daemon-reload`, not this one. docs/systemd.md explains each line."]
    network = needs_network(config)
    if network:
        lines += ["[Unit]", "Wants=network-online.target", "After=network-online.target"]
    lines.append("[Service]")
    if config.writable is None:
        lines.append(f"CapabilityBoundingSet={' '.join(READ_ONLY_CAPABILITIES)}")
    else:
        lines.append("# writable: overlayfs copies up with the mounter's credentials; every capability stays.")
    if network:
        lines.append("RestrictAddressFamilies=AF_INET AF_INET6")
    return "\n".join(lines) + "\n"


def needs_network(config: ServiceConfig) -> bool:
    """Whether the mount's remotes need IP sockets: any but ``file://`` URLs (mirrors included).

    A remote name that cannot be resolved here (remotes.toml missing or wrong) counts as
    needing the network: the mount then fails on the name, not on a socket refused.
    """
    if not config.remotes:
        return False
    from cnpsfs.store.remoteconf import load_remotes, remote_spec

    try:
        configured = load_remotes()
        urls = [url for remote in config.remotes for url in remote_spec(remote, configured).urls]
    except CnpsfsError:
        return True
    return any(not url.startswith("file://") for url in urls)


def missing_capabilities(config: ServiceConfig, status: str | None = None) -> list[str]:
    """The capabilities a writable mount needs that this process's bounding set lacks.

    A mount file made writable without ``systemctl daemon-reload`` still runs under the
    read-only sandbox, and overlayfs would then fail with a misleading "cannot mount
    read-only". *status* is the text of /proc/self/status (read when None).
    """
    if config.writable is None:
        return []
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return []
    match = re.search(r"^CapBnd:\s*([0-9a-f]+)$", status, flags=re.M)
    if match is None:
        return []
    bounding = int(match.group(1), 16)
    return [name for name, bit in WRITABLE_CAPABILITIES.items() if not bounding >> bit & 1]
