"""OCI and Docker schema 2 manifests, indexes and image configs, parsed strictly.

Everything here comes from outside (a registry, a layout someone handed us, a ``docker
save`` archive), so every field used is type-checked and every size bounded before it is
trusted: a manifest or config larger than :data:`MAX_JSON` is refused before it is read
whole, a digest must be well-formed, an unknown media type is an error naming it. The
parsed values are plain dataclasses; nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
from dataclasses import dataclass, field
from typing import Any

from cnpsfs.errors import ImportRejected, UsageError

#: Manifests, indexes and configs are small; anything bigger is hostile or broken.
MAX_JSON = 4 << 20

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
#: What a registry is asked for (the Accept header of a manifest request).
ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)

#: Layer media type -> compression ("" for a plain tar).
LAYER_COMPRESSION = {
    OCI_LAYER: "", OCI_LAYER_GZIP: "gzip", OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_ND: "", OCI_LAYER_ND_GZIP: "gzip", OCI_LAYER_ND_ZSTD: "zstd",
    DOCKER_LAYER_GZIP: "gzip",
}
#: Compression -> the OCI media type an export writes.
LAYER_MEDIA_TYPE = {"": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}

REF_NAME = "org.opencontainers.image.ref.name"
_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_MAX_ITEMS = 10_000  # layers of a manifest, manifests of an index


def shown(text: str) -> str:
    """*text* from outside as it may appear in a one-line message: control characters
    (a newline could forge a second line in a log) escaped as Python escapes them."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def check_digest(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise ImportRejected(f"{where}: invalid digest {str(value)[:80]!r} (want sha256:<64 hex> or sha512:<128 hex>)")
    return value


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def short(digest: str) -> str:
    """``sha256:0123456789ab``: enough to name a blob in a message."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}:{hexpart[:12]}"


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def matches(self, other: Platform) -> bool:
        """*other* (an index entry) runs where *self* (what was asked for) is wanted.

        No variant asked for accepts any variant; arm64 without a variant is v8.
        """
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if not self.variant:
            return True
        return _norm_variant(self.architecture, self.variant) == _norm_variant(other.architecture, other.variant)


def _norm_variant(arch: str, variant: str) -> str:
    return variant or ("v8" if arch == "arm64" else "")


_GO_ARCH = {"x86_64": ("amd64", ""), "amd64": ("amd64", ""), "aarch64": ("arm64", ""), "arm64": ("arm64", ""),
            "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i386": ("386", ""), "i686": ("386", ""),
            "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", "")}


def host_platform() -> Platform:
    arch, variant = _GO_ARCH.get(_platform.machine(), (_platform.machine(), ""))
    return Platform("linux", arch, variant)


def parse_platform(text: str) -> Platform:
    """``OS/ARCH[/VARIANT]`` as podman and skopeo spell it (Go names: amd64, arm64)."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(re.fullmatch(r"[a-z0-9._-]+", p) for p in parts):
        raise UsageError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    return Platform(*parts)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()


@dataclass
class Manifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Index:
    media_type: str
    manifests: list[Descriptor]


@dataclass
class ImageConfig:
    """The parts of an image config cnpsfs uses; *raw* is the whole parsed document."""

    platform: Platform
    diff_ids: list[str]
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    stop_signal: str = ""
    created: str = ""
    author: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


