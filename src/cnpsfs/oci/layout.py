"""OCI image layouts (a directory, or a tar of one) and ``docker save`` archives.

Both are read as an :class:`ImageSource`: the image's top manifest (or index) and its
blobs by descriptor. Nothing is trusted: a blob is only ever opened as a regular file
(no FIFO can hang a read, no symlink leaves the layout), and its bytes are checked
against the digest that names it by the caller as they stream past. Layouts are written
with a temporary file per blob, renamed into place once its digest is known, and
``index.json`` is replaced atomically, so a killed export leaves only temporary files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

from cnpsfs.errors import CnpsfsError, ImportRejected
from cnpsfs.oci.blobs import atomic_file, read_verified, scratch_file, sniff_compression
from cnpsfs.oci.model import (
    DOCKER_CONFIG,
    LAYER_MEDIA_TYPE,
    MAX_JSON,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    Index,
    canonical_json,
    check_digest,
    digest_of,
    load_json,
    parse_descriptor,
    short,
)

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"


class ImageSource(Protocol):
    """Where an image comes from: a layout, a ``docker save`` archive, a registry.

    The registry client (cnpsfs.transport) is adapted to this by :mod:`cnpsfs.oci.registry`.
    """

    #: The reference as the user gave it (``oci:DIR:TAG``), for messages and provenance.
    reference: str

    def root(self) -> tuple[bytes, str | None, str | None]:
        """The top manifest or index: its bytes, its media type and digest when known."""
        ...

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        """The blob's raw bytes, unverified (the caller hashes them as it reads)."""
        ...

    def close(self) -> None: ...


def read_blob(source: ImageSource, desc: Descriptor, what: str, *, limit: int = MAX_JSON) -> bytes:
    """A small blob, read whole and verified."""
    if desc.size > limit:
        raise ImportRejected(f"{what}: {desc.size} bytes, more than the {limit >> 20} MiB allowed")
    with contextlib.closing(source.open_blob(desc)) as stream:
        return read_verified(stream, desc.size, desc.digest, what, limit=limit)


def blob_path(digest: str) -> str:
    alg, _, hexpart = digest.partition(":")
    return f"blobs/{alg}/{hexpart}"


# --------------------------------------------------------------------------- file access


class _Files(Protocol):
    label: str

    def open(self, name: str) -> IO[bytes]: ...

    def exists(self, name: str) -> bool: ...


