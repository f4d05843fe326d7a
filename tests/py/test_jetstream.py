"""JetStream with nats-py: streams (add, info, update, purge, delete), publish
with PubAcks, message get, pull consumers (fetch, ack, ack_wait redelivery,
nak, term, in-progress), push subscriptions and consumer info.

Each test gets a server of its own over a fresh store directory
(`js_server_url`): perch with `--store-dir`, or with `NATS_REFERENCE=1`
`nats-server -js`, which is what proves them. No test asserts that something happened quickly:
waits are bounded, generously; where something must *not* happen (a
redelivery), the test waits several ack_waits and then looks.
"""

import asyncio

import nats.errors
import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StreamConfig

from conftest import sync, with_clients

WAIT = 5  # seconds for any single receive or request


async def js_connect(c):
    nc = await c.connect()
    return nc, nc.jetstream(timeout=WAIT)


def seqs(msgs):
    return [m.metadata.sequence.stream for m in msgs]


async def fetch_all(psub, n, timeout=WAIT):
    """Fetches until `n` messages came (several fetches if the server splits them)."""
    got = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4 * timeout
    while len(got) < n:
        assert loop.time() < deadline, f"only {len(got)} of {n} messages: {seqs(got)}"
        try:
            got += await psub.fetch(n - len(got), timeout=timeout)
        except nats.errors.TimeoutError:
            pass
    return got


async def fetch_none(psub, wait):
    """Asserts that a fetch waiting `wait` seconds gets nothing."""
    try:
        msgs = await psub.fetch(10, timeout=wait)
    except nats.errors.TimeoutError:
        return
    pytest.fail(f"unexpected deliveries: {[(m.metadata.sequence.stream, m.metadata.num_delivered) for m in msgs]}")


def test_add_stream_info_update_delete(js_server_url):
    async def body(c):
        _, js = await js_connect(c)
        info = await js.add_stream(name="ORDERS", subjects=["orders.>"], max_msgs=1000)
        assert info.config.name == "ORDERS"
        assert info.config.subjects == ["orders.>"]
        assert info.config.max_msgs == 1000
        assert info.state.messages == 0
        # Re-adding with the same config is fine; a different one is refused.
        await js.add_stream(name="ORDERS", subjects=["orders.>"], max_msgs=1000)
        with pytest.raises(nats.js.errors.BadRequestError) as err:
            await js.add_stream(name="ORDERS", subjects=["other.>"])
        assert err.value.err_code == 10058

        for i in range(3):
            ack = await js.publish(f"orders.{i}", f"o{i}".encode())
            assert (ack.stream, ack.seq) == ("ORDERS", i + 1)
        info = await js.stream_info("ORDERS")
        assert (info.state.messages, info.state.first_seq, info.state.last_seq) == (3, 1, 3)
        assert info.state.bytes > 0

        info = await js.update_stream(name="ORDERS", subjects=["orders.>", "returns.>"], max_msgs=5)
        assert info.config.max_msgs == 5
        assert info.config.subjects == ["orders.>", "returns.>"]
        assert info.state.messages == 3
        assert (await js.publish("returns.1", b"r")).seq == 4

        assert await js.find_stream_name_by_subject("returns.9") == "ORDERS"
        names = [s.config.name for s in await js.streams_info()]
        assert names == ["ORDERS"]

        assert await js.delete_stream("ORDERS") is True
        with pytest.raises(nats.js.errors.NotFoundError) as err:
            await js.stream_info("ORDERS")
        assert err.value.err_code == 10059
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.delete_stream("ORDERS")

    with_clients(js_server_url, body)


