"""Trust: keys, signatures, the policy where images start being served, rollback
protection, Debian archive provenance and SBOMs (docs/trust.md).

Refusals at ``mount``, ``bundle`` and ``service run`` happen before anything is mounted,
so those tests run the real CLI without FUSE; everything that serves an image (accepted
mounts, live upgrades, SIGHUP reloads) runs on real FUSE mounts. Provenance uses a real
image built from the host's apt sources (hello and its libraries, no maintainer scripts).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cnpsfs_testlib import Cli, digest_of
from hypothesis import given, settings
from hypothesis import strategies as st
from mountutil import IN_CI, is_mounted, mount_image, needs_root, write_manifest

from cnpsfs import format as fmt
from cnpsfs.debian.provenance import DERIVATIONS
from cnpsfs.errors import FormatError
from cnpsfs.store import LocalStore
from cnpsfs.trust import Checker, PolicyError, TrustError, check_image, policy_path
from cnpsfs.trust.keys import SigningKey, format_key_id, load_signing_key, parse_public_line
from cnpsfs.trust.policy import parse_policy
from cnpsfs.trust.provenance import DebianProvenance, provenance_records
from cnpsfs.trust.signature import Payload, Signature, make_payload, sign_payload, store_signature

GOLDEN = json.loads((Path(__file__).parent / "golden" / "trust.json").read_text())
SBOM_SCHEMAS = Path(__file__).parent / "data" / "sbom"
BUILD_CACHE = Path(os.environ.get("CNPSFS_BUILD_CACHE", "/var/cache/cnpsfs"))


# --------------------------------------------------------------------------- helpers


def write_tree(path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def write_policy(path: Path, rules: list[dict[str, Any]], *, default: str = "reject",
                 revoked: list[Path] | None = None) -> Path:
    lines = [f"default = {json.dumps(default)}"]
    if revoked:
        lines.append(f"revoked = {json.dumps([str(p) for p in revoked])}")
    for rule in rules:
        lines.append("[[rule]]")
        for key, value in rule.items():
            if isinstance(value, list):
                value = [str(v) for v in value]
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def one_line_error(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.rc == 1, str(result)
    assert len(lines) == 1, f"expected one line on stderr:\n{result.stderr}"
    assert lines[0].startswith("cnpsfs: error: "), lines
    return lines[0]


@dataclass
class KeyPair:
    key: Path
    pub: Path
    fingerprint: str

    def signing(self) -> SigningKey:
        return load_signing_key(self.key)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    """a: trusted, b: known to nobody, c: trusted but revoked where a test says so."""
    top = tmp_path_factory.mktemp("keys")
    cli = Cli(top / "no-store")
    out = {}
    for name in "abc":
        result = cli.ok("key", "generate", top / name)
        out[name] = KeyPair(top / f"{name}.key", top / f"{name}.pub", result.last_line)
    return out


@dataclass
class Data:
    cli: Cli
    top: Path
    v1: str  # FileSet refs with hello.txt = v1 / v2
    v2: str

    def image(self, name: str, version: str = "1", fileset: str | None = None) -> str:
        """Store and tag an image NAME@VERSION of one FileSet; returns its digest reference."""
        manifest = write_manifest(self.top / f"{name.replace('/', '_')}-{version}.toml", name,
                                  [fileset or self.v1], version=version)
        return digest_of(self.cli.ok("image", "create", manifest))

    def store(self) -> LocalStore:
        return LocalStore(self.cli.store_path)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    top = tmp_path_factory.mktemp("trust")
    cli = Cli(top / "store")
    refs = []
    for version in ("1", "2"):
        src = write_tree(top / f"src{version}", {"hello.txt": f"v{version}\n", "etc/os-release": "ID=test\n"})
        digest_of(cli.ok("import", "dir", src, "--name", "example.org/files", "--version", version))
        refs.append(f"example.org/files@{version}")
    return Data(cli, top, refs[0], refs[1])


def sign(data: Data, ref: str, key: KeyPair, *args: str) -> str:
    return digest_of(data.cli.ok("sign", ref, "--key", key.key, *args))


def signed_policy(data: Data, keys: dict[str, KeyPair], name: str, **extra: Any) -> Path:
    return write_policy(data.top / f"policy-{name}.toml",
                        [{"names": "example.org/*", "require": "signed", "keys": [keys["a"].pub], **extra}])


# --------------------------------------------------------------------------- format: golden vectors and properties


def golden_key() -> SigningKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(GOLDEN["private_seed"]))
    public = parse_public_line(GOLDEN["public_key"], "golden")
    return SigningKey(private, public, "golden")


def test_golden_signature_vector() -> None:
    """docs/trust.md's encoding, pinned: same payload, same key -> the same bytes and digest."""
    key = golden_key()
    assert format_key_id(key.public.key_id) == GOLDEN["key_id"]
    g = GOLDEN["payload"]
    payload = Payload(fmt.parse_digest(g["subject"]), g["kind"], g["name"], g["version"], g["revision"],
                      g["timestamp"], key.public.key_id, g["expires"])
    assert payload.encode().hex() == GOLDEN["payload_hex"]
    signature = sign_payload(key, payload)
    assert signature.signature.hex() == GOLDEN["signature_hex"]
    assert signature.encode().hex() == GOLDEN["object_hex"]
    assert fmt.format_digest(fmt.digest_bytes(signature.encode())) == GOLDEN["object_digest"]
    decoded = Signature.decode(bytes.fromhex(GOLDEN["object_hex"]))
    assert decoded.payload() == payload
    assert key.public.verify(decoded.signature, decoded.payload_bytes)
    # The payload's first bytes as docs/trust.md spells them: map(9), 0: the type name.
    assert GOLDEN["payload_hex"].startswith("aa00" + "78" + "18" + b"cnpsfs/signature-payload".hex())


