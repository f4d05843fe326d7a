# Sourced by cross/check.sh and cross/deb-test.sh: one counted check each,
# printed TAP-style, and the summary line tests/run.sh counts.
PASSED=0 FAILED=0

check() { # check DESCRIPTION COMMAND...
    local what=$1
    shift
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    if [ "$rc" -eq 0 ]; then
        PASSED=$((PASSED + 1))
        echo "ok - $what${out:+ ($out)}"
    else
        FAILED=$((FAILED + 1))
        echo "not ok - $what"
        [ -z "$out" ] || echo "$out" | sed 's/^/    /'
    fi
}

# checks_summary NAME: "NAME checks: N passed, M failed"; fails if any failed.
checks_summary() {
    echo "$1 checks: $PASSED passed, $FAILED failed"
    [ "$FAILED" -eq 0 ]
}
