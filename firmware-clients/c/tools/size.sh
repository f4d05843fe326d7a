#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Prints the library's flash use per object and in total for the objects in
# $1 (built -Os) and $2 (built -O2): text + rodata + data, the sections a
# Cortex-M keeps in flash, as `flash_bytes=N` (the -Os figure); the client
# struct's size as `state_bytes=N`; and fails if the library needs any libc
# symbol beyond memcpy and memset.
set -euo pipefail
os_dir=$1
o2_dir=$2
tool=${ARM_PREFIX:-arm-none-eabi-}

flash_of() { # object -> bytes in .text*, .rodata*, .data*
    "${tool}size" -A "$1" | awk '$1 ~ /^\.(text|rodata|data)/ { s += $2 } END { print s + 0 }'
}

printf '%-12s %8s %8s\n' object "-Os" "-O2"
total_os=0 total_o2=0
for obj in wire framing client run protect; do
    os=$(flash_of "$os_dir/$obj.o")
    o2=$(flash_of "$o2_dir/$obj.o")
    total_os=$((total_os + os))
    total_o2=$((total_o2 + o2))
    printf '%-12s %8d %8d\n' "$obj.c" "$os" "$o2"
done
printf '%-12s %8d %8d\n' total "$total_os" "$total_o2"

objs=("$os_dir"/{wire,framing,client,run,protect}.o)
defined=$("${tool}nm" --defined-only "${objs[@]}" | awk 'NF == 3 { print $3 }' | sort -u)
undefined=$("${tool}nm" -u "${objs[@]}" | awk 'NF == 2 { print $2 }' | sort -u)
external=$(comm -23 <(echo "$undefined") <(echo "$defined") | tr '\n' ' ')
echo "external symbols: $external"
for symbol in $external; do
    case $symbol in
    memcpy | memset) ;;
    *)
        echo "FAIL: the library needs $symbol (only memcpy and memset are allowed)" >&2
        exit 1
        ;;
    esac
done
probe() { echo $((16#$("${tool}nm" -S "$os_dir/probe.o" | awk -v s="$1" '$4 == s { print $2 }'))); }
state=$(probe perch_state_probe)
echo "caller tables: perch_name_t $(probe perch_name_probe) B, perch_outgoing_t" \
    "$(probe perch_outgoing_probe) B each; perch_config_t $(probe perch_config_probe) B"
echo "flash_bytes_O2=$total_o2"
echo "flash_bytes=$total_os"
echo "state_bytes=$state"
