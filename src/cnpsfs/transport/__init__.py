"""Network transport: HTTP sessions, an OCI distribution registry client, credentials.

A leaf layer beside ``format/``: it imports only the standard library, urllib3 and
:mod:`cnpsfs.errors`, so the remote stores (``store/``) and the OCI import/export
(``oci/``) can both build on it. The face:

- :class:`Session` / :class:`HttpConfig` (``http.py``): timeouts, deadline, retries,
  redirects, proxies, TLS, Range reads;
- :class:`RegistryClient` (``registry.py``): one repository of an OCI registry;
- :func:`lookup_credentials` / :class:`Credentials` (``auth.py``): podman/docker/skopeo auth files;
- :func:`parse_reference` / :class:`ImageReference` (``reference.py``): ``docker://`` references.
"""

from __future__ import annotations

from cnpsfs.transport.auth import Credentials, lookup_credentials, parse_creds
from cnpsfs.transport.http import HttpConfig, Response, Session
from cnpsfs.transport.reference import ImageReference, check_digest, parse_reference
from cnpsfs.transport.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    RegistryClient,
    digest_of,
    is_loopback,
)

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_MEDIA_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Credentials",
    "Descriptor",
    "HttpConfig",
    "ImageReference",
    "Manifest",
    "RegistryClient",
    "Response",
    "Session",
    "check_digest",
    "digest_of",
    "is_loopback",
    "lookup_credentials",
    "parse_creds",
    "parse_reference",
]
