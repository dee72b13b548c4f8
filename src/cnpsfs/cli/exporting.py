"""``cnpsfs export dir|tar``: a stored FileSet written out as a directory tree or a tar archive."""

from __future__ import annotations

import click

from cnpsfs.cli.context import App, fileset_root, pass_app, remote_options


@click.group("export")
def export_group() -> None:
    """Write a stored FileSet out as a directory or a tar archive, or an image as an OCI image."""


@export_group.command("dir")
@remote_options
@click.argument("ref")
@click.argument("dest", type=click.Path())
@pass_app
def export_dir_cmd(app: App, ref: str, dest: str) -> None:
    """Recreate REF's tree in DEST (new or empty): contents, modes, owners (as root),
    mtimes, symlinks, hard links, devices, FIFOs and xattrs. Whiteouts become
    overlayfs whiteouts (0:0 character devices)."""
    from cnpsfs.export import export_dir
    from cnpsfs.progress import byte_progress

    store = app.store()
    root = fileset_root(store, ref)
    with byte_progress(f"exporting to {dest}", None) as advance:
        export_dir(store, root, dest, on_progress=advance)


@export_group.command("tar")
@remote_options
@click.argument("ref")
@click.argument("dest", metavar="FILE|-")
@pass_app
def export_tar_cmd(app: App, ref: str, dest: str) -> None:
    """Write REF as a PAX tar archive to FILE or stdout ('-'); xattrs and nanosecond
    mtimes are kept in PAX headers, whiteouts use OCI names."""
    from cnpsfs.export import export_tar

    store = app.store()
    export_tar(store, fileset_root(store, ref), dest)


COMMANDS = [export_group]
