"""OCI runtime bundles: an image's run config as ``config.json`` over a mounted rootfs.

``cnpsfs bundle REF DIR`` mounts the image at ``DIR/rootfs`` and writes ``DIR/config.json``
for runc or crun (runtime-spec 1.0). This module is the pure part: from an image and a
way to read files of its composed tree to the config, testable without a mount.

Defaults, and why (they follow ``runc spec``, the runtime's own notion of a safe start):

- namespaces: pid, ipc, uts, mount and network. A new network namespace holds only a
  loopback interface, so a bundle never reaches the network unless its user edits the
  config (or hands the container to a tool that wires one up): the safe default.
  No user namespace (``runc spec --rootless`` territory) and no cgroup namespace
  (not in runc's default either; cgroup v1 hosts handle it poorly).
- mounts: /proc, a tmpfs /dev with devpts, shm and mqueue, read-only /sys and cgroups.
- capabilities: CAP_AUDIT_WRITE, CAP_KILL and CAP_NET_BIND_SERVICE in the bounding,
  permitted and effective sets, as ``runc spec``, but none ambient, so a non-root
  process does not receive them on exec. ``noNewPrivileges`` on.
- ``root.readonly`` unless the rootfs is a writable (overlayfs) mount: a read-only
  cnpsfs mount refuses writes anyway, and saying so lets the runtime fail early.
- user: the image's ``user`` as ``uid[:gid]`` or names, resolved through the image's own
  /etc/passwd and /etc/group (a name that is not there is an error, as in Docker);
  supplementary groups from /etc/group; HOME from /etc/passwd when the env lacks it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, NotFoundError

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_CAPABILITIES = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
NAMESPACES = ["pid", "network", "ipc", "uts", "mount"]
MASKED_PATHS = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

#: Annotations that mark a directory as a cnpsfs bundle (``bundle --remove`` checks them).
ANNOTATION_IMAGE = "cnpsfs.bundle.image"
ANNOTATION_DIGEST = "cnpsfs.bundle.digest"
ANNOTATION_WRITABLE = "cnpsfs.bundle.writable"
STOP_SIGNAL_ANNOTATION = "org.opencontainers.image.stopSignal"

ReadFile = Callable[[str], bytes | None]


class BundleError(CnpsfsError):
    pass


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)
    name: str | None = None
    home: str | None = None


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def parse_passwd(text: str) -> list[PasswdEntry]:
    out = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or line.startswith("#"):
            continue
        try:
            out.append(PasswdEntry(fields[0], int(fields[2]), int(fields[3]), fields[5]))
        except ValueError:
            continue  # a malformed line is skipped, as getpwnam(3) does
    return out


def parse_group(text: str) -> list[GroupEntry]:
    out = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or line.startswith("#"):
            continue
        try:
            out.append(GroupEntry(fields[0], int(fields[2]), tuple(m for m in fields[3].split(",") if m)))
        except ValueError:
            continue
    return out


def _text(read_file: ReadFile, path: str) -> str:
    data = read_file(path)
    return data.decode("utf-8", "replace") if data is not None else ""


def resolve_user(spec: str, read_file: ReadFile) -> User:
    """``user`` of an image config (``""``, ``uid``, ``name``, ``uid:gid``, ``name:group``) as ids.

    A numeric uid need not exist in /etc/passwd (its gid is then 0 unless given); a name
    must, since only the image can say what it means.
    """
    user_part, _, group_part = (spec or "0").partition(":")
    if not user_part:
        raise BundleError(f"image config user {spec!r} has no user part")
    passwd = parse_passwd(_text(read_file, "/etc/passwd"))
    if user_part.isdigit():
        uid = int(user_part)
        entry = next((e for e in passwd if e.uid == uid), None)
    else:
        entry = next((e for e in passwd if e.name == user_part), None)
        if entry is None:
            raise BundleError(f"image config user {user_part!r} is not in the image's /etc/passwd")
        uid = entry.uid
    groups = parse_group(_text(read_file, "/etc/group")) if group_part or entry else []
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            group = next((g for g in groups if g.name == group_part), None)
            if group is None:
                raise BundleError(f"image config group {group_part!r} is not in the image's /etc/group")
            gid = group.gid
    else:
        gid = entry.gid if entry else 0
    extra: list[int] = []
    if entry is not None and not group_part:
        extra = sorted({g.gid for g in groups if entry.name in g.members} - {gid})
    return User(uid, gid, extra, entry.name if entry else None, entry.home if entry else None)


def hostname_for(name: str) -> str:
    """A valid hostname (RFC 1123 label) from a bundle or image name."""
    label = re.sub(r"[^A-Za-z0-9-]+", "-", name.rsplit("/", 1)[-1]).strip("-")[:63].strip("-")
    return label or "cnpsfs"


def process_env(config: Mapping[str, Any], user: User) -> list[str]:
    env = list(config.get("env", []))
    names = {item.split("=", 1)[0] for item in env}
    if "PATH" not in names:
        env.insert(0, DEFAULT_PATH)
    if "HOME" not in names:
        env.append(f"HOME={user.home or '/'}")
    return env


def runtime_config(image: fmt.Image, user: User, *, readonly: bool, hostname: str,
                   annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The OCI runtime config (config.json) for *image* running as *user*."""
    config = image.config
    args = [*config.get("entrypoint", []), *config.get("cmd", [])]
    if not args:
        raise BundleError(f"{image.name}@{image.version} has no entrypoint or cmd: nothing to run "
                          "(set config.cmd in its manifest)")
    process_user: dict[str, Any] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        process_user["additionalGids"] = list(user.additional_gids)
    notes = dict(sorted(config.get("labels", {}).items()))  # image labels become annotations
    if config.get("stop_signal"):
        notes[STOP_SIGNAL_ANNOTATION] = config["stop_signal"]
    notes.update(annotations or {})
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": process_user,
            "args": args,
            "env": process_env(config, user),
            "cwd": config.get("workdir") or "/",
            "capabilities": {key: list(DEFAULT_CAPABILITIES) for key in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": readonly},
        "hostname": hostname,
        "mounts": default_mounts(),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": ns} for ns in NAMESPACES],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
        "annotations": notes,
    }


