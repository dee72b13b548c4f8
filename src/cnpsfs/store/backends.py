"""Where a remote's blobs and tags physically are: a directory, a web server, an OCI registry.

A :class:`Backend` is the small surface the remote store and push/pull need (desync's
store interface, one level down): tags that name manifests, immutable blobs by sha256
(whole and verified, or a byte range), has-many, uploads. The three implementations:

- :class:`FileBackend` (``file:///DIR``): the static layout in a directory, read and
  written directly (a shared file system such as NFS works the same way);
- :class:`HttpBackend` (``http(s)://HOST/PATH``): the same static layout served by any web
  server or CDN, read-only, through :class:`cnpsfs.transport.Session`;
- :class:`RegistryBackend` (``docker://HOST/REPO``): OCI blobs, manifests and tags through
  :class:`cnpsfs.transport.RegistryClient`.

Every call is blocking and thread-safe; errors are :mod:`cnpsfs.errors` types naming the
remote and the object. Counters (requests, bytes, errors) feed ``cnpsfs status``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

from cnpsfs.errors import (
    CnpsfsError,
    RemoteDataError,
    RemoteNotFoundError,
    TransportError,
    UsageError,
)
from cnpsfs.store.packs import TEMPORARY_MAX_AGE, fsync_dir, reclaim_temporary, temporary_name, write_all
from cnpsfs.store.wire import OCI_MANIFEST, REMOTE_LAYOUT, REMOTE_MARKER, check_sha256_name
from cnpsfs.transport import HttpConfig, RegistryClient, Session, lookup_credentials, parse_reference

log = logging.getLogger(__name__)

BlobSource = bytes | Path


class Backend(Protocol):
    """One place a remote's bytes live (a mirror of a remote is another backend)."""

    url: str
    writable: bool
    stats: Counter[str]

    def check(self) -> None:
        """Fail with a clear error unless this is a cnpsfs remote (or a registry repository)."""
        ...

    def get_tag(self, tag: str, *, deadline: float | None = None) -> bytes | None:
        """The manifest bytes the tag names, or None if there is no such tag."""
        ...

    def list_tags(self) -> list[str]: ...
    def get_blob(self, digest: str, size: int, *, deadline: float | None = None) -> bytes:
        """The whole blob, its sha256 and size checked (RemoteDataError if wrong)."""
        ...

    def read_range(self, digest: str, offset: int, length: int, *, blob_size: int,
                   deadline: float | None = None) -> bytes:
        """Exactly *length* bytes of a blob from *offset* (not digest-checked: the caller verifies)."""
        ...

    def has_blobs(self, digests: Iterable[str]) -> set[str]: ...
    def put_blob(self, digest: str, source: BlobSource, size: int) -> None: ...
    def put_manifest(self, data: bytes) -> None:
        """Store a manifest under its own digest (so a tag can name it next)."""
        ...

    def put_tag(self, tag: str, manifest: bytes) -> None: ...
    def close(self) -> None: ...


def _counted(stats: Counter[str], nbytes: int) -> None:
    stats["requests"] += 1
    stats["bytes"] += nbytes


# --------------------------------------------------------------------------- file://


