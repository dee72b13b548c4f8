"""Section ``remote``: images from a registry and a web server, lazily (issue 12).

The corpus's v2 (bookworm minbase + python3 + perl; v1 is the minbase alone) is put on
three servers on 127.0.0.1, each once per run:

- **cnpsfs**: v1 and v2 imported as FileSets and images, pushed to a docker-registry
  (``docker://…/bench/cnpsfs``) and to a ``file://`` directory served by nginx with the
  cache headers of docs/remote.md;
- **OCI**: the oci section's images (``base`` = v1 as one layer, ``app`` = base + the layer
  that makes it v2), pushed to the same registry;
- **casync**: ``casync make`` indexes of v1 and v2 into one chunk store, served by the same
  nginx (casync's HTTP store).

Every client request goes through a latency proxy of this module (this kernel has no
netem): 0 ms or 20 ms added to each request, i.e. a round trip per request. Caches are
dropped before each measure, every client starts from an empty store or directory.

1. **first python run**: time from nothing local to the end of the first
   ``chroot ROOT python3 -c 'import json, email, http.client, asyncio'``: cnpsfs lazy mount
   (from the registry; from nginx) against pull-and-extract (``skopeo copy`` of ``app`` to
   an OCI layout + ``umoci unpack``) and ``casync mount`` of v2 from nginx; with the bytes
   each fetched (the proxy counts them) against the image's size.
2. **v2 after v1**: bytes transferred to get v2 when v1 is already there: ``cnpsfs pull``
   (v1 pulled first), ``skopeo copy`` of ``app`` into a layout holding ``base``, and
   ``casync extract`` of v2 with the v1 tree as seed.
3. **parallel readers** (20 ms): a lazy mount, one large file read alone, then eight other
   large files read at once: their throughput against the single reader's.

Targets (issue 12): first python run at 20 ms at most 0.2× of pull-and-extract; bytes
fetched at most 10 % of the image; v2 after v1 at most 28 MB; eight readers at least 4× a
single reader's throughput.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .cnpsfs_cli import CnpsfsCli
from .common import CHROOT_ENV, BenchError, drop_caches, du_bytes, ensure_packages, median, rmtree, run, umount
from .corpus import Corpus
from .oci_section import Registry, build_images

log = logging.getLogger(__name__)

RTTS = (0.0, 0.020)
PYTHON = "import json, email, http.client, asyncio"
NAME = "bench.example/rootfs"
IMAGE = "bench.example/remote"
SYSTEMS = ("cnpsfs-registry", "cnpsfs-nginx", "cnpsfs-nginx-profile", "skopeo+umoci", "casync")
LABELS = {"cnpsfs-registry": "cnpsfs mount --remote docker:// (lazy)",
          "cnpsfs-nginx": "cnpsfs mount --remote http:// (nginx, lazy)",
          "cnpsfs-nginx-profile": "the same with the image's prefetch profile",
          "skopeo+umoci": "skopeo copy + umoci unpack (pull and extract)",
          "casync": "casync mount (nginx)"}
NGINX_CONF = """
daemon off;
master_process on;
worker_processes 2;
user root root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 60;
    client_body_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location /cnpsfs/blobs/ {{ add_header Cache-Control "public, max-age=31536000, immutable"; }}
        location /cnpsfs/tags/ {{ add_header Cache-Control "public, max-age=10"; }}
    }}
}}
"""


# --------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{what} did not listen within 30 s") from None
            time.sleep(0.05)


class Nginx:
    """nginx serving *root* on a free port (the remote and casync's store live under it)."""

    def __init__(self, root: Path, prefix: Path) -> None:
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "tmp").mkdir(exist_ok=True)
        self.port = _free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=self.port, root=root))
        self.log = open(prefix / "stderr.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        _wait_port(self.port, self.proc, "nginx")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()



class ListeningServer(ThreadingHTTPServer):
    """A threaded server with a listen backlog of a real server's size: the standard 5 drops
    the SYNs of a client opening a dozen connections at once, which then wait 1 s to retry."""

    request_queue_size = 128


class LatencyProxy:
    """A reverse proxy adding *rtt* seconds to every request and counting the bytes it returns.

    Threaded and streaming (64 KiB pieces), HTTP/1.1 keep-alive both ways: a request costs
    one added round trip, as it would on a real network with warm connections.
    """

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rtt = 0.0
        self.bytes = 0
        self.requests = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # As nginx and the registry do: without it each small response's body waits
                # behind its headers for the client's delayed ACK (Nagle, up to 40 ms).
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:
                proxy._handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self._server = ListeningServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self.url = f"http://{self.host}"
        self._local = threading.local()
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def reset(self, rtt: float) -> None:
        with self._lock:
            self.rtt, self.bytes, self.requests = rtt, 0, 0

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(*self.upstream, timeout=300)
        return conn

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests += 1
            rtt = self.rtt
        if rtt:
            time.sleep(rtt)
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else None
        # Repeated headers (skopeo sends one Accept per media type) must all go through.
        headers = [(k, v) for k, v in req.headers.items() if k.lower() not in ("connection", "keep-alive")]
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.putrequest(req.command, req.path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                conn.endheaders(body)
                resp = conn.getresponse()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt:
                    req.close_connection = True
                    return
        req.send_response(resp.status)
        chunked = resp.getheader("Content-Length") is None and req.command != "HEAD"
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                req.send_header(k, v)
        if chunked:
            data = resp.read()
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            req.wfile.write(data)
            sent = len(data)
        else:
            req.end_headers()
            sent = 0
            while req.command != "HEAD" and (piece := resp.read(65536)):
                req.wfile.write(piece)
                sent += len(piece)
        with self._lock:
            self.bytes += sent

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------- results


@dataclass
class RemoteRow:
    name: str
    label: str
    skipped: str | None = None
    first_run: dict[float, list[float]] = field(default_factory=lambda: {r: [] for r in RTTS})
    fetched: dict[float, list[int]] = field(default_factory=lambda: {r: [] for r in RTTS})
    v2_after_v1: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for rtt in RTTS:
            if self.first_run[rtt]:
                out[f"first_run_{int(rtt * 1000)}ms_seconds"] = median(self.first_run[rtt])
                out[f"fetched_{int(rtt * 1000)}ms_bytes"] = median(self.fetched[rtt])
        if self.v2_after_v1:
            out["v2_after_v1_bytes"] = median(self.v2_after_v1)
        return out


@dataclass
class Setup:
    proxy_nginx: LatencyProxy
    proxy_registry: LatencyProxy
    registry: Registry
    nginx: Nginx
    store: Path
    image_bytes: int  # what the v2 image is on the remote (its blobs)
    oci_bytes: int  # the app image's layers
    casync_bytes: int  # casync's store, chunks of v1 and v2
    info: dict[str, Any] = field(default_factory=dict)


def _python(root: Path) -> None:
    run(["chroot", root, "python3", "-c", PYTHON], env=CHROOT_ENV, timeout=600)


def prepare(corpus: Corpus, cache: Path, work: Path, cli: CnpsfsCli) -> Setup:
    """Source store, pushes, OCI images and casync indexes: everything the clients fetch from."""
    store = work / "source"
    rmtree(store)
    for version, tree in (("1", corpus.v1), ("2", corpus.v2)):
        run([cli.exe, "--store", store, "import", "dir", tree, "--name", NAME, "--version", version], timeout=3600)
        manifest = work / f"image{version}.toml"
        manifest.write_text(f'name = "{IMAGE}"\nversion = "{version}"\n[[layers]]\nfileset = "{NAME}@{version}"\n')
        run([cli.exe, "--store", store, "image", "create", manifest])
    # A prefetch profile of the measured command, recorded on a local mount of v2: pushes
    # carry it, and the profile row's lazy mounts replay it (the others pass --no-prefetch).
    mnt = work / "profile-mnt"
    mnt.mkdir(exist_ok=True)
    run([cli.exe, "--store", store, "mount", "--no-prefetch", f"{IMAGE}@2", mnt], timeout=600)
    try:
        run([cli.exe, "--store", store, "profile", "record", mnt, "--", "chroot", mnt, "python3", "-c", PYTHON],
            env={**os.environ, **CHROOT_ENV}, timeout=600)
    finally:
        cli.detach(mnt)
    www = work / "www"
    rmtree(www)
    (www / "casync").mkdir(parents=True)
    registry = Registry(Path(tempfile.mkdtemp(prefix="registry-", dir=work)))
    nginx = Nginx(www, work / "nginx")
    for version in ("1", "2"):
        run([cli.exe, "--store", store, "push", f"{IMAGE}@{version}", f"file://{www}/cnpsfs"], timeout=3600)
        run([cli.exe, "--store", store, "push", f"{IMAGE}@{version}", f"docker://{registry.host}/bench/cnpsfs"],
            timeout=3600)
    layout = build_images(corpus, cache)
    for image in ("base", "app"):
        run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:{image}",
             f"docker://{registry.host}/bench/{image}:1"], timeout=3600)
    for version, tree in (("v1", corpus.v1), ("v2", corpus.v2)):
        run(["casync", "make", f"--store={www / 'casync' / 'store.castr'}", www / "casync" / f"{version}.caidx", tree],
            timeout=3600)
    # The image's size on the remote: its manifest's config and layers (the blobs it reaches).
    tag = IMAGE.replace("/", "_s") + "_a2"
    manifest = json.loads((www / "cnpsfs" / "tags" / tag).read_text())
    image_bytes = manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    app = json.loads(run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.host}/bench/app:1"], capture=True).stdout)
    oci_bytes = sum(layer["size"] for layer in app["layers"])
    return Setup(LatencyProxy(nginx.url), LatencyProxy(f"http://{registry.host}"), registry, nginx, store,
                 image_bytes, oci_bytes, du_bytes([www / "casync" / "store.castr"])[1],
                 {"image_bytes": image_bytes, "oci_app_layer_bytes": oci_bytes,
                  "v2_tree_bytes": du_bytes([corpus.v2])[0]})


