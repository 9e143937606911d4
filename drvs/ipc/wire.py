"""pycapnp's stream protocol behind a transport of our own.

pycapnp's asyncio protocol writes each piece of a message with its own
transport.write (the segment table, then each segment: two TLS records and
two TCP segments for one small message), turns the transport's reading on
and off around every read (two epoll_ctl calls each), and lends the
transport kj's own read buffer, which uvloop's transports crash on (SIGSEGV,
seen with the stream protocol on unix sockets).  A Wire sits in between: it
is the protocol of the real transport, reading continuously into a buffer of
its own, and the transport of pycapnp's protocol, feeding it what it asks
for and sending each message in one write.

    stream = await connect(host=..., port=..., ssl=..., server_hostname=...)
    stream = await connect(path=UNIX_SOCKET)
    server = await serve(callback, sock=..., ssl=...)      # or path=...
    server = await serve(callback, sock=..., ssl=..., peer_of=f)

The stream is a capnp.AsyncIoStream, for TwoPartyClient/TwoPartyServer.
"""

import asyncio
import contextvars

import capnp

from .schema import MAX_SEGMENTS

READ_BUFFER = 256 * 1024
HIGH_WATER = 4 * 1024 * 1024   # received and not yet taken by capnp: stop reading

# What the connection being set up knows about its peer (for the callback
# that serves it): set from the real transport by serve(peer_of=...).
PEER: contextvars.ContextVar[object] = contextvars.ContextVar("drvs_wire_peer", default=None)


class Wire(asyncio.BufferedProtocol):
    """Protocol of the real transport; transport of pycapnp's protocol."""

    def __init__(self, inner, peer_of=None):
        self.inner, self.peer_of = inner, peer_of
        self.transport = None
        self.rbuf = memoryview(bytearray(READ_BUFFER))  # a view: asyncio's SSL slices it to read on
        self.pending = bytearray()  # received, not yet taken by capnp
        self.wanted = False         # capnp has a read outstanding (it "resumed" us)
        self.throttled = False      # we paused the real transport
        self.eof = False            # the peer shut its side; told capnp once pending is taken
        self.lost: tuple | None = None  # (exc,): the transport is gone; told capnp once pending is taken
        self.closed = False         # capnp closed us
        self.out: list[bytes] = []  # pieces of the message being written
        self.table = bytearray()    # the segment table being written, until complete
        self.left = -1              # bytes of the current message still to come; -1: between messages
        self.flush_soon = None

    def usable(self) -> bool:
        """Whether the connection still stands: neither side closed it (a
        peer that died or restarted shut it; a call on it would fail)."""
        t = self.transport
        return t is not None and not t.is_closing() and self.lost is None and not self.eof and not self.closed

    # -- the real transport calls these --------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        token = PEER.set(self.peer_of(transport) if self.peer_of else None)
        try:
            self.inner.connection_made(self)  # pycapnp makes its serving task here, in this context
        finally:
            PEER.reset(token)

    def get_buffer(self, sizehint):
        return self.rbuf

    def buffer_updated(self, nbytes):
        data = self.rbuf[:nbytes]
        if self.wanted and not self.pending:
            data = self._feed(data)
        if data:
            self.pending += data
            self._pump()
        if len(self.pending) > HIGH_WATER and not self.throttled:
            self.throttled = True
            self.transport.pause_reading()

    def eof_received(self):
        if self.pending:
            self.eof = True
            return True  # keep the transport until capnp took what came before the end
        return self.inner.eof_received()

    def connection_lost(self, exc):
        if self.flush_soon is not None:
            self.flush_soon.cancel()
            self.flush_soon = None
        if self.pending or self.eof:
            self.lost = (exc,)  # what came before the end is capnp's first (TLS closes at once)
        else:
            self.inner.connection_lost(exc)

    def pause_writing(self):
        self.inner.pause_writing()

    def resume_writing(self):
        self.inner.resume_writing()

    # -- feeding pycapnp's protocol -------------------------------------------

    def _feed(self, data: memoryview) -> memoryview:
        """Give capnp as much of data as its outstanding read takes; the rest."""
        while data and self.wanted:
            buf = self.inner.get_buffer(len(data))
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            data = data[n:]
            self.inner.buffer_updated(n)  # may end the read (pause_reading below)
        return data

    def _pump(self) -> None:
        while self.pending and self.wanted:
            buf = self.inner.get_buffer(len(self.pending))
            n = min(len(buf), len(self.pending))
            buf[:n] = self.pending[:n]
            del self.pending[:n]
            self.inner.buffer_updated(n)
        if self.throttled and len(self.pending) < HIGH_WATER // 2 and self.transport is not None:
            self.throttled = False
            self.transport.resume_reading()
        if self.eof and not self.pending:
            self.eof = False
            if not self.inner.eof_received() and self.transport is not None and self.lost is None:
                self.transport.close()
        if self.lost is not None and not self.pending and not self.eof:
            (exc,), self.lost = self.lost, None
            self.inner.connection_lost(exc)

    # -- pycapnp's protocol calls these (the transport API it uses) ----------

    def pause_reading(self):
        self.wanted = False

    def resume_reading(self):
        self.wanted = True
        if self.pending or self.eof or self.lost is not None:
            self._pump()

    def write(self, data):
        self.out.append(data)
        if self._message_done(data):
            self.flush()
        elif self.flush_soon is None:
            # Not a whole message yet (or framing we do not follow): it goes
            # out by the end of this loop turn whatever comes next.
            self.flush_soon = asyncio.get_running_loop().call_soon(self.flush)

    def _message_done(self, data) -> bool:
        """Follow capnp's stream framing (a table: u32 segment count - 1, u32
        size in words per segment, padded to 8 bytes; then the segments):
        whether data completes a message."""
        if self.left < 0:
            self.table += data
            if len(self.table) < 4:
                return False
            count = int.from_bytes(self.table[:4], "little") + 1
            if count > MAX_SEGMENTS:
                self.table.clear()
                return True  # not a table we understand: just send
            size = (4 + 4 * count + 7) & ~7
            if len(self.table) < size:
                return False
            words = sum(int.from_bytes(self.table[4 + 4 * i:8 + 4 * i], "little") for i in range(count))
            self.left = words * 8 - (len(self.table) - size)
            self.table.clear()
        else:
            self.left -= len(data)
        if self.left > 0:
            return False
        self.left = -1  # (a piece spanning two messages loses the count; flush_soon covers it)
        return True

    def flush(self):
        if self.flush_soon is not None:
            self.flush_soon.cancel()
            self.flush_soon = None
        if self.out and self.transport is not None:
            data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
            self.out = []
            self.transport.write(data)

    def is_closing(self):
        if self.closed:
            return True
        if self.pending or self.eof or self.lost is not None:
            return False  # capnp may still read what came before the end
        return self.transport is None or self.transport.is_closing()

    def close(self):
        self.closed = True
        if self.transport is not None:
            self.flush()
            self.transport.close()

    def can_write_eof(self):
        return self.transport is not None and self.transport.can_write_eof()

    def write_eof(self):
        self.flush()
        self.transport.write_eof()

    def get_extra_info(self, name, default=None):
        return self.transport.get_extra_info(name, default) if self.transport is not None else default


