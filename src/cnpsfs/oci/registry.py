"""``docker://`` references: the OCI distribution registry client adapted to
:class:`~cnpsfs.oci.layout.ImageSource` (pull) and :class:`~cnpsfs.oci.exporter.BlobSink` (push).

The client itself (auth, token flow, retries, TLS) lives in :mod:`cnpsfs.transport`.
"""

from __future__ import annotations

from typing import Any

from cnpsfs.errors import CnpsfsError


def _client_module() -> Any:
    try:
        from cnpsfs.transport import registry
    except ImportError:
        raise CnpsfsError("docker:// is not available yet: this build has no registry client "
                          "(use oci:DIR or docker-archive:FILE)") from None
    return registry


def open_registry_source(reference: str, options: Any) -> Any:
    _client_module()
    raise CnpsfsError("docker:// is not wired to the registry client yet")


def open_registry_sink(reference: str, options: Any) -> Any:
    _client_module()
    raise CnpsfsError("docker:// is not wired to the registry client yet")
