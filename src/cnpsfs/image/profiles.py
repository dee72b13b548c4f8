"""Prefetch profiles filed under images: finding, storing, listing and removing them.

A profile (docs/format.md §1.13) is a detached object: the store files it under the image
it is about (or the FileSet, for a mount of a FileSet alone: :func:`profile_subject`; the
``attachments`` table, §2.2), gc keeps it exactly as long as that image
(§2.4), and it is not part of the image's digest, so recording one changes nothing a
signature or a tag names. An image has at most one profile per name: storing one replaces
the one of that name (the older object goes at the next gc).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, NotFoundError
from cnpsfs.store import T_PROFILE, Store

log = logging.getLogger(__name__)


def profile_subject(image: fmt.Image, digest: bytes | None) -> bytes | None:
    """What a mount's profiles are filed under: the stored image it serves, or, when it
    serves a FileSet alone as an image (``cnpsfs mount NAME@VERSION`` of a FileSet, or a
    manifest of that one FileSet at ``/``), that FileSet: its tree is exactly the mount's.
    None for anything else that is not stored (a manifest of several layers, a mount after
    ``link``/``unlink``): such a mount has no profiles."""
    if digest is not None:
        return digest
    if len(image.layers) == 1:
        layer = image.layers[0]
        if layer.fileset is not None and layer.at == "/" and not layer.unlinked:
            return layer.fileset
    return None


@dataclass(frozen=True, slots=True)
class StoredProfile:
    """One profile object filed under an image: decoded, or why it could not be."""

    digest: bytes
    profile: fmt.Profile | None
    error: str | None = None

    @property
    def name(self) -> str | None:
        return self.profile.name if self.profile is not None else None


def image_profiles(store: Store, image: bytes) -> list[StoredProfile]:
    """Every profile filed under *image*, by name (newest first within a name); malformed ones last."""
    found = []
    for _subject, digest in store.attachments(image):
        if store.object_type(digest) != T_PROFILE:
            continue  # a signature or provenance record
        try:
            found.append(StoredProfile(digest, fmt.decode_profile(store.get(digest))))
        except CnpsfsError as exc:  # malformed, corrupt or missing: advice we cannot take
            found.append(StoredProfile(digest, None, str(exc)))
    return sorted(found, key=lambda s: (s.profile is None, s.name or "", -(s.profile.created_ns if s.profile else 0),
                                        s.digest))


def find_profile(store: Store, image: bytes, name: str) -> tuple[StoredProfile | None, list[StoredProfile]]:
    """The profile *name* of *image* (the newest, if several), and the malformed ones met on the way."""
    profiles = image_profiles(store, image)
    chosen = next((s for s in profiles if s.name == name), None)
    return chosen, [s for s in profiles if s.profile is None]


def store_profile(store: Store, image: bytes, profile: fmt.Profile) -> bytes:
    """Store *profile*, filed under *image*, replacing the image's profile of the same name."""
    encoded = fmt.encode_profile(profile)
    older = [s.digest for s in image_profiles(store, image) if s.name == profile.name]
    with store.writer() as writer:
        digest = writer.add_object(encoded)
        writer.commit(attach=[(image, digest)])
    for old in older:
        if old != digest:
            store.detach(image, old)
    return digest


def remove_profile(store: Store, image: bytes, name: str) -> int:
    """Stop filing *image*'s profiles named *name* under it (gc removes the objects); how many."""
    digests = [s.digest for s in image_profiles(store, image) if s.name == name]
    if not digests:
        raise NotFoundError(f"the image has no profile named {name!r}")
    for digest in digests:
        store.detach(image, digest)
    return len(digests)


def describe_profiles(store: Store, image: bytes) -> list[dict[str, Any]]:
    """The profiles filed under *image*, for ``profile ls`` and ``inspect`` (JSON-ready)."""
    out = []
    for stored in image_profiles(store, image):
        row: dict[str, Any] = {"digest": fmt.format_digest(stored.digest)}
        profile = stored.profile
        if profile is None:
            out.append(row | {"problem": stored.error})
            continue
        files = sum(1 for e in profile.entries if e.touch is fmt.Touch.FILE)
        out.append(row | {"name": profile.name, "entries": len(profile.entries), "files": files,
                          "ranges": profile.ranges, "bytes": profile.data_bytes, "created_ns": profile.created_ns,
                          "recorded_on": fmt.format_digest(profile.image), "metadata": profile.metadata})
    return out
