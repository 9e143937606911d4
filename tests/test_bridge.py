"""The trio/asyncio bridge and the capnp wire under it, in one process: trio
guest-mode I/O with no worker thread, capnp calls awaited and cancelled from
trio, and whole messages of any size through Wire over unix sockets and TLS."""

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time

import capnp
import pytest
import trio

from drvs.cluster import pki
from drvs.ipc import bridge, wire
from drvs.ipc.bridge import aio, capnp_await
from drvs.ipc.fabric import Tls
from drvs.ipc.schema import fabric


class EchoNode(fabric.Node.Server):
    """A Node whose echo answers data (and, for b"hang", never answers)."""

    def __init__(self):
        self.cancelled = asyncio.Event()

    async def echo(self, data, _context, **kwargs):
        if bytes(data) == b"hang":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return data


async def _serve(node, **listen):
    async def callback(stream):
        await capnp.TwoPartyServer(stream, bootstrap=node).on_disconnect()

    return await aio(wire.serve(callback, **listen))


async def _client(**where):
    stream = await aio(wire.connect(**where))
    client = capnp.TwoPartyClient(stream)
    return client, client.bootstrap().cast_as(fabric.Node)


def test_guest_io_and_timers_need_no_thread():
    """trio's sockets and deadlines are served by the host loop itself."""

    async def main():
        a, b = trio.socket.socketpair()
        threads = set()

        async def reader():
            threads.add(threading.active_count())
            return await a.recv(10)

        async with trio.open_nursery() as n:
            got = []
            n.start_soon(lambda: _append(got, reader))
            await trio.sleep(0.05)
            threads.add(threading.active_count())
            t = time.monotonic()
            await trio.sleep(0.1)
            slept = time.monotonic() - t
            await b.send(b"ping")
        threads.add(threading.active_count())
        return got, slept, threads

    before = threading.active_count()  # (idle workers other tests' trio.to_thread left behind count too)
    got, slept, threads = bridge.run(main)
    assert got == [b"ping"]
    assert 0.1 <= slept < 0.5
    assert max(threads) <= before, "trio's I/O wait ran in a thread"


async def _append(out, afn):
    out.append(await afn())


def test_worker_thread_results_wake_the_guest():
    def work():
        time.sleep(0.05)
        return threading.get_ident()

    async def main():
        return await trio.to_thread.run_sync(work)

    assert bridge.run(main) != threading.get_ident()


BUSY_AND_IO = """
import trio
from drvs.ipc import bridge

async def main():
    a, b = trio.socket.socketpair()
    await trio.sleep(0.01)  # (the host loop watches trio's epoll from the first wait on)
    done = trio.Event()
    got = []

    async def busy():
        spins = 0
        while not done.is_set():
            await trio.lowlevel.checkpoint()
            spins += 1
        got.append(spins)

    async def io():
        await b.send(b"ping")
        got.append(await a.recv(10))
        got.append(await trio.to_thread.run_sync(lambda: "thread"))
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(busy)
        n.start_soon(io)
    return got

got = bridge.run(main)
print(got[0], got[1], got[2] > 0)
"""


