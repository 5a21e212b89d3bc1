#!/usr/bin/env bash
# Installs what the peer runners need: DuckDB, PyArrow (DuckDB results as
# Arrow) and PySpark. Idempotent and quiet: pip skips what is already installed.
# Spark also needs Java 17 or later on PATH (or JAVA_HOME).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"

PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/requirements.txt"

if ! command -v java >/dev/null 2>&1 && [ -z "${JAVA_HOME:-}" ]; then
    echo "warning: no java found; run_spark.py needs Java 17 or later" >&2
fi

"$python" -c 'import duckdb, pyarrow, pyspark
print(f"duckdb {duckdb.__version__}, pyarrow {pyarrow.__version__}, pyspark {pyspark.__version__}")'
