"""systemd's readiness protocol (sd_notify(3)), spoken directly: no libsystemd binding.

The service manager passes ``$NOTIFY_SOCKET``, an ``AF_UNIX`` datagram socket (a path, or
an abstract name when it starts with ``@``); each message is one datagram of
newline-separated ``KEY=VALUE`` lines. ``$WATCHDOG_USEC`` asks for ``WATCHDOG=1`` at least
that often, for the process ``$WATCHDOG_PID`` names (or any, when unset).

Sending never blocks and never raises: a full or vanished socket costs one debug line.
A lost ``WATCHDOG=1`` is what the watchdog is for; a lost ``READY=1`` would make the start
time out, which the manager reports — better than a mount daemon stuck in ``sendto``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """One process's channel to its service manager; a no-op when there is none."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address or None
        self.watchdog_usec = watchdog_usec if self.address else 0
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        usec = 0
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
            pid = env.get("WATCHDOG_PID")
            if pid is not None and int(pid) != os.getpid():
                usec = 0  # meant for another process (e.g. our parent)
        except ValueError:
            usec = 0
        return cls(env.get("NOTIFY_SOCKET"), max(usec, 0))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the manager's timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec > 0 else None

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def send(self, *lines: str) -> bool:
        """Send one message of *lines*; True if the datagram left."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode() + b"\n"
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, self._target())
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s", self.address, exc)
            return False
        log.debug("sd_notify: %s", " ".join(lines))
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this to its request.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str = "unmounting") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
