"""``cnpsfs build RECIPE``: a Debian image from an unordered package list (docs/recipe.md).

1. apt, in its own private state (:mod:`cnpsfs.debian.apt`), resolves the list (plus
   the suite's Essential set) to a closure and downloads it into a cache keyed by SHA-256.
2. Each .deb becomes a FileSet; one already in the store (same tag, same source SHA-256)
   is reused, so a rebuild imports only what changed. Each gets a provenance record (the
   signed InRelease and Packages entry it came from, cnpsfs.debian.provenance).
3. The package FileSets are composed in union mode: their order cannot matter, and two
   packages shipping different content at one path is an error naming both -- unless
   one declares ``Replaces`` on the other, which makes it an override layer (dpkg lets a
   replacing package take over the file).
4. The dpkg database as unpack leaves it is synthesised as an override layer
   (:mod:`cnpsfs.debian.dpkgdb`).
5. The composition is mounted writable; preinst scripts and ``dpkg --configure
   --pending`` run in a chroot; the overlay upper directory, minus per-instance and
   volatile files and with mtimes clamped, becomes the "configure" override layer.
6. Extra layers (directories or tars) go on top; the image is tagged NAME@VERSION.

Everything that goes into a digest is derived from the package set and the recipe, never
from the clock, the list order or the host, so equal inputs give equal digests.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.debian import apt
from cnpsfs.debian.dpkgdb import InstalledPackage, import_database
from cnpsfs.errors import CnpsfsError, ConflictError, FormatError, NotFoundError, UsageError
from cnpsfs.image.manifest import compose, parse_config, store_image
from cnpsfs.ingest.tree import ImportOptions
from cnpsfs.store import T_FILESET, HostedStore, Store, check_tag_name, check_tag_version

log = logging.getLogger(__name__)

RECIPE_KEYS = {"name", "version", "debian", "layers", "config", "metadata", "source_date_epoch"}
DEBIAN_KEYS = {"suite", "architecture", "sources", "packages", "essential", "merged_usr"}
LAYER_KEYS = {"path", "at", "label"}
#: Packages whose preinst runs first, in this order (debootstrap's second stage).
EARLY = ("base-passwd", "base-files", "dpkg", "libc6", "perl-base", "mawk", "debconf")
#: Per-instance files: removed from the image and recreated at first start (docs/recipe.md).
PER_INSTANCE = {
    "etc/machine-id": "systemd-machine-id-setup or systemd at first boot; absent, as in Debian's images",
    "var/lib/dbus/machine-id": "dbus (a symlink to /etc/machine-id, or dbus-uuidgen at first start)",
    "var/lib/systemd/random-seed": "systemd-random-seed.service at first boot",
    "var/lib/urandom/random-seed": "the urandom init script at first boot",
    "etc/ssh/ssh_host_*": "openssh-server: ssh-keygen -A (sshd's unit runs it when keys are missing)",
}
POLICY_RC_D = "#!/bin/sh\n# cnpsfs build: no service starts while configuring\nexit 101\n"


class BuildError(CnpsfsError):
    pass


@dataclass
class Recipe:
    name: str
    version: str
    packages: list[str]
    suite: str | None = None
    arch: str | None = None
    sources: list[str] | None = None
    essential: bool = True
    merged_usr: bool = True
    layers: list[dict[str, str]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source_date_epoch: int | None = None


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: not valid TOML: {exc}") from None

    def check(table: dict[str, Any], allowed: set[str], where: str) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise UsageError(f"{source}: unknown key {where}{unknown[0]} (allowed: {', '.join(sorted(allowed))})")

    check(raw, RECIPE_KEYS, "")
    for key in ("name", "version"):
        if not isinstance(raw.get(key), str):
            raise UsageError(f"{source}: missing string key {key!r}")
    check_tag_name(raw["name"])
    check_tag_version(raw["version"])
    deb = raw.get("debian", {})
    if not isinstance(deb, dict):
        raise UsageError(f"{source}: [debian] must be a table")
    check(deb, DEBIAN_KEYS, "debian.")
    packages = deb.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) and p for p in packages):
        raise UsageError(f"{source}: debian.packages must be a list of package names")
    sources = deb.get("sources")
    if sources is not None and (not isinstance(sources, list) or not all(isinstance(s, str) for s in sources)):
        raise UsageError(f"{source}: debian.sources must be a list of 'deb URI SUITE COMPONENT...' lines")
    essential = deb.get("essential", True)
    if not isinstance(essential, bool):
        raise UsageError(f"{source}: debian.essential must be true or false")
    merged_usr = deb.get("merged_usr", True)
    if not isinstance(merged_usr, bool):
        raise UsageError(f"{source}: debian.merged_usr must be true or false")
    layers = []
    for number, layer in enumerate(raw.get("layers", []), 1):
        if not isinstance(layer, dict) or not isinstance(layer.get("path"), str):
            raise UsageError(f"{source}: layers[{number}] needs a path (a directory or a tar file)")
        check(layer, LAYER_KEYS, f"layers[{number}].")
        at = layer.get("at", "/")
        if not isinstance(at, str) or not at.startswith("/") or any(p in (".", "..") for p in at.split("/")):
            raise UsageError(f"{source}: layers[{number}].at must be an absolute path, not {at!r}")
        try:
            at = fmt.normalize_at(at)
        except FormatError as exc:
            raise UsageError(f"{source}: layers[{number}].at: {exc}") from None
        path = layer["path"]
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.abspath(source)), path)
        layers.append({"path": path, "at": at,
                       "label": str(layer.get("label", os.path.basename(path)))})
    sde = raw.get("source_date_epoch")
    if sde is not None and (not isinstance(sde, int) or sde <= 0):
        raise UsageError(f"{source}: source_date_epoch must be a positive integer")
    metadata = raw.get("metadata", {})
    if not isinstance(metadata, dict):
        raise UsageError(f"{source}: [metadata] must be a table")
    return Recipe(raw["name"], raw["version"], list(packages), deb.get("suite"), deb.get("architecture"),
                  sources, essential, merged_usr, layers, parse_config(raw.get("config", {}), source), metadata, sde)


@dataclass
class BuildResult:
    digest: bytes
    image: fmt.Image
    timings: dict[str, float]
    imported: int
    reused: int
    configured: bool


def _sources_for(recipe: Recipe) -> list[tuple[str, str]]:
    if recipe.sources:
        return [("recipe.list", "".join(line.strip() + "\n" for line in recipe.sources))]
    return apt.default_sources(recipe.suite)


def _import_packages(store: Store, debs: dict[str, Path], candidates: list[apt.Candidate],
                     timings: dict[str, float]) -> tuple[dict[str, InstalledPackage], int, int]:
    from cnpsfs.debian import naming
    from cnpsfs.debian.deb import import_debs

    start = time.monotonic()
    found: dict[str, InstalledPackage] = {}
    todo = []
    for cand in candidates:
        tag = f"{naming.tag_name(cand.package)}@{naming.tag_version(cand.version, cand.arch)}"
        try:
            digest = store.resolve(tag, want=T_FILESET)
            fs = store.get_fileset(digest)
            if fs.metadata.get("debian", {}).get("archive", {}).get("sha256") == cand.sha256:
                found[cand.key] = InstalledPackage(digest, fs)
                continue
        except (NotFoundError, UsageError):
            pass
        todo.append(cand)
    if todo:
        for cand, result in zip(todo, import_debs(store, [debs[c.key] for c in todo]), strict=True):
            found[cand.key] = InstalledPackage(result.digest, result.fileset)
    timings["import"] = time.monotonic() - start
    return found, len(todo), len(candidates) - len(todo)


def _replaces(pkg: InstalledPackage) -> set[str]:
    text = str(pkg.control.get("Replaces", ""))
    return {part.strip().split(" ")[0].split(":")[0] for part in text.split(",") if part.strip()}


def _package_layers(store: Store, recipe: Recipe, pkgs: list[InstalledPackage],
                    views: dict[bytes, bytes]) -> list[fmt.Layer]:
    """Union layers for the packages; a package that Replaces another it conflicts with is
    made an override layer (overrides sorted by name, so the result is order-free)."""
    overrides: set[str] = set()
    by_fileset = {views.get(p.digest, p.digest): p for p in pkgs}  # a layer's FileSet -> its package
    while True:
        layers = [fmt.Layer(views.get(p.digest, p.digest), "/", False, p.package in overrides,
                            f"{p.package} {p.control['Version']}")
                  for p in sorted(pkgs, key=lambda p: (p.package in overrides, p.package, p.arch))]
        try:
            compose(store, fmt.Image(recipe.name, recipe.version, fmt.CompositionMode.UNION, layers)).check()
            return layers
        except ConflictError as exc:
            a, b = (by_fileset.get(layer.fileset) for layer in exc.layers)
            if a is None or b is None:
                raise BuildError(f"{exc}") from None
            if b.package in _replaces(a) and a.package not in overrides:
                overrides.add(a.package)
            elif a.package in _replaces(b) and b.package not in overrides:
                overrides.add(b.package)
            else:
                raise BuildError(f"packages {a.package} and {b.package} conflict: {exc}") from None
            log.info("%s: %s and %s both ship it; one Replaces the other and takes precedence",
                     exc.path, a.package, b.package)


def _merged_usr(store: Store, pkgs: list[InstalledPackage], arch: str,
                sde: int) -> tuple[dict[bytes, bytes], bytes]:
    """Merged-/usr views of the packages that need one, and the symlink layer's FileSet."""
    from cnpsfs.debian.usrmerge import MergedUsr

    views: dict[bytes, bytes] = {}
    with store.writer() as writer:
        merger = MergedUsr(store, writer)
        for pkg in pkgs:
            view = merger.merged_view(pkg.fileset, pkg.digest)
            if view is not None:
                views[pkg.digest] = writer.add_object(fmt.encode_fileset(view))
        root = merger.symlink_tree(arch, sde * 1_000_000_000)
        links = writer.add_object(fmt.encode_fileset(fmt.FileSet("cnpsfs.org/merged-usr", arch, root,
                                                                 {"cnpsfs": {"kind": "merged-usr"}})))
        writer.commit([])
    return views, links


