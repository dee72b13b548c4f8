"""Software bills of materials of built images: SPDX 2.3 and CycloneDX 1.5, JSON.

The package list is :func:`cnpsfs.introspect.image_packages` (what ``cnpsfs packages``
prints); where a package's .deb came from is its provenance record (the archive URI and
the pool path the signed Packages index lists). Each package is identified the way
scanners match advisories: a ``pkg:deb/<vendor>/<name>@<version>?arch=...&distro=...``
package URL and the .deb's SHA-256; the cnpsfs FileSet digest it is served from is kept
beside them (SPDX: an external reference of category OTHER; CycloneDX: a property).

The document is a function of the image: the creation time is the image's
``source_date_epoch`` when it has one (``$SOURCE_DATE_EPOCH`` overrides it), and
identifiers derive from the image digest, so the same image gives the same bytes.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
import uuid
from typing import Any

from cnpsfs import __version__
from cnpsfs import format as fmt
from cnpsfs.debian.introspect import PackageInfo, image_packages
from cnpsfs.errors import FormatError, UsageError
from cnpsfs.store import Store
from cnpsfs.trust.provenance import DebianProvenance, provenance_records

NAMESPACE_BASE = "https://cnpsfs.org/spdx/"
FORMATS = ("spdx-json", "cyclonedx-json")


def _created(image: fmt.Image) -> int:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env and env.isdigit():
        return int(env)
    deb = image.metadata.get("debian") if isinstance(image.metadata, dict) else None
    sde = deb.get("source_date_epoch") if isinstance(deb, dict) else None
    return sde if isinstance(sde, int) and sde > 0 else int(time.time())


def _iso(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe=".-_~")


def _vendor(origin: str) -> str:
    vendor = origin.split(":", 1)[0].strip().lower() if origin else ""
    return re.sub(r"[^a-z0-9.-]", "-", vendor) or "debian"


def purl(pkg: PackageInfo, distro: str | None) -> str:
    qualifiers = [f"arch={_quote(pkg.arch)}"]
    if distro:
        qualifiers.append(f"distro={_quote(distro)}")
    return f"pkg:deb/{_vendor(pkg.origin)}/{_quote(pkg.package)}@{_quote(pkg.version)}?{'&'.join(qualifiers)}"


def _record(store: Store, pkg: PackageInfo) -> DebianProvenance | None:
    try:
        digest = fmt.parse_digest(pkg.fileset)
    except FormatError:
        return None
    for _d, record in provenance_records(store, digest):
        if isinstance(record, DebianProvenance):
            return record
    return None


def _download(record: DebianProvenance | None) -> str | None:
    return record.archive.rstrip("/") + "/" + record.filename if record is not None else None


def build_sbom(store: Store, digest: bytes, format_: str) -> dict[str, Any]:
    if format_ not in FORMATS:
        raise UsageError(f"unknown SBOM format {format_!r} (use {' or '.join(FORMATS)})")
    image = store.get_image(digest)
    packages = image_packages(store, image)
    deb = image.metadata.get("debian") if isinstance(image.metadata, dict) else None
    distro = deb.get("suite") if isinstance(deb, dict) and isinstance(deb.get("suite"), str) else None
    records = {p.fileset: _record(store, p) for p in packages}
    created = _created(image)
    if format_ == "spdx-json":
        return _spdx(image, digest, packages, records, distro, created)
    return _cyclonedx(image, digest, packages, records, distro, created)


def _spdx_id(text: str) -> str:
    return "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]", "-", text)


def _spdx(image: fmt.Image, digest: bytes, packages: list[PackageInfo],
          records: dict[str, DebianProvenance | None], distro: str | None, created: int) -> dict[str, Any]:
    image_id = "SPDXRef-Image"
    spdx_packages: list[dict[str, Any]] = [{
        "SPDXID": image_id, "name": image.name, "versionInfo": image.version, "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False, "primaryPackagePurpose": "CONTAINER",
        "checksums": [{"algorithm": "BLAKE3", "checksumValue": digest.hex()}],
        "comment": f"cnpsfs image {fmt.format_digest(digest)}",
    }]
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": image_id}]
    seen: set[str] = {image_id}
    for pkg in packages:
        spdx_id = _spdx_id(f"Package-{pkg.package}-{pkg.arch}")
        n = 2
        while spdx_id in seen:
            spdx_id, n = _spdx_id(f"Package-{pkg.package}-{pkg.arch}-{n}"), n + 1
        seen.add(spdx_id)
        record = records.get(pkg.fileset)
        entry: dict[str, Any] = {
            "SPDXID": spdx_id, "name": pkg.package, "versionInfo": pkg.version,
            "downloadLocation": _download(record) or "NOASSERTION", "filesAnalyzed": False,
            "supplier": "Organization: Debian" if _vendor(pkg.origin) == "debian" else "NOASSERTION",
            "sourceInfo": f"built from the Debian source package {pkg.source}",
            "externalRefs": [
                {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                 "referenceLocator": purl(pkg, distro)},
                {"referenceCategory": "OTHER", "referenceType": "cnpsfs-fileset", "referenceLocator": pkg.fileset},
            ],
        }
        if pkg.sha256:
            entry["checksums"] = [{"algorithm": "SHA256", "checksumValue": pkg.sha256.lower()}]
            entry["packageFileName"] = os.path.basename(record.filename) if record else f"{pkg.sha256}.deb"
        if pkg.origin:
            entry["comment"] = f"apt origin {pkg.origin}"
        spdx_packages.append(entry)
        relationships.append({"spdxElementId": image_id, "relationshipType": "CONTAINS",
                              "relatedSpdxElement": spdx_id})
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image.name}@{image.version}",
        "documentNamespace": NAMESPACE_BASE + digest.hex(),
        "creationInfo": {"created": _iso(created), "creators": [f"Tool: cnpsfs-{__version__}"]},
        "packages": spdx_packages,
        "relationships": relationships,
    }


def _cyclonedx(image: fmt.Image, digest: bytes, packages: list[PackageInfo],
               records: dict[str, DebianProvenance | None], distro: str | None, created: int) -> dict[str, Any]:
    components = []
    refs: list[str] = []
    for pkg in packages:
        ref = purl(pkg, distro)
        n = 2
        while ref in refs:
            ref, n = f"{purl(pkg, distro)}#{n}", n + 1
        refs.append(ref)
        record = records.get(pkg.fileset)
        component: dict[str, Any] = {
            "type": "library", "bom-ref": ref, "name": pkg.package, "version": pkg.version,
            "purl": purl(pkg, distro),
            "properties": [{"name": "cnpsfs:fileset", "value": pkg.fileset},
                           {"name": "debian:source", "value": pkg.source},
                           {"name": "debian:architecture", "value": pkg.arch}],
        }
        if _vendor(pkg.origin) == "debian":
            component["supplier"] = {"name": "Debian"}
        if pkg.sha256:
            component["hashes"] = [{"alg": "SHA-256", "content": pkg.sha256.lower()}]
        if pkg.origin:
            component["properties"].append({"name": "debian:origin", "value": pkg.origin})
        url = _download(record)
        if url:
            component["externalReferences"] = [{"type": "distribution", "url": url}]
        components.append(component)
    image_ref = f"cnpsfs-image:{digest.hex()}"
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, NAMESPACE_BASE + digest.hex())}",
        "version": 1,
        "metadata": {
            "timestamp": _iso(created),
            "tools": {"components": [{"type": "application", "name": "cnpsfs", "version": __version__}]},
            "component": {"type": "container", "bom-ref": image_ref, "name": image.name, "version": image.version,
                          "hashes": [{"alg": "BLAKE3", "content": digest.hex()}]},
        },
        "components": components,
        "dependencies": [{"ref": image_ref, "dependsOn": refs}] + [{"ref": r} for r in refs],
    }
