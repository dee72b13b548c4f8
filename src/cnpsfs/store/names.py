"""Tag names and versions: DNS-rooted names (``debian.org/bash``) and version strings.

A name starts with a domain its publisher controls, so names from different publishers
never collide without a registry of names (the FileSet namespace of the brief).
"""

from __future__ import annotations

import re

from cnpsfs.errors import UsageError

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(/[A-Za-z0-9._+-]+)+$")
VERSION_RE = re.compile(r"^[A-Za-z0-9._+~:-]+$")


def check_tag_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):  # not match: "$" also matches before a trailing newline
        raise UsageError(
            f"invalid name {name!r}: expected a DNS-rooted name such as debian.org/bash "
            "(lower-case domain, then one or more /path components)"
        )


def check_tag_version(version: str) -> None:
    if not VERSION_RE.fullmatch(version):
        raise UsageError(f"invalid version {version!r}: use letters, digits and . _ + ~ : -")