def _dependency_order(pkgs: list[InstalledPackage]) -> list[InstalledPackage]:
    """debootstrap's early packages first, then dependencies before dependents (ties by name)."""
    by_name = {p.package: p for p in pkgs}
    deps: dict[str, set[str]] = {}
    for p in pkgs:
        text = ",".join(str(p.control.get(f, "")) for f in ("Pre-Depends", "Depends"))
        names = {alt.strip().split(" ")[0].split(":")[0] for part in text.split(",") for alt in part.split("|")}
        deps[p.package] = {n for n in names if n in by_name and n != p.package}
    order: list[str] = [n for n in EARLY if n in by_name]
    done = set(order)
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in done or name in visiting:
            return
        visiting.add(name)
        for dep in sorted(deps[name]):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append(name)

    for name in sorted(by_name):
        visit(name)
    return [by_name[n] for n in order]


def _run(args: list[str], what: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip()[-2000:]
        raise BuildError(f"{what} failed (exit {result.returncode}): {tail}")
    return result.stdout


def _configure(store: HostedStore, recipe: Recipe, base: fmt.Image, pkgs: list[InstalledPackage], sde: int,
               workdir: Path) -> tuple[bytes, int]:
    """Mount *base* writable, run preinst + dpkg --configure in a chroot, commit the upper dir."""
    from cnpsfs.ingest.upper import commit_upper

    temp_digest = store_image(store, base, tag=False)
    mnt, upper = workdir / "mnt", workdir / "upper"
    mnt.mkdir()
    cnpsfs = [*_cnpsfs_command(), "--store", str(store.path)]
    _run([*cnpsfs, "mount", fmt.format_digest(temp_digest), str(mnt), "--writable", str(upper)], "mount")
    binds: list[Path] = []
    try:
        for sub in ("proc", "dev", "sys"):
            target = mnt / sub
            target.mkdir(exist_ok=True)
            _run(["mount", "--bind", f"/{sub}", str(target)], f"bind mount /{sub}")
            binds.append(target)
        policy = mnt / "usr/sbin/policy-rc.d"
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(POLICY_RC_D)
        policy.chmod(0o755)
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
               "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive", "DEBCONF_NONINTERACTIVE_SEEN": "true",
               "SOURCE_DATE_EPOCH": str(sde), "TZ": "UTC", "PYTHONHASHSEED": "0"}
        for pkg in _dependency_order(pkgs):
            if "preinst" not in pkg.debian["files"]:
                continue
            script = f"/var/lib/dpkg/info/{pkg.info_name}.preinst"
            penv = {**env, "DPKG_MAINTSCRIPT_PACKAGE": pkg.package, "DPKG_MAINTSCRIPT_ARCH": pkg.arch,
                    "DPKG_MAINTSCRIPT_NAME": "preinst", "DPKG_MAINTSCRIPT_PACKAGE_REFCOUNT": "1",
                    "DPKG_ADMINDIR": "/var/lib/dpkg", "DPKG_ROOT": ""}
            _run(["chroot", str(mnt), script, "install"], f"{pkg.package} preinst install", penv)
        _run(["chroot", str(mnt), "dpkg", "--configure", "--pending"], "dpkg --configure --pending", env)
        policy.unlink()
    finally:
        for target in reversed(binds):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        subprocess.run([*cnpsfs, "umount", str(mnt)], capture_output=True)
    _drop_per_instance(upper / "upper")
    options = ImportOptions(source_date_epoch=sde, strip_volatile=True, name=f"{recipe.name}/configure",
                            version=recipe.version, metadata={"cnpsfs": {"kind": "configure"}})
    result = commit_upper(store, upper / "upper", options)
    return result.digest, result.entries


