#!/usr/bin/env python3
"""Compares TPC-H timings of several engines as one markdown table.

Reads JSON files in the format of `tpch run --output` (and of the peer
runners): arrays of {"query", "engine", "rows", "millis"}. One file may hold
several engines (`tpch run --engine both` writes quiver and datafusion). For
each query and engine it takes the median of the runs (the upper middle value,
as the Rust runner does) and prints one table with each engine's median and
its ratio to the baseline engine (engine time / baseline time, so above 1 means
slower than the baseline), plus a total row.

    python3 benchmarks/peers/compare.py sf1.json /tmp/peers/duckdb-sf1.json \
        /tmp/peers/spark-sf1.json --markdown /tmp/peers/sf1.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tpch_common import median

# Engines appear in this order; any other engine follows in order of appearance.
KNOWN_ENGINES = ("quiver", "datafusion", "duckdb", "spark")


def load(paths: list[Path]) -> dict[str, dict[int, dict]]:
    """engine -> query -> entry. A later file replaces an earlier one's entry."""
    engines: dict[str, dict[int, dict]] = {}
    for path in paths:
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            sys.exit(f"cannot read {path}: {error}")
        for entry in entries:
            by_query = engines.setdefault(entry["engine"], {})
            query = int(entry["query"])
            if query in by_query:
                print(f"warning: {path} repeats Q{query} for {entry['engine']}; using its entry",
                      file=sys.stderr)
            if not entry["millis"]:
                print(f"warning: {path}: Q{query} on {entry['engine']} has no timings; skipped",
                      file=sys.stderr)
                continue
            by_query[query] = entry
    return engines


def engine_order(engines: dict) -> list[str]:
    known = [name for name in KNOWN_ENGINES if name in engines]
    return known + [name for name in engines if name not in KNOWN_ENGINES]


def cell(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def build_table(engines: dict[str, dict[int, dict]], baseline: str) -> tuple[str, list[str]]:
    """The markdown table and notes about incomplete data or row differences."""
    order = engine_order(engines)
    others = [name for name in order if name != baseline]
    queries = sorted({q for by_query in engines.values() for q in by_query})
    medians = {name: {q: median(e["millis"]) for q, e in engines[name].items()} for name in order}

    header = ["query"] + [f"{name} (ms)" for name in order]
    header += [f"{name} / {baseline}" for name in others]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    for q in queries:
        row = [f"Q{q}"] + [cell(medians[name].get(q)) for name in order]
        row += [cell(ratio(medians[name].get(q), medians[baseline].get(q)), 2) for name in others]
        lines.append("| " + " | ".join(row) + " |")

    # Totals only over queries that every engine ran, so that they compare.
    common = [q for q in queries if all(q in medians[name] for name in order)]
    totals = {name: sum(medians[name][q] for q in common) for name in order}
    label = "total"
    if len(common) < len(queries):
        label = f"total ({len(common)} of {len(queries)} queries)"
    row = [f"**{label}**"] + [f"**{totals[name]:.1f}**" for name in order]
    row += [f"**{cell(ratio(totals[name], totals[baseline]), 2)}**" for name in others]
    lines.append("| " + " | ".join(row) + " |")

    notes = []
    for name in order:
        missing = [q for q in queries if q not in medians[name]]
        if missing:
            notes.append(f"{name} has no result for {', '.join(f'Q{q}' for q in missing)}")
    for q in queries:
        counts = {name: engines[name][q]["rows"] for name in order if q in engines[name]}
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{name} {rows}" for name, rows in counts.items())
            notes.append(f"Q{q} row counts differ: {detail}")
    return "\n".join(lines) + "\n", notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="timing JSON files")
    parser.add_argument("--baseline", default="quiver",
                        help="engine the ratios are relative to (default: quiver)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()

    engines = load(args.files)
    if not engines:
        sys.exit("no timings in the given files")
    baseline = args.baseline
    if baseline not in engines:
        baseline = engine_order(engines)[0]
        print(f"warning: no {args.baseline} timings; ratios are relative to {baseline}",
              file=sys.stderr)

    table, notes = build_table(engines, baseline)
    print(table, end="")
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.markdown:
        text = table + "".join(f"\nNote: {note}\n" for note in notes)
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