def test_publish_acks_dedupe_and_errors(js_server_url):
    async def body(c):
        nc, js = await js_connect(c)
        await js.add_stream(name="EV", subjects=["ev.*"])
        ack = await js.publish("ev.a", b"one")
        assert (ack.stream, ack.seq) == ("EV", 1) and not ack.duplicate

        # Nats-Msg-Id dedupe: same id, same seq, flagged as duplicate.
        first = await js.publish("ev.a", b"x", headers={"Nats-Msg-Id": "id-1"})
        again = await js.publish("ev.a", b"y", headers={"Nats-Msg-Id": "id-1"})
        assert first.seq == 2 and not first.duplicate
        assert again.seq == 2 and again.duplicate is True
        assert (await js.get_msg("EV", 2)).data == b"x"

        # Expected stream / last sequence.
        with pytest.raises(nats.js.errors.APIError) as err:
            await js.publish("ev.a", b"z", stream="OTHER")
        assert err.value.err_code == 10060
        with pytest.raises(nats.js.errors.APIError) as err:
            await js.publish("ev.a", b"z", headers={"Nats-Expected-Last-Sequence": "1"})
        assert err.value.err_code == 10071
        ack = await js.publish("ev.a", b"z", headers={"Nats-Expected-Last-Sequence": "2"})
        assert ack.seq == 3

        # No stream for the subject: no responders.
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await js.publish("nostream.here", b"x")

        # Many publishes in flight, acks awaited afterwards.
        futures = [await js.publish_async("ev.b", f"m{i}".encode()) for i in range(300)]
        acks = await asyncio.wait_for(asyncio.gather(*futures), WAIT * 4)
        assert [a.seq for a in acks] == list(range(4, 304))
        info = await js.stream_info("EV")
        assert (info.state.messages, info.state.last_seq) == (303, 303)
        await sync(nc)

    with_clients(js_server_url, body)


def test_get_msg_and_get_last_msg(js_server_url):
    async def body(c):
        _, js = await js_connect(c)
        await js.add_stream(name="GET", subjects=["get.>"])
        await js.publish("get.a", b"a1")
        await js.publish("get.b", b"b1", headers={"X-Test": "yes"})
        await js.publish("get.a", b"a2")

        msg = await js.get_msg("GET", 2)
        assert (msg.seq, msg.subject, msg.data) == (2, "get.b", b"b1")
        assert msg.headers["X-Test"] == "yes"
        last = await js.get_last_msg("GET", "get.a")
        assert (last.seq, last.data) == (3, b"a2")
        nxt = await js.get_msg("GET", seq=1, subject="get.b", next=True)
        assert nxt.seq == 2

        with pytest.raises(nats.js.errors.NotFoundError) as err:
            await js.get_msg("GET", 99)
        assert err.value.err_code == 10037
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_last_msg("GET", "get.nothing")

        assert await js.delete_msg("GET", 2) is True
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_msg("GET", 2)
        info = await js.stream_info("GET")
        assert info.state.messages == 2

    with_clients(js_server_url, body)


def test_purge(js_server_url):
    async def body(c):
        _, js = await js_connect(c)
        await js.add_stream(name="PURGE", subjects=["p.*"])
        for i in range(1, 11):
            await js.publish("p.a" if i % 2 else "p.b", str(i).encode())

        assert await js.purge_stream("PURGE", subject="p.a") is True
        info = await js.stream_info("PURGE")
        assert (info.state.messages, info.state.last_seq) == (5, 10)
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_msg("PURGE", 3)

        # Up to (not including) 7: removes 2, 4 and 6.
        assert await js.purge_stream("PURGE", seq=7) is True
        info = await js.stream_info("PURGE")
        assert info.state.messages == 2
        assert (await js.get_msg("PURGE", 8)).data == b"8"

        assert await js.purge_stream("PURGE") is True
        info = await js.stream_info("PURGE")
        assert (info.state.messages, info.state.bytes, info.state.last_seq) == (0, 0, 10)
        assert (await js.publish("p.a", b"after")).seq == 11

    with_clients(js_server_url, body)


