"""OCI artifacts of cnpsfs's detached objects: what signatures and profiles share.

A detached object (a signature, a prefetch profile) is about an image without being part
of it, so an OCI image carries it the way OCI 1.1 carries such things: as an artifact
manifest of its own ``artifactType``, with the empty config, one layer (the blob), and a
``subject`` naming the image manifest. This module writes those manifests, lists what
refers to an image (a registry's referrers API or fallback tag, a layout's
``index.json``: the sources do that), and reads an artifact back by digest, bounded and
checked. What the blob holds, and what is done with it, is for the callers
(:mod:`cnpsfs.oci.signatures`, :mod:`cnpsfs.oci.profiles`). docs/format.md §1.14 and
§1.15 define the bytes.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import Any

from cnpsfs.errors import CnpsfsError
from cnpsfs.oci.model import MAX_JSON, OCI_MANIFEST, canonical_json, digest_of, short

log = logging.getLogger(__name__)

#: The empty config of artifacts (OCI image spec 1.1, "Guidance for an empty descriptor").
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_DATA = b"{}"
EMPTY_DIGEST = digest_of(EMPTY_DATA)
ANN_CREATED = "org.opencontainers.image.created"
#: How many artifacts of one type referring to one image are read at most (more: logged).
MAX_ARTIFACTS = 64


class Rejected(Exception):
    """An artifact that is ignored (logged), not an import error."""


@dataclass
class Artifact:
    """One detached object as an OCI artifact: its layer blob and manifest."""

    artifact_type: str
    blob: bytes
    manifest: bytes

    @property
    def blob_digest(self) -> str:
        return digest_of(self.blob)

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


def rfc3339(seconds: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def artifact_manifest(artifact_type: str, blob: bytes, image_manifest: bytes, annotations: dict[str, str]) -> bytes:
    """The artifact manifest of *blob* referring to *image_manifest* (canonical JSON: no clock,
    so the same blob gives the same artifact digest, and a registry lists it once)."""
    return canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_DATA),
                   "data": base64.b64encode(EMPTY_DATA).decode("ascii")},
        "layers": [{"mediaType": artifact_type, "digest": digest_of(blob), "size": len(blob)}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": digest_of(image_manifest), "size": len(image_manifest)},
        "annotations": annotations,
    })


def parse_artifact_manifest(data: bytes, image_manifest_digest: str, what: str, artifact_type: str, *,
                            limit: int = MAX_JSON) -> tuple[str, int]:
    """Check an artifact manifest of *artifact_type*; its layer's digest and size (at most *limit*)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise Rejected(f"{what}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2 or doc.get("mediaType") != OCI_MANIFEST:
        raise Rejected(f"{what}: not an OCI image manifest")
    if doc.get("artifactType") != artifact_type:
        raise Rejected(f"{what}: artifactType is {str(doc.get('artifactType'))[:80]!r}, not {artifact_type}")
    subject = doc.get("subject")
    if not isinstance(subject, dict) or subject.get("digest") != image_manifest_digest:
        got = subject.get("digest") if isinstance(subject, dict) else None
        raise Rejected(f"{what}: refers to {str(got)[:80]}, not to the image {short(image_manifest_digest)}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise Rejected(f"{what}: must have exactly one layer")
    layer = layers[0]
    digest, size = layer.get("digest"), layer.get("size")
    if layer.get("mediaType") != artifact_type or not isinstance(digest, str) or not digest.startswith("sha256:") \
            or len(digest) != 71 or not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= limit:
        raise Rejected(f"{what}: its layer is not a {artifact_type} blob of at most {limit >> 20} MiB")
    return digest, size


def list_referrers(source: Any, manifest_digest: str) -> list[dict[str, Any]]:
    """The descriptors *source* lists as referring to *manifest_digest* (none for a source
    without ``referrers``, a docker save archive). Listing failures are the source's errors."""
    lister = getattr(source, "referrers", None)
    return [] if lister is None else list(lister(manifest_digest))


def read_artifacts(source: Any, manifest_digest: str, listed: list[dict[str, Any]], artifact_type: str, noun: str,
                   *, limit: int = MAX_JSON) -> list[tuple[str, bytes]]:
    """The blobs of the *artifact_type* artifacts in *listed* that refer to *manifest_digest*:
    (what, blob) pairs, *what* naming the artifact for messages. Each manifest and blob is
    read by digest (verified) and bounded; one that cannot be read or does not check out
    is ignored with a warning."""
    from cnpsfs.oci.layout import read_blob
    from cnpsfs.oci.model import Descriptor

    mine = [d for d in listed if d.get("artifactType") == artifact_type]
    if len(mine) > MAX_ARTIFACTS:
        log.warning("%s: %d %s artifacts refer to %s; only the first %d are read", source.reference, len(mine), noun,
                    short(manifest_digest), MAX_ARTIFACTS)
    out = []
    for entry in mine[:MAX_ARTIFACTS]:
        digest, size = entry.get("digest"), entry.get("size")
        what = f"{source.reference}: {noun} artifact {str(digest)[:19]}"
        try:
            if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool):
                raise Rejected(f"{what}: the referrers list gives no digest and size")
            data = read_blob(source, Descriptor(OCI_MANIFEST, digest, size), what)
            blob_digest, blob_size = parse_artifact_manifest(data, manifest_digest, what, artifact_type, limit=limit)
            blob = read_blob(source, Descriptor(artifact_type, blob_digest, blob_size), f"{what}: blob", limit=limit)
        except (Rejected, CnpsfsError) as exc:
            log.warning("%s: ignored", exc)
            continue
        out.append((what, blob))
    return out


__all__ = ["ANN_CREATED", "EMPTY_DATA", "EMPTY_DIGEST", "EMPTY_MEDIA_TYPE", "MAX_ARTIFACTS", "Artifact", "Rejected",
           "artifact_manifest", "list_referrers", "parse_artifact_manifest", "read_artifacts", "rfc3339"]
