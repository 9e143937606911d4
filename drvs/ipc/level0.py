"""Cap'n Proto RPC at level 0, in Python, for calls that carry no capabilities.

pycapnp's RPC costs ~35 µs of Python per call on each side here (a Task per
served call, kj's event loop scheduled through asyncio, a wrapper object per
step): cross-node, more than the network's own round trip.  The fabric's
message calls (Node.sendrec, send, notify, echo, info) carry only data, so
they need only the protocol's level 0 (rpc.capnp: Bootstrap, Call, Return,
Finish, Release, Abort, Unimplemented), which this module speaks directly on
an asyncio transport: one message parsed and one built per call and side,
no tasks.  The messages are the standard ones, so a pycapnp client can call
a Server here and a Client here can call a pycapnp server (tests check both).
Calls whose parameters or results hold capabilities (Node.run) stay on
pycapnp's full RPC.

    server = Server(fabric.Node, {"echo": handler, ...})   # an asyncio protocol
        handler(answer, params): answer.reply(fill) now or later, or answer.fail(reason)
    client = Client(fabric.Node)                            # an asyncio protocol
        qid = client.call("echo", fill, done)   done(results, error), on the loop
        client.cancel(qid)
    await call(client, "echo", fill)           trio: the results (a reader)

Both run on the loop's thread (the trio guest's too); nothing here blocks.
"""

import asyncio
import logging
import struct

import capnp
import outcome
import trio

from .schema import MAX_SEGMENTS, MAX_WORDS, out_of_line, pointer_index, rpc, segments

log = logging.getLogger("drvs.level0")

READ_BUFFER = 256 * 1024
NESTING = 64
TIMER_GRAIN = 0.001       # the host loop's clock: uvloop counts milliseconds
_U32 = struct.Struct("<I")


def encode(m, bulk=None) -> list:
    """Message m as buffers to write; bulk (a schema.Bulk whose path starts
    at m): sent out of line (not copied)."""
    return [m.to_bytes()] if bulk is None else out_of_line(m, bulk)


# From an RPC message to the struct a call's fill or an answer's fill sets.
PARAMS = (pointer_index(rpc.Message.schema, "call"), pointer_index(rpc.Call.schema, "params"),
           pointer_index(rpc.Payload.schema, "content"))
RESULTS = (pointer_index(rpc.Message.schema, "return"), pointer_index(rpc.Return.schema, "results"),
            pointer_index(rpc.Payload.schema, "content"))


class ProtocolError(Exception):
    """The peer broke the protocol: the connection is aborted."""


class RpcError(Exception):
    """A call failed: the peer's exception (kind as rpc.capnp names it), or
    the connection ended ("disconnected")."""

    def __init__(self, reason: str, kind: str = "failed"):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


def _methods(interface) -> dict[str, tuple[int, object, object]]:
    """name -> (method id, params schema, results schema)."""
    s = interface.schema
    return {m.name: (i, s.methods[m.name].param_type, s.methods[m.name].result_type)
            for i, m in enumerate(s.node.interface.methods)}


