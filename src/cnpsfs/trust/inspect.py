"""What ``cnpsfs inspect`` shows of an object's detached signatures and provenance records.

Inspect reports what the objects claim, without judging them: judging needs a policy
(``cnpsfs mount`` and friends) or the keyrings (``cnpsfs verify --provenance``).
"""

from __future__ import annotations

import time
from typing import Any

from cnpsfs.store import Store
from cnpsfs.trust import provenance, signature


def describe_attachments(store: Store, digest: bytes) -> dict[str, list[dict[str, Any]]]:
    sigs = [signature.describe(s) for s in signature.signatures_for(store, digest)]
    records = [provenance.describe(r) | {"digest": provenance.fmt.format_digest(d)}
               for d, r in provenance.provenance_records(store, digest)]
    return {"signatures": sorted(sigs, key=lambda s: (s.get("revision") or 0, s["digest"])), "provenance": records}


def attachment_lines(info: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = []
    for sig in info["signatures"]:
        if "problem" in sig:
            lines.append(f"signature {sig['digest'][:23]}  unreadable: {sig['problem']}")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(sig["signed_at"]))
        expiry = (f", expires {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(sig['expires']))}"
                  if sig["expires"] is not None else "")
        lines.append(f"signature revision {sig['revision']} by {sig['key']}, {when}{expiry}  ({sig['digest'][:23]})")
    for rec in info["provenance"]:
        if "problem" in rec:
            lines.append(f"provenance  unreadable: {rec['problem']}")
            continue
        lines.append(f"provenance  {rec['package']} {rec['version']} {rec['architecture']} from {rec['archive']}"
                     f"{rec['filename']} (SHA-256 {rec['deb_sha256'][:16]}..., {rec['release']})")
    return lines
