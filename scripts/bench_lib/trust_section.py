"""Section ``trust``: what signature checks and provenance checks cost (issue 13).

The image is the build section's base recipe (python3, curl, ca-certificates and the
Essential set: about 100 packages), built once by ``cnpsfs build`` into a store of its own
with the build section's cache, and signed with a fresh key (``cnpsfs key generate``,
``cnpsfs sign``). Measures, each ``--reps`` times (at least 5), medians:

1. **mount**: ``cnpsfs mount IMAGE MNT`` until it returns (the mount answers), then an
   untimed ``cnpsfs umount``, alternating three ways so every way sees the same load:
   no policy; a policy requiring a signature from that key (``require = "signed"``: one
   Ed25519 check, one revision record); and a ``debian-provenance`` policy (every package
   layer's archive chain: gpgv once per suite, one SHA-256 of each Packages index, the
   merged-/usr views recomputed, and the build's own layers signed). The target is the
   signed policy within 10 ms of no policy: one verification per image, not per read.
2. **verify --provenance**: ``cnpsfs verify --provenance IMAGE`` (offline chain of every
   package), and once ``--refetch`` (every .deb re-imported from the cache into a scratch
   store, digests compared).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .build_section import BASE, IMAGE, _recipe
from .cnpsfs_cli import CnpsfsCli
from .common import BenchError, median, rmtree, run, umount

log = logging.getLogger(__name__)

WAYS = ("none", "signed", "provenance")


@dataclass
class TrustResults:
    packages: int = 0
    layers: int = 0
    mount: dict[str, list[float]] = field(default_factory=lambda: {w: [] for w in WAYS})
    verify: list[float] = field(default_factory=list)
    refetch: float = 0.0

    def summary(self) -> dict[str, float]:
        out = {f"mount_{w}": median(v) for w, v in self.mount.items() if v}
        if self.verify:
            out["verify_provenance"] = median(self.verify)
        out["refetch"] = self.refetch
        return out


def _policies(work: Path, pub: Path) -> dict[str, Path]:
    signed = work / "policy-signed.toml"
    signed.write_text(f'default = "reject"\n[[rule]]\nnames = "bench.example/*"\nrequire = "signed"\n'
                      f'keys = ["{pub}"]\n')
    provenance = work / "policy-provenance.toml"
    provenance.write_text(
        'default = "reject"\n'
        '[[rule]]\nnames = "debian.org/*"\nrequire = "debian-provenance"\n'
        '[[rule]]\nnames = "bench.example/*"\nrequire = "debian-provenance"\n'
        f'[[rule]]\nnames = "bench.example/app/*"\nrequire = "signed"\nkeys = ["{pub}"]\n'
        '[[rule]]\nnames = "cnpsfs.org/*"\nrequire = "accept"\n')
    return {"signed": signed, "provenance": provenance}


def run_trust(work: Path, cache: Path, reps: int, cli: CnpsfsCli) -> TrustResults:
    missing = cli.mount_unavailable() or cli.build_unavailable() or cli._missing("sign") or cli._missing("key")
    if missing:
        raise BenchError(f"trust section: {missing}")
    top = work / "trust"
    rmtree(top)
    top.mkdir(parents=True)
    store = top / "store"
    recipe = _recipe(top / "base.toml", "trust", list(BASE))
    reply = cli.build(store, recipe, cache / "build-cache")
    ref = reply["digest"]
    res = TrustResults()
    res.packages = len(cli.packages(store, ref))
    run([cli.exe, "key", "generate", top / "bench"])
    pub = top / "bench.pub"
    run([cli.exe, "--store", store, "sign", ref, "--key", top / "bench.key"])
    layers = json.loads(run([cli.exe, "--store", store, "inspect", ref, "--json"], capture=True).stdout)["layers"]
    res.layers = len(layers)
    for layer in layers:  # the build's own layers, for the provenance policy
        if layer["name"] and layer["name"].startswith(f"{IMAGE}/"):
            run([cli.exe, "--store", store, "sign", layer["fileset"], "--key", top / "bench.key"])
    policies = _policies(top, pub)
    mnt = top / "mnt"
    mnt.mkdir()
    try:
        for _ in range(reps):
            for way in WAYS:
                args = [cli.exe, "--store", store] + (["--policy", policies[way]] if way in policies else [])
                start = time.perf_counter()
                run([*args, "mount", ref, mnt], timeout=300)
                res.mount[way].append(time.perf_counter() - start)
                run([cli.exe, "umount", mnt], timeout=120)
        log.info("trust: mount median %s", {w: f"{median(v) * 1000:.1f} ms" for w, v in res.mount.items()})
        for _ in range(reps):
            start = time.perf_counter()
            run([cli.exe, "--store", store, "verify", "--provenance", ref], capture=True, timeout=600)
            res.verify.append(time.perf_counter() - start)
        start = time.perf_counter()
        run([cli.exe, "--store", store, "verify", "--provenance", "--refetch", "--cache", cache / "build-cache", ref],
            capture=True, timeout=3600)
        res.refetch = time.perf_counter() - start
    finally:
        run([cli.exe, "umount", mnt], timeout=120, check=False)
        umount(mnt)
    return res


def trust_table(res: TrustResults) -> str:
    base = median(res.mount["none"])
    rows = ["| measure | median | against no policy |", "|---|---|---|"]
    labels = {"none": "mount, no policy", "signed": "mount, `require = \"signed\"`",
              "provenance": "mount, `require = \"debian-provenance\"`"}
    for way in WAYS:
        value = median(res.mount[way])
        delta = "" if way == "none" else f"{(value - base) * 1000:+.1f} ms"
        rows.append(f"| {labels[way]} | {value * 1000:.1f} ms | {delta} |")
    rows.append(f"| `verify --provenance` ({res.packages} packages) | {median(res.verify):.2f} s | |")
    rows.append(f"| `verify --provenance --refetch` | {res.refetch:.1f} s | |")
    rows.append(f"\n_image of {res.packages} packages in {res.layers} layers; mount = `cnpsfs mount` until it "
                "returns (the mount answers)_")
    return "\n".join(rows)


def trust_summary(res: TrustResults) -> dict[str, Any]:
    return {"results": res, "summary": res.summary()}
