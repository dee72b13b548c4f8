"""Debian version numbers: validation, ordering and ``PACKAGE<OP>VERSION`` constraints.

The ordering is dpkg's (Policy 5.6.12: epoch, then upstream version and revision
compared by alternating non-digit runs, where ``~`` sorts before everything, and digit
runs compared as numbers). python-debian implements it (``debian_support.Version``,
backed by apt_pkg when that is installed and by a pure-Python port otherwise); this
module is a thin wrapper so callers never touch that API, and so the two pitfalls of
it are handled in one place: versions that compare equal can be spelled differently
(``1.0`` and ``1.00``, ``0:1`` and ``1``), so never use the string as a key for
equality; and python-debian's ``__hash__`` hashes the spelling, so do not put Version
objects in sets either -- compare with :func:`compare_versions`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from debian.debian_support import Version

#: The relations Debian uses in Depends & co (Policy 7.1). ``<`` and ``>`` are the
#: obsolete spellings of ``<=`` and ``>=`` and are refused rather than guessed at.
OPERATORS = ("<<", "<=", "=", ">=", ">>")
PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_CONSTRAINT = re.compile(
    r"\s*(?P<package>[A-Za-z0-9][A-Za-z0-9+.-]*)(?::(?P<arch>[a-z0-9-]+))?"
    r"\s*(?:(?P<paren>\()?\s*(?P<op><<|<=|>=|>>|==|=|<|>)\s*(?P<version>[^\s()]+)\s*(?(paren)\)))?\s*"
)


class VersionError(ValueError):
    """Not a valid Debian version or version constraint."""


def parse_version(text: str) -> Version:
    """A Debian version, or :class:`VersionError` naming the offending text."""
    if not isinstance(text, str) or not text or text != text.strip():
        raise VersionError(f"invalid Debian version {text!r}")
    try:
        return Version(text)
    except ValueError:
        raise VersionError(f"invalid Debian version {text!r}") from None


def compare_versions(a: str | Version, b: str | Version) -> int:
    """Negative, zero or positive as *a* sorts before, equal to or after *b*."""
    va = a if isinstance(a, Version) else parse_version(a)
    vb = b if isinstance(b, Version) else parse_version(b)
    return int(va > vb) - int(va < vb)


def satisfies(version: str | Version, op: str, reference: str | Version) -> bool:
    """True when ``version OP reference`` holds, with Debian's operators."""
    c = compare_versions(version, reference)
    if op == "<<":
        return c < 0
    if op == "<=":
        return c <= 0
    if op == "=":
        return c == 0
    if op == ">=":
        return c >= 0
    if op == ">>":
        return c > 0
    raise VersionError(f"unknown version relation {op!r} (use one of {', '.join(OPERATORS)})")


@dataclass(frozen=True, slots=True)
class Constraint:
    """``package``, optionally restricted to versions ``op version`` (and an architecture)."""

    package: str
    op: str | None = None
    version: str | None = None
    arch: str | None = None

    def matches(self, package: str, version: str, arch: str | None = None) -> bool:
        if package != self.package:
            return False
        if self.arch is not None and arch is not None and arch != self.arch:
            return False
        if self.op is None or self.version is None:
            return True
        return satisfies(version, self.op, self.version)

    def __str__(self) -> str:
        out = self.package + (f":{self.arch}" if self.arch else "")
        return out + (f" ({self.op} {self.version})" if self.op else "")


def parse_constraint(text: str) -> Constraint:
    """Parse ``bash``, ``bash>=5.2``, ``libc6:amd64<<2.37`` or ``bash (>= 5.2)``.

    ``==`` is accepted for ``=``; ``<`` and ``>`` are refused because Debian reads them
    as ``<=`` and ``>=`` while most people mean the strict relations.
    """
    m = _CONSTRAINT.fullmatch(text)
    if m is None:
        raise VersionError(f"not a package constraint: {text!r} (expected e.g. bash>=5.2 or 'bash (<< 5.3)')")
    op = m.group("op")
    if op in ("<", ">"):
        raise VersionError(f"{text!r}: ambiguous relation {op!r}; write {op * 2} (strict) or {op}= (inclusive)")
    if op == "==":
        op = "="
    version = m.group("version")
    if version is not None:
        parse_version(version)
    return Constraint(m.group("package"), op, version, m.group("arch"))