class DirFiles:
    """Files of a layout directory; only regular files are opened."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.label = root

    def open(self, name: str) -> IO[bytes]:
        path = os.path.join(self.root, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ImportRejected(f"{self.label}: cannot open {name}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ImportRejected(f"{self.label}: {name} is not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=1 << 20)

    def exists(self, name: str) -> bool:
        return os.path.lexists(os.path.join(self.root, name))


class _Slice(io.RawIOBase):
    """*size* bytes at *offset* of a file of our own (so layers can be read in parallel)."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        super().__init__()
        self._f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        self._f.seek(offset)
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: min(len(buffer), self._left)]
        n = self._f.readinto(view) or 0
        self._left -= n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class TarFiles:
    """Members of an uncompressed tar (a ``docker save`` archive, an OCI archive).

    Member names are normalised (``./`` dropped); symbolic and hard links between
    members (legacy ``docker save`` links identical layers) are followed inside the tar.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.label = path
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            with open(path, "rb") as f:
                head = f.read(6)
        except OSError as exc:
            raise ImportRejected(f"cannot open {path}: {exc.strerror}") from None
        if not os.path.isfile(path):
            raise ImportRejected(f"{path} is not a regular file")
        compression = sniff_compression(head)
        if compression:
            raise ImportRejected(f"{path}: {compression}-compressed archive; decompress it first "
                                 f"(the members must be readable in place)")
        try:
            with tarfile.open(path, "r:") as tf:
                for member in tf:
                    self.members[_norm(member.name)] = member
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ImportRejected(f"{path}: not a readable tar archive ({exc})") from None

    def _resolve(self, name: str) -> tarfile.TarInfo:
        seen = 0
        member = self.members.get(name)
        while member is not None and (member.issym() or member.islnk()) and seen < 16:
            target = member.linkname if member.islnk() else os.path.join(os.path.dirname(name), member.linkname)
            target = os.path.normpath(target)
            if target.startswith(("/", "../")) or target == "..":
                raise ImportRejected(f"{self.label}: member {name!r} links to {member.linkname!r}, "
                                     "outside the archive")
            name = _norm(target)
            member = self.members.get(name)
            seen += 1
        if member is None or not member.isreg():
            raise ImportRejected(f"{self.label}: no regular file {name!r} in the archive")
        return member

    def open(self, name: str) -> IO[bytes]:
        member = self._resolve(name)
        return io.BufferedReader(_Slice(self.path, member.offset_data, member.size), 1 << 20)

    def exists(self, name: str) -> bool:
        return name in self.members

    def size(self, name: str) -> int:
        return self._resolve(name).size


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


# --------------------------------------------------------------------------- OCI layouts


def parse_layout_reference(spec: str, transport: str) -> tuple[str, str]:
    """``DIR[:TAG]`` split at the first colon, as skopeo does."""
    path, _, tag = spec.partition(":")
    if not path:
        raise CnpsfsError(f"{transport}:{spec}: no path given", exit_code=2)
    return path, tag


class LayoutSource:
    """An image in an OCI layout: ``index.json`` names it by tag (or it is the only one)."""

    def __init__(self, files: _Files, tag: str, reference: str) -> None:
        self.files = files
        self.reference = reference
        what = f"{reference}: {LAYOUT_FILE}"
        if not files.exists(LAYOUT_FILE):
            raise ImportRejected(f"{reference}: not an OCI layout (no {LAYOUT_FILE} file)")
        with contextlib.closing(files.open(LAYOUT_FILE)) as f:
            marker = load_json(f.read(MAX_JSON + 1), what)
        if marker.get("imageLayoutVersion") != LAYOUT_VERSION:
            raise ImportRejected(f"{what}: unsupported imageLayoutVersion {marker.get('imageLayoutVersion')!r}")
        with contextlib.closing(files.open("index.json")) as f:
            index = load_json(f.read(MAX_JSON + 1), f"{reference}: index.json")
        if index.get("schemaVersion") != 2 or not isinstance(index.get("manifests"), list):
            raise ImportRejected(f"{reference}: index.json is not an image index")
        entries = [parse_descriptor(m, f"{reference}: index.json manifests[{i}]")
                   for i, m in enumerate(index["manifests"])]
        #: Entries with an artifactType are artifacts (signatures) referring to an image:
        #: listed for :meth:`referrers`, never chosen as the image.
        self._raw = [m for m in index["manifests"] if isinstance(m, dict)]
        images = [e for e, raw in zip(entries, index["manifests"], strict=True) if "artifactType" not in raw]
        self.descriptor = self._choose(images, tag)

    def _choose(self, entries: list[Descriptor], tag: str) -> Descriptor:
        if tag:
            found = [e for e in entries if e.annotations.get(REF_NAME) == tag]
            if not found:
                names = sorted({e.annotations[REF_NAME] for e in entries if REF_NAME in e.annotations})
                raise ImportRejected(f"{self.reference}: no image tagged {tag!r} in the layout "
                                     f"(tags: {', '.join(names) or 'none'})")
            return found[0]
        if len(entries) != 1:
            names = sorted({e.annotations.get(REF_NAME, "(untagged)") for e in entries})
            raise ImportRejected(f"{self.reference}: the layout holds {len(entries)} images; name one with "
                                 f":TAG (tags: {', '.join(names) or 'none'})")
        return entries[0]

    def root(self) -> tuple[bytes, str | None, str | None]:
        desc = self.descriptor
        data = read_blob(self, desc, f"{self.reference}: manifest {short(desc.digest)}")
        return data, desc.media_type, desc.digest

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        check_digest(desc.digest, f"{self.reference}: blob")
        return self.files.open(blob_path(desc.digest))

    def referrers(self, digest: str) -> list[dict[str, Any]]:
        """The index entries that are artifacts referring to *digest*.

        A layout lists the artifacts of all its images: those whose manifest names another
        subject are left out here (they are not suspect); one that cannot be read is
        listed, so the caller (who reads and checks each again) reports it.
        """
        out = []
        for m in self._raw:
            if "artifactType" not in m:
                continue
            try:
                desc = parse_descriptor(m, f"{self.reference}: index.json")
                subject = json.loads(read_blob(self, desc, f"{self.reference}: artifact")).get("subject")
                if isinstance(subject, dict) and subject.get("digest") != digest:
                    continue
            except (CnpsfsError, ValueError, AttributeError):
                pass
            out.append({"digest": m.get("digest"), "size": m.get("size"), "artifactType": m.get("artifactType")})
        return out

    def close(self) -> None:
        pass


def open_oci_dir(spec: str) -> LayoutSource:
    path, tag = parse_layout_reference(spec, "oci")
    if not os.path.isdir(path):
        raise ImportRejected(f"oci:{spec}: {path} is not a directory")
    return LayoutSource(DirFiles(path), tag, f"oci:{spec}")


def open_oci_archive(spec: str) -> LayoutSource:
    path, tag = parse_layout_reference(spec, "oci-archive")
    return LayoutSource(TarFiles(path), tag, f"oci-archive:{spec}")


# --------------------------------------------------------------------------- docker save archives


@dataclass
class _ArchiveImage:
    config: str
    repo_tags: list[str]
    layers: list[str]


class DockerArchiveSource:
    """``docker save`` / ``podman save`` output: ``manifest.json``, a config, layer tars.

    There is no registry manifest in such an archive: one is synthesised from
    ``manifest.json`` so the importer sees the same structure as from a layout. Layers
    are uncompressed tars in practice (compression is detected from their first bytes);
    an uncompressed layer's blob digest is its diff_id, so both checks still apply. The
    config's digest is checked against its file name when the name carries one.
    """

    def __init__(self, spec: str) -> None:
        self.reference = f"docker-archive:{spec}"
        path, _, ref = spec.partition(":")
        if not path:
            raise CnpsfsError(f"{self.reference}: no path given", exit_code=2)
        self.files = TarFiles(path)
        if not self.files.exists("manifest.json"):
            raise ImportRejected(f"{self.reference}: no manifest.json (not a docker save archive)")
        with contextlib.closing(self.files.open("manifest.json")) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise ImportRejected(f"{self.reference}: manifest.json is larger than {MAX_JSON >> 20} MiB")
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ImportRejected(f"{self.reference}: manifest.json is not valid JSON ({exc})") from None
        if not isinstance(raw, list) or not raw:
            raise ImportRejected(f"{self.reference}: manifest.json lists no image")
        images = [self._parse_item(item, number) for number, item in enumerate(raw)]
        self.image = self._choose(images, ref)
        self.repo_tags = self.image.repo_tags
        self._blobs: dict[str, str] = {}  # digest -> member name
        self._manifest = self._synthesise()

    def _parse_item(self, item: Any, number: int) -> _ArchiveImage:
        what = f"{self.reference}: manifest.json[{number}]"
        if not isinstance(item, dict):
            raise ImportRejected(f"{what}: not an object")
        config = item.get("Config")
        layers = item.get("Layers")
        tags = item.get("RepoTags") or []
        if not isinstance(config, str) or not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise ImportRejected(f"{what}: needs Config (a path) and Layers (a list of paths)")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ImportRejected(f"{what}: RepoTags must be a list of strings")
        for path in (config, *layers):
            if path.startswith("/") or ".." in path.split("/"):
                raise ImportRejected(f"{what}: path {path[:200]!r} leaves the archive")
        return _ArchiveImage(_norm(config), list(tags), [_norm(x) for x in layers])

    def _choose(self, images: list[_ArchiveImage], ref: str) -> _ArchiveImage:
        if ref.startswith("@"):
            try:
                return images[int(ref[1:])]
            except (ValueError, IndexError):
                raise ImportRejected(f"{self.reference}: no image number {ref[1:]} "
                                     f"(the archive holds {len(images)})") from None
        if ref:
            for image in images:
                if any(_same_docker_ref(ref, t) for t in image.repo_tags):
                    return image
            tags = sorted(t for image in images for t in image.repo_tags)
            raise ImportRejected(f"{self.reference}: no image tagged {ref!r} (tags: {', '.join(tags) or 'none'})")
        if len(images) > 1:
            tags = sorted(t for image in images for t in image.repo_tags)
            raise ImportRejected(f"{self.reference}: the archive holds {len(images)} images; name one with :NAME:TAG "
                                 f"or :@N (tags: {', '.join(tags) or 'none'})")
        return images[0]

    def _synthesise(self) -> bytes:
        with contextlib.closing(self.files.open(self.image.config)) as f:
            config_bytes = f.read(MAX_JSON + 1)
        what = f"{self.reference}: config {self.image.config}"
        config_digest = digest_of(config_bytes)
        named = _digest_in_name(self.image.config)
        if named is not None and named != config_digest:
            raise ImportRejected(f"{what}: digest mismatch: the file hashes to {config_digest}, its name says {named}")
        config = load_json(config_bytes, what)
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(self.image.layers):
            raise ImportRejected(f"{what}: rootfs.diff_ids does not list the archive's "
                                 f"{len(self.image.layers)} layers")
        self._blobs[config_digest] = self.image.config
        layers = []
        for number, (name, diff_id) in enumerate(zip(self.image.layers, diff_ids, strict=True)):
            with contextlib.closing(self.files.open(name)) as f:
                compression = sniff_compression(f.read(6))
            if compression not in ("", "gzip", "zstd"):
                raise ImportRejected(f"{self.reference}: layer {number + 1} ({name}): {compression} compression "
                                     "is not an OCI layer type")
            digest = _digest_in_name(name)
            if digest is None and not compression:
                digest = check_digest(diff_id, f"{what}: rootfs.diff_ids[{number}]")  # a plain tar's digest
            elif digest is None:
                digest = self._hash_member(name)  # compressed and unnamed (rare): hash it once more
            self._blobs[digest] = name
            layers.append({"mediaType": LAYER_MEDIA_TYPE[compression], "digest": digest,
                           "size": self.files.size(name)})
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                    "layers": layers}
        return canonical_json(manifest)

    def _hash_member(self, name: str) -> str:
        h = hashlib.sha256()
        with contextlib.closing(self.files.open(name)) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return f"sha256:{h.hexdigest()}"

    def root(self) -> tuple[bytes, str | None, str | None]:
        return self._manifest, OCI_MANIFEST, None

    def open_blob(self, desc: Descriptor) -> IO[bytes]:
        name = self._blobs.get(desc.digest)
        if name is None:
            raise ImportRejected(f"{self.reference}: no blob {desc.digest} in the archive")
        return self.files.open(name)

    def close(self) -> None:
        pass


def _digest_in_name(name: str) -> str | None:
    """``blobs/sha256/<hex>`` and legacy ``<hex>.json`` name their digest; layer ids do not."""
    match = re.fullmatch(r"blobs/(sha256|sha512)/([0-9a-f]{64,128})", name)
    if match:
        return f"{match[1]}:{match[2]}"
    match = re.fullmatch(r"([0-9a-f]{64})\.json", name)
    return f"sha256:{match[1]}" if match else None


def _same_docker_ref(want: str, tag: str) -> bool:
    def norm(ref: str) -> str:
        if "/" not in ref.split(":")[0]:
            ref = "library/" + ref
        first = ref.split("/")[0]
        if "." not in first and ":" not in first and first != "localhost":
            ref = "docker.io/" + ref
        return ref if ":" in ref.rsplit("/", 1)[-1] else ref + ":latest"

    return want == tag or norm(want) == norm(tag)


# --------------------------------------------------------------------------- writing layouts


class LayoutWriter:
    """Writes blobs and index entries into an OCI layout directory (created if missing)."""

    def __init__(self, root: str) -> None:
        self.root = root
        if os.path.lexists(root) and not os.path.isdir(root):
            raise CnpsfsError(f"{root} exists and is not a directory")
        if os.path.isdir(root) and os.listdir(root) and not os.path.exists(os.path.join(root, LAYOUT_FILE)):
            raise CnpsfsError(f"{root} is not empty and not an OCI layout")
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
        marker = os.path.join(root, LAYOUT_FILE)
        if not os.path.exists(marker):
            _atomic_write(marker, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(os.path.join(self.root, blob_path(digest)))

    @contextlib.contextmanager
    def temp_blob(self) -> Iterator[tuple[IO[bytes], str]]:
        """A temporary file inside the layout (same filesystem: the rename is atomic)."""
        with scratch_file(os.path.join(self.root, "blobs", "sha256"), ".tmp-") as pair:
            yield pair

    def commit_blob(self, tmp: str, digest: str) -> None:
        os.chmod(tmp, 0o644)
        os.rename(tmp, os.path.join(self.root, blob_path(digest)))

    def put_bytes(self, data: bytes, digest: str) -> None:
        if self.has_blob(digest):
            return
        with self.temp_blob() as (f, tmp):
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            self.commit_blob(tmp, digest)

    def _listed(self) -> tuple[str, list[Any]]:
        """``index.json``'s path and the manifests it lists so far (none for a new layout)."""
        path = os.path.join(self.root, "index.json")
        if not os.path.exists(path):
            return path, []
        with open(path, "rb") as f:
            index = load_json(f.read(MAX_JSON + 1), f"{self.root}/index.json")
        listed = index.get("manifests")
        return path, listed if isinstance(listed, list) else []

    def add_manifest(self, desc: dict[str, Any], tag: str) -> None:
        """Point *tag* (or the layout's untagged entry) at the manifest *desc*, atomically."""
        path, manifests = self._listed()
        entry = dict(desc)
        if tag:
            entry["annotations"] = {REF_NAME: tag}
        manifests = [m for m in manifests if not isinstance(m, dict) or "artifactType" in m
                     or (m.get("annotations") or {}).get(REF_NAME, "") != tag]
        manifests.append(entry)
        manifests = self._live_referrers(manifests)
        _atomic_write(path, canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))

    def add_referrers(self, descs: list[dict[str, Any]]) -> None:
        """List artifacts (manifests with a ``subject``, each with its ``artifactType``) in ``index.json``."""
        path, manifests = self._listed()
        have = {m.get("digest") for m in manifests if isinstance(m, dict)}
        manifests = manifests + [d for d in descs if d["digest"] not in have]
        _atomic_write(path, canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))

    def _live_referrers(self, manifests: list[Any]) -> list[Any]:
        """*manifests* without the artifacts whose subject is no longer listed (a replaced image's)."""
        listed = {m.get("digest") for m in manifests if isinstance(m, dict) and "artifactType" not in m}
        out = []
        for m in manifests:
            if isinstance(m, dict) and "artifactType" in m and isinstance(m.get("digest"), str):
                try:
                    with open(os.path.join(self.root, blob_path(check_digest(m["digest"], "index.json"))), "rb") as f:
                        subject = json.loads(f.read(MAX_JSON)).get("subject") or {}
                except (OSError, ValueError, AttributeError, CnpsfsError):
                    subject = {}
                if isinstance(subject, dict) and subject.get("digest") not in listed:
                    continue
            out.append(m)
        return out