# --------------------------------------------------------------------------- measures


def _fresh(path: Path) -> Path:
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
    path.mkdir(parents=True)
    return path


def _casync_mount(store_url: str, index_url: str, mnt: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["casync", "mount", f"--store={store_url}", index_url, str(mnt)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not os.path.ismount(mnt):
        if proc.poll() is not None:
            raise BenchError(f"casync mount exited {proc.returncode}: {proc.stderr.read().decode()[-300:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise BenchError("casync mount did not mount within 120 s")
        time.sleep(0.02)
    return proc


def first_run(system: str, setup: Setup, rtt: float, work: Path, cli: CnpsfsCli) -> tuple[float, int]:
    """Seconds from nothing local to the end of the first python run, and bytes fetched."""
    top = _fresh(work / "client")
    proxy = setup.proxy_registry if system in ("cnpsfs-registry", "skopeo+umoci") else setup.proxy_nginx
    drop_caches()
    proxy.reset(rtt)
    mnt = top / "mnt"
    mnt.mkdir()
    start = time.perf_counter()
    try:
        if system.startswith("cnpsfs"):
            remote = f"docker://{proxy.host}/bench/cnpsfs" if system == "cnpsfs-registry" else f"{proxy.url}/cnpsfs"
            prefetch = [] if system == "cnpsfs-nginx-profile" else ["--no-prefetch"]
            run([cli.exe, "--store", top / "store", "mount", *prefetch, "--remote", remote, f"{IMAGE}@2", mnt],
                timeout=600)
            _python(mnt)
        elif system == "skopeo+umoci":
            run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{proxy.host}/bench/app:1",
                 f"oci:{top / 'layout'}:app"], timeout=3600)
            run(["umoci", "unpack", "--image", f"{top / 'layout'}:app", top / "bundle"], timeout=3600)
            _python(top / "bundle" / "rootfs")
        elif system == "casync":
            proc = _casync_mount(f"{proxy.url}/casync/store.castr", f"{proxy.url}/casync/v2.caidx", mnt)
            try:
                _python(mnt)
            finally:
                umount(mnt)
                proc.wait(30)
        else:
            raise ValueError(system)
        return time.perf_counter() - start, proxy.bytes
    finally:
        if system.startswith("cnpsfs"):
            cli.detach(mnt)
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


def v2_after_v1(system: str, setup: Setup, work: Path, cli: CnpsfsCli) -> int:
    """Bytes fetched to have v2 when v1 is already there (nothing else local)."""
    top = _fresh(work / "client")
    try:
        if system.startswith("cnpsfs"):
            proxy = setup.proxy_registry if system == "cnpsfs-registry" else setup.proxy_nginx
            remote = f"docker://{proxy.host}/bench/cnpsfs" if system == "cnpsfs-registry" else f"{proxy.url}/cnpsfs"
            run([cli.exe, "--store", top / "store", "pull", f"{IMAGE}@1", remote], timeout=3600)
            proxy.reset(0.0)
            run([cli.exe, "--store", top / "store", "pull", f"{IMAGE}@2", remote], timeout=3600)
            return setup.proxy_registry.bytes if system == "cnpsfs-registry" else setup.proxy_nginx.bytes
        if system == "skopeo+umoci":
            proxy = setup.proxy_registry
            run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{proxy.host}/bench/base:1",
                 f"oci:{top / 'layout'}:base"], timeout=3600)
            proxy.reset(0.0)
            run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{proxy.host}/bench/app:1",
                 f"oci:{top / 'layout'}:app"], timeout=3600)
            return proxy.bytes
        if system == "casync":
            proxy = setup.proxy_nginx
            seed = setup.info["v1_tree"]
            proxy.reset(0.0)
            run(["casync", "extract", f"--seed={seed}", f"--store={proxy.url}/casync/store.castr",
                 f"{proxy.url}/casync/v2.caidx", top / "v2"], timeout=3600)
            return proxy.bytes
        raise ValueError(system)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


