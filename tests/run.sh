#!/usr/bin/env bash
# The one test command for perch (README and CI call exactly this):
#
#   bash tests/run.sh            # everything: install what is missing, lint, build, all tests
#   bash tests/run.sh lint       # rustfmt + clippy only
#   bash tests/run.sh rust       # cargo test, once per I/O backend
#   bash tests/run.sh clients    # Python (nats-py) and Go (nats.go) client suites, per backend
#   bash tests/run.sh cross      # ARM builds checked and tested under qemu-user; the .debs
#
# Environment knobs:
#   PERCH_BACKENDS="uring epoll"  I/O backends to run the suites on (default: both)
#   NATS_REFERENCE=1              run the client suites against Debian's nats-server
#                                 instead of perch (checks the tests themselves)
#   PERCH_STEP_TIMEOUT=900        seconds any one test step may take before it is killed
#   PERCH_BIN=path                run the client suites against this perch binary
#                                 instead of building target/debug/perch
#   PERCH_CROSS_TARGETS="..."     targets the cross steps build and test under qemu-user
#                                 (default: aarch64 gnu, armv7 gnu, aarch64 musl)
#
# Fails fast: the first failing step stops the run with its name. The last line
# is a count of individual tests: "total: N passed, N failed, N skipped".
# Skipped tests are never counted as passed, and the client suites must skip none.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

# Pinned test-tool versions (PyPI). Debian's own versions come with bookworm:
# nats-server 2.9.10, golang-go 1.19, golang-github-nats-io-go-nats-dev 1.22.1.
NATS_PY_VERSION=2.16.0
# nkeys signs the nonce for nats-py's nkey logins (tests/py/test_auth.py).
NKEYS_PY_VERSION=0.2.1
PYTEST_VERSION=9.2.0

BACKENDS=${PERCH_BACKENDS:-uring epoll}
# Built once per run (cross/build.sh) and tested under qemu-user, where io_uring
# is missing, so they run on the epoll backend (`--io auto` falls back).
CROSS_TARGETS=${PERCH_CROSS_TARGETS:-aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl}
# Built and checked too, natively: x86_64 gnu for the amd64 .deb, x86_64 musl
# because only natively can a musl build show its io_uring backend working
# (the patched tokio-uring; qemu-user has no io_uring).
NATIVE_TARGETS="x86_64-unknown-linux-gnu x86_64-unknown-linux-musl"
# The .debs: cross/deb.sh builds one per Debian architecture from these.
DEB_TARGETS="x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf"
PERCH_BIN_GIVEN=${PERCH_BIN:-}
PERCH_BIN=${PERCH_BIN:-$REPO/target/debug/perch}
STEP_TIMEOUT=${PERCH_STEP_TIMEOUT:-900}
WHAT=${1:-all}
case $WHAT in all | lint | rust | clients | cross) ;; *)
    echo "usage: bash tests/run.sh [all|lint|rust|clients|cross]" >&2
    exit 2
    ;;
esac

LOGS=$REPO/target/test-logs
mkdir -p "$LOGS"
export RUST_BACKTRACE=1
export CARGO_TERM_COLOR=never
# The Go client comes from Debian as GOPATH source: build in GOPATH mode,
# offline (no go.mod, no module proxy).
export GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off GOFLAGS='' GOTOOLCHAIN=local

PASSED=0 FAILED=0 SKIPPED=0
RUN_START=$SECONDS
TIMINGS=()

header() { printf '\n==> %s\n' "$*"; }

summary() {
    echo
    echo "==> step timings"
    local t
    for t in "${TIMINGS[@]}"; do echo "    $t"; done
    echo "    whole run: $((SECONDS - RUN_START))s"
    echo "total: $PASSED passed, $FAILED failed, $SKIPPED skipped"
}

fail() {
    echo
    echo "FAILED: $*" >&2
    FAILED=$((FAILED > 0 ? FAILED : 1))
    summary
    exit 1
}

