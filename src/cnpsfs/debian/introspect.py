"""Questions about built images: which packages, which images hold a package, what
changed between two images, and which layer provides a path.

Package lists come from an image's ``metadata["debian"]["packages"]`` (written by
``cnpsfs build``); for images built otherwise, every layer whose FileSet carries Debian
package metadata (``metadata["debian"]["control"]``) counts as a package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.debian.version import compare_versions, parse_constraint
from cnpsfs.errors import NotFoundError, UsageError
from cnpsfs.image.manifest import compose, nested_image
from cnpsfs.image.view import Generation, Node
from cnpsfs.image.walk import changed_dirs
from cnpsfs.store import T_IMAGE, Store


@dataclass(frozen=True, slots=True)
class PackageInfo:
    package: str
    version: str
    arch: str
    source: str
    fileset: str
    sha256: str = ""
    origin: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"package": self.package, "version": self.version, "arch": self.arch, "source": self.source,
                "fileset": self.fileset, "sha256": self.sha256, "origin": self.origin}


def image_packages(store: Store, image: fmt.Image) -> list[PackageInfo]:
    """The packages of *image* and of every image it nests (each FileSet once)."""
    out: dict[str, PackageInfo] = {}
    seen: set[bytes] = set()

    def visit(img: fmt.Image) -> None:
        for pkg in _own_packages(store, img):
            out.setdefault(pkg.fileset, pkg)
        for layer in img.layers:
            if layer.image is not None and layer.image not in seen:
                seen.add(layer.image)
                try:
                    nested = nested_image(store, image, layer.image)
                except NotFoundError:
                    continue
                visit(nested)

    visit(image)
    return sorted(out.values(), key=lambda p: (p.package, p.arch, p.version, p.fileset))


def _own_packages(store: Store, image: fmt.Image) -> list[PackageInfo]:
    """The packages of *image*'s own FileSet layers (nested images aside)."""
    recorded = image.metadata.get("debian", {}).get("packages") if isinstance(image.metadata, dict) else None
    if isinstance(recorded, list):
        return [PackageInfo(p["package"], p["version"], p["arch"], p.get("source", p["package"]), p["fileset"],
                            p.get("sha256", ""), p.get("origin", "")) for p in recorded]
    out = []
    for layer in image.layers:
        if layer.fileset is None:
            continue
        try:
            fs = store.get_fileset(layer.fileset)
        except NotFoundError:
            continue
        deb = fs.metadata.get("debian")
        if not isinstance(deb, dict) or "control" not in deb:
            continue
        control = deb["control"]
        out.append(PackageInfo(str(control["Package"]), str(control["Version"]), str(control["Architecture"]),
                               str(control.get("Source", control["Package"])).split(" ")[0],
                               fmt.format_digest(layer.fileset), deb.get("archive", {}).get("sha256", "")))
    return out


def query(store: Store, spec: str) -> list[dict[str, Any]]:
    """Every tagged image holding a package matching ``PACKAGE[OP VERSION]``.

    OP is one of ``= < <= > >=`` (``<`` and ``>`` strict here, as people mean them;
    ``<<``/``>>`` are accepted too), compared in Debian order.
    """
    text = spec.replace(" ", "")
    for short, debian in (("<=", "<="), (">=", ">="), ("<<", "<<"), (">>", ">>"), ("<", "<<"), (">", ">>")):
        name, sep, version = text.partition(short)
        if sep and not name.endswith(("<", ">", "=")) and not version.startswith(("<", ">", "=")):
            text = f"{name}{debian}{version}"
            break
    constraint = parse_constraint(text)
    hits = []
    for tag in store.tags(T_IMAGE):
        image = store.get_image(tag.digest)
        for pkg in image_packages(store, image):
            if constraint.matches(pkg.package, pkg.version, pkg.arch):
                hits.append({"image": f"{tag.name}@{tag.version}", "digest": fmt.format_digest(tag.digest),
                             **pkg.as_dict()})
    return sorted(hits, key=lambda h: (h["image"], h["package"]))