def parallel_readers(setup: Setup, corpus: Corpus, work: Path, cli: CnpsfsCli, rtt: float = 0.020) -> dict[str, float]:
    """One large file alone, then eight others at once, over a lazy mount at *rtt*: MB/s each way."""
    files = sorted((p for p in (corpus.v2 / "usr").rglob("*") if p.is_file() and not p.is_symlink()),
                   key=lambda p: p.stat().st_size, reverse=True)
    seen: set[tuple[int, int]] = set()
    distinct = []
    for path in files:  # distinct contents (hard links and copies would share chunks)
        key = (path.stat().st_size, hash(path.read_bytes()[:4096]))
        if key not in seen:
            seen.add(key)
            distinct.append(path)
        if len(distinct) == 9:
            break
    top = _fresh(work / "client")
    mnt = top / "mnt"
    mnt.mkdir()
    try:
        drop_caches()
        run([cli.exe, "--store", top / "store", "mount", "--no-prefetch", "--remote", f"{setup.proxy_nginx.url}/cnpsfs",
             f"{IMAGE}@2", mnt], timeout=600)
        setup.proxy_nginx.reset(rtt)
        rel = [p.relative_to(corpus.v2) for p in distinct]
        start = time.perf_counter()
        single = len((mnt / rel[0]).read_bytes())
        single_rate = single / (time.perf_counter() - start)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            total = sum(pool.map(lambda r: len((mnt / r).read_bytes()), rel[1:]))
        parallel_rate = total / (time.perf_counter() - start)
        return {"single_mb_s": single_rate / 1e6, "parallel_mb_s": parallel_rate / 1e6,
                "ratio": parallel_rate / single_rate, "single_bytes": single, "parallel_bytes": total}
    finally:
        cli.detach(mnt)
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=False)


