"""``cnpsfs import oci`` and ``cnpsfs export oci`` (docs/oci.md).

root.py adds them to the import and export groups (command modules do not import each other)."""

from __future__ import annotations

import time
from typing import Any

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import App, emit_json, human_size, pass_app
from cnpsfs.errors import UsageError
from cnpsfs.store import T_IMAGE, check_tag_name, check_tag_version

SOURCE_HELP = """\b
SOURCE (skopeo's transport names):
  docker://HOST[:PORT]/REPO[:TAG|@DIGEST]   a registry (OCI distribution API)
  oci:DIR[:TAG]                             an OCI image layout
  oci-archive:FILE[:TAG]                    a tar of an OCI image layout
  docker-archive:FILE[:NAME:TAG|:@N]        `docker save` / `podman save` output
"""


def _bool(value: str | None) -> bool | None:
    if value is None:
        return None
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise UsageError(f"--tls-verify takes true or false, not {value!r}")


def _registry_options(func: Any) -> Any:
    options = [
        click.option("--tls-verify", "tls_verify", metavar="BOOL", default=None,
                     help="Require HTTPS and verify certificates (default: true, except for localhost "
                          "and 127.0.0.0/8, where plain HTTP is allowed)."),
        click.option("--creds", metavar="USER:PASSWORD", default=None, help="Registry credentials."),
        click.option("--authfile", type=click.Path(dir_okay=False), default=None,
                     help="Credentials file (default: $REGISTRY_AUTH_FILE, "
                          "$XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json)."),
        click.option("--cert-dir", type=click.Path(exists=True), default=None,
                     help="CA certificates to trust besides the system's: a PEM file, or a directory of *.crt."),
        click.option("--timeout", type=click.FloatRange(0.1, 3600), default=None, metavar="SECONDS",
                     help="Longest silence from the registry before a request fails (default: 30)."),
        click.option("--retry-times", type=click.IntRange(0, 20), default=None,
                     help="Retries of a failed request (default: 4)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command("oci", epilog=SOURCE_HELP)
@click.argument("source")
@click.option("--name", help="Image name (default: the repository, e.g. docker.io/library/debian).")
@click.option("--version", "version_", metavar="VERSION", help="Image version (default: the tag).")
@click.option("--platform", "platform_", metavar="OS/ARCH[/VARIANT]", default=None,
              help="Image to take from a multi-platform index (default: this host's, e.g. linux/amd64).")
@_registry_options
@click.option("--jobs", type=click.IntRange(1, 16), default=3, show_default=True, help="Layers read at once.")
@click.option("--remove-signatures", is_flag=True,
              help="Ignore cnpsfs signature artifacts referring to the image.")
@click.option("--compression-level", type=click.IntRange(1, 19), default=None, metavar="LEVEL",
              help="zstd level of the store's new blocks (default: the store's, 9). Digests do not depend on "
                   "it; 3 compresses the layers about 4x faster and stores about 5% more.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@pass_app
def import_oci_cmd(app: App, source: str, name: str | None, version_: str | None, platform_: str | None,
                   tls_verify: str | None, creds: str | None, authfile: str | None, cert_dir: str | None,
                   timeout: float | None, retry_times: int | None, jobs: int, remove_signatures: bool,
                   compression_level: int | None, as_json: bool) -> None:
    """Import an OCI or Docker image as an image of one FileSet per layer.

    Each layer's blob digest, size and uncompressed diff_id are checked against the
    manifest and config as it streams in; whiteouts (.wh.NAME) and opaque markers become
    format whiteouts; hostile members ('..', absolute paths, links out of the layer)
    reject it. The config's entrypoint, cmd, env, working dir, user, labels and stop
    signal become the run config; the source, manifest and config digests and each
    layer's digest -> FileSet are kept as provenance (`cnpsfs inspect`). Layers already
    imported (by diff_id) are not read again. The image is tagged NAME@VERSION only once
    every layer is in. When cnpsfs signature artifacts refer to the image (`export oci`
    writes them) and the object they carry has exactly the imported layers, that signed
    image (or FileSet) is restored instead, under its own name and version, with its
    signatures (checked by the trust policy where it is served); one that does not
    match or decode is ignored with a warning. Prefetch profiles that artifacts carry
    (`cnpsfs profile`) are filed under the imported image; a malformed one is ignored
    with a warning. Prints the digest last on stdout.
    """
    from cnpsfs.oci.importer import OciImportOptions, import_oci
    from cnpsfs.oci.model import parse_platform
    from cnpsfs.oci.registry import RegistryOptions
    from cnpsfs.oci.sources import open_source
    from cnpsfs.progress import byte_progress
    from cnpsfs.trust.paths import policy_path

    want = parse_platform(platform_) if platform_ else None
    registry = RegistryOptions(_bool(tls_verify), creds, authfile, cert_dir, timeout, retry_times)
    src, default_name, default_version = open_source(source, registry)
    names_given = name is not None or version_ is not None
    name = name or default_name
    version = version_ or default_version
    check_tag_name(name)
    check_tag_version(version)
    store = app.store(create=True)
    policy = policy_path(app.policy_arg)
    check = None
    if policy is not None:
        from cnpsfs.trust import check_image

        def check(digest: bytes, signed_name: str) -> None:
            # A restored image is tagged under the name its artifact gives: under a policy,
            # only when the policy accepts it (as pull does).
            check_image(store, policy, digest, signed_name)

    start = time.monotonic()
    try:
        with byte_progress(f"importing {source}", None) as advance:
            options = OciImportOptions(name, version, want, jobs, not remove_signatures, names_given, check,
                                       compression_level=compression_level)
            result = import_oci(store, src, options, on_progress=advance)
    finally:
        src.close()
    seconds = time.monotonic() - start
    ref = fmt.format_digest(result.digest)
    restored = result.restored
    if restored is not None:
        name, version = restored.name, restored.version
    if as_json:
        emit_json({"digest": ref, "name": name, "version": version, "manifest_digest": result.manifest_digest,
                   "config_digest": result.config_digest, "new_bytes": result.new_bytes,
                   "seconds": round(seconds, 3),
                   "signatures": [fmt.format_digest(d) for d in restored.signatures] if restored else [],
                   "profiles": [fmt.format_digest(d) for d in result.profiles],
                   "layers": [{"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size,
                               "fileset": fmt.format_digest(layer.fileset), "reused": layer.reused,
                               "new_bytes": layer.new_bytes} for layer in result.layers]})
        return
    reused = sum(1 for layer in result.layers if layer.reused)
    signed = (f", the signed {'image' if restored.type_code == T_IMAGE else 'FileSet'} restored with "
              f"{len(restored.signatures)} signature(s)") if restored else ""
    signed += f", {len(result.profiles)} profile(s)" if result.profiles else ""
    click.echo(f"imported {name}@{version}: {len(result.layers)} layers ({reused} already stored){signed}, "
               f"{human_size(result.new_bytes)} newly stored in {seconds:.2f}s", err=True)
    click.echo(ref)




DEST_HELP = """\b
DEST:
  oci:DIR[:TAG]                       an OCI image layout (created if missing)
  oci-archive:FILE[:TAG]              a tar of an OCI image layout (FILE replaced atomically)
  docker-archive:FILE[:NAME:TAG]      `docker save` format, for docker/podman load (plain layers)
  docker://HOST[:PORT]/REPO:TAG       a registry: blobs it has are skipped, the manifest goes last
"""


@click.command("oci", epilog=DEST_HELP)
@click.argument("ref")
@click.argument("dest")
@click.option("--compression-format", type=click.Choice(["gzip", "zstd", "none"]), default=None,
              help="Layer compression (default: gzip; none for docker-archive, which allows nothing else).")
@click.option("--compression-level", type=int, default=None,
              help="Compression level (default: 6 for gzip, 3 for zstd).")
@_registry_options
@click.option("--jobs", type=click.IntRange(1, 16), default=2, show_default=True, help="Layers written at once.")
@click.option("--remove-signatures", is_flag=True,
              help="Do not write REF's cnpsfs signatures as artifacts referring to the image.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@pass_app
def export_oci_cmd(app: App, ref: str, dest: str, compression_format: str | None, compression_level: int | None,
                   tls_verify: str | None, creds: str | None, authfile: str | None, cert_dir: str | None,
                   timeout: float | None, retry_times: int | None, jobs: int, remove_signatures: bool,
                   as_json: bool) -> None:
    """Write the image REF (or a FileSet, as a one-layer image) as an OCI image to DEST.

    Each FileSet becomes one layer: a reproducible tar (canonical order, fixed header
    fields, mtimes and xattrs as stored, whiteouts and opaque markers as OCI names),
    compressed with fixed parameters; the run config becomes the image config. The same
    image exported twice gives byte-identical blobs and the same manifest digest. An
    image imported with `import oci` keeps its layer boundaries, run config, platform
    and history. The signatures of REF (`cnpsfs sign`) go along as OCI artifacts
    referring to the image (a registry's referrers API, or its sha256-<hex> fallback
    tag; index.json of a layout or OCI archive), unless --remove-signatures; so do
    its prefetch profiles (`cnpsfs profile`), one artifact each. Archives
    are written to a temporary file and renamed. Prints the manifest digest last on
    stdout.
    """
    from cnpsfs.image.manifest import load_image, looks_like_file
    from cnpsfs.oci.exporter import COMPRESSIONS, ExportOptions, export_oci, open_sink
    from cnpsfs.oci.registry import RegistryOptions

    store = app.store()
    image, digest = load_image(store, ref)
    subject = digest if digest is not None or looks_like_file(ref) else store.resolve(ref)
    sink = open_sink(dest, RegistryOptions(_bool(tls_verify), creds, authfile, cert_dir, timeout, retry_times))
    start = time.monotonic()
    try:
        forced = getattr(sink, "compression", None)
        if forced is not None and compression_format not in (None, "none"):
            raise UsageError(f"{dest}: docker save archives hold uncompressed layers; "
                             f"--compression-format {compression_format} is not possible there")
        compression = forced if forced is not None else COMPRESSIONS[compression_format or "gzip"]
        result = export_oci(store, image, sink, ExportOptions(compression, compression_level, jobs,
                                                              signatures=not remove_signatures), subject=subject)
    finally:
        sink.close()
    seconds = time.monotonic() - start
    if as_json:
        emit_json({"manifest_digest": result.manifest_digest, "config_digest": result.config_digest,
                   "seconds": round(seconds, 3), "signatures": result.signatures, "profiles": result.profiles,
                   "layers": [{"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size,
                               "media_type": layer.media_type, "fileset": fmt.format_digest(layer.fileset),
                               "outcome": layer.outcome} for layer in result.layers]})
        return
    total = sum(layer.size for layer in result.layers)
    skipped = sum(1 for layer in result.layers if layer.outcome == "exists")
    signed = f", {len(result.signatures)} signature(s)" if result.signatures else ""
    signed += f", {len(result.profiles)} profile(s)" if result.profiles else ""
    click.echo(f"exported {image.name}@{image.version} to {dest}: {len(result.layers)} layers "
               f"({skipped} already there){signed}, {human_size(total)} in {seconds:.2f}s", err=True)
    click.echo(result.manifest_digest)


#: Subcommands of ``cnpsfs import`` and ``cnpsfs export``; no top-level commands.
IMPORT_COMMANDS = [import_oci_cmd]
EXPORT_COMMANDS = [export_oci_cmd]
COMMANDS: list[click.Command] = []