def package_diff(a: list[PackageInfo], b: list[PackageInfo]) -> dict[str, list[dict[str, str]]]:
    left = {(p.package, p.arch): p for p in a}
    right = {(p.package, p.arch): p for p in b}
    added = [right[k].as_dict() for k in sorted(right.keys() - left.keys())]
    removed = [left[k].as_dict() for k in sorted(left.keys() - right.keys())]
    changed = []
    for key in sorted(left.keys() & right.keys()):
        old, new = left[key], right[key]
        if old.fileset != new.fileset or old.version != new.version:
            direction = compare_versions(new.version, old.version)
            changed.append({"package": old.package, "arch": old.arch, "from": old.version, "to": new.version,
                            "change": "upgrade" if direction > 0 else "downgrade" if direction < 0 else "rebuild"})
    return {"added": added, "removed": removed, "changed": changed}


def _same(a: Node, b: Node) -> bool:
    return a.entry.same_content(b.entry) and a.entry.mtime_ns == b.entry.mtime_ns


def tree_diff(ga: Generation, gb: Generation) -> tuple[list[dict[str, str]], int]:
    """File-level changes between two compositions; directories whose composition
    signature is equal (same layers, placements and tree digests) are skipped unread.
    Returns the changes and the number of subtrees skipped."""
    changes: list[dict[str, str]] = []
    skipped = 0
    # An added directory is one change; what it holds is not listed.
    for pair in changed_dirs(ga, gb, into_added=False):
        if not pair.changed:
            skipped += 1
            continue
        assert pair.old is not None
        ca, cb = ga.load_children(pair.old), gb.load_children(pair.new)
        for name in ca.keys() | cb.keys():
            a, b = ca.get(name), cb.get(name)
            path = fmt.show_path((*pair.path, name))
            if a is None:
                changes.append({"path": path, "change": "added"})
            elif b is None:
                changes.append({"path": path, "change": "removed"})
            elif a.is_dir and b.is_dir:
                if not _same(a, b):
                    changes.append({"path": path, "change": "metadata"})
            elif not _same(a, b):
                what = "content" if a.entry.kind is b.entry.kind and a.entry.hash != b.entry.hash else "changed"
                changes.append({"path": path, "change": what})
    return sorted(changes, key=lambda c: c["path"]), skipped


def diff(store: Store, ref_a: str, ref_b: str) -> dict[str, Any]:
    ia = store.get_image(store.resolve(ref_a, want=T_IMAGE))
    ib = store.get_image(store.resolve(ref_b, want=T_IMAGE))
    files, skipped = tree_diff(compose(store, ia), compose(store, ib))
    return {"a": f"{ia.name}@{ia.version}", "b": f"{ib.name}@{ib.version}",
            "packages": package_diff(image_packages(store, ia), image_packages(store, ib)),
            "files": files, "skipped_subtrees": skipped}


def why(store: Store, ref: str, path: str) -> dict[str, Any]:
    """The layer (FileSet, and package if it is one) that provides *path* in an image."""
    if not path.startswith("/"):
        raise UsageError(f"path must be absolute: {path}")
    digest = store.resolve(ref, want=T_IMAGE)
    image = store.get_image(digest)
    node, layer = compose(store, image, digest=digest).layer_for(path)
    out: dict[str, Any] = {"image": f"{image.name}@{image.version}", "path": path,
                           "kind": node.entry.kind.name.lower(), "fileset": None, "package": None}
    if layer is None:
        return out
    fs = store.get_fileset(layer.fileset)
    # layer: the position in the image's own list; via: the nested images on the way to it.
    out.update(fileset=fmt.format_digest(layer.fileset), name=f"{fs.name}@{fs.version}",
               layer=layer.index + 1, override=layer.override, label=layer.label, via=list(layer.via))
    deb = fs.metadata.get("debian")
    if isinstance(deb, dict) and "control" in deb:
        out["package"] = f"{deb['control']['Package']} {deb['control']['Version']}"
    return out
