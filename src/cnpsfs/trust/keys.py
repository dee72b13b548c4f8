"""Ed25519 signing keys, kept in OpenSSH's file formats (docs/trust.md, "Keys").

Why OpenSSH's formats and not our own or minisign's: the ``cryptography`` library writes
and reads both files natively, so there is no key encoding of ours to get wrong; existing
tools hold them (``ssh-keygen -l -f KEY.pub`` prints the same ``SHA256:`` fingerprint we
print as the key id, ``ssh-keygen -y -f KEY.key`` re-derives the public key), and a public
key is one line that fits in a policy directory, a configuration-management variable or
an ``authorized_keys``-style file. minisign's format would need our own parser and writer
(it is not in ``cryptography``) and its key ids are random, not derived from the key.

A public key file holds one or more lines ``ssh-ed25519 <base64 blob> [comment]``; blank
lines and lines starting with ``#`` are ignored. The blob is the SSH wire encoding
(RFC 8709): ``string "ssh-ed25519"`` then ``string <32-byte public key>``, each string a
4-byte big-endian length and its bytes. The **key id** is the SHA-256 of that blob (32
bytes), written ``SHA256:<base64 without padding>`` exactly as OpenSSH prints fingerprints.

Public keys are parsed here, without ``cryptography.hazmat.primitives.serialization``,
and verified with libsodium when it is installed (:func:`_libsodium`): a mount under a
policy then imports nothing of ``cryptography`` at all, which is what keeps a
signature-checking mount within 10 ms of an unchecked one. ``cryptography`` generates
keys, signs, and verifies where libsodium is missing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import os
import stat
import struct
from pathlib import Path
from typing import Any, NamedTuple

from cnpsfs.errors import CnpsfsError, UsageError

KEY_TYPE = "ssh-ed25519"
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


class KeyFileError(CnpsfsError):
    """A key file is unreadable or does not hold what it should; the message names it."""


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def key_blob(raw: bytes) -> bytes:
    """The SSH wire encoding of an Ed25519 public key (RFC 8709 section 4)."""
    return _ssh_string(KEY_TYPE.encode()) + _ssh_string(raw)


def key_id_of(raw: bytes) -> bytes:
    """The key id: SHA-256 of the key's wire blob (what OpenSSH fingerprints)."""
    return hashlib.sha256(key_blob(raw)).digest()


def format_key_id(key_id: bytes) -> str:
    """``SHA256:<base64, no padding>``, as ``ssh-keygen -l`` prints it."""
    return "SHA256:" + base64.b64encode(key_id).decode().rstrip("=")


class PublicKey(NamedTuple):
    """An Ed25519 public key and where it came from (for messages).

    Value types on the mount path are NamedTuples, not frozen dataclasses: making a frozen,
    slotted dataclass costs about 1 ms at import, and a mount under a policy imports a
    dozen of them (docs/trust.md, "Cost").
    """

    raw: bytes
    comment: str = ""
    source: str = ""

    @property
    def key_id(self) -> bytes:
        return key_id_of(self.raw)

    @property
    def fingerprint(self) -> str:
        return format_key_id(self.key_id)

    def line(self) -> str:
        text = f"{KEY_TYPE} {base64.b64encode(key_blob(self.raw)).decode()}"
        return f"{text} {self.comment}" if self.comment else text

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when *signature* is this key's Ed25519 signature of *message*."""
        if len(signature) != SIGNATURE_SIZE:
            return False
        sodium = _libsodium()
        if sodium is not None:
            return sodium.crypto_sign_verify_detached(signature, message, len(message), self.raw) == 0
        return _verify_cryptography(self.raw, signature, message)


def _verify_cryptography(raw: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
    except InvalidSignature:
        return False
    return True


#: Where libsodium is on Debian and its derivatives (libsodium23), newest soname first.
_SODIUM_NAMES = ("libsodium.so.26", "libsodium.so.23", "libsodium.so")


@functools.cache
def _libsodium() -> Any:
    """libsodium's ``crypto_sign_verify_detached`` through ctypes, or None without libsodium.

    Why not ``cryptography`` here, which signs and generates keys: verification runs in
    every mount under a policy, and importing cryptography's Ed25519 costs about 6 ms of
    CPU, most of the 10 ms a signature check may add to a mount (docs/trust.md, "Cost").
    The mount has ctypes loaded already; opening libsodium costs well under a millisecond.
    Both implement RFC 8032 verification (libsodium also refuses non-canonical and
    small-order encodings); tests check that they agree. Loaded once per process.
    """
    import ctypes

    for name in _SODIUM_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        if lib.sodium_init() < 0:
            return None
        verify = lib.crypto_sign_verify_detached
        verify.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_char_p]
        verify.restype = ctypes.c_int
        return lib
    return None


