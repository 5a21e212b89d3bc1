#!/usr/bin/env python3
"""Runs the 22 TPC-H queries on Apache Ballista over the Parquet files of `tpch gen`.

Starts a Ballista scheduler and `--executors` executors on loopback, from the
binaries that `install_ballista.sh` builds (Ballista 55, on DataFusion 55.2
like Quiver), each executor running `--slots` tasks at once. The queries go
through the scheduler's Arrow Flight SQL endpoint with the ADBC client, the
same client Quiver's own tests use: each table is registered with
`CREATE EXTERNAL TABLE` over its folder, and a run is timed from submitting
the SQL to holding the whole result as an Arrow table. Timings are written in
the Rust runner's JSON format with engine "ballista".

    bash benchmarks/peers/install_ballista.sh
    python3 benchmarks/peers/run_ballista.py --data data/tpch-sf1 --executors 2 \
        --slots 1 --partitions 2 --iterations 3 --output /tmp/peers/ballista-sf1.json
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tpch_common import base_arguments, load_queries, log, run_all, table_files, write_json

DEFAULT_HOME = Path(os.environ.get("BALLISTA_HOME", Path.home() / ".cache" / "ballista"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, what: str, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited with status {process.returncode}; see its log")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"{what} did not listen on port {port} in {seconds:.0f} s")


class Cluster:
    """A Ballista scheduler and its executors, stopped on exit."""

    def __init__(self, binaries: Path, executors: int, slots: int, logs: Path):
        self.processes: list[subprocess.Popen] = []
        self.port = free_port()
        scheduler = self.spawn(logs / "scheduler.log", [
            binaries / "ballista-scheduler", "--bind-host", "127.0.0.1",
            "--external-host", "127.0.0.1", "--bind-port", str(self.port), "--flight-sql",
        ])
        wait_for_port(self.port, "ballista-scheduler", scheduler)
        for index in range(executors):
            flight, grpc, health = free_port(), free_port(), free_port()
            work = logs / f"executor-{index}"
            work.mkdir()
            executor = self.spawn(logs / f"executor-{index}.log", [
                binaries / "ballista-executor", "--scheduler-host", "127.0.0.1",
                "--scheduler-port", str(self.port), "--bind-host", "127.0.0.1",
                "--external-host", "127.0.0.1", "--bind-port", str(flight),
                "--bind-grpc-port", str(grpc), "--bind-health-port", str(health),
                "--concurrent-tasks", str(slots), "--work-dir", str(work),
            ])
            wait_for_port(flight, f"ballista-executor {index}", executor)

    def spawn(self, log_file: Path, command: list) -> subprocess.Popen:
        with open(log_file, "w") as output:
            process = subprocess.Popen([str(part) for part in command], stdout=output,
                                       stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def varint(value: int) -> bytes:
    encoded = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        encoded.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(encoded)


def length_delimited(field: int, payload: bytes) -> bytes:
    """One protobuf field of wire type 2 (bytes, strings, messages)."""
    return bytes([field << 3 | 2]) + varint(len(payload)) + payload


def statement_query(sql: str) -> bytes:
    """Flight SQL's `CommandStatementQuery`, packed in a protobuf `Any`."""
    command = length_delimited(1, sql.encode())
    type_url = b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    return length_delimited(1, type_url) + length_delimited(2, command)


def executor(flight, port: int):
    """A function that runs one statement to the end and returns its row count."""
    scheduler = flight.FlightClient(f"grpc://127.0.0.1:{port}")
    clients = {}

    def client_for(endpoint):
        if not endpoint.locations:
            return scheduler
        location = endpoint.locations[0].uri.decode()
        if location not in clients:
            clients[location] = flight.FlightClient(location)
        return clients[location]

    def execute(sql: str) -> int:
        descriptor = flight.FlightDescriptor.for_command(statement_query(sql))
        info = scheduler.get_flight_info(descriptor)
        return sum(client_for(endpoint).do_get(endpoint.ticket).read_all().num_rows
                   for endpoint in info.endpoints)
    return execute


def main() -> int:
    parser = base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--executors", type=int, default=2, help="executors (default: 2)")
    parser.add_argument("--slots", type=int, default=1,
                        help="tasks each executor runs at once (default: 1)")
    parser.add_argument("--partitions", type=int, default=2,
                        help="shuffle partitions, datafusion.execution.target_partitions "
                             "(default: 2)")
    parser.add_argument("--ballista-home", type=Path, default=DEFAULT_HOME,
                        help=f"where install_ballista.sh put bin/ (default: {DEFAULT_HOME})")
    args = parser.parse_args()

    import pyarrow.flight as flight

    binaries = args.ballista_home / "bin"
    if not (binaries / "ballista-scheduler").exists():
        sys.exit(f"no Ballista in {binaries}; run benchmarks/peers/install_ballista.sh")
    tables = table_files(args.data)
    queries = load_queries(args.queries_dir, args.queries)
    with tempfile.TemporaryDirectory(prefix="ballista-") as work:
        cluster = Cluster(binaries, args.executors, args.slots, Path(work))
        try:
            execute = executor(flight, cluster.port)
            execute(f"SET datafusion.execution.target_partitions = {int(args.partitions)}")
            for name, folder in tables.items():
                location = str(folder).replace("'", "''")
                execute(f"CREATE EXTERNAL TABLE {name} STORED AS PARQUET LOCATION '{location}/'")
            version = subprocess.run([binaries / "ballista-scheduler", "--version"],
                                     capture_output=True, text=True).stdout.strip()
            log(f"{version}, {args.executors} executors x {args.slots} slots, "
                f"{args.partitions} partitions, data {args.data}")
            timings, failures = run_all("ballista", queries, args.iterations, execute)
        finally:
            cluster.stop()
    write_json(args.output, timings)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