def _cnpsfs_command() -> list[str]:
    """The CLI of this very installation (the mount daemon must run the same code)."""
    beside = Path(sys.executable).parent / "cnpsfs"
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-c", "from cnpsfs.cli import main; main()"]


def _drop_per_instance(upper: Path) -> None:
    """Remove per-instance and volatile files from the configure layer's upper dir.

    The empty /proc, /dev and /sys mount points stay: the image needs them anyway."""
    import glob

    for pattern in [*PER_INSTANCE, "var/log/**/*", "var/cache/debconf/*-old", "var/lib/dpkg/*-old",
                    "usr/sbin/policy-rc.d"]:
        for path in glob.glob(str(upper / pattern), recursive=True):
            if os.path.isfile(path) or os.path.islink(path):
                os.unlink(path)


def _extra_layer(store: Store, recipe: Recipe, number: int, spec: dict[str, str], sde: int) -> fmt.Layer:
    from cnpsfs.ingest.directory import import_directory
    from cnpsfs.ingest.tar import import_tar

    options = ImportOptions(source_date_epoch=sde, name=f"{recipe.name}/layer{number}", version=recipe.version)
    path = spec["path"]
    if os.path.isdir(path):
        result = import_directory(store, path, options)
    elif os.path.isfile(path):
        result = import_tar(store, path, options)
    else:
        raise UsageError(f"layers[{number}].path: no such directory or tar file: {path}")
    return fmt.Layer(result.digest, spec["at"], False, True, spec["label"])


