"""cnpsfs: a container-native package filesystem.

Root filesystems are composed from read-only, content-addressed FileSets kept in a
deduplicating store and served lazily over FUSE.
"""

__version__ = "0.1.0"
