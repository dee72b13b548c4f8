"""HTTP for cnpsfs: one synchronous session per remote, shared by worker threads.

Why synchronous: the FUSE daemon runs every blocking call on a trio worker thread
(``trio.to_thread.run_sync`` under one limiter), the CLI runs plain threads, and a blocking
client with a thread-safe connection pool serves both without a second event loop. The
library is urllib3 2.x (see docs/architecture.md): thread-safe pools, separate connect and
read timeouts, streaming bodies, the system CA store through :mod:`ssl`, and no
dependencies of its own. It does not retry, redirect or pick proxies for us here: those
rules are ours (below), so they are the same for every remote and testable.

What a call guarantees:

- an overall **deadline** (headers and body): nothing waits longer, however slowly a
  server trickles bytes (each socket read gets the smaller of the read timeout and the
  time left);
- bounded **retries** with exponential backoff and full jitter on connection errors,
  timeouts, 408/429/5xx, honouring ``Retry-After``; requests that are not idempotent
  (POST, PATCH) are retried only on 429/503 (the server did not act on them);
- **redirects** followed by hand: ``Authorization`` is dropped when the host changes
  (presigned storage URLs reject it), a 403 from a redirect target re-resolves from the
  original URL once (the presigned URL expired), and blob redirects may be cached;
- ``Accept-Encoding: identity``: digests are over the bytes as stored, never re-encoded;
- **proxies** as curl reads them (``http_proxy`` lower case only, ``https_proxy`` /
  ``HTTPS_PROXY``, ``all_proxy``, ``no_proxy`` with domain suffixes, IPs, CIDRs and ``*``),
  or one proxy URL per session;
- **TLS** verified against the system CAs plus an optional CA file, optional client cert;
- errors are :mod:`cnpsfs.errors` types with a one-line message ``HOST: RESOURCE: problem``.
"""

from __future__ import annotations

import email.utils
import importlib.metadata
import ipaddress
import json
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import urllib3
import urllib3.exceptions as u3e

