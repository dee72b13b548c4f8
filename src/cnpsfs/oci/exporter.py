"""Export a stored image as an OCI image: one reproducible tar layer per FileSet.

The same image exported twice gives byte-identical layers, config and manifest: the tar
is a function of the FileSet alone (canonical member order, fixed header fields, see
docs/oci.md "Reproducible layers"), compressed with fixed parameters, and the JSON
documents are written with sorted keys and no whitespace. Layers are produced in
parallel, each into a temporary file while its two digests (diff_id of the tar, digest
of the compressed blob) are computed in the same pass; the destination then gets the
blobs first and the manifest last, so a reader never sees a manifest whose blobs are
missing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import zstandard

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, UsageError
from cnpsfs.export import write_tar
from cnpsfs.image.manifest import active_layers, stacking_order
from cnpsfs.image.reader import FileReader
from cnpsfs.oci.layout import LayoutSink
from cnpsfs.oci.model import (
    LAYER_MEDIA_TYPE,
    OCI_CONFIG,
    OCI_MANIFEST,
    canonical_json,
    digest_of,
    host_platform,
    parse_platform,
)
from cnpsfs.store import Store

log = logging.getLogger(__name__)

COMPRESSIONS = {"gzip": "gzip", "zstd": "zstd", "none": ""}
DEFAULT_LEVEL = {"gzip": 6, "zstd": 3, "": 0}
_WRITE = 1 << 20


class BlobSink(Protocol):
    """Where an exported image goes: an OCI layout, or a registry (cnpsfs.oci.registry)."""

    #: The destination as the user gave it, for messages.
    reference: str

    def has_blob(self, digest: str) -> bool: ...

    def new_blob(self) -> contextlib.AbstractContextManager[tuple[IO[bytes], str]]:
        """A temporary file to write a blob into, and its path (removed on exit if not put)."""
        ...

    def put_blob(self, path: str, digest: str, size: int, media_type: str) -> str:
        """Publish the finished temporary file *path* as blob *digest*: "uploaded" or "mounted"."""
        ...

    def put_manifest(self, data: bytes, media_type: str, digest: str) -> None:
        """Store the manifest and point the destination's tag at it (last)."""
        ...


@dataclass
class ExportOptions:
    compression: str = "gzip"  # "gzip", "zstd" or "" (uncompressed)
    level: int | None = None
    jobs: int = 2
    #: Write the subject's cnpsfs signatures as artifacts referring to the image (where
    #: the destination can hold them: a registry, an OCI layout or archive).
    signatures: bool = True
    #: Write the subject's prefetch profiles as artifacts referring to the image (same places).
    profiles: bool = True


@dataclass
class ExportedLayer:
    fileset: bytes
    digest: str
    diff_id: str
    size: int
    media_type: str
    #: "exists" (the destination had it), "mounted" (from another repository) or "uploaded".
    outcome: str = "uploaded"


@dataclass
class ExportResult:
    manifest_digest: str
    config_digest: str
    layers: list[ExportedLayer] = field(default_factory=list)
    #: Digests of the signature artifact manifests written (docs/format.md).
    signatures: list[str] = field(default_factory=list)
    #: Digests of the profile artifact manifests written (docs/format.md §1.15).
    profiles: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- reproducible tar


class _DigestWriter:
    """The write end of a layer: hashes the tar, compresses it, hashes and writes the blob."""

    def __init__(self, out: IO[bytes], compression: str, level: int) -> None:
        self.out = out
        self.diff = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.size = 0
        self.compression = compression
        self._gzip = zlib.compressobj(level, zlib.DEFLATED, 31, 9) if compression == "gzip" else None
        self._zstd = (zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0).compressobj()
                      if compression == "zstd" else None)

    def write(self, data: bytes) -> int:
        self.diff.update(data)
        if self._gzip is not None:
            self._emit(self._gzip.compress(data))
        elif self._zstd is not None:
            self._emit(self._zstd.compress(data))
        else:
            self._emit(data)
        return len(data)

    def _emit(self, data: bytes) -> None:
        if data:
            self.blob.update(data)
            self.size += len(data)
            self.out.write(data)

    def close(self) -> None:
        if self._gzip is not None:
            self._emit(self._gzip.flush())
        elif self._zstd is not None:
            self._emit(self._zstd.flush())

    def flush(self) -> None:
        pass


