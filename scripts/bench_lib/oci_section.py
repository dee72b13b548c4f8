"""Section ``oci``: pulling images from a registry, cnpsfs against the classic tools (issue 11).

Images built from the bench corpus (once, cached in the corpus cache): ``base`` is v1 as one
layer (umoci); ``app`` is base plus a second layer that turns v1 into v2 (python3 and perl
added; ``rsync --delete`` so deletions become whiteouts); ``rebuilt`` is the same app
rebuilt, as a CI pipeline rebuilds it: base plus app's layer with every member's mtime one
day later, so the files are the same while the layer's tar bytes, digest and diff_id differ
(what a registry holds twice and a content store once). They are pushed once to a
docker-registry (Debian's ``docker-registry``, distribution 2.8) started on 127.0.0.1 with a
temporary config and storage directory, and stopped at the end.

An extra image, ``random`` (base plus 64 MiB of seeded pseudo-random files, the same on every
run: content no compression or deduplication shrinks), is pulled after the three and
reported apart, so the incompressible case stays measured without deciding the targets.

Each repetition pulls the images, in that order, into one empty destination per system,
with caches dropped before each pull:

- ``cnpsfs import oci docker://…``: into one store (layers by diff_id/chain ID, then chunks,
  deduplicated);
- ``skopeo copy docker://… oci:DIR:TAG``: into one OCI layout (blobs shared by digest);
- the same, then ``umoci unpack`` of each image: the classic pull-and-extract;
- ``podman pull``: into a private storage root (``--root``, overlay driver where the kernel
  allows it, else vfs; the table says which).

Reported: wall time per image and in total, and bytes on disk after the three and after the
extra (``du --block-size=1``: the store, the layout, the layout plus the unpacked trees,
podman's storage). Targets (docs/performance.md): cnpsfs within 1.2× of ``skopeo copy``
alone, and the three images stored in less than half of what the OCI layout holds.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import resource
import secrets
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cnpsfs_cli import CnpsfsCli
from .common import BenchError, drop_caches, du_bytes, ensure_packages, median, rmtree, run
from .corpus import Corpus

log = logging.getLogger(__name__)

IMAGES = ("base", "app", "rebuilt")
#: Pulled after IMAGES and reported apart (incompressible content).
EXTRA = "random"
BUILDER_VERSION = "2"
RANDOM_BYTES = 64 << 20
#: How much later the rebuilt app's layer members are dated.
REBUILD_SHIFT = 86400
SYSTEMS = ("cnpsfs", "cnpsfs-zstd3", "skopeo", "skopeo+umoci", "podman")
LABELS = {"cnpsfs": "cnpsfs import oci (one store)",
          "cnpsfs-zstd3": "cnpsfs import oci --compression-level 3 (one store)",
          "skopeo": "skopeo copy (one OCI layout)",
          "skopeo+umoci": "skopeo copy + umoci unpack", "podman": "podman pull"}


@dataclass
class OciRow:
    name: str
    label: str
    skipped: str | None = None
    seconds: dict[str, list[float]] = field(default_factory=lambda: {i: [] for i in IMAGES})
    stored_bytes: list[int] = field(default_factory=list)
    extra_seconds: list[float] = field(default_factory=list)
    #: CPU seconds (user + system, the pull and its children) for the three images, per repetition:
    #: what the machine's load does not change, unlike wall time.
    cpu_seconds: list[float] = field(default_factory=list)
    extra_bytes: list[int] = field(default_factory=list)  # stored after the extra image too
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        out = {f"{image}_seconds": median(v) for image, v in self.seconds.items() if v}
        totals = [sum(parts) for parts in zip(*self.seconds.values(), strict=True)]
        if totals:
            out["total_seconds"] = median(totals)
        if self.stored_bytes:
            out["stored_bytes"] = median(self.stored_bytes)
        if self.extra_seconds:
            out[f"{EXTRA}_seconds"] = median(self.extra_seconds)
        if self.cpu_seconds:
            out["cpu_seconds"] = median(self.cpu_seconds)
        if self.extra_bytes:
            out["stored_bytes_with_extra"] = median(self.extra_bytes)
        return out


# --------------------------------------------------------------------------- images and registry


def _write_random_layer(root: Path) -> None:
    """64 MiB in 256 files of seeded pseudo-random bytes (incompressible, identical every run)."""
    rng = random.Random(11)
    target = root / "opt" / "other"
    target.mkdir(parents=True, exist_ok=True)
    size = RANDOM_BYTES // 256
    for number in range(256):
        (target / f"blob-{number:03d}.bin").write_bytes(rng.randbytes(size))


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / digest.replace(":", "/", 1)


def _put_blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    _blob(layout, digest).write_bytes(data)
    return digest


def _shifted_tar(src: Path, dest: Path, shift: int) -> None:
    """The tar *src* with every member dated *shift* seconds later, contents unchanged."""
    with tarfile.open(src, "r:") as tin, tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin:
            member.mtime = int(member.mtime) + shift
            member.pax_headers.pop("mtime", None)
            member.pax_headers.pop("atime", None)
            member.pax_headers.pop("ctime", None)
            tout.addfile(member, tin.extractfile(member) if member.isreg() else None)


def add_rebuilt(layout: Path, source: str, tag: str, shift: int, scratch: Path) -> None:
    """Tag *tag*: image *source* with its last layer's members dated *shift* s later (a rebuild)."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == source)
    manifest = json.loads(_blob(layout, entry["digest"]).read_bytes())
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_bytes())
    layer = manifest["layers"][-1]
    plain, shifted = scratch / "layer.tar", scratch / "shifted.tar"
    with gzip.open(_blob(layout, layer["digest"]), "rb") as fin, open(plain, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    _shifted_tar(plain, shifted, shift)
    tar_bytes = shifted.read_bytes()
    plain.unlink()
    shifted.unlink()
    compressed = gzip.compress(tar_bytes, compresslevel=6, mtime=0)
    config["rootfs"]["diff_ids"][-1] = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    manifest["config"] = {**manifest["config"], "digest": _put_blob(layout, config_bytes), "size": len(config_bytes)}
    manifest["layers"][-1] = {**layer, "digest": _put_blob(layout, compressed), "size": len(compressed)}
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    index["manifests"].append({"mediaType": entry["mediaType"], "digest": _put_blob(layout, manifest_bytes),
                               "size": len(manifest_bytes),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    (layout / "index.json").write_text(json.dumps(index, separators=(",", ":")))


def build_images(corpus: Corpus, cache: Path) -> Path:
    """The OCI layout with tags base, app, rebuilt and random (built once; a half-built one is redone)."""
    layout = cache / f"oci-images-v{BUILDER_VERSION}" / "layout"
    if layout.exists():
        return layout
    tmp = layout.parent.with_name(layout.parent.name + ".tmp")
    rmtree(tmp)
    tmp.mkdir(parents=True)
    lay, bundle = tmp / "layout", tmp / "bundle"
    log.info("oci: building the test images from the corpus (once)")
    run(["umoci", "init", "--layout", lay])
    run(["umoci", "new", "--image", f"{lay}:base"])
    run(["umoci", "unpack", "--image", f"{lay}:base", bundle])
    run(["cp", "-a", f"{corpus.v1}/.", bundle / "rootfs"])
    run(["umoci", "repack", "--image", f"{lay}:base", bundle], timeout=3600)
    rmtree(bundle)
    run(["umoci", "unpack", "--image", f"{lay}:base", bundle])
    run(["rsync", "-aHAX", "--delete", f"{corpus.v2}/", f"{bundle / 'rootfs'}/"], timeout=3600)
    run(["umoci", "repack", "--image", f"{lay}:app", bundle], timeout=3600)
    rmtree(bundle)
    run(["umoci", "unpack", "--image", f"{lay}:base", bundle])
    _write_random_layer(bundle / "rootfs")
    run(["umoci", "repack", "--image", f"{lay}:{EXTRA}", bundle], timeout=3600)
    rmtree(bundle)
    run(["umoci", "gc", "--layout", lay])
    add_rebuilt(lay, "app", "rebuilt", REBUILD_SHIFT, tmp)
    tmp.rename(layout.parent)
    return layout


class Registry:
    """docker-registry on a free loopback port, storage in *workdir*; stopped by :meth:`stop`."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = {"version": "0.1", "log": {"level": "warn", "accesslog": {"disabled": True}},
                  "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}},
                  "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)}}
        (workdir / "config.yml").write_text(json.dumps(config))
        self.log = open(workdir / "registry.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["docker-registry", "serve", str(workdir / "config.yml")], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.host = f"127.0.0.1:{port}"
        self.storage = workdir / "storage"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BenchError(f"docker-registry did not start (see {workdir / 'registry.log'})") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()

    def ref(self, image: str) -> str:
        return f"{self.host}/bench/{image}:1"


# --------------------------------------------------------------------------- the systems


def _podman_driver(root: Path) -> str:
    """overlay where podman can use it here, else vfs (full copies per layer: noted in the table)."""
    probe = subprocess.run(["podman", "--root", str(root / "probe"), "--runroot", str(root / "probe-run"),
                            "--storage-driver", "overlay", "info"], capture_output=True, text=True, check=False)
    shutil.rmtree(root / "probe", ignore_errors=True)
    shutil.rmtree(root / "probe-run", ignore_errors=True)
    return "overlay" if probe.returncode == 0 else "vfs"


def _pull(system: str, registry: Registry, image: str, out: Path, cli: CnpsfsCli, driver: str) -> None:
    ref = registry.ref(image)
    if system == "cnpsfs":
        cli.import_oci(out / "store", f"docker://{ref}")
    elif system == "cnpsfs-zstd3":  # the store's blocks at zstd 3, not 9: the compression/time trade
        cli.import_oci(out / "store", f"docker://{ref}", "--compression-level", "3")
    elif system in ("skopeo", "skopeo+umoci"):
        run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{out / 'layout'}:{image}"],
            timeout=3600)
        if system == "skopeo+umoci":
            run(["umoci", "unpack", "--image", f"{out / 'layout'}:{image}", out / f"bundle-{image}"], timeout=3600)
    elif system == "podman":
        run(["podman", "--root", out / "root", "--runroot", out / "run", "--storage-driver", driver, "pull", "-q",
             "--tls-verify=false", ref], timeout=3600, env={**os.environ, "CONTAINERS_CONF": str(out / "c.conf")})
    else:
        raise ValueError(system)


def _unavailable(system: str, cli: CnpsfsCli) -> str | None:
    if system in ("cnpsfs", "cnpsfs-zstd3"):
        return cli.oci_unavailable()
    for tool in {"skopeo": ("skopeo",), "skopeo+umoci": ("skopeo", "umoci"), "podman": ("podman",)}[system]:
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stored_paths(system: str, out: Path, images: tuple[str, ...]) -> list[Path]:
    return {"cnpsfs": [out / "store"], "cnpsfs-zstd3": [out / "store"], "skopeo": [out / "layout"],
            "skopeo+umoci": [out / "layout", *(out / f"bundle-{i}" for i in images)],
            "podman": [out / "root"]}[system]


def measure(registry: Registry, work: Path, reps: int, cli: CnpsfsCli, systems: set[str] | None) -> list[OciRow]:
    rows = {s: OciRow(s, LABELS[s]) for s in SYSTEMS if systems is None or s in systems}
    driver = _podman_driver(work) if "podman" in rows and shutil.which("podman") else "vfs"
    for row in rows.values():
        row.skipped = _unavailable(row.name, cli)
    if "podman" in rows:
        rows["podman"].label += f" ({driver} storage)"
    for rep in range(reps):
        for row in rows.values():  # systems alternate, so on a shared machine they see the same load
            if row.skipped:
                continue
            log.info("oci: %s rep %d/%d", row.name, rep + 1, reps)
            out = work / row.name
            subprocess.run(["rm", "-rf", "--one-file-system", str(out)], check=False)
            out.mkdir(parents=True)
            (out / "c.conf").write_text("[containers]\ndefault_ulimits = []\n")
            try:
                cpu = 0.0
                for image in (*IMAGES, EXTRA):
                    drop_caches()
                    start, before = time.perf_counter(), _children_cpu()
                    _pull(row.name, registry, image, out, cli, driver)
                    took = time.perf_counter() - start
                    if image != EXTRA:
                        cpu += _children_cpu() - before
                    if image == EXTRA:
                        row.extra_seconds.append(took)
                        row.extra_bytes.append(du_bytes(_stored_paths(row.name, out, (*IMAGES, EXTRA)))[1])
                        continue
                    row.seconds[image].append(took)
                    if image == IMAGES[-1]:
                        row.cpu_seconds.append(cpu)
                        row.stored_bytes.append(du_bytes(_stored_paths(row.name, out, IMAGES))[1])
                        if row.name == "skopeo+umoci":
                            row.notes["layout_bytes"] = du_bytes([out / "layout"])[1]
            except BenchError as exc:
                row.skipped = f"failed: {exc}"
                log.warning("oci: %s failed: %s", row.name, exc)
            finally:
                if row.name == "podman":
                    subprocess.run(["podman", "--root", str(out / "root"), "--runroot", str(out / "run"),
                                    "--storage-driver", driver, "rmi", "--all", "--force"], capture_output=True,
                                   check=False)
                subprocess.run(["rm", "-rf", "--one-file-system", str(out)], check=False)
    return list(rows.values())


def run_oci(corpus: Corpus, cache: Path, work: Path, reps: int, cli: CnpsfsCli,
            systems: set[str] | None) -> tuple[list[OciRow], dict[str, Any]]:
    ensure_packages({"umoci": "umoci", "skopeo": "skopeo", "docker-registry": "docker-registry",
                     "rsync": "rsync", "podman": "podman"})
    layout = build_images(corpus, cache)
    base = work / "oci"
    rmtree(base)
    work.mkdir(parents=True, exist_ok=True)
    registry = Registry(Path(tempfile.mkdtemp(prefix="registry-", dir=work)))
    try:
        for image in (*IMAGES, EXTRA):
            run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:{image}",
                 f"docker://{registry.ref(image)}"], timeout=3600)
        info: dict[str, Any] = {"layout": str(layout), "layout_bytes": du_bytes([layout])[1],
                                "registry_bytes": du_bytes([registry.storage])[1]}
        start_load = Path("/proc/loadavg").read_text().split()[0]
        rows = measure(registry, base, reps, cli, systems)
        info["loadavg"] = [start_load, Path("/proc/loadavg").read_text().split()[0]]
    finally:
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(registry.storage.parent, ignore_errors=True)
    return rows, info


def oci_table(rows: list[OciRow], info: dict[str, Any]) -> str:
    from .report import fmt_bytes, fmt_seconds

    lines = ["| system | base (v1) | app (base + v2 layer) | rebuilt (app, new mtimes) | total | CPU, 3 images "
             f"| stored, 3 images | extra: {EXTRA} (base + 64 MiB random) | stored, 4 images |",
             "|---|---|---|---|---|---|---|---|---|"]
    summaries = {r.name: r.summary() for r in rows if not r.skipped}
    for row in rows:
        if row.skipped:
            lines.append(f"| {row.label} | n/a ({row.skipped}) | | | | | | | |")
            continue
        s = summaries[row.name]
        cells = [fmt_seconds(s[f"{i}_seconds"]) for i in IMAGES]
        extra = [fmt_seconds(s[f"{EXTRA}_seconds"]) if f"{EXTRA}_seconds" in s else "n/a",
                 fmt_bytes(s["stored_bytes_with_extra"]) if "stored_bytes_with_extra" in s else "n/a"]
        cpu = fmt_seconds(s["cpu_seconds"]) if "cpu_seconds" in s else "n/a"
        lines.append(f"| {row.label} | {' | '.join(cells)} | {fmt_seconds(s['total_seconds'])} | {cpu} | "
                     f"{fmt_bytes(s['stored_bytes'])} | {' | '.join(extra)} |")
    notes = []
    if "cnpsfs" in summaries and "skopeo" in summaries:
        ratio = summaries["cnpsfs"]["total_seconds"] / summaries["skopeo"]["total_seconds"]
        space = summaries["cnpsfs"]["stored_bytes"] / summaries["skopeo"]["stored_bytes"]
        notes.append(f"cnpsfs / skopeo copy, 3 images: {ratio:.2f}× the time (target ≤ 1.2×), {space:.2f}× the bytes "
                     f"(target < 0.5×)")
        if "stored_bytes_with_extra" in summaries["cnpsfs"] and "stored_bytes_with_extra" in summaries["skopeo"]:
            with_extra = (summaries["cnpsfs"]["stored_bytes_with_extra"]
                          / summaries["skopeo"]["stored_bytes_with_extra"])
            notes.append(f"with the extra {EXTRA} image (incompressible, outside the targets): {with_extra:.2f}× "
                         "the bytes")
    for name in ("cnpsfs", "cnpsfs-zstd3"):
        if name in summaries and "podman" in summaries:
            ours, peer = summaries[name], summaries["podman"]
            line = f"{name} / podman pull, 3 images: {ours['total_seconds'] / peer['total_seconds']:.2f}× the time"
            if "cpu_seconds" in ours and "cpu_seconds" in peer:
                line += f", {ours['cpu_seconds'] / peer['cpu_seconds']:.2f}× the CPU"
            if name != "cnpsfs" and "skopeo" in summaries:
                line += (f"; / skopeo copy {ours['total_seconds'] / summaries['skopeo']['total_seconds']:.2f}× "
                         f"the time, {ours['stored_bytes'] / summaries['skopeo']['stored_bytes']:.2f}× the bytes")
            notes.append(line)
    if info.get("layout_bytes"):
        notes.append(f"the source layout (4 images, gzip layers) holds {fmt_bytes(info['layout_bytes'])}")
    if info.get("loadavg"):
        notes.append(f"load average at the start / end: {info['loadavg'][0]} / {info['loadavg'][1]}")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])
