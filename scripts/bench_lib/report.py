"""Markdown tables for humans and a JSON file with every raw sample for later analysis."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .common import median
from .import_section import ImportRow
from .mount_section import MEASURES, Measure, PeerResult


def fmt_seconds(secs: float) -> str:
    if secs < 0.01:
        return f"{secs * 1000:.2f} ms"
    if secs < 1:
        return f"{secs * 1000:.0f} ms"
    return f"{secs:.2f} s"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def fmt_value(measure: Measure, value: float) -> str:
    if measure.unit == "s":
        return fmt_seconds(value)
    if measure.unit == "MB/s":
        return f"{value:.0f} MB/s"
    return f"{value:.2f} {measure.unit}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join([_row(header), "|" + "|".join("---" for _ in header) + "|", *map(_row, rows)])


def import_table(rows: list[ImportRow]) -> str:
    header = [
        "system",
        "v2 alone: time / stored",
        "v1+v2 one output: time / stored",
        "v2 after v1: time / added",
    ]
    body: list[list[str]] = []
    for row in rows:
        if row.skipped:
            body.append([row.label, f"n/a ({row.skipped})", "", ""])
            continue
        s = row.summary()
        body.append(
            [
                row.label,
                f"{fmt_seconds(s['v2_seconds'])} / {fmt_bytes(s['v2_bytes'])}",
                f"{fmt_seconds(s['pair_seconds'])} / {fmt_bytes(s['pair_bytes'])}",
                f"{fmt_seconds(s['increment_seconds'])} / {fmt_bytes(s['increment_bytes'])}",
            ]
        )
    return _table(header, body)


def ratio(measure: Measure, value: float, native: float | None) -> str:
    """Cost relative to native: >1 is always worse, whichever direction the unit runs."""
    if native is None or native <= 0 or value <= 0:
        return ""
    r = native / value if measure.higher_is_better else value / native
    return f" ({r:.2f}×)"


def mount_table(results: list[PeerResult], mode: str) -> str:
    measures = [m for m in MEASURES if any(m.key in r.samples[mode] or m.key in r.errors for r in results)]
    native = next((r for r in results if r.name == "native"), None)
    header = ["system", *[f"{m.title} ({m.unit})" for m in measures]]
    body: list[list[str]] = []
    for res in results:
        if res.skipped:
            body.append([res.label, f"n/a ({res.skipped})", *[""] * (len(measures) - 1)])
            continue
        cells = [res.label]
        for m in measures:
            if m.key in res.errors:
                cells.append(f"n/a ({res.errors[m.key]})")
                continue
            values = res.samples[mode].get(m.key)
            if not values:
                cells.append("")
                continue
            base = native.samples[mode].get(m.key) if native and not native.skipped else None
            cells.append(
                fmt_value(m, median(values)) + ratio(m, median(values), median(base) if base else None)
            )
        body.append(cells)
    return _table(header, body)


def consistency_notes(results: list[PeerResult]) -> list[str]:
    """Peers must show the same tree: flag entry or byte counts that differ from native."""
    native = next((r for r in results if r.name == "native" and not r.skipped), None)
    if native is None:
        return []
    notes = []
    for res in results:
        for key, value in res.details.items():
            expected = native.details.get(key)
            if expected is not None and value != expected and key != "readers":
                notes.append(f"{res.label}: {key} = {value}, native = {expected}")
    return notes


def requests_table(results: list[PeerResult]) -> str | None:
    """FUSE requests per measure for peers that expose counters (cnpsfs status --json)."""
    lines: list[list[str]] = []
    for res in results:
        for mode in ("cold", "warm"):
            for key, counts in res.requests[mode].items():
                top = ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                lines.append([res.label, mode, key, str(sum(counts.values())), top])
    if not lines:
        return None
    return _table(["system", "mode", "measure", "requests", "per operation"], lines)


def write_json(path: Path, meta: dict[str, Any], sections: dict[str, Any]) -> None:
    def plain(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.asdict(obj)
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(type(obj).__name__)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, **sections}, indent=2, default=plain) + "\n")
    tmp.rename(path)