def _produce_layer(store: Store, sink: BlobSink, root: fmt.Entry, at: tuple[bytes, ...], whiteouts: bool,
                   fileset: bytes, options: ExportOptions) -> ExportedLayer:
    compression = options.compression
    level = options.level if options.level is not None else DEFAULT_LEVEL[compression]
    reader = FileReader(store)
    media_type = LAYER_MEDIA_TYPE[compression]
    with sink.new_blob() as (f, path):
        writer = _DigestWriter(f, compression, level)
        write_tar(store, root, writer, at=at, whiteouts=whiteouts, reader=reader)
        writer.close()
        f.flush()
        os.fsync(f.fileno())
        digest = f"sha256:{writer.blob.hexdigest()}"
        layer = ExportedLayer(fileset, digest, f"sha256:{writer.diff.hexdigest()}", writer.size, media_type)
        if sink.has_blob(digest):
            layer.outcome = "exists"
        else:
            layer.outcome = sink.put_blob(path, digest, writer.size, media_type)
    return layer


# --------------------------------------------------------------------------- config and manifest


def _faithful_history(image: fmt.Image, filesets: list[bytes]) -> dict[str, Any] | None:
    """The imported image's provenance, when the image still has exactly its layers."""
    oci = image.metadata.get("oci")
    if not isinstance(oci, dict) or not isinstance(oci.get("layers"), list):
        return None
    recorded = [item.get("fileset") for item in oci["layers"] if isinstance(item, dict)]
    if recorded != [fmt.format_digest(f) for f in filesets]:
        return None
    return oci


def image_config(store: Store, image: fmt.Image, layers: list[ExportedLayer]) -> dict[str, Any]:
    """The OCI image config for *image*, whose layers have been exported as *layers*."""
    run: dict[str, Any] = {}
    names = {"entrypoint": "Entrypoint", "cmd": "Cmd", "env": "Env", "workdir": "WorkingDir", "user": "User",
             "labels": "Labels", "stop_signal": "StopSignal"}
    for key, oci_key in names.items():
        if image.config.get(key):
            run[oci_key] = image.config[key]
    oci = image.metadata.get("oci") if isinstance(image.metadata.get("oci"), dict) else {}
    assert isinstance(oci, dict)
    if oci.get("exposed_ports"):
        run["ExposedPorts"] = {port: {} for port in oci["exposed_ports"]}
    if oci.get("volumes"):
        run["Volumes"] = {volume: {} for volume in oci["volumes"]}
    platform = parse_platform(oci["platform"]) if isinstance(oci.get("platform"), str) else host_platform()
    config: dict[str, Any] = {"architecture": platform.architecture, "os": platform.os,
                              "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}}
    if platform.variant:
        config["variant"] = platform.variant
    if run:
        config["config"] = run
    faithful = _faithful_history(image, [layer.fileset for layer in layers])
    history = faithful.get("history") if faithful else None
    if isinstance(history, list) and sum(1 for h in history if not h.get("empty_layer")) == len(layers):
        config["history"] = history
        for key in ("created", "author"):
            if faithful and faithful.get(key):
                config[key] = faithful[key]
    else:
        config["history"] = []
        for layer in layers:
            fs = store.get_fileset(layer.fileset)
            config["history"].append({"created_by": "cnpsfs export oci",
                                      "comment": f"{fs.name}@{fs.version} {fmt.format_digest(layer.fileset)}"})
    return config


def export_oci(store: Store, image: fmt.Image, sink: BlobSink, options: ExportOptions,
               on_layer: Callable[[ExportedLayer], None] | None = None, *,
               subject: bytes | None = None) -> ExportResult:
    """Write *image* to *sink*: every layer, the config, the signature and profile
    artifacts of *subject* (the stored image or FileSet exported), then the manifest
    under its tag."""
    if options.compression not in DEFAULT_LEVEL:
        raise UsageError(f"unknown compression {options.compression!r}")
    # Nested images flattened into one stack; union layers are unordered, so their
    # override layers go on top, as they compose (group by group for nested images).
    stack = stacking_order(image, active_layers(store, image))
    if not stack:
        raise CnpsfsError(f"{image.name}@{image.version} has no linked layers to export")
    oci = image.metadata.get("oci")
    if hasattr(sink, "set_sources") and isinstance(oci, dict) and isinstance(oci.get("source"), str):
        sink.set_sources([oci["source"]])
    jobs = max(1, min(options.jobs, len(stack)))
    with concurrent.futures.ThreadPoolExecutor(jobs, thread_name_prefix="cnpsfs-export") as pool:
        futures = [pool.submit(_produce_layer, store, sink, info.root, info.at, whiteouts, info.fileset, options)
                   for info, whiteouts in stack]
        layers = []
        for future in futures:
            layers.append(future.result())
            if on_layer is not None:
                on_layer(layers[-1])
    config_bytes = canonical_json(image_config(store, image, layers))
    config_digest = digest_of(config_bytes)
    _put_bytes(sink, config_bytes, config_digest, OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                           for layer in layers]}
    manifest_bytes = canonical_json(manifest)
    manifest_digest = digest_of(manifest_bytes)
    signatures: list[str] = []
    profiles: list[str] = []
    if subject is not None:
        from cnpsfs.oci.profiles import profile_artifacts
        from cnpsfs.oci.signatures import signature_artifacts

        if options.signatures:
            signatures = _put_artifacts(sink, signature_artifacts(store, subject, manifest_bytes), "signature",
                                        subject)
        if options.profiles:
            profiles = _put_artifacts(sink, profile_artifacts(store, subject, manifest_bytes), "profile", subject)
    sink.put_manifest(manifest_bytes, OCI_MANIFEST, manifest_digest)
    finish = getattr(sink, "finish", None)
    if finish is not None:
        finish()
    return ExportResult(manifest_digest, config_digest, layers, signatures, profiles)