def test_pull_subscribe_fetch_ack_and_consumer_info(js_server_url):
    async def body(c):
        _, js = await js_connect(c)
        await js.add_stream(name="PULL", subjects=["pull.*"])
        for i in range(1, 11):
            await js.publish("pull.x", f"m{i}".encode())

        psub = await js.pull_subscribe("pull.x", durable="worker")
        msgs = await fetch_all(psub, 4)
        assert seqs(msgs) == [1, 2, 3, 4]
        assert [m.data for m in msgs] == [b"m1", b"m2", b"m3", b"m4"]
        meta = msgs[0].metadata
        assert (meta.stream, meta.consumer) == ("PULL", "worker")
        assert (meta.num_delivered, meta.sequence.consumer, meta.num_pending) == (1, 1, 9)

        info = await js.consumer_info("PULL", "worker")
        assert (info.delivered.stream_seq, info.ack_floor.stream_seq) == (4, 0)
        assert (info.num_ack_pending, info.num_pending) == (4, 6)

        for m in msgs[:2]:
            await m.ack_sync(timeout=WAIT)
        await msgs[3].ack_sync(timeout=WAIT)
        info = await js.consumer_info("PULL", "worker")
        assert info.ack_floor.stream_seq == 2, "3 is not acked: the floor stays at 2"
        assert info.num_ack_pending == 1
        await msgs[2].ack_sync(timeout=WAIT)

        rest = await fetch_all(psub, 6)
        assert seqs(rest) == list(range(5, 11))
        for m in rest:
            await m.ack_sync(timeout=WAIT)
        info = await js.consumer_info("PULL", "worker")
        assert (info.ack_floor.stream_seq, info.num_ack_pending, info.num_pending) == (10, 0, 0)
        assert info.config.durable_name == "worker"

        # Nothing left: a fetch times out (nats-py raises).
        with pytest.raises(nats.errors.TimeoutError):
            await psub.fetch(1, timeout=0.5)

        # A message published later is fetched.
        await js.publish("pull.x", b"late")
        late = await fetch_all(psub, 1)
        assert (seqs(late), late[0].data) == ([11], b"late")
        await late[0].ack()

        # The durable is listed, then deleted.
        names = [ci.name for ci in await js.consumers_info("PULL")]
        assert names == ["worker"]
        await psub.unsubscribe()
        assert await js.delete_consumer("PULL", "worker") is True
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.consumer_info("PULL", "worker")

    with_clients(js_server_url, body)


def test_ack_wait_redelivery(js_server_url):
    async def body(c):
        _, js = await js_connect(c)
        await js.add_stream(name="REDLV", subjects=["r"])
        await js.publish("r", b"once")
        await js.publish("r", b"twice")
        psub = await js.pull_subscribe("r", durable="slow", config=ConsumerConfig(ack_wait=0.3))
        first = await fetch_all(psub, 2)
        assert [(m.metadata.sequence.stream, m.metadata.num_delivered) for m in first] == [(1, 1), (2, 1)]
        await first[1].ack_sync(timeout=WAIT)

        # Not acked within ack_wait: delivered again, counted.
        again = await fetch_all(psub, 1)
        m = again[0]
        assert (m.metadata.sequence.stream, m.metadata.num_delivered, m.data) == (1, 2, b"once")
        await m.ack_sync(timeout=WAIT)
        info = await js.consumer_info("REDLV", "slow")
        assert (info.num_ack_pending, info.ack_floor.stream_seq) == (0, 2)

        # Acked messages stay acked: several ack_waits later, nothing.
        await fetch_none(psub, 1.5)

    with_clients(js_server_url, body)


def test_nak_term_in_progress(js_server_url):
    async def body(c):
        _, js = await js_connect(c)
        await js.add_stream(name="NAK", subjects=["nak"])
        for data in (b"retry-me", b"drop-me", b"slow-one"):
            await js.publish("nak", data)
        psub = await js.pull_subscribe("nak", durable="n", config=ConsumerConfig(ack_wait=1.0))
        retry, drop, slow = await fetch_all(psub, 3)

        await retry.nak()
        await drop.term()
        # Keep the slow one alive with +WPI over 2.5 ack_waits, meanwhile collect
        # (and ack) what is delivered: only the nak'd message, once.
        delivered = []

        async def keep_alive():
            for _ in range(25):
                await slow.in_progress()
                await asyncio.sleep(0.1)

        async def collect():
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.2
            while loop.time() < end:
                try:
                    for m in await psub.fetch(10, timeout=max(0.1, end - loop.time())):
                        delivered.append((m.metadata.sequence.stream, m.metadata.num_delivered, m.data))
                        await m.ack_sync(timeout=WAIT)
                except nats.errors.TimeoutError:
                    pass

        await asyncio.gather(keep_alive(), collect())
        assert delivered == [(1, 2, b"retry-me")]
        await slow.ack_sync(timeout=WAIT)

        info = await js.consumer_info("NAK", "n")
        assert (info.num_ack_pending, info.ack_floor.stream_seq) == (0, 3)
        await fetch_none(psub, 2.5)

        # nak with a delay: it still comes back.
        await js.publish("nak", b"delayed")
        (m,) = await fetch_all(psub, 1)
        await m.nak(delay=0.3)
        (again,) = await fetch_all(psub, 1)
        assert (again.metadata.sequence.stream, again.metadata.num_delivered) == (4, 2)
        await again.ack_sync(timeout=WAIT)

    with_clients(js_server_url, body, timeout=60)


