"""Exporters: a FileSet or image written out as a directory tree or a tar archive."""

from cnpsfs.export.tree import export_dir, export_tar, write_tar

__all__ = ["export_dir", "export_tar", "write_tar"]