# step NAME CMD...: runs CMD under a header, tees its output to a log, times it
# and stops the whole run if it fails. The log is what count_* read afterwards.
step() {
    local name=$1
    shift
    header "$name"
    local start=$SECONDS log
    log="$LOGS/$(echo "$name" | tr -c 'a-zA-Z0-9\n' '_').log"
    local rc=0
    "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    TIMINGS+=("$(printf '%-52s %5ss' "$name" $((SECONDS - start)))")
    LAST_LOG=$log
    if [ "$rc" -ne 0 ]; then
        # Count what ran before failing, so the summary says how much broke.
        count_from "$log" || true
        [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && fail "$name (killed after ${STEP_TIMEOUT}s)"
        fail "$name (exit $rc; log: ${log#"$REPO"/})"
    fi
}

# Adds the test counts found in a log: cargo test's "test result:" lines,
# pytest's closing line and go test -v's "--- PASS/FAIL/SKIP" lines.
count_from() {
    local counts
    counts=$(python3 - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1], errors="replace").read()
p = f = s = 0
for m in re.finditer(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", text):
    p += int(m[1]); f += int(m[2]); s += int(m[3])
py = [l for l in text.splitlines() if re.match(r"^=*\s*\d+ (passed|failed|skipped|errors?)\b", l)]
if py:
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", py[-1]):
        if what == "passed": p += int(n)
        elif what == "skipped": s += int(n)
        else: f += int(n)
p += len(re.findall(r"^\s*--- PASS", text, re.M))
# The C client's runners: "gcc: 30 passed, 0 failed", "c client: 10 passed, 0 failed".
for m in re.finditer(r"^[\w ]+: (\d+) passed, (\d+) failed$", text, re.M):
    p += int(m[1]); f += int(m[2])
f += len(re.findall(r"^\s*--- FAIL", text, re.M))
s += len(re.findall(r"^\s*--- SKIP", text, re.M))
print(p, f, s)
EOF
    )
    read -r LAST_PASSED LAST_FAILED LAST_SKIPPED <<<"$counts"
    PASSED=$((PASSED + LAST_PASSED))
    FAILED=$((FAILED + LAST_FAILED))
    SKIPPED=$((SKIPPED + LAST_SKIPPED))
}

# Test steps must run something, and the client suites must skip nothing.
counted_step() {
    local name=$1 allow_skips=$2
    shift 2
    step "$name" "$@"
    count_from "$LAST_LOG"
    echo "    ($LAST_PASSED passed, $LAST_FAILED failed, $LAST_SKIPPED skipped)"
    [ $((LAST_PASSED + LAST_FAILED)) -gt 0 ] || fail "$name ran no test"
    [ "$allow_skips" = yes ] || [ "$LAST_SKIPPED" -eq 0 ] || fail "$name skipped $LAST_SKIPPED test(s)"
}

# ---------------------------------------------------------------- prerequisites

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

deb_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

py_ok() {
    python3 - "$NATS_PY_VERSION" "$PYTEST_VERSION" "$NKEYS_PY_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
import nats, pytest, nkeys  # noqa: F401  (importable, not just listed)
want = tuple(sys.argv[1:4])
sys.exit(0 if (version("nats-py"), version("pytest"), version("nkeys")) == want else 1)
EOF
}

