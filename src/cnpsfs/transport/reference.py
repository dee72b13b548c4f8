"""Image references as skopeo's ``docker://`` transport writes them.

``docker://HOST[:PORT]/REPO[:TAG][@ALGO:HEX]``, with Docker's defaults: a first path
component is a registry host only if it contains a ``.`` or a ``:``, is ``localhost``,
or has upper-case letters; otherwise the registry is ``docker.io`` and a one-component
repository gets the ``library/`` prefix. No tag and no digest means ``latest``.
The grammar is distribution's reference grammar (lower-case path components separated
by ``.``, ``_``, ``__`` or runs of ``-``; names up to 255 characters; tags of at most
128 word characters, dots and dashes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from cnpsfs.errors import UsageError

DOCKER_HUB = "docker.io"
#: The host that serves docker.io's distribution API.
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"
#: Digest algorithms we can verify, with their hex lengths.
DIGEST_ALGORITHMS = {"sha256": 64, "sha512": 128}

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([0-9a-fA-F]+)")
MAX_NAME = 255


@dataclass(frozen=True)
class ImageReference:
    """A repository in a registry, and optionally a tag and/or a manifest digest in it."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def endpoint(self) -> str:
        """The host[:port] the distribution API is served from (docker.io's differs from its name)."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What to put after ``/manifests/``: the digest if there is one, else the tag (default ``latest``)."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        """``REGISTRY/REPO``, the key credentials are matched against."""
        return f"{self.registry}/{self.repository}"

    def with_tag(self, tag: str | None) -> ImageReference:
        return replace(self, tag=tag)

    def with_digest(self, digest: str | None) -> ImageReference:
        return replace(self, digest=digest)

    def __str__(self) -> str:
        text = f"docker://{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def check_digest(digest: str) -> str:
    """*digest* if it is ``sha256:`` or ``sha512:`` with the right hex length (lower case), else UsageError."""
    m = _DIGEST.fullmatch(digest)
    if not m:
        raise UsageError(f"invalid digest {digest!r} (expected ALGORITHM:HEX)")
    algo, hexpart = m.groups()
    want = DIGEST_ALGORITHMS.get(algo)
    if want is None:
        raise UsageError(f"unsupported digest algorithm in {digest!r} (supported: {', '.join(DIGEST_ALGORITHMS)})")
    if len(hexpart) != want or hexpart != hexpart.lower():
        raise UsageError(f"invalid digest {digest!r} ({algo} needs {want} lower-case hex digits)")
    return digest


def is_digest(reference: str) -> bool:
    """Whether a manifest reference (what follows ``/manifests/``) is a digest rather than a tag."""
    return ":" in reference


def parse_reference(text: str, *, default_tag: str | None = DEFAULT_TAG) -> ImageReference:
    """Parse ``[docker://]HOST[:PORT]/REPO[:TAG][@DIGEST]`` (see the module doc).

    *default_tag* is used when neither tag nor digest is given (None: leave both unset,
    for a repository reference such as a push destination's or a remote's).
    Raises :class:`UsageError` naming the reference and what is wrong with it.
    """
    original = text
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    elif text.startswith("docker:"):
        raise UsageError(f"invalid image reference {original!r}: the docker transport is written docker://")

    def bad(reason: str) -> UsageError:
        return UsageError(f"invalid image reference {original!r}: {reason}")

    if not text:
        raise bad("empty")
    digest = None
    if "@" in text:
        text, _, digest = text.partition("@")
        try:
            check_digest(digest)
        except UsageError as exc:
            raise bad(str(exc)) from None
    first, slash, rest = text.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, remainder = first, rest
        if not _DOMAIN.fullmatch(registry):
            raise bad(f"bad registry host {registry!r}")
    else:
        registry, remainder = DOCKER_HUB, text
    tag = None
    name, colon, maybe_tag = remainder.rpartition(":")
    if colon and "/" not in maybe_tag:
        remainder, tag = name, maybe_tag
        if not _TAG.fullmatch(tag):
            raise bad(f"bad tag {tag!r}")
    repository = remainder
    if registry in (DOCKER_HUB, "index.docker.io", DOCKER_HUB_ENDPOINT):
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    if not repository:
        raise bad("no repository")
    if not _REPOSITORY.fullmatch(repository):
        raise bad(f"bad repository name {repository!r} (lower-case letters, digits and . _ - separators)")
    if len(registry) + 1 + len(repository) > MAX_NAME:
        raise bad(f"name longer than {MAX_NAME} characters")
    if tag is None and digest is None and default_tag is not None:
        tag = default_tag
    return ImageReference(registry, repository, tag, digest)
