"""``docker://`` references: the OCI distribution client of :mod:`cnpsfs.transport`
adapted to :class:`~cnpsfs.oci.layout.ImageSource` (pull) and
:class:`~cnpsfs.oci.exporter.BlobSink` (push).

The client owns everything about the network (auth and tokens, TLS, retries with resume,
deadlines, redirects to blob storage); this module only maps the importer's pull-style
reads onto its push-style blob stream and the exporter's blobs onto uploads. Errors stay
the client's: one line naming the registry and the manifest or blob.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cnpsfs.errors import CnpsfsError, UsageError
from cnpsfs.oci.blobs import EOF, QueuedReader, scratch_file
from cnpsfs.oci.model import CONFIG_TYPES, INDEX_TYPES, MANIFEST_TYPES, MAX_JSON, Descriptor
from cnpsfs.transport.auth import lookup_credentials
from cnpsfs.transport.http import HttpConfig, Session
from cnpsfs.transport.reference import ImageReference, parse_reference
from cnpsfs.transport.registry import RegistryClient

#: Pieces of a layer in flight between the network thread and the importer.
_QUEUE_PIECES = 64


@dataclass
class RegistryOptions:
    """skopeo's flags: None for tls_verify means the default rule (HTTPS, except loopback)."""

    tls_verify: bool | None = None
    creds: str | None = None
    authfile: str | None = None
    cert_dir: str | None = None
    timeout: float | None = None  # longest silence on a connection
    retries: int | None = None


def _session(options: RegistryOptions) -> Session:
    """skopeo's --cert-dir: every *.crt (or *.pem) in DIR trusted; a file is taken as it is."""
    ca = options.cert_dir
    if ca is not None and not os.path.exists(ca):
        raise UsageError(f"--cert-dir {ca}: no such file or directory")
    kwargs: dict[str, Any] = {"tls_verify": options.tls_verify is not False}
    if options.timeout is not None:
        kwargs.update(read_timeout=options.timeout, connect_timeout=min(10.0, options.timeout),
                      deadline=max(options.timeout * 4, 30.0))
    if options.retries is not None:
        kwargs["retries"] = options.retries
    if ca is not None and os.path.isdir(ca):
        # A directory of *.crt files (skopeo's layout), not OpenSSL's hashed capath.
        pems = [os.path.join(ca, n) for n in sorted(os.listdir(ca)) if n.endswith((".crt", ".pem"))]
        with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as bundle:
            for pem in pems:
                with open(pem, "rb") as f:
                    bundle.write(f.read() + b"\n")
        try:
            return Session(HttpConfig(ca_file=bundle.name, **kwargs))  # the context loads it now
        finally:
            os.unlink(bundle.name)
    return Session(HttpConfig(ca_file=ca, **kwargs))


def _client(ref: ImageReference, options: RegistryOptions) -> RegistryClient:
    credentials = lookup_credentials(ref.registry, ref.repository, creds=options.creds, authfile=options.authfile)
    return RegistryClient.for_reference(ref, session=_session(options), credentials=credentials)


def parse(spec: str, *, default_tag: str | None = "latest") -> ImageReference:
    return parse_reference(f"docker://{spec}", default_tag=default_tag)


class _BlobPipe(QueuedReader):
    """A blob as a readable stream: the client's fetch runs on a thread of its own and hands
    pieces over a bounded queue (a slow importer slows the download, never the reverse)."""

    def __init__(self, client: RegistryClient, desc: Descriptor) -> None:
        super().__init__(_QUEUE_PIECES)
        self._thread = threading.Thread(target=self._fetch, args=(client, desc), daemon=True,
                                        name=f"cnpsfs-fetch-{desc.digest[7:19]}")
        self._thread.start()

    def _fetch(self, client: RegistryClient, desc: Descriptor) -> None:
        def sink(data: bytes) -> None:
            if not self._put(data):
                raise _Stopped

        try:
            client.fetch_blob(desc.digest, sink, size=desc.size)
            result: Any = EOF
        except _Stopped:
            return
        except BaseException as exc:  # handed to the reader, who raises it
            result = exc
        self._put(result)

    def close(self) -> None:
        self._stop.set()
        super().close()