install_prereqs() {
    header "prerequisites"
    local start=$SECONDS
    # Debian packages. nats-server is the reference the Rust tests compare
    # against; the Go client's -dev package pulls its deps (nkeys, nuid, x/crypto).
    local need=() pkg
    # clang, gcc-arm-none-eabi and newlib build and size the C firmware client;
    # libnats-dev: the C client's TLS test (tests/it/tls.rs) and the benchmarks;
    # openssl makes the TLS tests' certificates.
    # libclang-rt-14-dev: clang's sanitizer runtimes (ASan/UBSan), not pulled in
    # by clang without recommends. qemu-user-static and the arm64/armhf C
    # libraries run the ARM builds; binutils (objdump, readelf) checks them;
    # lintian and systemd (systemd-analyze) check the .debs; prometheus (with
    # promtool) checks and scrapes perch's /metrics.
    for pkg in nats-server golang-go golang-github-nats-io-go-nats-dev clang libclang-rt-14-dev \
        gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-user-static libc6-arm64-cross \
        libc6-armhf-cross binutils lintian systemd prometheus libnats-dev openssl; do
        deb_installed "$pkg" || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "installing Debian packages: ${need[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
    fi

    if ! py_ok; then
        echo "installing nats-py==$NATS_PY_VERSION pytest==$PYTEST_VERSION nkeys==$NKEYS_PY_VERSION"
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
            "nats-py==$NATS_PY_VERSION" "pytest==$PYTEST_VERSION" "nkeys==$NKEYS_PY_VERSION"
    fi

    if command -v rustup >/dev/null; then
        local have
        have=$(rustup component list --installed)
        for pkg in rustfmt clippy; do
            grep -q "^$pkg" <<<"$have" || rustup component add "$pkg"
        done
        # The firmware example builds for a Cortex-M4F (no_std); the cross
        # steps build the ARM targets and the x86_64 package.
        local installed
        installed=$(rustup target list --installed)
        for pkg in thumbv7em-none-eabihf $NATIVE_TARGETS $CROSS_TARGETS; do
            grep -qx "$pkg" <<<"$installed" || rustup target add "$pkg"
        done
    fi

    # cargo-zigbuild links the cross builds (zig pins glibc 2.28); the versions
    # are cross/build.sh's.
    local zigbuild ziglang
    zigbuild=$(sed -n 's/^CARGO_ZIGBUILD_VERSION=//p' cross/build.sh)
    ziglang=$(sed -n 's/^ZIGLANG_VERSION=//p' cross/build.sh)
    if [ "$(cargo-zigbuild --version 2>/dev/null | awk '{print $2}')" != "$zigbuild" ]; then
        echo "installing cargo-zigbuild==$zigbuild ziglang==$ziglang"
        PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
            --root-user-action=ignore "cargo-zigbuild==$zigbuild" "ziglang==$ziglang"
    fi

    # Check, don't trust: a missing tool must fail here, not turn into skips.
    command -v nats-server >/dev/null || fail "nats-server is not installed"
    command -v go >/dev/null || fail "go is not installed"
    command -v clang >/dev/null || fail "clang is not installed"
    command -v arm-none-eabi-gcc >/dev/null || fail "arm-none-eabi-gcc is not installed"
    command -v systemd-analyze >/dev/null || fail "systemd-analyze is not installed"
    command -v promtool >/dev/null || fail "promtool is not installed (Debian package prometheus)"
    command -v prometheus >/dev/null || fail "prometheus is not installed"
    [ -f "$GOPATH/src/github.com/nats-io/nats.go/nats.go" ] || fail "the nats.go source is not under $GOPATH"
    py_ok || fail "python nats-py $NATS_PY_VERSION / pytest $PYTEST_VERSION / nkeys $NKEYS_PY_VERSION not importable"
    cargo fmt --version >/dev/null 2>&1 || fail "rustfmt is not installed"
    cargo clippy --version >/dev/null 2>&1 || fail "clippy is not installed"
    local tool
    for tool in qemu-aarch64-static qemu-arm-static objdump readelf lintian systemd-analyze cargo-zigbuild; do
        command -v "$tool" >/dev/null || fail "$tool is not installed"
    done
    [ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] || fail "the arm64 C library for qemu is missing"
    [ -e /usr/arm-linux-gnueabihf/lib/ld-linux-armhf.so.3 ] || fail "the armhf C library for qemu is missing"
    echo "nats-server $(nats-server --version | awk '{print $2}'), $(go version | awk '{print $3}')," \
        "nats-py $NATS_PY_VERSION, pytest $PYTEST_VERSION, $(cargo --version | awk '{print $1, $2}')"
    TIMINGS+=("$(printf '%-52s %5ss' prerequisites $((SECONDS - start)))")
}

