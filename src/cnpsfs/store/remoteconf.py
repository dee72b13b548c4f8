"""Named remotes: ``/etc/cnpsfs/remotes.toml`` and ``$XDG_CONFIG_HOME/cnpsfs/remotes.toml``.

::

    [remotes.origin]
    url = "https://cdn.example.org/cnpsfs"           # docker://, http(s):// or file:///
    mirrors = ["https://eu.example.org/cnpsfs", "file:///srv/nfs/cnpsfs"]
    ca = "/etc/cnpsfs/origin-ca.pem"                 # trusted beside the system CAs
    tls-verify = true
    proxy = "http://squid.internal:3128"             # else $http_proxy / $https_proxy
    timeout = 30                                      # seconds a read may wait, retries included
    connect-timeout = 10
    retries = 4
    parallel = 8                                      # block requests at once
    read-ahead = "512K"                               # fetched around a missed small block; 0: off
    authfile = "/etc/cnpsfs/auth.json"                # docker:// credentials (containers-auth.json)
    creds-file = "/etc/cnpsfs/origin.creds"           # or USER:PASSWORD in a file of its own

The user's file is read after the system's; a name defined in both takes the user's
entry. ``--remote`` takes a name from these files or a URL given ad hoc (then every
setting has its default). A remote's mirrors serve the same blobs (a copy of the
origin's directory, a CDN in front of it); different remotes given with ``--remote``
twice are tried in order for what the first one lacks or cannot serve.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnpsfs.errors import UsageError
from cnpsfs.store.backends import Backend, open_backend, parse_remote_url
from cnpsfs.store.remote import DEFAULT_PARALLEL, DEFAULT_READ_AHEAD, DEFAULT_TIMEOUT, RemoteStore
from cnpsfs.store.remotelimits import MAX_PARALLEL, MAX_READ_AHEAD, MAX_RETRIES, MAX_TIMEOUT
from cnpsfs.transport import HttpConfig

SYSTEM_CONFIG = Path("/etc/cnpsfs/remotes.toml")
KEYS = {"url", "mirrors", "ca", "tls-verify", "proxy", "timeout", "connect-timeout", "retries", "parallel",
        "read-ahead", "authfile", "creds-file"}


@dataclass(frozen=True)
class RemoteSpec:
    """One remote: its URLs (first the origin, then mirrors) and how to talk to them."""

    name: str
    urls: tuple[str, ...]
    ca: str | None = None
    tls_verify: bool = True
    proxy: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = 10.0
    retries: int = 4
    parallel: int = DEFAULT_PARALLEL
    read_ahead: int = DEFAULT_READ_AHEAD
    authfile: str | None = None
    creds_file: str | None = None
    source: str = "--remote"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.urls[0]

    def http_config(self) -> HttpConfig:
        # The per-call deadline is the remote's timeout; a single socket read waits no longer either.
        return HttpConfig(connect_timeout=min(self.connect_timeout, self.timeout), read_timeout=self.timeout,
                          deadline=self.timeout, retries=self.retries, proxy=self.proxy, ca_file=self.ca,
                          tls_verify=self.tls_verify, max_connections=max(16, self.parallel * 2))

    def creds(self) -> str | None:
        if self.creds_file is None:
            return None
        try:
            return Path(self.creds_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"{self.source}: remote {self.name}: creds-file {self.creds_file}: "
                             f"{exc.strerror}") from None

    def backends(self) -> list[Backend]:
        return [open_backend(url, self.http_config(), creds=self.creds(), authfile=self.authfile,
                             max_parallel=self.parallel) for url in self.urls]

    def open(self, state_dir: Path | None = None) -> RemoteStore:
        """The remote store (no network traffic until it is used)."""
        return RemoteStore(self.name, self.backends(), state_dir=state_dir, timeout=self.timeout,
                           parallel=self.parallel, read_ahead=self.read_ahead)


def config_paths(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The system file, then the user's (``$XDG_CONFIG_HOME``, default ``~/.config``)."""
    env = os.environ if environ is None else environ
    user_dir = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".config")
    return [SYSTEM_CONFIG, Path(user_dir) / "cnpsfs" / "remotes.toml"]