class _Stopped(Exception):
    """The reader went away: stop fetching."""


class RegistrySource:
    """An image in a registry: the manifest by tag or digest, blobs streamed and verified."""

    def __init__(self, spec: str, options: RegistryOptions) -> None:
        self.ref = parse(spec)
        self.reference = str(self.ref)
        self.client = _client(self.ref, options)

    def root(self) -> tuple[bytes, str | None, str | None]:
        manifest = self.client.get_manifest(self.ref.reference)
        known = manifest.media_type in MANIFEST_TYPES + INDEX_TYPES
        return manifest.data, manifest.media_type if known else None, manifest.digest

    def referrers(self, digest: str) -> list[dict[str, Any]]:
        """Descriptors of what refers to *digest*: the referrers API, else the fallback tag."""
        return self.client.referrers(digest)

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        if desc.media_type in MANIFEST_TYPES + INDEX_TYPES:
            return io.BytesIO(self.client.get_manifest(desc.digest).data)
        if desc.media_type in CONFIG_TYPES and desc.size <= MAX_JSON:
            return io.BytesIO(self.client.get_blob(desc.digest, size=desc.size, max_size=MAX_JSON))
        return io.BufferedReader(_BlobPipe(self.client, desc), 1 << 20)

    def close(self) -> None:
        self.client.close()
        self.client.session.close()


class RegistrySink:
    """``docker://HOST/REPO:TAG``: blobs the repository has are skipped (HEAD), others mounted
    from another repository of the registry when one is known to have them, else uploaded;
    the manifest is put last, under the tag."""

    def __init__(self, spec: str, options: RegistryOptions) -> None:
        self.ref = parse(spec)
        if self.ref.digest:
            raise UsageError(f"docker://{spec}: push to a tag, not a digest")
        self.reference = str(self.ref)
        self.client = _client(self.ref, options)
        self.mount_from: str | None = None

    def set_sources(self, references: list[str]) -> None:
        """Where the image came from: a repository of this registry there may lend its blobs."""
        for text in references:
            if not text.startswith("docker://"):
                continue
            try:
                other = parse(text[len("docker://"):])
            except CnpsfsError:
                continue
            if other.registry == self.ref.registry and other.repository != self.ref.repository:
                self.mount_from = other.repository
                return

    def has_blob(self, digest: str) -> bool:
        return self.client.stat_blob(digest) is not None

    @contextlib.contextmanager
    def new_blob(self) -> Iterator[tuple[IO[bytes], str]]:
        with scratch_file(None, "cnpsfs-push-") as pair:
            yield pair

    def put_blob(self, path: str, digest: str, size: int, media_type: str) -> str:
        return self.client.push_blob(digest, Path(path), size=size, mount_from=self.mount_from,
                                     skip_existing=False)

    def put_manifest(self, data: bytes, media_type: str, digest: str) -> None:
        self.client.put_manifest(self.ref.tag or "latest", data, media_type)

    def put_referrer(self, data: bytes, media_type: str, digest: str, artifact_type: str) -> None:
        """An artifact with a ``subject``, put by digest: a registry with the referrers API
        lists it itself (it answers ``OCI-Subject``); for one without, the client adds it to
        the ``sha256-<hex>`` fallback index of the subject."""
        self.client.put_manifest(digest, data, media_type)

    def close(self) -> None:
        self.client.close()
        self.client.session.close()


def open_registry_source(spec: str, options: RegistryOptions) -> RegistrySource:
    return RegistrySource(spec, options)


def open_registry_sink(spec: str, options: RegistryOptions) -> RegistrySink:
    return RegistrySink(spec, options)
