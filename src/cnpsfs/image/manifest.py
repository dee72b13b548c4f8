"""Manifests (human-written TOML) and images (their stored, content-addressed form).

A manifest names FileSets and images by reference; an image names them by digest.
Turning one into the other resolves every reference against the store, so an image never
changes meaning when a tag moves. A layer may name an image (``image = "REF"``, a stored
image or another manifest file): composing flattens nested images into FileSet layers
(:func:`active_layers`), keeping a nested image of the other mode together as a
:class:`~cnpsfs.image.view.Group`. See docs/manifest.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import NestingError, NotFoundError, UsageError
from cnpsfs.image.view import Generation, Group, InodeTable, LayerInfo, split_at
from cnpsfs.store import T_FILESET, T_IMAGE, Store, check_tag_name, check_tag_version

TOP_KEYS = {"name", "version", "mode", "layers", "config", "metadata"}
LAYER_KEYS = {"fileset", "image", "at", "unlinked", "override", "label"}
CONFIG_KEYS = {"entrypoint", "cmd", "env", "workdir", "user", "labels", "stop_signal"}
MODES = tuple(fmt.CompositionMode)


def _fail(source: str, message: str) -> UsageError:
    return UsageError(f"{source}: {message}")


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str, source: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(source, f"unknown key {where}{unknown[0]} (allowed: {', '.join(sorted(allowed))})")


def _string_list(value: Any, key: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, f"{key} must be a list of strings")
    return list(value)


def parse_config(raw: Any, source: str) -> dict[str, Any]:
    """Validate the run config a container runtime needs."""
    if not isinstance(raw, dict):
        raise _fail(source, "[config] must be a table")
    _check_keys(raw, CONFIG_KEYS, "config.", source)
    config: dict[str, Any] = {}
    for key in ("entrypoint", "cmd", "env"):
        if key in raw:
            config[key] = _string_list(raw[key], f"config.{key}", source)
    for item in config.get("env", []):
        if "=" not in item:
            raise _fail(source, f"config.env entry {item!r} is not NAME=VALUE")
    for key in ("workdir", "user", "stop_signal"):
        if key in raw:
            if not isinstance(raw[key], str):
                raise _fail(source, f"config.{key} must be a string")
            config[key] = raw[key]
    if "workdir" in config and not config["workdir"].startswith("/"):
        raise _fail(source, "config.workdir must be an absolute path")
    if "labels" in raw:
        labels = raw["labels"]
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise _fail(source, "config.labels must be a table of strings")
        config["labels"] = dict(labels)
    return config


def parse_manifest(text: str, source: str = "manifest") -> dict[str, Any]:
    """Parse and validate a manifest without touching the store."""
    import tomllib  # here: a mount of a stored image (the usual case) reads no manifest

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(source, f"not valid TOML: {exc}") from None
    _check_keys(raw, TOP_KEYS, "", source)
    for key in ("name", "version"):
        if not isinstance(raw.get(key), str):
            raise _fail(source, f"missing string key {key!r}")
    check_tag_name(raw["name"])
    check_tag_version(raw["version"])
    mode = raw.get("mode", fmt.CompositionMode.LAYERS)
    if mode not in MODES:
        raise _fail(source, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    layers = raw.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _fail(source, "needs at least one [[layers]] entry")
    if len(layers) > fmt.MAX_LAYERS:
        raise _fail(source, f"{len(layers)} layers exceed the limit of {fmt.MAX_LAYERS} layers per image "
                            "(docs/format.md, limits)")
    parsed_layers = []
    for number, layer in enumerate(layers, 1):
        where = f"layers[{number}]."
        if not isinstance(layer, dict):
            raise _fail(source, f"layers[{number}] must be a table")
        _check_keys(layer, LAYER_KEYS, where, source)
        if ("fileset" in layer) == ("image" in layer):
            raise _fail(source, f"{where}fileset or {where}image is required, not both (a FileSet reference, "
                                "or an image reference or manifest file)")
        kind = "fileset" if "fileset" in layer else "image"
        if not isinstance(layer[kind], str):
            raise _fail(source, f"{where}{kind} must be a string (a reference)")
        at = layer.get("at", "/")
        if not isinstance(at, str) or not at.startswith("/") or any(p in ("..", ".") for p in at.split("/")):
            raise _fail(source, f"{where}at must be an absolute path without '.' or '..', not {at!r}")
        try:
            normalized = fmt.normalize_at(at)
        except fmt.FormatError as exc:
            raise _fail(source, f"{where}at: {exc}") from None
        for flag in ("unlinked", "override"):
            if not isinstance(layer.get(flag, False), bool):
                raise _fail(source, f"{where}{flag} must be true or false")
        label = layer.get("label", "")
        if not isinstance(label, str):
            raise _fail(source, f"{where}label must be a string")
        parsed_layers.append({"fileset": layer.get("fileset"), "image": layer.get("image"), "at": normalized,
                              "unlinked": layer.get("unlinked", False), "override": layer.get("override", False),
                              "label": label})
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _fail(source, "[metadata] must be a table")
    try:
        fmt.encode_canonical({"metadata": metadata})  # one level down, where the image object holds it
    except fmt.FormatError as exc:
        raise _fail(source, f"metadata: {exc}") from None
    return {"name": raw["name"], "version": raw["version"], "mode": fmt.CompositionMode(mode), "layers": parsed_layers,
            "config": parse_config(raw.get("config", {}), source), "metadata": metadata}


def image_from_manifest(store: Store, spec: Mapping[str, Any], source: str = "manifest", *,
                        base_dir: str | Path | None = None, chain: Sequence[str] = ()) -> fmt.Image:
    """The image a parsed manifest describes, every reference resolved to a digest.

    An ``image`` layer naming a manifest file (relative to *base_dir*, the manifest's
    directory) loads that file too; its image is not stored but kept in
    :attr:`fmt.Image.unstored` under its digest. *chain* holds the manifest files being
    loaded, outermost first, so a file that names itself again is a cycle.
    """
    layers = []
    unstored: dict[bytes, fmt.Image] = {}
    for number, layer in enumerate(spec["layers"], 1):
        if layer.get("image") is None:
            try:
                digest = store.resolve(layer["fileset"], want=T_FILESET)
            except (NotFoundError, UsageError) as exc:
                if _is_image(store, layer["fileset"]):
                    raise _fail(source, f"layers[{number}].fileset: {layer['fileset']} is an image: nest it with "
                                        f"image = {json.dumps(layer['fileset'])}") from None
                raise _fail(source, f"layers[{number}].fileset: {exc}") from None
            layers.append(fmt.Layer(digest, layer["at"], layer["unlinked"], layer["override"], layer["label"]))
            continue
        ref = layer["image"]
        path = Path(base_dir or ".", ref) if not os.path.isabs(ref) else Path(ref)
        if looks_like_file(ref) or looks_like_file(str(path)):
            nested = load_manifest_file(store, path, chain=chain)
            digest = fmt.digest_bytes(fmt.encode_image(nested))
            unstored.update(nested.unstored)
            unstored[digest] = nested
        else:
            try:
                digest = store.resolve(ref, want=T_IMAGE)
            except (NotFoundError, UsageError) as exc:
                raise _fail(source, f"layers[{number}].image: {exc}") from None
        layers.append(fmt.Layer(None, layer["at"], layer["unlinked"], layer["override"], layer["label"], digest))
    return fmt.Image(spec["name"], spec["version"], spec["mode"], layers, dict(spec["config"]),
                     dict(spec["metadata"]), unstored)


def _is_image(store: Store, ref: str) -> bool:
    try:
        return store.object_type(store.resolve(ref)) == T_IMAGE
    except (NotFoundError, UsageError):
        return False


#: A manifest is a few KiB; one with the most layers allowed is well under 1 MiB.
MANIFEST_MAX = 16 << 20


def load_manifest_file(store: Store, path: str | Path, *, chain: Sequence[str] = ()) -> fmt.Image:
    real = os.path.realpath(path)
    if real in chain:
        cycle = [*chain[chain.index(real):], real]
        raise UsageError(f"manifest cycle: {' -> '.join(cycle)}")
    if len(chain) > fmt.MAX_NESTING:
        raise UsageError(f"{path}: manifests nest deeper than the limit of {fmt.MAX_NESTING} images "
                         f"({' -> '.join([*chain, real])})")
    try:
        with open(path, "rb") as f:
            data = f.read(MANIFEST_MAX + 1)
    except OSError as exc:
        raise UsageError(f"cannot read manifest {path}: {exc.strerror}") from None
    if len(data) > MANIFEST_MAX:
        raise UsageError(f"{path}: manifest exceeds the limit of {MANIFEST_MAX >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: not UTF-8 at byte {exc.start}") from None
    return image_from_manifest(store, parse_manifest(text, str(path)), str(path), base_dir=os.path.dirname(real),
                               chain=[*chain, real])


def looks_like_file(ref: str) -> bool:
    return ref.endswith(".toml") or (os.sep in ref and os.path.exists(ref)) or os.path.isfile(ref)


def load_image(store: Store, ref: str) -> tuple[fmt.Image, bytes | None]:
    """An image from a manifest file or a stored image reference (with its digest).

    A FileSet reference is accepted too, as a one-layer image (no digest: not stored).
    """
    if looks_like_file(ref):
        return load_manifest_file(store, ref), None
    digest = store.resolve(ref)
    if store.object_type(digest) == T_FILESET:
        fileset = store.get_fileset(digest)
        return fmt.Image(fileset.name, fileset.version, fmt.CompositionMode.LAYERS, [fmt.Layer(digest)]), None
    digest = store.resolve(ref, want=T_IMAGE)
    return store.get_image(digest), digest


def store_image(store: Store, image: fmt.Image, *, tag: bool = True) -> bytes:
    """Store an image object (after checking it composes) and tag it NAME@VERSION.

    Nested images read from manifest files (``image.unstored``) are stored and tagged
    with it, in the same commit.
    """
    with store.writer() as writer:
        tags = []
        for nested_digest, nested in image.unstored.items():
            added = writer.add_object(fmt.encode_image(nested))
            assert added == nested_digest
            tags.append((nested.name, nested.version, T_IMAGE, added))
        digest = writer.add_object(fmt.encode_image(image))
        if tag:
            tags.append((image.name, image.version, T_IMAGE, digest))
        writer.commit(tags if tag else [])
    return digest


def nested_image(store: Store, top: fmt.Image, digest: bytes) -> fmt.Image:
    """A nested image: from *top*'s unstored images (manifest files), else the store."""
    found = top.unstored.get(digest)
    return found if found is not None else store.get_image(digest)


