"""Provenance from the Debian archive: the signed chain behind a package FileSet.

``cnpsfs build`` records, for every package FileSet it imports from apt, a detached
``cnpsfs/provenance`` object (docs/trust.md, "Provenance"): the suite's ``InRelease`` and
the ``Packages`` index that lists the package are kept in the store as an *index FileSet*,
and the record says where in them the package's entry is. The chain re-checked here,
offline, from what the store holds:

1. ``InRelease`` carries a valid OpenPGP signature by a key of the apt keyring (``gpgv``);
2. the signed text lists the ``Packages`` file by SHA-256 and size, and the stored file
   has exactly that hash and size;
3. the ``Packages`` stanza at the recorded offset is the package (name, version,
   architecture) and lists the .deb's SHA-256 and size, which the record repeats;
4. the FileSet's own metadata (part of its digest) names the same package and .deb.

What it does not prove offline is that the FileSet's *tree* is what that .deb unpacks
to: ``cnpsfs verify --provenance --refetch`` re-imports the .deb to prove that
(cnpsfs.debian.provenance), since a .deb imports deterministically.

Why gpgv and the apt keyring: they are what apt itself trusts, and the signature check
is the one piece of this chain we must not write ourselves. Only the text gpgv says it
verified (``--output``) is read afterwards, never the clear-signed file directly.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, CorruptObjectError, FormatError, MissingObjectError, NotFoundError
from cnpsfs.image.walk import lookup
from cnpsfs.store import T_PROVENANCE, Store

log = logging.getLogger(__name__)

KIND_DEBIAN = "debian-archive"
INDEX_NAME = "cnpsfs.org/apt-index"
#: Where apt keeps the keys it trusts besides those named by Signed-By in the sources.
APT_TRUSTED = ("/etc/apt/trusted.gpg", "/etc/apt/trusted.gpg.d/*.gpg", "/etc/apt/trusted.gpg.d/*.asc")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
GPGV_TIMEOUT = 60.0
_SIGNED_BY = re.compile(r"(?im)^\s*Signed-By:\s*(/\S+)\s*$|\[[^\]]*signed-by=(/[^\s\]]+)[^\]]*\]")


class ProvenanceError(CnpsfsError):
    """A provenance chain is broken; the message names the package and the link."""


@dataclass(frozen=True, slots=True)
class DebianProvenance:
    """A ``cnpsfs/provenance`` object of kind ``debian-archive`` (docs/format.md)."""

    subject: bytes  # the package FileSet's digest
    package: str
    version: str
    architecture: str
    deb_sha256: bytes  # 32 bytes
    deb_size: int
    archive: str  # the repository URI, e.g. http://deb.debian.org/debian/
    index: bytes  # digest of the index FileSet (InRelease and Packages files)
    release: str  # path of the InRelease file inside the index FileSet, e.g. dists/bookworm/InRelease
    packages: str  # the Packages file as the Release file lists it, e.g. main/binary-amd64/Packages
    offset: int  # where the package's stanza starts in that Packages file
    filename: str  # the .deb's path under the archive URI (the stanza's Filename), e.g. pool/main/h/hello/...

    def encode(self) -> bytes:
        return fmt.encode_canonical({
            0: fmt.TYPE_PROVENANCE, 1: fmt.FORMAT_VERSION, 2: self.subject, 3: KIND_DEBIAN, 4: self.package,
            5: self.version, 6: self.architecture, 7: self.deb_sha256, 8: self.deb_size, 9: self.archive,
            10: self.index, 11: self.release, 12: self.packages, 13: self.offset, 14: self.filename})

    @classmethod
    def decode(cls, data: bytes) -> DebianProvenance:
        obj = fmt.decode_object(data)
        if obj[0] != fmt.TYPE_PROVENANCE or obj.get(3) != KIND_DEBIAN:
            raise FormatError("not a debian-archive provenance object")
        try:
            record = cls(obj[2], obj[4], obj[5], obj[6], obj[7], obj[8], obj[9], obj[10], obj[11], obj[12], obj[13],
                         obj[14])
        except KeyError as exc:
            raise FormatError(f"provenance object lacks key {exc.args[0]}") from None
        types = [(record.subject, bytes), (record.deb_sha256, bytes), (record.index, bytes), (record.deb_size, int),
                 (record.offset, int), (record.package, str), (record.version, str), (record.architecture, str),
                 (record.archive, str), (record.release, str), (record.packages, str), (record.filename, str)]
        if not all(isinstance(v, t) and not isinstance(v, bool) for v, t in types):
            raise FormatError("provenance object has a field of the wrong type")
        if len(record.subject) != 32 or len(record.deb_sha256) != 32 or len(record.index) != 32:
            raise FormatError("provenance object: digests must be 32 bytes")
        return record

    @property
    def label(self) -> str:
        return f"{self.package} {self.version} {self.architecture}"

    @property
    def packages_path(self) -> str:
        """The Packages file's path inside the index FileSet (beside the InRelease file)."""
        return posix_join(os.path.dirname(self.release), self.packages)


