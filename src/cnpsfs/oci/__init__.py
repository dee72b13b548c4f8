"""OCI: runtime bundles, and images in and out (layouts, ``docker save`` archives and
registries; docs/oci.md).

Image import is :func:`cnpsfs.oci.importer.import_oci` from a source that
:func:`cnpsfs.oci.sources.open_source` opens; export is
:func:`cnpsfs.oci.exporter.export_oci` to a sink from :func:`cnpsfs.oci.exporter.open_sink`.
"""