def _unavailable(system: str, cli: CnpsfsCli) -> str | None:
    if system.startswith("cnpsfs"):
        return cli.mount_unavailable() or cli._missing("push") or cli._missing("pull")
    for tool in {"skopeo+umoci": ("skopeo", "umoci"), "casync": ("casync",)}[system]:
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None


def run_remote(corpus: Corpus, cache: Path, work: Path, reps: int, cli: CnpsfsCli,
               systems: set[str] | None) -> tuple[list[RemoteRow], dict[str, Any]]:
    ensure_packages({"umoci": "umoci", "skopeo": "skopeo", "docker-registry": "docker-registry",
                     "rsync": "rsync", "casync": "casync", "nginx": "nginx-light"})
    base = work / "remote"
    rmtree(base)
    base.mkdir(parents=True)
    rows = {s: RemoteRow(s, LABELS[s]) for s in SYSTEMS if systems is None or s in systems}
    for row in rows.values():
        row.skipped = _unavailable(row.name, cli)
    missing = _unavailable("cnpsfs-nginx", cli)
    if missing:
        raise BenchError(f"remote section: {missing}")
    setup = prepare(corpus, cache, base, cli)
    setup.info["v1_tree"] = str(corpus.v1)
    info: dict[str, Any] = dict(setup.info)
    try:
        for rep in range(reps):
            for rtt in RTTS:
                for row in rows.values():  # systems alternate, so on a shared machine they see the same load
                    if row.skipped:
                        continue
                    log.info("remote: %s first run at %d ms, rep %d/%d", row.name, rtt * 1000, rep + 1, reps)
                    try:
                        seconds, fetched = first_run(row.name, setup, rtt, base, cli)
                    except BenchError as exc:
                        row.skipped = f"failed: {exc}"
                        log.warning("remote: %s failed: %s", row.name, exc)
                        continue
                    row.first_run[rtt].append(seconds)
                    row.fetched[rtt].append(fetched)
            for row in rows.values():
                if not row.skipped and row.name != "cnpsfs-nginx-profile":  # the same pull as cnpsfs-nginx
                    row.v2_after_v1.append(v2_after_v1(row.name, setup, base, cli))
        info["parallel"] = parallel_readers(setup, corpus, base, cli)
    finally:
        setup.proxy_nginx.close()
        setup.proxy_registry.close()
        setup.nginx.stop()
        setup.registry.stop()
        shutil.rmtree(base, ignore_errors=True)
    return list(rows.values()), info


