"""The mount service: one FUSE session, its generations, and its control socket.

The control socket (``<runtime dir>/<key>.sock``, mode 0600, owned by the daemon's
user) speaks one JSON object per line each way. ``cnpsfs status`` uses it today; live
upgrades use it too. Requests are served on the trio loop, between FUSE requests, so a
generation swap is a single assignment that no FUSE handler can observe half-done.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.fs.daemon import mounted_device
from cnpsfs.fs.fetcher import worker_threads
from cnpsfs.fs.notify import Notifier
from cnpsfs.fs.operations import Operations
from cnpsfs.fs.options import MountOptions
from cnpsfs.fs.prefetch import Prefetcher
from cnpsfs.fs.recorder import ProfileRecorder
from cnpsfs.image.initlayer import added_paths, find_init_layer
from cnpsfs.image.manifest import compose, describe_layers, load_image, looks_like_file, root_digests
from cnpsfs.image.swap import SwapPlan, prepare
from cnpsfs.image.view import Generation
from cnpsfs.store import HostedStore, LocalStore

if TYPE_CHECKING:  # loaded by whoever made the checker: a mount without a policy never imports it
    from cnpsfs.trust import Checker, Decision

log = logging.getLogger(__name__)

#: Swaps remembered for `cnpsfs status`.
HISTORY_MAX = 64
#: The longest a profile recording may run: one whose client went away ends by itself.
RECORD_MAX_SECONDS = 3600.0
#: How long an unmount waits for the replay's lookups through the mount to return.
QUIESCE_SECONDS = 5.0


@dataclass(slots=True)
class HistoryItem:
    generation: int
    image: str
    digest: str | None
    time: float
    reason: str


@dataclass
class MountService:
    store: HostedStore
    image: fmt.Image
    image_digest: bytes | None
    mountpoint: str
    options: MountOptions
    control_path: str
    ref: str = ""
    # The last HISTORY_MAX swaps (the generation number counts them all).
    history: collections.deque[HistoryItem] = field(default_factory=lambda: collections.deque(maxlen=HISTORY_MAX))
    # What `rollback` returns to: the image served before the last swap. With the current
    # image it is all a mount pins (gc roots); earlier images are let go of.
    rollback_image: tuple[fmt.Image, bytes | None] | None = None
    ops: Operations | None = None
    started: float = field(default_factory=time.time)
    notifier: Notifier = field(default_factory=Notifier.from_environment)  # systemd, when it started us
    # The current generation's init layer for `status` (computed off the loop: it looks paths up).
    init_status: dict[str, Any] | None = None
    ready: bool = False
    device: int | None = None  # st_dev of our mount, once it answered
    #: Trust decisions for every swap (mounting decided on the first image before anything was mounted).
    trust: Checker | None = None
    decision: Decision | None = None  # the trust decision on the image served now
    # The replay of the current image's profile (fs/prefetch.py), or why there is none.
    prefetcher: Prefetcher | None = None
    prefetch_runs: collections.deque[Prefetcher] = field(default_factory=lambda: collections.deque(maxlen=8))
    prefetch_note: str = "not started"
    _prefetch_scope: trio.CancelScope | None = None
    _prefetch_done: trio.Event | None = None  # set when the replay started last ends
    _serving: trio.Event = field(default_factory=trio.Event)  # the mount answers: pushes may go through it
    # A profile being recorded (`cnpsfs profile record`), and the task that ends it on time.
    recording: ProfileRecorder | None = None
    _recording_scope: trio.CancelScope | None = None
    _nursery: trio.Nursery | None = None
    quiesced: bool = False  # an unmount is coming: no more replays

    def fuse_options(self) -> set[str]:
        opts = {"fsname=cnpsfs", "subtype=cnpsfs", "ro", "default_permissions", "noatime"}
        if os.geteuid() == 0:
            # A root filesystem needs its setuid programs and device nodes to work;
            # libfuse would otherwise add nosuid,nodev.
            opts |= {"suid", "dev"}
        if self.options.allow_other:
            opts.add("allow_other")
        return opts

    def build(self) -> Generation:
        label = f"{self.image.name}@{self.image.version}"
        generation = compose(self.store, self.image, number=1, label=label, digest=self.image_digest,
                             init=self.options.init_layer, init_files=self.options.init_files)
        self.history.append(HistoryItem(1, label, fmt.format_digest(self.image_digest) if self.image_digest else None,
                                        time.time(), "mount"))
        self.init_status = describe_init_layer(generation)
        return generation

    def run(self, generation: Generation, on_ready: Callable[[], None]) -> None:
        """Mount, serve until unmounted or signalled, then unmount (blocking)."""
        _tune_gc()
        if isinstance(self.store, LocalStore):
            # Objects a block already read holds need no index query (the daemon's roots
            # keep them from gc; every read is verified).
            self.store.serve_remembered = True
        ops = self.ops = Operations(generation, use_extensions=self.options.use_extensions,
                                    cache_bytes=self.options.cache_bytes,
                                    threads=worker_threads(self.store, self.options.threads))
        output = _StderrTail()
        try:
            pyfuse3.init(ops, self.mountpoint, self.fuse_options())
        except RuntimeError as exc:
            from cnpsfs.fs.daemon import mount_failure_cause

            cause = mount_failure_cause(allow_other=self.options.allow_other, fuse_output=output.read())
            raise CnpsfsError(f"cannot mount at {self.mountpoint}: {cause or exc}") from None
        try:
            trio.run(self._main, on_ready)
        except BaseExceptionGroup as group:
            # A failure in the nursery (e.g. the overlay of a writable mount refused in
            # on_ready) arrives wrapped: our own error is the one line the user should see.
            sub = group.subgroup(CnpsfsError)
            if sub is None:
                raise
            ours: BaseException = sub
            while isinstance(ours, BaseExceptionGroup):
                ours = ours.exceptions[0]
            raise ours from None
        finally:
            self.notifier.stopping()
            # Unmount: trio.run also returns normally after SIGTERM/SIGINT
            # (pyfuse3.terminate), and the mount is still there then. When the kernel
            # ended the session itself (umount), libfuse sees POLLERR on the device and
            # does nothing. But after a lazy detach (a busy `service stop`) the path no
            # longer holds our mount, and libfuse's umount2(path) would fail, or detach
            # whatever was mounted there since: closing the device ends our session anyway.
            attached = self.device is None or mounted_device(self.mountpoint, self.device)
            if not attached:
                log.debug("%s was detached while in use: not unmounting", self.mountpoint)
            pyfuse3.close(unmount=attached)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.control_path)

    async def _main(self, on_ready: Callable[[], None]) -> None:
        assert self.ops is not None
        async with trio.open_nursery() as nursery:
            self.ops.readahead_nursery = nursery
            self._nursery = nursery
            nursery.start_soon(self._signals, nursery)
            await nursery.start(self._control_server)

            async def serve() -> None:
                await pyfuse3.main(min_tasks=4, max_tasks=64)
                nursery.cancel_scope.cancel()  # the kernel ended the session (unmounted)

            nursery.start_soon(serve)
            # The replay's store work (the profile, its directories, its blocks) needs no
            # kernel: it starts now, while the mount is proven; its pushes wait for that.
            self._start_prefetch()
            # Prove the mount answers before telling anyone it is ready.
            st = await trio.to_thread.run_sync(os.stat, self.mountpoint)
            self.device = st.st_dev
            await trio.to_thread.run_sync(_raise_readahead, st.st_dev)
            self._serving.set()
            await self._wait_for_prefetch()
            # On a thread: a writable mount's overlayfs looks up our root while mounting.
            await trio.to_thread.run_sync(on_ready)
            self.ready = True
            self.notifier.ready(self.status_line())
            if self.notifier.watchdog_interval is not None:
                nursery.start_soon(self._watchdog, self.notifier.watchdog_interval)

    def status_line(self) -> str:
        """One line for `systemctl status` (sd_notify STATUS=)."""
        assert self.ops is not None
        gen = self.ops.generation
        return f"serving {gen.image.name}@{gen.image.version} generation {gen.number} ({self.ops.mode})"

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog only while the mount is really served.

        The probe is a statfs of the mountpoint, on a thread and abandoned if it hangs: the
        kernel never answers statfs from its caches, so a reply proves the whole path
        (kernel, /dev/fuse, the trio loop that runs every FUSE handler, our statfs handler).
        A missed ping is left for systemd to act on.
        """
        while True:
            healthy = False
            with trio.move_on_after(interval):
                try:
                    await trio.to_thread.run_sync(os.statvfs, self.mountpoint, abandon_on_cancel=True)
                    healthy = True
                except OSError as exc:
                    log.error("watchdog: %s does not answer: %s", self.mountpoint, exc)
            if healthy:
                self.notifier.watchdog()
            else:
                log.error("watchdog: %s did not answer within %.1f s: no ping", self.mountpoint, interval)
            await trio.sleep(interval)

    async def _signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.notifier.reloading()
                    status = None
                    try:
                        result = await self.dispatch({"op": "reload"})
                        log.info("SIGHUP: reloaded %s: generation %d", self.ref, result["generation"])
                    except CnpsfsError as exc:
                        log.error("SIGHUP: reload failed, generation unchanged: %s", exc)
                        status = f"reload failed: {exc}"
                    if self.ready:
                        self.notifier.ready(status or self.status_line())
                    continue
                log.info("signal %d: unmounting", signum)
                pyfuse3.terminate()
                return

    # ------------------------------------------------------------------ control socket

    async def _control_server(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(self.control_path)
        finally:
            os.umask(old_umask)
        os.chmod(self.control_path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._handle_control, [listener])

    async def _handle_control(self, stream: trio.SocketStream) -> None:
        async with stream:
            buffer = b""
            while b"\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                if len(buffer) > 1 << 20:
                    return
            try:
                request = json.loads(buffer.split(b"\n", 1)[0])
                response = await self.dispatch(request)
            except CnpsfsError as exc:
                response = {"ok": False, "error": str(exc)}
            except (ValueError, KeyError, TypeError) as exc:
                response = {"ok": False, "error": f"bad request: {exc}"}
            await stream.send_all(json.dumps(response).encode() + b"\n")

    async def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            return {"ok": True, **self.status()}
        downgrade = bool(request.get("allow_downgrade", False))
        if op == "upgrade":
            image, digest = await trio.to_thread.run_sync(load_image, self.store, str(request["ref"]))
            return {"ok": True, **await self.swap_to(image, digest, f"upgrade to {request['ref']}",
                                                     allow_downgrade=downgrade)}
        if op == "reload":
            if not looks_like_file(self.ref):
                raise CnpsfsError("this mount was not started from a manifest file: nothing to re-read")
            image, digest = await trio.to_thread.run_sync(load_image, self.store, self.ref)
            return {"ok": True, **await self.swap_to(image, digest, f"reload of {self.ref}")}
        if op in ("link", "unlink"):
            image = self._with_layer_flag(str(request["layer"]), unlinked=op == "unlink")
            return {"ok": True, **await self.swap_to(image, None, f"{op} {request['layer']}")}
        if op == "quiesce":
            return {"ok": True, **await self._quiesce()}
        if op == "record-start":
            return {"ok": True, **await self._record_start(float(request.get("max_seconds", RECORD_MAX_SECONDS)))}
        if op == "record-status":
            if self.recording is None:
                raise CnpsfsError("no profile is being recorded on this mount")
            return {"ok": True, **self.recording.summary()}
        if op == "record-stop":
            return {"ok": True, **await self._record_stop(str(request.get("name", fmt.DEFAULT_PROFILE)),
                                                          dict(request.get("metadata") or {}))}
        if op == "rollback":
            if self.rollback_image is None:
                raise CnpsfsError("no previous generation to roll back to")
            image, digest = self.rollback_image
            # The image left becomes the rollback target: a second rollback undoes the first.
            return {"ok": True, **await self.swap_to(image, digest, "rollback", allow_downgrade=downgrade)}
        raise CnpsfsError(f"unknown control request {op!r}")

    def _with_layer_flag(self, which: str, *, unlinked: bool) -> fmt.Image:
        image = self.image
        index = self._layer_index(image, which)
        layers = list(image.layers)
        layers[index] = dataclasses.replace(layers[index], unlinked=unlinked)
        return dataclasses.replace(image, layers=layers)

    def _layer_index(self, image: fmt.Image, which: str) -> int:
        if which.isdigit():
            index = int(which) - 1
            if not 0 <= index < len(image.layers):
                raise CnpsfsError(f"unknown layer {which}: the image has {len(image.layers)} layers")
            return index
        try:
            digest = self.store.resolve(which)
        except CnpsfsError:
            digest = None
        matches = [i for i, layer in enumerate(image.layers) if layer.digest == digest or layer.label == which]
        if not matches:
            raise CnpsfsError(f"unknown layer {which!r}: no layer of the mounted image is that FileSet, image "
                              "or label")
        if len(matches) > 1:
            raise CnpsfsError(f"layer {which!r} is ambiguous: it is layers {', '.join(str(i + 1) for i in matches)}")
        return matches[0]

    async def swap_to(self, image: fmt.Image, digest: bytes | None, reason: str, *,
                      allow_downgrade: bool = False) -> dict[str, Any]:
        """Compose *image* beside the current generation and switch to it atomically.

        The trust policy decides first (re-read now): a refusal (TrustError) leaves the
        mount serving what it served, like any other failure before the switch.
        """
        assert self.ops is not None
        started = time.monotonic()
        label = f"{image.name}@{image.version}"
        decision = None
        if self.trust is not None:
            checker = self.trust
            decision = await trio.to_thread.run_sync(
                lambda: checker.check(self.store, image, digest, allow_downgrade=allow_downgrade))

        # What the kernel holds, for the inode table's sweep: copied here, on the loop (the
        # worker must not iterate it), and only when a sweep is due (a copy is O(held)).
        held = list(self.ops.lookups) if self.ops.generation.inodes.sweep_due() else None

        def build(old: Generation) -> tuple[Generation, SwapPlan]:
            new = compose(self.store, image, old.inodes, number=old.number + 1, label=label, previous=old,
                          digest=digest, init=self.options.init_layer, init_files=self.options.init_files)
            plan = prepare(old, new, held=held)
            init_status.append(describe_init_layer(new))
            return new, plan

        init_status: list[dict[str, Any] | None] = []
        generation, plan = await self.ops.swap(build)
        self.init_status = init_status[-1]
        seconds = time.monotonic() - started
        self.rollback_image = (self.image, self.image_digest)
        self.image, self.image_digest = image, digest
        if self.recording is not None and self.recording.aborted is None:
            self.recording.aborted = f"the mount swapped to generation {generation.number} during the recording"
            self._stop_recording_events()
        self._start_prefetch()
        if decision is not None:
            self.decision = decision
        self.history.append(HistoryItem(generation.number, label, fmt.format_digest(digest) if digest else None,
                                        time.time(), reason))
        self._register_roots()
        self.notifier.status(self.status_line())
        log.info("generation %d: %s (%s) in %.1f ms: %d changed and %d shared directories, %d names invalidated",
                 generation.number, label, reason, seconds * 1000, plan.changed_dirs, plan.shared_dirs,
                 len(plan.entries))
        return {"generation": generation.number, "seconds": round(seconds, 6), "changed_dirs": plan.changed_dirs,
                "shared_dirs": plan.shared_dirs, "invalidated_entries": len(plan.entries),
                "invalidated_dirs": len(plan.dirs)}

    # ------------------------------------------------------------------ prefetch

    def _start_prefetch(self, why: str | None = None) -> None:
        """Replay the current image's profile for the current generation, cancelling the last
        replay (saying *why*: by default, that a new generation replaced it)."""
        assert self.ops is not None and self._nursery is not None
        if self._prefetch_scope is not None:
            if self.prefetcher is not None:
                self.prefetcher.cancel(why or f"replaced by generation {self.ops.generation.number}")
            self._prefetch_scope.cancel()
            self._prefetch_scope = None
        self.prefetcher = None
        if self.quiesced:
            self.prefetch_note = "the mount is being unmounted"
        elif not self.options.prefetch:
            self.prefetch_note = "prefetch is off (--no-prefetch)"
        elif self.recording is not None and self.recording.aborted is None:
            self.prefetch_note = "a profile is being recorded"
        elif self.profile_subject is None:
            self.prefetch_note = "the image is not stored (a manifest file or a layer change): it has no profiles"
        else:
            self.prefetch_note = "loading the profile"
            scope = self._prefetch_scope = trio.CancelScope()
            done = self._prefetch_done = trio.Event()
            self._nursery.start_soon(self._prefetch, scope, done, self.ops.generation, self.profile_subject)
            return
        log.debug("no prefetch for generation %d: %s", self.ops.generation.number, self.prefetch_note)

    @property
    def profile_subject(self) -> bytes | None:
        """What this mount's profiles are filed under (image.profiles.profile_subject)."""
        from cnpsfs.image.profiles import profile_subject

        return profile_subject(self.image, self.image_digest)

    async def _prefetch(self, scope: trio.CancelScope, done: trio.Event, generation: Generation, image: bytes
                        ) -> None:
        name = self.options.profile or fmt.DEFAULT_PROFILE
        try:
            with scope:
                await self._replay(generation, image, name)
        finally:
            if self._prefetch_scope is scope:
                self._prefetch_scope = None
            done.set()

    async def _wait_for_prefetch(self) -> None:
        """``--wait-prefetch``: before saying the mount is ready, give the first replay up to
        that many seconds to finish (by default the mount is ready as soon as it answers:
        a profile is advice, and a replay that is late costs time, not correctness)."""
        seconds = self.options.wait_prefetch
        done = self._prefetch_done
        if not seconds or done is None:
            return
        started = time.monotonic()
        with trio.move_on_after(seconds):
            await done.wait()
        waited = time.monotonic() - started
        if done.is_set():
            log.info("waited %.3f s for the replay before reporting the mount ready (--wait-prefetch)", waited)
        else:
            log.warning("the replay did not end within --wait-prefetch's %g s: the mount is ready, the replay goes on",
                     seconds)

    async def _replay(self, generation: Generation, image: bytes, name: str) -> None:
        from cnpsfs.image.profiles import find_profile

        assert self.ops is not None
        try:
            chosen, malformed = await trio.to_thread.run_sync(find_profile, self.store, image, name)
        except (CnpsfsError, OSError) as exc:  # the store cannot say: advice not taken, the mount goes on
            self.prefetch_note = f"the profiles could not be read: {exc}"
            log.warning("no prefetch for generation %d: %s", generation.number, self.prefetch_note)
            return
        for bad in malformed:
            log.warning("profile %s of image %s is unusable, ignored: %s", fmt.format_digest(bad.digest)[:23],
                        fmt.format_digest(image)[:23], bad.error)
        if chosen is None or chosen.profile is None:
            self.prefetch_note = f"the image has no profile {name!r}"
            # Most images have none: worth a line only when the profile was asked for by name.
            level = logging.INFO if self.options.profile is not None else logging.DEBUG
            log.log(level, "no prefetch for generation %d: %s", generation.number, self.prefetch_note)
            return
        profile = chosen.profile
        if profile.image != image:
            log.info("profile %s (%s) was recorded on another image (%s): replayed as advice", profile.name,
                     fmt.format_digest(chosen.digest)[:23], fmt.format_digest(profile.image)[:23])
        self.ops.prefetched.clear()
        mib = self.options.prefetch_mib
        self.prefetcher = Prefetcher(self.ops, generation, profile, chosen.digest,
                                     budget_bytes=mib << 20 if mib is not None else None,
                                     push_to=self.mountpoint if self.options.prefetch_pages else None,
                                     serving=self._serving)
        self.prefetch_runs.append(self.prefetcher)
        self.prefetch_note = ""
        await self.prefetcher.run()

    async def _quiesce(self) -> dict[str, Any]:
        """Stop the replay before an unmount: its lookups through the mount would make a plain
        umount fail as busy. Waits (a little) until none is still running on a worker."""
        self.quiesced = True
        running = self.prefetcher
        self._start_prefetch("the mount is being unmounted")  # cancels the replay; starts none
        if running is not None:
            with trio.move_on_after(QUIESCE_SECONDS):
                await running.out_of_mount()
        return {"in_mount": running.in_mount if running is not None else 0}

    def prefetch_status(self) -> dict[str, Any]:
        assert self.ops is not None
        counters = {"hits": self.ops.prefetch_hits, "demand_misses": self.ops.demand_misses}
        if self.prefetcher is None:
            loading = self._prefetch_scope is not None
            return {"state": "loading" if loading else "none", "reason": self.prefetch_note, **counters}
        return {**self.prefetcher.status(), **counters}

    # ------------------------------------------------------------------ recording a profile

    async def _record_start(self, max_seconds: float) -> dict[str, Any]:
        assert self.ops is not None and self._nursery is not None
        if self.profile_subject is None:
            raise CnpsfsError("this mount serves an image that is not stored (a manifest file or a layer change): "
                              "a profile is filed under a stored image or FileSet; mount one created with "
                              "`cnpsfs image create`")
        current = self.recording
        if current is not None and current.aborted is None and self.ops.recorder is current:
            raise CnpsfsError(f"a profile is already being recorded on this mount (for {current.summary()['seconds']}"
                              " s): stop it first")
        if not 0 < max_seconds <= RECORD_MAX_SECONDS:
            raise CnpsfsError(f"a recording lasts at most {RECORD_MAX_SECONDS:.0f} seconds")
        recorder = ProfileRecorder(generation=self.ops.generation.number, image=self.profile_subject)
        self.recording = recorder
        # Nothing may warm the kernel behind the recording's back: the replay stops.
        self._start_prefetch("a profile is being recorded")
        invalidated = await self.ops.drop_kernel_caches()
        recorder.started = recorder.last = recorder.clock()
        self.ops.recorder = recorder
        scope = self._recording_scope = trio.CancelScope()

        async def end_in_time() -> None:
            with scope:
                await trio.sleep(max_seconds)
                if self.recording is recorder and recorder.aborted is None:
                    recorder.aborted = f"the recording ran for its longest time, {max_seconds:.0f} s, without a stop"
                    self._stop_recording_events()

        self._nursery.start_soon(end_in_time)
        log.info("recording a profile for generation %d (kernel caches of %d inodes dropped)",
                 recorder.generation, invalidated)
        return {"generation": recorder.generation, "invalidated": invalidated}

    def _stop_recording_events(self) -> None:
        assert self.ops is not None
        self.ops.recorder = None
        if self._recording_scope is not None:
            self._recording_scope.cancel()
            self._recording_scope = None

    async def _record_stop(self, name: str, metadata: dict[str, Any]) -> dict[str, Any]:
        recorder = self.recording
        if recorder is None:
            raise CnpsfsError("no profile is being recorded on this mount")
        self._stop_recording_events()
        self.recording = None
        if recorder.aborted is not None:
            raise CnpsfsError(f"the recording was abandoned: {recorder.aborted}")
        fmt.check_profile_name(name)
        summary = recorder.summary()
        assert recorder.image is not None
        metadata = {"recorded_ms": int(summary["seconds"] * 1000), "requests": recorder.events,
                    **({"truncated": True} if recorder.truncated else {}), **metadata}
        profile = recorder.profile(name, image=recorder.image, metadata=metadata)
        encoded = await trio.to_thread.run_sync(fmt.encode_profile, profile)
        log.info("recorded profile %s: %d entries, %d ranges in %.1f s", name, len(profile.entries),
                 profile.ranges, summary["seconds"])
        return {"image": fmt.format_digest(recorder.image), "object": base64.b64encode(encoded).decode(),
                "digest": fmt.format_digest(fmt.digest_bytes(encoded)), **summary}

    def _register_roots(self) -> None:
        from cnpsfs.fs.daemon import runtime_dir
        from cnpsfs.store.maintenance import register_roots

        pinned = [(self.image, self.image_digest)]
        if self.rollback_image is not None:
            pinned.append(self.rollback_image)
        roots = set().union(*(root_digests(image, digest) for image, digest in pinned))
        register_roots(self.store, sorted(roots), runtime=runtime_dir())

    def status(self) -> dict[str, Any]:
        assert self.ops is not None
        gen = self.ops.generation
        table = gen.inodes.stats()
        return {
            "mountpoint": self.mountpoint,
            "pid": os.getpid(),
            "store": str(self.store.path),
            "fuse_mode": self.ops.mode,
            "generation": gen.number,
            "image": {"name": gen.image.name, "version": gen.image.version, "mode": gen.image.mode,
                      "digest": fmt.format_digest(self.image_digest) if self.image_digest else None},
            "layers": describe_layers(self.store, gen.image.layers, gen.image),
            "init_layer": self.init_status,
            "history": [vars(h) if not hasattr(h, "__slots__") else {k: getattr(h, k) for k in h.__slots__}
                        for h in self.history],
            "requests": dict(self.ops.requests),
            "inodes": gen.entries + 1,  # composed and kept: the loaded tree, the root included
            "kernel_inodes": len(self.ops.held) + table["held"],
            "inode_keys": len(gen.inodes),
            "inode_table": table,
            "uptime": round(time.time() - self.started, 3),
            "prefetch": self.prefetch_status(),
            "prefetch_runs": [p.status() for p in self.prefetch_runs],  # the last 8, the current one last
            "recording": self.recording.summary() if self.recording is not None else None,
            "trust": self.decision.as_dict() if self.decision is not None else
            {"verified": False, "policy": None, "reason": "unverified: no trust policy"},
            **({"remote": self.store.counters()} if hasattr(self.store, "counters") else {}),
        }


class _StderrTail:
    """What is written to stderr from now on, when stderr is a file (the daemon's log).

    libfuse and fusermount3 say why a mount failed only there; reading it back lets the
    one-line error name the cause. Elsewhere (a terminal, the journal) the user sees it.
    """

    def __init__(self) -> None:
        try:
            st = os.fstat(2)
            self.offset = st.st_size if stat.S_ISREG(st.st_mode) else None
        except OSError:
            self.offset = None

    def read(self, limit: int = 1 << 16) -> str:
        if self.offset is None:
            return ""
        try:
            with open("/proc/self/fd/2", "rb") as f:
                f.seek(self.offset)
                return f.read(limit).decode("utf-8", "replace")
        except OSError:
            return ""


def describe_init_layer(generation: Generation) -> dict[str, Any] | None:
    """The init layer of *generation* for `status` (reads directories: not on the loop)."""
    layer = find_init_layer(generation)
    if layer is None:
        return None
    return {"fileset": fmt.format_digest(layer.fileset), "added": added_paths(generation)}


#: Young-generation threshold of the cyclic GC in the daemon (CPython's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def _tune_gc() -> None:
    """Make the cyclic GC rare: loading a directory allocates an object or more per entry
    (entries, nodes, extents) and almost none of them form cycles, so with the default
    threshold a cold walk spent about 15 % of its time in collections that free nothing.
    What exists before serving (imports, the first generation) is frozen out of them,
    without a full collection first: that found only the few dozen objects imports leave
    (attrs' class builders) and cost the daemon 20-50 ms before the mount answered."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


#: Kernel read-ahead for the mount: libfuse lets a READ carry up to 1 MiB (max_pages
#: 256), but the kernel gives a FUSE mount the default 128 KiB read-ahead, so large files
#: were read in 128 KiB requests, each a round trip through the daemon.
READAHEAD_KIB = 1024


def _raise_readahead(dev: int) -> None:
    """Raise the mount's read-ahead (only root may write the sysfs knob; best effort)."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "r+") as f:
            if int(f.read() or 0) < READAHEAD_KIB:
                f.seek(0)
                f.write(str(READAHEAD_KIB))
    except (OSError, ValueError) as exc:
        log.debug("read-ahead left as is: %s: %s", path, exc)