# ------------------------------------------------------------ the client suites

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

INFO_CHECK='
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
    s.settimeout(1)
    sys.exit(0 if s.recv(5) == b"INFO " else 1)
'

# Waits until the server on port $1 sends its INFO line (or the process $2 dies).
wait_ready() {
    local port=$1 pid=$2 _
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 1
        python3 -c "$INFO_CHECK" "$port" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# go_suite BACKEND: starts one server, runs the compiled Go test binary against
# it, stops the server. A server that died during the run fails the suite.
go_suite() {
    local io=$1 port pid rc=0 srvlog="$LOGS/go-server-$1.log"
    port=$(free_port)
    if [ "${NATS_REFERENCE:-}" = 1 ]; then
        nats-server -a 127.0.0.1 -p "$port" >"$srvlog" 2>&1 &
    else
        # shellcheck disable=SC2086 # PERCH_RUNNER is a command line (qemu-user and its flags)
        RUST_LOG=${RUST_LOG:-warn} ${PERCH_RUNNER:-} "$PERCH_BIN" serve --listen "127.0.0.1:$port" --io "$io" \
            --shards 2 --placement round-robin </dev/null >"$srvlog" 2>&1 &
    fi
    pid=$!
    if ! wait_ready "$port" "$pid"; then
        echo "server did not start; its log:"
        cat "$srvlog"
        kill "$pid" 2>/dev/null || true
        return 1
    fi
    # PERCH_BIN/PERCH_RUNNER/PERCH_IO: the auth tests start servers of their own.
    NATS_URL="nats://127.0.0.1:$port" PERCH_BIN="$PERCH_BIN" PERCH_RUNNER="${PERCH_RUNNER:-}" \
        PERCH_IO="$io" timeout -k 10 "$STEP_TIMEOUT" \
        target/go-client.test -test.count=1 -test.v -test.timeout=5m || rc=$?
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "the server died during the Go suite; its log:"
        tail -50 "$srvlog"
        rc=1
    fi
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return "$rc"
}

client_suites() {
    local io=$1 label="perch --io $1"
    [ "${NATS_REFERENCE:-}" = 1 ] && label="nats-server (reference)"
    counted_step "python client tests ($label)" no \
        env PERCH_IO="$io" PERCH_BIN="$PERCH_BIN" \
        timeout -k 10 "$STEP_TIMEOUT" python3 -m pytest -q -p no:cacheprovider tests/py
    counted_step "go client tests ($label)" no go_suite "$io"
}

# The client suites and the device tests against one cross-built binary,
# under qemu-user (PERCH_RUNNER), on the backend `--io auto` picks there (epoll).
emulated_suites() {
    local target=$1 bin runner
    bin=$REPO/target/$target/release/perch
    runner=$(bash cross/runner.sh "$target")
    counted_step "python client tests ($target under qemu)" no \
        env PERCH_IO=auto PERCH_BIN="$bin" PERCH_RUNNER="$runner" \
        timeout -k 10 "$STEP_TIMEOUT" python3 -m pytest -q -p no:cacheprovider tests/py
    counted_step "go client tests ($target under qemu)" no emulated_go_suite "$bin" "$runner"
    counted_step "device tests ($target under qemu)" yes \
        env PERCH_IO=auto PERCH_BIN="$bin" PERCH_RUNNER="$runner" \
        timeout -k 10 "$STEP_TIMEOUT" cargo test --test it device::
}

emulated_go_suite() {
    local PERCH_BIN=$1 PERCH_RUNNER=$2
    go_suite auto
}

build_cross() {
    local target
    for target in "$@"; do
        echo "--- $target"
        bash cross/build.sh "$target"
    done
}

build_debs() {
    local target
    for target in $DEB_TARGETS; do bash cross/deb.sh "$target"; done
}

# ---------------------------------------------------------------------- the run

if [ "$WHAT" = all ] || [ "$WHAT" = clients ] || [ "$WHAT" = lint ] || [ "$WHAT" = cross ]; then
    install_prereqs
elif ! command -v nats-server >/dev/null || ! command -v systemd-analyze >/dev/null; then
    install_prereqs # the Rust integration tests compare against nats-server and check the unit
fi

if [ "$WHAT" = all ] || [ "$WHAT" = lint ]; then
    step "cargo fmt --check" cargo fmt --all -- --check
    step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
fi

if [ "$WHAT" = all ] || [ "$WHAT" = rust ]; then
    # The Rust firmware client as firmware: no_std on thumbv7em, its flash use.
    step "firmware example, thumbv7em (size.sh)" bash firmware-clients/rust/size.sh
    # The C firmware client: generated files current, unit tests under
    # ASan/UBSan with gcc and clang, its Cortex-M4 size, a bounded fuzz run.
    counted_step "C client: generated files + unit tests (gcc, clang, ASan/UBSan)" no \
        make -C firmware-clients/c test
    step "C client: flash size (arm-none-eabi-gcc -Os)" make -C firmware-clients/c size
    step "C client: fuzz the frame decoder (30 s)" make -C firmware-clients/c fuzz FUZZ_SECONDS=30
fi

if [ "$WHAT" = all ] || [ "$WHAT" = rust ]; then
    for io in $BACKENDS; do
        counted_step "cargo test (PERCH_IO=$io)" yes \
            env PERCH_IO="$io" timeout -k 10 "$STEP_TIMEOUT" cargo test --workspace
    done
fi

if [ "$WHAT" = all ] || [ "$WHAT" = clients ]; then
    # Build once: the perch binary (debug is enough) and the Go test binary.
    if [ "${NATS_REFERENCE:-}" != 1 ] && [ -z "$PERCH_BIN_GIVEN" ]; then
        step "cargo build (perch binary)" cargo build --bin perch
    fi
    step "C client: build the examples" make -C firmware-clients/c
    step "go vet + build client tests" bash -c \
        'go vet ./tests/go/ ./tests/go/tlsclient/ && go test -c -o target/go-client.test ./tests/go/'
    if [ "${NATS_REFERENCE:-}" = 1 ]; then
        client_suites reference
    else
        for io in $BACKENDS; do client_suites "$io"; done
        counted_step "C client against the broker (UDP, serial, restart, sleep)" no \
            env PERCH_BIN="$PERCH_BIN" timeout -k 10 "$STEP_TIMEOUT" bash firmware-clients/c/tests/integration.sh
    fi
fi

if [ "$WHAT" = all ] || [ "$WHAT" = cross ]; then
    # Each target is built once per run; every cross step below reuses it.
    # shellcheck disable=SC2086 # word lists
    step "cross: build $(echo $CROSS_TARGETS $NATIVE_TARGETS | wc -w) targets (cross/build.sh)" \
        build_cross $CROSS_TARGETS $NATIVE_TARGETS
    # shellcheck disable=SC2086
    counted_step "cross: glibc <= 2.28, stripped <= 4 MiB on ARM, musl static + io_uring, runs (cross/check.sh)" no \
        bash cross/check.sh $CROSS_TARGETS $NATIVE_TARGETS
    [ -x target/go-client.test ] || step "go vet + build client tests" bash -c \
        'go vet ./tests/go/ ./tests/go/tlsclient/ && go test -c -o target/go-client.test ./tests/go/'
    for target in $CROSS_TARGETS; do emulated_suites "$target"; done
    step "deb: build the amd64, arm64 and armhf packages (cross/deb.sh)" build_debs
    counted_step "deb: lintian; install, upgrade, remove, purge amd64 here (cross/deb-test.sh)" no \
        bash cross/deb-test.sh
fi

summary