def test_push_subscribe(js_server_url):
    async def body(c):
        _, js = await js_connect(c)
        await js.add_stream(name="PUSH", subjects=["push.*"])
        for i in range(1, 6):
            await js.publish("push.a", f"m{i}".encode())
        await js.publish("push.b", b"other")

        # Durable push consumer, manual acks.
        sub = await js.subscribe("push.a", durable="pusher", manual_ack=True)
        got = [await sub.next_msg(timeout=WAIT) for _ in range(5)]
        assert seqs(got) == [1, 2, 3, 4, 5]
        assert [m.subject for m in got] == ["push.a"] * 5
        for m in got[:3]:
            await m.ack_sync(timeout=WAIT)
        info = await sub.consumer_info()
        assert (info.name, info.ack_floor.stream_seq, info.num_ack_pending) == ("pusher", 3, 2)
        assert info.config.deliver_subject, "a push consumer has a deliver subject"
        await js.publish("push.a", b"m7")
        m = await sub.next_msg(timeout=WAIT)
        assert (m.metadata.sequence.stream, m.data) == (7, b"m7")
        await m.ack()

        # Ephemeral push consumer with a callback, from a start sequence, ack none.
        queue = asyncio.Queue()

        async def cb(msg):
            await queue.put(msg)

        await js.subscribe("push.*", cb=cb, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=5,
        ))
        got = [await asyncio.wait_for(queue.get(), WAIT) for _ in range(3)]
        assert [(m.metadata.sequence.stream, m.data) for m in got] == [(5, b"m5"), (6, b"other"), (7, b"m7")]

    with_clients(js_server_url, body)


def test_deliver_policies_and_limits(js_server_url):
    async def body(c):
        _, js = await js_connect(c)
        await js.add_stream(name="POL", subjects=["pol.*"])
        for i, subject in enumerate(["pol.a", "pol.b", "pol.a", "pol.b"], start=1):
            await js.publish(subject, str(i).encode())

        async def first_seqs(policy, n, **extra):
            psub = await js.pull_subscribe("pol.*", config=ConsumerConfig(
                deliver_policy=policy, ack_policy=AckPolicy.NONE, **extra))
            return seqs(await fetch_all(psub, n))

        assert await first_seqs(DeliverPolicy.ALL, 4) == [1, 2, 3, 4]
        assert await first_seqs(DeliverPolicy.LAST, 1) == [4]
        assert await first_seqs(DeliverPolicy.BY_START_SEQUENCE, 2, opt_start_seq=3) == [3, 4]
        assert await first_seqs(DeliverPolicy.LAST_PER_SUBJECT, 2) == [3, 4]

        # max_msgs with discard new: the fourth is refused.
        await js.add_stream(name="FULL", subjects=["full"], max_msgs=3, discard=DiscardPolicy.NEW)
        for i in range(3):
            await js.publish("full", b"x")
        with pytest.raises(nats.js.errors.APIError) as err:
            await js.publish("full", b"x")
        assert err.value.err_code == 10077
        # max_msgs with discard old: the oldest go.
        await js.add_stream(StreamConfig(name="ROLL", subjects=["roll"], max_msgs=3))
        for i in range(5):
            await js.publish("roll", str(i).encode())
        info = await js.stream_info("ROLL")
        assert (info.state.messages, info.state.first_seq, info.state.last_seq) == (3, 3, 5)

    with_clients(js_server_url, body)
