"""Signature objects: who vouches for an image or FileSet, detached from its digest.

A signature is an object of its own in the store (type ``cnpsfs/signature``), filed
under the digest it signs (the store's attachments), never part of that digest: signing
an image does not change it, and an image may carry several signatures (a new revision,
a second signer). This is OSTree's detached commitmeta. docs/trust.md and docs/format.md
("Signatures") define the bytes; a second implementation can produce and check them
from the documents alone.

The signed bytes are the **payload**, a canonical CBOR structure map (the rules of
docs/format.md 1.2) carried verbatim, as a byte string, inside the signature object:
the verifier checks the Ed25519 signature over exactly the bytes it then decodes, so no
re-encoding can make two readers disagree about what was signed. A payload that is not
in canonical form is refused (one logical payload, one encoding).

The payload binds the subject by digest (never by a tag or a name alone: a tag can move),
and carries the name and version the signer meant, a revision that grows per name
(rollback protection), when it was signed, an optional expiry, and the signer's key id.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from cnpsfs import format as fmt
from cnpsfs.errors import CorruptObjectError, FormatError, MissingObjectError
from cnpsfs.store import T_SIGNATURE, Store
from cnpsfs.trust.keys import SigningKey, format_key_id

PAYLOAD_TYPE = "cnpsfs/signature-payload"
SUBJECT_KINDS = ("image", "fileset")
KEY_ID_SIZE = 32


class Payload(NamedTuple):
    """What a signature vouches for (docs/trust.md, "Payload")."""

    subject: bytes  # digest of the image or FileSet object
    kind: str  # "image" or "fileset"
    name: str
    version: str
    revision: int  # >= 1, grows per name
    timestamp: int  # signed at, seconds since the Unix epoch (UTC)
    key_id: bytes  # SHA-256 of the signer's public key blob (keys.key_id_of)
    expires: int | None = None  # seconds since the epoch; None: never

    def to_cbor(self) -> dict[int, Any]:
        obj: dict[int, Any] = {0: PAYLOAD_TYPE, 1: fmt.FORMAT_VERSION, 2: self.subject, 3: self.kind, 4: self.name,
                               5: self.version, 6: self.revision, 7: self.timestamp, 9: self.key_id}
        if self.expires is not None:
            obj[8] = self.expires
        return obj

    def encode(self) -> bytes:
        check_payload(self)
        return fmt.encode_canonical(self.to_cbor())

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        obj = fmt.decode_cbor(data)
        if type(obj) is not dict or obj.get(0) != PAYLOAD_TYPE:
            found = obj.get(0) if type(obj) is dict else type(obj).__name__
            raise FormatError(f"expected a {PAYLOAD_TYPE}, found {found}")
        if type(obj.get(1)) is not int or obj[1] != fmt.FORMAT_VERSION:
            raise FormatError(f"signature payload: unknown format version {obj.get(1)!r}")
        try:
            payload = cls(obj[2], obj[3], obj[4], obj[5], obj[6], obj[7], obj[9], obj.get(8))
        except KeyError as exc:
            raise FormatError(f"signature payload lacks key {exc.args[0]}") from None
        unknown = set(obj) - set(range(10))
        if unknown:
            raise FormatError(f"signature payload has unknown key {min(unknown)}")
        check_payload(payload)
        if fmt.encode_canonical(payload.to_cbor()) != data:
            raise FormatError("signature payload is not in canonical form")
        return payload

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def check_payload(p: Payload) -> None:
    """The payload's invariants; the same for the signer and the verifier."""
    if not isinstance(p.subject, bytes) or len(p.subject) != fmt.DIGEST_SIZE:
        raise FormatError("signature payload: the subject must be a 32-byte digest")
    if p.kind not in SUBJECT_KINDS:
        raise FormatError(f"signature payload: unknown subject kind {p.kind!r}")
    for field_name in ("name", "version"):
        value = getattr(p, field_name)
        if not isinstance(value, str) or not value:
            raise FormatError(f"signature payload: {field_name} must be non-empty text")
    for field_name in ("revision", "timestamp"):
        value = getattr(p, field_name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
            raise FormatError(f"signature payload: {field_name} must be an unsigned 63-bit integer")
    if p.revision < 1:
        raise FormatError("signature payload: revisions start at 1")
    if p.expires is not None and (not isinstance(p.expires, int) or isinstance(p.expires, bool)
                                  or not 0 <= p.expires < 1 << 63):
        raise FormatError("signature payload: expires must be an unsigned 63-bit integer")
    if not isinstance(p.key_id, bytes) or len(p.key_id) != KEY_ID_SIZE:
        raise FormatError("signature payload: the key id must be 32 bytes")


class Signature(NamedTuple):
    """A signature object: the payload's exact bytes and the Ed25519 signature over them."""

    payload_bytes: bytes
    signature: bytes

    def encode(self) -> bytes:
        return fmt.encode_canonical({0: fmt.TYPE_SIGNATURE, 1: fmt.FORMAT_VERSION, 2: self.payload_bytes,
                                     3: self.signature})

    @classmethod
    def decode(cls, data: bytes) -> Signature:
        obj = fmt.decode_object(data)
        if obj[0] != fmt.TYPE_SIGNATURE:
            raise FormatError(f"expected a {fmt.TYPE_SIGNATURE} object, found {obj[0]}")
        payload, signature = obj.get(2), obj.get(3)
        if not isinstance(payload, bytes) or not isinstance(signature, bytes):
            raise FormatError("signature object lacks its payload or signature bytes")
        return cls(payload, signature)

    def payload(self) -> Payload:
        return Payload.decode(self.payload_bytes)


def sign_payload(key: SigningKey, payload: Payload) -> Signature:
    if payload.key_id != key.public.key_id:
        raise FormatError("the payload names another key than the one signing it")
    data = payload.encode()
    return Signature(data, key.sign(data))


def make_payload(key: SigningKey, subject: bytes, kind: str, name: str, version: str, revision: int,
                 *, expires_in: int | None = None, now: int | None = None) -> Payload:
    timestamp = int(time.time()) if now is None else now
    return Payload(subject, kind, name, version, revision, timestamp, key.public.key_id,
                   timestamp + expires_in if expires_in is not None else None)


def store_signature(store: Store, signature: Signature) -> bytes:
    """Write the signature object and file it under its subject, in one commit."""
    subject = signature.payload().subject
    with store.writer() as writer:
        digest = writer.add_object(signature.encode())
        writer.commit(attach=[(subject, digest)])
    return digest


class StoredSignature(NamedTuple):
    """A signature filed under a subject: its object digest and what reading it gave."""

    digest: bytes
    signature: Signature | None
    problem: str | None = None  # why it could not be read or decoded


def signatures_for(store: Store, subject: bytes) -> list[StoredSignature]:
    """Every signature filed under *subject* (unreadable ones carry their problem)."""
    out = []
    for _subject, digest in store.attachments(subject):
        if store.object_type(digest) not in (T_SIGNATURE, None):
            continue  # another kind of detached object (provenance)
        try:
            data = store.get(digest)
            out.append(StoredSignature(digest, Signature.decode(data)))
        except (CorruptObjectError, MissingObjectError) as exc:
            out.append(StoredSignature(digest, None, str(exc)))
        except FormatError as exc:
            out.append(StoredSignature(digest, None, f"signature object {fmt.format_digest(digest)}"
                                                     f" does not decode: {exc}"))
    return out


def known_revision(store: Store, name: str) -> int:
    """The highest revision of *name* this store knows: any stored signature, or accepted."""
    best = 0
    accepted = store.accepted_revision(name)
    if accepted is not None:
        best = accepted[0]
    for subject, _digest in store.attachments():
        for stored in signatures_for(store, subject):
            if stored.signature is None:
                continue
            try:
                payload = stored.signature.payload()
            except FormatError:
                continue
            if payload.name == name:
                best = max(best, payload.revision)
    return best


def describe(stored: StoredSignature) -> dict[str, Any]:
    """A signature for ``cnpsfs inspect``: what it claims (checked or not: inspect does not judge)."""
    out: dict[str, Any] = {"digest": fmt.format_digest(stored.digest)}
    if stored.signature is None:
        out["problem"] = stored.problem
        return out
    try:
        p = stored.signature.payload()
    except FormatError as exc:
        out["problem"] = f"payload does not decode: {exc}"
        return out
    out.update(key=format_key_id(p.key_id), name=p.name, version=p.version, revision=p.revision,
               subject=fmt.format_digest(p.subject), kind=p.kind, signed_at=p.timestamp, expires=p.expires)
    return out

