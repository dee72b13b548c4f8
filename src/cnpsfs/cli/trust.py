"""CLI commands for trust: ``key generate``, ``sign`` and ``sbom`` (docs/trust.md).

``--policy`` is a root option (cli.root), ``verify --provenance`` an option of ``verify``
(cli.store_cmds), ``--allow-downgrade`` one of the mount commands (cli.mounting).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import click

from cnpsfs import format as fmt
from cnpsfs.cli.context import App, emit_json, pass_app
from cnpsfs.errors import CnpsfsError, UsageError
from cnpsfs.store import T_FILESET, T_IMAGE, TYPE_NAMES

_DURATION = re.compile(r"(\d+)([smhdwy]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str) -> int:
    """``90d``, ``12h``, ``1d12h``, ``3600`` (seconds) -> seconds."""
    pos, total = 0, 0
    clean = text.strip().lower()
    while pos < len(clean):
        m = _DURATION.match(clean, pos)
        if m is None:
            raise UsageError(f"bad duration {text!r}: use a number with s, m, h, d, w or y (e.g. 90d, 12h)")
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not clean or total <= 0:
        raise UsageError(f"bad duration {text!r}: it must be longer than zero")
    return total


@click.group("key")
def key_group() -> None:
    """Signing keys: Ed25519 in OpenSSH's formats (docs/trust.md)."""


@key_group.command("generate")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--comment", default=None, help="Comment on the public key line (default: the file's base name).")
def key_generate(path: str, comment: str | None) -> None:
    """Write a new key pair: PATH.key (private, mode 0600) and PATH.pub.

    PATH.pub is one OpenSSH line (`ssh-ed25519 AAAA... comment`); `ssh-keygen -l -f
    PATH.pub` prints the key id cnpsfs shows. Existing files are never overwritten. Put
    PATH.pub in a policy rule's keys; keep PATH.key on the machine that signs.
    """
    from cnpsfs.trust.keys import generate

    private, public, key = generate(path, comment)
    click.echo(f"wrote {private} (private, 0600) and {public}", err=True)
    click.echo(key.fingerprint)


@click.command("sign")
@click.argument("ref")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), metavar="PATH.key",
              help="Private key (from `cnpsfs key generate`).")
@click.option("--revision", type=click.IntRange(1, (1 << 63) - 1), default=None,
              help="Revision for REF's name (default: the highest this store knows for the name, plus 1).")
@click.option("--expires", default=None, metavar="DURATION",
              help="Make the signature expire after DURATION (90d, 12h, 1w...); default: never.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def sign_cmd(app: App, ref: str, key_path: str, revision: int | None, expires: str | None, as_json: bool) -> None:
    """Sign the image or FileSet REF: store a signature object filed under its digest.

    The signature covers REF's digest (so every layer of an image), its name and
    version, a revision that must never go down for that name (hosts refuse older
    revisions than they accepted), the time, an optional expiry and the key id. It is
    not part of REF's digest; gc removes it only with REF. Re-sign after changing an
    image (`commit --onto`, `build`): a new digest has no signature. Prints the
    signature object's digest last on stdout.
    """
    from cnpsfs.trust.keys import load_signing_key
    from cnpsfs.trust.signature import known_revision, make_payload, sign_payload, store_signature

    expires_in = parse_duration(expires) if expires is not None else None
    store = app.store()
    digest = store.resolve(ref)
    type_code = store.object_type(digest)
    if type_code == T_IMAGE:
        image = store.get_image(digest)
        kind, name, version = "image", image.name, image.version
    elif type_code == T_FILESET:
        fs = store.get_fileset(digest)
        kind, name, version = "fileset", fs.name, fs.version
    else:
        raise UsageError(f"{ref} is a {TYPE_NAMES.get(type_code or -1, 'object')}: only images and FileSets "
                         "are signed")
    key = load_signing_key(key_path)
    if revision is None:
        revision = known_revision(store, name) + 1
    payload = make_payload(key, digest, kind, name, version, revision, expires_in=expires_in)
    sig_digest = store_signature(store, sign_payload(key, payload))
    out = {"signature": fmt.format_digest(sig_digest), "subject": fmt.format_digest(digest), "kind": kind,
           "name": name, "version": version, "revision": revision, "key": key.public.fingerprint,
           "signed_at": payload.timestamp, "expires": payload.expires}
    if as_json:
        emit_json(out)
        return
    until = (f", expires {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(payload.expires))}"
             if payload.expires is not None else "")
    click.echo(f"signed {name}@{version} ({fmt.format_digest(digest)[:23]}) revision {revision} with "
               f"{key.public.fingerprint}{until}", err=True)
    click.echo(out["signature"])


@click.command("sbom")
@click.argument("ref", metavar="IMAGE")
@click.option("--format", "format_", type=click.Choice(["spdx-json", "cyclonedx-json"]), default="spdx-json",
              show_default=True, help="SPDX 2.3 or CycloneDX 1.5, JSON.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="Write to FILE (default: stdout).")
@pass_app
def sbom_cmd(app: App, ref: str, format_: str, output: str) -> None:
    """A software bill of materials of IMAGE's Debian packages.

    Each package with its version, architecture, source package, the SHA-256 of its .deb
    and where it came from (the archive and pool path its provenance record names), and
    the cnpsfs FileSet digest it is served from, as SPDX 2.3 or CycloneDX 1.5 JSON (valid
    against the published schemas), so scanners can match images to advisories.
    """
    import json

    from cnpsfs.debian.sbom import build_sbom

    store = app.store()
    digest = store.resolve(ref, want=T_IMAGE)
    document = build_sbom(store, digest, format_)
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    if output == "-":
        sys.stdout.write(text)
        return
    tmp = Path(output).with_name(f".{Path(output).name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(output)
    except OSError as exc:
        raise CnpsfsError(f"cannot write {output}: {exc.strerror}") from None
    click.echo(f"wrote {output}", err=True)


COMMANDS = [key_group, sign_cmd, sbom_cmd]