def remote_table(rows: list[RemoteRow], info: dict[str, Any]) -> str:
    from .report import fmt_bytes, fmt_seconds

    lines = ["| system | first python, 0 ms | 20 ms RTT | fetched (20 ms) | v2 after v1 |", "|---|---|---|---|---|"]
    summaries = {r.name: r.summary() for r in rows if not r.skipped}
    for row in rows:
        if row.skipped:
            lines.append(f"| {row.label} | n/a ({row.skipped}) | | | |")
            continue
        s = summaries[row.name]
        lines.append(f"| {row.label} | {fmt_seconds(s.get('first_run_0ms_seconds', 0))} | "
                     f"{fmt_seconds(s.get('first_run_20ms_seconds', 0))} | "
                     f"{fmt_bytes(s.get('fetched_20ms_bytes', 0))} | "
                     f"{fmt_bytes(s['v2_after_v1_bytes']) if 'v2_after_v1_bytes' in s else '(as above)'} |")
    notes = []
    pull = summaries.get("skopeo+umoci", {}).get("first_run_20ms_seconds")
    for name in ("cnpsfs-registry", "cnpsfs-nginx", "cnpsfs-nginx-profile"):
        s = summaries.get(name)
        if s and pull:
            notes.append(f"{LABELS[name]}: first python run at 20 ms {s['first_run_20ms_seconds'] / pull:.2f}× of "
                         "pull-and-extract (target ≤ 0.2×)")
        if s and info.get("image_bytes"):
            after = ""
            if "v2_after_v1_bytes" in s:
                after = f"; v2 after v1 {fmt_bytes(s['v2_after_v1_bytes'])} (target ≤ 28 MB)"
            notes.append(f"{LABELS[name]}: fetched {s['fetched_20ms_bytes'] / info['image_bytes'] * 100:.1f} % of the "
                         f"{fmt_bytes(info['image_bytes'])} image (target ≤ 10 %){after}")
    parallel = info.get("parallel")
    if parallel:
        notes.append(f"8 parallel readers at 20 ms: {parallel['parallel_mb_s']:.0f} MB/s against one reader's "
                     f"{parallel['single_mb_s']:.0f} MB/s: {parallel['ratio']:.1f}× (target ≥ 4×)")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])
