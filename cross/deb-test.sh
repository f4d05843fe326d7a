#!/usr/bin/env bash
# cross/deb-test.sh: checks the .debs cross/deb.sh built under target/deb/:
#
#   - lintian finds no error in any of them (warnings must be overridden in
#     cross/deb/lintian-overrides, with the reason);
#   - the arm64 and armhf packages hold a binary of their architecture that
#     runs under qemu-user (unpacked into a scratch root with dpkg-deb -x);
#   - the amd64 package, installed on this machine with dpkg -i (root; CI
#     machines are throwaway), creates the perch user and /var/lib/perch,
#     registers its conffile, enables the unit (the unit passes systemd-analyze
#     verify), and its binary serves a NATS client and stores a stream as the
#     unit runs it (user perch, the packaged config); reinstalling keeps a
#     changed conffile; remove keeps config and data; purge removes both.
#
# Prints "ok - ..." / "not ok - ..." per check and ends with
# "deb checks: N passed, M failed" (the line tests/run.sh counts).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# shellcheck source=cross/checks.sh
. cross/checks.sh
INSTALLED_BY_US=0

# Runs a command, printing only its last line unless it fails (dpkg is chatty).
quietly() {
    local out
    out=$("$@" 2>&1) || {
        echo "$out"
        return 1
    }
    tail -1 <<<"$out"
}

cleanup() {
    if [ "$INSTALLED_BY_US" = 1 ] && dpkg-query -W -f='${Status}' perch 2>/dev/null | grep -qv 'not-installed'; then
        dpkg --purge perch >/dev/null 2>&1 || true
    fi
    rm -rf "$SCRATCH"
}
SCRATCH=$(mktemp -d)
trap cleanup EXIT

lintian_clean() { # DEB
    local out
    # --fail-on error: warnings are reported (and must be overridden), errors fail.
    out=$(lintian --fail-on error --display-info --show-overrides "$1" 2>&1 | grep -v 'running with root privileges') || {
        echo "$out"
        return 1
    }
    # One line: the tags by severity (I: info, O: overridden, with its reason).
    grep -E '^[EWIPO]: ' <<<"$out" | awk '{print $1 $3}' | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}'
    ! grep -q '^W: ' <<<"$out" || {
        echo " <- warnings need an override with a reason"
        return 1
    }
}

field_is() { # DEB FIELD VALUE
    local got
    got=$(dpkg-deb -f "$1" "$2")
    echo "$2: $got"
    [ "$got" = "$3" ]
}

unpacked_runs() { # DEB TARGET
    local root runner
    root=$SCRATCH/$(basename "$1" .deb)
    dpkg-deb -x "$1" "$root"
    read -r -a runner <<<"$(bash cross/runner.sh "$2")"
    local out
    out=$("${runner[@]}" "$root/usr/bin/perch" --version)
    echo "${runner[0]:-native}: $out"
    [ "$out" = "perch $VERSION" ]
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Runs the packaged binary the way perch.service does (ExecStart, User=,
# WorkingDirectory=) with a free port and /var/lib/perch as the store, then a
# client: INFO, PING/PONG, and a stream created through the JetStream API (so
# the perch user can write its state directory).
serves_as_the_unit() {
    local exec_start port log pid rc=0
    exec_start=$(sed -n 's/^ExecStart=//p' /lib/systemd/system/perch.service)
    [ -n "$exec_start" ] || {
        echo "no ExecStart in the installed unit"
        return 1
    }
    port=$(free_port)
    log=$SCRATCH/serve.log
    # shellcheck disable=SC2086 # ExecStart is a command line
    (cd /var/lib/perch && exec runuser -u perch -- $exec_start --listen "127.0.0.1:$port" \
        --store-dir /var/lib/perch) </dev/null >"$log" 2>&1 &
    pid=$!
    python3 - "$port" <<'EOF' || rc=$?
import json, socket, sys, time
port = int(sys.argv[1])
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("no listener")
        time.sleep(0.1)
s.settimeout(10)
buf = b""
def until(token):
    global buf
    while token not in buf:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"closed; got {buf!r}")
        buf += chunk
    head, _, buf = buf.partition(token)
    return head
assert until(b"\r\n").startswith(b"INFO "), "no INFO"
body = json.dumps({"name": "DEBTEST", "subjects": ["debtest.>"]}).encode()
s.sendall(b'CONNECT {"verbose":false}\r\nSUB _INBOX.deb 1\r\n'
          b"PUB $JS.API.STREAM.CREATE.DEBTEST _INBOX.deb " + str(len(body)).encode()
          + b"\r\n" + body + b"\r\nPING\r\n")
until(b"MSG _INBOX.deb 1 ")
size = int(until(b"\r\n"))
while len(buf) < size:
    buf += s.recv(65536)
reply = json.loads(buf[:size])
if "error" in reply:
    sys.exit(f"stream create failed: {reply['error']}")
assert reply["config"]["name"] == "DEBTEST", reply
EOF
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ "$rc" -eq 0 ] || {
        echo "client failed; server log:"
        tail -5 "$log"
        return 1
    }
    [ -d /var/lib/perch/streams/DEBTEST ] || {
        echo "no /var/lib/perch/streams/DEBTEST after the create"
        return 1
    }
    echo "INFO, stream DEBTEST stored under /var/lib/perch/streams as $(stat -c %U /var/lib/perch/streams/DEBTEST)"
}

