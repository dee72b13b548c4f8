"""cnpsfs signatures carried by OCI images: one artifact manifest per signature.

A cnpsfs signature vouches for a cnpsfs object digest (an image or a FileSet), not for
an OCI manifest, and importing an exported image gives new layer FileSets (named
``layer.oci/diff``) and a new image object (with OCI provenance), so the signature could
not be checked against anything after a round trip through a registry. The artifact
therefore carries, besides the signature object, the signed object itself and the image
and FileSet objects it names (never directories or chunks: those are rebuilt by the
import from the layers). On import, the carried objects are accepted only when they
compose, layer by layer, to exactly the directory trees the import built from the
layers; then the signed object is restored as it was signed (its digest, name and
version) and the signatures are filed under it, where the trust policy finds them.

Nothing the registry or the layout returns is trusted: an artifact is read by digest
(verified), parsed strictly and bounded; one that does not decode, does not match the
image, or names another subject is ignored with a warning naming it (an artifact is
added by whoever may push to the repository, so a bad one must not block the import of
the image it hangs from). The Ed25519 signature itself is checked by the policy
decision (mount, bundle, pull), with the keys the policy names. docs/format.md,
"Signatures in OCI images", defines the bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, FormatError
from cnpsfs.image.manifest import active_layers, stacking_order
from cnpsfs.oci.artifacts import (
    ANN_CREATED,
    Artifact,
    artifact_manifest,
    list_referrers,
    read_artifacts,
    rfc3339,
)
from cnpsfs.oci.artifacts import Rejected as _Rejected
from cnpsfs.oci.artifacts import parse_artifact_manifest as _parse_artifact_manifest
from cnpsfs.oci.model import MAX_JSON, canonical_json
from cnpsfs.store import T_FILESET, T_IMAGE, Store
from cnpsfs.trust.signature import Signature, signatures_for

log = logging.getLogger(__name__)

#: The artifactType of a signature artifact manifest, and the media type of its one layer.
ARTIFACT_TYPE = "application/vnd.cnpsfs.signature.v1+json"
#: Annotations on the artifact manifest (informative: the blob is what counts).
ANN_SUBJECT = "org.cnpsfs.signature.subject"
ANN_KEY = "org.cnpsfs.signature.key"
ANN_REVISION = "org.cnpsfs.signature.revision"
#: How many objects one artifact may carry (an image, nested images, their FileSets).
MAX_OBJECTS = 4 * fmt.MAX_LAYERS


@dataclass
class SignatureArtifact(Artifact):
    """One signature as an OCI artifact: its layer blob and manifest."""

    signature: bytes = b""  # the cnpsfs digest of the signature object


# --------------------------------------------------------------------------- export


def carried_objects(store: Store, subject: bytes) -> list[bytes]:
    """The encoded subject, then every image and FileSet object it names (each once)."""
    out: dict[bytes, bytes] = {}
    todo = [subject]
    while todo:
        digest = todo.pop(0)
        if digest in out:
            continue
        data = store.get(digest)
        out[digest] = data
        if fmt.decode_object(data)[0] == fmt.TYPE_IMAGE:
            todo.extend(layer.digest for layer in fmt.decode_image(data).layers)
    return list(out.values())


def signature_artifacts(store: Store, subject: bytes, image_manifest: bytes) -> list[SignatureArtifact]:
    """An artifact per readable signature filed under *subject*, referring to *image_manifest*.

    The artifacts are functions of the signature and the objects alone (no clock), so
    the same export twice gives the same artifact digests (a registry lists each once).
    """
    stored = [s for s in signatures_for(store, subject) if s.signature is not None]
    if not stored:
        return []
    objects = [base64.b64encode(o).decode("ascii") for o in carried_objects(store, subject)]
    out = []
    for item in sorted(stored, key=lambda s: s.digest):
        assert item.signature is not None
        try:
            payload = item.signature.payload()
        except FormatError as exc:
            log.warning("signature %s of %s does not decode (%s): not exported", fmt.format_digest(item.digest),
                        fmt.format_digest(subject), exc)
            continue
        blob = canonical_json({"signature": base64.b64encode(item.signature.encode()).decode("ascii"),
                               "objects": objects})
        if len(blob) > MAX_JSON:
            log.warning("signature %s: the objects it needs are %d bytes, more than an artifact may carry "
                        "(%d): not exported", fmt.format_digest(item.digest), len(blob), MAX_JSON)
            continue
        from cnpsfs.trust.keys import format_key_id

        manifest = artifact_manifest(ARTIFACT_TYPE, blob, image_manifest, {
            ANN_SUBJECT: fmt.format_digest(payload.subject), ANN_KEY: format_key_id(payload.key_id),
            ANN_REVISION: str(payload.revision), ANN_CREATED: rfc3339(payload.timestamp)})
        out.append(SignatureArtifact(ARTIFACT_TYPE, blob, manifest, item.digest))
    return out


# --------------------------------------------------------------------------- import


@dataclass
class CarriedSignature:
    """A signature artifact read back and decoded (not yet matched against the layers)."""

    where: str  # for messages: "<reference>: signature artifact sha256:…"
    signature: Signature
    signature_bytes: bytes
    subject: bytes
    kind: str
    objects: dict[bytes, bytes] = field(default_factory=dict)  # cnpsfs digest -> encoded object


def parse_artifact_manifest(data: bytes, image_manifest_digest: str, what: str) -> str:
    """Check a signature artifact manifest; returns its layer's digest (size checked by the reader)."""
    return _parse_artifact_manifest(data, image_manifest_digest, what, ARTIFACT_TYPE)[0]


