#!/usr/bin/env python3
"""Prints the Debian copyright file (DEP-5) for perch's .deb for one target.

perch is Apache-2.0. The binary statically links Rust crates: the vendored
tokio-uring (cross/patches/tokio-uring, MIT) and those from crates.io, listed
with their own licence expressions, taken from `cargo metadata` for the
target's graph of normal (linked) dependencies; proc-macros and build
dependencies run at build time only and are left out.
"""

import json
import subprocess
import sys

target = sys.argv[1]
meta = json.loads(subprocess.run(
    ["cargo", "metadata", "--format-version", "1", "--locked", "--offline",
     "--filter-platform", target],
    check=True, capture_output=True, text=True).stdout)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = next(i for i, p in packages.items() if p["name"] == "perch" and p["source"] is None)


def linked(dep):
    if not any(k["kind"] is None for k in dep["dep_kinds"]):
        return False
    kinds = {k for t in packages[dep["pkg"]]["targets"] for k in t["kind"]}
    return "proc-macro" not in kinds


seen, todo = set(), [root]
while todo:
    node = nodes[todo.pop()]
    for dep in node["deps"]:
        if dep["pkg"] not in seen and linked(dep):
            seen.add(dep["pkg"])
            todo.append(dep["pkg"])

crates = sorted((packages[i]["name"], packages[i]["version"], packages[i]["license"] or "unknown")
                for i in seen)

MIT = """Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the "Software"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
 THE SOFTWARE."""

print("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/")
print("Upstream-Name: perch")
print("Comment: The perch binary statically links these Rust crates (name version")
print(" licence), each under its own licence; their sources are on crates.io,")
print(" except tokio-uring, vendored with a patch in cross/patches/tokio-uring, and")
print(" the Rust standard library (MIT OR Apache-2.0):")
for name, version, licence in crates:
    print(f"  {name} {version} {licence}")
print()
print("Files: *")
print("Copyright: perch developers")
print("License: Apache-2.0")
print()
print("Files: cross/patches/tokio-uring/*")
print("Copyright: 2021 Carl Lerche, Tokio Contributors")
print("License: MIT")
print()
print("License: Apache-2.0")
print(" On Debian systems, the full text of the Apache License, Version 2.0 is in")
print(" /usr/share/common-licenses/Apache-2.0.")
print()
print("License: MIT")
print(" " + MIT)
