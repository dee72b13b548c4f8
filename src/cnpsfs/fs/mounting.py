"""Mounting an image: what ``cnpsfs mount``, ``cnpsfs service run`` and ``cnpsfs bundle`` call.

Everything that can be checked is checked in the calling process, before anything is
mounted or forked: the mountpoint, the reference (or manifest file), a manifest's union
composition, a writable mount's upper directory, and the image's root directories (the
first generation is composed here). Then either the daemon is forked and this returns
once the mount answers (:func:`mount_image`), or this process serves the mount until it
is unmounted (:func:`serve_image`, for systemd and ``--foreground``).

Every mount leaves a :class:`~cnpsfs.fs.daemon.MountRecord` while it is served and
registers its image's FileSets as gc roots of the store, so a running mount never loses
its objects to ``cnpsfs gc``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cnpsfs import format as fmt
from cnpsfs.fs.daemon import MountRecord
from cnpsfs.fs.options import MountOptions
from cnpsfs.store import HostedStore, Store

if TYPE_CHECKING:  # loaded by whoever made the checker: a mount without a policy never imports it
    from cnpsfs.trust import Checker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Mounted:
    """A mount that answers: its image's NAME@VERSION and the daemon's record."""

    label: str
    record: MountRecord


def mount_image(store: HostedStore, ref: str, mountpoint: str, options: MountOptions | None = None, *,
                trust: Checker | None = None, allow_downgrade: bool = False) -> Mounted:
    """Mount image *ref* (a reference or a manifest file) at *mountpoint* in a daemon.

    Returns once the mount answers; any failure before that (here or in the daemon) is a
    :class:`~cnpsfs.errors.CnpsfsError` and leaves nothing mounted. *store* is closed
    before the fork (SQLite connections and pack descriptors must not cross it). With
    *trust*, the image must pass the trust policy first (a refusal is a TrustError), and
    the daemon asks it again before every swap.
    """
    from cnpsfs.fs.daemon import READY, install_faulthandler, redirect_output, spawn_daemon

    mount = _Mount(store, ref, mountpoint, options or MountOptions(), trust, allow_downgrade)
    store.close()

    def child(ready_fd: int) -> None:
        from cnpsfs.fs.notify import Notifier

        mount.service.notifier = Notifier(None)  # a forked daemon is not the process systemd started
        redirect_output(mount.record.log_file)
        install_faulthandler()

        def ready() -> None:
            mount.log_ready()
            os.write(ready_fd, READY)
            os.close(ready_fd)

        mount.serve(ready)

    try:
        pid = spawn_daemon(child, timeout=mount.options.ready_timeout)
    except BaseException:
        mount.unlock()  # the daemon is gone (spawn_daemon reaped it): nothing holds the mountpoint
        raise
    os.close(mount.lock)  # the daemon holds its own copy of the mountpoint lock
    mount.record.pid = pid
    return Mounted(mount.label, mount.record)


def serve_image(store: HostedStore, ref: str, mountpoint: str, options: MountOptions | None = None,
                on_ready: Callable[[], None] | None = None, *, trust: Checker | None = None,
                allow_downgrade: bool = False) -> None:
    """Mount image *ref* at *mountpoint* and serve it in this process until it is unmounted.

    *on_ready* runs once the mount answers (default: the one INFO line that says so); when
    systemd started this process, the mount service also tells it READY=1. *trust* as for
    :func:`mount_image`.
    """
    mount = _Mount(store, ref, mountpoint, options or MountOptions(), trust, allow_downgrade)
    try:
        mount.serve(on_ready or mount.log_ready)  # lets go of the mountpoint lock once unmounted
    finally:
        if mount.lock >= 0:  # still mounted, or serve failed before serving: the lock ends with us
            os.close(mount.lock)
            mount.lock = -1


class _Mount:
    """One mount, checked and composed, not yet served."""

    def __init__(self, store: HostedStore, ref: str, mountpoint: str, options: MountOptions, trust: Checker | None,
                 allow_downgrade: bool) -> None:
        from cnpsfs.fs.daemon import lock_mountpoint

        # Held until this process, or the daemon it forks, exits: one mount per directory.
        self.mountpoint = mountpoint
        self.lock = lock_mountpoint(mountpoint)
        try:
            self._prepare(store, ref, mountpoint, options, trust, allow_downgrade)
        except BaseException:
            self.unlock()
            raise

    def unlock(self) -> None:
        """Let go of the mountpoint lock and remove its file (once; nothing else holds it)."""
        from cnpsfs.fs.daemon import unlock_mountpoint

        if self.lock >= 0:
            fd, self.lock = self.lock, -1
            unlock_mountpoint(fd, self.mountpoint)

    def _prepare(self, store: HostedStore, ref: str, mountpoint: str, options: MountOptions, trust: Checker | None,
                 allow_downgrade: bool) -> None:
        from cnpsfs.fs.control import control_path_for
        from cnpsfs.fs.daemon import check_mountpoint, mount_key, runtime_dir
        from cnpsfs.fs.mount import MountService
        from cnpsfs.image.manifest import compose, load_image, root_digests

        self.options = options
        self.store = store
        self.real = real = check_mountpoint(mountpoint)
        image, digest = load_image(store, ref)
        if digest is None and any(i.mode is fmt.CompositionMode.UNION for i in (image, *image.unstored.values())):
            compose(store, image).check()  # stored images were checked when created
        decision = trust.check(store, image, digest, allow_downgrade=allow_downgrade) if trust is not None else None
        if options.prefetch and options.profile is not None:
            _check_profile(store, image, digest, options.profile)
        key = mount_key(real)
        rt = runtime_dir()
        control = control_path_for(rt, key)
        self.label = f"{image.name}@{image.version}"
        self.fuse_at = real
        self.upperdir = os.path.abspath(options.writable) if options.writable is not None else None
        if self.upperdir is not None:
            from cnpsfs.fs.overlay import prepare_upperdir

            prepare_upperdir(self.upperdir, self.label, fmt.format_digest(digest) if digest else None)
            self.fuse_at = str(rt / f"{key}.lower")
            os.makedirs(self.fuse_at, exist_ok=True)
            check_mountpoint(self.fuse_at)
        self.service = MountService(store, image, digest, self.fuse_at, options, control, ref, trust=trust,
                                    decision=decision)
        self.generation = self.service.build()
        self.roots = sorted(root_digests(image, digest))
        self.record = MountRecord(real, os.getpid(), str(store.path), ref, str(rt / f"{key}.log"), control,
                                  self.fuse_at if self.upperdir else "", self.upperdir or "")

    def log_ready(self) -> None:
        """The one line that says the mount answers, with what systemd's STATUS= says."""
        log.info("mounted at %s: %s", self.real, self.service.status_line())

    def serve(self, ready: Callable[[], None]) -> None:
        """Mount, call *ready* once the mount answers, serve until unmounted, then clean up."""
        from cnpsfs.fs.daemon import mounted_fstype, runtime_dir
        from cnpsfs.store.maintenance import register_roots, unregister_roots

        upperdir = self.upperdir
        self.record.pid = os.getpid()
        self.record.save()
        runtime = runtime_dir()
        register_roots(self.store, self.roots, runtime=runtime)

        def on_ready() -> None:
            if upperdir is not None:
                from cnpsfs.fs.overlay import mount_overlay

                mount_overlay(self.fuse_at, upperdir, self.real)
            ready()

        try:
            self.service.run(self.generation, on_ready)
        finally:
            if upperdir is not None and mounted_fstype(self.real) == "overlay":
                from cnpsfs.fs.overlay import unmount_overlay

                unmount_overlay(self.real, lazy=True)
            self.record.remove()
            unregister_roots(self.store, runtime=runtime)
            self.store.close()  # a remote-backed store commits the blocks it fetched last
            if mounted_fstype(self.real) is None:
                self.unlock()  # else (a mount left attached) the lock goes with the process


def _check_profile(store: Store, image: fmt.Image, digest: bytes | None, name: str) -> None:
    """A profile asked for by name (--profile) must exist: a typo should not pass as "no prefetch"."""
    from cnpsfs.errors import NotFoundError, UsageError
    from cnpsfs.image.profiles import image_profiles, profile_subject

    label = f"{image.name}@{image.version}"
    subject = profile_subject(image, digest)
    if subject is None:
        raise UsageError(f"--profile needs a stored image: {label} comes from a manifest file and has no profiles")
    names = sorted({s.name for s in image_profiles(store, subject) if s.name is not None})
    if name not in names:
        raise NotFoundError(f"image {label} has no profile named {name!r}"
                            + (f" (it has {', '.join(names)})" if names else " (it has none: record one with "
                               "`cnpsfs profile record`)"))