class LayoutSink:
    """``oci:DIR[:TAG]``: an export's blobs renamed into the layout, ``index.json`` replaced last.

    *root* is the layout directory written; *reference* names the destination in messages
    (an ``oci-archive:`` writes a layout in a temporary directory, then tars it).
    """

    def __init__(self, root: str, tag: str, reference: str) -> None:
        self.reference = reference
        self.tag = tag
        self.writer = LayoutWriter(root)

    @classmethod
    def for_spec(cls, spec: str) -> LayoutSink:
        path, tag = parse_layout_reference(spec, "oci")
        return cls(path, tag, f"oci:{spec}")

    def has_blob(self, digest: str) -> bool:
        return self.writer.has_blob(digest)

    @contextlib.contextmanager
    def new_blob(self) -> Iterator[tuple[IO[bytes], str]]:
        with self.writer.temp_blob() as pair:
            yield pair

    def put_blob(self, path: str, digest: str, size: int, media_type: str) -> str:
        self.writer.commit_blob(path, digest)
        return "uploaded"

    def put_manifest(self, data: bytes, media_type: str, digest: str) -> None:
        self.writer.put_bytes(data, digest)
        self.writer.add_manifest({"mediaType": media_type, "digest": digest, "size": len(data)}, self.tag)

    def put_referrer(self, data: bytes, media_type: str, digest: str, artifact_type: str) -> None:
        """An artifact referring to an image: its manifest blob, listed in ``index.json``."""
        self.writer.put_bytes(data, digest)
        self.writer.add_referrers([{"mediaType": media_type, "digest": digest, "size": len(data),
                                    "artifactType": artifact_type}])

    def close(self) -> None:
        pass


def _atomic_write(path: str, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


__all__ = ["DockerArchiveSource", "ImageSource", "Index", "LayoutSink", "LayoutSource", "LayoutWriter",
           "open_oci_archive", "open_oci_dir", "read_blob"]