class _Connection(asyncio.BufferedProtocol):
    """The stream framing both ends share (a table: u32 segment count - 1,
    u32 words per segment, padded to 8 bytes; then the segments), whole
    messages handed to received().  Small messages are read into one
    buffer and copied out; a large one gets a buffer of its own that the
    transport reads (and TLS decrypts) straight into: two copies of 64 KiB
    less than data_received (64 KiB calls with 16 in flight: 430 -> 550
    MB/s between two namespaces here).  What is sent while received data
    is handled goes out in one write when it is done."""

    def __init__(self):
        self.transport = None
        self.closed = False
        self.buf = bytearray(READ_BUFFER)
        self.view = memoryview(self.buf)
        self.start = self.end = 0      # received and not yet handled: buf[start:end]
        self.big: memoryview | None = None  # a large message being read in place
        self.big_sizes: tuple = ()           # its segments' sizes
        self.big_at = 0
        self.batch: list | None = None  # what to send when handling is done
        self.frame: memoryview | None = None  # the message being handled, as it came

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        if self.big is not None:
            return self.big[self.big_at:]
        if self.end == len(self.buf):  # full: what is left of a message moves to the front
            left = self.end - self.start
            self.buf[:left] = self.view[self.start:self.end]
            self.start, self.end = 0, left
        return self.view[self.end:]

    def buffer_updated(self, nbytes):
        if self.closed:
            return  # (a closing TLS transport may still deliver what it had)
        self.batch = []
        try:
            if self.big is not None:
                self.big_at += nbytes
                if self.big_at == len(self.big):
                    big, self.big = self.big, None
                    self._message(big, self.big_sizes)
            else:
                self.end += nbytes
                self._scan()
        except (ProtocolError, capnp.KjException) as e:
            self.abort(f"bad message: {e}")
        except Exception as e:  # noqa: BLE001 - a bug here must not leave calls hanging
            log.exception("level-0 RPC: handling a message")
            self.abort(f"internal error: {type(e).__name__}")
        finally:
            batch, self.batch = self.batch, None
            if batch and not self.closed:
                self.transport.writelines(batch)

    def _scan(self) -> None:
        """Handle each whole message in buf[start:end]; start a large one's
        own buffer."""
        buf = self.buf
        while not self.closed:
            off, avail = self.start, self.end - self.start
            if avail < 8:
                break
            count = _U32.unpack_from(buf, off)[0] + 1
            if count > MAX_SEGMENTS:
                raise ProtocolError(f"{count} segments")
            size = (4 * count + 11) & ~7
            if avail < size:
                break
            sizes = struct.unpack_from(f"<{count}I", buf, off + 4)
            words = sum(sizes)
            if words > MAX_WORDS:
                raise ProtocolError(f"{words * 8} bytes, more than {MAX_WORDS * 8}")
            size += 8 * words
            if avail >= size:
                self.start += size
                self._message(memoryview(bytes(self.view[off:off + size])), sizes)
            elif size > len(buf) // 4:
                self.big, self.big_sizes = memoryview(bytearray(size)), sizes
                self.big[:avail] = self.view[off:self.end]
                self.big_at = avail
                self.start = self.end
                break
            else:
                break
        if self.start == self.end:
            self.start = self.end = 0

    def _message(self, data: memoryview, sizes: tuple) -> None:
        """One whole message (its own memory: readers may keep it), of
        segments of these sizes in words; the frame is self.frame while it
        is handled."""
        parts, _ = segments(data, sizes)
        self.frame = data
        try:
            self.received(rpc.Message.from_segments(parts, traversal_limit_in_words=MAX_WORDS,
                                                    nesting_limit=NESTING))
        finally:
            self.frame = None

    def received(self, m) -> None:
        raise NotImplementedError

    def send(self, m) -> None:
        self.send_pieces(encode(m))

    def send_pieces(self, pieces: list) -> None:
        if self.closed or self.transport is None:
            return
        self._write(*pieces)

    def _write(self, *pieces) -> None:
        if self.batch is not None:
            self.batch.extend(pieces)
        elif len(pieces) == 1:
            self.transport.write(pieces[0])
        else:
            self.transport.writelines(pieces)

    def eof_received(self):
        return False  # close

    def connection_lost(self, exc):
        self.closed = True

    def abort(self, reason: str) -> None:
        """Tell the peer why (Abort) and close."""
        if self.closed:
            return
        log.info("level-0 RPC connection aborted: %s", reason)
        m = rpc.Message.new_message()
        e = m.init("abort")
        e.reason, e.type = reason, "failed"
        batch, self.batch = self.batch, None  # what was answered before goes first
        self._write(*(batch or ()), m.to_bytes())
        self.closed = True
        self.transport.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def unimplemented(self, m) -> None:
        """What level 0 does not do: sent back, as the protocol asks."""
        out = rpc.Message.new_message()
        out.unimplemented = m
        self.send(out)


# -- serving -----------------------------------------------------------------

class Answer:
    """One call being served: answered once, by reply() or fail().  If the
    caller gives up first (Finish), on_cancel() is called when set, and the
    caller is told the call was cancelled."""

    __slots__ = ("conn", "qid", "results", "done", "on_cancel")

    def __init__(self, conn: "Server", qid: int, results=None):
        self.conn, self.qid, self.results = conn, qid, results
        self.done = False
        self.on_cancel = None

    def _return(self):
        m = rpc.Message.new_message()
        r = m.init("return")
        r.answerId = self.qid
        r.noFinishNeeded = True  # no capabilities in the results: nothing to release
        return m, r

    def _send(self, m) -> None:
        self._send_pieces(encode(m))

    def _send_pieces(self, pieces: list) -> None:
        self.done = True
        self.conn.answers.pop(self.qid, None)
        self.conn.send_pieces(pieces)

    def reply(self, fill=None) -> None:
        """Answer with results; fill(results builder) sets them (if it
        raises, the caller gets the error instead) and may return bulk data
        to send out of line (a schema.Bulk whose path starts at the results)."""
        if self.done:
            return
        m, r = self._return()
        results = r.init("results")._get("content").as_struct(self.results)
        try:
            bulk = fill(results) if fill is not None else None
            pieces = encode(m, bulk.under(*RESULTS) if bulk is not None else None)
        except Exception as e:  # noqa: BLE001 - the caller must get an answer
            log.exception("level-0 RPC: filling the results of question %d", self.qid)
            return self.fail(f"server error: {type(e).__name__}: {e}")
        self._send_pieces(pieces)

    def fail(self, reason: str, kind: str = "failed") -> None:
        if self.done:
            return
        m, r = self._return()
        e = r.init("exception")
        e.reason, e.type = reason, kind
        self._send(m)

    def _cancelled(self) -> None:
        if self.done:
            return
        m, r = self._return()
        r.canceled = None
        self._send(m)
        if self.on_cancel is not None:
            self.on_cancel()


