"""Parsing a binary package's ``control`` file: one deb822 stanza, strictly.

Why not ``debian.deb822.Deb822``: it is built to read whatever is out there, so it
silently skips lines it cannot parse, lets a repeated field overwrite the first,
strips PGP armour, guesses encodings and drops whitespace-only continuation lines.
An importer has to refuse a damaged control file, and keep every value exactly as
``dpkg-deb -f`` prints it, so this module follows dpkg's own parser (lib/dpkg/parse.c)
and Debian Policy 5.1 instead:

* a field is ``Name: value``; the name is printable US-ASCII without ``:`` and does not
  start with ``#`` or ``-``; names are unique, compared case-insensitively;
* continuation lines start with a space or a tab and belong to the field above;
* the value is everything after the colon and the blanks following it, continuation
  lines included verbatim (joined with ``\\n``), with trailing whitespace trimmed --
  so ``Description`` keeps its ``" ."`` lines and a field whose first line is empty
  starts with ``"\\n"``, exactly as dpkg stores it;
* the file holds exactly one stanza and ends with a newline (dpkg: "missing final
  newline"); blank lines are allowed only before and after the stanza.

Values are text when they are valid UTF-8 (Policy requires it) and the raw bytes
otherwise, so nothing is lost from an old package with a Latin-1 ``Maintainer``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

FIELD_NAME = re.compile(rb"[!-9;-~]+")
_TRIM = b" \t\n\r\v\f"

ControlValue = str | bytes


class ControlError(ValueError):
    """The control file is not one well-formed deb822 stanza."""


def parse_control(data: bytes) -> list[tuple[str, ControlValue]]:
    """The fields of a control file, in their original order."""
    if not data.strip(_TRIM):
        raise ControlError("control file is empty")
    if not data.endswith(b"\n"):
        raise ControlError("control file lacks its final newline")
    lines = data[:-1].split(b"\n")
    first = 0
    while lines[first] == b"":
        first += 1
    last = len(lines)
    while lines[last - 1] == b"":
        last -= 1
    fields: list[tuple[str, list[bytes]]] = []
    seen: dict[str, int] = {}
    for lineno in range(first, last):
        line = lines[lineno]
        where = f"line {lineno + 1}"
        if not line:
            raise ControlError(f"{where}: blank line inside the stanza (a control file holds exactly one)")
        if line[0] in b" \t":
            if not fields:
                raise ControlError(f"{where}: continuation line before any field")
            fields[-1][1].append(line)
            continue
        name_b, colon, rest = line.partition(b":")
        if not colon:
            raise ControlError(f"{where}: expected 'Field: value', found {line[:60]!r}")
        if not FIELD_NAME.fullmatch(name_b) or name_b[:1] in (b"#", b"-"):
            raise ControlError(f"{where}: invalid field name {name_b[:60]!r}")
        name = name_b.decode("ascii")
        if name.lower() in seen:
            raise ControlError(f"{where}: duplicate field {name!r} (first on line {seen[name.lower()]})")
        seen[name.lower()] = lineno + 1
        fields.append((name, [rest.lstrip(b" \t")]))
    return [(name, _value(b"\n".join(parts).rstrip(_TRIM))) for name, parts in fields]


def _value(raw: bytes) -> ControlValue:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def get_field(control: Mapping[str, ControlValue], name: str) -> ControlValue | None:
    """A field by name, case-insensitively (deb822 field names are)."""
    value = control.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    return next((v for k, v in control.items() if k.lower() == lowered), None)


def stored_fields(metadata: Mapping[str, Any]) -> list[tuple[str, ControlValue]]:
    """The control fields of an imported package, in their original order.

    *metadata* is a FileSet's metadata as the .deb importer writes it (docs/debian.md);
    an empty list means the FileSet did not come from a .deb.
    """
    debian = metadata.get("debian")
    if not isinstance(debian, Mapping):
        return []
    control = debian.get("control") or {}
    return [(name, control[name]) for name in debian.get("fields") or () if name in control]
