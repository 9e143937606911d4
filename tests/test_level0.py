"""Cap'n Proto RPC level 0 (drvs.ipc.level0) against pycapnp's own RPC, both
ways, on loopback: the messages must be the protocol's, not only our own
dialect."""

import asyncio
import errno

import capnp
import pytest
import trio

from drvs.ipc import bridge, level0, wire
from drvs.ipc.message import Msg
from drvs.ipc.schema import BULK, fabric, from_flat, rpc


def _echo_server():
    def echo(answer, params):
        data = bytes(params.data)
        if data == b"fail":
            return answer.fail("asked to fail")
        if data == b"later":
            asyncio.get_running_loop().call_later(0.01, lambda: answer.reply(lambda r: setattr(r, "data", b"late")))
            return
        if data == b"never":
            answer.on_cancel = lambda: cancelled.append(True)
            return
        if data == b"bad fill":  # a server bug while filling the results: the caller still gets an answer
            return answer.reply(lambda r: setattr(r, "data", 1 / 0))
        answer.reply(lambda r: setattr(r, "data", data[::-1]))

    def sendrec(answer, params):
        # the reply's payload: the request's, reversed, in two pieces (as the
        # file server's read replies: out of line when large)
        data = bytes(params.msg.payload)[::-1]
        reply = Msg(params.msg.type + 1, [data[:1000], data[1000:]], error=params.target)
        answer.reply(lambda r: reply.fill_at(r, "reply", bulk=True))

    cancelled = []
    return (lambda: level0.Server(fabric.Node, {"echo": echo, "sendrec": sendrec})), cancelled


async def _listen(factory):
    """(server, port): factory's protocol serving on a loopback port."""
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _run(coro_fn):
    async def main():
        async with capnp.kj_loop():
            return await coro_fn()
    return asyncio.run(main())


def test_pycapnp_client_calls_level0_server():
    """pycapnp's TwoPartyClient: bootstrap, pipelined and later calls, a
    failure, a reply given later, and a method level 0 does not serve."""
    factory, _ = _echo_server()

    async def main():
        server, port = await _listen(factory)
        try:
            stream = await wire.connect(host="127.0.0.1", port=port)
            client = capnp.TwoPartyClient(stream)
            node = client.bootstrap().cast_as(fabric.Node)
            first = node.echo(b"abc")  # pipelined on the bootstrap answer
            assert (await first).data == b"cba"
            for i in range(50):
                assert (await node.echo(b"x%d" % i)).data == (b"x%d" % i)[::-1]
            for size in (70001, BULK - 1, 5):  # out of line (odd: padded), inline, inline
                req = node.sendrec_request()
                req.target = "pm@web"
                payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
                req.msg.type, req.msg.payload = 41, payload
                r = await req.send()
                assert (r.reply.type, r.reply.payload, r.reply.error) == (42, payload[::-1], "pm@web")
            assert (await node.echo(b"later")).data == b"late"
            with pytest.raises(capnp.KjException, match="asked to fail"):
                await node.echo(b"fail")
            with pytest.raises(capnp.KjException, match="ZeroDivisionError"):
                await node.echo(b"bad fill")
            with pytest.raises(capnp.KjException) as e:
                await node.info()
            assert e.value.type == "UNIMPLEMENTED"
            assert (await node.echo(b"still")).data == b"llits"
        finally:
            server.close()

    _run(main)