def test_trio_io_is_delivered_while_the_guest_never_waits():
    """A tick that does not wait skips trio's epoll unless the host loop saw
    it ready: a socket that becomes readable (and a worker thread's result)
    must still reach a task while another keeps trio busy.  (In a child
    process: the failure this guards against is a hang.)"""
    p = subprocess.run([sys.executable, "-c", BUSY_AND_IO], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout == "b'ping' thread True\n", p.stderr


def test_cyclic_garbage_is_collected_on_the_loops_thread():
    """kj aborts the process when a capnp object is freed off its loop's
    thread, and the collector runs where allocation crosses its threshold:
    so in a run, cycles are collected by the loop, not by a worker."""
    import gc
    import weakref

    class Cycle:
        pass

    def churn():
        return [[] for _ in range(50 * gc.get_threshold()[0])]  # (past gen 0's threshold many times)

    async def main():
        where = []
        c = Cycle()
        c.me = c
        weakref.finalize(c, lambda: where.append(threading.get_ident()))
        del c
        assert not gc.isenabled()
        junk = await trio.to_thread.run_sync(churn)  # (kept: the count of objects stays past the threshold)
        with trio.fail_after(5):
            while not where:
                await trio.sleep(0.01)
        del junk
        return where

    was = gc.isenabled()
    where = bridge.run(main)
    assert where == [threading.get_ident()]
    assert gc.isenabled() == was


def test_capnp_call_awaited_and_cancelled_from_trio(tmp_path):
    path = str(tmp_path / "s.sock")
    node = EchoNode()

    async def main():
        server = await _serve(node, path=path)
        try:
            client, cap = await _client(path=path)
            reply = await capnp_await(cap.echo(b"hello"))
            assert bytes(reply.data) == b"hello"
            with trio.move_on_after(0.2) as scope:
                await capnp_await(cap.echo(b"hang"))
            assert scope.cancelled_caught
            with trio.fail_after(5):
                await aio(node.cancelled.wait())  # the server's method was cancelled too
            # The connection is still good after a cancelled call.
            assert bytes((await capnp_await(cap.echo(b"after"))).data) == b"after"
        finally:
            server.close()

    bridge.run(main)


def _payloads():
    sizes = [0, 1, 7, 8, 9, 4095, 65536, 65537, 300_000, 2_000_000]
    return [hashlib.sha256(str(n).encode()).digest() * (n // 32) + b"z" * (n % 32) for n in sizes]


@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_wire_carries_whole_messages_in_one_write(tmp_path, transport):
    """Every size arrives intact, in order, with many calls in flight; each
    small message leaves in one transport write (not one per piece)."""
    node = EchoNode()
    if transport == "tls":
        ca, ca_key = pki.make_ca(str(tmp_path / "ca"), "t")
        s = pki.issue(ca, ca_key, "s", "127.0.0.1", str(tmp_path / "s"))
        c = pki.issue(ca, ca_key, "c", "127.0.0.1", str(tmp_path / "c"))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        listen = {"sock": sock, "ssl": Tls(s["ca"], s["cert"], s["key"]).server_context()}
        where = {"host": "127.0.0.1", "port": port, "ssl": Tls(c["ca"], c["cert"], c["key"]).client_context(),
                 "server_hostname": "s"}
    else:
        listen = where = {"path": str(tmp_path / "s.sock")}
    writes = []
    real_write = wire.Wire.flush

    def counting_flush(self):
        if self.out:
            writes.append(len(self.out))
        real_write(self)

    async def main():
        server = await _serve(node, **listen)
        try:
            client, cap = await _client(**where)
            wire.Wire.flush = counting_flush
            for _ in range(20):
                assert bytes((await capnp_await(cap.echo(b"x" * 32))).data) == b"x" * 32
            small_writes = list(writes)
            payloads = _payloads()
            results = {}

            async def call(i, p):
                results[i] = bytes((await capnp_await(cap.echo(p))).data)

            async with trio.open_nursery() as n:
                for i, p in enumerate(payloads * 3):
                    n.start_soon(call, i, p)
            assert [results[i] for i in range(len(payloads) * 3)] == payloads * 3
            return small_writes
        finally:
            wire.Wire.flush = real_write
            server.close()

    small = bridge.run(main)
    # client and server both write through Wire in this process: each call
    # and reply (and capnp's bookkeeping messages) went out whole
    assert len(small) >= 40 and all(pieces >= 2 for pieces in small), small


def test_wire_reports_a_peer_that_went_away(tmp_path):
    """A server that closes mid-call gives the caller an error, not a hang."""
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def accept_and_close():
        conn, _ = listener.accept()
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=accept_and_close)
    t.start()

    async def main():
        client, cap = await _client(path=path)
        with trio.fail_after(5):
            with pytest.raises(capnp.KjException) as e:
                await capnp_await(cap.echo(b"anyone?"))
        return e.value.type

    try:
        assert bridge.run(main) == "DISCONNECTED"
    finally:
        t.join(5)
        listener.close()
        os.unlink(path)


NEVER_WAITS = r"""
import pytest, trio
from drvs.ipc import bridge

async def returns():
    return 7

async def fails():
    raise ValueError("no")

async def waits():
    await trio.sleep(0.01)
    return 8

assert bridge.run(returns) == 7
try:
    bridge.run(fails)
except BaseExceptionGroup as e:
    assert e.subgroup(ValueError) is not None
else:
    raise AssertionError("no error")
assert bridge.run(waits) == 8
assert bridge.run(returns) == 7
print("ok")
"""


def test_a_run_that_never_waits_ends():
    """A trio main that returns or fails before ever blocking still ends the
    run (with its value or its exception), run after run.  (In a child
    process: the failure this guards against is a hang.)"""
    p = subprocess.run([sys.executable, "-c", NEVER_WAITS], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "ok\n", p.stderr


def test_near_deadlines_are_kept_without_spinning():
    """Sleeps shorter than the host loop's millisecond clock still end, on
    time to within a few milliseconds."""

    async def main():
        t = time.monotonic()
        for _ in range(50):
            await trio.sleep(0.0003)
        return time.monotonic() - t

    took = bridge.run(main)
    assert 0.015 <= took < 0.5


BYE_SERVER = r"""
import asyncio, socket, sys
import capnp
from drvs.ipc import wire
from drvs.ipc.fabric import Tls
from drvs.ipc.schema import fabric

made = []


class ClosingWire(wire.Wire):
    # closes its transport right after the next message it sends
    def __init__(self, inner, peer_of=None):
        super().__init__(inner, peer_of)
        self.close_after = False
        made.append(self)

    def flush(self):
        super().flush()
        if self.close_after and self.transport is not None:
            self.transport.close()


class ByeNode(fabric.Node.Server):
    async def echo(self, data, _context, **kwargs):
        if bytes(data).startswith(b"bye"):
            made[-1].close_after = True
        return data


async def main():
    async with capnp.kj_loop():
        async def callback(stream):
            await capnp.TwoPartyServer(stream, bootstrap=ByeNode()).on_disconnect()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: ClosingWire(capnp.AsyncIoStream._connect(callback)), sock=sock,
                                 ssl=Tls(*sys.argv[1:4]).server_context())
        print(sock.getsockname()[1], flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


class SlowWire(wire.Wire):
    """A client Wire that stalls its thread after sending "bye...", so that
    the reply and the TLS close that follows it are both waiting when it
    reads again (as on a busy node)."""

    def flush(self):
        stall = any(bytes(piece).find(b"bye") >= 0 for piece in self.out)
        super().flush()
        if stall:
            time.sleep(0.2)


def test_a_reply_sent_just_before_a_tls_close_is_delivered(tmp_path):
    """A TLS peer replies and closes at once: TLS ends the transport as the
    close is read, and what came before it must still reach capnp."""
    ca, ca_key = pki.make_ca(str(tmp_path / "ca"), "t")
    s = pki.issue(ca, ca_key, "s", "127.0.0.1", str(tmp_path / "s"))
    c = pki.issue(ca, ca_key, "c", "127.0.0.1", str(tmp_path / "c"))
    server = subprocess.Popen([sys.executable, "-c", BYE_SERVER, s["ca"], s["cert"], s["key"]],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        bye = b"bye" + b"!" * 100_000  # a reply longer than capnp's first read

        async def main():
            loop = asyncio.get_running_loop()
            made = loop.create_future()
            await aio(loop.create_connection(
                lambda: SlowWire(capnp.AsyncIoStream._connect(lambda st: made.done() or made.set_result(st))),
                host="127.0.0.1", port=port, ssl=Tls(c["ca"], c["cert"], c["key"]).client_context(),
                server_hostname="s"))
            client = capnp.TwoPartyClient(await bridge.aio_future(made))
            cap = client.bootstrap().cast_as(fabric.Node)
            assert bytes((await capnp_await(cap.echo(b"hello"))).data) == b"hello"
            with trio.fail_after(10):
                return bytes((await capnp_await(cap.echo(bye))).data) == bye

        assert bridge.run(main)
    finally:
        server.kill()
        server.wait()
