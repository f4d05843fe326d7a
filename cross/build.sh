#!/usr/bin/env bash
# cross/build.sh TARGET: builds perch's distribution binary for TARGET without a
# container and leaves it at target/TARGET/release/perch (stripped).
#
#   bash cross/build.sh aarch64-unknown-linux-gnu       # Raspberry Pi OS / Debian arm64
#   bash cross/build.sh armv7-unknown-linux-gnueabihf   # Raspberry Pi OS / Debian armhf
#   bash cross/build.sh aarch64-unknown-linux-musl      # static: Alpine, Yocto, anything
#   bash cross/build.sh armv7-unknown-linux-musleabihf  # static, 32-bit ARM
#   bash cross/build.sh x86_64-unknown-linux-gnu        # amd64 (the amd64 .deb)
#   bash cross/build.sh x86_64-unknown-linux-musl       # static amd64
#
# How: rustup's standard library for TARGET and cargo-zigbuild (from PyPI) as the
# linker. zig links the gnu targets against glibc 2.28's symbol set
# (`--target T.2.28`), so they run on Debian 10 / Raspberry Pi OS buster and
# later; Debian's own cross gcc links against the build machine's glibc (2.36 on
# Debian 12) and the binaries then need GLIBC_2.34 (measured). The musl targets
# are static and keep the io_uring backend (cross/patches/tokio-uring).
#
# The profile is cargo's release profile with cross/dist.env applied (fat LTO,
# one codegen unit, stripped): the same settings Cross.toml hands `cross`.
#
# Installs what is missing: the rustup target (or, where rustup has no prebuilt
# standard library for it, a nightly toolchain with rust-src to build it with
# -Zbuild-std) and cargo-zigbuild + ziglang from PyPI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Pinned, so two machines link the same way.
CARGO_ZIGBUILD_VERSION=0.24.1
ZIGLANG_VERSION=0.17.1
# The newest glibc symbol version the gnu binaries may need.
GLIBC_FLOOR=2.28

usage() {
    sed -n '2,10p' "$0" >&2
    exit 2
}
[ $# -eq 1 ] || usage
TARGET=$1
case $TARGET in
aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf | x86_64-unknown-linux-gnu)
    ZIG_TARGET=$TARGET.$GLIBC_FLOOR
    ;;
aarch64-unknown-linux-musl | armv7-unknown-linux-musleabihf | x86_64-unknown-linux-musl)
    ZIG_TARGET=$TARGET
    ;;
*)
    echo "cross/build.sh: unsupported target $TARGET" >&2
    usage
    ;;
esac

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

zigbuild_ok() {
    command -v cargo-zigbuild >/dev/null &&
        [ "$(cargo-zigbuild --version 2>/dev/null | awk '{print $2}')" = "$CARGO_ZIGBUILD_VERSION" ] &&
        python3 -c 'import ziglang' 2>/dev/null
}

if ! zigbuild_ok; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "installing python3-pip (Debian)"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip
    fi
    echo "installing cargo-zigbuild==$CARGO_ZIGBUILD_VERSION ziglang==$ZIGLANG_VERSION (PyPI)"
    # PIP_BREAK_SYSTEM_PACKAGES: Debian 12's own python refuses pip installs
    # without it; a virtualenv or pyenv python ignores it.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check \
        --root-user-action=ignore "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION" "ziglang==$ZIGLANG_VERSION"
    PATH=$PATH:$(python3 -m site --user-base)/bin
    zigbuild_ok || {
        echo "cross/build.sh: cargo-zigbuild $CARGO_ZIGBUILD_VERSION is not usable after installing it" >&2
        exit 1
    }
fi

# The standard library for TARGET: rustup's prebuilt one if it has it, else
# built from source on nightly (rustup mirrors do not all carry every tier-2
# target; armv7-unknown-linux-musleabihf was missing from this one).
TOOLCHAIN=() BUILD_STD=()
if ! rustup target list --installed | grep -qx "$TARGET"; then
    if ! rustup target add "$TARGET"; then
        echo "no prebuilt standard library for $TARGET: building it from source on nightly (-Zbuild-std)"
        rustup toolchain list | grep -q '^nightly' ||
            rustup toolchain install nightly --profile minimal
        rustup component list --toolchain nightly --installed | grep -q '^rust-src' ||
            rustup component add rust-src --toolchain nightly
        TOOLCHAIN=(+nightly)
        BUILD_STD=("-Zbuild-std=std,panic_abort")
        # musl's crt objects and libunwind come with rustup's std for the
        # target (its "self-contained" files), so without it zig supplies its
        # own musl and libunwind.
        case $TARGET in *-musl*) export RUSTFLAGS="${RUSTFLAGS:-} -C link-self-contained=no" ;; esac
    fi
fi

set -a
# shellcheck source=cross/dist.env
. cross/dist.env
set +a

echo "cargo ${TOOLCHAIN[*]} zigbuild --release --locked --target $ZIG_TARGET ${BUILD_STD[*]}"
cargo "${TOOLCHAIN[@]}" zigbuild --release --locked --bin perch --target "$ZIG_TARGET" "${BUILD_STD[@]}"

BIN=target/$TARGET/release/perch
[ -x "$BIN" ] || {
    echo "cross/build.sh: $BIN was not produced" >&2
    exit 1
}
echo "built $BIN ($(stat -c %s "$BIN") bytes)"