def posix_join(base: str, rest: str) -> str:
    return f"{base}/{rest}" if base else rest


def provenance_records(store: Store, subject: bytes) -> list[tuple[bytes, DebianProvenance | str]]:
    """Provenance objects filed under *subject*: (object digest, record or why it is unreadable)."""
    out: list[tuple[bytes, DebianProvenance | str]] = []
    for _subject, digest in store.attachments(subject):
        if store.object_type(digest) != T_PROVENANCE:
            continue
        try:
            out.append((digest, DebianProvenance.decode(store.get(digest))))
        except (CorruptObjectError, MissingObjectError, FormatError) as exc:
            out.append((digest, f"provenance object {fmt.format_digest(digest)}: {exc}"))
    return out


def read_file(store: Store, root: fmt.Entry, path: str) -> bytes:
    """The whole content of a regular file in a stored tree, verified against its content hash."""
    from cnpsfs.image.reader import FileReader

    entry = lookup(store, root, path)
    if entry.kind is not fmt.Kind.FILE:
        raise NotFoundError(f"{path} is not a regular file")
    data = FileReader(store).read(entry)
    if entry.size and fmt.digest_bytes(data) != entry.hash:
        raise CorruptObjectError(f"{path}: content does not match its hash")
    return data


# --------------------------------------------------------------------------- deb822 bits


def parse_stanza(data: bytes) -> dict[str, str]:
    """One deb822 stanza (a Packages entry) as field -> value; strict about structure.

    Only single-line fields are compared by the chain, so continuation lines are kept
    verbatim and never interpreted. A repeated field is an error: two SHA256 lines must
    not let one reader see one and another reader the other.
    """
    fields: dict[str, str] = {}
    last = None
    for line in data.split(b"\n"):
        if not line:
            raise FormatError("blank line inside a stanza")
        if line[:1] in (b" ", b"\t"):
            if last is None:
                raise FormatError("continuation line before any field")
            fields[last] += "\n" + line.decode("utf-8", "replace")
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name[:1] in (b"#", b"-"):
            raise FormatError(f"not a field: {line[:60]!r}")
        key = name.decode("ascii", "replace").lower()
        if key in fields:
            raise FormatError(f"field {name.decode('ascii', 'replace')} appears twice")
        fields[key] = value.strip().decode("utf-8", "replace")
        last = key
    return fields


def stanza_at(data: bytes, offset: int) -> bytes:
    """The stanza starting exactly at *offset* (which must be a stanza boundary)."""
    if not 0 <= offset < len(data) or (offset > 0 and data[max(0, offset - 2) : offset] != b"\n\n"):
        raise FormatError(f"offset {offset} is not the start of a stanza")
    end = data.find(b"\n\n", offset)
    chunk = data[offset : end if end >= 0 else len(data)]
    return chunk.rstrip(b"\n")


