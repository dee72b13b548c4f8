"""cnpsfs benchmark: build the corpus, install the peers, measure, print tables, write JSON.

Run as root through ``scripts/bench``; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .build_section import build_table, run_build
from .cnpsfs_cli import CnpsfsCli
from .common import BenchError, du_bytes, exclusive_work_dir, median, require_root, umount_all_under
from .corpus import DEFAULT_CACHE, Corpus, ensure_corpus
from .import_section import run_import
from .mount_section import MEASURES, run_mount
from .oci_section import oci_table, run_oci
from .remote_section import remote_table, run_remote
from .report import consistency_notes, import_table, mount_table, requests_table, write_json
from .scale_section import run_scale, scale_table
from .swap_section import run_swap, swap_table
from .trust_section import run_trust, trust_summary, trust_table

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("import", "mount", "swap", "build", "scale", "oci", "trust", "remote")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    p.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated sections ({', '.join(SECTIONS)})"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions per measure; medians are reported")
    p.add_argument("--systems", help="comma-separated system names to run (native always runs in mount)")
    p.add_argument("--measures", help="mount measures to run: " + ",".join(m.key for m in MEASURES))
    p.add_argument("--out", type=Path, default=Path("/var/tmp/cnpsfs-bench/results"), help="results dir")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="corpus cache dir")
    p.add_argument("--work", type=Path, default=Path("/var/tmp/cnpsfs-bench/work"), help="scratch dir")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    if args.quick:
        args.reps = 1
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def _split(value: str | None) -> set[str] | None:
    return {v.strip() for v in value.split(",") if v.strip()} if value else None


def _git_rev() -> str:
    """HEAD plus a marker when src/ has uncommitted or untracked changes: the code measured is not HEAD."""
    rev = (
        subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        or "unknown"
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{rev}+uncommitted-src" if dirty else rev


def _loadavg() -> float:
    """1-minute load: other work on a 2-core box skews timings, so every run records it."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine_info() -> dict[str, Any]:
    meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "unknown",
    )
    os_release = dict(
        ln.split("=", 1) for ln in Path("/etc/os-release").read_text().splitlines() if "=" in ln
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "mem_total_kib": int(meminfo[1]),
        "os": os_release.get("PRETTY_NAME", "").strip('"'),
    }


def corpus_info(corpus: Corpus) -> dict[str, Any]:
    info: dict[str, Any] = {"mirror": corpus.mirror}
    for name, tree in (("v1", corpus.v1), ("v2", corpus.v2)):
        # Counted like `find TREE | wc -l`: the root plus every entry below it.
        entries = 1 + sum(len(d) + len(f) for _p, d, f in os.walk(tree))
        apparent, blocks = du_bytes([tree])
        info[name] = {
            "path": str(tree),
            "entries": entries,
            "apparent_bytes": apparent,
            "block_bytes": blocks,
        }
    return info


def _reps_text(args: argparse.Namespace) -> str:
    """Repetitions as run: swap and scale take at least 5 whatever --reps says (not with --quick)."""
    text = f"{args.reps} rep(s)"
    floored = [name for name in ("swap", "scale", "trust") if name in args.sections]
    if floored and args.reps < 5 and not args.quick:
        text += f" ({' and '.join(floored)}: 5)"
    return text


