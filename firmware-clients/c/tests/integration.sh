#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The C client's examples against the real broker, with a NATS client (a raw
# socket one, tests/nats_tool.py) on the other side:
#
#   - sensor_pub over UDP at QoS 1 and QoS 0, to a predefined id, and the
#     connectionless publish; over TCP at QoS 1
#   - sensor_sub over UDP receiving NATS publishes, and answering a request
#   - sleep and wake: commands published while the device sleeps are
#     buffered by the broker and collected at each wake
#   - QoS 1 across a broker restart: kill -9 mid-run, restart on the same
#     ports and store; sensor_pub still gets every ack and exits 0, and the
#     stream holds every payload
#   - no broker: a QoS 1 sensor_pub exits non-zero
#   - the serial framing over a pseudo-terminal pair with line noise
#
# Needs the broker binary (PERCH_BIN, default target/debug/perch: `cargo build
# --bin perch`) and the examples (`make -C firmware-clients/c`). Exits non-zero
# on any failure; the last line is "c client: N passed, M failed". KEEP_WORK=1
# keeps the logs (the path is printed at the end).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BIN=${PERCH_BIN:-$REPO/target/debug/perch}
PUB=$HERE/build/host/sensor_pub
SUB=$HERE/build/host/sensor_sub
NATS="python3 $HERE/tests/nats_tool.py"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/perch-c-it.XXXXXX")
PASSED=0
FAILED=0
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    [ -n "${KEEP_WORK:-}" ] && echo "logs kept in $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

for tool in "$BIN" "$PUB" "$SUB"; do
    if [ ! -x "$tool" ]; then
        echo "missing $tool (cargo build --bin perch; make -C firmware-clients/c)" >&2
        echo "c client: 0 passed, 1 failed"
        exit 1
    fi
done

pass() {
    echo "ok   $1"
    PASSED=$((PASSED + 1))
}

# fail NAME [LOG...]: counts a failure and shows the end of each log.
fail() {
    local name=$1 log
    shift
    echo "FAIL $name"
    for log in "$@"; do
        [ -f "$log" ] || continue
        echo "  --- $(basename "$log")"
        tail -n 15 "$log" | sed 's/^/    /'
    done
    FAILED=$((FAILED + 1))
}

free_port() { # a port free for both TCP and UDP
    python3 -c '
import socket
while True:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", port)); print(port); break
    except OSError:
        pass
    finally:
        t.close(); u.close()'
}

# wait_for FILE PATTERN SECONDS: until FILE has a line matching PATTERN.
wait_for() {
    local deadline=$((SECONDS + $3))
    while [ $SECONDS -lt $deadline ]; do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

# wait_lines FILE N SECONDS: until FILE has N lines.
wait_lines() {
    local deadline=$((SECONDS + $3))
    while [ $SECONDS -lt $deadline ]; do
        [ "$(wc -l <"$1" 2>/dev/null || echo 0)" -ge "$2" ] && return 0
        sleep 0.05
    done
    return 1
}

# wait_exit PID SECONDS: its exit status, or 124 (and killed) after SECONDS.
wait_exit() {
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then
            kill "$pid" 2>/dev/null
            wait "$pid" 2>/dev/null
            return 124
        fi
        sleep 0.05
    done
    wait "$pid"
}

BROKER_PID=
# start_broker LOG ARGS...: perch serve on $NATS_PORT, devices on $UDP_PORT.
start_broker() {
    local log=$1
    shift
    RUST_LOG=${RUST_LOG:-warn} "$BIN" serve --listen "127.0.0.1:$NATS_PORT" \
        --device-udp "127.0.0.1:$UDP_PORT" "$@" </dev/null >>"$log" 2>&1 &
    BROKER_PID=$!
    PIDS+=("$BROKER_PID")
    local _
    for _ in $(seq 1 100); do
        kill -0 "$BROKER_PID" 2>/dev/null || return 1
        python3 - "$NATS_PORT" 2>/dev/null <<'EOF' && return 0
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1) as s:
    s.settimeout(1)
    sys.exit(0 if s.recv(5) == b"INFO " else 1)
EOF
        sleep 0.1
    done
    return 1
}