async def connect(*, path: str | None = None, wires: list | None = None, **kwargs):
    """A capnp stream to a unix socket (path) or over TCP (loop.create_connection's
    keyword arguments: host, port or sock, ssl, server_hostname).  wires: a
    list the Wire made is appended to (Wire.usable: whether the connection
    still stands)."""
    loop = asyncio.get_running_loop()
    made = loop.create_future()

    def factory():
        wire = Wire(capnp.AsyncIoStream._connect(lambda stream: made.done() or made.set_result(stream)))
        if wires is not None:
            wires.append(wire)
        return wire

    if path is not None:
        await loop.create_unix_connection(factory, path, **kwargs)
    else:
        await loop.create_connection(factory, **kwargs)
    return await made


class _Switch(asyncio.Protocol):
    """A connection's first protocol, there only to choose the real one by
    the TLS application protocol (ALPN) its client asked for."""

    def __init__(self, default, alpn: dict, admit=None):
        self.default, self.alpn, self.admit = default, alpn, admit

    def connection_made(self, transport):
        if self.admit is not None and not self.admit(transport):
            transport.abort()  # (this protocol stays: what the peer sent meanwhile is dropped)
            return
        ssl_object = transport.get_extra_info("ssl_object")
        make = self.alpn.get(ssl_object.selected_alpn_protocol() if ssl_object else None)
        protocol = make(transport) if make else self.default()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


async def serve(callback, *, path: str | None = None, peer_of=None, alpn: dict | None = None, admit=None,
                **kwargs):
    """An asyncio server whose connections are capnp streams handed to
    callback(stream) (a coroutine function, run as a task).  peer_of(transport),
    when given, is what PEER holds while callback's task is made.  alpn:
    {name: make(transport) -> protocol} for the connections whose client
    asked for that TLS application protocol.  admit(transport), when given,
    says whether to serve a connection at all (after its TLS handshake)."""
    loop = asyncio.get_running_loop()

    def wire():
        return Wire(capnp.AsyncIoStream._connect(callback), peer_of)

    factory = (lambda: _Switch(wire, alpn or {}, admit)) if alpn or admit else wire

    if path is not None:
        return await loop.create_unix_server(factory, path, **kwargs)
    return await loop.create_server(factory, **kwargs)
