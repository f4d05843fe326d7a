"""Authentication and permissions with nats-py: user/password (bcrypt), nkeys
(the `nkeys` package signs the nonce), a token, permission errors delivered to
the client's error callback, and allow_responses for a responder.

Run against perch by default, against nats-server with NATS_REFERENCE=1 (the
same users and permissions in its config syntax).
"""

import asyncio
import os

import nkeys
import pytest

from conftest import run, serve_with_config, sync

# bcrypt of "hunter2" (cost 4).
HUNTER2 = "$2a$04$JDtkF5f/kylSyv5dkhx06Ol1dHYTs6hKmP1edYZWi286raHBL0NEC"


def new_user_nkey():
    """(public key, seed) of a fresh user nkey, made with the nkeys package."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return nkeys.from_seed(seed).public_key.decode(), seed.decode()


DEVICE_PUBLIC, DEVICE_SEED = new_user_nkey()
_, STRANGER_SEED = new_user_nkey()


@pytest.fixture(scope="module")
def users_url(tmp_path_factory):
    perch = f"""[authorization]
users = [
  {{ user = "ops", password = "{HUNTER2}" }},
  {{ nkey = "{DEVICE_PUBLIC}", permissions = {{ publish = ["sensors.>"], subscribe = ["cmd.>"] }} }},
  {{ user = "svc", password = "s", permissions = {{ subscribe = ["svc.>"], allow_responses = true }} }},
]
"""
    nats = f"""authorization {{ users = [
  {{ user: ops, password: "{HUNTER2}" }},
  {{ nkey: {DEVICE_PUBLIC}, permissions: {{ publish: ["sensors.>"], subscribe: ["cmd.>"] }} }},
  {{ user: svc, password: s, permissions: {{ subscribe: "svc.>", allow_responses: true }} }},
] }}
"""
    yield from serve_with_config(tmp_path_factory, perch, nats)


@pytest.fixture(scope="module")
def token_url(tmp_path_factory):
    yield from serve_with_config(
        tmp_path_factory,
        '[authorization]\ntoken = "s3cr3t"\n',
        'authorization { token: "s3cr3t" }\n',
    )


async def connect(url, **kwargs):
    import nats

    errors = []

    async def error_cb(e):
        errors.append(e)

    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5,
                            max_reconnect_attempts=0, error_cb=error_cb, **kwargs)
    return nc, errors


async def refused(url, **kwargs):
    try:
        nc, _ = await connect(url, **kwargs)
    except Exception as e:  # nats-py raises its own error types per case
        return str(e) or type(e).__name__
    await nc.close()
    pytest.fail(f"connected with {kwargs}")


def test_nkey_device_publishes_and_permissions_are_enforced(users_url):
    async def body():
        ops, ops_errors = await connect(users_url, user="ops", password="hunter2")
        sub = await ops.subscribe("sensors.>")
        await sync(ops)
        dev, dev_errors = await connect(users_url, nkeys_seed_str=DEVICE_SEED)
        await dev.publish("sensors.t1", b"21.5")
        await dev.publish("cmd.reboot", b"denied")
        await sync(dev)
        msg = await sub.next_msg(timeout=5)
        assert (msg.subject, msg.data) == ("sensors.t1", b"21.5")
        with pytest.raises(Exception):
            await sub.next_msg(timeout=0.3)
        for _ in range(50):
            if dev_errors:
                break
            await asyncio.sleep(0.05)
        # nats-py lower-cases the server's text.
        assert any('permissions violation for publish to "cmd.reboot"' in str(e).lower()
                   for e in dev_errors), dev_errors
        assert not dev.is_closed, "a permissions violation keeps the connection"
        assert not ops_errors
        await dev.close()
        await ops.close()

    run(body())


def test_bad_credentials_are_refused(users_url):
    async def body():
        for kwargs in [
            dict(user="ops", password="wrong"),
            dict(nkeys_seed_str=STRANGER_SEED),
            dict(),
        ]:
            text = await refused(users_url, **kwargs)
            assert "uthorization" in text or "NoServers" in text, (kwargs, text)

    run(body())


def test_token(token_url):
    async def body():
        nc, errors = await connect(token_url, token="s3cr3t")
        sub = await nc.subscribe("t")
        await nc.publish("t", b"x")
        assert (await sub.next_msg(timeout=5)).data == b"x"
        await nc.close()
        assert not errors
        await refused(token_url, token="nope")

    run(body())


def test_allow_responses_lets_a_service_answer_once(users_url):
    async def body():
        svc, svc_errors = await connect(users_url, user="svc", password="s")

        async def answer(msg):
            await msg.respond(b"first")
            await msg.respond(b"second")  # one response per request: denied

        await svc.subscribe("svc.time", cb=answer)
        await sync(svc)
        ops, _ = await connect(users_url, user="ops", password="hunter2")
        for _ in range(3):
            reply = await ops.request("svc.time", b"now?", timeout=5)
            assert reply.data == b"first"
        await svc.publish("elsewhere", b"no")
        for _ in range(50):
            if len(svc_errors) >= 4:
                break
            await asyncio.sleep(0.05)
        texts = [str(e).lower() for e in svc_errors]
        assert len(texts) == 4, texts
        assert sum('publish to "_inbox.' in t for t in texts) == 3, texts
        assert any('publish to "elsewhere"' in t for t in texts), texts
        await ops.close()
        await svc.close()

    run(body())
