"""Import an OCI or Docker image: each layer a FileSet, the whole an image tagged last.

One pass per layer: the blob streams through a hasher (the manifest's digest and size),
a decompressor, a second hasher (the config's diff_id) and the streaming tar importer,
which cuts and stores chunks as members arrive. The digests are compared after the last
byte and before the layer's FileSet is committed; a mismatch, a hostile member or a
damaged stream rejects the import with a message naming the layer. Layer FileSets are
committed untagged; the image and its tag are committed only when every layer is in, and
the store's shared lock is held throughout, so gc cannot sweep a layer in between.

A layer FileSet is named ``layer.oci/diff@<diff_id>``. Directories a layer's tar does not
describe (umoci writes ``etc/.wh.motd`` without ``etc/``) keep the metadata they have in
the layers below, as an extracting runtime leaves them: after all layers are in, those
directories of each layer are given their metadata from the composition of the layers
below it. A layer FileSet is therefore a function of the layer and the layers below it,
which is what its OCI chain ID names; a layer already imported on the same chain, through
any image and under any compression, is reused without being read again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cnpsfs import format as fmt
from cnpsfs.errors import CnpsfsError, ImportRejected
from cnpsfs.image.manifest import compose, store_image
from cnpsfs.ingest.tar import TarImporter, import_tar_stream
from cnpsfs.ingest.tree import ImportOptions
from cnpsfs.oci.artifacts import list_referrers
from cnpsfs.oci.blobs import Cancelled, HashingReader, ReadAhead, decompressor, sniff_compression
from cnpsfs.oci.layout import ImageSource, read_blob
from cnpsfs.oci.model import (
    ImageConfig,
    Index,
    Manifest,
    Platform,
    check_config_descriptor,
    digest_of,
    host_platform,
    layer_compression,
    parse_config,
    parse_manifest_document,
    select_platform,
    short,
)
from cnpsfs.oci.signatures import Restored, choose, collect, matching, restore
from cnpsfs.store import T_IMAGE, HostedStore, Store

log = logging.getLogger(__name__)

LAYER_NAME = "layer.oci/diff"
#: Layers read at once: enough to keep a registry connection busy while another layer
#: is being cut and compressed, few enough not to thrash two cores.
DEFAULT_JOBS = 3


@dataclass
class OciImportOptions:
    name: str
    version: str
    platform: Platform | None = None  # None: the host's, and a single-platform image of another is accepted
    jobs: int = DEFAULT_JOBS
    #: Restore the signed cnpsfs object that signature artifacts referring to the image carry.
    signatures: bool = True
    #: name and version were given by the user: a signed object of another name is not restored.
    names_given: bool = False
    #: The trust decision on a restored signed object before it is tagged (cnpsfs.trust.check_image).
    check: Callable[[bytes, str], object] | None = None
    #: File the prefetch profiles that profile artifacts referring to the image carry under it.
    profiles: bool = True
    #: zstd level of the layers' new blocks (None: the store's default, 9).
    compression_level: int | None = None


@dataclass
class LayerResult:
    number: int
    digest: str
    media_type: str
    size: int
    diff_id: str
    fileset: bytes
    reused: bool
    new_bytes: int = 0
    chain_id: str = ""


@dataclass
class _RawLayer:
    """A layer as its tar describes it, and the directories it left undescribed."""

    fileset: bytes
    implicit: list[tuple[bytes, ...]]
    new_bytes: int


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: the first layer's diff_id, then sha256 of "<chain below> <diff_id>"."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else digest_of(f"{out[-1]} {diff_id}".encode()))
    return out


@dataclass
class OciImportResult:
    digest: bytes
    image: fmt.Image
    manifest_digest: str
    config_digest: str
    layers: list[LayerResult] = field(default_factory=list)
    #: The signed object restored from signature artifacts (tagged instead of *image*).
    restored: Restored | None = None
    #: Digests of the profile objects filed under the imported image (docs/format.md §1.15).
    profiles: list[bytes] = field(default_factory=list)

    @property
    def new_bytes(self) -> int:
        return sum(layer.new_bytes for layer in self.layers)


def resolve_manifest(source: ImageSource, want: Platform) -> tuple[Manifest, str, str | None, bytes]:
    """The image manifest for *want*: (manifest, its digest, the index digest if any, its bytes)."""
    data, media_type, digest = source.root()
    manifest_digest = digest or digest_of(data)
    what = f"{source.reference}: manifest {short(manifest_digest)}"
    doc = parse_manifest_document(data, media_type, what)
    index_digest: str | None = None
    depth = 0
    while isinstance(doc, Index):
        depth += 1
        if depth > 4:
            raise ImportRejected(f"{what}: indexes nested more than 4 deep")
        desc = select_platform(doc, want, what)
        index_digest = index_digest or manifest_digest
        manifest_digest = desc.digest
        what = f"{source.reference}: manifest {short(desc.digest)}"
        data = read_blob(source, desc, what)
        doc = parse_manifest_document(data, desc.media_type, what)
    return doc, manifest_digest, index_digest, data


def known_layers(store: Store) -> dict[str, bytes]:
    """chain ID -> layer FileSet digest, from the provenance of every tagged image."""
    out: dict[str, bytes] = {}
    for tag in store.tags(T_IMAGE):
        try:
            image = store.get_image(tag.digest)
        except CnpsfsError:
            continue
        oci = image.metadata.get("oci")
        layers = oci.get("layers") if isinstance(oci, dict) else None
        for item in layers if isinstance(layers, list) else []:
            if not isinstance(item, dict):
                continue
            chain_id, fileset = item.get("chain_id"), item.get("fileset")
            if isinstance(chain_id, str) and isinstance(fileset, str):
                try:
                    out.setdefault(chain_id, fmt.parse_digest(fileset))
                except CnpsfsError:
                    continue
    return out


def _reusable(store: Store, digest: bytes | None, diff_id: str) -> bool:
    if digest is None or not store.contains(digest):
        return False
    try:
        fileset = store.get_fileset(digest)
    except CnpsfsError:
        return False
    return fileset.name == LAYER_NAME and fileset.version == diff_id


def import_oci(store: HostedStore, source: ImageSource, options: OciImportOptions, *,
               on_total: Callable[[int], None] | None = None,
               on_progress: Callable[[int], None] | None = None) -> OciImportResult:
    """Import the image *source* names; tag it ``options.name@options.version`` at the end."""
    want = options.platform or host_platform()
    manifest, manifest_digest, index_digest, _data = resolve_manifest(source, want)
    ref = source.reference
    check_config_descriptor(manifest.config, f"{ref}: manifest {short(manifest_digest)}")
    config_what = f"{ref}: config {short(manifest.config.digest)}"
    config = parse_config(read_blob(source, manifest.config, config_what), config_what)
    if len(config.diff_ids) != len(manifest.layers):
        raise ImportRejected(f"{config_what}: {len(config.diff_ids)} diff_ids for the manifest's "
                             f"{len(manifest.layers)} layers")
    if index_digest is None and not want.matches(config.platform):
        if options.platform is not None:
            raise ImportRejected(f"{ref}: the image is for {config.platform}, not {want}")
        log.warning("%s: the image is for %s, this host is %s", ref, config.platform, want)
    total = len(manifest.layers)
    labels = [f"{ref}: layer {n + 1}/{total} ({short(d.digest)})" for n, d in enumerate(manifest.layers)]
    compressions = [layer_compression(d, labels[n]) for n, d in enumerate(manifest.layers)]

    chains = chain_ids(config.diff_ids)
    known = known_layers(store)
    settled: list[bytes | None] = [None] * total
    todo: dict[str, int] = {}  # diff_id -> the layer number that reads it
    for number, (chain, diff_id) in enumerate(zip(chains, config.diff_ids, strict=True)):
        if _reusable(store, known.get(chain), diff_id):
            settled[number] = known[chain]
        elif diff_id not in todo:
            todo[diff_id] = number
    if on_total is not None:
        on_total(sum(manifest.layers[n].size for n in todo.values()))

    abort = threading.Event()
    raw: dict[str, _RawLayer] = {}
    with store.shared_lock():  # gc waits until the image (and so every layer) is tagged
        if todo:
            workers = max(1, min(options.jobs, len(todo)))
            with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="cnpsfs-oci") as pool, \
                    concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cnpsfs-layer") as layers:
                futures = {number: layers.submit(_import_layer, store, source, manifest.layers[number], diff_id,
                                                 compressions[number], labels[number], pool, abort, on_progress,
                                                 options.compression_level)
                           for diff_id, number in todo.items()}
                concurrent.futures.wait(futures.values(), return_when=concurrent.futures.FIRST_EXCEPTION)
                if any(f.done() and f.exception() is not None for f in futures.values()):
                    abort.set()
                concurrent.futures.wait(futures.values())
            errors = [(n, f.exception()) for n, f in sorted(futures.items()) if f.exception() is not None]
            real = [(n, e) for n, e in errors if not isinstance(e, Cancelled)]
            if errors:
                raise (real or errors)[0][1]  # type: ignore[misc]
            raw = {config.diff_ids[number]: future.result() for number, future in futures.items()}
        done: list[LayerResult] = []
        for number, (desc, diff_id) in enumerate(zip(manifest.layers, config.diff_ids, strict=True)):
            reused = settled[number] is not None
            fileset = settled[number]
            if fileset is None:
                fileset = _settle(store, raw[diff_id], [s for s in settled[:number] if s is not None], diff_id,
                                  chains[number])
                settled[number] = fileset
            first_reader = not reused and todo.get(diff_id) == number
            done.append(LayerResult(number + 1, desc.digest, desc.media_type, desc.size, diff_id, fileset,
                                    not first_reader, raw[diff_id].new_bytes if first_reader else 0, chains[number]))
        image = build_image(options.name, options.version, ref, manifest, manifest_digest, index_digest, config,
                            done)
        listed = _referrers(source, options, manifest_digest)
        restored = _restore_signed(store, source, options, manifest_digest, done, listed) \
            if options.signatures else None
        digest = restored.digest if restored is not None else store_image(store, image)
        profiles = _file_profiles(store, source, digest, manifest_digest, listed) if options.profiles else []
    return OciImportResult(digest, image, manifest_digest, manifest.config.digest, done, restored, profiles)


def _referrers(source: ImageSource, options: OciImportOptions, manifest_digest: str) -> list[dict[str, Any]]:
    """What refers to the image, listed once for signatures and profiles. A failing listing
    is an error when signatures are looked for (never imported as unsigned because the
    registry failed); for profiles alone, which are advice, a warning."""
    if not options.signatures and not options.profiles:
        return []
    try:
        return list_referrers(source, manifest_digest)
    except CnpsfsError as exc:
        if options.signatures:
            raise
        log.warning("%s: imported without its profiles: %s", source.reference, exc)
        return []


def _file_profiles(store: Store, source: ImageSource, image: bytes, manifest_digest: str,
                   listed: list[dict[str, Any]]) -> list[bytes]:
    """The profiles the image's profile artifacts carry, filed under *image* (docs/oci.md, "Profiles")."""
    from cnpsfs.oci.profiles import collect as collect_profiles
    from cnpsfs.oci.profiles import file_profiles

    found = collect_profiles(source, manifest_digest, listed)
    if not found:
        return []
    filed = file_profiles(store, image, found)
    log.info("%s: %d profile(s) filed under %s", source.reference, len(filed), fmt.format_digest(image))
    return filed


