#!/usr/bin/env bash
# Runs the quickstart: nats-server and two workers start, each function is
# called, and the program prints which worker served each call.
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh"
ensure_nats_server
cd "$repo_root"
cargo run -p wharf-examples --bin quickstart
