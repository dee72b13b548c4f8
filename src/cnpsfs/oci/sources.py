"""Image references by transport, named as skopeo names them, and the names they default to.

``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``, ``docker-archive:FILE[:NAME:TAG|:@N]`` and
``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``. A reference's default cnpsfs name is its
repository and its default version its tag, made to fit the tag grammar of
docs/format.md (a registry port is dropped: ``localhost:5000/app:1`` is
``localhost/app@1``).
"""

from __future__ import annotations

import os
import re

from cnpsfs.errors import UsageError
from cnpsfs.oci.layout import DockerArchiveSource, ImageSource, open_oci_archive, open_oci_dir
from cnpsfs.oci.registry import RegistryOptions, open_registry_source, parse
from cnpsfs.store import check_tag_name, check_tag_version

TRANSPORTS = ("docker://", "oci:", "oci-archive:", "docker-archive:")


def split_transport(spec: str) -> tuple[str, str]:
    for transport in TRANSPORTS:
        if spec.startswith(transport):
            return transport, spec[len(transport):]
    raise UsageError(f"{spec!r}: unknown transport; use one of {', '.join(t + '…' for t in TRANSPORTS)}")


def clean_name(text: str) -> str:
    """*text* (a repository) as a cnpsfs tag name, or localhost/<text> when it has no host."""
    text = text.lower()
    text = re.sub(r"[^a-z0-9._/-]", "-", text)
    parts = [p for p in text.split("/") if p]
    has_host = len(parts) >= 2 and re.fullmatch(r"[a-z0-9.-]+", parts[0]) is not None and (
        "." in parts[0] or parts[0] == "localhost")
    if not has_host:
        parts = ["localhost", *parts]
    parts[0] = ".".join(p.strip("-") for p in parts[0].split(".") if p.strip("-")) or "localhost"
    name = "/".join(parts)
    try:
        check_tag_name(name)
    except UsageError:
        return "localhost/image"
    return name


def clean_version(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9._+~:-]", "-", text)
    try:
        check_tag_version(text)
    except UsageError:
        return "latest"
    return text


def _basename(path: str) -> str:
    base = os.path.basename(os.path.normpath(os.path.abspath(path)))
    for suffix in (".tar", ".oci"):
        base = base.removesuffix(suffix)
    return base or "image"


def split_docker_ref(ref: str) -> tuple[str, str]:
    """``host/repo:tag`` or ``host/repo@sha256:…`` -> (repository, tag or digest)."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = ref.rpartition(":")
        return repo, tag
    return ref, "latest"


def _drop_port(repository: str) -> str:
    host, _, rest = repository.partition("/")
    return f"{host.split(':')[0]}/{rest}" if rest else repository


def open_source(spec: str, registry: RegistryOptions | None = None) -> tuple[ImageSource, str, str]:
    """The source *spec* names, with its default name and version."""
    transport, rest = split_transport(spec)
    source: ImageSource
    if transport == "oci:":
        source = open_oci_dir(rest)
        _path, _, tag = rest.partition(":")
        return source, clean_name(_basename(_path)), clean_version(tag or "latest")
    if transport == "oci-archive:":
        source = open_oci_archive(rest)
        _path, _, tag = rest.partition(":")
        return source, clean_name(_basename(_path)), clean_version(tag or "latest")
    if transport == "docker-archive:":
        archive = DockerArchiveSource(rest)
        if archive.repo_tags:
            repo, tag = split_docker_ref(archive.repo_tags[0])
            return archive, clean_name(_drop_port(repo)), clean_version(tag)
        return archive, clean_name(_basename(rest.partition(":")[0])), "latest"
    ref = parse(rest)
    source = open_registry_source(rest, registry or RegistryOptions())
    return source, clean_name(_drop_port(f"{ref.registry}/{ref.repository}")), clean_version(ref.tag or ref.digest
                                                                                            or "latest")
