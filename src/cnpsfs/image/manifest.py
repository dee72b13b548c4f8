"""Manifests (human-written TOML) and images (their stored, content-addressed form).

A manifest names FileSets by reference; an image names them by digest. Turning one into
the other resolves every reference against the store, so an image never changes meaning
when a tag moves. See docs/manifest.md.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import NotFoundError, UsageError
from cnpsfs.image.view import Generation, InodeTable, LayerInfo, split_at
from cnpsfs.store import T_FILESET, T_IMAGE, Store, check_tag_name, check_tag_version

TOP_KEYS = {"name", "version", "mode", "layers", "config", "metadata"}
LAYER_KEYS = {"fileset", "at", "unlinked", "override", "label"}
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
        if not isinstance(layer.get("fileset"), str):
            raise _fail(source, f"{where}fileset is required (a FileSet reference)")
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
        parsed_layers.append({"fileset": layer["fileset"], "at": normalized, "unlinked": layer.get("unlinked", False),
                              "override": layer.get("override", False), "label": label})
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _fail(source, "[metadata] must be a table")
    try:
        fmt.encode_canonical({"metadata": metadata})  # one level down, where the image object holds it
    except fmt.FormatError as exc:
        raise _fail(source, f"metadata: {exc}") from None
    return {"name": raw["name"], "version": raw["version"], "mode": fmt.CompositionMode(mode), "layers": parsed_layers,
            "config": parse_config(raw.get("config", {}), source), "metadata": metadata}


def image_from_manifest(store: Store, spec: Mapping[str, Any], source: str = "manifest") -> fmt.Image:
    layers = []
    for number, layer in enumerate(spec["layers"], 1):
        try:
            digest = store.resolve(layer["fileset"], want=T_FILESET)
        except (NotFoundError, UsageError) as exc:
            raise _fail(source, f"layers[{number}].fileset: {exc}") from None
        layers.append(fmt.Layer(digest, layer["at"], layer["unlinked"], layer["override"], layer["label"]))
    return fmt.Image(spec["name"], spec["version"], spec["mode"], layers, dict(spec["config"]),
                     dict(spec["metadata"]))


#: A manifest is a few KiB; one with the most layers allowed is well under 1 MiB.
MANIFEST_MAX = 16 << 20


def load_manifest_file(store: Store, path: str | Path) -> fmt.Image:
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
    return image_from_manifest(store, parse_manifest(text, str(path)), str(path))


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
    """Store an image object (after checking it composes) and tag it NAME@VERSION."""
    with store.writer() as writer:
        digest = writer.add_object(fmt.encode_image(image))
        writer.commit([(image.name, image.version, T_IMAGE, digest)] if tag else [])
    return digest


def active_layers(store: Store, image: fmt.Image) -> list[LayerInfo]:
    out = []
    for index, layer in enumerate(image.layers):
        if layer.unlinked:
            continue
        fileset = store.get_fileset(layer.fileset)
        out.append(LayerInfo(index, layer.fileset, f"{fileset.name}@{fileset.version}", fileset.root,
                             split_at(layer.at), layer.override))
    return out


def compose(store: Store, image: fmt.Image, inodes: InodeTable | None = None, *, number: int = 1,
            label: str = "", previous: Generation | None = None) -> Generation:
    """A generation for *image*: reads the image's FileSet objects and root directories only."""
    table = inodes if inodes is not None else InodeTable()  # an empty table is falsy (len 0)
    return Generation(store, image, active_layers(store, image), table, number=number, label=label,
                      previous=previous)


def describe_layers(store: Store, layers: Sequence[fmt.Layer]) -> list[dict[str, Any]]:
    out = []
    for layer in layers:
        item: dict[str, Any] = {"fileset": fmt.format_digest(layer.fileset), "at": layer.at,
                                "unlinked": layer.unlinked, "override": layer.override}
        if layer.label:
            item["label"] = layer.label
        try:
            fs = store.get_fileset(layer.fileset)
            item["name"], item["version"] = fs.name, fs.version
        except NotFoundError:
            item["name"] = item["version"] = None
        out.append(item)
    return out