def load_json(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_JSON:
        raise ImportRejected(f"{what}: {len(data)} bytes, more than the {MAX_JSON >> 20} MiB allowed")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ImportRejected(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ImportRejected(f"{what}: not a JSON object")
    return value


def _str(obj: dict[str, Any], key: str, what: str, *, required: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise ImportRejected(f"{what}: missing {key!r}")
        return ""
    if not isinstance(value, str):
        raise ImportRejected(f"{what}: {key!r} must be a string")
    return value


def _str_list(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImportRejected(f"{what} must be a list of strings")
    return list(value)


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ImportRejected(f"{what} must be an object of strings")
    return dict(value)


def _keys(value: Any, what: str) -> list[str]:
    """A JSON object used as a set (ExposedPorts, Volumes): its keys, sorted."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ImportRejected(f"{what} must be an object")
    return sorted(value)


def parse_descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ImportRejected(f"{what}: not a descriptor object")
    media_type = _str(raw, "mediaType", what, required=True)
    digest = check_digest(raw.get("digest"), what)
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImportRejected(f"{what}: size must be a non-negative integer")
    plat = None
    if raw.get("platform") is not None:
        p = raw["platform"]
        if not isinstance(p, dict):
            raise ImportRejected(f"{what}: platform must be an object")
        plat = Platform(_str(p, "os", what), _str(p, "architecture", what), _str(p, "variant", what))
    urls = _str_list(raw.get("urls"), f"{what}: urls") or []
    return Descriptor(media_type, digest, size, plat, _str_map(raw.get("annotations"), f"{what}: annotations"),
                      tuple(urls))


def parse_manifest_document(data: bytes, media_type: str | None, what: str) -> Manifest | Index:
    """A manifest or an index; *media_type* is what the transport said (header or descriptor)."""
    doc = load_json(data, what)
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ImportRejected(f"{what}: mediaType must be a string")
    if media_type in DOCKER_SCHEMA1 or declared in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ImportRejected(f"{what}: Docker schema 1 manifests are not supported (convert with skopeo copy)")
    if media_type and declared and media_type != declared:
        raise ImportRejected(f"{what}: served as {shown(media_type)} but declares mediaType {shown(declared)}")
    kind = media_type or declared
    if not kind:
        # OCI allows mediaType to be absent; the shape then tells.
        kind = OCI_INDEX if "manifests" in doc else OCI_MANIFEST if "config" in doc else ""
    if kind not in MANIFEST_TYPES + INDEX_TYPES:
        raise ImportRejected(f"{what}: unknown manifest media type {kind or '(none)'!r}")
    if doc.get("schemaVersion") != 2:
        raise ImportRejected(f"{what}: schemaVersion must be 2")
    if kind in INDEX_TYPES:
        items = doc.get("manifests")
        if not isinstance(items, list) or len(items) > _MAX_ITEMS:
            raise ImportRejected(f"{what}: 'manifests' must be a list (at most {_MAX_ITEMS})")
        return Index(kind, [parse_descriptor(m, f"{what}: manifests[{i}]") for i, m in enumerate(items)])
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) > _MAX_ITEMS:
        raise ImportRejected(f"{what}: 'layers' must be a list (at most {_MAX_ITEMS})")
    config = parse_descriptor(doc.get("config"), f"{what}: config")
    return Manifest(kind, config, [parse_descriptor(x, f"{what}: layers[{i}]") for i, x in enumerate(layers)],
                    _str_map(doc.get("annotations"), f"{what}: annotations"))


def layer_compression(desc: Descriptor, what: str) -> str:
    """The compression a layer's media type names; unknown and foreign types are errors."""
    if desc.media_type == DOCKER_FOREIGN_GZIP or desc.urls:
        raise ImportRejected(f"{what}: foreign layer ({shown(desc.media_type)}) cannot be imported")
    try:
        return LAYER_COMPRESSION[desc.media_type]
    except KeyError:
        raise ImportRejected(f"{what}: unknown layer media type {desc.media_type!r}") from None


def check_config_descriptor(desc: Descriptor, what: str) -> None:
    if desc.media_type not in CONFIG_TYPES:
        raise ImportRejected(f"{what}: config media type {desc.media_type!r} is not a container image config")
    if desc.size > MAX_JSON:
        raise ImportRejected(f"{what}: config of {desc.size} bytes, more than the {MAX_JSON >> 20} MiB allowed")


def parse_config(data: bytes, what: str) -> ImageConfig:
    doc = load_json(data, what)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImportRejected(f"{what}: rootfs.type must be 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise ImportRejected(f"{what}: rootfs.diff_ids must be a list")
    diff_ids = [check_digest(d, f"{what}: rootfs.diff_ids[{i}]") for i, d in enumerate(diff_ids)]
    plat = Platform(_str(doc, "os", what), _str(doc, "architecture", what), _str(doc, "variant", what))
    run = doc.get("config") or {}
    if not isinstance(run, dict):
        raise ImportRejected(f"{what}: config must be an object")
    history = doc.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ImportRejected(f"{what}: history must be a list of objects")
    clean_history = []
    for number, item in enumerate(history):
        entry: dict[str, Any] = {}
        for key in ("created", "created_by", "author", "comment"):
            if item.get(key) is not None:
                entry[key] = _str(item, key, f"{what}: history[{number}]")
        if item.get("empty_layer") is not None:
            if not isinstance(item["empty_layer"], bool):
                raise ImportRejected(f"{what}: history[{number}].empty_layer must be true or false")
            entry["empty_layer"] = item["empty_layer"]
        clean_history.append(entry)
    env = _str_list(run.get("Env"), f"{what}: config.Env") or []
    return ImageConfig(
        platform=plat, diff_ids=diff_ids,
        entrypoint=_str_list(run.get("Entrypoint"), f"{what}: config.Entrypoint"),
        cmd=_str_list(run.get("Cmd"), f"{what}: config.Cmd"),
        env=env, workdir=_str(run, "WorkingDir", what), user=_str(run, "User", what),
        labels=_str_map(run.get("Labels"), f"{what}: config.Labels"),
        exposed_ports=_keys(run.get("ExposedPorts"), f"{what}: config.ExposedPorts"),
        volumes=_keys(run.get("Volumes"), f"{what}: config.Volumes"),
        stop_signal=_str(run, "StopSignal", what), created=_str(doc, "created", what),
        author=_str(doc, "author", what), history=clean_history, raw=doc)


def select_platform(index: Index, want: Platform, what: str) -> Descriptor:
    """The first manifest of *index* for *want*; the error lists what the index offers."""
    offered = []
    for desc in index.manifests:
        if desc.platform is None or desc.platform.os in ("", "unknown"):
            continue  # attestations and other non-images
        offered.append(shown(str(desc.platform)))
        if want.matches(desc.platform):
            if desc.media_type not in MANIFEST_TYPES + INDEX_TYPES:
                raise ImportRejected(f"{what}: entry for {shown(str(desc.platform))} has unknown media type "
                                     f"{desc.media_type!r}")
            return desc
    if len(index.manifests) == 1 and index.manifests[0].platform is None:
        return index.manifests[0]  # an index of one image that names no platform (umoci, skopeo oci:)
    available = ", ".join(sorted(set(offered))) or "none"
    raise ImportRejected(f"{what}: no image for platform {want} (available: {available}); choose with --platform")


def canonical_json(value: Any) -> bytes:
    """The bytes cnpsfs writes for a JSON document: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