stop_broker() {
    kill "$BROKER_PID" 2>/dev/null
    wait "$BROKER_PID" 2>/dev/null
}

# nats_sub NAME SUBJECT COUNT: a background NATS subscriber writing to
# $WORK/NAME.out, ready when this returns.
nats_sub() {
    $NATS "$NATS_PORT" sub "$2" "$3" 30 >"$WORK/$1.out" 2>"$WORK/$1.err" &
    PIDS+=("$!")
    SUB_PID=$!
    wait_for "$WORK/$1.err" ready 10
}

expect_lines() { # FILE EXPECTED...: the file's lines, sorted, are EXPECTED
    local got want
    got=$(sort "$1" | tr '\n' ' ')
    shift
    want=$(printf '%s\n' "$@" | sort | tr '\n' ' ')
    [ "$got" = "$want" ]
}

# ------------------------------------------------------------ one broker

NATS_PORT=$(free_port)
UDP_PORT=$(free_port)
TCP_PORT=$(free_port)
cat >"$WORK/perch.toml" <<EOF
[device]
tcp = "127.0.0.1:$TCP_PORT"

[device.predefined]
1 = "pre.{client}"
EOF
BROKER_LOG=$WORK/broker.log
if ! start_broker "$BROKER_LOG" --config "$WORK/perch.toml"; then
    fail "broker starts" "$BROKER_LOG"
    echo "c client: $PASSED passed, $FAILED failed"
    exit 1
fi

# QoS 1 over UDP: every reading reaches a NATS subscriber once.
name="sensor_pub QoS 1 over UDP reaches a NATS subscriber"
nats_sub q1 "c.pub.temp" 5
if "$PUB" 127.0.0.1 "$UDP_PORT" pub1 c.pub.temp "21.{n}" 5 1 2>"$WORK/q1.pub" &&
    wait_exit "$SUB_PID" 10 && expect_lines "$WORK/q1.out" 21.1 21.2 21.3 21.4 21.5; then
    pass "$name"
else
    fail "$name" "$WORK/q1.pub" "$WORK/q1.out"
fi

name="sensor_pub QoS 0 over UDP"
nats_sub q0 "c.pub.q0" 3
if "$PUB" 127.0.0.1 "$UDP_PORT" pub2 c.pub.q0 "r{n}" 3 0 2>"$WORK/q0.pub" &&
    wait_exit "$SUB_PID" 10 && expect_lines "$WORK/q0.out" r1 r2 r3; then
    pass "$name"
else
    fail "$name" "$WORK/q0.pub" "$WORK/q0.out"
fi

name="predefined ids: QoS 1, and the connectionless publish"
nats_sub pre "pre.>" 4
if "$PUB" 127.0.0.1 "$UDP_PORT" s7 '#1' "p{n}" 2 1 2>"$WORK/pre.pub" &&
    "$PUB" 127.0.0.1 "$UDP_PORT" s8 '#1' "on{n}" 2 3 2>>"$WORK/pre.pub" &&
    wait_exit "$SUB_PID" 10 && expect_lines "$WORK/pre.out" p1 p2 on1 on2; then
    pass "$name"
else
    fail "$name" "$WORK/pre.pub" "$WORK/pre.out"
fi

name="sensor_pub QoS 1 over TCP"
nats_sub tcp "c.tcp.x" 4
if "$PUB" --transport tcp 127.0.0.1 "$TCP_PORT" pub3 c.tcp.x "t{n}" 4 1 2>"$WORK/tcp.pub" &&
    wait_exit "$SUB_PID" 10 && expect_lines "$WORK/tcp.out" t1 t2 t3 t4; then
    pass "$name"
