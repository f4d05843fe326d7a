#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Writes one libFuzzer seed file per line of tests/vectors.txt: the mode byte
fuzz_frames.c expects, then the case's bytes."""
import pathlib
import sys

MODES = {("D", "udp"): 0, ("B", "udp"): 1, ("D", "serial"): 2, ("B", "serial"): 2,
         ("D", "tcp"): 3, ("B", "tcp"): 3}

vectors, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for index, line in enumerate(vectors.read_text().splitlines()):
    if line.startswith("#") or not line:
        continue
    kind, origin, framing, hexbytes = line.split("\t")[:4]
    data = bytes.fromhex(hexbytes)
    (out / f"seed-{index:04d}").write_bytes(bytes([MODES[(origin, framing)]]) + data)
    if origin == "B" and framing == "udp":
        # Mode 4 drives a client with the frame.
        (out / f"client-{index:04d}").write_bytes(bytes([4]) + bytes([len(data)]) + data)
