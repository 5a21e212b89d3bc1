"""Drives Quiver's Flight SQL endpoint with the unmodified Python clients
(adbc-driver-flightsql and pyarrow), as a data pipeline would.

Called by benchmarks/tests/flight_sql.rs, which starts the cluster and then
compares the TPC-H answers written here with single-node DataFusion.

    flight_sql_client.py URI TABLES_JSON QUERY_DIR OUT_DIR SCRATCH_DIR

Every check asserts; the first failure ends the script with a non-zero exit.
"""

import json
import pathlib
import sys

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow as pa
import pyarrow.ipc


def create_tables(cursor, tables):
    for name, location in tables.items():
        cursor.execute(
            f"CREATE EXTERNAL TABLE IF NOT EXISTS {name} STORED AS PARQUET LOCATION '{location}'"
        )
        cursor.fetch_arrow_table()


def run_tpch(cursor, query_dir, out_dir):
    """Each query's answer goes to an Arrow file, for the Rust side to compare."""
    for path in sorted(query_dir.glob("q*.sql")):
        cursor.execute(path.read_text())
        table = cursor.fetch_arrow_table()
        with pa.ipc.new_file(out_dir / f"{path.stem}.arrow", table.schema) as writer:
            writer.write_table(table)


def check_parameters(cursor):
    cursor.execute("SELECT count(*) AS n FROM lineitem WHERE l_quantity < 10")
    unbound = cursor.fetch_arrow_table().column("n")[0].as_py()
    cursor.execute(
        "SELECT count(*) AS n FROM lineitem WHERE l_quantity < $1", parameters=[10]
    )
    bound = cursor.fetch_arrow_table().column("n")[0].as_py()
    assert bound == unbound and bound > 0, (bound, unbound)

    # The same prepared statement, run again with another value.
    sql = "SELECT n_name FROM nation WHERE n_name = $1 AND n_nationkey >= $2"
    cursor.execute(sql, parameters=["GERMANY", 0])
    assert cursor.fetch_arrow_table().column("n_name").to_pylist() == ["GERMANY"]
    cursor.execute(sql, parameters=["PERU", 0])
    assert cursor.fetch_arrow_table().column("n_name").to_pylist() == ["PERU"]


def check_metadata(connection):
    info = connection.adbc_get_info()
    assert info["vendor_name"] == "Quiver", info

    types = connection.adbc_get_table_types()
    assert "TABLE" in types and "VIEW" in types, types

    objects = connection.adbc_get_objects(depth="all").read_all().to_pylist()
    tables = {
        table["table_name"]: table
        for catalog in objects
        for schema in catalog["catalog_db_schemas"] or []
        for table in schema["db_schema_tables"] or []
    }
    assert "lineitem" in tables, sorted(tables)
    columns = [column["column_name"] for column in tables["lineitem"]["table_columns"]]
    assert columns[:2] == ["l_orderkey", "l_partkey"], columns

    schema = connection.adbc_get_table_schema("nation")
    assert schema.names == ["n_nationkey", "n_name", "n_regionkey", "n_comment"], schema


def check_errors(cursor):
    for sql, expected in [
        ("SELEC 1", "expected: an sql statement, found: selec"),
        ("SELECT * FROM no_such_table", "no_such_table"),
    ]:
        try:
            cursor.execute(sql)
            cursor.fetch_arrow_table()
        except flight_sql.Error as error:
            message = str(error)
            assert expected in message.lower(), message
        else:
            raise AssertionError(f"{sql!r} did not fail")


def check_updates(cursor, scratch_dir):
    folder = scratch_dir / "events"
    folder.mkdir(parents=True, exist_ok=True)
    cursor.execute(
        "CREATE EXTERNAL TABLE events (id BIGINT, kind VARCHAR) "
        f"STORED AS PARQUET LOCATION '{folder}/'"
    )
    cursor.executemany(
        "INSERT INTO events VALUES ($1, $2)", [(1, "start"), (2, "stop"), (3, "stop")]
    )
    assert cursor.rowcount == 3, cursor.rowcount

    statement = cursor.adbc_statement
    statement.set_sql_query("INSERT INTO events SELECT id + 10, kind FROM events")
    assert statement.execute_update() == 3

    cursor.execute("SELECT kind, count(*) AS n FROM events GROUP BY kind ORDER BY kind")
    assert cursor.fetch_arrow_table().to_pylist() == [
        {"kind": "start", "n": 2},
        {"kind": "stop", "n": 4},
    ]


def check_streaming(cursor):
    """A result larger than one batch arrives as a stream of batches."""
    cursor.execute("SELECT * FROM lineitem")
    reader = cursor.fetch_record_batch()
    batches = rows = 0
    for batch in reader:
        batches += 1
        rows += batch.num_rows
    cursor.execute("SELECT count(*) AS n FROM lineitem")
    assert rows == cursor.fetch_arrow_table().column("n")[0].as_py()
    assert batches > 1, batches


def check_settings_travel_in_headers(uri):
    header = "adbc.flight.sql.rpc.call_header.x-quiver-setting-datafusion.execution.batch_size"
    with flight_sql.connect(uri, db_kwargs={header: "1234"}) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SHOW datafusion.execution.batch_size")
            values = cursor.fetch_arrow_table().column("value").to_pylist()
            assert values == ["1234"], values


def main():
    uri, tables_json, query_dir, out_dir, scratch_dir = sys.argv[1:]
    tables = json.loads(pathlib.Path(tables_json).read_text())
    query_dir, out_dir, scratch_dir = map(pathlib.Path, (query_dir, out_dir, scratch_dir))
    print(f"adbc-driver-flightsql {adbc_driver_flightsql.__version__}, pyarrow {pa.__version__}")
    with flight_sql.connect(uri, autocommit=True) as connection:
        with connection.cursor() as cursor:
            create_tables(cursor, tables)
            run_tpch(cursor, query_dir, out_dir)
            check_parameters(cursor)
            check_metadata(connection)
            check_errors(cursor)
            check_updates(cursor, scratch_dir)
            check_streaming(cursor)
    check_settings_travel_in_headers(uri)
    print("all Flight SQL checks passed")


if __name__ == "__main__":
    main()