else
    fail "$name" "$WORK/tcp.pub" "$WORK/tcp.out"
fi

name="sensor_sub prints what NATS publishes"
"$SUB" 127.0.0.1 "$UDP_PORT" sub1 "c.cmd.*" 3 >"$WORK/sub.out" 2>"$WORK/sub.err" &
pid=$!
PIDS+=("$pid")
if wait_for "$WORK/sub.err" "subscribed to c.cmd.\*" 10 &&
    $NATS "$NATS_PORT" pub c.cmd.a one && $NATS "$NATS_PORT" pub c.cmd.b two &&
    $NATS "$NATS_PORT" pub c.cmd.a three && wait_exit "$pid" 10 &&
    [ "$(tr '\n' ' ' <"$WORK/sub.out")" = "one two three " ]; then
    pass "$name"
else
    fail "$name" "$WORK/sub.err" "$WORK/sub.out"
fi

name="sensor_sub answers a NATS request over the reply handle"
"$SUB" --reply pong 127.0.0.1 "$UDP_PORT" sub2 c.req 1 >"$WORK/req.out" 2>"$WORK/req.err" &
pid=$!
PIDS+=("$pid")
if wait_for "$WORK/req.err" "subscribed to c.req" 10 &&
    reply=$($NATS "$NATS_PORT" request c.req ping) && [ "$reply" = pong ] &&
    wait_exit "$pid" 10 && [ "$(cat "$WORK/req.out")" = ping ]; then
    pass "$name"
else
    fail "$name" "$WORK/req.err" "$WORK/req.out"
fi

# Sleep and wake: what NATS publishes while the device sleeps waits in the
# broker and arrives at the next wake (first a REGISTER of the new subject
# and the held messages, later buffered frames before the PONG).
name="sleep and wake collect the commands buffered meanwhile"
"$SUB" --sleep-s 20 --wake-ms 1500 127.0.0.1 "$UDP_PORT" sleeper c.sleep 5 \
    >"$WORK/sleep.out" 2>"$WORK/sleep.err" &
pid=$!
PIDS+=("$pid")
ok=1
wait_for "$WORK/sleep.err" "^asleep" 10 || ok=0
[ $ok = 1 ] && $NATS "$NATS_PORT" pub c.sleep a b c || ok=0
sleep 0.4
[ $ok = 1 ] && [ ! -s "$WORK/sleep.out" ] || { ok=0; echo "    delivered while asleep"; }
[ $ok = 1 ] && wait_lines "$WORK/sleep.out" 3 10 || ok=0
[ $ok = 1 ] && wait_for "$WORK/sleep.err" "wake done" 10 || ok=0
[ $ok = 1 ] && $NATS "$NATS_PORT" pub c.sleep d e || ok=0
if [ $ok = 1 ] && wait_exit "$pid" 15 &&
    [ "$(tr '\n' ' ' <"$WORK/sleep.out")" = "a b c d e " ] &&
    [ "$(grep -c "^waking" "$WORK/sleep.err")" -ge 2 ]; then
    pass "$name"
else
    fail "$name" "$WORK/sleep.err" "$WORK/sleep.out"
fi
stop_broker

# ------------------------------------------------- a restart mid-run

name="QoS 1 retries across a broker restart (kill -9, same ports and store)"
NATS_PORT=$(free_port)
UDP_PORT=$(free_port)
STORE=$WORK/store
mkdir -p "$STORE"
LOG=$WORK/restart-broker.log
ok=1
start_broker "$LOG" --store-dir "$STORE" || ok=0
[ $ok = 1 ] && $NATS "$NATS_PORT" js-create READINGS "c.store.>" || ok=0
if [ $ok = 1 ]; then
    "$PUB" --interval-ms 40 --retry-ms 300 --timeout-ms 40000 127.0.0.1 "$UDP_PORT" meter1 \
        c.store.kwh "{n}" 60 1 2>"$WORK/restart.pub" &
    pid=$!
    PIDS+=("$pid")
    sleep 1
    kill -9 "$BROKER_PID"
    wait "$BROKER_PID" 2>/dev/null
    sleep 0.5
    start_broker "$LOG" --store-dir "$STORE" || ok=0
    wait_exit "$pid" 45 || { ok=0; echo "    sensor_pub failed"; }