def _restore_signed(store: Store, source: ImageSource, options: OciImportOptions, manifest_digest: str,
                    done: list[LayerResult], listed: list[dict[str, Any]]) -> Restored | None:
    """The signed object the image's signature artifacts carry, stored and tagged, if it
    has exactly the imported layers (docs/oci.md, "Signatures")."""
    found = collect(source, manifest_digest, listed)
    if not found:
        return None
    roots = [store.get_fileset(layer.fileset).root for layer in done]
    chosen = choose(matching(store, found, roots))
    if not chosen:
        log.warning("%s: no signature artifact matches the image; it is imported unsigned", source.reference)
        return None
    first = chosen[0]
    data = first.objects[first.subject]
    named = fmt.decode_image(data) if first.kind == "image" else fmt.decode_fileset(data)
    if options.names_given and (named.name, named.version) != (options.name, options.version):
        log.warning("%s: its signatures are for %s@%s; imported unsigned as %s@%s (--name/--version)",
                    source.reference, named.name, named.version, options.name, options.version)
        return None
    restored = restore(store, chosen, check=options.check)
    log.info("%s: restored %s@%s (%s) with %d signature(s)", source.reference, restored.name, restored.version,
             fmt.format_digest(restored.digest), len(restored.signatures))
    return restored


def _import_layer(store: Store, source: ImageSource, desc: Any, diff_id: str, compression: str, label: str,
                  pool: concurrent.futures.Executor, abort: threading.Event,
                  on_progress: Callable[[int], None] | None, level: int | None = None) -> _RawLayer:
    try:
        stream = source.open_blob(desc)
    except CnpsfsError as exc:
        raise ImportRejected(f"{label}: {exc}") from None
    reader: ReadAhead | None = None
    try:
        raw = HashingReader(stream, label, algorithm=desc.digest.partition(":")[0], limit=desc.size,
                            on_bytes=on_progress, abort=abort)
        raw_buffered = io.BufferedReader(raw, 1 << 20)
        plain = HashingReader(decompressor(raw_buffered, compression, label), label,
                              algorithm=diff_id.partition(":")[0])

        def drain_raw() -> None:
            # A decompressor may stop at its last frame: the blob digest covers every byte.
            while raw_buffered.read(1 << 20):
                pass

        # Hashing and decompression run on the read-ahead's thread, the tar on this one.
        reader = ReadAhead(plain, label, epilogue=drain_raw)
        tar_stream = io.BufferedReader(reader, 1 << 20)
        inner = sniff_compression(tar_stream.peek(6)[:6])
        if inner:
            said = f"{compression}-compressed" if compression else "uncompressed"
            raise ImportRejected(f"{label}: the media type says {said} tar ({desc.media_type}), "
                                 f"but the data inside is {inner}-compressed")

        def finish() -> None:
            # The tar ends at its end-of-archive blocks; the digests cover everything. The
            # read-ahead reports the end only after its thread hashed the last byte.
            while tar_stream.read(1 << 20):
                pass
            if raw.count != desc.size:
                raise ImportRejected(f"{label}: truncated: {raw.count} of the {desc.size} bytes the manifest gives")
            if raw.digest() != desc.digest:
                raise ImportRejected(f"{label}: digest mismatch: the blob hashes to {raw.digest()}, "
                                     f"the manifest says {desc.digest}")
            if plain.digest() != diff_id:
                raise ImportRejected(f"{label}: diff_id mismatch: the uncompressed layer hashes to "
                                     f"{plain.digest()}, the config says {diff_id}")

        options = ImportOptions(name=LAYER_NAME, version=diff_id, metadata={"oci.diff_id": diff_id}, tag=False,
                                compression_level=level)
        seen: list[TarImporter] = []

        class Importer(TarImporter):
            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                seen.append(self)

        result = import_tar_stream(store, tar_stream, options, label, importer_class=Importer, pool=pool,
                                   finish=finish)
        implicit = [parts for parts, node in seen[0].builder.walk()
                    if node.implicit and node.entry.kind is fmt.Kind.DIR]
        log.info("%s: %d entries, %d bytes new", label, result.entries, result.new_bytes)
        return _RawLayer(result.digest, implicit, result.new_bytes)
    finally:
        if reader is not None:
            reader.close()
        stream.close()


