"""Request/reply, no-responders and headers with nats-py."""

import nats.errors
import pytest

from conftest import sync, with_clients

WAIT = 5


async def echo_service(c, subject):
    """Starts a responder on its own connection that echoes data and headers."""
    svc = await c.connect()

    async def handler(msg):
        if msg.headers:
            await svc.publish(msg.reply, msg.data, headers={"Echo": msg.headers.get("Ask", "")})
        else:
            await msg.respond(b"re:" + msg.data)

    await svc.subscribe(subject, cb=handler)
    await sync(svc)
    return svc


def test_request_reply(server_url):
    async def body(c):
        await echo_service(c, "svc.echo")
        client = await c.connect()
        for i in range(100):
            resp = await client.request("svc.echo", f"q{i}".encode(), timeout=WAIT)
            assert resp.data == f"re:q{i}".encode()

    with_clients(server_url, body)


def test_request_reply_old_style(server_url):
    async def body(c):
        await echo_service(c, "svc.old")
        client = await c.connect()
        resp = await client.request("svc.old", b"x", timeout=WAIT, old_style=True)
        assert resp.data == b"re:x"

    with_clients(server_url, body)


def test_no_responders(server_url):
    async def body(c):
        nc = await c.connect()
        with pytest.raises(nats.errors.NoRespondersError):
            # The server answers at once with a 503 status; a long timeout
            # would only be reached if it did not.
            await nc.request("nobody.listens.here", b"?", timeout=WAIT)

    with_clients(server_url, body, timeout=WAIT - 1)


def test_headers_round_trip(server_url):
    async def body(c):
        pub, subc = await c.connect(), await c.connect()
        sub = await subc.subscribe("hdr.test")
        await sync(subc)
        await pub.publish("hdr.test", b"with headers",
                          headers={"X-One": "1", "X-Two": "two words"})
        await pub.publish("hdr.test", b"", headers={"Only": "header"})
        await pub.publish("hdr.test", b"no headers")
        msg = await sub.next_msg(timeout=WAIT)
        assert msg.data == b"with headers"
        assert msg.headers == {"X-One": "1", "X-Two": "two words"}
        msg = await sub.next_msg(timeout=WAIT)
        assert (msg.data, msg.headers) == (b"", {"Only": "header"})
        msg = await sub.next_msg(timeout=WAIT)
        assert msg.data == b"no headers"
        assert not msg.headers

    with_clients(server_url, body)


def test_request_with_headers(server_url):
    async def body(c):
        await echo_service(c, "hdr.svc")
        client = await c.connect()
        resp = await client.request("hdr.svc", b"body", timeout=WAIT, headers={"Ask": "perch"})
        assert resp.data == b"body"
        assert resp.headers == {"Echo": "perch"}

    with_clients(server_url, body)