def test_golden_provenance_vector() -> None:
    g = GOLDEN["provenance"]
    record = DebianProvenance(fmt.parse_digest(g["subject"]), g["package"], g["version"], g["architecture"],
                              bytes.fromhex(g["deb_sha256"]), g["deb_size"], g["archive"], fmt.parse_digest(g["index"]),
                              g["release"], g["packages"], g["offset"], g["filename"])
    assert record.encode().hex() == GOLDEN["provenance_hex"]
    assert fmt.format_digest(fmt.digest_bytes(record.encode())) == GOLDEN["provenance_digest"]
    assert DebianProvenance.decode(record.encode()) == record
    # gc walks from a provenance record to its index FileSet, and to nothing else.
    assert fmt.referenced_digests(record.encode()) == [(record.index, False)]


names = st.from_regex(r"[a-z0-9]{1,10}\.[a-z]{2,5}(/[A-Za-z0-9._+-]{1,12}){1,3}", fullmatch=True)
versions = st.from_regex(r"[A-Za-z0-9._+~:-]{1,20}", fullmatch=True)
u63 = st.integers(0, (1 << 63) - 1)
payloads = st.builds(Payload, st.binary(min_size=32, max_size=32), st.sampled_from(["image", "fileset"]),
                     names | st.text(min_size=1, max_size=30), versions, st.integers(1, (1 << 63) - 1), u63,
                     st.binary(min_size=32, max_size=32), st.none() | u63)


@given(payloads)
@settings(max_examples=300, deadline=None)
def test_payload_round_trip_and_canonical(payload: Payload) -> None:
    data = payload.encode()
    assert payload.encode() == data  # deterministic
    assert Payload.decode(data) == payload  # round trip
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data  # already in canonical form
    if payload.expires is None:
        assert 8 not in cbor2.loads(data)  # defaults are omitted, never written


@given(payloads)
@settings(max_examples=100, deadline=None)
def test_payload_other_encodings_refused(payload: Payload) -> None:
    """The same logical payload in a non-canonical encoding must not verify as that payload."""
    obj = cbor2.loads(payload.encode())
    reordered = cbor2.dumps(dict(sorted(obj.items(), reverse=True)))  # map keys out of order
    with pytest.raises(FormatError, match="canonical"):
        Payload.decode(reordered)
    wide = bytes([0xA0 + len(obj)]) + b"".join(cbor2.dumps(k) + _wide(v) for k, v in sorted(obj.items()))
    assert wide != payload.encode()  # key 1 (the format version, 1) at least has a wider head now
    with pytest.raises(FormatError, match="canonical"):
        Payload.decode(wide)


def _wide(value: Any) -> bytes:
    """An integer in an 8-byte head (valid CBOR, not the shortest form)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return b"\x1b" + value.to_bytes(8, "big")
    return cbor2.dumps(value, canonical=True)


@pytest.mark.parametrize("change, message", [
    (lambda o: o.update({10: 1}), "unknown key"),
    (lambda o: o.update({6: 0}), "revisions start at 1"),
    (lambda o: o.update({2: b"short"}), "32-byte digest"),
    (lambda o: o.update({3: "tarball"}), "subject kind"),
    (lambda o: o.update({4: ""}), "name must be non-empty"),
    (lambda o: o.pop(9), "lacks key 9"),
    (lambda o: o.update({0: "cnpsfs/image"}), "expected a cnpsfs/signature-payload"),
])
def test_payload_malformed(change: Any, message: str) -> None:
    obj = cbor2.loads(bytes.fromhex(GOLDEN["payload_hex"]))
    change(obj)
    with pytest.raises(FormatError, match=message):
        Payload.decode(cbor2.dumps(obj, canonical=True))


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=400), st.integers(0, 95), st.booleans())
@settings(max_examples=200, deadline=None)
def test_verify_backends_agree(seed: bytes, message: bytes, where: int, tamper: bool) -> None:
    """libsodium (the mount path) and cryptography (the fallback) accept and refuse the same."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cnpsfs.trust.keys import PublicKey, _libsodium, _verify_cryptography

    if _libsodium() is None:
        why = "libsodium is not installed (libsodium23, in scripts/install): mounts verify with cryptography"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    private = Ed25519PrivateKey.from_private_bytes(seed)
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    signature = bytearray(private.sign(message))
    data = bytearray(message)
    if tamper:  # one flipped bit, in the signature (first 64 positions) or the message
        if where < 64:
            signature[where] ^= 0x01
        elif data:
            data[where % len(data)] ^= 0x01
        else:
            signature[0] ^= 0x01
    key = PublicKey(raw)
    assert key.verify(bytes(signature), bytes(data)) == _verify_cryptography(raw, bytes(signature), bytes(data)) \
        == (not tamper)


# --------------------------------------------------------------------------- keys


def test_key_generate_openssh_formats(keys: dict[str, KeyPair], tmp_path: Path) -> None:
    pair = keys["a"]
    assert pair.key.stat().st_mode & 0o777 == 0o600
    line = pair.pub.read_text()
    assert re.fullmatch(r"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5[A-Za-z0-9+/=]+ a\n", line), line
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", pair.fingerprint)
    if shutil.which("ssh-keygen") is None:
        why = "ssh-keygen is not installed (openssh-client, in scripts/install): cannot cross-check the formats"
        if IN_CI:
            pytest.fail(why)
        pytest.skip(why)
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(pair.pub)], capture_output=True, text=True, check=True)
    assert listed.stdout.split()[1] == pair.fingerprint  # our key id is OpenSSH's fingerprint
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(pair.key)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[:2] == line.split()[:2]  # ssh-keygen reads our private key
    again = Cli(tmp_path / "s")("key", "generate", pair.key.with_suffix(""))
    assert again.rc == 2 and f"{pair.key} already exists" in again.stderr
    loose = tmp_path / "loose.key"
    shutil.copy(pair.key, loose)
    loose.chmod(0o644)
    with pytest.raises(Exception, match="accessible by other users"):
        load_signing_key(loose)


