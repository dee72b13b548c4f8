"""Registry credentials where podman, skopeo and docker keep them.

Lookup order (containers-auth.json(5), as containers/image implements it):

1. ``--creds USER:PASSWORD`` given explicitly;
2. ``--authfile FILE``, else ``$REGISTRY_AUTH_FILE``: that file **only**;
3. otherwise, in order: ``${XDG_RUNTIME_DIR}/containers/auth.json`` (without
   ``XDG_RUNTIME_DIR``: ``/run/containers/UID/auth.json``),
   ``${XDG_CONFIG_HOME:-~/.config}/containers/auth.json``,
   ``${DOCKER_CONFIG:-~/.docker}/config.json``, and the legacy ``~/.dockercfg``.

The first file with a matching entry wins. In a file, ``credHelpers[HOST]`` (a
``docker-credential-NAME`` program) is asked first, then the ``auths`` keys from the most
specific down: ``HOST/NS/REPO``, ``HOST/NS``, ``HOST``; a key written as a URL
(``https://index.docker.io/v1/``, Docker's legacy form) counts by its host only, and
``index.docker.io`` / ``registry-1.docker.io`` mean ``docker.io``. An entry's ``auth`` is
base64 of ``USER:PASSWORD``; docker's global ``credsStore`` helper is tried last in its file.
Identity tokens (OAuth2 refresh tokens) are not supported: such an entry is skipped with
a log line.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cnpsfs.errors import AuthError, UsageError

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 30.0
_HUB_ALIASES = {"index.docker.io": "docker.io", "registry-1.docker.io": "docker.io"}


@dataclass(frozen=True)
class Credentials:
    """A user name and password, and where they came from (for error messages)."""

    username: str
    password: str = field(repr=False)
    source: str = "--creds"

    def __str__(self) -> str:
        return f"user {self.username!r} (from {self.source})"


def parse_creds(text: str, *, source: str = "--creds") -> Credentials:
    """``USER:PASSWORD`` (skopeo's ``--creds``); the password may contain colons."""
    user, colon, password = text.partition(":")
    if not user or not colon:
        raise UsageError(f"{source}: expected USERNAME:PASSWORD")
    return Credentials(user, password, source)


def normalize_key(key: str) -> str:
    """An ``auths`` key as ``HOST[:PORT][/PATH]``: URL forms reduced to their host, Hub aliases merged."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1].split("/", 1)[0]
    key = key.rstrip("/")
    host, slash, path = key.partition("/")
    host = _HUB_ALIASES.get(host, host)
    return host + slash + path


def auth_file_paths(environ: Mapping[str, str] | None = None, *,
                    authfile: str | None = None) -> list[tuple[Path, bool]]:
    """The files to search, in order, each with whether it is in the legacy ``.dockercfg`` format."""
    env = os.environ if environ is None else environ
    chosen = authfile or env.get("REGISTRY_AUTH_FILE")
    if chosen:
        return [(Path(chosen), False)]
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    runtime = env.get("XDG_RUNTIME_DIR")
    paths = [Path(runtime, "containers", "auth.json") if runtime else Path(f"/run/containers/{os.getuid()}/auth.json")]
    paths.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config", "containers", "auth.json"))
    docker_config = env.get("DOCKER_CONFIG")
    paths.append(Path(docker_config, "config.json") if docker_config else home / ".docker" / "config.json")
    return [(p, False) for p in paths] + [(home / ".dockercfg", True)]


def _candidates(registry: str, repository: str) -> list[str]:
    """Keys that match REGISTRY/REPOSITORY, most specific first."""
    registry = normalize_key(registry)
    parts = [p for p in repository.split("/") if p]
    return [registry + "".join("/" + p for p in parts[:n]) for n in range(len(parts), -1, -1)]


def _decode_entry(entry: object, path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise UsageError(f"{path}: entry {key!r} is not an object")
    source = f"{path} ({key})"
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise UsageError(f"{path}: entry {key!r}: auth is not base64 of USER:PASSWORD") from None
        user, colon, password = decoded.partition(":")
        if not colon or not user:
            raise UsageError(f"{path}: entry {key!r}: auth is not base64 of USER:PASSWORD")
        return Credentials(user, password.strip("\x00"), source)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"], source)
    if entry.get("identitytoken"):
        log.info("%s: entry %r holds an identity token, which cnpsfs does not support; skipped", path, key)
    return None


def run_credential_helper(helper: str, server: str, *, source: str) -> Credentials | None:
    """Ask ``docker-credential-HELPER get`` for *server*; None if it has nothing for it."""
    program = f"docker-credential-{helper}"
    try:
        proc = subprocess.run([program, "get"], input=server, capture_output=True, text=True,
                              timeout=HELPER_TIMEOUT, check=False)
    except FileNotFoundError:
        log.info("%s: credential helper %s is not installed; skipped", source, program)
        return None
    except subprocess.TimeoutExpired:
        raise AuthError(f"{server}: credential helper {program} did not answer in {HELPER_TIMEOUT:g} s",
                        host=server) from None
    if proc.returncode != 0:
        message = (proc.stdout + proc.stderr).strip()
        if "not found" in message.lower():
            return None
        raise AuthError(f"{server}: credential helper {program} failed: {message.splitlines()[0] if message else ''}"
                        .rstrip(": "), host=server)
    try:
        doc = json.loads(proc.stdout)
        user, secret = doc["Username"], doc["Secret"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise AuthError(f"{server}: credential helper {program} printed no Username/Secret", host=server) from None
    if user == "<token>":
        log.info("%s: %s gave an identity token, which cnpsfs does not support; skipped", source, program)
        return None
    return Credentials(str(user), str(secret), f"{program} ({source})")


def _search_file(path: Path, legacy: bool, keys: list[str], host: str) -> Credentials | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    if not text.strip():
        return None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: not a JSON object")
    helpers = doc.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for hkey, helper in helpers.items():
            if normalize_key(hkey) == host and isinstance(helper, str):
                found = run_credential_helper(helper, hkey, source=str(path))
                if found:
                    return found
    auths = doc if legacy else doc.get("auths") or {}
    if not isinstance(auths, dict):
        raise UsageError(f"{path}: 'auths' is not an object")
    by_key: dict[str, tuple[str, object]] = {}
    for raw_key, entry in auths.items():
        by_key.setdefault(normalize_key(raw_key), (raw_key, entry))
    for key in keys:
        if key in by_key:
            raw_key, entry = by_key[key]
            found = _decode_entry(entry, path, raw_key)
            if found:
                return found
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        return run_credential_helper(store, host, source=str(path))
    return None


def lookup_credentials(registry: str, repository: str = "", *, creds: str | None = None,
                       authfile: str | None = None, environ: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for REGISTRY/REPOSITORY, or None for anonymous access (see the module doc).

    *registry* is the reference's registry name (``docker.io`` for the Hub), ``HOST[:PORT]``.
    """
    if creds is not None:
        return parse_creds(creds)
    keys = _candidates(registry, repository)
    host = normalize_key(registry)
    for path, legacy in auth_file_paths(environ, authfile=authfile):
        found = _search_file(path, legacy, keys, host)
        if found:
            log.debug("credentials for %s/%s: %s", registry, repository, found)
            return found
    if authfile and not Path(authfile).exists():
        raise UsageError(f"--authfile {authfile}: no such file")
    return None