state_dir_is_perchs() {
    local got
    got=$(stat -c '%U:%G %a' /var/lib/perch)
    echo "$got"
    [ "$got" = "perch:perch 750" ]
}

user_is_system() {
    local entry uid
    entry=$(getent passwd perch) || {
        echo "no perch user"
        return 1
    }
    uid=$(cut -d: -f3 <<<"$entry")
    echo "$entry"
    [ "$uid" -lt 1000 ] && [ "$(cut -d: -f6 <<<"$entry")" = /var/lib/perch ] &&
        [ "$(cut -d: -f7 <<<"$entry")" = /usr/sbin/nologin ]
}

is_conffile() {
    local got
    got=$(dpkg-query -W -f='${Conffiles}' perch)
    echo "$got" | tr -s ' \n' ' '
    grep -q '^ /etc/perch/perch.toml [0-9a-f]\{32\}' <<<"$got"
}

enabled() {
    local link=/etc/systemd/system/multi-user.target.wants/perch.service
    [ -L "$link" ] || {
        echo "no $link"
        return 1
    }
    echo "$link -> $(readlink "$link")"
}

unit_verifies() {
    local out
    out=$(systemd-analyze verify /lib/systemd/system/perch.service 2>&1) || {
        echo "$out"
        return 1
    }
    # verify prints warnings without failing; none are expected.
    [ -z "$out" ] || {
        echo "$out"
        return 1
    }
    echo "clean"
}

kept_changed_conffile() {
    grep -q '^# changed by deb-test' /etc/perch/perch.toml && echo "local change kept"
}

removed_keeps_config_and_data() {
    [ ! -e /usr/bin/perch ] || {
        echo "/usr/bin/perch still there"
        return 1
    }
    [ -f /etc/perch/perch.toml ] && [ -d /var/lib/perch/streams/DEBTEST ] || {
        echo "config or data gone after a remove"
        return 1
    }
    echo "binary gone; /etc/perch/perch.toml and /var/lib/perch kept"
}

purged() {
    local left=()
    for path in /etc/perch /var/lib/perch /lib/systemd/system/perch.service \
        /etc/systemd/system/multi-user.target.wants/perch.service /etc/systemd/system/perch.service; do
        [ ! -e "$path" ] && [ ! -L "$path" ] || left+=("$path")
    done
    [ ${#left[@]} -eq 0 ] || {
        echo "left behind: ${left[*]}"
        return 1
    }
    echo "config, state, unit and its links gone; the perch user stays (postrm says why)"
}

# ---------------------------------------------------------------------------

DEBS=(target/deb/perch_"${VERSION}"_*.deb)
[ -e "${DEBS[0]}" ] || {
    echo "no target/deb/perch_${VERSION}_*.deb: run cross/deb.sh first" >&2
    exit 1
}
for deb in "${DEBS[@]}"; do
    check "lintian $(basename "$deb"): no errors, no unexplained warnings" lintian_clean "$deb"
done
for pair in arm64:aarch64-unknown-linux-gnu armhf:armv7-unknown-linux-gnueabihf; do
    arch=${pair%%:*} target=${pair#*:}
    deb=target/deb/perch_${VERSION}_$arch.deb
    [ -e "$deb" ] || continue
    check "$(basename "$deb"): Architecture $arch" field_is "$deb" Architecture "$arch"
    check "$(basename "$deb"): unpacked /usr/bin/perch runs under qemu-user" unpacked_runs "$deb" "$target"
done

AMD64=target/deb/perch_${VERSION}_amd64.deb
if [ -e "$AMD64" ]; then
    [ "$(id -u)" -eq 0 ] || {
        echo "cross/deb-test.sh: installing the amd64 package needs root" >&2
        exit 1
    }
    if dpkg-query -W -f='${Status}' perch 2>/dev/null | grep -q 'ok installed'; then
        echo "cross/deb-test.sh: a perch package is already installed here; not touching it" >&2
        exit 1
    fi
    # A perch user left by an earlier run (purge keeps it): remove it, so this
    # run sees postinst create it.
    if getent passwd perch >/dev/null; then
        deluser --system --quiet perch >/dev/null 2>&1 || true
    fi
    if getent group perch >/dev/null; then
        delgroup --system --quiet perch >/dev/null 2>&1 || true
    fi
    INSTALLED_BY_US=1
    check "dpkg -i $(basename "$AMD64")" quietly dpkg -i "$AMD64"
    check "installed /usr/bin/perch --version" bash -c "[ \"\$(/usr/bin/perch --version)\" = 'perch $VERSION' ] && /usr/bin/perch --version"
    check "postinst created the perch system user" user_is_system
    check "/var/lib/perch belongs to perch, mode 750" state_dir_is_perchs
    check "/etc/perch/perch.toml is a conffile" is_conffile
    check "perch.service enabled (deb-systemd-helper)" enabled
    check "perch.service passes systemd-analyze verify" unit_verifies
    check "the packaged binary serves as the unit runs it (user perch, packaged config)" serves_as_the_unit
    echo "# changed by deb-test" >>/etc/perch/perch.toml
    check "dpkg -i again (upgrade path)" quietly dpkg -i --force-confold "$AMD64"
    check "a changed conffile survives the upgrade" kept_changed_conffile
    check "dpkg -r perch" quietly dpkg -r perch
    check "remove keeps config and data" removed_keeps_config_and_data
    check "dpkg -P perch" quietly dpkg -P perch
    check "purge removes config, data, unit links" purged
fi

checks_summary deb
