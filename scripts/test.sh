#!/usr/bin/env bash
# Every check and test of the workspace: formatting, clippy, the demo and
# bench as smoke runs, then the whole test suite (unit, real nats-server,
# worker processes, containers, trybuild, a Python client).
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
ensure_nats_server
ensure_nats_py
ensure_docker
cd "$repo_root"

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
say "demo (quickstart)"
cargo run -q -p wharf-examples --bin quickstart >/dev/null
say "bench smoke run (numbers need --release; see docs/BENCHMARKS.md)"
cargo run -q -p wharf-examples --bin bench -- --quick >/dev/null
say "cargo test"
cargo test --workspace
