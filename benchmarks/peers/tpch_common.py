"""Shared pieces of the peer TPC-H runners (DuckDB, Spark).

Finds the table folders written by `tpch gen`, loads the 22 queries from
benchmarks/queries, parses the common command-line options, and writes timings
in the same JSON shape as the Rust runner's `--output`:

    [{"query": 1, "engine": "duckdb", "rows": 4, "millis": [812.3, 790.1, 801.7]}, ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

QUERY_COUNT = 22
TABLES = ("region", "nation", "supplier", "customer", "part", "partsupp", "orders", "lineitem")
DEFAULT_QUERIES_DIR = Path(__file__).resolve().parent.parent / "queries"


@dataclass
class QueryTiming:
    query: int
    engine: str
    rows: int
    millis: list[float] = field(default_factory=list)


def median(values: list[float]) -> float:
    """The median as the Rust runner computes it: the upper middle value."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def base_arguments(description: str) -> argparse.ArgumentParser:
    """Options shared by every peer runner."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, type=Path,
                        help="TPC-H folder written by `tpch gen` (e.g. data/tpch-sf1)")
    parser.add_argument("--iterations", type=int, default=3,
                        help="runs of each query (default: 3)")
    parser.add_argument("-q", "--query", type=int, action="append", dest="queries",
                        metavar="N", help="query number to run; repeatable (default: all 22)")
    parser.add_argument("--output", type=Path, help="write the timings as JSON to this file")
    parser.add_argument("--queries-dir", type=Path, default=DEFAULT_QUERIES_DIR,
                        help=f"folder holding q1.sql..q22.sql (default: {DEFAULT_QUERIES_DIR})")
    return parser


def table_files(data: Path) -> dict[str, Path]:
    """Maps each TPC-H table to its folder, checking that it is complete."""
    folders = {}
    for name in TABLES:
        folder = data / name
        if not (folder / "_SUCCESS").exists():
            sys.exit(f"{folder} is missing or incomplete (no _SUCCESS); run `tpch gen` first")
        if not any(folder.glob("*.parquet")):
            sys.exit(f"{folder} holds no .parquet files")
        folders[name] = folder.resolve()
    return folders


def load_queries(queries_dir: Path, numbers: list[int] | None) -> dict[int, str]:
    """Reads the selected queries, without their trailing semicolon."""
    selected = numbers or list(range(1, QUERY_COUNT + 1))
    queries = {}
    for number in selected:
        if not 1 <= number <= QUERY_COUNT:
            sys.exit(f"there is no TPC-H query {number}")
        text = (queries_dir / f"q{number}.sql").read_text()
        queries[number] = text.strip().rstrip(";").strip()
    return queries


def run_all(engine: str, queries: dict[int, str], iterations: int,
            execute: Callable[[str], int]) -> tuple[list[QueryTiming], list[int]]:
    """Runs each query `iterations` times; `execute` runs one statement to the
    end and returns its row count. Returns the timings and the failed queries."""
    log(f"{engine}: {len(queries)} queries x {iterations} iterations, "
        f"load average {load_average()}")
    timings, failures = [], []
    for number, sql in queries.items():
        timing = QueryTiming(query=number, engine=engine, rows=0)
        try:
            for _ in range(max(iterations, 1)):
                started = time.perf_counter()
                timing.rows = execute(sql)
                timing.millis.append((time.perf_counter() - started) * 1000.0)
        except Exception as error:  # report and go on with the next query
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            warn(f"Q{number:02} {engine:<8} FAILED: {first_line}")
            failures.append(number)
            continue
        runs = ", ".join(f"{m:.1f}" for m in timing.millis)
        log(f"Q{number:02} {engine:<8} {timing.rows:>6} rows  "
            f"median {median(timing.millis):>9.1f} ms  ({runs})")
        timings.append(timing)
    total = sum(median(t.millis) for t in timings)
    log(f"{engine}: total of medians {total:.1f} ms over {len(timings)} queries, "
        f"load average {load_average()}")
    if failures:
        warn(f"{engine}: failed queries: {', '.join(f'Q{n}' for n in failures)}")
    return timings, failures


def write_json(path: Path | None, timings: list[QueryTiming]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(t) for t in timings], indent=2) + "\n")
    log(f"wrote {path}")


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def log(message: str) -> None:
    """Progress and results go to standard output."""
    print(message, flush=True)


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
