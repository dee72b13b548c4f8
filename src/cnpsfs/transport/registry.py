"""An OCI distribution-spec client for one repository of one registry.

What it does (the OCI distribution spec v1.1, and how real registries bend it):

- ping ``/v2/``: learns the auth scheme; over https, or plain http only for loopback
  hosts (127.0.0.0/8, ::1, localhost) and with ``tls_verify=False``, where it falls back
  to http when the server does not speak TLS (never when a certificate fails to verify);
  on loopback hosts plain http is tried first, and https when the server answers it with
  a 400 (a TLS server's answer to plain HTTP) or not at all;
- auth: none, Basic, or the Bearer token flow (``WWW-Authenticate: Bearer realm=,
  service=, scope=``), anonymous or with Basic credentials at the realm; tokens cached
  per scope set and refreshed shortly before ``expires_in`` (missing: 60 s) runs out; a
  401 with a token gets one retry with a fresh token (scopes from the challenge added);
- manifests by tag or digest with Accept for OCI and Docker schema 2 manifests and
  indexes; a manifest fetched by digest is verified, one fetched by tag gets its digest
  computed from the bytes (a registry's Docker-Content-Digest header is not trusted);
- blobs streamed with the digest checked while streaming (a mismatch names the blob), a
  transfer broken mid-way resumed with a Range request, ranged reads (``read_blob``) with
  the redirect to storage cached per blob, HEAD for existence, ``has_blobs`` in parallel;
- uploads: POST then PUT (monolithic), PATCH chunks for large blobs, cross-repository
  mount (``?mount=&from=``, a 202 answer continues as a normal upload), retried whole on
  transient failures; PUT manifest; tags list with ``Link`` pagination;
- referrers: ``GET /v2/<name>/referrers/<digest>``, and on 404 the tag schema fallback
  (an index tagged ``sha256-<hex>``), which :meth:`RegistryClient.put_manifest` also keeps
  up to date when the registry does not process ``subject`` itself.

All methods are blocking and thread-safe; batch helpers run at most ``max_parallel``
requests at once. Errors are :mod:`cnpsfs.errors` types, one line naming the registry
and the manifest or blob.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import quote, urlencode, urljoin, urlsplit

from cnpsfs.errors import (
    AuthError,
    RegistryError,
    RemoteDataError,
    RemoteNotFoundError,
    TransportError,
    TransportTimeout,
    UsageError,
)
from cnpsfs.transport.auth import Credentials
from cnpsfs.transport.http import Response, Session, TLSNotSpokenError, status_error, summarize_body
from cnpsfs.transport.reference import ImageReference, check_digest, is_digest

log = logging.getLogger(__name__)

T = TypeVar("T")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
#: containers/image refuses manifests above 4 MiB; so do we (and registries do too).
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
#: Blobs up to this size are PUT in one request; larger ones go in PATCH chunks of CHUNK_SIZE.
MONOLITHIC_MAX = 32 * 1024 * 1024
CHUNK_SIZE = 16 * 1024 * 1024
#: A blob transfer's deadline is the session's deadline plus its size at this rate.
MIN_BLOB_RATE = 1024 * 1024
TOKEN_DEFAULT_LIFETIME = 60.0


@dataclass(frozen=True)
class Manifest:
    """A manifest's exact bytes, its media type and its digest."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.data)
        if not isinstance(doc, dict):
            raise ValueError("manifest is not a JSON object")
        return doc

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES


@dataclass(frozen=True)
class Descriptor:
    """What a HEAD tells about a manifest or blob."""

    digest: str
    size: int
    media_type: str = ""


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: where plain HTTP is allowed without ``tls_verify=False``."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate`` → (scheme in lower case, params). With several challenges, Bearer wins."""
    challenges: list[tuple[str, dict[str, str]]] = []
    token = re.compile(r"[\s,]*([A-Za-z0-9!#$%&'*+.^_`|~-]+)")
    value = re.compile(r'\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)')
    pos = 0
    while m := token.match(header, pos):
        name, pos = m.group(1), m.end()
        v = value.match(header, pos)
        if v and challenges:
            text = v.group(1)
            if text.startswith('"'):
                text = re.sub(r"\\(.)", r"\1", text[1:-1])
            challenges[-1][1][name.lower()] = text
            pos = v.end()
        elif v:  # a parameter before any scheme: not a challenge
            pos = v.end()
        else:
            challenges.append((name.lower(), {}))
    for scheme, params in challenges:
        if scheme == "bearer":
            return scheme, params
    return challenges[0] if challenges else ("", {})


