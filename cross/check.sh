#!/usr/bin/env bash
# cross/check.sh TARGET...: checks the distribution binaries cross/build.sh left
# at target/TARGET/release/perch, and the cross configuration:
#
#   - the binary is for TARGET's machine, stripped, and at most 4 MiB on ARM
#     (issue 10's bound); x86_64 code is larger (ring's x86 assembly, wider
#     instructions): there 6 MiB guards against regressions;
#   - gnu: it needs no glibc symbol newer than 2.28 (objdump -T);
#   - musl: it is static (no interpreter, no shared libraries) and has the
#     io_uring backend compiled in;
#   - it runs (under qemu-user for ARM): `--version`, and `serve --io auto`
#     accepts a NATS client, on io_uring natively or, under qemu-user (no
#     io_uring), on epoll with the fallback said in the log;
#   - Cross.toml names the four ARM targets, hands cross the same profile
#     settings as cross/dist.env and pins the glibc that cross/build.sh does.
#
# Prints "ok - ..." or "not ok - ..." per check and ends with
# "cross checks: N passed, M failed" (the line tests/run.sh counts); exits 1 if
# any check failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_BYTES_MAX_ARM=$((4 << 20))
SIZE_BYTES_MAX_X86=$((6 << 20))
GLIBC_FLOOR=$(sed -n 's/^GLIBC_FLOOR=//p' cross/build.sh)
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# shellcheck source=cross/checks.sh
. cross/checks.sh

machine_of() {
    case $1 in
    aarch64-*) echo AArch64 ;;
    armv7-*) echo ARM ;;
    x86_64-*) echo X86-64 ;;
    esac
}

is_machine() { # BIN MACHINE
    local got
    got=$(readelf -h "$1" | sed -n 's/^ *Machine: *//p')
    case $2 in
    AArch64) [ "$got" = AArch64 ] ;;
    ARM) [ "$got" = ARM ] ;;
    X86-64) [ "$got" = "Advanced Micro Devices X86-64" ] ;;
    esac || {
        echo "machine is '$got'"
        return 1
    }
    echo "$got"
}

stripped_and_small() { # BIN MAX_BYTES
    local size
    size=$(stat -c %s "$1")
    if readelf -S "$1" | grep -q '\.symtab'; then
        echo "not stripped: it has a .symtab"
        return 1
    fi
    echo "$size bytes, $(awk -v s="$size" 'BEGIN{printf "%.2f", s/1048576}') MiB"
    [ "$size" -le "$2" ]
}

