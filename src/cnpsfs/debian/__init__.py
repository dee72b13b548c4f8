"""Debian package formats: the .deb ar container, control files, versions, tag names.

Pure helpers with no store access; :mod:`cnpsfs.debian.deb` puts them together.
"""
