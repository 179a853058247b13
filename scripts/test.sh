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
say "stateful example (rate limiter)"
cargo run -q -p wharf-examples --bin ratelimit >/dev/null
say "objects example"
cargo run -q -p wharf-examples --bin objects >/dev/null
say "bench smoke run (numbers need --release; see docs/BENCHMARKS.md)"
cargo run -q -p wharf-examples --bin bench -- --quick >/dev/null
say "objects bench smoke run"
cargo run -q -p wharf-examples --bin objects_bench -- --quick >/dev/null
say "cargo test"
log="$(mktemp)"
set +e
cargo test --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary of the workspace.
passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{ s += $1 } END { print s + 0 }')
failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{ s += $1 } END { print s + 0 }')
rm -f "$log"
echo "total: $passed passed, $failed failed"
exit "$status"