def _settle(store: Store, raw: _RawLayer, below: list[bytes], diff_id: str, chain_id: str) -> bytes:
    """The layer's FileSet with its undescribed directories as the layers below have them."""
    if not below or not raw.implicit:
        return raw.fileset
    lower = compose(store, fmt.Image("layer.oci/below", "1", fmt.CompositionMode.LAYERS, [fmt.Layer(d) for d in below]))
    changes: dict[tuple[bytes, ...], fmt.Entry] = {}
    for parts in raw.implicit:
        try:
            node = lower.resolve(b"/" + b"/".join(parts))
        except CnpsfsError:
            continue  # new in this layer: it keeps the importer's defaults
        if node.is_dir:
            changes[parts] = node.entry
    if not changes:
        return raw.fileset
    fileset = store.get_fileset(raw.fileset)
    with store.writer() as writer:
        root = _with_dir_metadata(store, writer, fileset.root, (), changes)
        metadata = dict(fileset.metadata, **{"oci.chain_id": chain_id})
        digest = writer.add_object(fmt.encode_fileset(fmt.FileSet(fileset.name, fileset.version, root, metadata)))
        writer.commit()
    return digest


def _with_dir_metadata(store: Store, writer: Any, entry: fmt.Entry, parts: tuple[bytes, ...],
                       changes: dict[tuple[bytes, ...], fmt.Entry]) -> fmt.Entry:
    """*entry* with the metadata of *changes* applied at and below it (directory objects rewritten)."""
    new = dataclasses.replace(entry, xattrs=dict(entry.xattrs))
    source = changes.get(parts)
    if source is not None:
        new.mode, new.uid, new.gid, new.mtime_ns = source.mode, source.uid, source.gid, source.mtime_ns
        new.xattrs = dict(source.xattrs)
    below = {p[len(parts)] for p in changes if len(p) > len(parts) and p[: len(parts)] == parts}
    if below and entry.tree is not None:
        directory = store.get_directory(entry.tree)
        children = [_with_dir_metadata(store, writer, child, (*parts, child.name), changes)
                    if child.name in below and child.kind is fmt.Kind.DIR else child
                    for child in directory.entries]
        new.tree = writer.add_object(fmt.encode_directory(fmt.Directory(children, directory.opaque)))
    return new