def release_sha256(cleartext: bytes, path: str) -> tuple[str, int] | None:
    """The SHA-256 and size a Release file's ``SHA256:`` field lists for *path*."""
    in_section = False
    for line in cleartext.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if in_section:
                fields = line.split()
                if len(fields) == 3 and fields[2].decode("utf-8", "replace") == path:
                    try:
                        return fields[0].decode("ascii").lower(), int(fields[1])
                    except (UnicodeDecodeError, ValueError):
                        return None
            continue
        in_section = line.split(b":", 1)[0].strip().lower() == b"sha256"
    return None


# --------------------------------------------------------------------------- keyrings and gpgv


def default_keyrings() -> list[str]:
    """The keyrings apt trusts here: Signed-By files of the host's sources, then the
    trusted.gpg ones, then Debian's archive keyring (when present)."""
    found: list[str] = []
    sources = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list")),
               *sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))]
    for path in sources:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for m in _SIGNED_BY.finditer(open(path, encoding="utf-8").read()):  # noqa: SIM115
                found.append(m.group(1) or m.group(2))
    for pattern in APT_TRUSTED:
        found.extend(sorted(glob.glob(pattern)))
    found.append(DEBIAN_KEYRING)
    unique = list(dict.fromkeys(p for p in found if os.path.isfile(p)))
    return unique


def _dearmor(data: bytes) -> bytes | None:
    """The binary packets of an ASCII-armoured key file (gpgv reads only binary keyrings)."""
    lines = data.decode("ascii", "replace").splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith("-----BEGIN PGP PUBLIC KEY BLOCK"))
    except StopIteration:
        return None
    body: list[str] = []
    in_headers = True
    for line in lines[start + 1 :]:
        if line.startswith("-----END"):
            break
        if in_headers:
            if not line.strip():
                in_headers = False
            elif ":" not in line:
                in_headers = False
                body.append(line.strip())
            continue
        if line.startswith("="):  # the CRC-24 line
            continue
        body.append(line.strip())
    try:
        return base64.b64decode("".join(body), validate=True)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ReleaseCheck:
    cleartext: bytes | None
    signers: tuple[str, ...] = ()
    problem: str | None = None