def _join_at(outer: str, inner: str) -> str:
    if outer == "/":
        return inner
    return fmt.normalize_at(outer + inner) if inner != "/" else outer


@dataclass(slots=True)
class _Expansion:
    store: Store
    top: fmt.Image
    layers: list[LayerInfo] = field(default_factory=list)
    filesets: dict[bytes, fmt.FileSet] = field(default_factory=dict)

    def visit(self, image: fmt.Image, *, names: tuple[str, ...], digests: tuple[bytes, ...], key: tuple[int, ...],
              at: str, groups: tuple[Group, ...], mode: fmt.CompositionMode, top_index: int | None) -> None:
        for position, layer in enumerate(image.layers):
            if layer.unlinked:
                continue
            index = position if top_index is None else top_index
            try:
                placed = _join_at(at, layer.at)
            except fmt.FormatError as exc:
                raise NestingError(f"{' -> '.join(names)}: layer {position + 1}: {exc}") from None
            if layer.image is None:
                assert layer.fileset is not None
                fileset = self.filesets.get(layer.fileset)
                if fileset is None:
                    fileset = self.filesets[layer.fileset] = self.store.get_fileset(layer.fileset)
                if len(self.layers) >= fmt.MAX_LAYERS:
                    raise NestingError(f"{names[0]}: its nested images compose more than the limit of "
                                       f"{fmt.MAX_LAYERS} layers per image")
                self.layers.append(LayerInfo(index, layer.fileset, f"{fileset.name}@{fileset.version}", fileset.root,
                                             split_at(placed), layer.override, order=len(self.layers), groups=groups,
                                             via=names[1:], label=layer.label))
                continue
            nested = nested_image(self.store, self.top, layer.image)
            label = f"{nested.name}@{nested.version}"
            if layer.image in digests:
                cycle = [*names[digests.index(layer.image):], label]
                raise NestingError(f"image cycle: {' -> '.join(cycle)}")
            if len(names) > fmt.MAX_NESTING:
                raise NestingError(f"{' -> '.join([*names, label])}: images nest deeper than the limit of "
                                   f"{fmt.MAX_NESTING} levels")
            inner_groups = groups
            if nested.mode is not mode or (mode is fmt.CompositionMode.UNION and layer.override):
                inner_groups = (*groups, Group((*key, position), nested.mode, layer.override, label))
            self.visit(nested, names=(*names, label), digests=(*digests, layer.image), key=(*key, position),
                       at=placed, groups=inner_groups, mode=nested.mode, top_index=index)