def default_mounts() -> list[dict[str, Any]]:
    def mount(destination: str, kind: str, source: str, options: Sequence[str] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {"destination": destination, "type": kind, "source": source}
        if options:
            out["options"] = list(options)
        return out

    return [
        mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        mount("/dev/pts", "devpts", "devpts", ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                                               "gid=5"]),
        mount("/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
        mount("/sys/fs/cgroup", "cgroup", "cgroup", ["nosuid", "noexec", "nodev", "relatime", "ro"]),
    ]


# --------------------------------------------------------------------------- reading the composed image


def generation_reader(generation: Any, store: Any) -> ReadFile:
    """Read a regular file of a composed image (following symlinks), None if absent."""
    from cnpsfs.image.reader import FileReader

    reader = FileReader(store)

    def read(path: str) -> bytes | None:
        for _hop in range(16):
            try:
                node = generation.resolve(path)
            except NotFoundError:
                return None
            entry = node.entry
            if entry.kind is fmt.Kind.SYMLINK:
                target = entry.target.decode("utf-8", "surrogateescape")
                path = target if target.startswith("/") else path.rsplit("/", 1)[0] + "/" + target
                continue
            if entry.kind is not fmt.Kind.FILE:
                return None
            return reader.read(entry)
        return None

    return read


def build_config(store: Any, image: fmt.Image, digest: bytes | None, *, hostname: str, writable: str | None,
                 ) -> tuple[dict[str, Any], User]:
    """config.json for *image*, its user resolved through the image's own files."""
    from cnpsfs.image.manifest import compose

    generation = compose(store, image)
    user = resolve_user(image.config.get("user", ""), generation_reader(generation, store))
    annotations = {ANNOTATION_IMAGE: f"{image.name}@{image.version}",
                   ANNOTATION_DIGEST: fmt.format_digest(digest) if digest else "",
                   ANNOTATION_WRITABLE: writable or ""}
    return runtime_config(image, user, readonly=writable is None, hostname=hostname, annotations=annotations), user


def is_cnpsfs_bundle(config: Any) -> bool:
    return isinstance(config, dict) and ANNOTATION_IMAGE in (config.get("annotations") or {})
