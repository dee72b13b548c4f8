"""``cnpsfs image create`` and ``cnpsfs inspect``: images from manifests, and what an image or FileSet holds."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import App, emit_json, json_option, jsonable, pass_app, profile_lines, remote_options
from cnpsfs.store import T_FILESET


@click.group("image")
def image_group() -> None:
    """Create images (an ordered list of FileSets plus run config) from manifests."""


@image_group.command("create")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@json_option
@pass_app
def image_create(app: App, manifest: str, as_json: bool) -> None:
    """Store MANIFEST (TOML, see docs/manifest.md) as an image object tagged
    NAME@VERSION. Every reference is resolved to a digest and the whole composition is
    checked (union conflicts fail here, naming both FileSets and the path). Prints the
    image digest last on stdout."""
    from cnpsfs.image.manifest import compose, load_manifest_file, store_image

    store = app.store()
    image = load_manifest_file(store, manifest)
    compose(store, image).check()
    digest = store_image(store, image)
    if as_json:
        emit_json({"digest": fmt.format_digest(digest), "name": image.name, "version": image.version})
        return
    click.echo(f"created image {image.name}@{image.version} ({len(image.layers)} layers)", err=True)
    click.echo(fmt.format_digest(digest))


@click.command("inspect")
@remote_options
@click.argument("ref")
@click.option("--tree", "as_tree", is_flag=True,
              help="Show the image's DAG: nested images with their own layers, down to the FileSets.")
@json_option
@pass_app
def inspect_cmd(app: App, ref: str, as_tree: bool, as_json: bool) -> None:
    """Show an image's layers and run config, or a FileSet's name, version and metadata,
    with the signatures (and, for packages, provenance records) filed under it, and an
    image's prefetch profiles.
    REF may also be a manifest file."""
    from cnpsfs.image.manifest import describe_layers, image_tree, load_image
    from cnpsfs.image.profiles import describe_profiles
    from cnpsfs.trust.inspect import attachment_lines, describe_attachments

    store = app.store()
    if ref.endswith(".toml") or os.path.isfile(ref):
        image, digest = load_image(store, ref)
    else:
        digest = store.resolve(ref)
        if store.object_type(digest) == T_FILESET:
            fs = store.get_fileset(digest)
            attached = describe_attachments(store, digest)
            fs_profiles = describe_profiles(store, digest)
            data = {"type": "fileset", "digest": fmt.format_digest(digest), "name": fs.name,
                    "version": fs.version, "root": fmt.format_digest(fs.root.tree or b""),
                    "metadata": jsonable(fs.metadata), **attached, "profiles": jsonable(fs_profiles)}
            if as_json:
                emit_json(data)
            else:
                click.echo(f"fileset  {fs.name}@{fs.version}\ndigest   {data['digest']}\nroot     {data['root']}")
                for line in attachment_lines(attached) + profile_lines(fs_profiles):
                    click.echo(line)
                for key, value in sorted(fs.metadata.items()):
                    click.echo(f"{key}: {json.dumps(jsonable(value))[:200]}")
            return
        image = store.get_image(digest)
    if as_tree:
        tree = image_tree(store, image, digest)
        if as_json:
            emit_json(tree)
        else:
            _print_tree(tree)
        return
    attached = describe_attachments(store, digest) if digest else {"signatures": [], "provenance": []}
    profiles = describe_profiles(store, digest) if digest else []
    data = {"type": "image", "digest": fmt.format_digest(digest) if digest else None, "name": image.name,
            "version": image.version, "mode": image.mode, "layers": describe_layers(store, image.layers, image),
            "config": image.config, "metadata": jsonable(image.metadata), "signatures": attached["signatures"],
            "profiles": jsonable(profiles)}
    if as_json:
        emit_json(data)
        return
    click.echo(f"image    {image.name}@{image.version}  ({image.mode} mode)")
    if digest:
        click.echo(f"digest   {data['digest']}")
    for line in attachment_lines(attached) + profile_lines(profiles):
        click.echo(line)
    click.echo("layers")
    for number, layer in enumerate(data["layers"], 1):
        flags = [f for f in ("unlinked", "override") if layer[f]]
        place = f" at {layer['at']}" if layer["at"] != "/" else ""
        named = f"image {layer['image'][:23]}" if "image" in layer else layer["fileset"][:23]
        click.echo(f"  {number:>3}. {layer['name']}@{layer['version']}  {named}{place}"
                   + (f"  [{', '.join(flags)}]" if flags else ""))
    if image.config:
        click.echo("config")
        for key, value in sorted(image.config.items()):
            click.echo(f"  {key}: {json.dumps(value)}")
    from cnpsfs.oci.importer import provenance_lines

    for line in provenance_lines(image.metadata):
        click.echo(line)


def _print_tree(tree: dict[str, Any]) -> None:
    """One line per node, indented like tree(1); a nested image shown once, then "(see above)"."""
    digest = f"  {tree['digest'][:23]}" if tree["digest"] else "  (from manifest)"
    click.echo(f"{tree['name']}@{tree['version']}  ({tree['mode']}){digest}")

    def lines(node: dict[str, Any], prefix: str) -> None:
        layers = node["layers"]
        for number, layer in enumerate(layers):
            last = number == len(layers) - 1
            notes = [f"at {layer['at']}"] if layer["at"] != "/" else []
            notes += [f for f in ("unlinked", "override") if layer[f]]
            if layer.get("label"):
                notes.append(repr(layer["label"]))
            what = f"image ({layer['mode']})  " if layer["type"] == "image" else ""
            seen = "  (see above)" if layer.get("seen") else ""
            extra = f"  [{', '.join(notes)}]" if notes else ""
            click.echo(f"{prefix}{'└── ' if last else '├── '}{layer['name']}@{layer['version']}  {what}"
                       f"{layer['digest'][:23]}{extra}{seen}")
            if layer["type"] == "image" and not layer.get("seen"):
                lines(layer, prefix + ("    " if last else "│   "))

    lines(tree, "")


COMMANDS = [image_group, inspect_cmd]
