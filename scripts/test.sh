#!/usr/bin/env bash
# Every check and test of the workspace: formatting, clippy, the demo and
# bench as smoke runs, then the whole test suite (unit, real nats-server,
# worker processes, containers, trybuild, a Python client).
#
# Every step and every test binary runs even when an earlier one fails, so
# one run shows every failure; the last line is `N passed, M failed` over
# all of them, and the exit status is non-zero if anything failed.
set -uo pipefail
source "$(dirname "$0")/bootstrap.sh"
ensure_nats_server
ensure_nats_py
ensure_otlp_receiver
ensure_prometheus
ensure_kubernetes_validate
ensure_tmux
ensure_docker
cd "$repo_root"

failed_steps=()
step() {
    local name="$1"
    shift
    say "$name"
    if ! "$@"; then
        failed_steps+=("$name")
        say "FAILED: $name"
    fi
}
quietly() { "$@" >/dev/null; }

# A clean build with the tests and the clippy check takes about 5.5 GB; an
# earlier, fuller build once filled a CI machine's disk mid-link, which
# reads as a linker crash. Say so up front rather than after.
free_kb=$(df -Pk "$repo_root" | awk 'NR == 2 { print $4 }')
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((8 * 1024 * 1024)) ]; then
    say "warning: only $((free_kb / 1024)) MB free on the disk of $repo_root; the build needs about 5.5 GB"
fi
# Incremental caches only pay off when the same tree is built again.
if [ -n "${CI:-}" ]; then
    export CARGO_INCREMENTAL=0
fi

started=$SECONDS
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
step "demo (quickstart)" quietly cargo run -q -p wharf-examples --bin quickstart
step "stateful example (rate limiter)" quietly cargo run -q -p wharf-examples --bin ratelimit
step "objects example" quietly cargo run -q -p wharf-examples --bin objects
step "bench smoke run (numbers need --release; see docs/BENCHMARKS.md)" \
    quietly cargo run -q -p wharf-examples --bin bench -- --quick
step "objects bench smoke run" quietly cargo run -q -p wharf-examples --bin objects_bench -- --quick
step "cluster bench smoke run" quietly cargo run -q -p wharf-examples --bin cluster_bench -- --quick

say "cargo test (every test binary, even after a failure)"
log="$(mktemp)"
target_dir="$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
# Into a file, not a pipe: a process a test leaked would hold a pipe open
# and the run would never end. `tail --pid` follows until cargo exits.
cargo test --workspace --no-fail-fast >"$log" 2>&1 &
cargo_pid=$!
tail -n +1 -f --pid="$cargo_pid" "$log"
wait "$cargo_pid"
status=$?

# Tests remove what they start, even when they fail: anything of this
# build still running now (workers, supervisors, test servers) or a
# container wharf labelled is a leak, named, removed and counted.
leaked=$( (pgrep -af "^${target_dir}/" ; pgrep -af "wharf-test-nats-") | grep -v "^$$ " | sort -u)
if [ -n "$leaked" ]; then
    echo "processes left running by the tests:"
    printf '  %s\n' "$leaked" | cut -c1-200
    echo "$leaked" | awk '{ print $1 }' | xargs -r kill -9 2>/dev/null
    failed_steps+=("processes left running by the tests")
fi
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    containers=$( (docker ps --all --quiet --filter label=wharf.managed; docker ps --all --quiet --filter label=wharf.test) | sort -u)
    if [ -n "$containers" ]; then
        echo "containers left by the tests: $(echo $containers)"
        for id in $containers; do docker rm --force "$id" >/dev/null 2>&1; done
        failed_steps+=("containers left by the tests")
    fi
    # Earlier builds' worker images, now untagged (the current one stays).
    docker image prune --force --filter label=wharf.test >/dev/null 2>&1
    networks=$(docker network ls --quiet --filter label=wharf.test)
    if [ -n "$networks" ]; then
        echo "networks left by the tests: $(echo $networks)"
        for id in $networks; do docker network rm "$id" >/dev/null 2>&1; done
        failed_steps+=("networks left by the tests")
    fi
fi

# Sums over every binary's `test result:` line.
passed=$(sed -nE 's/^test result: .* ([0-9]+) passed; .*/\1/p' "$log" | awk '{ s += $1 } END { print s + 0 }')
failed=$(sed -nE 's/^test result: .* ([0-9]+) failed; .*/\1/p' "$log" | awk '{ s += $1 } END { print s + 0 }')
# A binary that crashed (or did not build) prints no result line; cargo
# names it among the failed targets.
failed_targets=$(sed -nE 's/^error: ([0-9]+) targets? failed:.*/\1/p' "$log" | tail -n 1)
binaries_with_failures=$(grep -c '^test result: FAILED' "$log")
crashed=$(( ${failed_targets:-0} - binaries_with_failures ))
if [ "$status" -ne 0 ] && [ "${failed_targets:-0}" -eq 0 ] && [ "$failed" -eq 0 ]; then
    crashed=1 # cargo itself failed (a build error): count it
fi
[ "$crashed" -lt 0 ] && crashed=0
failing_tests=$(grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/')
rm -f "$log"

echo
if [ -n "$failing_tests" ]; then
    echo "failed tests:"
    printf '  %s\n' $failing_tests
fi
if [ "$crashed" -gt 0 ]; then
    echo "test binaries (or builds) that ended without a result: $crashed (see cargo's error above)"
fi
if [ "${#failed_steps[@]}" -gt 0 ]; then
    echo "failed steps:"
    printf '  %s\n' "${failed_steps[@]}"
fi
echo "took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
total_failed=$(( failed + crashed + ${#failed_steps[@]} ))
echo "$passed passed, $total_failed failed"
[ "$status" -eq 0 ] && [ "$total_failed" -eq 0 ]