class Server(_Connection):
    """Serves one capability, the connection's bootstrap interface, whose
    methods named in handlers are answered here; others fail as
    unimplemented (a caller with capabilities to pass uses full RPC)."""

    def __init__(self, interface, handlers: dict):
        super().__init__()
        self.iid = interface.schema.node.id
        self.table = {mid: (handlers[name], params, results)
                      for name, (mid, params, results) in _methods(interface).items() if name in handlers}
        self.answers: dict[int, Answer] = {}
        self.bootstraps: set[int] = set()  # questions whose answer is our capability

    def received(self, m) -> None:
        which = m._which_str()  # (see schema.py: fields by _get, not as attributes, on the per-call paths)
        if which == "call":
            self._call(m._get("call"))
        elif which == "finish":
            self._finish(m._get("finish")._get("questionId"))
        elif which == "bootstrap":
            self._bootstrap(m.bootstrap.questionId)
        elif which == "release":
            pass  # our one capability lives as long as the connection
        elif which == "abort":
            log.info("level-0 RPC: the peer aborted: %s", m.abort.reason)
            self.close()
        elif which == "unimplemented":
            log.info("level-0 RPC: the peer did not understand a %s", m.unimplemented.which())
        else:
            self.unimplemented(m)

    def _call(self, c) -> None:
        get = c._get
        qid = get("questionId")
        if qid in self.answers or qid in self.bootstraps:
            raise ProtocolError(f"question {qid} asked twice")
        answer = Answer(self, qid)
        target = get("target")
        if target._which_str() == "importedCap":
            ours = target._get("importedCap") == 0
        else:
            pa = target._get("promisedAnswer")
            ours = pa._get("questionId") in self.bootstraps and len(pa._get("transform")) == 0
        iid, mid = get("interfaceId"), get("methodId")
        entry = self.table.get(mid) if iid == self.iid else None
        if not ours:
            return answer.fail("call to a capability this connection does not have")
        if entry is None or get("sendResultsTo")._which_str() != "caller":
            return answer.fail(f"method {iid:#x}.{mid} not served on this connection", "unimplemented")
        handler, params, answer.results = entry
        self.answers[qid] = answer
        try:
            handler(answer, get("params")._get("content").as_struct(params))
        except capnp.KjException as e:  # malformed parameters
            answer.fail(f"bad parameters: {e.description}")
        except Exception as e:  # noqa: BLE001 - a server bug fails the call, not the connection
            log.exception("level-0 RPC: method %d", mid)
            answer.fail(f"server error: {type(e).__name__}: {e}")

    def _finish(self, qid: int) -> None:
        self.bootstraps.discard(qid)
        answer = self.answers.get(qid)
        if answer is not None:
            answer._cancelled()

    def _bootstrap(self, qid: int) -> None:
        if qid in self.answers or qid in self.bootstraps:
            raise ProtocolError(f"question {qid} asked twice")
        self.bootstraps.add(qid)
        self._write(_bootstrap_return(qid))

    def connection_lost(self, exc):
        super().connection_lost(exc)
        for answer in list(self.answers.values()):
            answer.done = True
            if answer.on_cancel is not None:
                answer.on_cancel()
        self.answers.clear()


