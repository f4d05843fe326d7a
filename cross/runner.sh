#!/usr/bin/env bash
# cross/runner.sh TARGET: prints the command that runs TARGET's binaries on this
# (x86_64) machine: qemu-user with the target's Debian sysroot for the ARM
# targets (the static musl binaries do not need the sysroot, and do not mind
# it), nothing for x86_64. tests/run.sh hands it to the suites as PERCH_RUNNER.
set -euo pipefail
case ${1:-} in
aarch64-unknown-linux-gnu | aarch64-unknown-linux-musl) echo "qemu-aarch64-static -L /usr/aarch64-linux-gnu" ;;
armv7-unknown-linux-gnueabihf | armv7-unknown-linux-musleabihf) echo "qemu-arm-static -L /usr/arm-linux-gnueabihf" ;;
x86_64-unknown-linux-gnu | x86_64-unknown-linux-musl) echo "" ;;
*)
    echo "usage: cross/runner.sh TARGET" >&2
    exit 2
    ;;
esac
