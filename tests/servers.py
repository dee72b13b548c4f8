"""Real servers on 127.0.0.1 for the tests: registries, a token server, a fault proxy, nginx.

Every fixture here starts a real program or a real socket server on a free loopback port,
waits (bounded) until it answers, and stops it on teardown whatever the test did. They
are registered for every test module by tests/conftest.py:

``registry`` (session)
    Debian's ``docker-registry`` (distribution 2.8), plain HTTP, no auth, deletes enabled,
    filesystem storage in a temp dir. ``.host`` is ``127.0.0.1:PORT``, ``.url`` its base URL,
    ``.storage`` the storage root (tests may corrupt blobs there: ``.blob_path(digest)``).
``tls_registry`` (session)
    The same over TLS with a test CA made by the fixture (``.ca_file``) and htpasswd
    (bcrypt) Basic auth for ``.username`` / ``.password``.
``token_registry`` (session)
    The same with distribution's ``auth: token:`` config, trusting a signing cert issued by
    a test CA, in front of ``.tokens``, a :class:`TokenServer` of our own (ES256 JWTs with an
    ``x5c`` header, short lifetimes so refresh is exercised, a request log).
``fault_proxy`` (function)
    A factory: ``fault_proxy(upstream_url)`` starts a :class:`FaultProxy` (a threaded reverse
    proxy with per-request and per-connection delays, a bandwidth cap, scripted faults and
    counters of requests and bytes per path).
``nginx`` (function)
    A factory: ``nginx(root_dir, server_conf="")`` starts nginx serving *root_dir*
    (``daemon off;``, temp prefix); ``.access_log()`` parses its log.

A missing program or Python package skips the test with the reason, except under CI=true,
where it fails: CI must not pass by skipping (scripts/install --test installs them all).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def unavailable(reason: str) -> None:
    """Skip with *reason*, or fail under CI=true (where everything must be installed)."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def require_program(program: str, package: str) -> str:
    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        unavailable(f"{program} is not installed (apt-get install {package})")
    assert path is not None
    return path


def require_module(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        unavailable(f"the Python package {name} is not installed (scripts/install --test)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, *, proc: subprocess.Popen[bytes] | None = None, log_file: Path | None = None,
              ca_file: str | None = None, client_cert: tuple[Path, Path] | None = None,
              timeout: float = START_TIMEOUT) -> None:
    """Until *url* answers any HTTP status; fail at once (with the log) if *proc* exited."""
    ctx = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    if ctx and client_cert:
        ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    parts = urllib.parse.urlsplit(url)
    t_end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < t_end:
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:] if log_file and log_file.exists() else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before answering {url}:\n{tail}")
        try:
            cls = http.client.HTTPSConnection if ctx else http.client.HTTPConnection
            kw: dict[str, Any] = {"context": ctx} if ctx else {}
            conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=2, **kw)
            conn.request("GET", parts.path or "/")
            conn.getresponse().read()
            conn.close()
            return
        except (OSError, http.client.HTTPException) as exc:
            last = str(exc)
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s ({last})")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


# --------------------------------------------------------------------------- a test CA


