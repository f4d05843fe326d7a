#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""A tiny raw-socket NATS client for tests/integration.sh (no dependencies):
the other side of the C device client.

  nats_tool.py PORT sub SUBJECT COUNT TIMEOUT_S   print COUNT payloads, one a line
                                                  ("ready" on stderr once subscribed)
  nats_tool.py PORT pub SUBJECT PAYLOAD...        publish each PAYLOAD, then flush
  nats_tool.py PORT request SUBJECT BODY          print the reply's payload
  nats_tool.py PORT js-create STREAM SUBJECT      create a file stream on SUBJECT
  nats_tool.py PORT js-payloads STREAM            print every stored payload
"""
import base64
import json
import socket
import sys
import time


class Nats:
    def __init__(self, port, timeout_s=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.buf = b""
        info = self.line()
        if not info.startswith(b"INFO "):
            raise SystemExit(f"not a NATS server: {info!r}")
        self.send(b'CONNECT {"verbose":false,"pedantic":false}\r\n')

    def send(self, data):
        self.sock.sendall(data)

    def fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise SystemExit("the server closed the connection")
        self.buf += chunk

    def line(self):
        while b"\r\n" not in self.buf:
            self.fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exact(self, n):
        while len(self.buf) < n + 2:
            self.fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def flush(self):
        self.send(b"PING\r\n")
        self.next_message(until_pong=True)

    def next_message(self, until_pong=False):
        """The next MSG as (subject, reply, payload); None at PONG if asked."""
        while True:
            line = self.line()
            if line == b"PING":
                self.send(b"PONG\r\n")
            elif line == b"PONG":
                if until_pong:
                    return None
            elif line.startswith(b"MSG "):
                parts = line.split()
                reply = parts[3] if len(parts) == 5 else None
                return parts[1], reply, self.exact(int(parts[-1]))
            elif line.startswith(b"-ERR"):
                raise SystemExit(f"server error: {line!r}")

    def request(self, subject, body):
        inbox = f"_INBOX.c{time.monotonic_ns()}"
        self.send(f"SUB {inbox} 99\r\n".encode())
        self.flush()
        self.send(f"PUB {subject} {inbox} {len(body)}\r\n".encode() + body + b"\r\n")
        while True:
            message = self.next_message()
            if message and message[0] == inbox.encode():
                self.send(b"UNSUB 99\r\n")
                return message[2]


def main():
    port, command, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if command == "sub":
        subject, count, timeout_s = args[0], int(args[1]), float(args[2])
        nats = Nats(port, timeout_s)
        nats.send(f"SUB {subject} 1\r\n".encode())
        nats.flush()
        print("ready", file=sys.stderr, flush=True)
        for _ in range(count):
            _, _, payload = nats.next_message()
            sys.stdout.buffer.write(payload + b"\n")
            sys.stdout.flush()
    elif command == "pub":
        nats = Nats(port)
        for payload in args[1:]:
            data = payload.encode()
            nats.send(f"PUB {args[0]} {len(data)}\r\n".encode() + data + b"\r\n")
        nats.flush()
    elif command == "request":
        nats = Nats(port)
        sys.stdout.buffer.write(nats.request(args[0], args[1].encode()) + b"\n")
    elif command == "js-create":
        nats = Nats(port)
        config = {"name": args[0], "subjects": [args[1]], "storage": "file"}
        reply = json.loads(nats.request(f"$JS.API.STREAM.CREATE.{args[0]}",
                                        json.dumps(config).encode()))
        if "error" in reply:
            raise SystemExit(f"stream create failed: {reply}")
    elif command == "js-payloads":
        nats = Nats(port)
        info = json.loads(nats.request(f"$JS.API.STREAM.INFO.{args[0]}", b""))
        state = info["state"]
        for seq in range(state["first_seq"], state["last_seq"] + 1):
            reply = json.loads(nats.request(f"$JS.API.STREAM.MSG.GET.{args[0]}",
                                            json.dumps({"seq": seq}).encode()))
            if "message" in reply:
                sys.stdout.buffer.write(base64.b64decode(reply["message"]["data"]) + b"\n")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