def _put_artifacts(sink: BlobSink, artifacts: list[Any], noun: str, subject: bytes) -> list[str]:
    """*artifacts* (cnpsfs.oci.artifacts.Artifact) referring to the image manifest, before
    the tag moves: the empty config, each blob, then each artifact manifest."""
    from cnpsfs.oci.artifacts import EMPTY_DATA, EMPTY_DIGEST, EMPTY_MEDIA_TYPE

    if not artifacts:
        return []
    put_referrer = getattr(sink, "put_referrer", None)
    if put_referrer is None:
        log.warning("%s cannot hold %ss: the %d %s(s) of %s are not exported", sink.reference, noun,
                    len(artifacts), noun, fmt.format_digest(subject))
        return []
    _put_bytes(sink, EMPTY_DATA, EMPTY_DIGEST, EMPTY_MEDIA_TYPE)
    for artifact in artifacts:
        _put_bytes(sink, artifact.blob, artifact.blob_digest, artifact.artifact_type)
        put_referrer(artifact.manifest, OCI_MANIFEST, artifact.digest, artifact.artifact_type)
        log.info("%s: %s as artifact %s", sink.reference, noun, artifact.digest)
    return [a.digest for a in artifacts]


def _put_bytes(sink: BlobSink, data: bytes, digest: str, media_type: str) -> None:
    if sink.has_blob(digest):
        return
    with sink.new_blob() as (f, path):
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        sink.put_blob(path, digest, len(data), media_type)


def open_sink(dest: str, registry: Any = None) -> Any:
    from cnpsfs.oci.sources import split_transport

    transport, rest = split_transport(dest)
    if transport == "oci:":
        return LayoutSink.for_spec(rest)
    if transport == "docker://":
        from cnpsfs.oci.registry import open_registry_sink

        return open_registry_sink(rest, registry)
    from cnpsfs.oci.archive import DockerArchiveSink, OciArchiveSink

    if transport == "oci-archive:":
        return OciArchiveSink(rest)
    assert transport == "docker-archive:"
    return DockerArchiveSink(rest)