def _run_sections(args: argparse.Namespace, started: float) -> tuple[list[str], dict[str, Any]]:
    """Every requested section, in order: the markdown lines and the run's metadata."""
    umount_all_under(args.work)  # leftovers of an interrupted run
    # The swap section builds its own synthetic image: no Debian corpus needed for it alone.
    corpus = ensure_corpus(args.cache) if {"import", "mount", "oci", "remote"} & set(args.sections) else None
    cli = CnpsfsCli(REPO)
    systems = _split(args.systems)
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": _git_rev(),
        "reps": args.reps,
        "sections": args.sections,
        "machine": machine_info(),
        "corpus": corpus_info(corpus) if corpus is not None else None,
        "loadavg_start": _loadavg(),
    }
    sections: dict[str, Any] = {}
    out: list[str] = []
    if "import" in args.sections:
        assert corpus is not None
        rows = run_import(corpus, args.work, args.reps, cli, systems)
        sections["import"] = {
            "rows": rows,
            "summary": {r.name: r.summary() for r in rows if not r.skipped},
        }
        out += ["## import", "", import_table(rows), ""]
    if "mount" in args.sections:
        assert corpus is not None
        results, notes = run_mount(corpus, args.work, args.reps, cli, systems, _split(args.measures))
        sections["mount"] = {"peers": results, "notes": notes}
        for mode in ("cold", "warm"):
            out += [f"## mount ({mode})", "", mount_table(results, mode), ""]
        if table := requests_table(results):
            out += ["## cnpsfs FUSE requests per measure", "", table, ""]
        out += [f"- differs from native: {n}" for n in consistency_notes(results)]
        out += [f"- {res.label}: mount time before {key} (cold), median {median(times) * 1000:.0f} ms of "
                f"{len(times)}" for res in results for key, times in res.notes.get("profiled_mount_s", {}).items()]
    if "swap" in args.sections:
        swaps, swap_info = run_swap(args.work, max(args.reps, 5) if not args.quick else 1, cli)
        sections["swap"] = {"results": swaps, "info": swap_info,
                            "summary": {f"{r.mode}/{r.change}": r.summary() for r in swaps}}
        out += ["## swap (live upgrade latency)", "", swap_table(swaps, swap_info), ""]
    if "build" in args.sections:
        built = run_build(args.work, args.cache, args.reps, cli, systems)
        sections["build"] = {"results": built, "summary": built.summary()}
        out += ["## build (images from ~100 Debian packages)", "", build_table(built), ""]
    if "scale" in args.sections:
        scaled, scale_info = run_scale(args.cache, args.work, max(args.reps, 5) if not args.quick else 1, cli,
                                       systems)
        sections["scale"] = {"results": scaled, "info": scale_info,
                             "summary": {r.name: r.summary() for r in scaled}}
        out += ["## scale (mount and first lookups: 1,000 against 1,000,000 files)", "",
                scale_table(scaled, scale_info), ""]
    if "oci" in args.sections:
        assert corpus is not None
        oci_rows, oci_info = run_oci(corpus, args.cache, args.work, args.reps, cli, systems)
        sections["oci"] = {"rows": oci_rows, "info": oci_info,
                           "summary": {r.name: r.summary() for r in oci_rows if not r.skipped}}
        out += ["## oci (three images pulled from a local registry)", "", oci_table(oci_rows, oci_info), ""]
    if "trust" in args.sections:
        trusted = run_trust(args.work, args.cache, max(args.reps, 5) if not args.quick else 1, cli)
        sections["trust"] = trust_summary(trusted)
        out += ["## trust (signature and provenance checks)", "", trust_table(trusted), ""]
    if "remote" in args.sections:
        assert corpus is not None
        remote_rows, remote_info = run_remote(corpus, args.cache, args.work, args.reps, cli, systems)
        sections["remote"] = {"rows": remote_rows, "info": remote_info,
                              "summary": {r.name: r.summary() for r in remote_rows if not r.skipped}}
        out += ["## remote (lazy mounts from a registry and nginx, at 0 and 20 ms RTT)", "",
                remote_table(remote_rows, remote_info), ""]
    meta["elapsed_seconds"] = round(time.monotonic() - started, 1)
    meta["loadavg_end"] = _loadavg()
    result_file = args.out / "bench-results.json"
    write_json(result_file, meta, sections)
    return out, meta


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    started = time.monotonic()
    try:
        require_root()
        with exclusive_work_dir(args.work):
            out, meta = _run_sections(args, started)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print("\n".join(out).rstrip())
    print(
        f"\n_{_reps_text(args)}, {meta['elapsed_seconds']:.0f} s, git {meta['git']}, "
        f"load average {meta['loadavg_start']:.2f} at start / {meta['loadavg_end']:.2f} at end, "
        f"raw numbers: {args.out / 'bench-results.json'}_"
    )
    if max(meta["loadavg_start"], meta["loadavg_end"]) > 0.5 * (os.cpu_count() or 1):
        print("_warning: the machine was busy with other work; sub-100 ms timings are noise-dominated_")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
