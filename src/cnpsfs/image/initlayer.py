"""The init layer: what a container runtime mounts over or binds onto, where an image lacks it.

A runtime starting a container on a read-only root filesystem mounts /proc, /sys and a
tmpfs /dev, and bind-mounts its own /etc/hostname, /etc/hosts and /etc/resolv.conf (and
whatever config.json names) onto the rootfs. Each mount needs its destination to exist:
on a writable rootfs runc creates what is missing, on a read-only one it cannot, so a
``FROM scratch`` image (no /proc, no /etc) fails to start. Docker solves this with an
*init layer* between the image and the container's layer; this is the same idea.

The init layer here is a FileSet that is never stored: it is built in memory at mount
time against the composed image, holds only what the image lacks (empty directories for
mount destinations, empty files as bind targets, ``/etc/mtab`` -> ``/proc/mounts``), and
is composed on top. Because it only adds names, nothing of the image is hidden or
replaced, and it is *weak*: a directory it adds a name to keeps the image's metadata.
The image object, its digest and a plain mount are unchanged (docs/manifest.md).

Not created: anything below a path that exists in the image as something other than a
directory (a symlinked ``/var/run``, say): the runtime follows the symlink, and the
layer does not guess where to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cnpsfs import format as fmt
from cnpsfs.errors import UsageError
from cnpsfs.image.view import Generation, LayerInfo, Node

log = logging.getLogger(__name__)

#: Mount points of the kernel filesystems every runtime mounts (runc's default spec,
#: podman, Docker's init layer).
RUNTIME_DIRS = ("/proc", "/sys", "/dev")
#: Where ``podman run --read-only`` mounts a tmpfs (its --read-only-tmpfs, on by default):
#: ``cnpsfs mount --init-layer`` provides them too, having no config.json to read.
CONTAINER_TMPFS = ("/run", "/tmp", "/var/tmp")
#: podman binds its own file onto this one (its marker, as Docker's init layer holds
#: /.dockerenv): ``cnpsfs mount --init-layer`` provides it, ``cnpsfs bundle`` does not.
CONTAINER_FILES = ("/run/.containerenv",)
#: Files runtimes bind-mount their own versions onto.
BIND_FILES = ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf")
#: Symlinks: programs read the mount table from /etc/mtab.
SYMLINKS = (("/etc/mtab", "/proc/mounts"),)

INIT_NAME = "cnpsfs/init-layer"
INIT_VERSION = "1"


@dataclass(slots=True)
class _Wanted:
    kind: fmt.Kind
    children: dict[bytes, _Wanted] = field(default_factory=dict)
    target: bytes = b""
    created: bool = True  # False: a directory the image has, passed through on the way

    def prune(self) -> bool:
        """Drop passed-through directories that end up adding nothing; True if anything is left."""
        self.children = {name: child for name, child in self.children.items() if child.prune()}
        return self.created or bool(self.children)


def check_destination(path: str) -> str:
    """A mount destination in its normal form, or a UsageError naming it."""
    try:
        return fmt.normalize_at(path)
    except fmt.FormatError as exc:
        raise UsageError(f"init layer: mount destination {path!r}: {exc}") from None


def wanted_paths(destinations: Iterable[str], files: Iterable[str] = ()) -> list[tuple[str, fmt.Kind, bytes]]:
    """Everything an init layer provides for *destinations* (directories) and *files*
    beyond the defaults: (path, kind, symlink target)."""
    out: list[tuple[str, fmt.Kind, bytes]] = [(p, fmt.Kind.DIR, b"") for p in RUNTIME_DIRS]
    out += [(check_destination(p), fmt.Kind.DIR, b"") for p in destinations]
    out += [(p, fmt.Kind.FILE, b"") for p in BIND_FILES]
    out += [(check_destination(p), fmt.Kind.FILE, b"") for p in files]
    out += [(p, fmt.Kind.SYMLINK, target.encode()) for p, target in SYMLINKS]
    return out


def init_layer(image: Generation, destinations: Iterable[str], files: Iterable[str] = ()) -> LayerInfo | None:
    """The init layer for the composed *image* (None when the image lacks nothing).

    *destinations* are the mount destinations beyond the defaults (a config.json's, or
    ``--init-dir``), *files* bind targets beyond the defaults. A destination the image has
    as a file stays a file, and the reverse: only the image knows what it means there.
    """
    root = _Wanted(fmt.Kind.DIR, created=False)
    for path, kind, target in wanted_paths(destinations, files):
        parts = tuple(p.encode("utf-8") for p in path.split("/") if p)
        if not parts:
            continue
        _add_missing(image, root, parts, kind, target)
    if not root.prune():
        return None
    directories: dict[bytes, fmt.Directory] = {}
    root_entry = fmt.Entry(b"", fmt.Kind.DIR, 0o755, tree=_encode(root, directories))
    digest = fmt.digest_bytes(fmt.encode_fileset(fmt.FileSet(INIT_NAME, INIT_VERSION, root_entry)))
    layer = LayerInfo(len(image.image.layers), digest, "init layer", root_entry, (), True, order=len(image.layers),
                      label="init layer", weak=True, directories=directories)
    log.debug("init layer %s for %s", fmt.format_digest(digest), image.label or image.image.name)
    return layer


def _add_missing(image: Generation, root: _Wanted, parts: tuple[bytes, ...], kind: fmt.Kind, target: bytes) -> None:
    node: Node | None = image.root
    wanted = root
    for depth, name in enumerate(parts):
        last = depth == len(parts) - 1
        if node is not None:
            child = image.lookup(node, name)
            if child is not None:
                if last or not child.is_dir:
                    return  # there already, or below something that is not a directory
                node = child
                wanted = wanted.children.setdefault(name, _Wanted(fmt.Kind.DIR, created=False))
                continue
            node = None
        if last:
            wanted.children.setdefault(name, _Wanted(kind, target=target))
        else:
            wanted = wanted.children.setdefault(name, _Wanted(fmt.Kind.DIR))
            if wanted.kind is not fmt.Kind.DIR:
                return  # a destination below a bind file of ours: keep the file


def _encode(wanted: _Wanted, directories: dict[bytes, fmt.Directory]) -> bytes:
    entries = []
    for name in sorted(wanted.children):
        child = wanted.children[name]
        if child.kind is fmt.Kind.DIR:
            entries.append(fmt.Entry(name, fmt.Kind.DIR, 0o755, tree=_encode(child, directories)))
        elif child.kind is fmt.Kind.SYMLINK:
            entries.append(fmt.Entry(name, fmt.Kind.SYMLINK, 0o777, target=child.target))
        else:
            entries.append(fmt.Entry(name, fmt.Kind.FILE, 0o644))
    directory = fmt.Directory(entries)
    digest = fmt.digest_bytes(fmt.encode_directory(directory))
    directories[digest] = directory
    return digest


def find_init_layer(generation: Generation) -> LayerInfo | None:
    return next((layer for layer in generation.layers if layer.weak), None)


def added_paths(generation: Generation) -> list[str]:
    """The paths *generation*'s init layer adds, in canonical order: where the composed
    tree's entry comes from the init layer alone (not directories it only passes through)."""
    layer = find_init_layer(generation)
    if layer is None:
        return []
    directories: Mapping[bytes, fmt.Directory] = layer.directories or {}
    out: list[str] = []

    def visit(tree: bytes | None, node: Node) -> None:
        if tree is None:
            return
        for entry in directories[tree].entries:
            child = generation.lookup(node, entry.name)
            if child is None:
                continue
            mine = (all(s.layer is layer for s in child.sources if not s.is_synthetic) if child.is_dir
                    else child.layer is layer)
            if mine:
                out.append("/" + "/".join(p.decode("utf-8", "surrogateescape") for p in child.path))
            if entry.kind is fmt.Kind.DIR and child.is_dir:
                visit(entry.tree, child)

    visit(layer.root.tree, generation.root)
    return out
