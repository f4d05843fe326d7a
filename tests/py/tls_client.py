"""A nats-py client for perch's TLS tests (tests/it/tls.rs runs it).

    python3 tests/py/tls_client.py URL CA [--cert C --key K] [--first] [--expect-refused]

Connects over TLS (ssl.SSLContext trusting CA, with a client certificate if
given; --first: nats-py's tls_handshake_first), publishes to its own
subscription and prints "ok" once the message came back. Not a pytest module:
the Rust test owns the server and its certificates.
"""

import argparse
import asyncio
import ssl
import sys

import nats


async def round_trip(args):
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    nc = await nats.connect(args.url, tls=context, tls_handshake_first=args.first,
                            allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0)
    try:
        sub = await nc.subscribe("tls.py")
        await nc.publish("tls.py", b"hello over tls")
        msg = await sub.next_msg(timeout=5)
        if msg.data != b"hello over tls":
            raise RuntimeError(f"got {msg.data!r}")
        await nc.flush(timeout=5)
    finally:
        await nc.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--first", action="store_true")
    parser.add_argument("--expect-refused", action="store_true")
    args = parser.parse_args()
    try:
        asyncio.run(asyncio.wait_for(round_trip(args), 15))
    except Exception as e:  # noqa: BLE001 (any failure is the answer here)
        if args.expect_refused:
            print(f"refused: {e!r}")
            return 0
        print(f"error: {e!r}")
        return 1
    if args.expect_refused:
        print("let in without a certificate")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
