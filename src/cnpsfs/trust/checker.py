"""Trust decisions: may this image (or FileSet) be served here? (docs/trust.md, "Decisions")

One :class:`Checker` per mount (or command): it holds the policy's *path*, not the
policy, and reads it for every decision, so a key revoked in the policy is refused at
the next mount, upgrade or reload. Every place where an image starts being served asks
it: ``mount``, ``service run`` and ``bundle`` before anything is mounted, the daemon
before a swap (``upgrade``, ``link``, ``unlink``, ``rollback``, SIGHUP reload), and
``pull`` through :func:`check_image`.

The rule for the image's name decides:

- ``accept``: served, unverified; ``reject``: refused;
- ``signed``: a signature on the image's digest by a key of the rule, not revoked, not
  expired, whose revision is not older than one accepted before for the same name. A
  valid signature covers every layer (the digest covers the tree);
- ``debian-provenance``: every active layer must pass on its own: a Debian package layer
  by its archive chain (cnpsfs.trust.provenance), any other layer by the rule of its own
  FileSet name (typically ``signed``, by whoever built it).

A refusal raises :class:`TrustError`: one line naming the image, the rule and the reason.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, FormatError
from cnpsfs.store import T_FILESET, Store
from cnpsfs.trust.keys import format_key_id
from cnpsfs.trust.policy import Policy, Rule, load_policy
from cnpsfs.trust.signature import Payload, signatures_for

if TYPE_CHECKING:  # imported when a debian-provenance rule applies: a signed mount need not pay for it
    from cnpsfs.trust.provenance import ChainVerifier, Derivation

log = logging.getLogger(__name__)

#: How far a signature got through the checks, for failures: unreadable 0, unknown key 1,
#: revoked key 2, bad signature 3, another subject 4, expired 5. With several signatures
#: and none valid, the refusal reports the one that got furthest.


class TrustError(CnpsfsError):
    """An image was refused by the trust policy (exit 1). ``decision`` says why."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.message())
        self.decision = decision


class Decision(NamedTuple):
    """The outcome of one trust decision, for messages and ``cnpsfs status``."""

    accepted: bool
    subject: str  # "name@version (blake3:...)"
    digest: bytes
    policy: str | None  # the policy file, None without one
    rule: str  # 'rule 2 "example.org/*"', "default", or "" without a policy
    require: str  # the requirement applied ("" without a policy)
    verified: bool  # a signature or provenance chain was checked and holds
    reason: str  # why refused; for an acceptance, what was verified
    key: str | None = None  # the signing key (SHA256:...) when signed
    revision: int | None = None
    name: str = ""

    def message(self) -> str:
        if self.accepted:
            return f"{self.subject}: {self.reason}"
        where = f"policy {self.rule}" if self.rule else "policy"
        return f"{self.subject} refused by {where} (require = {self.require}): {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "verified": self.verified, "subject": self.subject,
                "digest": fmt.format_digest(self.digest), "policy": self.policy, "rule": self.rule,
                "require": self.require, "reason": self.reason, "key": self.key, "revision": self.revision}


@dataclass
class Checker:
    """Makes trust decisions against the policy at *policy_path* (None: no policy, accept all).

    *derivations* prove merged-/usr views and other deterministic derivations of package
    FileSets (supplied by cnpsfs.debian, which this layer may not import).
    """

    policy_path: Path | None
    derivations: Sequence[Derivation] = ()
    now: Callable[[], float] = time.time

    def load(self) -> Policy | None:
        return load_policy(self.policy_path) if self.policy_path is not None else None

    def check(self, store: Store, image: fmt.Image, digest: bytes | None, *, allow_downgrade: bool = False,
              record: bool = True) -> Decision:
        """Decide on *image* (digest None: composed from a manifest or a bare FileSet)."""
        subject, kind, name, version = subject_of(store, image, digest)
        return self.check_subject(store, subject, kind, name, version, allow_downgrade=allow_downgrade,
                                  record=record, image=image if kind == "image" else None)

    def check_subject(self, store: Store, digest: bytes, kind: str, name: str, version: str, *,
                      allow_downgrade: bool = False, record: bool = True, policy: Policy | None = None,
                      image: fmt.Image | None = None) -> Decision:
        policy = policy if policy is not None else self.load()
        label = f"{name}@{version} ({fmt.format_digest(digest)[:23]})"
        if policy is None:
            return Decision(True, label, digest, None, "", "", False, "unverified: no trust policy", name=name)
        ctx = _Context(self, store, policy, allow_downgrade, record)
        decision = ctx.decide(digest, kind, name, version, label, image=image)
        if not decision.accepted:
            raise TrustError(decision)
        ctx.commit()
        log.info("trust: %s", decision.message())
        return decision