# --------------------------------------------------------------------------- the policy


def test_policy_most_specific_rule_wins(keys: dict[str, KeyPair], tmp_path: Path) -> None:
    text = f"""
default = "accept"
[[rule]]
names = "example.org/*"
require = "signed"
keys = ["{keys['a'].pub}"]
[[rule]]
names = ["example.org/app/*", "*.example.org/*"]
require = "reject"
[[rule]]
names = "example.org/app"
require = "accept"
[[rule]]
names = "eu.example.org/*"
require = "debian-provenance"
[[rule]]
names = "*"
require = "reject"
"""
    policy = parse_policy(text, str(tmp_path / "p.toml"))
    expect = {"example.org/app": 3, "example.org/app/configure": 2, "example.org/web": 1, "example.org/a/b/c": 1,
              "x.example.org/y": 2, "eu.example.org/y": 4, "a.eu.example.org/y": 2, "example.com/x": 5,
              "org.example/app": 5}
    for name, number in expect.items():
        rule = policy.rule_for(name)
        assert rule is not None and rule.number == number, (name, rule)
    assert parse_policy('default = "accept"\n', "p").rule_for("example.org/x") is None


@pytest.mark.parametrize("text, message", [
    ('default = "maybe"\n', "default must be"),
    ('defualt = "reject"\n', "unknown key 'defualt'"),
    ('[[rule]]\nnames = "example.org/*"\nrequire = "signed"\nkey = []\n', "unknown key 'key'"),
    ('[[rule]]\nnames = "example.org/*"\nrequire = "signed"\n', "needs keys"),
    ('[[rule]]\nnames = "example.org/*"\nrequire = "signed"\nkeys = ["missing.pub"]\n',
     "cannot read key file .*missing.pub"),
    ('[[rule]]\nnames = "example.org/*"\nrequire = "accept"\nkeys = ["a.pub"]\n', "keys mean something only"),
    ('[[rule]]\nnames = "example.org/a*"\nrequire = "accept"\n', "bad pattern 'example.org/a\\*'"),
    ('[[rule]]\nnames = "Example.org/*"\nrequire = "accept"\n', "bad pattern"),
    ('[[rule]]\nnames = "example.org"\nrequire = "accept"\n', "did you mean 'example.org/\\*'"),
    ('[[rule]]\nnames = "example.org/*"\nrequire = "sometimes"\n', "require must be one of"),
    ('[[rule]]\nnames = "a.org/*"\nrequire = "accept"\n[[rule]]\nnames = "a.org/*"\nrequire = "reject"\n',
     "already rule 1's"),
    ('[[rule]]\nnames = "a.org/*"\nrequire = "signed"\nkeys = ["bad.pub"]\n', "bad.pub:1: key type 'ssh-rsa'"),
    ('revoked = ["empty.pub"]\n', "holds no public key"),
    ('[[rule]]\nnames = "a.org/*"\nrequire = "debian-provenance"\nkeyrings = ["nowhere.gpg"]\n',
     "cannot read keyring .*nowhere.gpg"),
])
def test_policy_errors_name_the_culprit(text: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "bad.pub").write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ== someone\n")
    (tmp_path / "empty.pub").write_text("# nothing here\n")
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message) as info:
        Checker(path).load()
    assert str(path) in str(info.value)


def test_policy_path_resolution(tmp_path: Path) -> None:
    default = tmp_path / "etc-policy.toml"
    assert policy_path(None, {}, default) is None  # no policy: today's behaviour
    default.write_text('default = "accept"\n')
    assert policy_path(None, {}, default) == default
    other = tmp_path / "other.toml"
    other.write_text('default = "reject"\n')
    assert policy_path(None, {"CNPSFS_POLICY": str(other)}, default) == other
    assert policy_path(str(default), {"CNPSFS_POLICY": str(other)}, default) == default  # --policy first
    with pytest.raises(PolicyError, match="does not exist"):
        policy_path(str(tmp_path / "typo.toml"), {}, default)
    with pytest.raises(PolicyError, match=r"\$CNPSFS_POLICY"):
        policy_path(None, {"CNPSFS_POLICY": str(tmp_path / "typo.toml")}, default)


