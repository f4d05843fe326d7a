#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A null-modem cable made of two pseudo-terminals, for tests/integration.sh:
the broker opens one end as its [[device.serial]] line, the C client opens
the other like a UART, and this process copies bytes between the two masters.

It writes "BROKER_PATH DEVICE_PATH" to the file named by its first argument,
then relays until killed. With --noise it also injects line noise ending in
0x00 between chunks in both directions, so both deframers must resynchronise
(and the client's QoS 1 retries must cover the frames the noise cut).
"""
import os
import pty
import select
import sys
import termios
import tty


def raw_pair():
    master, slave = pty.openpty()
    tty.setraw(master, termios.TCSANOW)
    tty.setraw(slave, termios.TCSANOW)
    return master, slave, os.ttyname(slave)


def main():
    noise = "--noise" in sys.argv
    broker_master, broker_slave, broker_path = raw_pair()
    device_master, device_slave, device_path = raw_pair()
    with open(sys.argv[1] + ".tmp", "w") as out:
        out.write(f"{broker_path} {device_path}\n")
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    # Keep the slaves open here too, so a side that closes its end does not
    # hang the line up for the other (the master reads EIO then).
    other = {broker_master: device_master, device_master: broker_master}
    chunks = 0
    garbage = b"\x55\xaa\x13\x42\x00"
    if noise:
        os.write(broker_master, garbage)
        os.write(device_master, garbage)
    while True:
        ready, _, _ = select.select(list(other), [], [], 1.0)
        for fd in ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                continue
            chunks += 1
            if noise and chunks % 7 == 0:
                data = garbage + data
            os.write(other[fd], data)


if __name__ == "__main__":
    main()