class _Unauthorized(Exception):
    """Internal: a 401 the caller may answer with a fresh token."""

    def __init__(self, challenge: str) -> None:
        super().__init__(challenge)
        self.challenge = challenge


@dataclass
class _Token:
    value: str
    expires_at: float  # time.monotonic()


class _FileSlice:
    """A file-like view of bytes [start, start+length) of a file, for request bodies."""

    def __init__(self, path: Path, start: int, length: int) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by the session after sending
        self._f.seek(start)
        self._left = length

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


BlobSource = bytes | Path
"""What :meth:`RegistryClient.push_blob` uploads: bytes, or a file read afresh on each attempt."""


class RegistryClient:
    """One repository of one registry. Blocking, thread-safe.

    *session* carries timeouts, retries, proxies and TLS trust (``tls_verify=False`` in
    its config is skopeo's ``--tls-verify=false``); share one between the clients of a
    registry. *scheme* forces ``https`` or ``http`` (None: decide at the first request,
    module doc). *credentials* from :func:`cnpsfs.transport.auth.lookup_credentials`.
    """

    def __init__(self, registry: str, repository: str, *, session: Session | None = None,
                 credentials: Credentials | None = None, scheme: str | None = None, max_parallel: int = 8) -> None:
        self.registry = registry
        self.repository = repository
        self.endpoint = ImageReference(registry, repository).endpoint
        self.session = session or Session()
        self._own_session = session is None
        self.credentials = credentials
        self.max_parallel = max(1, max_parallel)
        #: Uploads above this size go in PATCH chunks of ``chunk_size``.
        self.monolithic_max = MONOLITHIC_MAX
        self.chunk_size = CHUNK_SIZE
        host = urlsplit(f"//{self.endpoint}").hostname or self.endpoint
        self._loopback = is_loopback(host)
        self._plain_allowed = self._loopback or not self.session.config.tls_verify
        if scheme not in (None, "http", "https"):
            raise UsageError(f"unknown scheme {scheme!r} for {registry}")
        if scheme == "http" and not self._plain_allowed:
            raise UsageError(f"{registry}: plain HTTP is only allowed for loopback hosts or with --tls-verify=false")
        self._scheme = scheme
        self._lock = threading.Lock()
        self._token_lock = threading.Lock()
        self._pinged = False
        self._auth_scheme = ""  # "", "basic" or "bearer"
        self._bearer: dict[str, str] = {}
        self._tokens: dict[frozenset[str], _Token] = {}
        self._extra_scopes: dict[frozenset[str], frozenset[str]] = {}
        self.stats = {"token_requests": 0}

    @classmethod
    def for_reference(cls, ref: ImageReference, **kw: Any) -> RegistryClient:
        return cls(ref.registry, ref.repository, **kw)

    def for_repository(self, repository: str) -> RegistryClient:
        """A client for another repository of the same registry, sharing the session and credentials."""
        other = RegistryClient(self.registry, repository, session=self.session, credentials=self.credentials,
                               scheme=self._scheme, max_parallel=self.max_parallel)
        other.monolithic_max, other.chunk_size = self.monolithic_max, self.chunk_size
        return other

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ URLs and scopes

    @property
    def base_url(self) -> str:
        self.ping()
        return f"{self._scheme}://{self.endpoint}"

    def _url(self, tail: str, query: Mapping[str, str] | None = None) -> str:
        url = f"{self.base_url}/v2/{self.repository}/{tail}"
        return url + ("?" + urlencode(query) if query else "")

    def _scope(self, push: bool = False) -> frozenset[str]:
        return frozenset({f"repository:{self.repository}:{'pull,push' if push else 'pull'}"})

    def _what(self, kind: str, ref: str) -> str:
        return f"{kind} {ref} of {self.repository}"

    def _err(self, cls: type[TransportError], resource: str, problem: str, status: int | None = None) -> TransportError:
        return cls(f"{self.registry}: {resource}: {problem}", host=self.registry, resource=resource, status=status)

    # ------------------------------------------------------------------ ping and auth

    def ping(self) -> None:
        """GET /v2/ once: choose the scheme and learn the auth scheme."""
        if self._pinged:
            return
        with self._lock:
            if self._pinged:
                return
            schemes = [self._scheme] if self._scheme else self._schemes_to_try()
            last: TransportError | None = None
            for scheme in schemes:
                url = f"{scheme}://{self.endpoint}/v2/"
                try:
                    resp = self.session.request("GET", url, max_body=1024 * 1024, resource="/v2/")
                except TransportError as exc:
                    if scheme == "https" and isinstance(exc, TLSNotSpokenError) and last is not None:
                        raise last from None  # plain HTTP after all: what it answered is the error
                    last = exc
                    if scheme == schemes[-1] or isinstance(exc, TransportTimeout) or (
                            scheme == "https" and not isinstance(exc, TLSNotSpokenError)):
                        raise
                    log.debug("%s: %s; trying %s", self.registry, exc, schemes[-1])
                    continue
                if scheme == "http" and resp.status == 400 and scheme != schemes[-1]:
                    # What a TLS server (Go's, nginx) answers a plain request: try https.
                    last = status_error(resp, "/v2/")
                    log.debug("%s: plain http answered 400; trying https", self.registry)
                    continue
                if resp.status == 401:
                    header = resp.header("WWW-Authenticate") or ""
                    self._auth_scheme, params = parse_challenge(header)
                    if self._auth_scheme == "bearer":
                        if not params.get("realm"):
                            raise self._err(RegistryError, "/v2/", "Bearer challenge without a realm")
                        self._bearer = params
                    elif self._auth_scheme != "basic":
                        raise self._err(AuthError, "/v2/", f"unsupported authentication {header[:80]!r}", 401)
                elif resp.status not in (200, 204):
                    raise status_error(resp, "/v2/")
                self._scheme = scheme
                self._pinged = True
                log.debug("%s: %s, auth %s", self.registry, scheme, self._auth_scheme or "none")
                return
            assert last is not None
            raise last

    def _schemes_to_try(self) -> list[str]:
        """The ping's order: https, then http where plain HTTP is allowed and TLS is not spoken;
        on loopback hosts plain http first (a local registry mostly speaks it, and a TLS
        server answers it with a 400, after which https is tried), which saves building a
        TLS context and an attempt on the path of every lazy mount from a local registry."""
        if not self._plain_allowed:
            return ["https"]
        return ["http", "https"] if self._loopback else ["https", "http"]

    def _basic(self) -> str:
        assert self.credentials is not None
        userpass = f"{self.credentials.username}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(userpass).decode()

    def _no_credentials_hint(self) -> str:
        if self.credentials is None:
            return f"no credentials found for {self.registry}/{self.repository} (use --creds or --authfile)"
        return f"credentials {self.credentials} rejected"

    def _authorization(self, scopes: frozenset[str], resource: str, *, fresh: bool) -> str | None:
        if self._auth_scheme == "basic":
            return self._basic() if self.credentials else None
        if self._auth_scheme != "bearer":
            return None
        scopes = scopes | self._extra_scopes.get(scopes, frozenset())
        with self._token_lock:
            token = self._tokens.get(scopes)
            if token is not None and not fresh and time.monotonic() < token.expires_at:
                return f"Bearer {token.value}"
            token = self._fetch_token(scopes, resource)
            self._tokens[scopes] = token
            return f"Bearer {token.value}"

    def _fetch_token(self, scopes: frozenset[str], resource: str) -> _Token:
        realm = self._bearer["realm"]
        query: list[tuple[str, str]] = []
        if self._bearer.get("service"):
            query.append(("service", self._bearer["service"]))
        query += [("scope", s) for s in sorted(scopes)]
        headers = {"Accept": "application/json"}
        if self.credentials:
            query.append(("account", self.credentials.username))
            headers["Authorization"] = self._basic()
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        started = time.monotonic()
        self.stats["token_requests"] += 1
        try:
            resp = self.session.request("GET", url, headers=headers, max_body=1024 * 1024,
                                        resource=f"token for {resource}")
        except TransportError as exc:
            raise self._err(AuthError, resource, f"token server {urlsplit(realm).netloc}: {exc}") from None
        if resp.status in (401, 403):
            raise self._err(AuthError, resource, f"token server {urlsplit(realm).netloc} answered {resp.status}: "
                            f"{self._no_credentials_hint()}", resp.status)
        if resp.status != 200:
            raise self._err(AuthError, resource, f"token server {urlsplit(realm).netloc} answered HTTP "
                            f"{resp.status} ({summarize_body(resp.content)})", resp.status)
        try:
            doc = json.loads(resp.content)
            value = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or TOKEN_DEFAULT_LIFETIME)
        except (ValueError, TypeError, AttributeError, RecursionError):
            value, lifetime = None, 0.0
        if not isinstance(value, str) or not value:
            raise self._err(AuthError, resource, f"token server {urlsplit(realm).netloc} sent no token")
        # Refresh a little before the end: 10 % of the lifetime, at most 30 s.
        margin = min(30.0, lifetime * 0.1)
        log.debug("%s: token for %s, %g s", self.registry, " ".join(sorted(scopes)), lifetime)
        return _Token(value, started + lifetime - margin)

    def _on_unauthorized(self, challenge: str, scopes: frozenset[str], resource: str) -> None:
        """A 401 though we sent what we had: learn from the challenge, or give up."""
        scheme, params = parse_challenge(challenge)
        if scheme == "bearer":
            if not params.get("realm"):
                raise self._err(AuthError, resource, "Bearer challenge without a realm", 401)
            self._auth_scheme, self._bearer = "bearer", {**self._bearer, **params}
            wanted = frozenset(params.get("scope", "").split()) - scopes
            if wanted:
                self._extra_scopes[scopes] = self._extra_scopes.get(scopes, frozenset()) | wanted
            return
        if scheme == "basic" and self._auth_scheme != "basic":
            self._auth_scheme = "basic"
            if self.credentials:
                return
        raise self._err(AuthError, resource, f"authentication failed (HTTP 401): {self._no_credentials_hint()}", 401)

    def _with_auth(self, send: Callable[[dict[str, str], Callable[[Response], None]], T], scopes: frozenset[str],
                   resource: str) -> T:
        """Run *send* with auth headers; on a 401 refresh the token (or learn the scheme) and run it once more."""
        self.ping()
        for attempt in (1, 2):
            headers: dict[str, str] = {}
            auth = self._authorization(scopes, resource, fresh=attempt == 2)
            if auth:
                headers["Authorization"] = auth

            def check(resp: Response, attempt: int = attempt) -> None:
                if resp.status != 401:
                    return
                challenge = resp.header("WWW-Authenticate") or ""
                if attempt == 1:
                    raise _Unauthorized(challenge)
                raise self._err(AuthError, resource, f"authentication failed (HTTP 401): {self._no_credentials_hint()}",
                                401)

            try:
                return send(headers, check)
            except _Unauthorized as exc:
                log.debug("%s: 401 for %s, refreshing credentials", self.registry, resource)
                self._on_unauthorized(exc.challenge, scopes, resource)
        raise AssertionError("unreachable")

    def _call(self, method: str, url: str, handle: Callable[[Response], T], *, resource: str, push: bool = False,
              scopes: frozenset[str] | None = None, headers: Mapping[str, str] | None = None, **kw: Any) -> T:
        scopes = scopes or self._scope(push)

        def send(auth: dict[str, str], check: Callable[[Response], None]) -> T:
            def handle_checked(resp: Response) -> T:
                check(resp)
                return handle(resp)
            return self.session.call(method, url, handle_checked, headers={**(headers or {}), **auth},
                                     resource=resource, **kw)

        return self._with_auth(send, scopes, resource)

    def _request(self, method: str, url: str, *, resource: str, max_body: int | None = 1024 * 1024,
                 **kw: Any) -> Response:
        def read(resp: Response) -> Response:
            resp.read(max_body if resp.status < 300 else 1024 * 1024)
            return resp

        resp = self._call(method, url, read, resource=resource, **kw)
        resp.close()
        return resp

    # ------------------------------------------------------------------ manifests

    def get_manifest(self, reference: str, *, accept: Iterable[str] = MANIFEST_MEDIA_TYPES) -> Manifest:
        """The manifest tagged or with digest *reference*; verified when it is a digest."""
        what = self._what("manifest", reference)
        if is_digest(reference):
            check_digest(reference)
        resp = self._request("GET", self._url(f"manifests/{reference}"), resource=what, max_body=MAX_MANIFEST_SIZE,
                             headers={"Accept": ", ".join(accept)})
        if resp.status != 200:
            raise status_error(resp, what)
        data = resp.content
        if is_digest(reference):
            algo = reference.split(":", 1)[0]
            got = digest_of(data, algo)
            if got != reference:
                raise self._err(RemoteDataError, what, f"content does not match its digest (got {got})")
            digest = reference
        else:
            digest = digest_of(data)
            header = resp.header("Docker-Content-Digest")
            if header and header != digest and header.startswith("sha256:"):
                log.debug("%s: %s: Docker-Content-Digest %s differs from the body's %s", self.registry, what,
                          header, digest)
        media_type = (resp.header("Content-Type") or "").split(";")[0].strip()
        if media_type not in MANIFEST_MEDIA_TYPES:
            try:
                embedded = json.loads(data).get("mediaType")
            except (ValueError, AttributeError, RecursionError):
                embedded = None
            if isinstance(embedded, str) and embedded:
                media_type = embedded
        return Manifest(data, media_type, digest)

    def head_manifest(self, reference: str, *, accept: Iterable[str] = MANIFEST_MEDIA_TYPES) -> Descriptor | None:
        """Digest, size and media type of a manifest, or None if it does not exist."""
        what = self._what("manifest", reference)
        resp = self._request("HEAD", self._url(f"manifests/{reference}"), resource=what,
                             headers={"Accept": ", ".join(accept)})
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise status_error(resp, what)
        digest = resp.header("Docker-Content-Digest")
        if not digest:
            m = self.get_manifest(reference, accept=accept)
            return Descriptor(m.digest, len(m.data), m.media_type)
        return Descriptor(digest, resp.content_length or 0, (resp.header("Content-Type") or "").split(";")[0].strip())

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> str:
        """Store a manifest under a tag (or its digest); returns its digest.

        Push the blobs it names first (the registry checks them). A manifest with a
        ``subject`` is also added to the subject's referrers fallback index unless the
        registry answers ``OCI-Subject`` (it maintains referrers itself).
        """
        if len(data) > MAX_MANIFEST_SIZE:
            raise UsageError(f"manifest for {reference} is {len(data)} bytes, more than {MAX_MANIFEST_SIZE}")
        digest = digest_of(data)
        if is_digest(reference) and reference != digest:
            raise UsageError(f"manifest bytes have digest {digest}, not {reference}")
        what = self._what("manifest", reference)
        resp = self._request("PUT", self._url(f"manifests/{reference}"), resource=what, push=True,
                             headers={"Content-Type": media_type}, body=data)
        if resp.status not in (200, 201, 202):
            raise status_error(resp, what)
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            doc = {}
        subject = doc.get("subject") if isinstance(doc, dict) else None
        if isinstance(subject, dict) and isinstance(subject.get("digest"), str) and not resp.header("OCI-Subject"):
            self._add_referrer_fallback(subject["digest"], doc, digest, media_type, len(data))
        return digest

    def delete_manifest(self, digest: str) -> None:
        what = self._what("manifest", digest)
        resp = self._request("DELETE", self._url(f"manifests/{check_digest(digest)}"), resource=what, push=True,
                             scopes=frozenset({f"repository:{self.repository}:delete"}) | self._scope(True))
        if resp.status not in (200, 202):
            raise status_error(resp, what)

    def list_tags(self, *, page_size: int = 1000) -> list[str]:
        """Every tag of the repository, following ``Link: <…>; rel="next"`` pages."""
        what = f"tags of {self.repository}"
        url: str | None = self._url("tags/list", {"n": str(page_size)})
        tags: list[str] = []
        pages = 0
        while url:
            pages += 1
            if pages > 10_000:
                raise self._err(RegistryError, what, "more than 10000 pages of tags")
            resp = self._request("GET", url, resource=what, max_body=16 * 1024 * 1024)
            if resp.status != 200:
                raise status_error(resp, what)
            try:
                page = json.loads(resp.content).get("tags") or []
            except (ValueError, AttributeError, RecursionError):
                raise self._err(RegistryError, what, "tags list is not JSON") from None
            if not isinstance(page, list):
                raise self._err(RegistryError, what, "tags list has no list of tags")
            tags += [t for t in page if isinstance(t, str)]
            link = resp.header("Link") or ""
            m = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', link)
            url = urljoin(url, m.group(1)) if m else None
        return tags

    # ------------------------------------------------------------------ referrers

    def referrers(self, digest: str, *, artifact_type: str | None = None) -> list[dict[str, Any]]:
        """Descriptors of the manifests whose ``subject`` is *digest* (referrers API, else the tag fallback)."""
        check_digest(digest)
        what = self._what("referrers", digest)
        query = {"artifactType": artifact_type} if artifact_type else None
        resp = self._request("GET", self._url(f"referrers/{digest}", query), resource=what,
                             max_body=MAX_MANIFEST_SIZE, headers={"Accept": OCI_INDEX})
        filtered = False
        if resp.status == 200 and (resp.header("Content-Type") or "").split(";")[0].strip() == OCI_INDEX:
            doc = self._index_json(resp.content, what)
            filtered = "artifactType" in (resp.header("OCI-Filters-Applied") or "")
        elif resp.status in (200, 404):
            index = self._fallback_index(digest)
            doc = index or {"manifests": []}
        else:
            raise status_error(resp, what)
        found = [m for m in doc.get("manifests", []) if isinstance(m, dict)]
        if artifact_type and not filtered:
            found = [m for m in found if m.get("artifactType") == artifact_type]
        return found

    @staticmethod
    def fallback_tag(digest: str) -> str:
        """The referrers tag schema: ``ALGO-HEX`` (truncated to 128 characters, as the spec says)."""
        return digest.replace(":", "-", 1)[:128]

    def _index_json(self, data: bytes, what: str) -> dict[str, Any]:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise self._err(RegistryError, what, "referrers index is not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
            raise self._err(RegistryError, what, "referrers index has no manifests list")
        return doc

    def _fallback_index(self, digest: str) -> dict[str, Any] | None:
        tag = self.fallback_tag(digest)
        try:
            manifest = self.get_manifest(tag, accept=(OCI_INDEX,))
        except RemoteNotFoundError:
            return None
        return self._index_json(manifest.data, self._what("referrers index", tag))

    def _add_referrer_fallback(self, subject: str, doc: dict[str, Any], digest: str, media_type: str,
                               size: int) -> None:
        index = self._fallback_index(subject) or {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        if any(isinstance(m, dict) and m.get("digest") == digest for m in index["manifests"]):
            return
        entry: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
        config = doc.get("config")
        artifact = doc.get("artifactType") or (config.get("mediaType") if isinstance(config, dict) else None)
        if artifact:
            entry["artifactType"] = artifact
        if isinstance(doc.get("annotations"), dict):
            entry["annotations"] = doc["annotations"]
        index["manifests"].append(entry)
        data = json.dumps(index, separators=(",", ":"), sort_keys=True).encode()
        self.put_manifest(self.fallback_tag(subject), data, OCI_INDEX)

    # ------------------------------------------------------------------ blobs: reading

    def _blob_deadline(self, size: int | None) -> float:
        return self.session.config.deadline + (size or 0) / MIN_BLOB_RATE

    def stat_blob(self, digest: str) -> int | None:
        """The blob's size if the repository has it, else None (HEAD)."""
        what = self._what("blob", digest)
        resp = self._request("HEAD", self._url(f"blobs/{check_digest(digest)}"), resource=what)
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise status_error(resp, what)
        return resp.content_length or 0

    def has_blobs(self, digests: Iterable[str]) -> dict[str, int | None]:
        """:meth:`stat_blob` for many digests, at most ``max_parallel`` HEADs at once."""
        return dict(zip_map(self.stat_blob, list(dict.fromkeys(digests)), self.max_parallel))

    def fetch_blob(self, digest: str, sink: Callable[[bytes], object], *, size: int | None = None,
                   progress: Callable[[int], object] | None = None, deadline: float | None = None) -> int:
        """Stream a blob into *sink*, verifying size and digest; returns the byte count.

        *sink* sees the bytes before they are verified: a :class:`RemoteDataError` at the
        end means they are wrong (use :meth:`fetch_blob_to_path` for write-then-rename).
        A connection lost mid-way is resumed with ``Range: bytes=N-`` (a 200 reply to
        that is read from the start with the first N bytes skipped).
        """
        algo = check_digest(digest).split(":", 1)[0]
        what = self._what("blob", digest)
        url = self._url(f"blobs/{digest}")
        hasher = hashlib.new(algo)
        t_end = time.monotonic() + (deadline if deadline is not None else self._blob_deadline(size))
        received = 0
        resumes = 0
        while True:
            remaining = t_end - time.monotonic()
            if remaining <= 0:
                raise self._err(TransportError, what, f"deadline exceeded after {received} bytes")
            headers = {"Range": f"bytes={received}-"} if received else None
            resp = self._call("GET", url, lambda r: r, resource=what, headers=headers, deadline=remaining)
            try:
                if resp.status not in (200, 206):
                    resp.read(1024 * 1024)
                    raise status_error(resp, what)
                skip = 0
                if received and resp.status == 206:
                    m = re.match(r"\s*bytes\s+(\d+)-", resp.header("Content-Range") or "")
                    if not m or int(m.group(1)) != received:
                        raise self._err(RemoteDataError, what, f"resume at byte {received} got "
                                        f"Content-Range {resp.header('Content-Range')!r}")
                elif received:
                    skip = received
                if size is not None and resp.status == 200 and resp.content_length not in (None, size):
                    raise self._err(RemoteDataError, what, f"Content-Length {resp.content_length}, "
                                    f"not the {size} bytes expected")
                for data in resp.iter_content():
                    if skip:
                        cut = min(skip, len(data))
                        data, skip = data[cut:], skip - cut
                        if not data:
                            continue
                    received += len(data)
                    if size is not None and received > size:
                        raise self._err(RemoteDataError, what, f"more than the {size} bytes expected")
                    hasher.update(data)
                    sink(data)
                    if progress is not None:
                        progress(len(data))
                break
            except TransportError as exc:
                if isinstance(exc, RemoteDataError) or not exc.retryable or \
                        resumes >= self.session.config.retries:
                    raise
                resumes += 1
                log.info("%s (resuming at byte %d)", exc, received)
            finally:
                resp.close()
        if size is not None and received != size:
            raise self._err(RemoteDataError, what, f"got {received} bytes, expected {size}")
        got = f"{algo}:{hasher.hexdigest()}"
        if got != digest:
            raise self._err(RemoteDataError, what, f"content does not match its digest (got {got})")
        return received

    def get_blob(self, digest: str, *, size: int | None = None, max_size: int = 64 * 1024 * 1024) -> bytes:
        """A small blob (a config, an index) in memory, verified."""
        parts: list[bytes] = []
        total = [0]

        def sink(data: bytes) -> None:
            total[0] += len(data)
            if total[0] > max_size:
                raise self._err(RemoteDataError, self._what("blob", digest), f"larger than {max_size} bytes")
            parts.append(data)

        self.fetch_blob(digest, sink, size=size)
        return b"".join(parts)

    def fetch_blob_to_path(self, digest: str, path: str | os.PathLike[str], *, size: int | None = None,
                           progress: Callable[[int], object] | None = None) -> int:
        """Download a blob to *path* through a temporary file renamed only once verified and synced."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                n = self.fetch_blob(digest, out.write, size=size, progress=progress)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return n

    def read_blob(self, digest: str, offset: int, length: int, *, blob_size: int | None = None,
                  deadline: float | None = None) -> bytes:
        """Exactly *length* bytes of a blob from *offset* (Range GET; a 200 reply is sliced).

        The redirect to storage, if any, is remembered for the blob's next reads, and
        re-resolved when storage answers 403. The bytes are not digest-checked (a range
        cannot be): callers verify what they read (cnpsfs blocks carry their own digests).
        """
        what = self._what("blob", check_digest(digest))
        url = self._url(f"blobs/{digest}")

        def send(auth: dict[str, str], check: Callable[[Response], None]) -> bytes:
            return self.session.get_range(url, offset, length, headers=auth, resource=what, total_size=blob_size,
                                          deadline=deadline, cache_redirect=True, check=check)

        return self._with_auth(send, self._scope(), what)

    def fetch_blobs(self, items: Iterable[tuple[str, str | os.PathLike[str], int | None]], *,
                    progress: Callable[[int], object] | None = None) -> None:
        """Download many blobs (digest, path, size) in parallel, at most ``max_parallel`` at once."""
        jobs = list(items)
        zip_map(lambda job: self.fetch_blob_to_path(job[0], job[1], size=job[2], progress=progress), jobs,
                self.max_parallel)

    # ------------------------------------------------------------------ blobs: writing

    def push_blob(self, digest: str, source: BlobSource, *, size: int | None = None, mount_from: str | None = None,
                  skip_existing: bool = True, progress: Callable[[int], object] | None = None) -> str:
        """Upload a blob unless the repository has it. Returns ``exists``, ``mounted`` or ``uploaded``.

        *mount_from* names another repository of this registry that has the blob: the
        registry links it without a transfer (201), or answers 202 and the upload
        proceeds normally. The whole sequence is retried on transient failures.
        """
        check_digest(digest)
        if size is None:
            size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
        what = self._what("blob", digest)
        if skip_existing and self.stat_blob(digest) is not None:
            return "exists"
        attempts = 0
        while True:
            attempts += 1
            try:
                return self._push_blob_once(digest, source, size, mount_from, what, progress)
            except TransportError as exc:
                if not exc.retryable or attempts > self.session.config.retries:
                    raise
                log.info("%s (restarting the upload)", exc)
                time.sleep(min(self.session.config.backoff_max, self.session.config.backoff * 2 ** attempts))

    def _push_blob_once(self, digest: str, source: BlobSource, size: int, mount_from: str | None, what: str,
                        progress: Callable[[int], object] | None) -> str:
        scopes = self._scope(push=True)
        query = {}
        if mount_from and mount_from != self.repository:
            query = {"mount": digest, "from": mount_from}
            scopes = scopes | {f"repository:{mount_from}:pull"}
        resp = self._request("POST", self._url("blobs/uploads/", query or None), resource=what, scopes=scopes,
                             headers={"Content-Length": "0"}, body=b"")
        if resp.status == 201 and query:
            log.debug("%s: mounted %s from %s", self.registry, digest, mount_from)
            return "mounted"
        if resp.status != 202:
            raise status_error(resp, what)
        location = self._location(resp, what)
        if size > self.monolithic_max:
            location = self._patch_chunks(location, source, size, what, progress)
            body: bytes | Callable[[], IO[bytes]] = b""
            length = 0
        else:
            body = source if isinstance(source, bytes) else _slice_factory(Path(source), 0, size)
            length = size
        sep = "&" if "?" in location else "?"
        put_url = f"{location}{sep}digest={quote(digest, safe='')}"
        resp = self._request("PUT", put_url, resource=what, push=True, body=body,
                             headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)})
        if resp.status not in (201, 204):
            raise status_error(resp, what)
        if length and progress is not None:
            progress(length)
        return "uploaded"

    def _location(self, resp: Response, what: str) -> str:
        location = resp.header("Location")
        if not location:
            raise self._err(RegistryError, what, f"HTTP {resp.status} without a Location for the upload")
        return urljoin(resp.url, location)

    def _patch_chunks(self, location: str, source: BlobSource, size: int, what: str,
                      progress: Callable[[int], object] | None) -> str:
        offset = 0
        while offset < size:
            n = min(self.chunk_size, size - offset)
            start = offset
            body = source[start:start + n] if isinstance(source, bytes) else _slice_factory(Path(source), start, n)
            resp = self._request("PATCH", location, resource=what, push=True, body=body,
                                 headers={"Content-Type": "application/octet-stream", "Content-Length": str(n),
                                          "Content-Range": f"{start}-{start + n - 1}"})
            if resp.status != 202:
                raise status_error(resp, what)
            m = re.fullmatch(r"\s*(?:bytes=)?0-(\d+)\s*", resp.header("Range") or "")
            if m and int(m.group(1)) != start + n - 1:
                raise self._err(RegistryError, what, f"upload holds bytes 0-{m.group(1)} after sending "
                                f"{start}-{start + n - 1}")
            location = self._location(resp, what)
            offset += n
            if progress is not None:
                progress(n)
        return location

    def push_blobs(self, items: Iterable[tuple[str, BlobSource, int | None]], *, mount_from: str | None = None,
                   progress: Callable[[int], object] | None = None) -> dict[str, str]:
        """:meth:`push_blob` for many (digest, source, size), in parallel, skipping what the registry has."""
        jobs = {job[0]: job for job in items}
        present = self.has_blobs(jobs)
        todo = [job for d, job in jobs.items() if present.get(d) is None]
        results = {d: "exists" for d, size in present.items() if size is not None}
        results.update(zip_map(lambda job: self.push_blob(job[0], job[1], size=job[2], mount_from=mount_from,
                                                          skip_existing=False, progress=progress),
                               todo, self.max_parallel, key=lambda job: job[0]))
        return results

    def delete_blob(self, digest: str) -> None:
        what = self._what("blob", digest)
        resp = self._request("DELETE", self._url(f"blobs/{check_digest(digest)}"), resource=what, push=True,
                             scopes=frozenset({f"repository:{self.repository}:delete"}) | self._scope(True))
        if resp.status not in (200, 202):
            raise status_error(resp, what)


# --------------------------------------------------------------------------- helpers


K = TypeVar("K")
V = TypeVar("V")


def zip_map(fn: Callable[[K], V], items: list[K], limit: int, *,
            key: Callable[[K], Any] | None = None) -> Iterator[tuple[Any, V]]:
    """(key(item), fn(item)) for every item, at most *limit* running at once; the first error is raised
    after the others finished or were cancelled."""
    if not items:
        return iter(())
    key = key or (lambda item: item)
    if len(items) == 1 or limit == 1:
        return iter([(key(item), fn(item)) for item in items])
    with ThreadPoolExecutor(max_workers=min(limit, len(items)), thread_name_prefix="cnpsfs-transfer") as pool:
        futures = [(item, pool.submit(fn, item)) for item in items]
        results: list[tuple[Any, V]] = []
        error: BaseException | None = None
        for item, fut in futures:
            if error is not None:
                fut.cancel()
                continue
            try:
                results.append((key(item), fut.result()))
            except BaseException as exc:
                error = exc
        if error is not None:
            raise error
    return iter(results)


def _slice_factory(path: Path, start: int, length: int) -> Callable[[], IO[bytes]]:
    """A body factory for bytes [start, start+length) of *path*, opened afresh per attempt."""
    return lambda: _FileSlice(path, start, length)  # type: ignore[return-value]