def active_layers(store: Store, image: fmt.Image, digest: bytes | None = None) -> list[LayerInfo]:
    """The FileSet layers *image* composes, bottom to top, nested images flattened.

    A nested image of the same mode places its layers where it is named; one of the
    other mode (or an override in a union) becomes a group around its layers. Cycles,
    nesting past ``fmt.MAX_NESTING`` and more than ``fmt.MAX_LAYERS`` layers in all are
    errors naming the images on the way.
    """
    expansion = _Expansion(store, image)
    expansion.visit(image, names=(f"{image.name}@{image.version}",), digests=(digest,) if digest else (), key=(),
                    at="/", groups=(), mode=image.mode, top_index=None)
    return expansion.layers


def all_filesets(store: Store, image: fmt.Image) -> list[bytes]:
    """Every FileSet *image* names, nested images seen through and unlinked layers included,
    each once, bottom to top (for checks over everything an image holds, not what it shows)."""
    out: dict[bytes, None] = {}
    seen: set[bytes] = set()

    def visit(img: fmt.Image) -> None:
        for layer in img.layers:
            if layer.image is None:
                out.setdefault(layer.digest, None)
            elif layer.image not in seen:
                seen.add(layer.image)
                visit(nested_image(store, image, layer.image))

    visit(image)
    return list(out)


