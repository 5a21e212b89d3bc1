#!/usr/bin/env bash
# Builds Apache Ballista's scheduler (with Arrow Flight SQL) and executor from
# the Rust package registry into $BALLISTA_HOME (default ~/.cache/ballista).
# Ballista 55 is built on DataFusion 55.2, the version Quiver uses. The build
# compiles DataFusion again in release mode: about 30 minutes on 2 cores.
# Idempotent: cargo skips binaries that are already installed at this version.
set -euo pipefail

version="${BALLISTA_VERSION:-55.0.0}"
home="${BALLISTA_HOME:-$HOME/.cache/ballista}"
target="${BALLISTA_TARGET_DIR:-$HOME/.cache/ballista-target}"
# One crate per install: --features applies to every crate named.
cargo install "ballista-scheduler@$version" --features flight-sql --root "$home" --target-dir "$target"
cargo install "ballista-executor@$version" --root "$home" --target-dir "$target"
"$home/bin/ballista-scheduler" --version
"$home/bin/ballista-executor" --version
