"""``cnpsfs commit``: a writable mount's changes into a FileSet (and an image on top of its base)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import App, default_name, emit_json, import_settings, json_option, pass_app
from cnpsfs.store import T_FILESET, T_IMAGE, LocalStore, check_tag_version


@click.command("commit")
@click.argument("upperdir", type=click.Path(exists=True, file_okay=False))
@click.option("--onto", metavar="REF", help="Also create an image: REF with the new FileSet on top.")
@click.option("--name", help="FileSet name (default localhost/<UPPERDIR name>); with --onto, the image's too.")
@click.option("--version", "version_", metavar="VERSION", help="Version (default 'latest').")
@json_option
@pass_app
def commit_cmd(app: App, upperdir: str, onto: str | None, name: str | None, version_: str | None,
               as_json: bool) -> None:
    """Turn a writable mount's changes (UPPERDIR) into a FileSet.

    overlayfs whiteouts and opaque directories become format whiteouts and opaque
    directories, so the FileSet stacked on its base reproduces what the instance saw.
    With --onto, also store an image: REF's layers plus this one on top (an override
    layer for union-mode images), tagged NAME@VERSION (default: REF's name, version
    REF-version+commit.<digest prefix>). The last line on stdout is the new image's
    digest with --onto, else the FileSet's.
    """
    from cnpsfs.fs.overlay import UPPER
    from cnpsfs.image.manifest import compose
    from cnpsfs.ingest.upper import commit_upper

    store = app.store()
    assert isinstance(store, LocalStore)
    base = store.get_image(store.resolve(onto, want=T_IMAGE)) if onto is not None else None
    fileset_name = name
    if base is not None:
        # The image takes NAME@VERSION; the FileSet is tagged NAME/changes@VERSION beside it.
        fileset_name = f"{name or base.name}/changes"
    options = import_settings(fileset_name, version_, None, False, default_name(upperdir))
    # With --onto both tags land in the image's transaction: a commit killed half-way leaves
    # an untagged FileSet (garbage), never a FileSet without its image. The shared store
    # lock held across both keeps gc from collecting it in between.
    with store.shared_lock():
        result = commit_upper(store, Path(upperdir) / UPPER, dataclasses.replace(options, tag=base is None))
        out: dict[str, Any] = {"fileset": fmt.format_digest(result.digest), "name": options.name,
                               "version": options.version, "entries": result.entries}
        if base is not None:
            layer = fmt.Layer(result.digest, "/", False, base.mode is fmt.CompositionMode.UNION, "commit")
            image_name = name or base.name
            image_version = version_ or f"{base.version}+commit.{result.digest.hex()[:12]}"
            check_tag_version(image_version)
            image = fmt.Image(image_name, image_version, base.mode, [*base.layers, layer], dict(base.config),
                              dict(base.metadata))
            compose(store, image).check()
            with store.writer() as writer:
                image_digest = writer.add_object(fmt.encode_image(image))
                writer.commit([(options.name, options.version, T_FILESET, result.digest),
                               (image_name, image_version, T_IMAGE, image_digest)])
            out["image"] = {"digest": fmt.format_digest(image_digest), "name": image_name, "version": image_version}
    if as_json:
        emit_json(out)
        return
    click.echo(f"committed {result.entries} entries as {options.name}@{options.version}", err=True)
    click.echo(out["fileset"] if onto is None else out["image"]["digest"])


COMMANDS = [commit_cmd]