def stacking_order(image: fmt.Image, layers: Sequence[LayerInfo]) -> list[tuple[LayerInfo, bool]]:
    """*layers* as one ordered stack (for OCI export), each with whether its whiteouts mean
    anything: a union's layers first, its override layers above them, group by group."""

    def order(items: Sequence[LayerInfo], depth: int, mode: fmt.CompositionMode) -> list[tuple[LayerInfo, bool]]:
        units: list[tuple[bool, list[tuple[LayerInfo, bool]]]] = []
        index = 0
        while index < len(items):
            layer = items[index]
            if len(layer.groups) > depth:
                group = layer.groups[depth]
                end = index
                while end < len(items) and len(items[end].groups) > depth and items[end].groups[depth] == group:
                    end += 1
                units.append((group.override, order(items[index:end], depth + 1, group.mode)))
                index = end
                continue
            units.append((layer.override, [(layer, mode is fmt.CompositionMode.LAYERS or layer.override)]))
            index += 1
        if mode is fmt.CompositionMode.UNION:
            units = [u for u in units if not u[0]] + [u for u in units if u[0]]
        return [pair for _override, members in units for pair in members]

    return order(layers, 0, image.mode)


def root_digests(image: fmt.Image, digest: bytes | None) -> set[bytes]:
    """What a mount of *image* registers as gc roots: the image, what its layers name and,
    for nested images not in the store, what theirs name (gc walks the rest)."""
    roots = {layer.digest for layer in image.layers}
    for nested in image.unstored.values():
        roots.update(layer.digest for layer in nested.layers)
    roots -= set(image.unstored)
    if digest is not None:
        roots.add(digest)
    return roots