def load_remotes(paths: Sequence[Path] | None = None) -> dict[str, RemoteSpec]:
    """Every named remote in *paths* (default :func:`config_paths`); a later file wins per name."""
    remotes: dict[str, RemoteSpec] = {}
    for path in config_paths() if paths is None else paths:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from None
        import tomllib  # only for a file that exists: a lazy mount's start pays for every import

        try:
            doc = tomllib.loads(data.decode())
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not UTF-8 text") from None
        table = doc.get("remotes", {})
        unknown = set(doc) - {"remotes"}
        if unknown or not isinstance(table, dict):
            raise UsageError(f"{path}: expected only [remotes.NAME] tables (found {sorted(unknown)[:3]})")
        for name, entry in table.items():
            remotes[name] = _spec(name, entry, str(path))
    return remotes


def _spec(name: str, entry: Any, source: str) -> RemoteSpec:
    where = f"{source}: remote {name}"
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected a table")
    unknown = set(entry) - KEYS
    if unknown:
        raise UsageError(f"{where}: unknown setting {sorted(unknown)[0]!r} (known: {', '.join(sorted(KEYS))})")
    url = entry.get("url")
    if not isinstance(url, str):
        raise UsageError(f"{where}: url = \"docker://…\", \"http(s)://…\" or \"file:///…\" is required")
    mirrors = entry.get("mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
        raise UsageError(f"{where}: mirrors must be a list of URLs")
    for u in (url, *mirrors):
        parse_remote_url(u)

    def get(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = entry.get(key, default)
        if value is not default and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise UsageError(f"{where}: {key} has the wrong type")
        return value

    timeout = float(get("timeout", (int, float), DEFAULT_TIMEOUT))
    spec = RemoteSpec(
        name=name, urls=(url, *mirrors), ca=get("ca", str, None), tls_verify=get("tls-verify", bool, True),
        proxy=get("proxy", str, None), timeout=timeout,
        connect_timeout=float(get("connect-timeout", (int, float), 10.0)), retries=int(get("retries", int, 4)),
        parallel=int(get("parallel", int, DEFAULT_PARALLEL)), read_ahead=_read_ahead(entry, where),
        authfile=get("authfile", str, None), creds_file=get("creds-file", str, None), source=source)
    # Every wait bounded, every pool sized: inf, nan or a huge pool would mean "forever" or "unbounded".
    for key, value in (("timeout", spec.timeout), ("connect-timeout", spec.connect_timeout)):
        if not 0 < value <= MAX_TIMEOUT:  # also false for nan
            raise UsageError(f"{where}: {key} must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds")
    if not 1 <= spec.parallel <= MAX_PARALLEL:
        raise UsageError(f"{where}: parallel must be 1 to {MAX_PARALLEL}")
    if not 0 <= spec.retries <= MAX_RETRIES:
        raise UsageError(f"{where}: retries must be 0 to {MAX_RETRIES}")
    return spec


def _read_ahead(entry: Mapping[str, Any], where: str) -> int:
    """``read-ahead``: bytes (an integer) or a size (``"512K"``, ``"1M"``); 0 turns it off."""
    value = entry.get("read-ahead", DEFAULT_READ_AHEAD)
    if isinstance(value, str):
        from cnpsfs.store.cached import parse_size

        try:
            value = parse_size(value)
        except UsageError as exc:
            raise UsageError(f"{where}: read-ahead: {exc}") from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"{where}: read-ahead has the wrong type (bytes, or a size such as \"512K\")")
    if not 0 <= value <= MAX_READ_AHEAD:
        raise UsageError(f"{where}: read-ahead must be 0 to {MAX_READ_AHEAD >> 20} MiB")
    return value


def remote_spec(text: str, configured: Mapping[str, RemoteSpec] | None = None, *,
                timeout: float | None = None) -> RemoteSpec:
    """A ``--remote`` value: a configured name, or a URL (with default settings)."""
    remotes = load_remotes() if configured is None else configured
    spec = remotes.get(text)
    if spec is None:
        if "://" not in text:
            known = ", ".join(sorted(remotes)) or "none are configured"
            raise UsageError(f"--remote {text}: not a URL and not a configured remote ({known}; see "
                             f"{' and '.join(str(p) for p in config_paths())})")
        parse_remote_url(text)
        spec = RemoteSpec(name=text, urls=(text,))
    if timeout is not None:
        spec = RemoteSpec(**{**spec.__dict__, "timeout": timeout})
    return spec
