"""The profile object (docs/format.md §1.13): the golden vector, the encoding spelled out,
and everything a reader refuses or ignores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2
import pytest

from cnpsfs import format as fmt
from cnpsfs.errors import FormatError

GOLDEN = json.loads((Path(__file__).parent / "golden" / "profile.json").read_text())
IMAGE = bytes(range(32))


def golden_profile() -> fmt.Profile:
    raw = GOLDEN["profile"]
    entries = [fmt.ProfileEntry(fmt.Touch(e["touch"]), bytes.fromhex(e["path_hex"]), tuple(e["ranges"]))
               for e in raw["entries"]]
    return fmt.Profile(raw["name"], fmt.parse_digest(raw["image"]), entries, raw["created_ns"], raw["metadata"])


def test_golden_vector() -> None:
    encoded = fmt.encode_profile(golden_profile())
    assert encoded.hex() == GOLDEN["object_hex"]
    assert fmt.format_digest(fmt.digest_bytes(encoded)) == GOLDEN["object_digest"]
    assert fmt.decode_profile(encoded) == golden_profile()
    assert fmt.object_type(encoded) == fmt.TYPE_PROFILE
    assert fmt.referenced_digests(encoded) == []  # it reaches nothing: gc keeps it through its image


def test_encoding_by_hand() -> None:
    """The smallest profile, byte by byte: a 5-key map (no created_ns, no metadata)."""
    profile = fmt.Profile("p", IMAGE, [fmt.ProfileEntry(fmt.Touch.FILE, b"a", (0, 24))])
    expected = (bytes([0xA5, 0x00, 0x6E]) + b"cnpsfs/profile" + bytes([0x01, 0x01, 0x02, 0x61]) + b"p"
                + bytes([0x03, 0x58, 0x20]) + IMAGE
                + bytes([0x04, 0x81, 0x83, 0x02, 0x41]) + b"a" + bytes([0x82, 0x00, 0x18, 0x18]))
    assert fmt.encode_profile(profile) == expected


def obj(**changes: Any) -> dict[int, Any]:
    base: dict[int, Any] = {0: "cnpsfs/profile", 1: 1, 2: "default", 3: IMAGE,
                            4: [[1, b""], [0, b"usr"], [2, b"usr/f", [0, 10, 20, 5]]]}
    for key, value in changes.items():
        k = int(key[1:])
        if value is None:
            base.pop(k, None)
        else:
            base[k] = value
    return base


def raw(value: dict[int, Any]) -> bytes:
    return cbor2.dumps(value, canonical=True)


def test_a_reader_ignores_keys_it_does_not_know() -> None:
    profile = fmt.decode_profile(raw(obj(k9="later")))
    assert [e.path for e in profile.entries] == [b"", b"usr", b"usr/f"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"k0": "cnpsfs/image"}, "expected a cnpsfs/profile"),
    ({"k2": None}, "profile name"),
    ({"k2": "no/slash"}, "invalid profile name"),
    ({"k2": "x" * 65}, "invalid profile name"),
    ({"k3": b"short"}, "32-byte digest"),
    ({"k4": None}, "entries"),
    ({"k4": [[4, b"a"]]}, "known touch"),
    ({"k4": [[3, b"a", [0, 1]]]}, "has ranges"),
    ({"k4": [[0, "text"]]}, "byte string"),
    ({"k4": [[0, b"/abs"]]}, "normalised relative path"),
    ({"k4": [[0, b"a//b"]]}, "normalised relative path"),
    ({"k4": [[0, b"a/../b"]]}, "normalised relative path"),
    ({"k4": [[0, b"a\0b"]]}, "normalised relative path"),
    ({"k4": [[0, b"a"], [1, b"a"]]}, "appears twice"),
    ({"k4": [[0, b"a", [0, 1]]]}, "has ranges"),
    ({"k4": [[2, b"f"]]}, "no range list"),
    ({"k4": [[2, b"f", []]]}, "non-empty list"),
    ({"k4": [[2, b"f", [0, 10, 5]]]}, "non-empty list"),
    ({"k4": [[2, b"f", [0, 0]]]}, "out of bounds"),
    ({"k4": [[2, b"f", [-1, 10]]]}, "out of bounds"),
    ({"k4": [[2, b"f", [10, 5, 0, 5]]]}, "not sorted"),
    ({"k4": [[2, b"f", [0, 10, 10, 5]]]}, "not sorted"),  # touching: must have been merged
    ({"k4": [[2, b"f", [0, 10, 5, 10]]]}, "not sorted"),  # overlapping
    ({"k5": -1}, "created_ns"),
    ({"k6": {1: "x"}}, "metadata"),
])
def test_a_reader_refuses(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        fmt.decode_profile(raw(obj(**changes)))


def test_limits_are_refused_naming_the_limit() -> None:
    many = [[0, f"d{i}".encode()] for i in range(fmt.PROFILE_MAX_ENTRIES + 1)]
    with pytest.raises(FormatError, match="exceeds the limit of 65536 entries"):
        fmt.decode_profile(raw(obj(k4=many)))
    ranges = [x for i in range(fmt.PROFILE_MAX_RANGES + 1) for x in (2 * i, 1)]
    with pytest.raises(FormatError, match="exceeds the limit of 262144 ranges"):
        fmt.decode_profile(raw(obj(k4=[[2, b"f", ranges]])))
    long = [[0, (f"{i:05d}/" + "p" * 250 + "/" + "q" * 250).encode()] for i in range(8400)]
    with pytest.raises(FormatError, match=r"paths of \d+ bytes exceed the limit"):
        fmt.decode_profile(raw(obj(k4=long)))
    # An encoder never writes what a reader refuses.
    entries = [fmt.ProfileEntry(fmt.Touch.DIR, f"d{i}".encode()) for i in range(fmt.PROFILE_MAX_ENTRIES + 1)]
    with pytest.raises(FormatError, match="limit"):
        fmt.encode_profile(fmt.Profile("default", IMAGE, entries))


def test_the_encoder_refuses_what_a_reader_would() -> None:
    d = fmt.ProfileEntry(fmt.Touch.DIR, b"d")
    for bad in (fmt.Profile("bad name", IMAGE, []),
                fmt.Profile("ok", b"short", []),
                fmt.Profile("ok", IMAGE, [fmt.ProfileEntry(fmt.Touch.FILE, b"f", (5, 1, 0, 1))]),
                fmt.Profile("ok", IMAGE, [fmt.ProfileEntry(fmt.Touch.DIR, b"d", (0, 1))]),
                fmt.Profile("ok", IMAGE, [d, d]),
                fmt.Profile("ok", IMAGE, [fmt.ProfileEntry(fmt.Touch.DIR, b"../d")])):
        with pytest.raises(FormatError):
            fmt.encode_profile(bad)


def test_merge_ranges() -> None:
    assert fmt.merge_ranges([(10, 5), (0, 4), (4, 2), (30, 1), (12, 10), (40, 0)]) == (0, 6, 10, 12, 30, 1)
    assert fmt.merge_ranges([]) == ()


def test_service_files_name_the_profile(tmp_path: Path) -> None:
    """A systemd mount file's ``profile`` and ``prefetch`` keys become the mount's options."""
    from cnpsfs.errors import UsageError
    from cnpsfs.fs.unit import parse_config

    source = tmp_path / "web.toml"
    options = parse_config('image = "x@1"\nprofile = "web"\n', "web", source).mount_options()
    assert (options.prefetch, options.profile) == (True, "web")
    options = parse_config('image = "x@1"\nprefetch = false\n', "web", source).mount_options()
    assert (options.prefetch, options.profile) == (False, None)
    assert parse_config('image = "x@1"\n', "web", source).mount_options().prefetch is True
    for text, message in (('image = "x@1"\nprofile = "a/b"\n', "invalid profile name"),
                          ('image = "x@1"\nprefetch = "no"\n', "prefetch must be true or false"),
                          ('image = "x@1"\nprofile = "web"\nprefetch = false\n', "exclude each other")):
        with pytest.raises(UsageError, match=message):
            parse_config(text, "web", source)
