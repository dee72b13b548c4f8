"""The chunker's cut rules (docs/format.md, "Chunking"): part of the format.

Changing any parameter here changes every digest, so they live in the format layer,
not beside the code that feeds the chunker (``cnpsfs.ingest.content``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # imported by new_chunker: reading objects (a mount) never cuts chunks
    import pyfastcdc

CDC_AVG = 64 * 1024
CDC_MIN = 16 * 1024
CDC_MAX = 256 * 1024
CDC_NORMALIZATION: Literal[1] = 1
#: Files of at least this size are cut alone from their first byte; smaller ones are
#: concatenated in canonical path order into one stream per FileSet.
LARGE_FILE = 256 * 1024


def new_chunker() -> pyfastcdc.FastCDC:
    """A FastCDC 2020 chunker with the format's parameters."""
    import pyfastcdc

    return pyfastcdc.FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX,
                             normalized_chunking=CDC_NORMALIZATION)