fi
if [ $ok = 1 ]; then
    $NATS "$NATS_PORT" js-payloads READINGS >"$WORK/restart.stored" || ok=0
    # Every payload is stored (a publish whose PUBACK died with the broker
    # may be stored twice: the new broker's session has a new window).
    [ "$(sort -un "$WORK/restart.stored" | tr '\n' ' ')" = "$(seq 1 60 | tr '\n' ' ')" ] ||
        { ok=0; echo "    the stream misses payloads"; }
    [ "$(grep -c '^connected' "$WORK/restart.pub")" -ge 2 ] ||
        { ok=0; echo "    the run did not span the restart"; }
fi
if [ $ok = 1 ]; then
    pass "$name ($(wc -l <"$WORK/restart.stored") stored)"
else
    fail "$name" "$WORK/restart.pub" "$LOG"
fi
stop_broker

name="sensor_pub QoS 1 with no broker exits non-zero"
DEAD_PORT=$(free_port)
if "$PUB" --timeout-ms 1500 --retry-ms 200 127.0.0.1 "$DEAD_PORT" lonely c.x 1 1 1 \
    2>"$WORK/dead.pub"; then
    fail "$name" "$WORK/dead.pub"
else
    pass "$name"
fi

# --------------------------------------------------------- serial line

name="the serial framing over a pseudo-terminal, with line noise"
python3 "$HERE/tests/pty_relay.py" "$WORK/pty.paths" --noise &
PIDS+=("$!")
ok=1
for _ in $(seq 1 100); do [ -f "$WORK/pty.paths" ] && break; sleep 0.05; done
read -r BROKER_TTY DEVICE_TTY <"$WORK/pty.paths" || ok=0
NATS_PORT=$(free_port)
UDP_PORT=$(free_port)
cat >"$WORK/serial.toml" <<EOF
[[device.serial]]
path = "$BROKER_TTY"
baud = 115200
EOF
LOG=$WORK/serial-broker.log
[ $ok = 1 ] && start_broker "$LOG" --config "$WORK/serial.toml" || ok=0
[ $ok = 1 ] && nats_sub serial "c.serial.>" 5 || ok=0
[ $ok = 1 ] && "$PUB" --transport serial "$DEVICE_TTY" 115200 uart0 c.serial.x "s{n}" 5 1 \
    2>"$WORK/serial.pub" || ok=0
[ $ok = 1 ] && wait_exit "$SUB_PID" 10 && expect_lines "$WORK/serial.out" s1 s2 s3 s4 s5 || ok=0
if [ $ok = 1 ]; then
    # The same line, now a subscriber.
    "$SUB" --transport serial "$DEVICE_TTY" 115200 uart1 c.serial.cmd 2 \
        >"$WORK/serial-sub.out" 2>"$WORK/serial-sub.err" &
    pid=$!
    PIDS+=("$pid")
    wait_for "$WORK/serial-sub.err" "subscribed to" 10 || ok=0
    [ $ok = 1 ] && $NATS "$NATS_PORT" pub c.serial.cmd x1 x2 || ok=0
    [ $ok = 1 ] && wait_exit "$pid" 10 &&
        [ "$(tr '\n' ' ' <"$WORK/serial-sub.out")" = "x1 x2 " ] || ok=0
fi
if [ $ok = 1 ]; then
    pass "$name"
else
    fail "$name" "$WORK/serial.pub" "$WORK/serial-sub.err" "$LOG"
fi
stop_broker

echo "c client: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