def gpgv_verify(signed: bytes, keyrings: Sequence[str], *, timeout: float = GPGV_TIMEOUT) -> ReleaseCheck:
    """Check a clear-signed file with gpgv against *keyrings*, as apt does.

    Good when at least one signature is valid (VALIDSIG) by a key in the keyrings and
    none is bad (BADSIG): apt's rule, so an InRelease signed by several archive keys of
    which we hold one is accepted. Returns the text gpgv verified.
    """
    if not keyrings:
        return ReleaseCheck(None, (), "no keyring to check the archive signature with")
    with tempfile.TemporaryDirectory(prefix="cnpsfs-gpgv-") as tmp:
        args = ["gpgv", "--status-fd", "1", "--homedir", tmp, "--output", os.path.join(tmp, "verified")]
        for number, ring in enumerate(keyrings):
            path = ring
            if ring.endswith(".asc"):
                try:
                    binary = _dearmor(open(ring, "rb").read())  # noqa: SIM115
                except OSError:
                    binary = None
                if binary is None:
                    continue
                path = os.path.join(tmp, f"ring{number}.gpg")
                with open(path, "wb") as f:
                    f.write(binary)
            args += ["--keyring", path]
        signed_path = os.path.join(tmp, "InRelease")
        with open(signed_path, "wb") as f:
            f.write(signed)
        args.append(signed_path)
        try:
            result = subprocess.run(args, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return ReleaseCheck(None, (), "gpgv is not installed (apt-get install gpgv)")
        except subprocess.TimeoutExpired:
            return ReleaseCheck(None, (), f"gpgv did not finish within {timeout:.0f} s")
        status = result.stdout.decode("utf-8", "replace").splitlines()
        valid = tuple(line.split()[2] for line in status if line.startswith("[GNUPG:] VALIDSIG "))
        bad = [line for line in status if line.startswith("[GNUPG:] BADSIG ")]
        if bad:
            return ReleaseCheck(None, valid, "bad OpenPGP signature on InRelease: " + bad[0].split(" ", 3)[-1])
        if not valid:
            missing = [line.split()[2] for line in status if line.startswith("[GNUPG:] NO_PUBKEY ")]
            why = f"signed by unknown key {', '.join(missing)}" if missing else "no valid OpenPGP signature"
            return ReleaseCheck(None, (), f"InRelease is not trusted: {why} (keyrings: {', '.join(keyrings)})")
        try:
            cleartext = open(os.path.join(tmp, "verified"), "rb").read()  # noqa: SIM115
        except OSError:
            return ReleaseCheck(None, valid, "gpgv verified InRelease but wrote no text")
        return ReleaseCheck(cleartext, valid)


# --------------------------------------------------------------------------- the chain


#: Proves that a FileSet is a deterministic derivation of another (a merged-/usr view of
#: a package) by recomputing it: returns the digest of the FileSet it derives from, None
#: when it does not claim to be a derivation; raises ProvenanceError when the claim fails.
Derivation = Callable[[Store, bytes, fmt.FileSet], bytes | None]


@dataclass(frozen=True, slots=True)
class ChainResult:
    fileset: bytes  # the FileSet checked (a view's own digest)
    package: str  # "name version arch", or the FileSet's name when unknown
    problem: str | None = None
    record: DebianProvenance | None = None
    signers: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class ChainVerifier:
    """Checks provenance chains; caches what it verified (one gpgv run and one hash per index).

    One verifier serves one decision or one ``verify --provenance`` run: an index checked
    once is then trusted for every package it lists, which is what keeps a 100-package
    image at one gpgv call per suite.
    """

    keyrings: Sequence[str] | None = None
    derivations: Sequence[Derivation] = ()
    _releases: dict[tuple[bytes, str], ReleaseCheck] = field(default_factory=dict)
    _indices: dict[tuple[bytes, str], tuple[bytes | None, str | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keyrings is None:
            self.keyrings = default_keyrings()

    def is_package(self, fs: fmt.FileSet) -> bool:
        deb = fs.metadata.get("debian")
        return isinstance(deb, dict) and isinstance(deb.get("control"), dict)

    def verify(self, store: Store, digest: bytes) -> ChainResult:
        fs = store.get_fileset(digest)
        label = _package_label(fs)
        origin = digest
        try:
            for derive in self.derivations:
                derived = derive(store, digest, fs)
                if derived is not None:
                    origin = derived
                    fs = store.get_fileset(origin)
                    break
        except ProvenanceError as exc:
            return ChainResult(digest, label, str(exc))
        except MissingObjectError as exc:
            return ChainResult(digest, label, f"the FileSet it was derived from is missing: {exc}")
        if not self.is_package(fs):
            return ChainResult(digest, fs.name, "not a Debian package FileSet")
        records = provenance_records(store, origin)
        if not records:
            return ChainResult(digest, label, "no provenance recorded (imported without apt, or before cnpsfs "
                                              "recorded provenance: rebuild to record it)")
        problems = []
        for _object_digest, record in records:
            if isinstance(record, str):
                problems.append(record)
                continue
            problem, signers = self._check(store, origin, fs, record)
            if problem is None:
                return ChainResult(digest, label, None, record, signers)
            problems.append(problem)
        return ChainResult(digest, label, "; ".join(problems))

    def _check(self, store: Store, digest: bytes, fs: fmt.FileSet,
               record: DebianProvenance) -> tuple[str | None, tuple[str, ...]]:
        if record.subject != digest:
            return f"the provenance record is for another FileSet ({fmt.format_digest(record.subject)})", ()
        control = fs.metadata["debian"]["control"]
        archive = fs.metadata["debian"].get("archive") or {}
        claimed = (str(control.get("Package")), str(control.get("Version")), str(control.get("Architecture")))
        if claimed != (record.package, record.version, record.architecture):
            return (f"the provenance record names {record.label}, the FileSet is "
                    f"{' '.join(claimed)}"), ()
        if archive.get("sha256") != record.deb_sha256.hex() or archive.get("size") != record.deb_size:
            return (f"the FileSet was imported from a .deb with SHA-256 {archive.get('sha256')} "
                    f"({archive.get('size')} bytes), the provenance record names {record.deb_sha256.hex()} "
                    f"({record.deb_size} bytes)"), ()
        release = self._release(store, record)
        if release.problem is not None or release.cleartext is None:
            return f"{record.release} of {record.archive}: {release.problem}", ()
        listed = release_sha256(release.cleartext, record.packages)
        if listed is None:
            return f"the signed {record.release} does not list {record.packages}", release.signers
        data, problem = self._index(store, record, listed)
        if problem is not None or data is None:
            return problem, release.signers
        try:
            stanza = parse_stanza(stanza_at(data, record.offset))
        except FormatError as exc:
            return f"{record.packages} at offset {record.offset}: {exc}", release.signers
        found = (stanza.get("package"), stanza.get("version"), stanza.get("architecture"))
        if found != (record.package, record.version, record.architecture):
            return (f"the {record.packages} entry at offset {record.offset} is {' '.join(map(str, found))}, "
                    f"not {record.label}"), release.signers
        if stanza.get("sha256", "").lower() != record.deb_sha256.hex():
            return (f"the signed {record.packages} entry lists SHA-256 {stanza.get('sha256')}, the provenance "
                    f"record says {record.deb_sha256.hex()}"), release.signers
        if stanza.get("size") != str(record.deb_size):
            return (f"the signed {record.packages} entry lists size {stanza.get('size')}, the provenance record "
                    f"says {record.deb_size}"), release.signers
        if stanza.get("filename") != record.filename:
            return (f"the signed {record.packages} entry lists file {stanza.get('filename')}, the provenance record "
                    f"says {record.filename}"), release.signers
        return None, release.signers

    def _release(self, store: Store, record: DebianProvenance) -> ReleaseCheck:
        key = (record.index, record.release)
        cached = self._releases.get(key)
        if cached is None:
            try:
                index = store.get_fileset(record.index)
                signed = read_file(store, index.root, record.release)
            except CnpsfsError as exc:
                cached = ReleaseCheck(None, (), f"cannot read it from the index FileSet: {exc}")
            else:
                assert self.keyrings is not None
                cached = gpgv_verify(signed, self.keyrings)
            self._releases[key] = cached
        return cached

    def _index(self, store: Store, record: DebianProvenance,
               listed: tuple[str, int]) -> tuple[bytes | None, str | None]:
        key = (record.index, record.packages_path)
        cached = self._indices.get(key)
        if cached is None:
            try:
                data = read_file(store, store.get_fileset(record.index).root, record.packages_path)
            except CnpsfsError as exc:
                cached = (None, f"{record.packages}: cannot read it from the index FileSet: {exc}")
            else:
                sha, size = listed
                actual = hashlib.sha256(data).hexdigest()
                if len(data) != size or actual != sha:
                    cached = (None, f"the stored {record.packages} (SHA-256 {actual}, {len(data)} bytes) is not "
                                    f"the one the signed {record.release} lists ({sha}, {size} bytes)")
                else:
                    cached = (data, None)
            self._indices[key] = cached
        return cached


def _package_label(fs: fmt.FileSet) -> str:
    deb = fs.metadata.get("debian")
    control = deb.get("control") if isinstance(deb, dict) else None
    if isinstance(control, dict):
        return f"{control.get('Package')} {control.get('Version')} {control.get('Architecture')}"
    return f"{fs.name}@{fs.version}"


def describe(record: DebianProvenance | str) -> dict[str, Any]:
    """A provenance record for ``cnpsfs inspect`` (what it claims; inspect does not judge)."""
    if isinstance(record, str):
        return {"problem": record}
    return {"kind": KIND_DEBIAN, "package": record.package, "version": record.version,
            "architecture": record.architecture, "deb_sha256": record.deb_sha256.hex(), "deb_size": record.deb_size,
            "archive": record.archive, "release": record.release, "packages": record.packages,
            "filename": record.filename, "index": fmt.format_digest(record.index)}


def check_packages(verifier: ChainVerifier, store: Store, filesets: Iterable[bytes]) -> list[ChainResult]:
    return [verifier.verify(store, digest) for digest in filesets]
