"""The canonical object format (docs/format.md is normative).

The lowest layer: digests, the CBOR encoding rules, the object types (directory,
extents, FileSet, image; the detached profile) and the chunker's cut rules. It knows nothing of where objects
are stored; everything above imports it as ``from cnpsfs import format as fmt``.

The names below load their module on first use (PEP 562): the chunker's cut rules and
pyfastcdc are for importers only, and ``cnpsfs status`` needs none of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cnpsfs.errors import FormatError

if TYPE_CHECKING:
    from cnpsfs.format.chunker import CDC_AVG, CDC_MAX, CDC_MIN, CDC_NORMALIZATION, LARGE_FILE, new_chunker
    from cnpsfs.format.objects import (
        CHUNK_MAX,
        DIGEST_PREFIX,
        DIGEST_SIZE,
        FORMAT_VERSION,
        IFMT_KIND,
        INLINE_EXTENTS_MAX,
        KIND_IFMT,
        MAX_DEPTH,
        MAX_DIR_ENTRIES,
        MAX_EXTENTS,
        MAX_LAYERS,
        MAX_NESTING,
        MAX_OBJECT_SIZE,
        NAME_MAX,
        PATH_MAX,
        TYPE_DIR,
        TYPE_EXTENTS,
        TYPE_FILESET,
        TYPE_IMAGE,
        TYPE_PROVENANCE,
        TYPE_SIGNATURE,
        XATTR_NAME_MAX,
        XATTR_SIZE_MAX,
        CompositionMode,
        Directory,
        Entry,
        Extent,
        FileSet,
        Image,
        Kind,
        Layer,
        check_entry,
        check_name,
        decode_cbor,
        decode_directory,
        decode_extents_object,
        decode_fileset,
        decode_image,
        decode_object,
        digest_bytes,
        encode_canonical,
        encode_directory,
        encode_extents_object,
        encode_fileset,
        encode_image,
        entry_from_cbor,
        entry_to_cbor,
        format_digest,
        layer_to_cbor,
        normalize_at,
        object_type,
        parse_digest,
        referenced_digests,
        show_path,
    )
    from cnpsfs.format.profile import (
        DEFAULT_PROFILE,
        PROFILE_MAX_ENTRIES,
        PROFILE_MAX_PATH_BYTES,
        PROFILE_MAX_RANGES,
        TYPE_PROFILE,
        Profile,
        ProfileEntry,
        Touch,
        check_profile_name,
        check_profile_path,
        decode_profile,
        encode_profile,
        merge_ranges,
    )

#: Where each name lives: the submodule of this package loaded when the name is first used.
_WHERE = {
    **dict.fromkeys(("CDC_AVG", "CDC_MAX", "CDC_MIN", "CDC_NORMALIZATION", "LARGE_FILE", "new_chunker"), "chunker"),
    **dict.fromkeys(("CHUNK_MAX", "DIGEST_PREFIX", "DIGEST_SIZE", "FORMAT_VERSION", "IFMT_KIND",
                     "INLINE_EXTENTS_MAX", "KIND_IFMT", "MAX_DEPTH", "MAX_DIR_ENTRIES", "MAX_EXTENTS", "MAX_LAYERS",
                     "MAX_NESTING", "MAX_OBJECT_SIZE", "NAME_MAX", "PATH_MAX", "TYPE_DIR", "TYPE_EXTENTS",
                     "TYPE_FILESET", "TYPE_IMAGE", "TYPE_PROVENANCE", "TYPE_SIGNATURE", "XATTR_NAME_MAX",
                     "XATTR_SIZE_MAX", "CompositionMode", "Directory", "Entry", "Extent", "FileSet", "Image",
                     "Kind", "Layer", "check_entry", "check_name", "decode_cbor", "decode_directory",
                     "decode_extents_object", "decode_fileset", "decode_image", "decode_object", "digest_bytes",
                     "encode_canonical", "encode_directory", "encode_extents_object", "encode_fileset",
                     "encode_image", "entry_from_cbor", "entry_to_cbor", "format_digest", "layer_to_cbor",
                     "normalize_at", "object_type", "parse_digest", "referenced_digests", "show_path"), "objects"),
    **dict.fromkeys(("DEFAULT_PROFILE", "PROFILE_MAX_ENTRIES", "PROFILE_MAX_PATH_BYTES", "PROFILE_MAX_RANGES",
                     "TYPE_PROFILE", "Profile", "ProfileEntry", "Touch", "check_profile_name", "check_profile_path",
                     "decode_profile", "encode_profile", "merge_ranges"), "profile"),
}

__all__ = [
    'CDC_AVG',
    'CDC_MAX',
    'CDC_MIN',
    'CDC_NORMALIZATION',
    'CHUNK_MAX',
    'DEFAULT_PROFILE',
    'DIGEST_PREFIX',
    'DIGEST_SIZE',
    'FORMAT_VERSION',
    'IFMT_KIND',
    'INLINE_EXTENTS_MAX',
    'KIND_IFMT',
    'LARGE_FILE',
    'MAX_DEPTH',
    'MAX_DIR_ENTRIES',
    'MAX_EXTENTS',
    'MAX_LAYERS',
    'MAX_NESTING',
    'MAX_OBJECT_SIZE',
    'NAME_MAX',
    'PATH_MAX',
    'PROFILE_MAX_ENTRIES',
    'PROFILE_MAX_PATH_BYTES',
    'PROFILE_MAX_RANGES',
    'TYPE_DIR',
    'TYPE_EXTENTS',
    'TYPE_FILESET',
    'TYPE_IMAGE',
    'TYPE_PROFILE',
    'TYPE_PROVENANCE',
    'TYPE_SIGNATURE',
    'XATTR_NAME_MAX',
    'XATTR_SIZE_MAX',
    'CompositionMode',
    'Directory',
    'Entry',
    'Extent',
    'FileSet',
    'FormatError',
    'Image',
    'Kind',
    'Layer',
    'Profile',
    'ProfileEntry',
    'Touch',
    'check_entry',
    'check_name',
    'check_profile_name',
    'check_profile_path',
    'decode_cbor',
    'decode_directory',
    'decode_extents_object',
    'decode_fileset',
    'decode_image',
    'decode_object',
    'decode_profile',
    'digest_bytes',
    'encode_canonical',
    'encode_directory',
    'encode_extents_object',
    'encode_fileset',
    'encode_image',
    'encode_profile',
    'entry_from_cbor',
    'entry_to_cbor',
    'format_digest',
    'layer_to_cbor',
    'merge_ranges',
    'new_chunker',
    'normalize_at',
    'object_type',
    'parse_digest',
    'referenced_digests',
    'show_path',
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'cnpsfs.format' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cnpsfs.format.{module}"), name)
    globals()[name] = value
    return value