def build_image(name: str, version: str, reference: str, manifest: Manifest, manifest_digest: str,
                index_digest: str | None, config: ImageConfig, layers: list[LayerResult]) -> fmt.Image:
    """The image object: run config where runtimes read it, everything else as provenance."""
    for number, layer in enumerate(layers, 1):
        layer.number = number
    run: dict[str, Any] = {}
    if config.entrypoint:
        run["entrypoint"] = config.entrypoint
    if config.cmd:
        run["cmd"] = config.cmd
    if config.env:
        run["env"] = config.env
    for key, value in (("workdir", config.workdir), ("user", config.user), ("stop_signal", config.stop_signal)):
        if value:
            run[key] = value
    if config.labels:
        run["labels"] = config.labels
    oci: dict[str, Any] = {
        "source": reference,
        "manifest_digest": manifest_digest,
        "manifest_media_type": manifest.media_type,
        "config_digest": manifest.config.digest,
        "config_media_type": manifest.config.media_type,
        "platform": str(config.platform),
        "layers": [{"digest": layer.digest, "media_type": layer.media_type, "size": layer.size,
                    "diff_id": layer.diff_id, "chain_id": layer.chain_id, "fileset": fmt.format_digest(layer.fileset)}
                   for layer in layers],
    }
    if index_digest:
        oci["index_digest"] = index_digest
    extra: tuple[tuple[str, Any], ...] = (
        ("exposed_ports", config.exposed_ports), ("volumes", config.volumes), ("created", config.created),
        ("author", config.author), ("history", config.history))
    for key, value in extra:
        if value:
            oci[key] = value
    image_layers = [fmt.Layer(layer.fileset, "/", False, False, short(layer.digest)) for layer in layers]
    return fmt.Image(name, version, fmt.CompositionMode.LAYERS, image_layers, run, {"oci": oci})


def provenance_lines(metadata: dict[str, Any]) -> list[str]:
    """What ``cnpsfs inspect`` prints for an imported image: where each piece came from."""
    oci = metadata.get("oci")
    if not isinstance(oci, dict) or "source" not in oci:
        return []
    lines = [f"source   {oci['source']}"]
    if oci.get("index_digest"):
        lines.append(f"index    {oci['index_digest']}")
    lines.append(f"manifest {oci.get('manifest_digest')}  ({oci.get('manifest_media_type')})")
    lines.append(f"config   {oci.get('config_digest')}")
    lines.append(f"platform {oci.get('platform')}")
    lines.append("oci layers (blob digest -> FileSet)")
    for number, layer in enumerate(oci.get("layers") or [], 1):
        if isinstance(layer, dict):
            lines.append(f"  {number:>3}. {layer.get('digest')} -> {layer.get('fileset')}")
            lines.append(f"       diff_id {layer.get('diff_id')}, {layer.get('size')} bytes, {layer.get('media_type')}")
    return lines
