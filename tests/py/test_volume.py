"""Volume and size limits with nats-py: many messages in order, payloads at
and over the server's max_payload."""

import asyncio

import nats.errors
import pytest

from conftest import sync, with_clients

WAIT = 5


def test_many_messages_arrive_complete_and_in_order(server_url):
    n = 100_000

    async def body(c):
        pub, subc = await c.connect(), await c.connect()
        received = []
        done = asyncio.Event()

        async def cb(msg):
            received.append(msg.data)
            if len(received) == n:
                done.set()

        # No client-side limit: the whole burst may sit in the client's queue.
        await subc.subscribe("bulk.seq", cb=cb, pending_msgs_limit=0, pending_bytes_limit=0)
        await sync(subc)
        for k in range(n):
            await pub.publish("bulk.seq", b"%d" % k)
        await sync(pub, timeout=30)
        try:
            await asyncio.wait_for(done.wait(), 60)
        except asyncio.TimeoutError:
            pytest.fail(f"received {len(received)} of {n}")
        expected = [b"%d" % k for k in range(n)]
        if received != expected:
            first = next(i for i, (a, b) in enumerate(zip(received, expected)) if a != b)
            pytest.fail(f"out of order at {first}: got {received[first]!r}")

    with_clients(server_url, body, timeout=120)


def test_payload_of_exactly_max_payload(server_url):
    async def body(c):
        pub, subc = await c.connect(), await c.connect()
        size = pub.max_payload
        payload = bytes(ord("a") + i % 26 for i in range(size))
        sub = await subc.subscribe("big.one")
        await sync(subc)
        await pub.publish("big.one", payload)
        await pub.publish("big.one", payload[: size - 1])
        msg = await sub.next_msg(timeout=WAIT)
        assert len(msg.data) == size and msg.data == payload
        msg = await sub.next_msg(timeout=WAIT)
        assert msg.data == payload[: size - 1]

    with_clients(server_url, body)


def test_payload_over_max_payload_is_refused(server_url):
    async def body(c):
        pub, subc = await c.connect(), await c.connect()
        sub = await subc.subscribe("big.two")
        await sync(subc)
        # The client read max_payload from the server's INFO and refuses.
        with pytest.raises(nats.errors.MaxPayloadError):
            await pub.publish("big.two", b"x" * (pub.max_payload + 1))
        # The connection is still usable.
        await pub.publish("big.two", b"small")
        assert (await sub.next_msg(timeout=WAIT)).data == b"small"

    with_clients(server_url, body)