def test_level0_client_calls_pycapnp_server():
    class Node(fabric.Node.Server):
        async def echo(self, data, **kwargs):
            if data == b"fail":
                raise ValueError("asked to fail")
            return data[::-1]

        async def sendrec(self, target, msg, timeoutMs, _context, **kwargs):
            r = _context.results.init("reply")
            r.type, r.payload, r.source = msg.type, msg.payload[::-1], target

    async def main():
        async def serve(stream):
            await capnp.TwoPartyServer(stream, bootstrap=Node()).on_disconnect()

        server = await wire.serve(serve, host="127.0.0.1", port=0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        try:
            _, client = await loop.create_connection(lambda: level0.Client(fabric.Node), "127.0.0.1", port)
            got = []
            for i in range(20):
                fut = loop.create_future()
                client.call("echo", lambda p, i=i: setattr(p, "data", b"m%d" % i),
                            lambda r, e, fut=fut: fut.set_result((bytes(r.data) if r is not None else None, e)))
                got.append(await fut)
            assert [g[0] for g in got] == [(b"m%d" % i)[::-1] for i in range(20)]
            assert client.cap is not None  # the later calls went to the imported capability
            fut = loop.create_future()
            client.call("echo", lambda p: setattr(p, "data", b"fail"), lambda r, e: fut.set_result(e))
            error = await fut
            assert isinstance(error, level0.RpcError) and "asked to fail" in error.reason
            big = bytes(range(256)) * 400 + b"odd"  # out of line: a segment pycapnp must read
            fut = loop.create_future()

            def fill(p):
                p.target = "fs@web"
                return Msg(7, [big[:10], big[10:]], source="x@web").fill_at(p, "msg", bulk=True)

            client.call("sendrec", fill, lambda r, e: fut.set_result(
                (r.reply.type, bytes(r.reply.payload), r.reply.source) if e is None else e))
            assert await fut == (7, big[::-1], "fs@web")
            client.close()
        finally:
            server.close()

    _run(main)


def test_cancel_and_lost_connection_from_trio():
    """A trio caller that gives up tells the server (its on_cancel runs);
    a connection that dies fails the calls still waiting on it."""
    make, cancelled = _echo_server()
    server_conns = []

    def factory():
        server_conns.append(make())
        return server_conns[-1]

    async def main():
        loop = asyncio.get_running_loop()
        server = await bridge.aio(loop.create_server(factory, "127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _, client = await bridge.aio(loop.create_connection(lambda: level0.Client(fabric.Node), "127.0.0.1", port))
        r = await level0.call(client, "echo", lambda p: setattr(p, "data", b"hi"))
        assert bytes(r.data) == b"ih"
        with trio.move_on_after(0.05):
            await level0.call(client, "echo", lambda p: setattr(p, "data", b"never"))
        await trio.sleep(0.05)
        assert cancelled == [True]
        assert bytes((await level0.call(client, "echo", lambda p: setattr(p, "data", b"ok"))).data) == b"ko"

        async def lose_later():
            await trio.sleep(0.05)
            for conn in list(server_conns):
                conn.transport.abort()

        async with trio.open_nursery() as n:
            n.start_soon(lose_later)
            with pytest.raises(level0.RpcError) as e:
                await level0.call(client, "echo", lambda p: setattr(p, "data", b"never"))
        assert e.value.kind == "disconnected"
        with pytest.raises(level0.RpcError):
            client.call("echo", lambda p: None, lambda r, e: None)
        server.close()

    bridge.run(main)


def test_a_call_given_up_after_its_time_limit():
    """No Return within the limit: the caller gets a timeout, the server
    hears the call was given up (Finish), and the connection serves on;
    calls answered in time are not touched by the connection's timer."""
    make, cancelled = _echo_server()

    async def main():
        loop = asyncio.get_running_loop()
        server = await bridge.aio(loop.create_server(make, "127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        _, client = await bridge.aio(loop.create_connection(lambda: level0.Client(fabric.Node), "127.0.0.1", port))
        ended = {}

        async def wait(limit):
            t = trio.current_time()
            with pytest.raises(level0.RpcError) as e:
                await level0.call(client, "echo", lambda p: setattr(p, "data", b"never"), limit)
            assert e.value.kind == "timeout"
            ended[limit] = trio.current_time() - t

        async with trio.open_nursery() as n:  # the second, shorter limit moves the timer earlier
            n.start_soon(wait, 0.3)
            await trio.sleep(0.01)
            n.start_soon(wait, 0.1)
        # (the host loop's clock counts milliseconds: a limit may end a grain early)
        assert 0.09 <= ended[0.1] < 0.25 and 0.29 <= ended[0.3] < 0.6, ended
        await trio.sleep(0.05)
        assert cancelled == [True, True]
        for _ in range(20):
            r = await level0.call(client, "echo", lambda p: setattr(p, "data", b"ok"), 0.05)
            assert bytes(r.data) == b"ko"
        await trio.sleep(0.1)  # past those limits: nothing fires for calls already answered
        assert not client.deadlines and client.timer is None
        server.close()

    bridge.run(main)


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff" + b"\0" * 64,                  # 2**32 segments
    b"\0\0\0\0\xff\xff\xff\x7f",                       # one segment of 16 GiB
    b"\0\0\0\0\x02\0\0\0" + b"\xff" * 16,              # a root pointer to nowhere
    b"\0\0\0\0\x01\0\0\0" + b"\x02\0\0\0\x05\0\0\0",  # a far pointer to a segment not sent
])
def test_malformed_messages_abort_only_their_connection(garbage):
    factory, _ = _echo_server()

    async def main():
        loop = asyncio.get_running_loop()
        server, port = await _listen(factory)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(garbage)
            await asyncio.wait_for(reader.read(), 5)  # the server ends the connection
            writer.close()
            _, client = await loop.create_connection(lambda: level0.Client(fabric.Node), "127.0.0.1", port)
            fut = loop.create_future()
            client.call("echo", lambda p: setattr(p, "data", b"ok"), lambda r, e: fut.set_result(bytes(r.data)))
            assert await asyncio.wait_for(fut, 5) == b"ko"
            client.close()
        finally:
            server.close()

    _run(main)


class _Recorder:
    """A transport that keeps what is written, as written."""

    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)

    def writelines(self, pieces):
        self.written.extend(pieces)

    def close(self):
        pass


def test_framing_in_pieces():
    """Messages cut anywhere by the transport are put together again."""
    factory, _ = _echo_server()
    conn = factory()
    t = _Recorder()
    sent = t.written
    conn.connection_made(t)
    from drvs.ipc.schema import rpc

    msgs = b""
    big = bytes(range(256)) * 400  # more than a quarter of the read buffer: read in place
    for qid, data in ((0, None), (1, big), (2, b"bb")):
        m = rpc.Message.new_message()
        if data is None:
            m.init("bootstrap").questionId = qid
        else:
            c = m.init("call")
            c.questionId = qid
            c.target.init("promisedAnswer").questionId = 0
            c.interfaceId, c.methodId = fabric.Node.schema.node.id, 4
            c.init("params").content.as_struct(fabric.Node.schema.methods["echo"].param_type).data = data
        msgs += m.to_bytes()
    for cut in (7, 3000):  # small pieces, and pieces of a message read in place
        for i in range(0, len(msgs), cut):
            piece = msgs[i:i + cut]
            while piece:
                buf = conn.get_buffer(len(piece))
                n = min(len(buf), len(piece))
                buf[:n] = piece[:n]
                conn.buffer_updated(n)
                piece = piece[n:]
        conn.answers.clear()
        conn.bootstraps.clear()
    answers = []
    raw = b"".join(sent)
    while raw:
        count = int.from_bytes(raw[:4], "little") + 1
        head = (4 * count + 11) & ~7
        size = head + 8 * sum(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "little") for i in range(count))
        with rpc.Message.from_bytes(raw[:size]) as m:
            r = getattr(m, "return")
            answers.append(r.answerId)
            if r.answerId == 1:
                assert r.results.content.as_struct(fabric.Node.schema.methods["echo"].result_type).data == big[::-1]
        raw = raw[size:]
    assert answers == [0, 1, 2] * 2


def test_a_large_payload_goes_out_as_its_own_buffer():
    """A large payload is written as the very buffer it was given (a second
    segment of the message, not copied into it); the bytes written are a
    standard message that pycapnp reads back."""
    big = bytes(range(256)) * 390 + b"odd"
    client = level0.Client(fabric.Node)
    client.transport = _Recorder()
    written = client.transport.written
    client.cap = 0  # as if bootstrapped
    client.call("sendrec", lambda p: Msg(3, big).fill_at(p, "msg", bulk=True), lambda r, e: None)
    assert any(piece is big for piece in written)
    frame = b"".join(written)
    assert int.from_bytes(frame[:4], "little") == 1  # two segments
    m = from_flat(rpc.Message, frame)
    msg = m.call.params.content.as_struct(fabric.Node.schema.methods["sendrec"].param_type).msg
    assert (msg.type, msg.payload) == (3, big)


def test_a_read_reply_is_taken_as_a_view_only_in_its_own_layout():
    """bulk_of finds a large Data field in flat_with's layout (no copy), and
    declines any other (a small field in segment 0 while another field
    spilled into segment 1), where from_flat must read it."""
    from drvs.ipc.schema import bulk_of, flat_with, fs, new

    data = bytes(range(256)) * 300 + b"end"
    flat = b"".join(flat_with(new(fs.FsReply, epoch=2), "data", data))
    view = bulk_of(flat, fs.FsReply, "data")
    assert isinstance(view, memoryview) and view == data and from_flat(fs.FsReply, flat).epoch == 2
    assert bulk_of(flat_with(new(fs.FsReply), "data", b"small"), fs.FsReply, "data") is None
    other = fabric.Message.new_message(payload=b"tiny")
    other.error = "e" * 20000  # bytes too, larger than the first segment: they spill into segment 1
    flat = other.to_bytes()
    assert int.from_bytes(flat[:4], "little") == 1  # two segments, as flat_with's
    assert bulk_of(flat, fabric.Message, "payload") is None
    assert from_flat(fabric.Message, flat).payload == b"tiny"


def test_a_large_reply_payload_is_a_view_of_its_message():
    """The fabric's lane hands a large reply's payload on as a view of the
    message it came in (no copy), a small one as bytes; both as sent."""
    from drvs.ipc.fabric import Lane

    factory, _ = _echo_server()

    async def main():
        server, port = await _listen(factory)
        loop = asyncio.get_running_loop()
        try:
            _, lane = await loop.create_connection(lambda: Lane("n2", ("127.0.0.1", port)), "127.0.0.1", port)
            got = []
            for payload in (bytes(range(256)) * 200 + b"tail", b"short"):
                fut = loop.create_future()
                lane.sendrec("fs@web", Msg(5, payload), 0, lambda r, e, fut=fut: fut.set_result((r, e)))
                reply, error = await fut
                assert error is None and (reply.type, reply.view()) == (6, payload[::-1])
                got.append(type(reply.view()))
            assert got == [memoryview, bytes]
            lane.close()
        finally:
            server.close()

    _run(main)


def test_out_of_line_finds_its_field_past_equal_bytes_and_keeps_long_names_inline():
    """The data's marker is found even where another field holds the same
    bytes first; a message whose text fields are long (in bytes, not
    characters) keeps its payload inline rather than fail."""
    from drvs.ipc.schema import MARKER, flat_with, fs, new

    out = new(fs.FsReply, epoch=4)
    out.init("entries", 1)[0].name = MARKER  # the marker's bytes in a field before the data
    data = bytes(range(256)) * 200
    r = from_flat(fs.FsReply, b"".join(flat_with(out, "data", data)))
    assert (r.data, r.entries[0].name, r.epoch) == (data, MARKER, 4)

    wide = "\U0001F600" * 1023  # 4 bytes each: ~4 KiB per field
    params = fabric.Node.schema.methods["sendrec"].param_type
    m = level0.rpc.Message.new_message()
    c = m.init("call")
    bulk = Msg(3, data, source=wide, error=wide).fill(c.init("params").content.as_struct(params).init("msg"),
                                                     bulk=True)
    assert bulk is None  # inline: the rest would not fit beside it
    got = from_flat(rpc.Message, b"".join(level0.encode(m, bulk)))
    msg = got.call.params.content.as_struct(params).msg
    assert (msg.payload, msg.source) == (data, wide)


def test_a_large_request_payload_reaches_its_endpoint_as_a_view_of_its_message():
    """The serving node's lane hands a large request's payload to the
    endpoint as a view of the message it came in (a remote write's data is
    not copied on its way to the file server), a small one as bytes; both
    as sent, and the node they came from is the peer's."""
    from drvs.ipc.fabric import Lane, NodeLane

    seen = []

    class Endpoints:  # what NodeLane asks of the fabric: an answer made as the call arrives
        def answer_now(self, target, m):
            seen.append((target, type(m.view()), m.node))
            return Msg(m.type + 1, bytes(m.view())[::-1])

    async def main():
        server, port = await _listen(NodeLane(Endpoints(), None, "n1").protocol)
        loop = asyncio.get_running_loop()
        try:
            _, lane = await loop.create_connection(lambda: Lane("n2", ("127.0.0.1", port)), "127.0.0.1", port)
            for payload in (bytes(range(256)) * 200 + b"tail", b"short"):
                fut = loop.create_future()
                lane.sendrec("fs@web", Msg(5, [payload[:7], payload[7:]]), 0,
                             lambda r, e, fut=fut: fut.set_result((r, e)))
                reply, error = await fut
                assert error is None and (reply.type, bytes(reply.view())) == (6, payload[::-1])
            assert seen == [("fs@web", memoryview, "n1"), ("fs@web", bytes, "n1")]
            lane.close()
        finally:
            server.close()

    _run(main)


def test_a_call_that_comes_as_its_node_stops_is_refused_as_not_served_here():
    """A call the fast path leaves for trio, coming after the daemon's
    nursery closed (it is stopping): sendrec's caller gets EREMCHG (the
    message went nowhere: send it to where the endpoint is now), a send
    the connection's loss (ECONNRESET) -- never a server error."""
    from drvs.ipc.fabric import Lane, NodeLane

    class Closed:
        def start_soon(self, *args):
            raise RuntimeError("Nursery is closed to new arrivals")

    class Guest:
        nursery = Closed()
        def __init__(self):
            self.done = asyncio.get_running_loop().create_future()  # (not done: its nursery refuses)

    class Stopping:  # no fast answer: the call is for trio
        name = "n1"

        def answer_now(self, target, m):
            return None

        async def deliver(self, *args):
            raise AssertionError("not to be delivered")

    async def main():
        server, port = await _listen(NodeLane(Stopping(), Guest(), "n2").protocol)
        ended = Guest()
        ended.done.set_result(None)  # (trio's run is over: asked for nothing)
        ended.nursery = None
        later, later_port = await _listen(NodeLane(Stopping(), ended, "n2").protocol)
        loop = asyncio.get_running_loop()
        try:
            _, lane = await loop.create_connection(lambda: Lane("n1", ("127.0.0.1", port)), "127.0.0.1", port)
            fut = loop.create_future()
            lane.sendrec("fs@web", Msg(5, b"x"), 0, lambda r, e: fut.set_result((r, e)))
            reply, error = await fut
            assert error is None and reply.status == -errno.EREMCHG and "n1 is stopping" in reply.error
            fut = loop.create_future()
            lane.call("send", lambda p: setattr(p, "target", "fs@web"), lambda r, e: fut.set_result(e))
            error = await fut
            assert error.kind == "disconnected" and "n1 is stopping" in error.reason
            lane.close()
            _, lane = await loop.create_connection(lambda: Lane("n1", ("127.0.0.1", later_port)), "127.0.0.1",
                                                   later_port)
            fut = loop.create_future()
            lane.sendrec("fs@web", Msg(5, b"x"), 0, lambda r, e: fut.set_result((r, e)))
            reply, error = await fut
            assert error is None and reply.status == -errno.EREMCHG
            lane.close()
        finally:
            server.close()
            later.close()

    _run(main)


def test_an_error_names_its_endpoint_once():
    from drvs.ipc.message import said_of

    assert said_of("drvmm@n2", "no reply in time") == "drvmm@n2: no reply in time"
    assert said_of("drvmm@n2", "drvmm@n2: busy") == "drvmm@n2: busy"
    assert said_of("drvmm@n2", "no endpoint 'drvmm@n2' (not registered, or its node is gone)") \
        == "no endpoint 'drvmm@n2' (not registered, or its node is gone)"