glibc_at_most_floor() { # BIN
    local newest
    newest=$(objdump -T "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
    [ -n "$newest" ] || {
        echo "no GLIBC_ symbol versions at all"
        return 1
    }
    echo "newest GLIBC_$newest"
    [ "$(printf '%s\n%s\n' "$newest" "$GLIBC_FLOOR" | sort -V | tail -1)" = "$GLIBC_FLOOR" ]
}

is_static() { # BIN
    if readelf -lW "$1" | grep -q 'INTERP'; then
        echo "has a program interpreter: $(readelf -lW "$1" | grep -o 'interpreter: [^]]*')"
        return 1
    fi
    if readelf -dW "$1" 2>/dev/null | grep -q '(NEEDED)'; then
        echo "needs shared libraries: $(readelf -dW "$1" | grep '(NEEDED)' | grep -o '\[.*\]' | tr '\n' ' ')"
        return 1
    fi
    echo "no interpreter, no shared libraries"
}

has_uring_backend() { # BIN
    # runtime/mod.rs says this only where the uring feature is off.
    if grep -qa 'built without io_uring support' "$1"; then
        echo "built without the io_uring backend (epoll only)"
        return 1
    fi
    echo "io_uring backend compiled in"
}

prints_version() { # BIN RUNNER...
    local bin=$1 out
    shift
    out=$("$@" "$bin" --version)
    echo "$out"
    [ "$out" = "perch $VERSION" ]
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# serves BIN EXPECTED_IO RUNNER...: `serve --io auto` must answer a NATS
# client's PING and log the backend it chose (and, on epoll, the fallback).
serves() {
    local bin=$1 expected=$2
    shift 2
    local port log pid rc=0
    port=$(free_port)
    log=$(mktemp)
    RUST_LOG=info "$@" "$bin" serve --listen "127.0.0.1:$port" --io auto --shards 2 </dev/null >"$log" 2>&1 &
    pid=$!
    python3 - "$port" <<'EOF' || rc=$?
import socket, sys, time
port = int(sys.argv[1])
deadline = time.monotonic() + 20
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("no listener")
        time.sleep(0.1)
s.settimeout(10)
data = b""
while b"\r\n" not in data:
    data += s.recv(4096)
assert data.startswith(b"INFO "), data
s.sendall(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
data = b""
while b"PONG\r\n" not in data:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit(f"closed before PONG: {data!r}")
    data += chunk
EOF
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local line
    line=$(grep -m1 'listening on' "$log" || true)
    rm -f "$log"
    [ "$rc" -eq 0 ] || {
        echo "no PONG; log: $line"
        return 1
    }
    echo "PONG; ${line#*INFO }"
    case $expected in
    Uring) grep -q 'io=Uring' <<<"$line" ;;
    Epoll) grep -q 'io=Epoll' <<<"$line" && grep -q 'io_uring unavailable: .*falling back to epoll' <<<"$line" ;;
    esac
}

# Whether this machine (natively, not under qemu) has io_uring.
native_uring() {
    [ "$(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo 0)" = 0 ]
}

cross_toml_consistent() {
    python3 - "$GLIBC_FLOOR" <<'EOF'
import sys, tomllib
floor = sys.argv[1]
cross = tomllib.load(open("cross/Cross.toml", "rb"))
dist = [l.strip() for l in open("cross/dist.env") if l.strip() and not l.startswith("#")]
want = {"aarch64-unknown-linux-gnu", "armv7-unknown-linux-gnueabihf",
        "aarch64-unknown-linux-musl", "armv7-unknown-linux-musleabihf"}
targets = cross.get("target", {})
errors = []
if set(targets) != want:
    errors.append(f"targets {sorted(targets)} != {sorted(want)}")
passed = [p for p in cross["build"]["env"]["passthrough"] if "=" in p]
if passed != dist:
    errors.append(f"passthrough {passed} != cross/dist.env {dist}")
for name, table in targets.items():
    zig = table.get("zig")
    if name.endswith("-gnu") or name.endswith("-gnueabihf"):
        if zig != floor:
            errors.append(f"{name}: zig = {zig!r}, cross/build.sh pins {floor}")
    elif zig is not None:
        errors.append(f"{name}: zig is for glibc targets only")
    if table.get("runner") != "qemu-user":
        errors.append(f"{name}: runner {table.get('runner')!r}")
if errors:
    sys.exit("; ".join(errors))
print(f"{len(targets)} targets, {len(dist)} profile settings, glibc {floor}")
EOF
}

[ $# -gt 0 ] || {
    echo "usage: cross/check.sh TARGET..." >&2
    exit 2
}
check "Cross.toml agrees with cross/dist.env and cross/build.sh" cross_toml_consistent
for target in "$@"; do
    bin=target/$target/release/perch
    if [ ! -x "$bin" ]; then
        check "$target: $bin exists (run cross/build.sh $target)" false
        continue
    fi
    read -r -a runner <<<"$(bash cross/runner.sh "$target")"
    check "$target: an ELF for $(machine_of "$target")" is_machine "$bin" "$(machine_of "$target")"
    case $target in
    x86_64-*) max=$SIZE_BYTES_MAX_X86 ;;
    *) max=$SIZE_BYTES_MAX_ARM ;;
    esac
    check "$target: stripped, at most $((max >> 20)) MiB" stripped_and_small "$bin" "$max"
    case $target in
    *-gnu | *-gnueabihf) check "$target: no glibc symbol newer than $GLIBC_FLOOR" glibc_at_most_floor "$bin" ;;
    *-musl | *-musleabihf)
        check "$target: static" is_static "$bin"
        check "$target: keeps the io_uring backend" has_uring_backend "$bin"
        ;;
    esac
    check "$target: --version${runner[*]:+ under ${runner[0]}}" prints_version "$bin" "${runner[@]}"
    if [ ${#runner[@]} -gt 0 ]; then
        check "$target: serve --io auto under ${runner[0]}: epoll, fallback logged, answers PING" \
            serves "$bin" Epoll "${runner[@]}"
    elif native_uring; then
        check "$target: serve --io auto natively: io_uring, answers PING" serves "$bin" Uring
    else
        check "$target: serve --io auto natively (no io_uring here): epoll, answers PING" serves "$bin" Epoll
    fi
done

checks_summary cross
