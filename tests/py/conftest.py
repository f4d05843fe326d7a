"""Starts the server the real-client tests talk to: one per test module.

By default that is perch, from PERCH_BIN (default target/debug/perch, built by
tests/run.sh) behind PERCH_RUNNER if set (e.g. "qemu-aarch64-static -L
/usr/aarch64-linux-gnu" for an emulated ARM build), on the I/O backend named by
PERCH_IO (uring, epoll or auto), with
2 shards and round-robin placement so that consecutive connections (publisher,
subscriber) land on different shards. With NATS_REFERENCE=1 it is Debian's
nats-server instead, to check the tests themselves against the reference.

The tests are plain functions that run one coroutine each through `run()`,
which bounds it in time: no pytest-asyncio needed.

JetStream tests (test_jetstream.py) use the `js_server_url` fixture instead: the
same server with a store directory of its own (nats-server `-js -sd DIR`, perch
`--store-dir DIR`).
"""

import asyncio
import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

REFERENCE = os.environ.get("NATS_REFERENCE") == "1"

STARTUP_TIMEOUT_S = 10.0
# Default bound for one test's coroutine; tests may pass a larger one.
TEST_TIMEOUT_S = 30.0


def run(coro, timeout=TEST_TIMEOUT_S):
    """Runs one test coroutine on a fresh event loop, failing after `timeout`."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(port, store_dir=None):
    """The server's name and command line; with `store_dir`, JetStream on."""
    if REFERENCE:
        cmd = ["nats-server", "-a", "127.0.0.1", "-p", str(port)]
        if store_dir is not None:
            cmd += ["-js", "-sd", str(store_dir)]
        return "nats-server", cmd
    binary = Path(os.environ.get("PERCH_BIN", REPO / "target" / "debug" / "perch"))
    if not binary.is_file():
        # Fail, never skip: a suite that silently tests nothing must not pass.
        pytest.fail(f"perch binary {binary} not found: run `cargo build` (tests/run.sh does)")
    io = os.environ.get("PERCH_IO", "auto")
    cmd = shlex.split(os.environ.get("PERCH_RUNNER", "")) + [
        str(binary), "serve",
        "--listen", f"127.0.0.1:{port}",
        "--io", io,
        "--shards", "2",
        "--placement", "round-robin",
    ]
    if store_dir is not None:
        cmd += ["--store-dir", str(store_dir)]
    return f"perch --io {io}", cmd


def _tail(path, chars=3000):
    text = path.read_text(errors="replace")
    return text if len(text) <= chars else "...\n" + text[-chars:]


def _wait_ready(proc, port, log_path):
    """Waits until the server sends its INFO line on a fresh connection."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} at start:\n{_tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(1)
                if s.recv(4096).startswith(b"INFO "):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"server sent no INFO within {STARTUP_TIMEOUT_S}s:\n{_tail(log_path)}")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """URL of a server started for this test module; stopped after it.

    A server that dies while the module runs fails the module's teardown, so a
    crash is never hidden behind client-side timeouts alone.
    """
    yield from _serve(tmp_path_factory, store_dir=None)


@pytest.fixture
def js_server_url(tmp_path_factory):
    """Like `server_url`, with JetStream on, but one server per test, each over
    a store directory (and port) of its own: no test sees another's streams."""
    yield from _serve(tmp_path_factory, store_dir=tmp_path_factory.mktemp("store"))


def _serve(tmp_path_factory, store_dir):
    port = _free_port()
    name, cmd = _server_command(port, store_dir)
    yield from _serve_command(tmp_path_factory, name, cmd, port)


def _serve_command(tmp_path_factory, name, cmd, port):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(proc, port, log_path)
        yield f"nats://127.0.0.1:{port}"
        died = proc.poll()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if died is not None:
        pytest.fail(f"{name} died during the tests (exit {died}):\n{_tail(log_path)}")


class Clients:
    """Opens client connections for one test and closes them all at its end.

    Every connection records the client's asynchronous errors (slow consumer,
    -ERR from the server, ...); `close()` fails the test if there were any.
    """

    def __init__(self, url):
        self.url = url
        self.conns = []
        self.errors = []

    async def connect(self, **kwargs):
        import nats

        async def error_cb(e):
            self.errors.append(e)

        opts = dict(allow_reconnect=False, connect_timeout=5, error_cb=error_cb)
        opts.update(kwargs)
        nc = await nats.connect(self.url, **opts)
        self.conns.append(nc)
        return nc

    async def close(self):
        for nc in self.conns:
            if not nc.is_closed:
                await nc.close()
        assert not self.errors, f"asynchronous client errors: {self.errors!r}"


def with_clients(url, body, timeout=TEST_TIMEOUT_S):
    """Runs `body(clients)` bounded by `timeout`, then closes its connections."""

    async def main():
        clients = Clients(url)
        try:
            await body(clients)
        finally:
            await clients.close()

    run(main(), timeout)


async def sync(nc, timeout=5):
    """A real ordering barrier: returns once the server has processed every
    command `nc` issued before the call.

    `nc.flush()` alone is not one in nats-py (seen with 2.9 through 2.16): it
    writes its PING straight to the socket while earlier SUB/PUB commands may
    still sit in the client's pending buffer for the flusher task, so the PONG
    can come back before the server has seen them (a subscriber then misses
    messages, about 2% of the time against nats-server 2.9.10). By the time the
    first PONG is back the flusher has run, so the second PING is behind every
    earlier command on the wire.
    """
    await nc.flush(timeout=timeout)
    await nc.flush(timeout=timeout)


def serve_with_config(tmp_path_factory, perch_toml, nats_conf):
    """Like `server_url`, for a server with a config file: `perch_toml` for
    perch, `nats_conf` (nats-server's syntax, same meaning) for the reference.
    A generator: use it with `yield from` in a fixture."""
    port = _free_port()
    name, cmd = _server_command(port)
    conf_dir = tmp_path_factory.mktemp("config")
    if REFERENCE:
        path = conf_dir / "nats.conf"
        path.write_text(nats_conf)
        cmd += ["-c", str(path)]
    else:
        path = conf_dir / "perch.toml"
        path.write_text(perch_toml)
        cmd += ["--config", str(path)]
    yield from _serve_command(tmp_path_factory, name, cmd, port)
