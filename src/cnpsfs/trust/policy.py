"""The trust policy: which images a host serves, by name (docs/trust.md, "Policy").

```toml
default = "reject"                       # or "accept"
revoked = ["/etc/cnpsfs/keys/revoked/old.pub"]   # optional: refused under every rule
[[rule]]
names = "example.org/*"                  # or a list of patterns
require = "signed"                       # or "accept", "reject", "debian-provenance"
keys = ["/etc/cnpsfs/keys/example.org.pub"]
revoked = ["/etc/cnpsfs/keys/example.org-2024.pub"]  # optional, this rule only
[[rule]]
names = "debian.org/*"
require = "debian-provenance"
keyrings = ["/usr/share/keyrings/debian-archive-keyring.gpg"]  # optional: gpgv keyrings
```

Patterns are DNS-rooted: ``example.org/*`` is every name under example.org (any
depth), ``example.org/app/*`` everything under that path, ``example.org/app`` that name
only, ``*.example.org/*`` every subdomain's names, ``*`` everything. The most specific
matching rule decides: more literal path components first, then a literal domain over a
``*.`` one, then an exact name over a prefix. Two rules with the same pattern are an
error, as is any key this module does not know: a typo must never silently weaken the
policy. Relative paths are relative to the policy file's directory.

Key files are read when the policy is loaded, and a policy is loaded for every decision
(docs/trust.md): a key revoked by editing the policy or adding a file to a revoked list
is refused at the next mount, upgrade or reload, without restarting anything.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from cnpsfs.trust.keys import KeyFileError, PublicKey, load_public_keys
from cnpsfs.trust.paths import DEFAULT_POLICY_PATH, POLICY_ENV, PolicyError, policy_path

REQUIREMENTS = ("signed", "accept", "reject", "debian-provenance")
DEFAULTS = ("accept", "reject")
TOP_KEYS = {"default", "rule", "revoked"}
RULE_KEYS = {"names", "require", "keys", "revoked", "keyrings"}
_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_DOMAIN = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._+-]+$")


class Pattern(NamedTuple):
    """One ``names`` pattern, parsed: a domain (maybe ``*.``-wildcarded), path segments,
    and whether it ends in ``/*`` (a prefix) or names one name exactly."""

    text: str
    domain: str | None  # None for the pattern "*"
    wildcard_domain: bool
    segments: tuple[str, ...]
    prefix: bool

    @classmethod
    def parse(cls, text: str, where: str) -> Pattern:
        if text == "*":
            return cls(text, None, False, (), True)
        parts = text.split("/")
        prefix = parts[-1] == "*"
        if prefix:
            parts = parts[:-1]
        domain, segments = parts[0], tuple(parts[1:])
        if not _DOMAIN.fullmatch(domain):  # not match: "$" also matches before a trailing newline
            raise PolicyError(f"{where}: bad pattern {text!r}: it must start with a lower-case domain "
                              "(or *.domain), as names do")
        for segment in segments:
            if not _SEGMENT.fullmatch(segment):
                raise PolicyError(f"{where}: bad pattern {text!r}: '*' is allowed only as the last component "
                                  "('example.org/*') or as the first domain label ('*.example.org/*')")
        if not prefix and not segments:
            raise PolicyError(f"{where}: bad pattern {text!r}: a name has a path after its domain "
                              f"(did you mean '{text}/*'?)")
        wildcard = domain.startswith("*.")
        return cls(text, domain[2:] if wildcard else domain, wildcard, segments, prefix)

    def matches(self, name: str) -> bool:
        if self.domain is None:
            return True
        domain, _, rest = name.partition("/")
        if self.wildcard_domain:
            if not domain.endswith("." + self.domain):
                return False
        elif domain != self.domain:
            return False
        path = tuple(rest.split("/")) if rest else ()
        if self.prefix:
            return len(path) > len(self.segments) and path[: len(self.segments)] == self.segments
        return path == self.segments

    @property
    def specificity(self) -> tuple[int, int, int, int]:
        if self.domain is None:
            return (0, 0, 0, 0)
        return (1 + len(self.segments), 0 if self.wildcard_domain else 1, self.domain.count(".") + 1,
                0 if self.prefix else 1)


class Rule(NamedTuple):
    number: int  # 1-based position in the file, for messages
    patterns: tuple[Pattern, ...]
    require: str
    keys: tuple[PublicKey, ...] = ()
    revoked: tuple[PublicKey, ...] = ()
    keyrings: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        names = ", ".join(p.text for p in self.patterns)
        return f'rule {self.number} "{names}"'


class Policy(NamedTuple):
    source: str
    default: str
    rules: tuple[Rule, ...]
    revoked: tuple[PublicKey, ...] = ()
    patterns: tuple[tuple[Pattern, Rule], ...] = ()  # every pattern of every rule

    def rule_for(self, name: str) -> Rule | None:
        """The most specific rule whose pattern matches *name*; None means the default applies."""
        best: tuple[tuple[int, int, int, int], Rule] | None = None
        for pattern, rule in self.patterns:
            if pattern.matches(name) and (best is None or pattern.specificity > best[0]):
                best = (pattern.specificity, rule)
        return best[1] if best else None


def parse_policy(text: str, source: str) -> Policy:
    """Parse a policy and load every key file it names (relative to the policy's directory)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from None
    base = Path(source).parent
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise PolicyError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(TOP_KEYS))})")
    default = raw.get("default", "reject")
    if default not in DEFAULTS:
        raise PolicyError(f"{source}: default must be {' or '.join(repr(d) for d in DEFAULTS)}, not {default!r}")
    revoked = _keys(raw.get("revoked", []), base, f"{source}: revoked")
    rules_raw = raw.get("rule", [])
    if not isinstance(rules_raw, list):
        raise PolicyError(f"{source}: rules are written [[rule]] (an array of tables)")
    rules: list[Rule] = []
    index: list[tuple[Pattern, Rule]] = []
    seen: dict[str, int] = {}
    for number, table in enumerate(rules_raw, 1):
        where = f"{source}: rule {number}"
        if not isinstance(table, dict):
            raise PolicyError(f"{where}: must be a table")
        unknown = sorted(set(table) - RULE_KEYS)
        if unknown:
            raise PolicyError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(RULE_KEYS))})")
        names = table.get("names")
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise PolicyError(f"{where}: names must be a pattern or a list of patterns, e.g. \"example.org/*\"")
        patterns = tuple(Pattern.parse(n, where) for n in names)
        for pattern in patterns:
            if pattern.text in seen:
                raise PolicyError(f"{where}: pattern {pattern.text!r} is already rule {seen[pattern.text]}'s")
            seen[pattern.text] = number
        require = table.get("require")
        if require not in REQUIREMENTS:
            raise PolicyError(f"{where}: require must be one of {', '.join(REQUIREMENTS)}, not {require!r}")
        if require != "signed" and "keys" in table:
            raise PolicyError(f"{where}: keys mean something only with require = \"signed\"")
        keys = _keys(table.get("keys", []), base, f"{where}: keys")
        if require == "signed" and not keys:
            raise PolicyError(f"{where}: require = \"signed\" needs keys (public key files)")
        keyrings = table.get("keyrings", [])
        if "keyrings" in table and require != "debian-provenance":
            raise PolicyError(f"{where}: keyrings mean something only with require = \"debian-provenance\"")
        if not isinstance(keyrings, list) or not all(isinstance(k, str) for k in keyrings):
            raise PolicyError(f"{where}: keyrings must be a list of gpg keyring files")
        resolved_rings = tuple(str(base / k) for k in keyrings)
        for ring in resolved_rings:
            if not os.access(ring, os.R_OK):
                raise PolicyError(f"{where}: cannot read keyring {ring}")
        rule = Rule(number, patterns, require, keys, _keys(table.get("revoked", []), base, f"{where}: revoked"),
                    resolved_rings)
        rules.append(rule)
        index.extend((p, rule) for p in patterns)
    return Policy(source, default, tuple(rules), revoked, tuple(index))


def _keys(value: Any, base: Path, where: str) -> tuple[PublicKey, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where} must be a list of public key files")
    out: list[PublicKey] = []
    for path in value:
        try:
            out.extend(load_public_keys(base / path))
        except KeyFileError as exc:
            raise PolicyError(f"{where}: {exc}") from None
    return tuple(out)


def load_policy(path: str | Path) -> Policy:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise PolicyError(f"cannot read policy {path}: {reason}") from None
    return parse_policy(text, str(path))


__all__: Sequence[str] = ["DEFAULT_POLICY_PATH", "POLICY_ENV", "Pattern", "Policy", "PolicyError", "Rule",
                          "load_policy", "parse_policy", "policy_path"]