def test_cli_policy_file_errors(data: Data, tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text('[[rule]]\nnames = "example.org/*"\nrequire = "signed"\nkeys = ["gone.pub"]\n')
    line = one_line_error_rc(data.cli("--policy", bad, "mount", data.v1, tmp_path), 2)
    assert "gone.pub" in line and str(bad) in line
    line = one_line_error_rc(data.cli("--policy", tmp_path / "nope.toml", "mount", data.v1, tmp_path), 2)
    assert "nope.toml does not exist" in line


def one_line_error_rc(result: Any, rc: int) -> str:
    assert result.rc == rc, str(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# --------------------------------------------------------------------------- refusals, each with its own reason


def _tampered(signature: Signature, *, sig_byte: bool = False, payload_byte: bool = False) -> Signature:
    if sig_byte:
        flipped = bytearray(signature.signature)
        flipped[10] ^= 0x01
        return Signature(signature.payload_bytes, bytes(flipped))
    assert payload_byte
    data = bytearray(signature.payload_bytes)
    at = data.index(b"example.org/") + 3  # inside the name: the payload still decodes, canonically
    data[at] ^= 0x01
    return Signature(bytes(data), signature.signature)


def _case_image(data: Data, case: str) -> tuple[str, str]:
    name = f"example.org/case-{case}"
    return name, data.image(name)


def _craft(data: Data, key: KeyPair, digest_ref: str, name: str, **kw: Any) -> Signature:
    subject = fmt.parse_digest(digest_ref)
    return sign_payload(key.signing(), make_payload(key.signing(), subject, "image", name, "1", kw.pop("revision", 1),
                                                    **kw))


def test_refusal_reasons(data: Data, keys: dict[str, KeyPair], tmp_path: Path) -> None:
    """unsigned, unknown key, bad signature (signature or payload byte flipped), another
    digest, expired, revoked (globally and per rule): each its own message, exit 1, one
    line naming the image and the rule, and nothing mounted."""
    a, b, c = keys["a"], keys["b"], keys["c"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = data.store()
    cases: dict[str, tuple[str, str]] = {}
    try:
        name, ref = _case_image(data, "unsigned")
        cases["unsigned"] = (ref, r": unsigned$")
        name, ref = _case_image(data, "unknown")
        sign(data, ref, b)
        cases["unknown"] = (ref, rf": unknown key {re.escape(b.fingerprint)} \(not among the rule's keys\)$")
        name, ref = _case_image(data, "flipsig")
        store_signature(store, _tampered(_craft(data, a, ref, name), sig_byte=True))
        cases["flipsig"] = (ref, rf": bad signature by {re.escape(a.fingerprint)}: the Ed25519 signature does not")
        name, ref = _case_image(data, "flippayload")
        store_signature(store, _tampered(_craft(data, a, ref, name), payload_byte=True))
        cases["flippayload"] = (ref, rf": bad signature by {re.escape(a.fingerprint)}: the Ed25519 signature does not")
        name, ref = _case_image(data, "other")
        other_name, other_ref = _case_image(data, "other-signed")
        sig = _craft(data, a, other_ref, other_name)
        with store.writer() as writer:  # the signature of one image filed under another
            writer.commit(attach=[(fmt.parse_digest(ref), writer.add_object(sig.encode()))])
        cases["other"] = (ref, rf": signature by {re.escape(a.fingerprint)} is for another image "
                               rf"\({re.escape(other_ref[:23])}\)$")
        name, ref = _case_image(data, "expired")
        store_signature(store, _craft(data, a, ref, name, now=int(time.time()) - 7200, expires_in=3600))
        cases["expired"] = (ref, rf": signature by {re.escape(a.fingerprint)} expired on \d{{4}}-\d\d-\d\d ")
        name, ref = _case_image(data, "revoked")
        sign(data, ref, c)
        cases["revoked"] = (ref, rf": revoked key {re.escape(c.fingerprint)}$")
    finally:
        store.close()
    policy = write_policy(tmp_path / "policy.toml",
                          [{"names": "example.org/*", "require": "signed", "keys": [a.pub, c.pub]}], revoked=[c.pub])
    reasons = {}
    for case, (ref, reason) in cases.items():
        line = one_line_error(data.cli("--policy", policy, "mount", ref, mnt))
        assert re.search(reason, line), (case, line)
        prefix = (f"example.org/case-{case}@1 ({ref[:23]}) refused by policy rule 1 \"example.org/*\" "
                  "(require = signed): ")
        assert prefix in line, line
        assert not is_mounted(mnt)
        reasons[case] = line.split(prefix)[1]
    # each its own message; flipping a byte of the signature or of the payload both make a bad signature
    assert reasons["flipsig"] == reasons["flippayload"]
    del reasons["flippayload"]
    assert len(set(reasons.values())) == len(reasons), reasons
    # revoked in the rule only, not globally: the same refusal
    per_rule = write_policy(tmp_path / "policy2.toml", [{"names": "example.org/*", "require": "signed",
                                                          "keys": [a.pub, c.pub], "revoked": [c.pub]}])
    line = one_line_error(data.cli("--policy", per_rule, "mount", cases["revoked"][0], mnt))
    assert line.endswith(f": revoked key {c.fingerprint}")
    # the default
    nobody = write_policy(tmp_path / "policy3.toml", [{"names": "example.net/*", "require": "accept"}])
    line = one_line_error(data.cli("--policy", nobody, "mount", data.v1, mnt))
    assert line.endswith("refused by policy default (require = reject): rejected"), line


def test_older_revision_refused_unless_allowed(data: Data, keys: dict[str, KeyPair], tmp_path: Path) -> None:
    a = keys["a"]
    policy = signed_policy(data, keys, "rev")
    new = data.image("example.org/rev", "2")
    old = data.image("example.org/rev", "1")
    sign(data, new, a, "--revision", "5")
    sign(data, old, a, "--revision", "3")
    store = data.store()
    try:
        checker = Checker(policy)
        accepted = checker.check(store, store.get_image(fmt.parse_digest(new)), fmt.parse_digest(new))
        assert accepted.verified and accepted.revision == 5
        assert store.accepted_revision("example.org/rev") == (5, fmt.parse_digest(new))
        line = one_line_error(data.cli("--policy", policy, "mount", old, tmp_path))
        assert line.endswith("older revision 3 (revision 5 of example.org/rev was accepted before; "
                             "--allow-downgrade to go back)"), line
        allowed = checker.check(store, store.get_image(fmt.parse_digest(old)), fmt.parse_digest(old),
                                allow_downgrade=True)
        assert allowed.accepted and allowed.revision == 3
        assert store.accepted_revision("example.org/rev")[0] == 5  # never goes down
        # the default revision for a new signature: the highest known, plus one
        result = data.cli.ok("sign", old, "--key", a.key, "--json")
        assert json.loads(result.stdout)["revision"] == 6
        assert check_image(store, policy, fmt.parse_digest(old)).revision == 6  # pull's hook
        with pytest.raises(TrustError, match=r"is named example\.org/rev, not example\.org/evil"):
            check_image(store, policy, fmt.parse_digest(old), "example.org/evil")
    finally:
        store.close()


def test_bundle_and_service_run_refuse(data: Data, keys: dict[str, KeyPair], tmp_path: Path) -> None:
    policy = signed_policy(data, keys, "bundle")
    ref = data.image("example.org/bundled")
    line = one_line_error(data.cli("--policy", policy, "bundle", ref, tmp_path / "b"))
    assert line.endswith(": unsigned")
    assert not (tmp_path / "b" / "rootfs").exists() and not (tmp_path / "b" / "config.json").exists()
    confdir = tmp_path / "mounts"
    confdir.mkdir()
    (confdir / "web.toml").write_text(f'image = "{ref}"\nmountpoint = "{tmp_path}/machines/%i"\n'
                                      f'store = "{data.cli.store_path}"\n')
    result = data.cli("--policy", policy, "service", "--config-dir", confdir, "run", "web")
    assert result.rc == 1, str(result)
    line = result.stderr.strip().splitlines()[-1]  # service run logs what it mounts first (INFO)
    assert line.startswith("cnpsfs: error: example.org/bundled@1") and line.endswith(": unsigned"), line
    assert not is_mounted(tmp_path / "machines" / "web")


# --------------------------------------------------------------------------- accepted mounts


@pytest.mark.fuse
def test_signed_mount_status_and_inspect(data: Data, keys: dict[str, KeyPair], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ref = data.image("example.org/signed")
    sig = sign(data, ref, keys["a"])
    inspected = json.loads(data.cli.ok("inspect", ref, "--json").stdout)
    assert [s["digest"] for s in inspected["signatures"]] == [sig]
    assert inspected["signatures"][0]["key"] == keys["a"].fingerprint
    assert inspected["signatures"][0]["revision"] == 1
    monkeypatch.setenv("CNPSFS_POLICY", str(signed_policy(data, keys, "signed")))
    with mount_image(data.cli.store_path, ref, tmp_path / "mnt") as m:
        assert (m / "hello.txt").read_text() == "v1\n"
        trust = m.status()["trust"]
        assert trust["accepted"] and trust["verified"] and trust["key"] == keys["a"].fingerprint
        assert trust["revision"] == 1 and trust["rule"] == 'rule 1 "example.org/*"'
        text = m.cnpsfs("status", m.mountpoint).stdout
        assert f"trust       signed by {keys['a'].fingerprint}, revision 1" in text


@pytest.mark.fuse
def test_no_policy_status_unverified(data: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CNPSFS_POLICY", raising=False)
    if Path("/etc/cnpsfs/policy.toml").exists():
        pytest.skip("this host has /etc/cnpsfs/policy.toml: cannot test the no-policy default here")
    with mount_image(data.cli.store_path, data.v1, tmp_path / "mnt") as m:
        assert m.status()["trust"]["verified"] is False
        assert "trust       unverified (no trust policy)" in m.cnpsfs("status", m.mountpoint).stdout


@pytest.mark.fuse
def test_sighup_reload_refused_then_accepted(data: Data, keys: dict[str, KeyPair], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The systemd reload path (SIGHUP re-reads the manifest) refuses an unsigned image and
    keeps serving; once that composition is signed, the same reload goes through."""
    manifest = write_manifest(tmp_path / "app.toml", "example.org/reload", [data.v1])
    sign(data, digest_of(data.cli.ok("image", "create", manifest)), keys["a"])
    monkeypatch.setenv("CNPSFS_POLICY", str(signed_policy(data, keys, "reload")))
    allow = [r"SIGHUP: reload failed, generation unchanged: example\.org/reload@1 .* refused by policy .*: unsigned"]
    with mount_image(data.cli.store_path, manifest, tmp_path / "mnt", allow_log=allow) as m:
        assert m.status()["trust"]["verified"]
        write_manifest(manifest, "example.org/reload", [data.v2])
        os.kill(m.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "SIGHUP: reload failed" not in m.log():
            assert time.monotonic() < deadline, m.log()
            time.sleep(0.05)
        assert re.search(allow[0], m.log()), m.log()
        assert m.status()["generation"] == 1 and (m / "hello.txt").read_text() == "v1\n"
        sign(data, digest_of(data.cli.ok("image", "create", manifest)), keys["a"], "--revision", "2")
        os.kill(m.pid, signal.SIGHUP)
        while m.status()["generation"] != 2:
            assert time.monotonic() < deadline + 30, m.log()
            time.sleep(0.05)
        assert (m / "hello.txt").read_text() == "v2\n"
        assert m.status()["trust"]["revision"] == 2


# --------------------------------------------------------------------------- gc


def test_gc_keeps_signatures_of_live_images_only(data: Data, keys: dict[str, KeyPair]) -> None:
    kept_ref = data.image("example.org/gc-kept")
    kept = sign(data, kept_ref, keys["a"])
    gone_ref = data.image("example.org/gc-gone")
    gone = sign(data, gone_ref, keys["a"])
    data.cli.ok("tag", "rm", "example.org/gc-gone@1")
    data.cli.ok("gc")
    store = data.store()
    try:
        assert store.contains(fmt.parse_digest(kept))
        assert not store.contains(fmt.parse_digest(gone)) and not store.contains(fmt.parse_digest(gone_ref))
        subjects = {s for s, _d in store.attachments()}
        assert fmt.parse_digest(kept_ref) in subjects and fmt.parse_digest(gone_ref) not in subjects
    finally:
        store.close()
    assert data.cli("verify").rc == 0


# --------------------------------------------------------------------------- a real built image


@dataclass
class Built:
    cli: Cli
    ref: str  # the image digest
    image: fmt.Image
    top: Path


HELLO_RECIPE = """
name = "example.org/hello"
version = "1"
[debian]
essential = false
packages = ["hello"]
[config]
cmd = ["/usr/bin/hello"]
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """hello, libc6, libgcc-s1, gcc-12-base from the host's apt sources: dpkg is not among
    them, so no maintainer script runs and no root is needed to build it."""
    top = tmp_path_factory.mktemp("built")
    (top / "hello.toml").write_text(HELLO_RECIPE)
    cli = Cli(top / "store")
    result = cli.ok("build", top / "hello.toml", timeout=900)
    ref = digest_of(result)
    assert "recorded the archive provenance of 4 packages" in result.stderr, result.stderr
    store = LocalStore(top / "store")
    image = store.get_image(fmt.parse_digest(ref))
    store.close()
    yield Built(cli, ref, image, top)


def _copy_store(built: Built, dest: Path) -> Cli:
    shutil.copytree(built.cli.store_path, dest, symlinks=True)
    return Cli(dest)


def test_verify_provenance_passes(built: Built) -> None:
    result = built.cli.ok("verify", "--provenance", built.ref)
    rows = result.stdout.splitlines()
    assert len(rows) == 4 and all(r.startswith("ok      ") for r in rows), rows
    assert any(r.startswith("ok      hello 2.") for r in rows)
    assert "4 packages: 4 proven, 0 broken" in result.stderr
    as_json = json.loads(built.cli.ok("verify", "--provenance", built.ref, "--json").stdout)
    assert {p["package"].split()[0] for p in as_json["packages"]} == {"hello", "libc6", "libgcc-s1", "gcc-12-base"}
    assert all(p["signers"] for p in as_json["packages"])  # gpgv named the archive keys


def _hello(store: LocalStore, image: fmt.Image) -> tuple[bytes, bytes, DebianProvenance]:
    """hello's imported FileSet digest, its record's object digest, and the record."""
    for pkg in image.metadata["debian"]["packages"]:
        if pkg["package"] == "hello":
            digest = fmt.parse_digest(pkg["fileset"])
            [(obj, record)] = provenance_records(store, digest)
            assert isinstance(record, DebianProvenance)
            return digest, obj, record
    raise AssertionError("no hello in the image")


def _replace_record(store: LocalStore, subject: bytes, old: bytes, record: DebianProvenance) -> None:
    with store.writer() as writer:
        writer.commit(attach=[(subject, writer.add_object(record.encode()))])
    assert store.detach(subject, old)


def test_tampered_packages_hash_names_the_package(built: Built, tmp_path: Path) -> None:
    import dataclasses

    cli = _copy_store(built, tmp_path / "store")
    store = LocalStore(cli.store_path)
    try:
        subject, obj, record = _hello(store, built.image)
        flipped = bytearray(record.deb_sha256)
        flipped[0] ^= 0xFF
        _replace_record(store, subject, obj, dataclasses.replace(record, deb_sha256=bytes(flipped)))
    finally:
        store.close()
    result = cli("verify", "--provenance", built.ref)
    assert result.rc == 1, str(result)
    broken = [r for r in result.stdout.splitlines() if r.startswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith("BROKEN  hello 2."), result.stdout
    assert record.deb_sha256.hex() in broken[0] and bytes(flipped).hex() in broken[0]


def test_tampered_packages_index_names_the_package(built: Built, tmp_path: Path) -> None:
    """An index whose hello entry lists another SHA-256 (and a record to match) no longer
    hashes to what the signed InRelease says."""
    import dataclasses

    from cnpsfs.ingest.directory import import_directory
    from cnpsfs.ingest.tree import ImportOptions
    from cnpsfs.trust.provenance import read_file

    cli = _copy_store(built, tmp_path / "store")
    store = LocalStore(cli.store_path)
    try:
        subject, obj, record = _hello(store, built.image)
        index = store.get_fileset(record.index)
        tree = tmp_path / "index"
        for path in (record.release, record.packages_path):
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            (tree / path).write_bytes(read_file(store, index.root, path))
        packages = (tree / record.packages_path).read_bytes()
        old_line = f"SHA256: {record.deb_sha256.hex()}".encode()
        evil = "0" * 64
        assert packages.count(old_line) == 1
        (tree / record.packages_path).write_bytes(packages.replace(old_line, f"SHA256: {evil}".encode()))
        forged = import_directory(store, str(tree), ImportOptions(name="cnpsfs.org/apt-index", version="")).digest
        _replace_record(store, subject, obj, dataclasses.replace(record, index=forged))
    finally:
        store.close()
    result = cli("verify", "--provenance", built.ref)
    assert result.rc == 1
    broken = [r for r in result.stdout.splitlines() if r.startswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith("BROKEN  hello 2."), result.stdout
    assert "is not the one the signed dists/" in broken[0], broken[0]


def test_tampered_cached_deb_named_by_refetch(built: Built, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    hello = None
    for pkg in built.image.metadata["debian"]["packages"]:
        src = BUILD_CACHE / "debs" / f"{pkg['sha256']}.deb"
        shutil.copy(src, cache / "debs" / src.name)
        if pkg["package"] == "hello":
            hello = cache / "debs" / src.name
    assert hello is not None
    good = built.cli("verify", "--provenance", "--refetch", "--cache", cache, built.ref)
    assert good.rc == 0, str(good)
    assert good.stdout.count("(re-imported: ") == 4
    with open(hello, "r+b") as f:
        f.seek(4000)
        byte = f.read(1)
        f.seek(4000)
        f.write(bytes([byte[0] ^ 0x01]))
    bad = built.cli("verify", "--provenance", "--refetch", "--cache", cache, built.ref)
    assert bad.rc == 1
    broken = [r for r in bad.stdout.splitlines() if r.startswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith("BROKEN  hello 2.") and "has SHA-256" in broken[0], bad.stdout


def _provenance_policy(path: Path, keys: dict[str, KeyPair]) -> Path:
    return write_policy(path, [
        {"names": "debian.org/*", "require": "debian-provenance"},
        {"names": "example.org/*", "require": "debian-provenance"},
        {"names": "example.org/hello/*", "require": "signed", "keys": [keys["a"].pub]},
        {"names": "cnpsfs.org/*", "require": "accept"},
    ])


def test_policy_debian_provenance(built: Built, keys: dict[str, KeyPair], tmp_path: Path) -> None:
    """Package layers by their archive chain, the build's own layers by signature."""
    cli = _copy_store(built, tmp_path / "store")
    policy = _provenance_policy(tmp_path / "policy.toml", keys)
    line = one_line_error(cli("--policy", policy, "mount", built.ref, tmp_path))
    assert ("refused by policy rule 2 \"example.org/*\" (require = debian-provenance): layer "
            "example.org/hello/dpkg-database@1") in line and line.endswith(": unsigned"), line
    cli.ok("sign", "example.org/hello/dpkg-database@1", "--key", keys["a"].key)
    store = LocalStore(cli.store_path)
    try:
        decision = Checker(policy, DERIVATIONS).check(store, built.image, fmt.parse_digest(built.ref))
        assert decision.accepted and decision.verified, decision
        # the rule's own keyrings replace apt's: a keyring without the archive's keys proves nothing
        (tmp_path / "empty.gpg").write_bytes(b"")
        strict = tmp_path / "strict.toml"
        strict.write_text(policy.read_text().replace('require = "debian-provenance"\n',
                                                     'require = "debian-provenance"\nkeyrings = ["empty.gpg"]\n', 1))
        with pytest.raises(TrustError, match=r"layer debian.org/gcc-12-base@.*InRelease is not trusted: signed by "
                                             r"unknown key"):
            Checker(strict, DERIVATIONS).check(store, built.image, fmt.parse_digest(built.ref))
        subject, obj, record = _hello(store, built.image)
        import dataclasses

        _replace_record(store, subject, obj, dataclasses.replace(record, offset=record.offset + 1))
        with pytest.raises(TrustError, match=r"layer debian.org/hello@.* no valid Debian archive provenance: .*"
                                             r"offset \d+ is not the start of a stanza"):
            Checker(policy, DERIVATIONS).check(store, built.image, fmt.parse_digest(built.ref))
    finally:
        store.close()


@pytest.mark.fuse
@needs_root  # chroot
def test_refused_upgrades_keep_serving(built: Built, keys: dict[str, KeyPair], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A live mount asked to upgrade to images the policy refuses keeps serving: programs
    started in a loop meanwhile all run; then a signed upgrade goes through, and rolling
    back to the older revision needs --allow-downgrade."""
    cli = _copy_store(built, tmp_path / "store")
    a = keys["a"]
    cli.ok("sign", built.ref, "--key", a.key)
    layers = [{"fileset": fmt.format_digest(layer.fileset), "override": layer.override} for layer in built.image.layers]
    v2 = digest_of(cli.ok("image", "create", write_manifest(tmp_path / "v2.toml", "example.org/hello", layers,
                                                            version="2", mode="union")))
    monkeypatch.setenv("CNPSFS_POLICY", str(signed_policy_at(tmp_path / "policy.toml", a)))
    allow = [r"WARNING: trust: example\.org/hello@1 .*: revision 1 is older than 2, allowed by --allow-downgrade"]
    with mount_image(cli.store_path, built.ref, tmp_path / "mnt", allow_log=allow) as m:
        failures: list[str] = []
        runs = 0
        stop = threading.Event()
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"

        def exec_loop() -> None:
            nonlocal runs
            while not stop.is_set():
                proc = subprocess.run([chroot, str(m.mountpoint), "/usr/bin/hello"], capture_output=True, text=True,
                                      timeout=60, env={"PATH": "/usr/bin:/bin", "LANG": "C"})
                runs += 1
                if proc.returncode != 0 or proc.stdout != "Hello, world!\n":
                    failures.append(f"rc {proc.returncode}: {proc.stdout!r} {proc.stderr!r}")

        thread = threading.Thread(target=exec_loop)
        thread.start()
        try:
            for attempt in range(10):
                refused = m.cnpsfs("upgrade", m.mountpoint, v2)
                assert refused.returncode == 1 and refused.stderr.strip().endswith(": unsigned"), refused.stderr
                unlinked = m.cnpsfs("unlink", m.mountpoint, str(1 + attempt % len(layers)))
                assert unlinked.returncode == 1 and "refused by policy" in unlinked.stderr, unlinked.stderr
            deadline = time.monotonic() + 30
            while runs < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join()
        assert not failures, failures[:5]
        assert runs >= 20
        status = m.status()
        assert status["generation"] == 1 and status["trust"]["revision"] == 1
        cli.ok("sign", v2, "--key", a.key)  # revision 2
        assert m.upgrade(v2)["generation"] == 2
        back = m.cnpsfs("rollback", m.mountpoint)
        assert back.returncode == 1 and "older revision 1 (revision 2 of example.org/hello" in back.stderr
        assert m.status()["generation"] == 2
        assert m.cnpsfs("rollback", m.mountpoint, "--allow-downgrade").returncode == 0
        assert m.status()["generation"] == 3 and m.status()["trust"]["revision"] == 1


def signed_policy_at(path: Path, key: KeyPair) -> Path:
    return write_policy(path, [{"names": "example.org/*", "require": "signed", "keys": [key.pub]}])


@pytest.mark.fuse
def test_debian_provenance_mount(built: Built, keys: dict[str, KeyPair], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cli = _copy_store(built, tmp_path / "store")
    cli.ok("sign", "example.org/hello/dpkg-database@1", "--key", keys["a"].key)
    monkeypatch.setenv("CNPSFS_POLICY", str(_provenance_policy(tmp_path / "policy.toml", keys)))
    with mount_image(cli.store_path, built.ref, tmp_path / "mnt") as m:
        trust = m.status()["trust"]
        assert trust["verified"] and trust["require"] == "debian-provenance", trust
        assert (m / "usr/bin/hello").stat().st_size > 0


# --------------------------------------------------------------------------- SBOM


def _validator(name: str) -> Any:
    import jsonschema
    import referencing

    schemas = {p.name: json.loads(p.read_text()) for p in SBOM_SCHEMAS.glob("*.json")}
    registry = referencing.Registry().with_resources(
        (s["$id"], referencing.Resource.from_contents(s)) for s in schemas.values())
    return jsonschema.Draft7Validator(schemas[name], registry=registry, format_checker=jsonschema.FormatChecker())


def test_sbom_valid_against_published_schemas(built: Built) -> None:
    spdx = json.loads(built.cli.ok("sbom", built.ref, "--format", "spdx-json").stdout)
    errors = sorted(_validator("spdx-2.3.schema.json").iter_errors(spdx), key=str)
    assert not errors, errors[:3]
    cdx = json.loads(built.cli.ok("sbom", built.ref, "--format", "cyclonedx-json").stdout)
    errors = sorted(_validator("bom-1.5.schema.json").iter_errors(cdx), key=str)
    assert not errors, errors[:3]
    recorded = {p["package"]: p for p in built.image.metadata["debian"]["packages"]}
    hello = next(p for p in spdx["packages"] if p["name"] == "hello")
    assert hello["checksums"] == [{"algorithm": "SHA256", "checksumValue": recorded["hello"]["sha256"]}]
    assert hello["downloadLocation"].startswith("http") and hello["downloadLocation"].endswith(".deb")
    assert {"referenceCategory": "OTHER", "referenceType": "cnpsfs-fileset",
            "referenceLocator": recorded["hello"]["fileset"]} in hello["externalRefs"]
    assert hello["sourceInfo"].endswith(recorded["hello"]["source"])
    component = next(c for c in cdx["components"] if c["name"] == "hello")
    assert component["purl"].startswith("pkg:deb/debian/hello@")
    assert f"arch={recorded['hello']['arch']}" in component["purl"]
    assert {"name": "cnpsfs:fileset", "value": recorded["hello"]["fileset"]} in component["properties"]
    assert len(cdx["components"]) == len(recorded) == len(spdx["packages"]) - 1
    # a function of the image: the same bytes twice
    assert built.cli.ok("sbom", built.ref, "--format", "cyclonedx-json").stdout == json.dumps(cdx, indent=2) + "\n"



def test_policy_sees_through_nested_images(built: Built, keys: dict[str, KeyPair], tmp_path: Path) -> None:
    """An app image nesting the built image: every FileSet it serves, nested ones too,
    passes its own rule (docs/manifest.md, nested images)."""
    cli = _copy_store(built, tmp_path / "store")
    policy = _provenance_policy(tmp_path / "policy.toml", keys)
    write_tree(tmp_path / "code", {"run": "#!/bin/sh\n"})
    cli.ok("import", "dir", tmp_path / "code", "--name", "cnpsfs.org/app-code", "--version", "1")
    (tmp_path / "app.toml").write_text(f'name = "example.org/app"\nversion = "1"\n[[layers]]\nimage = "{built.ref}"\n'
                                       '[[layers]]\nfileset = "cnpsfs.org/app-code@1"\nat = "/opt/app"\n')
    app = digest_of(cli.ok("image", "create", tmp_path / "app.toml"))
    (tmp_path / "mnt").mkdir()
    line = one_line_error(cli("--policy", policy, "mount", app, tmp_path / "mnt"))
    assert ("refused by policy rule 2 \"example.org/*\" (require = debian-provenance): layer "
            "example.org/hello/dpkg-database@1") in line and line.endswith(": unsigned"), line
    cli.ok("sign", "example.org/hello/dpkg-database@1", "--key", keys["a"].key)
    store = LocalStore(cli.store_path)
    try:
        image = store.get_image(fmt.parse_digest(app))
        decision = Checker(policy, DERIVATIONS).check(store, image, fmt.parse_digest(app))
        assert decision.accepted and decision.verified, decision
        count = len(built.image.layers) + 1
        assert decision.reason.startswith(f"{count} layers each accepted by their own rule"), decision.reason
    finally:
        store.close()