def subject_of(store: Store, image: fmt.Image, digest: bytes | None) -> tuple[bytes, str, str, str]:
    """What a decision is about: the image's digest, or a bare FileSet's when the image is
    just one FileSet mounted as it is (``cnpsfs mount debian.org/bash@... MNT``)."""
    if digest is not None:
        return digest, "image", image.name, image.version
    if (len(image.layers) == 1 and image.mode == "layers" and not image.config and not image.metadata):
        layer = image.layers[0]
        if layer.at == "/" and not layer.unlinked and not layer.override and not layer.label \
                and layer.fileset is not None and store.object_type(layer.fileset) == T_FILESET:
            fs = store.get_fileset(layer.fileset)
            if (fs.name, fs.version) == (image.name, image.version):
                return layer.fileset, "fileset", fs.name, fs.version
    return fmt.digest_bytes(fmt.encode_image(image)), "image", image.name, image.version


@dataclass
class _Context:
    checker: Checker
    store: Store
    policy: Policy
    allow_downgrade: bool
    record: bool
    revisions: list[tuple[str, int, bytes]] = field(default_factory=list)
    #: One verifier per keyring list (a rule's ``keyrings``, or apt's): each gpgv-checks an
    #: index once for the whole decision.
    chains: dict[tuple[str, ...], ChainVerifier] = field(default_factory=dict)

    def chain_verifier(self, rule: Rule | None) -> ChainVerifier:
        rings = rule.keyrings if rule is not None else ()
        verifier = self.chains.get(rings)
        if verifier is None:
            from cnpsfs.trust.provenance import ChainVerifier

            verifier = self.chains[rings] = ChainVerifier(list(rings) or None, self.checker.derivations)
        return verifier

    def rule(self, name: str) -> tuple[Rule | None, str, str]:
        rule = self.policy.rule_for(name)
        if rule is None:
            return None, "default", self.policy.default
        return rule, rule.label, rule.require

    def decide(self, digest: bytes, kind: str, name: str, version: str, label: str, depth: int = 0,
               image: fmt.Image | None = None) -> Decision:
        rule, rule_label, require = self.rule(name)
        base = Decision(False, label, digest, self.policy.source, rule_label, require, False, "", name=name)
        if require == "accept":
            return base._replace(accepted=True, reason=f"accepted unverified ({rule_label}: accept)")
        if require == "reject":
            return base._replace(reason="rejected")
        if require == "signed":
            assert rule is not None
            return self.signed(base, rule, digest, kind, name, version)
        return self.provenance(base, rule, digest, kind, depth, image)

    def signed(self, base: Decision, rule: Rule, digest: bytes, kind: str, name: str, version: str) -> Decision:
        stored = signatures_for(self.store, digest)
        if not stored:
            return base._replace(reason="unsigned")
        trusted = {k.key_id: k for k in rule.keys}
        revoked = {k.key_id for k in (*rule.revoked, *self.policy.revoked)}
        now = self.checker.now()
        failures: list[tuple[int, str]] = []
        valid: list[Payload] = []
        for item in stored:
            if item.signature is None:
                failures.append((0, f"bad signature: {item.problem}"))
                continue
            try:
                payload = item.signature.payload()
            except FormatError as exc:
                failures.append((0, f"bad signature {fmt.format_digest(item.digest)[:23]}: "
                                    f"its payload does not decode ({exc})"))
                continue
            key = format_key_id(payload.key_id)
            if payload.key_id in revoked:
                failures.append((2, f"revoked key {key}"))
                continue
            public = trusted.get(payload.key_id)
            if public is None:
                failures.append((1, f"unknown key {key} (not among the rule's keys)"))
                continue
            if not public.verify(item.signature.signature, item.signature.payload_bytes):
                failures.append((3, f"bad signature by {key}: the Ed25519 signature does not match its payload"))
                continue
            if payload.subject != digest or payload.kind != kind:
                failures.append((4, f"signature by {key} is for another {payload.kind} "
                                    f"({fmt.format_digest(payload.subject)[:23]})"))
                continue
            if (payload.name, payload.version) != (name, version):
                failures.append((4, f"signature by {key} names {payload.label}, not {name}@{version}"))
                continue
            if payload.expires is not None and now >= payload.expires:
                when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(payload.expires))
                failures.append((5, f"signature by {key} expired on {when}"))
                continue
            valid.append(payload)
        if not valid:
            _stage, reason = max(failures, key=lambda f: f[0])
            others = len(failures) - 1
            if others:
                reason += f" (and {others} other signature{'s' if others > 1 else ''} that do not hold)"
            return base._replace(reason=reason)
        best = max(valid, key=lambda p: p.revision)
        key = format_key_id(best.key_id)
        accepted = self.store.accepted_revision(name)
        if accepted is not None and best.revision < accepted[0]:
            if not self.allow_downgrade:
                return base._replace(key=key, revision=best.revision,
                                     reason=f"older revision {best.revision} (revision {accepted[0]} of {name} was "
                                            "accepted before; --allow-downgrade to go back)")
            log.warning("trust: %s: revision %d is older than %d, allowed by --allow-downgrade", base.subject,
                        best.revision, accepted[0])
        self.revisions.append((name, best.revision, digest))
        return base._replace(accepted=True, verified=True, key=key, revision=best.revision,
                             reason=f"signed by {key}, revision {best.revision} ({base.rule}: signed)")

    def provenance(self, base: Decision, rule: Rule | None, digest: bytes, kind: str, depth: int,
                   image: fmt.Image | None) -> Decision:
        if kind == "fileset":
            result = self.chain_verifier(rule).verify(self.store, digest)
            if not result.ok:
                return base._replace(reason=f"no valid Debian archive provenance: {result.problem}")
            signer = f", InRelease signed by {result.signers[0]}" if result.signers else ""
            return base._replace(accepted=True, verified=True,
                                 reason=f"provenance from {result.record.archive if result.record else '?'}"
                                        f"{signer} ({base.rule}: debian-provenance)")
        if depth > 0:  # decisions recurse into FileSets only (nested images are flattened below)
            return base._replace(reason="nested image")
        if image is None:
            image = self.store.get_image(digest)
        from cnpsfs.image.manifest import active_layers

        count = 0
        # What the image serves: its FileSet layers, nested images flattened, unlinked ones left out.
        for info in active_layers(self.store, image, digest):
            layer_label = f"{info.name} ({fmt.format_digest(info.fileset)[:23]})"
            name, _, version = info.name.partition("@")
            inner = self.decide(info.fileset, "fileset", name, version, layer_label, depth=1)
            if not inner.accepted:
                where = "the default" if inner.rule == "default" else inner.rule
                return base._replace(reason=f"layer {layer_label} refused by {where} "
                                            f"(require = {inner.require}): {inner.reason}")
            count += 1
        return base._replace(accepted=True, verified=True,
                             reason=f"{count} layers each accepted by their own rule ({base.rule}: debian-provenance)")

    def commit(self) -> None:
        """Remember the revisions accepted (only once the whole decision accepted)."""
        if not self.record:
            return
        for name, revision, digest in self.revisions:
            try:
                self.store.record_revision(name, revision, digest)
            except sqlite3.OperationalError as exc:  # a store this user may read but not write
                log.warning("trust: cannot record revision %d of %s in %s: %s (rollback protection needs a "
                            "writable store)", revision, name, getattr(self.store, "path", "the store"), exc)