def decode_blob(blob: bytes, what: str) -> CarriedSignature:
    """The signature and objects of an artifact's blob, every field checked."""
    try:
        doc = json.loads(blob)
    except (ValueError, RecursionError):
        raise _Rejected(f"{what}: the blob is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"signature", "objects"} or not isinstance(doc["objects"], list) \
            or not isinstance(doc["signature"], str) or not 0 < len(doc["objects"]) <= MAX_OBJECTS:
        raise _Rejected(f"{what}: the blob must hold 'signature' and 1 to {MAX_OBJECTS} 'objects'")
    try:
        sig_bytes = base64.b64decode(doc["signature"], validate=True)
        raw_objects = [base64.b64decode(o, validate=True) for o in doc["objects"]]
    except (binascii.Error, TypeError, ValueError):
        raise _Rejected(f"{what}: the blob has invalid base64") from None
    try:
        signature = Signature.decode(sig_bytes)
        payload = signature.payload()
    except (FormatError, CnpsfsError) as exc:
        raise _Rejected(f"{what}: the signature object does not decode: {exc}") from None
    objects: dict[bytes, bytes] = {}
    for number, data in enumerate(raw_objects):
        try:
            kind = fmt.decode_object(data)[0]
            if kind == fmt.TYPE_IMAGE:
                fmt.decode_image(data)
            elif kind == fmt.TYPE_FILESET:
                fmt.decode_fileset(data)
            else:
                raise FormatError(f"a {kind} object, not an image or FileSet")
        except (FormatError, CnpsfsError) as exc:
            raise _Rejected(f"{what}: object {number} does not decode: {exc}") from None
        objects[fmt.digest_bytes(data)] = data
    return CarriedSignature(what, signature, sig_bytes, payload.subject, payload.kind, objects)


class _Objects:
    """The carried objects as the little of a store that image composition reads."""

    def __init__(self, objects: dict[bytes, bytes], what: str) -> None:
        self.objects = objects
        self.what = what

    def _get(self, digest: bytes) -> bytes:
        data = self.objects.get(digest)
        if data is None:
            raise _Rejected(f"{self.what}: does not carry {fmt.format_digest(digest)}, which the signed image names")
        return data

    def get_fileset(self, digest: bytes) -> fmt.FileSet:
        return fmt.decode_fileset(self._get(digest))

    def get_image(self, digest: bytes) -> fmt.Image:
        return fmt.decode_image(self._get(digest))


def _stack(carried: CarriedSignature) -> list[tuple[fmt.Entry, tuple[bytes, ...]]]:
    """The (root entry, placement) of each OCI layer the signed object exports as."""
    objects = _Objects(carried.objects, carried.where)
    data = objects._get(carried.subject)
    kind = fmt.decode_object(data)[0]
    if (kind == fmt.TYPE_IMAGE) != (carried.kind == "image"):
        raise _Rejected(f"{carried.where}: the signature is for a {carried.kind}, the object is a {kind}")
    if kind == fmt.TYPE_FILESET:
        return [(fmt.decode_fileset(data).root, ())]
    image = fmt.decode_image(data)
    try:
        layers = active_layers(objects, image, carried.subject)  # type: ignore[arg-type]
    except CnpsfsError as exc:
        raise _Rejected(f"{carried.where}: the signed image does not compose: {exc}") from None
    return [(info.root, info.at) for info, _whiteouts in stacking_order(image, layers)]


@dataclass
class Restored:
    """The signed object put back: what the import tags instead of an image of its own."""

    digest: bytes
    type_code: int
    name: str
    version: str
    signatures: list[bytes]


def matching(store: Store, carried: list[CarriedSignature], layer_roots: list[fmt.Entry]) -> list[CarriedSignature]:
    """The signatures whose signed object exports as exactly *layer_roots* (bottom to top),
    and all of whose FileSets' trees the store holds (an unlinked layer was not exported)."""
    out = []
    for item in carried:
        try:
            stack = _stack(item)
            for digest in _closure(item):
                data = item.objects[digest]
                if fmt.decode_object(data)[0] == fmt.TYPE_FILESET:
                    fileset = fmt.decode_fileset(data)
                    if fileset.root.tree is not None and not store.contains(fileset.root.tree):
                        raise _Rejected(f"{item.where}: the signed {item.kind} names {fileset.name}@"
                                        f"{fileset.version}, whose tree the image's layers do not hold")
        except _Rejected as exc:
            log.warning("%s: ignored", exc)
            continue
        if len(stack) != len(layer_roots) or any(at or root != got for (root, at), got in
                                                  zip(stack, layer_roots, strict=False)):
            log.warning("%s: ignored: the signed %s %s is not what the image's layers hold", item.where, item.kind,
                        fmt.format_digest(item.subject))
            continue
        out.append(item)
    return out


def collect(source: Any, manifest_digest: str, listed: list[dict[str, Any]] | None = None) -> list[CarriedSignature]:
    """The cnpsfs signature artifacts *source* lists as referring to *manifest_digest*.

    *listed* is what the source lists (:func:`cnpsfs.oci.artifacts.list_referrers`; listed
    here when None). Listing failures are the source's errors (a registry that fails says
    so); an artifact that cannot be read or does not decode is ignored with a warning.
    """
    if listed is None:
        listed = list_referrers(source, manifest_digest)
    found: list[CarriedSignature] = []
    for what, blob in read_artifacts(source, manifest_digest, listed, ARTIFACT_TYPE, "signature"):
        try:
            found.append(decode_blob(blob, what))
        except _Rejected as exc:
            log.warning("%s: ignored", exc)
    return found


def choose(found: list[CarriedSignature]) -> list[CarriedSignature]:
    """The signatures of one subject: the one most signatures name (then the smallest digest)."""
    if not found:
        return []
    by_subject: dict[bytes, list[CarriedSignature]] = {}
    for item in found:
        by_subject.setdefault(item.subject, []).append(item)
    subject = min(by_subject, key=lambda s: (-len(by_subject[s]), s))
    for other in by_subject:
        if other != subject:
            log.warning("signatures for %s ignored: the image also carries signatures for %s",
                        fmt.format_digest(other), fmt.format_digest(subject))
    return by_subject[subject]


def restore(store: Store, chosen: list[CarriedSignature], *,
            check: Callable[[bytes, str], object] | None = None) -> Restored:
    """Store the signed object, what it names and its signatures; tag it as it was signed.

    Call with the layer FileSets' trees in the store (the import just wrote them) and the
    store's shared lock held (gc must not sweep them before the tag is set). *check(digest,
    name)* runs once the objects and signatures are stored and before the tag is set (the
    trust policy's decision, as for pull: raising leaves the object untagged).
    """
    first = chosen[0]
    data = first.objects[first.subject]
    is_image = fmt.decode_object(data)[0] == fmt.TYPE_IMAGE
    named = fmt.decode_image(data) if is_image else fmt.decode_fileset(data)
    type_code = T_IMAGE if is_image else T_FILESET
    with store.writer() as writer:
        needed = _closure(first)
        for digest in needed:
            writer.add_object(first.objects[digest])
        signatures = list(dict.fromkeys(writer.add_object(item.signature_bytes) for item in chosen))
        writer.commit(attach=[(first.subject, d) for d in signatures])  # filed before the decision reads them
    if check is not None:
        check(first.subject, named.name)
    with store.writer() as writer:
        writer.commit([(named.name, named.version, type_code, first.subject)])
    return Restored(first.subject, type_code, named.name, named.version, signatures)


def _closure(carried: CarriedSignature) -> list[bytes]:
    """The carried objects the subject reaches (others are not stored), bottom first."""
    seen: dict[bytes, None] = {}

    def visit(digest: bytes) -> None:
        if digest in seen:
            return
        data = carried.objects[digest]
        if fmt.decode_object(data)[0] == fmt.TYPE_IMAGE:
            for layer in fmt.decode_image(data).layers:
                if layer.digest in carried.objects:
                    visit(layer.digest)
        seen[digest] = None

    visit(carried.subject)
    return list(seen)


__all__ = ["ARTIFACT_TYPE", "CarriedSignature", "Restored", "SignatureArtifact", "choose", "collect", "decode_blob",
           "matching", "parse_artifact_manifest", "restore", "signature_artifacts"]