def compose(store: Store, image: fmt.Image, inodes: InodeTable | None = None, *, number: int = 1,
            label: str = "", previous: Generation | None = None, digest: bytes | None = None,
            init: Sequence[str] | None = None, init_files: Sequence[str] = ()) -> Generation:
    """A generation for *image*: reads the image's FileSet objects and root directories only.

    *init* (mount destinations; *init_files*: bind targets) adds an init layer on top
    (:mod:`cnpsfs.image.initlayer`): what a container runtime mounts over or binds onto,
    where the image lacks it.
    """
    layers = active_layers(store, image, digest)
    if init is not None:
        from cnpsfs.image.initlayer import init_layer

        extra = init_layer(Generation(store, image, layers, InodeTable()), init, init_files)
        if extra is not None:
            layers = [*layers, extra]
    table = inodes if inodes is not None else InodeTable()  # an empty table is falsy (len 0)
    return Generation(store, image, layers, table, number=number, label=label, previous=previous)


def describe_layers(store: Store, layers: Sequence[fmt.Layer], top: fmt.Image | None = None) -> list[dict[str, Any]]:
    """The layers for inspect and status; *top* finds nested images not in the store."""
    out = []
    for layer in layers:
        item: dict[str, Any] = {"at": layer.at, "unlinked": layer.unlinked, "override": layer.override}
        if layer.image is not None:
            item["image"] = fmt.format_digest(layer.image)
        else:
            item["fileset"] = fmt.format_digest(layer.digest)
        if layer.label:
            item["label"] = layer.label
        try:
            if layer.image is not None:
                named: fmt.Image | fmt.FileSet = (nested_image(store, top, layer.image) if top is not None
                                                  else store.get_image(layer.image))
            else:
                named = store.get_fileset(layer.digest)
            item["name"], item["version"] = named.name, named.version
        except NotFoundError:
            item["name"] = item["version"] = None
        out.append(item)
    return out


def image_tree(store: Store, image: fmt.Image, digest: bytes | None = None) -> dict[str, Any]:
    """The DAG below an image, for ``inspect --tree``: each node its layers, a nested image
    named a second time only by reference (``"seen": true``)."""
    seen: set[bytes] = set()

    def node(img: fmt.Image, img_digest: bytes | None) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "image", "name": img.name, "version": img.version, "mode": img.mode,
                               "digest": fmt.format_digest(img_digest) if img_digest else None, "layers": []}
        for layer in img.layers:
            item: dict[str, Any] = {"at": layer.at, "unlinked": layer.unlinked, "override": layer.override}
            if layer.label:
                item["label"] = layer.label
            if layer.image is None:
                item["type"] = "fileset"
                item["digest"] = fmt.format_digest(layer.digest)
                try:
                    fs = store.get_fileset(layer.digest)
                    item["name"], item["version"] = fs.name, fs.version
                except NotFoundError:
                    item["name"] = item["version"] = None
            elif layer.image in seen:
                nested = nested_image(store, image, layer.image)
                item.update(type="image", name=nested.name, version=nested.version, mode=nested.mode,
                            digest=fmt.format_digest(layer.image), seen=True)
            else:
                seen.add(layer.image)
                item.update(node(nested_image(store, image, layer.image), layer.image))
            out["layers"].append(item)
        return out

    return node(image, digest)