def check_image(store: Store, policy: Path | Policy | None, digest: bytes, name: str | None = None, *,
                allow_downgrade: bool = False, record: bool = True,
                derivations: Sequence[Derivation] = ()) -> Decision:
    """The decision for a stored image or FileSet *digest*: the hook for ``pull``.

    *policy* is a policy file, a loaded Policy, or None (accept, unverified). *name*,
    when given, must be the object's own name (a pulled tag's name): a mismatch is a
    refusal-worthy surprise and raises TrustError like any refusal. Raises TrustError
    when refused; returns the decision otherwise.
    """
    type_code = store.object_type(digest)
    if type_code == T_FILESET:
        fs = store.get_fileset(digest)
        kind, obj_name, version = "fileset", fs.name, fs.version
    else:
        image = store.get_image(digest)
        kind, obj_name, version = "image", image.name, image.version
    label = f"{obj_name}@{version} ({fmt.format_digest(digest)[:23]})"
    if name is not None and name != obj_name:
        raise TrustError(Decision(False, label, digest, str(policy) if policy else None, "", "name", False,
                                  f"the object is named {obj_name}, not {name}", name=obj_name))
    if isinstance(policy, Policy):
        checker = Checker(Path(policy.source), derivations)
        return checker.check_subject(store, digest, kind, obj_name, version, allow_downgrade=allow_downgrade,
                                     record=record, policy=policy)
    return Checker(policy, derivations).check_subject(store, digest, kind, obj_name, version,
                                                      allow_downgrade=allow_downgrade, record=record)
