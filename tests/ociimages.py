"""OCI test images built locally with umoci and skopeo (no internet), cached between runs.

Two multi-layer images, each in an OCI layout with several tags:

- **busybox** (from the Debian ``busybox-static`` binary): layer 1 is a small root
  filesystem with every kind of entry (hard-linked applets, symlinks, a setuid file, a
  sticky directory, a FIFO, a device node, owners, xattrs); layer 2 (``umoci repack``)
  deletes files and replaces directories, so it carries whiteouts; layer 3 is a tar of our
  own added with ``umoci raw add-layer``: an opaque directory, a whiteout of one name of a
  hard-link group, a new hard-link pair, a nanosecond mtime, an xattr. Tag ``base`` is
  layer 1 alone, ``full`` all three, ``other`` layer 1 plus a different second layer
  (for dedup), and the image config sets every run-config field umoci can set.
- **debian** (from the tests' cached debootstrap tree): the tree as layer 1; layer 2
  deletes the documentation, replaces a directory and adds files; layer 3 makes a
  directory opaque.

Everything is made by the real tools; :func:`converted` derives other transports and
compressions from a layout with ``skopeo copy``, and :func:`unpacked` is ``umoci unpack``
of an image, the reference a mount is compared with. Cached under the same directory as
the Debian root filesystem, each build in a temporary directory renamed when complete,
under a lock.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("CNPSFS_TEST_OCI", "/var/cache/cnpsfs-tests/oci"))
#: Bump when a builder changes: old cache entries are then simply not used.
BUILDER_VERSION = "3"
BUSYBOX = "/usr/bin/busybox"
APPLETS_LINKED = ("sh", "ls", "cat", "echo", "true", "id")
APPLETS_SYMLINKED = ("env", "printf", "stat", "sleep", "test")
TOOLS = ("umoci", "skopeo")

#: The run config the busybox image carries (umoci config flags -> expected OCI values).
BUSYBOX_CONFIG = {
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo hello from busybox; id -u"],
    "Env": ["PATH=/usr/bin:/bin", "GREETING=hello world"],
    "WorkingDir": "/tmp",
    "User": "1000:1000",
    "Labels": {"org.example.purpose": "cnpsfs tests"},
    "ExposedPorts": {"8080/tcp": {}},
    "StopSignal": "SIGINT",
    "Volumes": {"/data": {}},
}


def missing_tools() -> str | None:
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install {' '.join(absent)})"
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} missing (apt-get install busybox-static)"
    if os.geteuid() != 0:
        return "building the OCI test images needs root (owners, device nodes)"
    return None


def require_tools() -> None:
    problem = missing_tools()
    if problem is not None:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"OCI tests must not be skipped in CI: {problem}")
        pytest.skip(problem)


def run(*argv: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 600) -> str:
    proc = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(os.fspath, argv))} failed (rc {proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """``CACHE/name-vN``, built once by *build(tmp)* and renamed into place."""
    dest = CACHE / f"{name}-v{BUILDER_VERSION}"
    if dest.exists():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.exists():
            return dest
        tmp = dest.with_name(dest.name + ".tmp")
        if tmp.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(tmp)], check=True)
        tmp.mkdir()
        build(tmp)
        tmp.rename(dest)
    return dest


# --------------------------------------------------------------------------- busybox


def _write(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)


def _busybox_layer1(root: Path) -> None:
    for d in ("bin", "usr/bin", "etc", "root", "tmp", "var/empty", "dev", "opt/old/sub", "srv/data", "home/user"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in APPLETS_LINKED:
        os.link(root / "bin/busybox", root / "bin" / applet)
    for applet in APPLETS_SYMLINKED:
        os.symlink("/bin/busybox", root / "usr/bin" / applet)
    _write(root / "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    _write(root / "etc/group", b"root:x:0:\nuser:x:1000:\n")
    _write(root / "etc/motd", b"this file is deleted by layer 2\n")
    _write(root / "etc/secret", b"0600 file\n", 0o600)
    _write(root / "bin/suid", b"#!/bin/sh\necho setuid\n", 0o4755)
    _write(root / "home/user/notes", b"owned by 1000\n", 0o640, (1000, 1000))
    os.chown(root / "home/user", 1000, 1000)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    _write(root / "opt/old/a", b"a\n")
    _write(root / "opt/old/sub/b", b"b\n")
    _write(root / "srv/data/x", b"a directory replaced by a file in layer 2\n")
    os.mkfifo(root / "var/fifo", 0o644)
    os.mknod(root / "dev/null", 0o666 | 0o020000, os.makedev(1, 3))
    os.setxattr(root / "etc/passwd", "user.origin", b"busybox test image")
    _write(root / "etc/large", bytes(range(256)) * 4096)  # 1 MiB: cut apart from the small files


def _busybox_layer2(root: Path) -> None:
    (root / "etc/motd").unlink()
    shutil.rmtree(root / "opt/old")
    (root / "opt/old").mkdir()
    _write(root / "opt/old/c", b"c replaces a and sub/\n")
    shutil.rmtree(root / "srv/data")
    _write(root / "srv/data", b"now a file\n")
    _write(root / "bin/hello", b"#!/bin/sh\necho hello\n", 0o755)
    os.unlink(root / "usr/bin/sleep")
    os.symlink("../../bin/busybox", root / "usr/bin/sleep")


def _layer3_tar(path: Path) -> None:
    """A layer umoci would not write: opaque directory, PAX nanosecond mtime, hard links."""
    def info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **extra: object) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.mtime = 1_700_000_000
        for key, value in extra.items():
            setattr(ti, key, value)
        return ti

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info("opt/", tarfile.DIRTYPE, 0o755))
        tf.addfile(info("opt/old/", tarfile.DIRTYPE, 0o750))
        tf.addfile(info("opt/old/.wh..wh..opq", mode=0))
        data = b"d, alone in the opaque directory\n"
        tf.addfile(info("opt/old/d", size=len(data)), io.BytesIO(data))
        tf.addfile(info("bin/", tarfile.DIRTYPE, 0o755))
        tf.addfile(info("bin/.wh.cat", mode=0))
        tf.addfile(info("usr/", tarfile.DIRTYPE, 0o755))
        tf.addfile(info("usr/lib/", tarfile.DIRTYPE, 0o755))
        tf.addfile(info("usr/lib/new/", tarfile.DIRTYPE, 0o755))
        data = b"a hard-linked pair, nanosecond mtime and an xattr\n"
        first = info("usr/lib/new/x", size=len(data), uid=1000, gid=100)
        first.pax_headers = {"mtime": "1700000000.123456789", "SCHILY.xattr.user.k": "v"}
        tf.addfile(first, io.BytesIO(data))
        link = info("usr/lib/new/y", tarfile.LNKTYPE, linkname="usr/lib/new/x", uid=1000, gid=100)
        link.pax_headers = {"mtime": "1700000000.123456789", "SCHILY.xattr.user.k": "v"}
        tf.addfile(link)


def _umoci_config(image: str) -> None:
    c = BUSYBOX_CONFIG
    argv: list[str] = ["umoci", "config", "--image", image]
    for item in c["Entrypoint"]:
        argv += ["--config.entrypoint", item]
    for item in c["Cmd"]:
        argv += ["--config.cmd", item]
    for item in c["Env"]:
        argv += ["--config.env", item]
    argv += ["--config.workingdir", str(c["WorkingDir"]), "--config.user", str(c["User"]),
             "--config.stopsignal", str(c["StopSignal"])]
    for key, value in dict(c["Labels"]).items():  # type: ignore[call-overload]
        argv += ["--config.label", f"{key}={value}"]
    for port in c["ExposedPorts"]:
        argv += ["--config.exposedports", port]
    for volume in c["Volumes"]:
        argv += ["--config.volume", volume]
    run(*argv)


def build_busybox(tmp: Path) -> None:
    layout = tmp / "layout"
    bundle = tmp / "bundle"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:full")
    run("umoci", "unpack", "--image", f"{layout}:full", bundle)
    _busybox_layer1(bundle / "rootfs")
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:full", bundle)
    run("umoci", "tag", "--image", f"{layout}:full", "base")
    _busybox_layer2(bundle / "rootfs")
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:full", bundle)
    _layer3_tar(tmp / "layer3.tar")
    run("umoci", "raw", "add-layer", "--image", f"{layout}:full", tmp / "layer3.tar")
    _umoci_config(f"{layout}:full")
    # "other": the same base, a different top layer (for dedup).
    other = tmp / "other"
    run("umoci", "unpack", "--image", f"{layout}:base", other)
    _write(other / "rootfs/opt/other.bin", os.urandom(1 << 20))
    run("umoci", "repack", "--image", f"{layout}:other", other)
    run("umoci", "gc", "--layout", layout)
    shutil.rmtree(bundle)
    shutil.rmtree(other)
    (tmp / "layer3.tar").unlink()


def busybox_layout() -> Path:
    require_tools()
    return cached("busybox", build_busybox) / "layout"


# --------------------------------------------------------------------------- debian


def build_debian(tmp: Path, rootfs: Path) -> None:
    layout = tmp / "layout"
    bundle = tmp / "bundle"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:full")
    run("umoci", "unpack", "--image", f"{layout}:full", bundle)
    run("cp", "-a", f"{rootfs}/.", bundle / "rootfs")
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:full", bundle, timeout=1800)
    run("umoci", "tag", "--image", f"{layout}:full", "base")
    root = bundle / "rootfs"
    shutil.rmtree(root / "usr/share/doc")
    for gz in sorted((root / "usr/share/man").rglob("*.gz"))[:200]:
        gz.unlink()
    shutil.rmtree(root / "etc/apt/apt.conf.d")
    (root / "etc/apt/apt.conf.d").mkdir()
    _write(root / "etc/apt/apt.conf.d/99test", b'APT::Install-Recommends "false";\n')
    _write(root / "opt/app/run", b"#!/bin/sh\necho app\n", 0o755)
    os.link(root / "opt/app/run", root / "opt/app/run-too")
    run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:full", bundle, timeout=1800)
    layer3 = tmp / "layer3.tar"
    with tarfile.open(layer3, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("usr/", "usr/share/", "usr/share/locale/"):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
        ti = tarfile.TarInfo("usr/share/locale/.wh..wh..opq")
        tf.addfile(ti)
        data = b"only file left in /usr/share/locale\n"
        ti = tarfile.TarInfo("usr/share/locale/README")
        ti.size, ti.mtime = len(data), 1_700_000_000
        tf.addfile(ti, io.BytesIO(data))
    run("umoci", "raw", "add-layer", "--image", f"{layout}:full", layer3)
    run("umoci", "config", "--image", f"{layout}:full", "--config.cmd", "/bin/bash", "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    run("umoci", "gc", "--layout", layout)
    shutil.rmtree(bundle)
    layer3.unlink()


def debian_layout(rootfs: Path) -> Path:
    require_tools()
    return cached("debian", lambda tmp: build_debian(tmp, rootfs)) / "layout"


# --------------------------------------------------------------------------- derived forms


def converted(layout: Path, tag: str, kind: str) -> str:
    """The image ``layout:tag`` in another form, as a skopeo reference (cached).

    *kind*: ``docker-archive`` (a docker save archive), ``oci-zstd`` (zstd layers),
    ``oci-plain`` (uncompressed layers).
    """
    base = layout.parent.name.rsplit("-v", 1)[0]
    name = f"{base}-{tag}-{kind}"

    def build(tmp: Path) -> None:
        src = f"oci:{layout}:{tag}"
        if kind == "docker-archive":
            run("skopeo", "copy", "-q", src, f"docker-archive:{tmp / 'image.tar'}:localhost/{base}:{tag}")
        elif kind == "oci-zstd":
            run("skopeo", "copy", "-q", "--dest-compress-format", "zstd", src, f"oci:{tmp / 'layout'}:{tag}")
        elif kind == "oci-plain":
            # skopeo 1.9 always compresses for oci:, so the layers are gunzipped here.
            editor = LayoutEditor(layout, tmp / "layout", tag)
            for desc in editor.manifest["layers"]:
                plain = gzip.decompress(editor.blob(desc["digest"]))
                desc.update(editor.put_blob(plain, "application/vnd.oci.image.layer.v1.tar"))
            editor.save()
        else:
            raise ValueError(kind)

    out = cached(name, build)
    if kind == "docker-archive":
        return f"docker-archive:{out / 'image.tar'}"
    return f"oci:{out / 'layout'}:{tag}"


def unpacked(layout: Path, tag: str) -> Path:
    """``umoci unpack`` of ``layout:tag``: its root filesystem (cached, read-only: do not modify)."""
    def build(tmp: Path) -> None:
        run("umoci", "unpack", "--image", f"{layout}:{tag}", tmp / "bundle", timeout=1800)

    return cached(f"{layout.parent.name.rsplit('-v', 1)[0]}-{tag}-unpacked", build) / "bundle" / "rootfs"


class LayoutEditor:
    """A copy of an OCI layout whose manifest for *tag* a test rewrites (bad input, variants).

    Written by hand on purpose: the images a reader must refuse cannot come from a tool
    that writes only good ones.
    """

    def __init__(self, src: Path, dest: Path, tag: str) -> None:
        shutil.copytree(src, dest, symlinks=True)
        self.root = dest
        self.tag = tag
        self.index = json.loads((dest / "index.json").read_text())
        self.entry = next(m for m in self.index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
        self.manifest = json.loads(self.blob(self.entry["digest"]))
        self.config = json.loads(self.blob(self.manifest["config"]["digest"]))

    def path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def blob(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def put_blob(self, data: bytes, media_type: str) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.path(digest).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def save(self, *, config: bool = False) -> str:
        """Store the (edited) manifest, and config when asked; point the tag at it."""
        if config:
            self.manifest["config"].update(self.put_blob(json.dumps(self.config).encode(),
                                                         self.manifest["config"]["mediaType"]))
        desc = self.put_blob(json.dumps(self.manifest).encode(), self.entry.get(
            "mediaType", "application/vnd.oci.image.manifest.v1+json"))
        self.entry.update(desc)
        (self.root / "index.json").write_text(json.dumps(self.index))
        return f"oci:{self.root}:{self.tag}"


def skopeo_config(reference: str) -> dict[str, object]:
    return json.loads(run("skopeo", "inspect", "--config", reference))


@pytest.fixture(scope="session")
def busybox_image() -> Path:
    """The busybox test image's OCI layout (tags base, full, other)."""
    return busybox_layout()


@pytest.fixture(scope="session")
def debian_image(debian_rootfs: Path) -> Path:
    """The Debian test image's OCI layout (tags base, full)."""
    return debian_layout(debian_rootfs)
