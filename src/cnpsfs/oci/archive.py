"""Export destinations that are one file: ``oci-archive:FILE[:TAG]`` and
``docker-archive:FILE[:NAME:TAG]`` (``docker save`` / ``podman save`` format).

Both collect the blobs in a temporary directory next to FILE, then write the archive to a
temporary file there, fsync it and rename it over FILE: a failed or interrupted export
leaves FILE as it was (or absent), never half written. The tar is reproducible: members
sorted, mode 0644 (directories 0755), owner 0:0, mtime 0, no user or group names, so the
same image exported twice gives the same archive bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from cnpsfs.errors import CnpsfsError, UsageError
from cnpsfs.oci.blobs import atomic_file, scratch_file
from cnpsfs.oci.layout import LayoutSink, blob_path, parse_layout_reference
from cnpsfs.oci.model import canonical_json

log = logging.getLogger(__name__)


def _temp_dir_for(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CnpsfsError(f"{path}: the directory {parent} does not exist")
    if os.path.isdir(path):
        raise CnpsfsError(f"{path} is a directory, not an archive file")
    return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)


def _add_member(tf: tarfile.TarFile, name: str, *, source: str | None = None, data: bytes | None = None,
                directory: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tf.addfile(info)
        return
    info.mode = 0o644
    if data is not None:
        info.size = len(data)
        tf.addfile(info, _BytesReader(data))
        return
    assert source is not None
    info.size = os.path.getsize(source)
    with open(source, "rb") as f:
        tf.addfile(info, f)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read(self, n: int = -1) -> bytes:
        n = len(self._data) if n < 0 else n
        out, self._data = bytes(self._data[:n]), self._data[n:]
        return out


def write_tar_atomically(path: str, members: list[tuple[str, str | bytes | None]]) -> None:
    """Write *members* ((name, file path | bytes | None for a directory), in order) as the
    tar *path*: a temporary file beside it, fsynced, renamed into place."""
    with atomic_file(path, prefix=f".{os.path.basename(path)}.tmp-", suffix=".tar") as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, what in members:
            if what is None:
                _add_member(tf, name, directory=True)
            elif isinstance(what, bytes):
                _add_member(tf, name, data=what)
            else:
                _add_member(tf, name, source=what)


class OciArchiveSink(LayoutSink):
    """``oci-archive:FILE[:TAG]``: an OCI layout, written as one uncompressed tar.

    FILE is replaced, not merged into (as skopeo does): it holds this image only, tagged
    TAG when one is given, with its signature artifacts listed in ``index.json``.
    """

    def __init__(self, spec: str) -> None:
        self.path, tag = parse_layout_reference(spec, "oci-archive")
        self._tmp = _temp_dir_for(self.path)
        super().__init__(self._tmp, tag, f"oci-archive:{spec}")

    def finish(self) -> None:
        root = self._tmp
        members: list[tuple[str, str | bytes | None]] = [("blobs", None)]
        for alg in sorted(os.listdir(os.path.join(root, "blobs"))):
            members.append((f"blobs/{alg}", None))
            for name in sorted(os.listdir(os.path.join(root, "blobs", alg))):
                if not name.startswith(".tmp-"):
                    members.append((f"blobs/{alg}/{name}", os.path.join(root, "blobs", alg, name)))
        members += [("index.json", os.path.join(root, "index.json")), ("oci-layout", os.path.join(root, "oci-layout"))]
        write_tar_atomically(self.path, members)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def _docker_name(ref: str, what: str) -> str:
    """NAME:TAG as ``docker load`` lists it (a tag is required; ``latest`` when absent)."""
    if not ref:
        return ""
    if ref.startswith("@") or "@" in ref:
        raise UsageError(f"{what}: a docker-archive names its image NAME:TAG, not by digest or index")
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        ref += ":latest"
    name, _, tag = ref.rpartition(":")
    if not name or not tag or name != name.lower() or any(c.isspace() for c in ref):
        raise UsageError(f"{what}: {ref!r} is not a NAME:TAG reference (lower-case name)")
    return ref


class DockerArchiveSink:
    """``docker-archive:FILE[:NAME:TAG]``: the ``docker save`` layout, loadable by
    ``docker load`` and ``podman load``: ``manifest.json``, ``repositories``, the config
    as ``<hex>.json`` and each layer, uncompressed, as ``<diff_id hex>.tar``.

    Layers must be plain tars here (docker save has no compressed layers), so the
    exporter is told to write them uncompressed. There is no place for signatures.
    """

    #: The compression this destination needs ("" : plain tar layers).
    compression = ""

    def __init__(self, spec: str) -> None:
        self.reference = f"docker-archive:{spec}"
        self.path, _, ref = spec.partition(":")
        if not self.path:
            raise CnpsfsError(f"{self.reference}: no path given", exit_code=2)
        self.name = _docker_name(ref, self.reference)
        self._tmp = _temp_dir_for(self.path)
        self._blobs: dict[str, str] = {}
        self._manifest: dict[str, Any] | None = None

    def has_blob(self, digest: str) -> bool:
        return digest in self._blobs

    @contextlib.contextmanager
    def new_blob(self) -> Iterator[tuple[IO[bytes], str]]:
        with scratch_file(self._tmp, ".tmp-") as pair:
            yield pair

    def put_blob(self, path: str, digest: str, size: int, media_type: str) -> str:
        if media_type.endswith(("+gzip", "+zstd")):
            raise UsageError(f"{self.reference}: docker save archives hold uncompressed layers; "
                             "leave out --compression-format or give none")
        final = os.path.join(self._tmp, blob_path(digest).replace("/", "_"))
        os.rename(path, final)
        self._blobs[digest] = final
        return "uploaded"

    def put_manifest(self, data: bytes, media_type: str, digest: str) -> None:
        self._manifest = json.loads(data)

    def finish(self) -> None:
        manifest = self._manifest
        assert manifest is not None, "put_manifest comes before finish"
        config_digest = manifest["config"]["digest"]
        config_name = f"{config_digest.partition(':')[2]}.json"
        members: list[tuple[str, str | bytes | None]] = [(config_name, self._blobs[config_digest])]
        layers = []
        for layer in manifest["layers"]:
            # An uncompressed layer's blob digest is its diff_id: <diff_id hex>.tar, as podman save names it.
            name = f"{layer['digest'].partition(':')[2]}.tar"
            if name not in layers:
                members.append((name, self._blobs[layer["digest"]]))
            layers.append(name)
        tags = [self.name] if self.name else []
        members.append(("manifest.json", canonical_json([{"Config": config_name, "RepoTags": tags,
                                                          "Layers": layers}])))
        if self.name:
            repo, _, tag = self.name.rpartition(":")
            top = layers[-1].removesuffix(".tar") if layers else ""
            members.append(("repositories", canonical_json({repo: {tag: top}})))
        members.sort(key=lambda m: m[0])
        write_tar_atomically(self.path, members)

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
