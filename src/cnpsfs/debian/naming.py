"""How imported Debian packages are named in the store.

A binary package becomes the FileSet tag ``debian.org/<Package>@<Version>_<Architecture>``,
e.g. ``debian.org/iputils-ping@3:20221126-1+deb12u1_amd64``. The epoch's colon is kept:
tag versions allow it, and dropping it would make ``1:2.0`` and ``2.0`` collide. The
architecture is part of the version so ``libc6`` for amd64 and i386 can live side by
side under one name, and since neither a Debian version nor an architecture may contain
``_``, the split back is unambiguous (:func:`split_tag_version`).
"""

from __future__ import annotations

import re

NAMESPACE = "debian.org"
#: What dpkg accepts as a package name (Policy 5.6.1 asks for lower case only).
PACKAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+.-]*")
ARCH_RE = re.compile(r"[a-z0-9][a-z0-9-]*")


def tag_name(package: str) -> str:
    return f"{NAMESPACE}/{package}"


def tag_version(version: str, arch: str) -> str:
    return f"{version}_{arch}"


def split_tag_version(text: str) -> tuple[str, str]:
    """``"1:2.0-1_amd64"`` -> ``("1:2.0-1", "amd64")``."""
    version, sep, arch = text.rpartition("_")
    if not sep or not version or not ARCH_RE.fullmatch(arch):
        raise ValueError(f"not a Debian tag version (VERSION_ARCH): {text!r}")
    return version, arch


def package_of(name: str) -> str | None:
    """The package a tag name stands for, or None when it is not a Debian package tag."""
    prefix = NAMESPACE + "/"
    if not name.startswith(prefix):
        return None
    package = name[len(prefix):]
    return package if PACKAGE_RE.fullmatch(package) else None
