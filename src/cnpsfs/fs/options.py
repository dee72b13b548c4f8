"""What a mount can be told, with its defaults in one place.

``cnpsfs mount`` fills :class:`MountOptions` from its flags, ``cnpsfs service run`` from
a mount's TOML file and ``cnpsfs bundle`` from its own few flags; the flags' defaults,
the service file's defaults and the accepted ranges are the constants here, so the three
cannot drift apart. Imports nothing heavy: the CLI reads it to build its options.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Worker threads for reading, decompressing and hashing chunks (one CapacityLimiter).
DEFAULT_THREADS = 4
THREADS_RANGE = (1, 64)
#: The verified-chunk cache of a mount, in MiB.
DEFAULT_CACHE_MIB = 128
CACHE_MIB_RANGE = (8, 1 << 20)
PREFETCH_MIB_RANGE = (1, 1 << 20)
#: The longest ``--wait-prefetch`` may be given (seconds).
WAIT_PREFETCH_RANGE = (0.0, 60.0)  # well under READY_TIMEOUT
#: "auto" uses the kernel-cache extensions when the installed pyfuse3 has them.
FUSE_MODES = ("auto", "stock")
#: How long ``mount`` waits for the daemon to report that the mount answers.
READY_TIMEOUT = 120.0
#: How long ``umount`` waits for a daemon to exit before it is terminated.
UNMOUNT_TIMEOUT = 30.0
#: Whether a prefetch also stores the profiled pages in the kernel's page cache
#: (``notify_store``), so the program's reads of them make no READ request at all.
PREFETCH_PAGES = True


@dataclass(frozen=True, slots=True)
class MountOptions:
    """How to serve one mount; every field has the default ``cnpsfs mount`` documents."""

    allow_other: bool = False
    use_extensions: bool = True  # fuse mode "auto"; False is "stock"
    threads: int = DEFAULT_THREADS
    cache_mib: int = DEFAULT_CACHE_MIB
    writable: str | None = None  # UPPERDIR of a kernel overlayfs on top, or None for read-only
    #: Compose an init layer on top (cnpsfs.image.initlayer): None for none (the image
    #: exactly as stored), else the mount destinations beyond the defaults.
    init_layer: tuple[str, ...] | None = None
    init_files: tuple[str, ...] = ()  # bind targets (files) beyond the defaults
    ready_timeout: float = READY_TIMEOUT
    prefetch: bool = True  # replay the image's profile on mount and after each swap (False: --no-prefetch)
    profile: str | None = None  # which profile (--profile NAME, which must exist); None: "default" if any
    prefetch_pages: bool = PREFETCH_PAGES
    prefetch_mib: int | None = None  # stop a replay after this much (--prefetch-mib); None: fs/prefetch.py's shares
    #: Before reporting ready, wait up to this many seconds for the first replay (--wait-prefetch); None: do not wait.
    wait_prefetch: float | None = None

    @property
    def cache_bytes(self) -> int:
        return self.cache_mib << 20

    @property
    def fuse_mode(self) -> str:
        return "auto" if self.use_extensions else "stock"
