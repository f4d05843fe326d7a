#!/usr/bin/env bash
# Builds the example firmware (perch-device on a Cortex-M4F, opt-level "s",
# LTO) and prints its flash use: text + rodata + data (+ the vector table),
# as `flash_bytes=N`. Needs `rustup target add thumbv7em-none-eabihf`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target=thumbv7em-none-eabihf
cargo build --quiet --release --target "$target" \
    --manifest-path "$here/example-firmware/Cargo.toml" \
    --target-dir "${CARGO_TARGET_DIR:-$here/../../target}/firmware"
elf="${CARGO_TARGET_DIR:-$here/../../target}/firmware/$target/release/perch-example-firmware"
# readelf reads any architecture's ELF (binutils' size may not): sum the
# allocated sections that live in flash.
flash=$(readelf -S --wide "$elf" | awk '
    { for (i = 1; i <= NF; i++) if ($i ~ /^\.(vector_table|text|rodata|data)$/) { print $(i + 4) } }' |
    while read -r hex; do echo $((16#$hex)); done | awk '{ s += $1 } END { print s + 0 }')
ram=$(readelf -S --wide "$elf" | awk '
    { for (i = 1; i <= NF; i++) if ($i ~ /^\.(data|bss)$/) { print $(i + 4) } }' |
    while read -r hex; do echo $((16#$hex)); done | awk '{ s += $1 } END { print s + 0 }')
echo "flash_bytes=$flash"
echo "static_ram_bytes=$ram"
