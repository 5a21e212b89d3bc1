#!/usr/bin/env python3
"""Runs the 22 TPC-H queries on DuckDB over the Parquet files of `tpch gen`.

Each table is a view over its folder (`read_parquet('<table>/*.parquet')`), so
every run reads the Parquet files as Quiver and DataFusion do; nothing is
loaded into DuckDB's own storage. Each query runs `--iterations` times; a run is
timed wall-clock from submitting the SQL to holding the whole result as an Arrow
table (the analogue of DataFusion's `collect()`). Timings are written in the
Rust runner's JSON format with engine "duckdb".

    python3 benchmarks/peers/run_duckdb.py --data data/tpch-sf1 --threads 2 \
        --iterations 3 --output /tmp/peers/duckdb-sf1.json
"""

from __future__ import annotations

import sys

import duckdb

from tpch_common import base_arguments, load_queries, log, run_all, table_files, write_json

try:
    import pyarrow  # noqa: F401  (only needed for the Arrow result path)
    HAVE_ARROW = True
except ImportError:
    HAVE_ARROW = False


def connect(threads: int, tables: dict) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(database=":memory:")
    connection.execute(f"SET threads = {int(threads)}")
    for name, folder in tables.items():
        pattern = str(folder / "*.parquet").replace("'", "''")
        connection.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{pattern}')")
    return connection


def executor(connection: duckdb.DuckDBPyConnection):
    """A function that runs one statement to the end and returns its row count."""
    def execute(sql: str) -> int:
        relation = connection.sql(sql)
        if HAVE_ARROW:
            return relation.to_arrow_table().num_rows
        return len(relation.fetchall())
    return execute


def main() -> int:
    parser = base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2,
                        help="DuckDB worker threads (default: 2)")
    args = parser.parse_args()

    tables = table_files(args.data)
    queries = load_queries(args.queries_dir, args.queries)
    connection = connect(args.threads, tables)
    memory = connection.sql("SELECT current_setting('memory_limit')").fetchall()[0][0]
    log(f"DuckDB {duckdb.__version__}, threads {args.threads}, memory_limit {memory}, "
        f"data {args.data}, results fetched as {'Arrow' if HAVE_ARROW else 'Python rows'}")

    timings, failures = run_all("duckdb", queries, args.iterations, executor(connection))
    write_json(args.output, timings)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