def parse_public_line(line: str, where: str) -> PublicKey:
    """One ``ssh-ed25519 AAAA... comment`` line; *where* (``FILE:LINE``) names it in errors."""
    fields = line.split(None, 2)
    if len(fields) < 2:
        raise KeyFileError(f"{where}: not a public key line (expected '{KEY_TYPE} <base64> [comment]')")
    if fields[0] != KEY_TYPE:
        raise KeyFileError(f"{where}: key type {fields[0]!r} is not supported (only {KEY_TYPE})")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{where}: the key is not valid base64") from None
    raw = _parse_blob(blob, where)
    return PublicKey(raw, fields[2].strip() if len(fields) > 2 else "", where)


def _parse_blob(blob: bytes, where: str) -> bytes:
    parts: list[bytes] = []
    rest = blob
    while rest:
        if len(rest) < 4:
            raise KeyFileError(f"{where}: truncated key blob")
        (length,) = struct.unpack(">I", rest[:4])
        if len(rest) < 4 + length:
            raise KeyFileError(f"{where}: truncated key blob")
        parts.append(rest[4 : 4 + length])
        rest = rest[4 + length :]
    if len(parts) != 2 or parts[0] != KEY_TYPE.encode() or len(parts[1]) != PUBLIC_KEY_SIZE:
        raise KeyFileError(f"{where}: not an Ed25519 public key blob")
    return parts[1]


def load_public_keys(path: str | Path) -> list[PublicKey]:
    """Every key in a public key file (one or more lines); an empty file is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise KeyFileError(f"cannot read key file {path}: {reason}") from None
    keys = [parse_public_line(line, f"{path}:{number}")
            for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise KeyFileError(f"key file {path} holds no public key")
    return keys


class SigningKey(NamedTuple):
    """A private Ed25519 key loaded for signing."""

    private: Any  # cryptography's Ed25519PrivateKey
    public: PublicKey
    source: str

    def sign(self, message: bytes) -> bytes:
        return bytes(self.private.sign(message))


def load_signing_key(path: str | Path) -> SigningKey:
    """An OpenSSH private key file (``-----BEGIN OPENSSH PRIVATE KEY-----``) holding Ed25519.

    Refused, as ssh refuses it, when other users may read it; passphrase-protected keys
    are not supported (signing runs unattended in build pipelines; keep the key on a
    machine that only signs).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        data = f.read()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"private key {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}): "
                        f"chmod 600 {path}")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"private key {path} is passphrase-protected: not supported") from None
    except (ValueError, binascii.Error):
        raise KeyFileError(f"{path} is not an OpenSSH private key") from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm and friends
        raise KeyFileError(f"{path}: cannot load the private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"private key {path} is not an Ed25519 key")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return SigningKey(key, PublicKey(raw, "", str(path)), str(path))


def key_paths(path: str | Path) -> tuple[Path, Path]:
    """``PATH.key`` and ``PATH.pub`` for ``cnpsfs key generate PATH`` (a trailing .key is dropped)."""
    text = str(path)
    if text.endswith(PRIVATE_SUFFIX):
        text = text[: -len(PRIVATE_SUFFIX)]
    if not text or text.endswith("/"):
        raise UsageError(f"key path {str(path)!r} needs a file name")
    return Path(text + PRIVATE_SUFFIX), Path(text + PUBLIC_SUFFIX)


def generate(path: str | Path, comment: str | None = None) -> tuple[Path, Path, PublicKey]:
    """Write a new key pair: ``PATH.key`` (mode 0600) and ``PATH.pub``. Never overwrites."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = key_paths(path)
    for existing in (private_path, public_path):
        if existing.exists() or existing.is_symlink():
            raise UsageError(f"{existing} already exists: not overwriting a key")
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public = PublicKey(raw, comment if comment is not None else private_path.stem, str(public_path))
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    written: list[Path] = []
    try:
        _write_new(private_path, private, 0o600)
        written.append(private_path)
        _write_new(public_path, (public.line() + "\n").encode(), 0o644)
        written.append(public_path)
    except OSError as exc:
        for done in written:
            with contextlib.suppress(OSError):
                done.unlink()
        raise CnpsfsError(f"cannot write {exc.filename or path}: {exc.strerror}") from None
    return private_path, public_path, public


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; never added any
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