from cnpsfs.errors import (
    AuthError,
    RegistryError,
    RemoteDataError,
    RemoteNotFoundError,
    TransportError,
    TransportTimeout,
    UsageError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

try:
    _VERSION = importlib.metadata.version("cnpsfs")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    _VERSION = "dev"

#: Statuses worth another attempt: the server (or a proxy) says "not now", not "no".
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Statuses a non-idempotent request may be retried on: the server did not act on it.
NOT_PROCESSED_STATUSES = frozenset({429, 503})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: OpenSSL's reasons for "the peer does not speak TLS" (a plain HTTP server answered).
NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                             "HTTP_REQUEST", "UNKNOWN_PROTOCOL"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
MAX_REDIRECTS = 10
#: Redirect targets remembered per session (blob → presigned URL); old ones fall out.
REDIRECT_CACHE_SIZE = 512
CHUNK = 256 * 1024

Body = bytes | Callable[[], IO[bytes] | Iterable[bytes]] | None
"""A request body: bytes, or a factory giving a fresh stream per attempt (so retries and
307/308 redirects can resend it); set Content-Length in the headers for a factory."""

# tls_verify=False is a decision the user made on the command line (skopeo's
# --tls-verify=false); the session logs it once instead of urllib3 warning per request.
warnings.filterwarnings("ignore", category=u3e.InsecureRequestWarning)


@dataclass(frozen=True)
class HttpConfig:
    """How patient and how trusting a session is. Times are seconds."""

    connect_timeout: float = 10.0
    #: Longest silence between two socket reads.
    read_timeout: float = 30.0
    #: Whole call, retries, backoff and body included (a call may pass its own).
    deadline: float = 300.0
    #: Attempts after the first.
    retries: int = 4
    backoff: float = 0.25
    backoff_max: float = 8.0
    #: A ``Retry-After`` longer than this (or than the time left) ends the call at once.
    retry_after_max: float = 60.0
    #: One proxy URL for every request (``http://[user:pass@]host:port``); None: from the environment.
    proxy: str | None = None
    #: Hosts that bypass the proxy, curl's ``no_proxy`` syntax; None: from the environment.
    no_proxy: str | None = None
    #: Read ``http_proxy`` and friends from the environment.
    trust_env: bool = True
    #: A PEM file (or directory of them) trusted in addition to the system CAs.
    ca_file: str | None = None
    tls_verify: bool = True
    client_cert: str | None = None
    client_key: str | None = None
    #: Connections kept per host (more may be opened under load, then closed).
    max_connections: int = 16
    user_agent: str = f"cnpsfs/{_VERSION}"


# --------------------------------------------------------------------------- errors


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2] or url


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path or "/"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause of a urllib3 exception (the OSError that says what happened)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = getattr(exc, "reason", None)
        if not isinstance(nxt, BaseException):
            nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _describe(exc: BaseException) -> str:
    """A short human reason for a transport exception, without reprs of pool objects."""
    root = _root_cause(exc)
    if isinstance(root, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({root.verify_message or root.reason})"
    if isinstance(root, ssl.SSLError):
        return f"TLS error ({root.reason or root})"
    if isinstance(root, socket.gaierror):
        return f"cannot resolve host ({root.strerror})"
    if isinstance(root, OSError) and root.strerror:
        return root.strerror[0].lower() + root.strerror[1:]
    if isinstance(exc, u3e.ConnectTimeoutError) or isinstance(root, u3e.ConnectTimeoutError):
        return "connect timed out"
    if isinstance(exc, u3e.ReadTimeoutError) or isinstance(root, (u3e.ReadTimeoutError, TimeoutError)):
        return "read timed out"
    if isinstance(root, u3e.IncompleteRead):
        return f"connection closed after {root.partial} of {root.partial + root.expected} bytes"
    text = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    text = re.sub(r"<[^>]*object at 0x[0-9a-f]+>:?\s*", "", text)
    return text[:200]


def _is_retryable_exc(exc: BaseException) -> bool:
    root = _root_cause(exc)
    # A certificate problem or a server that does not speak TLS will not heal by itself.
    return not isinstance(root, ssl.SSLError) and not isinstance(exc, u3e.SSLError)


def _error(url: str, resource: str | None, problem: str, cls: type[TransportError] = TransportError, *,
           status: int | None = None, retryable: bool = False) -> TransportError:
    host = _host_of(url)
    what = resource or _path_of(url)
    err = cls(f"{host}: {what}: {problem}", host=host, resource=what, status=status)
    err.retryable = retryable
    return err


def summarize_body(body: bytes) -> str:
    """One line from an error body: the OCI ``errors[0]`` code and message, else the text's start."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        errs = doc.get("errors")
        if isinstance(errs, list) and errs and isinstance(errs[0], dict):
            code = str(errs[0].get("code", "")).strip()
            message = str(errs[0].get("message", "")).strip()
            return ": ".join(x for x in (code, message) if x)[:200]
        for key in ("error_description", "error", "message", "details"):
            if isinstance(doc.get(key), str):
                return doc[key][:200]
    text = body[:400].decode("utf-8", "replace")
    if "<" in text:  # an HTML error page: its title, or nothing
        m = re.search(r"<title>([^<]*)</title>", text, flags=re.I)
        return m.group(1).strip()[:200] if m else ""
    return " ".join(text.split())[:200]


def status_error(resp: Response, resource: str | None = None, *, attempts: int = 1) -> TransportError:
    """The error for an unusable status: AuthError (401/403), RemoteNotFoundError (404), else RegistryError."""
    detail = summarize_body(resp.content) if resp.body_read else ""
    problem = f"HTTP {resp.status} {resp.reason}".rstrip()
    if detail and detail not in problem and f"{resp.status} {resp.reason}" not in detail:
        problem += f" ({detail})"
    if attempts > 1:
        problem += f" after {attempts} attempts"
    cls: type[TransportError]
    if resp.status in (401, 403):
        cls = AuthError
    elif resp.status == 404:
        cls = RemoteNotFoundError
    else:
        cls = RegistryError
    # A busy or failing server may do better on a later try (an upload restarts on it).
    return _error(resp.url, resource, problem, cls, status=resp.status, retryable=resp.status in RETRY_STATUSES)


# --------------------------------------------------------------------------- proxies (curl's rules)


def _env(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def env_proxy(scheme: str, environ: Mapping[str, str]) -> str | None:
    """The proxy curl would use for *scheme* from *environ*.

    ``http_proxy`` is read in lower case only (curl ignores ``HTTP_PROXY``: a CGI program
    gets it from a client's ``Proxy:`` header); the others in either case.
    """
    if scheme == "http":
        return _env(environ, "http_proxy", "all_proxy", "ALL_PROXY")
    return _env(environ, "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def no_proxy_matches(host: str, rules: str) -> bool:
    """Whether *host* bypasses the proxy under *rules* (curl's ``no_proxy``).

    Comma or space separated entries: ``*`` matches every host; a name matches itself and
    its subdomains (a leading dot is ignored); an IP address matches itself; a CIDR matches
    the addresses inside it. A ``:port`` suffix on an entry is ignored, as curl does.
    """
    host = host.strip("[]").lower().rstrip(".")
    try:
        host_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        host_ip = None
    for entry in re.split(r"[,\s]+", rules.strip().lower()):
        if not entry:
            continue
        if entry == "*":
            return True
        if entry.startswith("["):
            entry = entry[1:].partition("]")[0]
        elif entry.count(":") == 1:
            entry = entry.partition(":")[0]
        if host_ip is not None:
            try:
                if host_ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


# --------------------------------------------------------------------------- responses


class Response:
    """A response whose body has not necessarily been read.

    Inside a call's handler, :meth:`iter_content` and :meth:`read` enforce the call's
    deadline and turn socket failures into retryable :class:`TransportError` s.
    """

    def __init__(self, raw: urllib3.BaseHTTPResponse, url: str, history: list[str], *, t_end: float,
                 read_timeout: float, resource: str | None) -> None:
        self._raw = raw
        self.url = url
        self.history = history
        self.status: int = raw.status
        self.reason: str = raw.reason or ""
        self.headers = raw.headers
        self._t_end = t_end
        self._read_timeout = read_timeout
        self._resource = resource
        self._content: bytes | None = None
        self._eof = False

    @property
    def body_read(self) -> bool:
        return self._content is not None

    @property
    def content(self) -> bytes:
        """The whole body (read by the call for non-streaming requests)."""
        if self._content is None:
            self._content = self.read()
        return self._content

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value)

    def _arm(self) -> None:
        remaining = self._t_end - time.monotonic()
        if remaining <= 0:
            raise _error(self.url, self._resource, "deadline exceeded while reading the body", TransportTimeout,
                         retryable=False)
        sock = getattr(getattr(self._raw, "connection", None), "sock", None)
        if sock is not None:
            sock.settimeout(min(self._read_timeout, remaining))

    def iter_content(self, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The body in pieces as they arrive (at most *chunk_size* each)."""
        while True:
            self._arm()
            try:
                # read1: one socket read per call, so each wait is bounded by the time left
                # (read() would loop over recvs and let a trickling server pass the deadline).
                data = self._raw.read1(chunk_size, decode_content=False)
            except (u3e.HTTPError, OSError) as exc:
                if time.monotonic() >= self._t_end:
                    raise _error(self.url, self._resource, "deadline exceeded while reading the body",
                                 TransportTimeout) from None
                raise _error(self.url, self._resource, _describe(exc), retryable=_is_retryable_exc(exc)) from None
            if not data:
                self._eof = True
                return
            yield data

    def read(self, max_bytes: int | None = None) -> bytes:
        """The rest of the body; more than *max_bytes* is a :class:`RemoteDataError`."""
        parts: list[bytes] = []
        total = 0
        for data in self.iter_content():
            total += len(data)
            if max_bytes is not None and total > max_bytes:
                raise _error(self.url, self._resource, f"body larger than the {max_bytes} bytes expected",
                             RemoteDataError)
            parts.append(data)
        self._content = b"".join(parts)
        return self._content

    def close(self) -> None:
        """Drop the connection unless the body was read to the end (then it is reused)."""
        try:
            if self._content is None and not self._eof:
                self._raw.close()
            self._raw.release_conn()
        except Exception:  # closing never raises
            log.debug("closing %s failed", self.url, exc_info=True)

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class TLSNotSpokenError(TransportError):
    """The server answered a TLS hello with plain HTTP (the registry client may then try http)."""


class _Redirected(Exception):
    """Internal: restart an attempt from the original URL (a presigned URL expired)."""


# --------------------------------------------------------------------------- the session


class Session:
    """HTTP with cnpsfs's rules, thread-safe, one connection pool per host and proxy.

    Share one session between the clients of a remote; :meth:`close` it when done.
    """

    def __init__(self, config: HttpConfig | None = None, *, environ: Mapping[str, str] | None = None) -> None:
        self.config = config or HttpConfig()
        env = dict(os.environ if environ is None else environ) if self.config.trust_env else {}
        self._environ = env
        self._no_proxy = self.config.no_proxy if self.config.no_proxy is not None else \
            (_env(env, "no_proxy", "NO_PROXY") or "")
        # The TLS context is made for the first https:// URL: loading the system's CA bundle
        # took 20-60 ms, which an http:// remote (a web server on a trusted network) never
        # needs. A CA file or client certificate of the config is loaded now, so that a bad
        # one is an error of the command, not of its first request.
        self._ssl: ssl.SSLContext | None = self._ssl_context() if self.config.ca_file or self.config.client_cert \
            else None
        self._pool_kw: dict[str, Any] = {
            "maxsize": self.config.max_connections,
            "block": False,
            "retries": False,
        }
        if not self.config.tls_verify:
            self._pool_kw.update(cert_reqs="CERT_NONE", assert_hostname=False)
            log.warning("TLS certificates are not verified (tls_verify=False)")
        #: Connection pools by proxy and by whether the target is https (only those carry the TLS context).
        self._pools: dict[tuple[str | None, bool], urllib3.PoolManager] = {}
        self._lock = threading.Lock()
        self._redirects: OrderedDict[str, str] = OrderedDict()
        self._random = random.Random()
        #: Retries made by this session's calls (``cnpsfs status`` shows them per remote).
        self.stats: Counter[str] = Counter()

    def _ssl_context(self) -> ssl.SSLContext:
        cfg = self.config
        ctx = ssl.create_default_context()
        if cfg.ca_file:
            try:
                if os.path.isdir(cfg.ca_file):
                    ctx.load_verify_locations(capath=cfg.ca_file)
                else:
                    ctx.load_verify_locations(cafile=cfg.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"CA file {cfg.ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not cfg.tls_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cfg.client_cert:
            try:
                ctx.load_cert_chain(cfg.client_cert, cfg.client_key)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"client certificate {cfg.client_cert}: {getattr(exc, 'strerror', None) or exc}") \
                    from None
        return ctx

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.clear()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ proxy choice

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL a request to *url* goes through, or None for a direct connection."""
        parts = urlsplit(url)
        proxy = self.config.proxy if self.config.proxy is not None else env_proxy(parts.scheme, self._environ)
        if not proxy or no_proxy_matches(parts.hostname or "", self._no_proxy):
            return None
        if "://" not in proxy:
            proxy = "http://" + proxy  # curl's default proxy scheme
        if urlsplit(proxy).scheme not in ("http", "https"):
            raise UsageError(f"proxy {proxy}: only http:// and https:// proxies are supported")
        return proxy

    def _pool(self, proxy: str | None, url: str) -> urllib3.PoolManager:
        https = url[:8].lower() == "https://"
        with self._lock:
            pool = self._pools.get((proxy, https))
            if pool is None:
                kw = self._pool_kw
                if https:
                    if self._ssl is None:
                        self._ssl = self._ssl_context()
                    kw = {**kw, "ssl_context": self._ssl}
                if proxy is None:
                    pool = urllib3.PoolManager(num_pools=32, **kw)
                else:
                    parts = urlsplit(proxy)
                    headers = None
                    target = proxy
                    if parts.username:
                        userpass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                        headers = urllib3.make_headers(proxy_basic_auth=userpass)
                        target = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
                    pool = urllib3.ProxyManager(target, num_pools=32, proxy_headers=headers, **kw)
                self._pools[(proxy, https)] = pool
            return pool

    # ------------------------------------------------------------------ calls

    def call(self, method: str, url: str, handle: Callable[[Response], T], *, headers: Mapping[str, str] | None = None,
             body: Body = None, resource: str | None = None, deadline: float | None = None,
             idempotent: bool | None = None, follow_redirects: bool = True, cache_redirect: bool = False,
             retry_statuses: frozenset[int] = RETRY_STATUSES) -> T:
        """Send a request and give the response to *handle*, retrying as the module says.

        *handle* runs inside the attempt: it may read the body (a connection failure
        while reading is retried like one before the response) and returns what the call
        returns. The response is closed after *handle* unless *handle* returns it (then
        the caller must close it). *resource* names what is fetched in errors (default:
        the URL path).
        """
        cfg = self.config
        t_end = time.monotonic() + (cfg.deadline if deadline is None else deadline)
        method = method.upper()
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._send(method, url, headers, body, t_end, resource, follow_redirects, cache_redirect)
            except TransportError as exc:
                delay = self._retry_delay(exc, attempt, idempotent, t_end, None)
                if delay is None:
                    raise
                log.info("%s (attempt %d, retrying in %.2f s)", exc, attempt, delay)
                self._count_retry()
                time.sleep(delay)
                continue
            if resp.status in retry_statuses and (idempotent or resp.status in NOT_PROCESSED_STATUSES):
                retry_after = _retry_after(resp.header("Retry-After"))
                with resp:
                    try:
                        resp.read(64 * 1024)
                    except TransportError:
                        pass
                err = status_error(resp, resource, attempts=attempt)
                err.retryable = True
                if retry_after is not None and (retry_after > cfg.retry_after_max or
                                                time.monotonic() + retry_after > t_end):
                    raise _error(resp.url, resource, f"HTTP {resp.status} {resp.reason}, Retry-After {retry_after:g} s "
                                 "is past the deadline", RegistryError, status=resp.status) from None
                delay = self._retry_delay(err, attempt, idempotent, t_end, retry_after)
                if delay is None:
                    raise err from None
                log.info("%s (attempt %d, retrying in %.2f s)", err, attempt, delay)
                self._count_retry()
                time.sleep(delay)
                continue
            try:
                result = handle(resp)
            except TransportError as exc:
                resp.close()
                delay = self._retry_delay(exc, attempt, idempotent, t_end, None)
                if delay is None:
                    raise
                log.info("%s (attempt %d, retrying in %.2f s)", exc, attempt, delay)
                self._count_retry()
                time.sleep(delay)
                continue
            except BaseException:
                resp.close()
                raise
            if result is not resp:
                resp.close()
            return result

    def _count_retry(self) -> None:
        with self._lock:
            self.stats["retries"] += 1

    def _retry_delay(self, exc: TransportError, attempt: int, idempotent: bool, t_end: float,
                     retry_after: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None to give up now."""
        if not exc.retryable or isinstance(exc, TransportTimeout):
            return None
        if not idempotent and exc.status not in NOT_PROCESSED_STATUSES:
            return None
        if attempt > self.config.retries:
            return None
        cap = min(self.config.backoff_max, self.config.backoff * (2 ** (attempt - 1)))
        delay = self._random.uniform(0, cap)
        if retry_after is not None:
            delay = max(delay, retry_after)
        if time.monotonic() + delay >= t_end:
            return None
        return delay

    def request(self, method: str, url: str, *, max_body: int | None = 16 * 1024 * 1024,
                **kw: Any) -> Response:
        """A call whose body is read whole (at most *max_bytes*) before it returns."""
        def read_all(resp: Response) -> Response:
            resp.read(max_body)
            return resp
        resp = self.call(method, url, read_all, **kw)
        resp.close()
        return resp

    def stream(self, method: str, url: str, **kw: Any) -> Response:
        """A call that returns the open response (use it as a context manager).

        Failures while reading the body are :class:`TransportError` s the caller handles
        (for a blob: resume with a Range request).
        """
        return self.call(method, url, lambda resp: resp, **kw)

    def _send(self, method: str, url: str, headers: Mapping[str, str] | None, body: Body, t_end: float,
              resource: str | None, follow_redirects: bool, cache_redirect: bool) -> Response:
        """One attempt: the request, its redirects, and a re-resolve on a stale redirect target."""
        re_resolved = False
        while True:
            try:
                return self._send_once(method, url, headers, body, t_end, resource, follow_redirects,
                                       cache_redirect, use_cache=not re_resolved)
            except _Redirected:
                if re_resolved:
                    raise AssertionError("re-resolved twice") from None
                re_resolved = True

    def _send_once(self, method: str, url: str, headers: Mapping[str, str] | None, body: Body, t_end: float,
                   resource: str | None, follow_redirects: bool, cache_redirect: bool, *, use_cache: bool) -> Response:
        cfg = self.config
        hdrs = {"User-Agent": cfg.user_agent, "Accept-Encoding": "identity"}
        hdrs.update(headers or {})
        origin_host = _host_of(url)
        current = url
        history: list[str] = []
        if cache_redirect and use_cache:
            with self._lock:
                cached = self._redirects.get(url)
            if cached:
                current = cached
                history.append(url)
                if _host_of(cached) != origin_host:
                    hdrs = {k: v for k, v in hdrs.items() if k.lower() not in ("authorization", "cookie")}
        while True:
            remaining = t_end - time.monotonic()
            if remaining <= 0:
                raise _error(current, resource, "deadline exceeded", TransportTimeout)
            timeout = urllib3.Timeout(connect=min(cfg.connect_timeout, remaining),
                                      read=min(cfg.read_timeout, remaining))
            payload = body() if callable(body) else body
            try:
                raw = self._pool(self.proxy_for(current), current).urlopen(
                    method, current, body=payload, headers=hdrs, redirect=False, retries=False, timeout=timeout,
                    preload_content=False, decode_content=False, assert_same_host=False)
            except u3e.LocationParseError:
                raise UsageError(f"bad URL {current}") from None
            except (u3e.HTTPError, OSError) as exc:
                if history and cache_redirect:
                    with self._lock:
                        self._redirects.pop(url, None)
                if time.monotonic() >= t_end:
                    raise _error(current, resource, "deadline exceeded (" + _describe(exc) + ")",
                                 TransportTimeout) from None
                root = _root_cause(exc)
                # The one case where plain HTTP may be tried next (loopback, or tls_verify=False):
                # the server answered the TLS hello with something that is not TLS.
                not_tls = isinstance(root, ssl.SSLError) and str(root.reason).upper() in NOT_TLS_REASONS
                raise _error(current, resource, _describe(exc), TLSNotSpokenError if not_tls else TransportError,
                             retryable=_is_retryable_exc(exc)) from None
            finally:
                if hasattr(payload, "close"):
                    payload.close()  # type: ignore[union-attr]
            resp = Response(raw, current, history, t_end=t_end, read_timeout=cfg.read_timeout, resource=resource)
            log.debug("%s %s -> %d", method, current, resp.status)
            if follow_redirects and resp.status in REDIRECT_STATUSES and resp.header("Location"):
                resp.close()
                if len(history) >= MAX_REDIRECTS:
                    raise _error(url, resource, f"more than {MAX_REDIRECTS} redirects", RegistryError)
                target = urljoin(current, resp.header("Location") or "")
                if urlsplit(target).scheme not in ("http", "https"):
                    raise _error(url, resource, f"redirect to unsupported URL {target[:100]}", RegistryError)
                history.append(current)
                if resp.status == 303 and method != "HEAD":
                    method, body = "GET", None
                if _host_of(target) != origin_host:
                    hdrs = {k: v for k, v in hdrs.items() if k.lower() not in ("authorization", "cookie")}
                current = target
                continue
            if history and resp.status == 403 and use_cache:
                # A presigned storage URL that expired (or a cached one): ask the origin again, once.
                resp.close()
                with self._lock:
                    self._redirects.pop(url, None)
                log.debug("%s: HTTP 403 from redirect target %s, re-resolving", url, current)
                raise _Redirected()
            if cache_redirect and history and 200 <= resp.status < 300:
                with self._lock:
                    self._redirects[url] = current
                    self._redirects.move_to_end(url)
                    while len(self._redirects) > REDIRECT_CACHE_SIZE:
                        self._redirects.popitem(last=False)
            return resp

    # ------------------------------------------------------------------ ranges

    def get_range(self, url: str, start: int, length: int, *, headers: Mapping[str, str] | None = None,
                  resource: str | None = None, total_size: int | None = None, deadline: float | None = None,
                  cache_redirect: bool = False, check: Callable[[Response], None] | None = None) -> bytes:
        """Exactly *length* bytes at *start* of the resource at *url*, or an error.

        A 206 must carry the matching ``Content-Range`` (and total, when *total_size* is
        known) and exactly *length* bytes. A 200 (a server or proxy that ignores Range) is
        read up to the end of the wanted range and sliced; a 200 that ends early is an
        error too. *check* may inspect the response first (e.g. turn a 401 into a token
        refresh) and raise.
        """
        if length <= 0 or start < 0:
            raise ValueError(f"bad range {start}+{length}")
        end = start + length - 1
        hdrs = dict(headers or {})
        hdrs["Range"] = f"bytes={start}-{end}"
        what = resource or _path_of(url)
        label = f"{what} bytes {start}-{end}"

        def take(resp: Response) -> bytes:
            if check is not None:
                check(resp)
            if resp.status == 206:
                return self._take_partial(resp, start, end, total_size, label)
            if resp.status == 200:
                return self._take_whole(resp, start, length, total_size, label)
            if resp.status == 416:
                raise _error(resp.url, label, "HTTP 416 range not satisfiable", RemoteDataError, status=416)
            resp.read(64 * 1024)
            raise status_error(resp, label)

        return self.call("GET", url, take, headers=hdrs, resource=what, deadline=deadline,
                         cache_redirect=cache_redirect)

    @staticmethod
    def _take_partial(resp: Response, start: int, end: int, total_size: int | None, label: str) -> bytes:
        crange = resp.header("Content-Range") or ""
        m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", crange)
        if not m:
            raise _error(resp.url, label, f"206 with a bad Content-Range {crange[:80]!r}", RemoteDataError, status=206)
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if (first, last) != (start, end):
            raise _error(resp.url, label, f"206 for bytes {first}-{last} instead", RemoteDataError, status=206)
        if total_size is not None and total != "*" and int(total) != total_size:
            raise _error(resp.url, label, f"206 says the resource has {total} bytes, not {total_size}",
                         RemoteDataError, status=206)
        want = end - start + 1
        if resp.content_length is not None and resp.content_length != want:
            raise _error(resp.url, label, f"206 with Content-Length {resp.content_length}, not {want}",
                         RemoteDataError, status=206)
        data = resp.read(want)
        if len(data) != want:
            raise _error(resp.url, label, f"206 body has {len(data)} bytes, not {want}", RemoteDataError, status=206)
        return data

    @staticmethod
    def _take_whole(resp: Response, start: int, length: int, total_size: int | None, label: str) -> bytes:
        clen = resp.content_length
        if total_size is not None and clen is not None and clen != total_size:
            raise _error(resp.url, label, f"200 with Content-Length {clen}, not the {total_size} bytes expected",
                         RemoteDataError, status=200)
        if clen is not None and clen < start + length:
            raise _error(resp.url, label, f"200 with only {clen} bytes", RemoteDataError, status=200)
        log.debug("%s: 200 to a Range request, slicing the whole body", label)
        buf = bytearray()
        skipped = 0
        for data in resp.iter_content():
            if skipped < start:
                cut = min(len(data), start - skipped)
                skipped += cut
                data = data[cut:]
            if data:
                buf += data[: length - len(buf)]
            if len(buf) >= length:
                break
        if len(buf) != length:
            raise _error(resp.url, label, f"200 body ended at byte {skipped + len(buf)}", RemoteDataError,
                         status=200)
        return bytes(buf)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())