def _bootstrap_return(qid: int) -> bytes:
    """Return{answerId: qid, results: {content: capability 0, capTable:
    [senderHosted 0]}}.  pycapnp cannot put a capability into an AnyPointer
    without a live client, so the content pointer is written by hand: a
    capability pointer is the word 3 | index << 32 (encoding spec, "Other
    pointers").  The walk below follows the struct pointers the builder made
    (Message -> Return -> Payload) to that pointer's word."""
    m = rpc.Message.new_message()
    r = m.init("return")
    r.answerId = qid
    caps = r.init("results").init("capTable", 1)
    caps[0].senderHosted = 0
    segments = m.to_segments()
    if len(segments) != 1:
        raise AssertionError("bootstrap return spans segments")
    words = memoryview(bytearray(segments[0])).cast("Q")

    def pointers(at: int) -> int:
        """Where the pointer section of the struct that word `at` points to begins."""
        w = words[at]
        offset = (w >> 2) & 0x3FFFFFFF
        if offset & 0x20000000:
            offset -= 0x40000000
        return at + 1 + offset + ((w >> 32) & 0xFFFF)

    content = pointers(pointers(pointers(0)))  # Message.return -> Return.results -> Payload.content
    if words[content] != 0:
        raise AssertionError("bootstrap return: content pointer not where expected")
    words[content] = 3  # capability 0 of the table
    body = words.cast("B").tobytes()
    return _U32.pack(0) + _U32.pack(len(body) // 8) + body


# -- calling -----------------------------------------------------------------

class Client(_Connection):
    """Calls the peer's bootstrap capability (of `interface`).  Calls may
    be made at once: until the bootstrap answer comes they are pipelined on
    it.  on_lost(), when set, is called once the connection is gone."""

    def __init__(self, interface, on_lost=None):
        super().__init__()
        self.iid = interface.schema.node.id
        self.methods = _methods(interface)
        self.questions: dict[int, tuple] = {}  # qid -> (done, results schema)
        self.cancelled: set[int] = set()       # finished early; their Return is still due
        self.free: list[int] = []
        self.next_qid = 1                       # 0 is the bootstrap question
        self.cap: int | None = None             # the bootstrap capability's import id
        self.on_lost = on_lost
        self.error: RpcError | None = None
        # Calls with a time limit: qid -> when (the loop's clock).  One timer
        # per connection, at the earliest, rather than one per call: calls
        # end far more often than they time out.
        self.deadlines: dict[int, float] = {}
        self.timer: asyncio.Handle | None = None
        self.timer_at = 0.0  # when it fires (uvloop's handles do not say)

    def connection_made(self, transport):
        super().connection_made(transport)
        m = rpc.Message.new_message()
        m.init("bootstrap").questionId = 0
        self.questions[0] = (self._bootstrapped, None)
        self.send(m)

    def _bootstrapped(self, results, error) -> None:
        if error is not None:
            self.abort(f"bootstrap failed: {error}")

    def call(self, method: str, fill, done, timeout: float | None = None) -> int:
        """Send a call (fill(params builder) sets its parameters, and may
        return bulk data to send out of line: a schema.Bulk whose path
        starts at the parameters); done(results,
        None) or done(None, RpcError) is called later, on the loop; if no
        Return came within timeout seconds, the call is given up (Finish) and
        done(None, RpcError(kind "timeout")).  Its question id, for cancel()."""
        if self.closed:
            raise self.error or RpcError("connection closed", "disconnected")
        mid, params, results = self.methods[method]
        m = rpc.Message.new_message()
        c = m.init("call")
        if self.cap is None:
            c._get("target").init("promisedAnswer").questionId = 0
        else:
            c._get("target").importedCap = self.cap
        c.interfaceId = self.iid
        c.methodId = mid
        c.noPromisePipelining = True
        bulk = fill(c.init("params")._get("content").as_struct(params))
        if self.free:
            qid = self.free.pop()
        else:
            qid, self.next_qid = self.next_qid, self.next_qid + 1
        c.questionId = qid
        try:
            pieces = encode(m, bulk.under(*PARAMS) if bulk is not None else None)
        except ValueError as e:  # (a bug: callers keep what goes beside bulk data small)
            self.free.append(qid)
            raise RpcError(f"call not encoded: {e}") from e
        self.questions[qid] = (done, results)
        try:
            if timeout is not None:
                self._limit(qid, timeout)
            self.send_pieces(pieces)
        except BaseException:
            # Not asked: done() must never run for a caller that never waits.
            self.questions.pop(qid, None)
            self.deadlines.pop(qid, None)
            self.free.append(qid)
            raise
        return qid

    def cancel(self, qid: int) -> None:
        """Give up on a call: its done() is not called."""
        if self.questions.pop(qid, None) is None:
            return
        self.deadlines.pop(qid, None)
        self.cancelled.add(qid)  # (its id is free again once its Return came)
        self._finish(qid, True)

    def _limit(self, qid: int, timeout: float) -> None:
        when = asyncio.get_running_loop().time() + timeout
        self.deadlines[qid] = when
        if self.timer is None or when < self.timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.timer_at = asyncio.get_running_loop().call_at(when, self._expire), when

    def _expire(self) -> None:
        """Give up the calls whose time is up; wait for the next one.  The
        loop's clock counts milliseconds (uvloop) and its timers may fire a
        little early: what is due within TIMER_GRAIN is due now."""
        self.timer = None
        now = asyncio.get_running_loop().time() + TIMER_GRAIN
        try:
            for qid in [q for q, when in self.deadlines.items() if when <= now]:
                entry = self.questions.get(qid)
                if entry is None:  # (given up meanwhile, by an earlier caller's callback)
                    self.deadlines.pop(qid, None)
                    continue
                self.cancel(qid)
                try:
                    entry[0](None, RpcError("no reply in time", "timeout"))
                except Exception:  # noqa: BLE001 - one caller's failure is not the others'
                    log.exception("level-0 RPC: a caller's callback failed")
        finally:
            if self.deadlines and not self.closed and self.timer is None:
                self._arm(max(min(self.deadlines.values()), now))

    def _finish(self, qid: int, release: bool) -> None:
        m = rpc.Message.new_message()
        f = m.init("finish")
        f.questionId, f.releaseResultCaps = qid, release
        f.requireEarlyCancellationWorkaround = False
        self.send(m)

    def received(self, m) -> None:
        which = m._which_str()
        if which == "return":
            self._return(m._get("return"))
        elif which == "abort":
            self._lost(RpcError(f"the peer aborted: {m.abort.reason}", "disconnected"))
            self.close()
        elif which == "unimplemented":
            log.info("level-0 RPC: the peer did not understand a %s", m.unimplemented.which())
        elif which in ("release", "finish"):
            pass  # we export nothing and ask nothing of the peer
        else:
            self.unimplemented(m)

    def _return(self, r) -> None:
        get = r._get
        qid = get("answerId")
        if qid in self.cancelled:
            self.cancelled.discard(qid)
            self.free.append(qid)
            return
        entry = self.questions.pop(qid, None)
        if entry is None:
            raise ProtocolError(f"return for question {qid}, never asked")
        self.deadlines.pop(qid, None)
        done, results = entry
        which = r._which_str()
        if qid == 0:
            if which == "results":
                caps = r.results.capTable
                if len(caps) != 1 or caps[0].which() != "senderHosted":
                    raise ProtocolError("bootstrap answer without a capability")
                self.cap = caps[0].senderHosted
            if not get("noFinishNeeded"):
                self._finish(0, False)  # we keep the capability
        else:
            if not get("noFinishNeeded"):
                self._finish(qid, True)
            self.free.append(qid)
        if which == "results":
            done(get("results")._get("content").as_struct(results) if results is not None else None, None)
        elif which == "exception":
            e = r.exception
            done(None, RpcError(e.reason, str(e.type)))
        else:
            done(None, RpcError(f"call ended without results ({which})"))

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self._lost(RpcError(f"connection lost{f': {exc}' if exc else ''}", "disconnected"))

    def _lost(self, error: RpcError) -> None:
        if self.error is not None:
            return
        self.error = error
        questions, self.questions = self.questions, {}
        self.deadlines.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for done, _ in questions.values():
            try:
                done(None, error)
            except Exception:  # noqa: BLE001 - one caller's failure is not the others'
                log.exception("level-0 RPC: a caller's callback failed")
        if self.on_lost is not None:
            self.on_lost()


async def call(client: Client, method: str, fill, timeout: float | None = None, convert=None):
    """trio: call method and return its results (a reader), or what
    convert(results) makes of them as they come (while client.frame is
    their message); cancelling the trio task gives up the call (Finish),
    as does a timeout (RpcError, kind "timeout": the connection's timer,
    not a trio deadline per call)."""
    task = trio.lowlevel.current_task()

    def done(results, error) -> None:
        if error is not None:
            result = outcome.Error(error)
        else:
            result = outcome.capture(convert, results) if convert is not None else outcome.Value(results)
        trio.lowlevel.reschedule(task, result)

    qid = client.call(method, fill, done, timeout)

    def abort(_raise_cancel):
        client.cancel(qid)
        return trio.lowlevel.Abort.SUCCEEDED

    return await trio.lowlevel.wait_task_rescheduled(abort)