def build(store: HostedStore, recipe: Recipe, *, cache: Path = apt.DEFAULT_CACHE, refresh: bool = False,
          on_step: Callable[[str], None] | None = None) -> BuildResult:
    step = on_step or (lambda message: log.info("%s", message))
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    arch = recipe.arch or apt.host_arch()
    env = apt.AptEnv(cache, arch, _sources_for(recipe))
    step("updating package lists" if env.update(refresh=refresh) else "package lists are fresh (cached)")
    essential = env.essential() if recipe.essential else []
    # debootstrap installs usr-is-merged with the Essential set (bookworm and later) so
    # that "usrmerge | usr-is-merged" is met by the marker package, not the converter.
    marker = ["usr-is-merged"] if recipe.essential and recipe.merged_usr else []
    wanted = sorted(set(recipe.packages) | set(essential) | set(marker))
    candidates = env.resolve(wanted, set(essential))
    timings["resolve"] = time.monotonic() - t0
    step(f"resolved {len(wanted)} requested packages to {len(candidates)}")
    t = time.monotonic()
    debs = env.download(candidates)
    timings["download"] = time.monotonic() - t
    found, imported, reused = _import_packages(store, debs, candidates, timings)
    step(f"imported {imported} packages, reused {reused}")
    t = time.monotonic()
    from cnpsfs.debian.provenance import record_provenance

    recorded = record_provenance(store, env, candidates, {key: pkg.digest for key, pkg in found.items()})
    timings["provenance"] = time.monotonic() - t
    if recorded:
        step(f"recorded the archive provenance of {recorded} packages")
    pkgs = [found[c.key] for c in candidates]
    sde = recipe.source_date_epoch or max(p.fileset.root.mtime_ns // 1_000_000_000 for p in pkgs)
    t = time.monotonic()
    views: dict[bytes, bytes] = {}
    extra_union: list[fmt.Layer] = []
    if recipe.merged_usr:
        views, links = _merged_usr(store, pkgs, arch, sde)
        extra_union.append(fmt.Layer(links, "/", False, False, "merged /usr symlinks"))
    layers = extra_union + _package_layers(store, recipe, pkgs, views)
    db = import_database(store, pkgs, arch, source_date_epoch=sde, name=f"{recipe.name}/dpkg-database",
                         version=recipe.version, scratch=str(store.scratch_dir()))
    layers.append(fmt.Layer(db.digest, "/", False, True, "dpkg database"))
    timings["compose"] = time.monotonic() - t
    configured = any(p.package == "dpkg" for p in pkgs)
    t = time.monotonic()
    if configured:
        step("configuring (preinst, dpkg --configure --pending)")
        base = fmt.Image(recipe.name, recipe.version, fmt.CompositionMode.UNION, list(layers))
        with tempfile.TemporaryDirectory(prefix="cnpsfs-build-") as tmp:
            digest, _entries = _configure(store, recipe, base, pkgs, sde, Path(tmp))
        layers.append(fmt.Layer(digest, "/", False, True, "configure"))
    else:
        step("dpkg is not in the package set: maintainer scripts not run (image left unpacked)")
    timings["configure"] = time.monotonic() - t
    for number, spec in enumerate(recipe.layers, 1):
        layers.append(_extra_layer(store, recipe, number, spec, sde))
    by_key = {c.key: c for c in candidates}
    provenance = [{"package": p.package, "version": str(p.control["Version"]), "arch": p.arch,
                   "source": by_key[f"{p.package}:{p.arch}"].source or p.package,
                   "sha256": by_key[f"{p.package}:{p.arch}"].sha256,
                   "origin": by_key[f"{p.package}:{p.arch}"].origin,
                   "fileset": fmt.format_digest(p.digest)}
                  for p in sorted(pkgs, key=lambda p: (p.package, p.arch))]
    metadata = dict(recipe.metadata)
    metadata["debian"] = {
        "architecture": arch, "suite": recipe.suite or apt.host_codename(), "essential": recipe.essential,
        "requested": sorted(set(recipe.packages)), "packages": provenance, "source_date_epoch": sde,
        "configured": configured,
        "per_instance": [{"path": "/" + k, "generated_by": v} for k, v in sorted(PER_INSTANCE.items())],
    }
    image = fmt.Image(recipe.name, recipe.version, fmt.CompositionMode.UNION, layers, dict(recipe.config), metadata)
    t = time.monotonic()
    compose(store, image).check()
    digest = store_image(store, image)
    timings["store"] = time.monotonic() - t
    timings["total"] = time.monotonic() - t0
    return BuildResult(digest, image, timings, imported, reused, configured)


def load_recipe(path: str) -> Recipe:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read recipe {path}: {exc.strerror}") from None
    return parse_recipe(text, path)


__all__ = ["BuildError", "BuildResult", "Recipe", "build", "load_recipe", "parse_recipe"]
