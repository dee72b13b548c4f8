"""cnpsfs prefetch profiles carried by OCI images: one artifact manifest per profile.

A profile (docs/format.md §1.13) is a detached object filed under an image, like a
signature, so an exported image carries its profiles the same way (an artifact whose
``subject`` is the image manifest, :mod:`cnpsfs.oci.artifacts`), and the import files them
under the image it makes. Unlike a signature, a profile needs none of the objects it is
about: it names paths and byte ranges inside the image, never chunk or directory digests,
so it is as valid for the re-imported image (a new image object, new layer FileSets) as
for the one it was recorded on. The blob is the profile object's encoded bytes, unchanged:
its key 3 still names the image it was recorded on, which §1.13 allows (a reader reports
it, never refuses), and the object keeps its digest through the round trip.

A profile is advice, and an artifact is added by whoever may push to the repository: one
that cannot be read, does not decode, or refers to another image is ignored with a
warning naming it, and never fails the import. docs/format.md §1.15 defines the bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError
from cnpsfs.image.profiles import image_profiles, store_profile
from cnpsfs.oci.artifacts import ANN_CREATED, Artifact, artifact_manifest, read_artifacts, rfc3339
from cnpsfs.store import Store

log = logging.getLogger(__name__)

#: The artifactType of a profile artifact manifest, and the media type of its one layer:
#: the encoded profile object (canonical CBOR, §1.13).
ARTIFACT_TYPE = "application/vnd.cnpsfs.profile.v1+cbor"
#: The largest profile blob written or read. A profile at every §1.13 limit at once
#: encodes to about 10 MiB; decoding is bounded by the object limits like any object a
#: pull reads from a remote store.
MAX_BLOB = 16 << 20
#: Annotations on the artifact manifest (informative: the blob is what counts).
ANN_NAME = "org.cnpsfs.profile.name"
ANN_RECORDED_ON = "org.cnpsfs.profile.recorded-on"


@dataclass
class ProfileArtifact(Artifact):
    """One profile as an OCI artifact."""

    profile: bytes = b""  # the cnpsfs digest of the profile object
    name: str = ""


@dataclass
class CarriedProfile:
    """A profile artifact read back and decoded."""

    where: str  # for messages: "<reference>: profile artifact sha256:…"
    profile: fmt.Profile
    data: bytes  # the encoded object

    @property
    def digest(self) -> bytes:
        return fmt.digest_bytes(self.data)


def profile_artifacts(store: Store, subject: bytes, image_manifest: bytes) -> list[ProfileArtifact]:
    """An artifact per profile filed under *subject* (the one a mount takes of each name:
    the newest), referring to *image_manifest*. Malformed ones are left out, logged."""
    out: list[ProfileArtifact] = []
    names: set[str] = set()
    for stored in image_profiles(store, subject):
        if stored.profile is None:
            log.warning("profile %s of %s is unusable (%s): not exported", fmt.format_digest(stored.digest),
                        fmt.format_digest(subject), stored.error)
            continue
        profile = stored.profile
        if profile.name in names:
            continue  # an older one of the same name: a mount would not take it either
        names.add(profile.name)
        blob = store.get(stored.digest)
        if len(blob) > MAX_BLOB:
            log.warning("profile %s (%s) is %d bytes, more than an artifact may carry (%d): not exported",
                        profile.name, fmt.format_digest(stored.digest), len(blob), MAX_BLOB)
            continue
        annotations = {ANN_NAME: profile.name, ANN_RECORDED_ON: fmt.format_digest(profile.image)}
        if profile.created_ns:
            annotations[ANN_CREATED] = rfc3339(profile.created_ns // 1_000_000_000)
        manifest = artifact_manifest(ARTIFACT_TYPE, blob, image_manifest, annotations)
        out.append(ProfileArtifact(ARTIFACT_TYPE, blob, manifest, stored.digest, profile.name))
    return out


def collect(source: Any, manifest_digest: str, listed: list[dict[str, Any]]) -> list[CarriedProfile]:
    """The profiles of the profile artifacts in *listed* referring to *manifest_digest*:
    read (bounded, verified) and strictly decoded; the others ignored with a warning."""
    found: list[CarriedProfile] = []
    for what, blob in read_artifacts(source, manifest_digest, listed, ARTIFACT_TYPE, "profile", limit=MAX_BLOB):
        try:
            profile = fmt.decode_profile(blob)
        except CnpsfsError as exc:
            log.warning("%s: ignored: the profile does not decode: %s", what, exc)
            continue
        found.append(CarriedProfile(what, profile, blob))
    return found


def file_profiles(store: Store, image: bytes, carried: list[CarriedProfile]) -> list[bytes]:
    """File *carried* under *image*: of each name the newest (then the lowest digest, as a
    mount chooses), replacing the image's profile of that name. The digests filed."""
    chosen: dict[str, CarriedProfile] = {}
    for item in sorted(carried, key=lambda c: (-c.profile.created_ns, c.digest)):
        if item.profile.name in chosen:
            log.info("%s: an older profile %r than another artifact's: not filed", item.where, item.profile.name)
            continue
        chosen[item.profile.name] = item
    filed = []
    for name in sorted(chosen):
        item = chosen[name]
        filed.append(store_profile(store, image, item.profile))
        if item.profile.image != image:
            log.info("%s: profile %r, recorded on %s, filed under %s", item.where, name,
                     fmt.format_digest(item.profile.image), fmt.format_digest(image))
    return filed


__all__ = ["ARTIFACT_TYPE", "MAX_BLOB", "CarriedProfile", "ProfileArtifact", "collect", "file_profiles",
           "profile_artifacts"]
