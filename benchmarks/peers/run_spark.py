#!/usr/bin/env python3
"""Runs the 22 TPC-H queries on Apache Spark (local mode) over the Parquet files of `tpch gen`.

Spark runs in one JVM as `local[N]` with N = --cores, the driver gets 8 GiB
(--driver-memory), and spark.sql.shuffle.partitions is set to N as well (the
default of 200 is meant for clusters; with adaptive execution, on by default,
Spark may coalesce further). Each table is a temporary view over its Parquet
files. A run is timed wall-clock from `spark.sql(...)` (parse, analyse, plan)
to the end of `.collect()`. Timings are written in the Rust runner's JSON
format with engine "spark".

    python3 benchmarks/peers/run_spark.py --data data/tpch-sf1 --cores 2 \
        --iterations 3 --output /tmp/peers/spark-sf1.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from tpch_common import base_arguments, load_queries, log, run_all, table_files, write_json

LOG_CONFIG = Path(__file__).resolve().parent / "log4j2.properties"


def start_spark(cores: int, driver_memory: str, shuffle_partitions: int):
    # Imported here so that `--help` works without a JVM.
    from pyspark.sql import SparkSession

    java_options = f"-Dlog4j2.configurationFile={LOG_CONFIG.as_uri()}"
    builder = (
        SparkSession.builder.appName("quiver-tpch-peer")
        .master(f"local[{cores}]")
        .config("spark.driver.memory", driver_memory)
        .config("spark.driver.extraJavaOptions", java_options)
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.default.parallelism", str(cores))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def register_tables(spark, tables: dict) -> None:
    for name, folder in tables.items():
        spark.read.parquet(str(folder / "*.parquet")).createOrReplaceTempView(name)


def main() -> int:
    parser = base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2,
                        help="local[N] worker threads (default: 2)")
    parser.add_argument("--shuffle-partitions", type=int,
                        help="spark.sql.shuffle.partitions (default: the number of cores)")
    parser.add_argument("--driver-memory", default="8g",
                        help="spark.driver.memory (default: 8g)")
    args = parser.parse_args()

    tables = table_files(args.data)
    queries = load_queries(args.queries_dir, args.queries)
    shuffle_partitions = args.shuffle_partitions or args.cores
    spark = start_spark(args.cores, args.driver_memory, shuffle_partitions)
    try:
        register_tables(spark, tables)
        heap = spark.sparkContext._jvm.java.lang.Runtime.getRuntime().maxMemory()
        log(f"Spark {spark.version}, master local[{args.cores}], driver heap "
            f"{heap / 2**30:.1f} GiB, shuffle partitions {shuffle_partitions}, "
            f"adaptive {spark.conf.get('spark.sql.adaptive.enabled')}, data {args.data}")

        def execute(sql: str) -> int:
            return len(spark.sql(sql).collect())

        timings, failures = run_all("spark", queries, args.iterations, execute)
    finally:
        spark.stop()
    write_json(args.output, timings)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