class FileBackend:
    """The static layout in a local (or shared) directory."""

    writable = True

    def __init__(self, url: str, path: Path) -> None:
        self.url = url
        self.path = path
        self.stats: Counter[str] = Counter()
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.split(":", 1)[1]

    def check(self) -> None:
        marker = self.path / REMOTE_MARKER
        try:
            text = marker.read_text()
        except FileNotFoundError:
            if not self.path.is_dir():  # an unmounted network file system looks like this: unavailable
                raise TransportError(f"{self.url}: no such directory", host=self.url) from None
            raise CnpsfsError(f"{self.url}: not a cnpsfs remote (no {REMOTE_MARKER}; push to create one)") from None
        except OSError as exc:
            raise TransportError(f"{self.url}: {REMOTE_MARKER}: {exc.strerror}", host=self.url) from None
        if text != REMOTE_LAYOUT:
            raise CnpsfsError(f"{self.url}: unsupported remote layout {text.strip()[:60]!r}")

    def initialise(self) -> None:
        """Create the layout (directories, then the marker last) if it is not there, and
        remove what killed pushes left (:meth:`reclaim_temporary`)."""
        if (self.path / REMOTE_MARKER).exists():
            self.check()
            self.reclaim_temporary()
            return
        try:
            for sub in ("blobs/sha256", "tags"):
                (self.path / sub).mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path / REMOTE_MARKER, REMOTE_LAYOUT.encode())
        except OSError as exc:
            raise CnpsfsError(f"cannot create a remote at {self.url}: {exc.strerror}") from None

    def reclaim_temporary(self, *, max_age: float = TEMPORARY_MAX_AGE) -> int:
        """Remove the temporary files of pushes that died (kill -9, a crash, a lost host):
        a file of this host whose process is gone at once, any other when *max_age* old
        (:func:`cnpsfs.store.packs.reclaim_temporary`). Returns how many were removed."""
        try:
            removed = reclaim_temporary([self.path / "blobs" / "sha256", self.path / "tags", self.path],
                                        max_age=max_age)
        except OSError as exc:
            log.warning("%s: cannot remove the temporary files of dead pushes: %s", self.url, exc.strerror)
            return 0
        if removed:
            log.info("%s: removed %d temporary files of pushes that died", self.url, len(removed))
        return len(removed)

    def get_tag(self, tag: str, *, deadline: float | None = None) -> bytes | None:
        try:
            data = (self.path / "tags" / tag).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.stats["errors"] += 1
            raise TransportError(f"{self.url}: tag {tag}: {exc.strerror}", host=self.url, resource=tag) from None
        _counted(self.stats, len(data))
        return data

    def list_tags(self) -> list[str]:
        try:
            return sorted(p.name for p in (self.path / "tags").iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def get_blob(self, digest: str, size: int, *, deadline: float | None = None) -> bytes:
        check_sha256_name(digest, self.url)
        try:
            data = self._blob_path(digest).read_bytes()
        except FileNotFoundError:
            self.stats["errors"] += 1
            raise RemoteNotFoundError(f"{self.url}: blob {digest} is missing", host=self.url,
                                      resource=digest) from None
        except OSError as exc:
            self.stats["errors"] += 1
            raise TransportError(f"{self.url}: blob {digest}: {exc.strerror}", host=self.url,
                                 resource=digest) from None
        _counted(self.stats, len(data))
        if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            self.stats["errors"] += 1
            raise RemoteDataError(f"{self.url}: blob {digest}: content does not match its digest",
                                  host=self.url, resource=digest)
        return data

    def _fd(self, digest: str) -> int:
        with self._lock:
            fd = self._fds.get(digest)
            if fd is None:
                fd = os.open(self._blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
                if len(self._fds) >= 256:
                    os.close(self._fds.pop(next(iter(self._fds))))
                self._fds[digest] = fd
            return fd

    def read_range(self, digest: str, offset: int, length: int, *, blob_size: int,
                   deadline: float | None = None) -> bytes:
        check_sha256_name(digest, self.url)
        what = f"blob {digest} bytes {offset}-{offset + length - 1}"
        try:
            data = os.pread(self._fd(digest), length, offset)
        except FileNotFoundError:
            self.stats["errors"] += 1
            raise RemoteNotFoundError(f"{self.url}: blob {digest} is missing", host=self.url,
                                      resource=digest) from None
        except OSError as exc:
            self.stats["errors"] += 1
            raise TransportError(f"{self.url}: {what}: {exc.strerror}", host=self.url, resource=digest) from None
        _counted(self.stats, len(data))
        if len(data) != length:
            self.stats["errors"] += 1
            raise RemoteDataError(f"{self.url}: {what}: the blob ends early", host=self.url, resource=digest)
        return data

    def has_blobs(self, digests: Iterable[str]) -> set[str]:
        return {d for d in digests if self._blob_path(check_sha256_name(d, self.url)).exists()}

    def put_blob(self, digest: str, source: BlobSource, size: int) -> None:
        """Write to a temporary name, check the digest, fsync, rename: a blob is whole or absent."""
        target = self._blob_path(check_sha256_name(digest, self.url))
        tmp = temporary_name(target)
        hasher = hashlib.sha256()
        written = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                if isinstance(source, bytes):
                    hasher.update(source)
                    write_all(fd, source)
                    written = len(source)
                else:
                    with open(source, "rb") as src:
                        while piece := src.read(1 << 20):
                            hasher.update(piece)
                            write_all(fd, piece)
                            written += len(piece)
                os.fsync(fd)
            finally:
                os.close(fd)
            if written != size or "sha256:" + hasher.hexdigest() != digest:
                raise CnpsfsError(f"{self.url}: blob {digest}: the bytes to upload do not match their digest")
            os.rename(tmp, target)
            fsync_dir(target.parent)
        except OSError as exc:
            raise TransportError(f"{self.url}: writing blob {digest}: {exc.strerror}", host=self.url,
                                 resource=digest) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _counted(self.stats, written)

    def put_manifest(self, data: bytes) -> None:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has_blobs([digest]):
            self.put_blob(digest, data, len(data))

    def put_tag(self, tag: str, manifest: bytes) -> None:
        try:
            _atomic_write(self.path / "tags" / tag, manifest)
        except OSError as exc:
            raise TransportError(f"{self.url}: writing tag {tag}: {exc.strerror}", host=self.url,
                                 resource=tag) from None
        _counted(self.stats, len(manifest))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


# --------------------------------------------------------------------------- http(s)://


class HttpBackend:
    """The static layout on a web server (read-only): GET for tags and index blobs, Range GET for blocks."""

    writable = False

    def __init__(self, url: str, session: Session) -> None:
        self.url = url.rstrip("/")
        self.session = session
        self.stats: Counter[str] = Counter()

    def _get(self, path: str, *, resource: str, max_body: int, deadline: float | None) -> bytes | None:
        try:
            resp = self.session.request("GET", f"{self.url}/{path}", resource=resource, max_body=max_body,
                                        deadline=deadline)
        except TransportError:
            self.stats["errors"] += 1
            raise
        _counted(self.stats, len(resp.content))
        if resp.status == 404:
            return None
        if resp.status != 200:
            self.stats["errors"] += 1
            from cnpsfs.transport.http import status_error

            raise status_error(resp, resource)
        return resp.content

    def check(self) -> None:
        text = self._get(REMOTE_MARKER, resource=REMOTE_MARKER, max_body=4096, deadline=None)
        if text is None:
            raise CnpsfsError(f"{self.url}: not a cnpsfs remote (no {REMOTE_MARKER} there)")
        if text != REMOTE_LAYOUT.encode():
            raise CnpsfsError(f"{self.url}: unsupported remote layout {text.strip()[:60]!r}")

    def get_tag(self, tag: str, *, deadline: float | None = None) -> bytes | None:
        return self._get(f"tags/{quote(tag)}", resource=f"tag {tag}", max_body=4 << 20, deadline=deadline)

    def list_tags(self) -> list[str]:
        raise UsageError(f"{self.url}: a web server cannot list tags: give NAME@VERSION or blake3:<hex>")

    def get_blob(self, digest: str, size: int, *, deadline: float | None = None) -> bytes:
        check_sha256_name(digest, self.url)
        data = self._get(f"blobs/sha256/{digest.split(':', 1)[1]}", resource=f"blob {digest}", max_body=size,
                         deadline=deadline)
        if data is None:
            self.stats["errors"] += 1
            raise RemoteNotFoundError(f"{self.url}: blob {digest} is missing", host=self.url, resource=digest)
        if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            self.stats["errors"] += 1
            raise RemoteDataError(f"{self.url}: blob {digest}: content does not match its digest",
                                  host=self.url, resource=digest)
        return data

    def read_range(self, digest: str, offset: int, length: int, *, blob_size: int,
                   deadline: float | None = None) -> bytes:
        check_sha256_name(digest, self.url)
        try:
            data = self.session.get_range(f"{self.url}/blobs/sha256/{digest.split(':', 1)[1]}", offset, length,
                                          resource=f"blob {digest}", total_size=blob_size, deadline=deadline)
        except TransportError:
            self.stats["errors"] += 1
            raise
        _counted(self.stats, len(data))
        return data

    def has_blobs(self, digests: Iterable[str]) -> set[str]:
        found = set()
        for digest in digests:
            resp = self.session.request("HEAD", f"{self.url}/blobs/sha256/{digest.split(':', 1)[1]}",
                                        resource=f"blob {digest}", max_body=0)
            _counted(self.stats, 0)
            if resp.status == 200:
                found.add(digest)
        return found

    def _read_only(self) -> UsageError:
        return UsageError(f"{self.url}: http(s) remotes are read-only: push to file:// or docker:// and serve that")

    def put_blob(self, digest: str, source: BlobSource, size: int) -> None:
        raise self._read_only()

    def put_manifest(self, data: bytes) -> None:
        raise self._read_only()

    def put_tag(self, tag: str, manifest: bytes) -> None:
        raise self._read_only()

    def close(self) -> None:
        self.session.close()


# --------------------------------------------------------------------------- docker://


class RegistryBackend:
    """One repository of an OCI registry: blobs are OCI blobs, tags OCI tags."""

    writable = True

    def __init__(self, url: str, client: RegistryClient, session: Session) -> None:
        self.url = url
        self.client = client
        self.session = session  # ours: the client was given it, so it does not close it
        self.stats: Counter[str] = Counter()

    def _call(self, func: object, *args: object, nbytes: int = 0, **kw: object) -> object:
        try:
            result = func(*args, **kw)  # type: ignore[operator]
        except TransportError:
            self.stats["errors"] += 1
            raise
        _counted(self.stats, nbytes)
        return result

    def check(self) -> None:
        self._call(self.client.ping)

    def get_tag(self, tag: str, *, deadline: float | None = None) -> bytes | None:
        try:
            manifest = self.client.get_manifest(tag, accept=(OCI_MANIFEST,))
        except RemoteNotFoundError:
            _counted(self.stats, 0)
            return None
        except TransportError:
            self.stats["errors"] += 1
            raise
        _counted(self.stats, len(manifest.data))
        return manifest.data

    def list_tags(self) -> list[str]:
        try:
            return self._call(self.client.list_tags)  # type: ignore[return-value]
        except RemoteNotFoundError:
            return []  # a repository nobody pushed to yet

    def get_blob(self, digest: str, size: int, *, deadline: float | None = None) -> bytes:
        return self._call(self.client.get_blob, digest, size=size, max_size=size, nbytes=size)  # type: ignore[return-value]

    def read_range(self, digest: str, offset: int, length: int, *, blob_size: int,
                   deadline: float | None = None) -> bytes:
        return self._call(self.client.read_blob, digest, offset, length, blob_size=blob_size,  # type: ignore[return-value]
                          deadline=deadline, nbytes=length)

    def has_blobs(self, digests: Iterable[str]) -> set[str]:
        found = self._call(self.client.has_blobs, list(digests))
        return {d for d, size in found.items() if size is not None}  # type: ignore[attr-defined]

    def put_blob(self, digest: str, source: BlobSource, size: int) -> None:
        self._call(self.client.push_blob, digest, source, size=size, skip_existing=False, nbytes=size)

    def put_manifest(self, data: bytes) -> None:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self._call(self.client.put_manifest, digest, data, OCI_MANIFEST, nbytes=len(data))

    def put_tag(self, tag: str, manifest: bytes) -> None:
        self._call(self.client.put_manifest, tag, manifest, OCI_MANIFEST, nbytes=len(manifest))

    def close(self) -> None:
        self.client.close()
        self.session.close()


# --------------------------------------------------------------------------- from a URL


def parse_remote_url(url: str) -> tuple[str, str]:
    """(scheme, rest) of a remote URL: ``file``, ``http``, ``https`` or ``docker``; else a usage error."""
    for scheme in ("file", "http", "https", "docker"):
        if url.startswith(f"{scheme}://"):
            return scheme, url[len(scheme) + 3:]
    raise UsageError(f"remote {url!r}: expected docker://HOST/REPO, http(s)://HOST/PATH or file:///DIR")


def open_backend(url: str, config: HttpConfig | None = None, *, creds: str | None = None,
                 authfile: str | None = None, max_parallel: int = 8) -> Backend:
    """The backend for one remote URL (no network traffic yet)."""
    scheme, rest = parse_remote_url(url)
    if scheme == "file":
        path = urlsplit(url).path
        if not path.startswith("/"):
            raise UsageError(f"remote {url!r}: a file:// remote needs an absolute path (file:///DIR)")
        return FileBackend(url, Path(path))
    session = Session(config or HttpConfig())
    if scheme in ("http", "https"):
        return HttpBackend(url, session)
    ref = parse_reference(rest, default_tag=None)
    if ref.tag or ref.digest:
        raise UsageError(f"remote {url!r}: name the repository only (docker://HOST/REPO), not a tag or digest")
    credentials = lookup_credentials(ref.registry, ref.repository, creds=creds, authfile=authfile)
    client = RegistryClient(ref.registry, ref.repository, session=session, credentials=credentials,
                            max_parallel=max_parallel)
    return RegistryBackend(url, client, session)