class TestCA:
    """A CA made on the spot (EC P-256), issuing server and signing certificates."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, directory: Path, name: str = "cnpsfs test CA") -> None:
        require_module("cryptography")
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = directory / "ca.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, server: bool = True) -> tuple[Path, Path, Any, Any]:
        """(cert file, key file, cert, key) for a server on 127.0.0.1/::1/localhost, or a signing cert."""
        x509, ser = self._x509, self._ser
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        import ipaddress

        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(self._oid.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                                            critical=False)
        cert = builder.sign(self.key, self._hashes.SHA256())
        cert_file = self.directory / f"{name}.pem"
        key_file = self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(ser.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
        key_file.chmod(0o600)
        return cert_file, key_file, cert, key


# --------------------------------------------------------------------------- docker-registry


@dataclass
class RegistryServer:
    """A running ``docker-registry serve`` process."""

    host: str
    url: str
    storage: Path
    log_file: Path
    proc: subprocess.Popen[bytes]
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    tokens: TokenServer | None = None

    def blob_path(self, digest: str) -> Path:
        """Where distribution's filesystem driver keeps a blob's bytes."""
        algo, hexpart = digest.split(":", 1)
        return self.storage / "docker/registry/v2/blobs" / algo / hexpart[:2] / hexpart / "data"

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def start_registry(workdir: Path, *, auth: dict[str, Any] | None = None, tls: tuple[Path, Path] | None = None,
                   ca_file: Path | None = None, client_ca: Path | None = None,
                   client_cert: tuple[Path, Path] | None = None, **extra: Any) -> RegistryServer:
    """Start docker-registry with a temp config (JSON, which its YAML parser reads) and storage dir.

    *tls* is (certificate, key); *ca_file* the CA that signed it (for the readiness probe);
    *client_ca* makes the registry demand client certificates signed by it, and
    *client_cert* (certificate, key) is what the probe then presents.
    """
    program = require_program("docker-registry", "docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    last_error = ""
    for _ in range(3):  # the port may be taken between free_port() and the bind
        port = free_port()
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16),
                     "headers": {"X-Content-Type-Options": ["nosniff"]}},
        }
        if tls:
            config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
            if client_ca:
                config["http"]["tls"]["clientcas"] = [str(client_ca)]
        if auth:
            config["auth"] = auth
        config.update(extra)
        config_file = workdir / "config.yml"
        config_file.write_text(json.dumps(config, indent=2))
        log_file = workdir / "registry.log"
        with open(log_file, "wb") as log:
            proc = subprocess.Popen([program, "serve", str(config_file)], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        scheme = "https" if tls else "http"
        url = f"{scheme}://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/v2/", proc=proc, log_file=log_file, ca_file=str(ca_file) if ca_file else None,
                      client_cert=client_cert)
        except RuntimeError as exc:
            stop_process(proc)
            last_error = str(exc)
            if "address already in use" in last_error:
                continue
            raise
        return RegistryServer(f"127.0.0.1:{port}", url, storage, log_file, proc)
    raise RuntimeError(last_error)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A plain-HTTP, anonymous docker-registry on 127.0.0.1 (shared: use a repository name of your own)."""
    server = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """docker-registry over TLS (test CA in ``.ca_file``) with htpasswd Basic auth (``.username``/``.password``)."""
    bcrypt = require_module("bcrypt")
    workdir = tmp_path_factory.mktemp("tls-registry")
    ca = TestCA(workdir / "ca")
    cert, key, _, _ = ca.issue("registry")
    username, password = "cnpsfs", "s3cret:with-colon"
    htpasswd = workdir / "htpasswd"
    htpasswd.write_text(f"{username}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
    server = start_registry(workdir, tls=(cert, key), ca_file=ca.cert_file,
                            auth={"htpasswd": {"realm": "cnpsfs-test", "path": str(htpasswd)}})
    server.ca_file, server.username, server.password = str(ca.cert_file), username, password
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- a token server


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The Docker token protocol (GET /token?service=&scope=…), issuing ES256 JWTs distribution trusts.

    Settings tests may change (reset them after): ``lifetime`` (seconds), ``send_expires_in``
    (False: omit ``expires_in``, so clients assume 60 s), ``users`` (name → password),
    ``anonymous_pull``. ``requests`` logs (account, scopes, status) of every request.
    """

    service = "cnpsfs-test-registry"
    issuer = "cnpsfs-test-token-issuer"

    def __init__(self, workdir: Path) -> None:
        ca = TestCA(workdir / "token-ca", name="cnpsfs test token CA")
        self.root_bundle = ca.cert_file
        _, _, cert, self._key = ca.issue("token-signer", server=False)
        from cryptography.hazmat.primitives import serialization

        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.lifetime = 300
        self.send_expires_in = True
        self.users: dict[str, str] = {"alice": "wonderland"}
        self.anonymous_pull = True
        self.requests: list[tuple[str | None, list[str], int]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="token-server",
                                        daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.lifetime, self.send_expires_in, self.anonymous_pull = 300, True, True
            self.users = {"alice": "wonderland"}
            self.requests.clear()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        header = {"typ": "JWT", "alg": "ES256", "x5c": self._x5c}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.path).query)
        scopes = query.get("scope", [])
        account: str | None = None
        header = req.headers.get("Authorization", "")
        status = 200
        if header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                user, password = "", ""
            if self.users.get(user) != password or not user:
                status = 401
            account = user
        elif not self.anonymous_pull:
            status = 401
        with self._lock:
            self.requests.append((account, scopes, status))
        if status != 200:
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}).encode()
            req.send_response(401)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
            return
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            granted = wanted if account else [a for a in wanted if a == "pull"]
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": account or "", "aud": query.get("service", [""])[0],
                  "exp": now + self.lifetime, "nbf": now - 1, "iat": now, "jti": secrets.token_hex(8),
                  "access": access}
        token = self._sign(claims)
        doc: dict[str, Any] = {"token": token, "access_token": token,
                               "issued_at": datetime.datetime.now(datetime.UTC).isoformat()}
        if self.send_expires_in:
            doc["expires_in"] = self.lifetime
        body = json.dumps(doc).encode()
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """docker-registry (plain HTTP on loopback) with token auth from ``.tokens``, a :class:`TokenServer`."""
    workdir = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(workdir)
    try:
        server = start_registry(workdir, auth={"token": {
            "realm": tokens.url, "service": tokens.service, "issuer": tokens.issuer,
            "rootcertbundle": str(tokens.root_bundle)}})
    except BaseException:
        tokens.close()
        raise
    server.tokens = tokens
    try:
        yield server
    finally:
        server.stop()
        tokens.close()


# --------------------------------------------------------------------------- the fault-injecting proxy


HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade"}


@dataclass
class Fault:
    """One scripted fault: *action* on requests whose path matches *path* (and *method*), *times* times.

    Actions: ``status`` (answer *status* with *headers*, no upstream call), ``stall`` (say
    nothing for *seconds*), ``reset`` (TCP RST), ``drop_auth`` (forward without
    Authorization: the upstream's own 401), ``ignore_range`` (forward without Range: a 200),
    ``truncate`` (forward, send *at* body bytes, close), ``short`` (forward with the body cut
    to *at* bytes and Content-Length to match), ``flip`` (forward, one byte at *at* inverted),
    ``stall_body`` (send headers and *at* bytes, then stall), ``trickle`` (send the body one
    byte every *seconds*).
    """

    action: str
    path: str = ".*"
    method: str | None = None
    times: int | None = 1
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 30.0
    at: int | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method and self.method.upper() != method:
            return False
        return re.search(self.path, path) is not None



class ListeningServer(ThreadingHTTPServer):
    """A threaded server with a listen backlog of a real server's size: the standard 5 drops
    the SYNs of a client opening a dozen connections at once, which then wait 1 s to retry."""

    request_queue_size = 128


class FaultProxy:
    """A threaded HTTP reverse proxy on 127.0.0.1 in front of *upstream* (``http://HOST:PORT``).

    ``request_delay`` / ``connection_delay`` (seconds) simulate RTT (this kernel has no
    netem); ``bandwidth`` (bytes/s, shared by all connections) caps throughput. Faults are
    added with :meth:`add`. ``requests[(METHOD, PATH)]`` and ``bytes_sent[PATH]`` count what
    was served; ``log`` lists (method, path, status, range) per request, ``spans`` when each
    began and ended (:meth:`rounds` counts the round trips in turn); ``connections`` counts
    TCP connections and ``max_in_flight`` the most requests served at once. :meth:`presign`
    turns blob GETs into 307 redirects to fake presigned storage URLs on ``localhost``.
    """

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http":
            raise ValueError("the fault proxy forwards to plain-HTTP upstreams")
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.request_delay = 0.0
        self.connection_delay = 0.0
        self.bandwidth: float | None = None
        self.faults: list[Fault] = []
        self.requests: Counter[tuple[str, str]] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.log: list[tuple[str, str, int, str | None]] = []
        #: (start, end, method, path, range) of every request served, in the order they ended.
        self.spans: list[tuple[float, float, str, str, str | None]] = []
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth_leaks = 0
        self.proxy_authorizations: list[str] = []
        self._presign: str | None = None
        self._presign_generation = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._next_free = 0.0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # As nginx and the registry do (Go sets it on every connection): without it a
                # response's body waits behind its headers for the client's delayed ACK
                # (Nagle), up to 40 ms per small response, which a real network does not add.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with proxy._lock:
                    proxy.connections += 1
                if proxy.connection_delay:
                    time.sleep(proxy.connection_delay)

            def do_GET(self) -> None:
                start = time.monotonic()
                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    proxy._handle(self)
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1
                        proxy.spans.append((start, time.monotonic(), self.command,
                                            urllib.parse.urlsplit(self.path).path, self.headers.get("Range")))

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self._httpd = ListeningServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fault-proxy", daemon=True)
        self._thread.start()

    # -- control

    def rounds(self) -> int:
        """Round trips one after the other among the requests served (:attr:`spans`): a
        request's round is one more than that of the latest-rounded request that had ended
        before it began. What a client's request count alone does not show: which requests
        waited for others. Load-independent as long as requests issued together overlap."""
        with self._lock:
            spans = sorted(self.spans)
        depth: list[int] = []
        for start, _end, *_rest in spans:
            depth.append(1 + max((d for (_s, e, *_r), d in zip(spans, depth, strict=False) if e <= start), default=0))
        return max(depth, default=0)

    def add(self, action: str, **kw: Any) -> Fault:
        fault = Fault(action, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.spans.clear()
            self.requests.clear()
            self.bytes_sent.clear()
            self.log.clear()
            self.max_in_flight = self.in_flight

    def presign(self, path: str = r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$") -> None:
        """Answer GETs of matching paths with a 307 to ``http://localhost:PORT/_storage/GEN/PATH``."""
        self._presign = path

    def expire_presigned(self) -> None:
        """Presigned URLs handed out so far answer 403 from now on."""
        with self._lock:
            self._presign_generation += 1

    def count(self, method: str, pattern: str) -> int:
        with self._lock:
            return sum(n for (m, p), n in self.requests.items() if m == method and re.search(pattern, p))

    def close(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- serving

    def _throttle(self, n: int) -> None:
        if not self.bandwidth:
            return
        with self._lock:
            start = max(time.monotonic(), self._next_free)
            self._next_free = start + n / self.bandwidth
            wake = self._next_free
        delay = wake - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _send(self, req: BaseHTTPRequestHandler, path: str, data: bytes) -> None:
        for i in range(0, len(data), 65536):
            piece = data[i:i + 65536]
            self._throttle(len(piece))
            req.wfile.write(piece)
            with self._lock:
                self.bytes_sent[path] += len(piece)
        req.wfile.flush()

    def _reply(self, req: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if req.command != "HEAD":
            self._send(req, urllib.parse.urlsplit(req.path).path, body)

    def _reset(self, req: BaseHTTPRequestHandler) -> None:
        req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        req.close_connection = True
        with contextlib.suppress(OSError):
            req.connection.close()

    def _read_body(self, req: BaseHTTPRequestHandler) -> bytes:
        if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(req.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while req.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(req.rfile.read(size))
                req.rfile.readline()
            return b"".join(parts)
        length = int(req.headers.get("Content-Length") or 0)
        return req.rfile.read(length) if length else b""

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        method = req.command
        path = urllib.parse.urlsplit(req.path).path
        body = self._read_body(req)
        with self._lock:
            self.requests[(method, path)] += 1
            if "Proxy-Authorization" in req.headers:
                self.proxy_authorizations.append(req.headers["Proxy-Authorization"])
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault:
                fault.hits += 1
            generation = self._presign_generation
        if self.request_delay:
            time.sleep(self.request_delay)
        headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP_BY_HOP}
        target = req.path
        storage = re.match(r"^/_storage/(\d+)(/.*)$", path)
        if storage:
            if "Authorization" in req.headers:
                with self._lock:
                    self.auth_leaks += 1
                return self._finish(req, method, path, 400, None, lambda: self._reply(
                    req, 400, {"Content-Type": "text/plain"}, b"storage: unexpected Authorization header\n"))
            if int(storage.group(1)) < generation:
                return self._finish(req, method, path, 403, None, lambda: self._reply(
                    req, 403, {"Content-Type": "application/xml"}, b"<Error><Code>AccessDenied</Code></Error>"))
            target = storage.group(2)
        elif self._presign and method == "GET" and re.search(self._presign, path):
            location = f"http://localhost:{self.port}/_storage/{generation}{path}"
            return self._finish(req, method, path, 307, None,
                                lambda: self._reply(req, 307, {"Location": location}))
        if fault:
            if fault.action == "status":
                return self._finish(req, method, path, fault.status, fault, lambda: self._reply(
                    req, fault.status, {"Content-Type": "application/json", **fault.headers},
                    json.dumps({"errors": [{"code": "FAULT", "message": f"injected {fault.status}"}]}).encode()))
            if fault.action == "stall":
                self._log(method, path, 0, req)
                self._stopping.wait(fault.seconds)
                req.close_connection = True
                return None
            if fault.action == "reset":
                self._log(method, path, 0, req)
                return self._reset(req)
            if fault.action == "drop_auth":
                headers.pop("Authorization", None)
            if fault.action == "ignore_range":
                headers.pop("Range", None)
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(method, target, body=body if body or method in ("POST", "PUT", "PATCH") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out_headers = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}}
            length = resp.getheader("Content-Length")
            status = resp.status
        finally:
            conn.close()
        if method == "HEAD":
            self._log(method, path, status, req)
            req.send_response(status)
            for k, v in out_headers.items():
                req.send_header(k, v)
            if length is not None:
                req.send_header("Content-Length", length)
            req.end_headers()
            return None
        action = fault.action if fault else ""
        at = fault.at if fault and fault.at is not None else len(data) // 2
        if action == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
        if action == "short":
            data = data[:at]
        self._log(method, path, status, req)
        req.send_response(status)
        for k, v in out_headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if action == "trickle":
            for i in range(len(data)):
                if self._stopping.wait(fault.seconds if fault else 0.1):
                    break
                try:
                    self._send(req, path, data[i:i + 1])
                except OSError:
                    break
            req.close_connection = True
            return None
        if action in ("truncate", "stall_body"):
            self._send(req, path, data[:at])
            if action == "stall_body":
                self._stopping.wait(fault.seconds if fault else 30)
            req.close_connection = True
            with contextlib.suppress(OSError):
                req.connection.shutdown(socket.SHUT_RDWR)
            return None
        self._send(req, path, data)
        return None

    def _log(self, method: str, path: str, status: int, req: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.log.append((method, path, status, req.headers.get("Range")))

    def _finish(self, req: BaseHTTPRequestHandler, method: str, path: str, status: int, fault: Fault | None,
                send: Callable[[], None]) -> None:
        self._log(method, path, status, req)
        send()


@pytest.fixture
def fault_proxy() -> Iterator[Callable[[str], FaultProxy]]:
    """``fault_proxy(upstream_url)`` → a running :class:`FaultProxy`; all are closed after the test."""
    proxies: list[FaultProxy] = []

    def make(upstream: str) -> FaultProxy:
        proxy = FaultProxy(upstream)
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


# --------------------------------------------------------------------------- nginx


@dataclass
class NginxServer:
    url: str
    host: str
    root: Path
    prefix: Path
    proc: subprocess.Popen[bytes]

    def access_log(self) -> list[dict[str, str]]:
        """One dict per request: method, uri, status, bytes, range (as nginx logged them)."""
        path = self.prefix / "access.log"
        rows = []
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            m = re.match(r'(\S+) (\S+) (\d+) (\d+) "([^"]*)"', line)
            if m:
                rows.append(dict(zip(("method", "uri", "status", "bytes", "range"), m.groups(), strict=True)))
        return rows

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop_process(self.proc)


def start_nginx(root: Path, prefix: Path, *, server_conf: str = "", http_conf: str = "") -> NginxServer:
    """nginx in the foreground (``daemon off;``) serving *root* on a free 127.0.0.1 port, state in *prefix*."""
    program = require_program("nginx", "nginx-light")
    prefix.mkdir(parents=True, exist_ok=True)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    # As root the workers would run as nobody, who cannot read pytest's 0700 temp dirs.
    user = "user root root;" if os.geteuid() == 0 else ""
    last = ""
    for _ in range(3):
        port = free_port()
        conf = f"""
daemon off;
master_process on;
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format cnpsfs '$request_method $uri $status $body_bytes_sent "$http_range"';
    access_log {prefix}/access.log cnpsfs;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 30;
    {http_conf}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {server_conf}
    }}
}}
"""
        conf_file = prefix / "nginx.conf"
        conf_file.write_text(conf)
        log_file = prefix / "stderr.log"
        with open(log_file, "wb") as log:
            proc = subprocess.Popen([program, "-p", str(prefix), "-c", str(conf_file), "-e", str(prefix / "error.log")],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/", proc=proc, log_file=prefix / "error.log")
        except RuntimeError as exc:
            stop_process(proc)
            last = str(exc)
            if "Address already in use" in last or "address already in use" in last:
                continue
            raise
        return NginxServer(url, f"127.0.0.1:{port}", root, prefix, proc)
    raise RuntimeError(last)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., NginxServer]]:
    """``nginx(root_dir, server_conf="", http_conf="")`` → a running :class:`NginxServer`, stopped after the test."""
    servers: list[NginxServer] = []

    def make(root: Path, **kw: Any) -> NginxServer:
        server = start_nginx(Path(root), tmp_path / f"nginx{len(servers)}", **kw)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- a registry with the referrers API


class ReferrersRegistry:
    """A loopback proxy in front of docker-registry that adds the referrers API: a manifest
    PUT with a ``subject`` is recorded and answered with ``OCI-Subject``, and ``GET
    /v2/<name>/referrers/<digest>`` lists what was recorded (the registry stores the rest)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.referrers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.listed = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self)

            do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.urlsplit(req.path).path
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        match = re.fullmatch(r"/v2/(.+)/referrers/(sha256:[0-9a-f]{64})", path)
        if req.command == "GET" and match:
            self.listed += 1
            data = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                               "manifests": self.referrers.get((match[1], match[2]), [])}).encode()
            return self._reply(req, 200, {"Content-Type": "application/vnd.oci.image.index.v1+json"}, data)
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("connection", "content-length")}
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            conn.request(req.command, req.path, body=body if req.command in ("PUT", "POST", "PATCH") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in ("connection", "content-length",
                                                                           "transfer-encoding")}
        finally:
            conn.close()
        manifest = re.fullmatch(r"/v2/(.+)/manifests/.+", path)
        if req.command == "PUT" and manifest and resp.status == 201:
            doc = json.loads(body)
            if isinstance(doc.get("subject"), dict):
                entry = {"mediaType": doc["mediaType"], "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                         "size": len(body), "artifactType": doc.get("artifactType")}
                self.referrers.setdefault((manifest[1], doc["subject"]["digest"]), []).append(entry)
                out["OCI-Subject"] = doc["subject"]["digest"]
        if req.command == "HEAD":
            req.send_response(resp.status)
            for k, v in out.items():
                req.send_header(k, v)
            req.send_header("Content-Length", resp.getheader("Content-Length") or "0")
            req.end_headers()
            return None
        return self._reply(req, resp.status, out, data)

    @staticmethod
    def _reply(req: BaseHTTPRequestHandler, status: int, headers: dict[str, str], data: bytes) -> None:
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def referrers_registry(registry: Any) -> Iterator[ReferrersRegistry]:
    proxy = ReferrersRegistry(registry.host)
    try:
        yield proxy
    finally:
        proxy.close()
