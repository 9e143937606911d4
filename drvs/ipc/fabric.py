"""The DRVMM fabric: Minix-style message passing between endpoints that may
live on any node.

An endpoint is a name, "SERVICE@VM" (node services use the node's name:
"drvmm@n1"), served by a handler `async def handle(Msg) -> Msg` on one node.
The registry in etcd maps names to nodes; entries carry the serving node's
lease, so they vanish with the node.  `sendrec` to a local endpoint calls
the handler directly; to a remote one it goes over Cap'n Proto RPC (TLS,
cluster CA) to that node's drvmmd.  Every call is bounded in time; a dead or
unreachable node gives IpcError, never a hang.
"""

import asyncio
import errno
import json
import logging
import math
import os
import socket
import ssl
import time

import capnp
import trio

from . import level0, wire
from .bridge import aio, aio_future, capnp_await, current_guest
from ..errors import DrvsError, EtcdUnavailable, SetupError
from ..store import CompareFailed
from ..cluster.revocation import Revoked
from .message import ETCD_AWAY, NOTIFY, IpcError, Later, Msg, failure, kj_reason
from .schema import BULK, bulk_at, pointer_index
from .schema import fabric as schema

log = logging.getLogger("drvmmd")

REGISTRY = "/drvs/endpoints/"
FABRIC_PORT = 7700
DEFAULT_TIMEOUT = 5.0
CONNECT_TIMEOUT = 3.0
RESOLVE_TTL = 1.0  # seconds an endpoint's location is trusted without asking etcd
# While etcd does not answer, a location known before is used as it was
# (the node there refuses, EREMCHG, what it no longer serves): etcd is
# asked again only after ETCD_RECHECK, and at most RESOLVE_WAIT is spent
# waiting for it when a location is at hand.  Without this an etcd outage
# stopped every VM's file system: each call, each replica's stream and
# each cache invalidation waited on etcd for its endpoint, and failed.
RESOLVE_WAIT = 0.5
ETCD_RECHECK = 10.0
# The TLS application protocol (ALPN) of the message lane: a connection that
# asks for it is served at Cap'n Proto RPC level 0 (drvs.ipc.level0); others
# get pycapnp's full RPC, which Node.run needs (it passes capabilities).
LANE_ALPN = "drvs-msg/1"


_AWAY = object()  # (what _registry_entry returns when etcd did not answer)


def check_name(name: str) -> str:
    service, at, vm = name.partition("@")
    if not (service and at and vm) or len(name) > 200 or "/" in name or "@" in vm:
        shown = name if len(name) <= 60 else f"{name[:60]}... ({len(name)} characters)"
        raise IpcError(f"invalid endpoint name {shown!r}: expected SERVICE@VM or SERVICE@NODE", errno.EINVAL)
    return name


def _bind(sock: socket.socket, host: str, port: int) -> None:
    """bind(), or SetupError in one line (the usual causes named)."""
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: " (another drvmmd, or another program, listens there)",
               errno.EADDRNOTAVAIL: " (not an address of this machine: the address the node joined with?)"}
        raise SetupError(f"cannot listen on {host}:{port}: {e.strerror}{why.get(e.errno, '')}") from None


def live_socket() -> socket.socket:
    """A TCP socket that notices a dead or cut-off peer within seconds, even
    while idle with a call pending: keepalive probes after 2 s idle, and
    unacknowledged data gives up after 6 s (TCP_USER_TIMEOUT)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 6000)
    # Small messages go out at once: with Nagle, a reply waits for the
    # peer's delayed ACK (40 ms here), and pycapnp does not set it for us.
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Location:
    __slots__ = ("node", "address", "port")

    def __init__(self, node: str, address: str, port: int):
        self.node, self.address, self.port = node, address, port


class Peer:
    """One full-RPC connection to another node's drvmmd (for Node.run)."""

    def __init__(self, client, node_cap, address: tuple[str, int], wire=None):
        self.client, self.node, self.address, self.wire = client, node_cap, address, wire

    def serves(self, loc) -> bool:
        """Whether this connection still reaches loc's drvmmd: the address
        it has, and not closed (a restarted daemon's old connection is)."""
        return self.address == (loc.address, loc.port) and (self.wire is None or self.wire.usable())


# The pointers from an RPC message to the payload of a sendrec's reply:
# Message.return -> Return.results -> Payload.content -> reply -> payload.
_REPLY_AT = pointer_index(schema.Node.schema.methods["sendrec"].result_type, "reply")
_REPLY_PAYLOAD = (*level0.RESULTS, _REPLY_AT, pointer_index(schema.Message.schema, "payload"))

# ... and to the payload of a sendrec's or send's message (Node.sendrec and
# Node.send take their message in the same field).
_MSG_AT = pointer_index(schema.Node.schema.methods["sendrec"].param_type, "msg")
_MSG_PAYLOAD = {m: (*level0.PARAMS, pointer_index(schema.Node.schema.methods[m].param_type, "msg"),
                    pointer_index(schema.Message.schema, "payload")) for m in ("sendrec", "send")}


def _msg_as_it_came(frame, m, path: tuple) -> Msg:
    """fabric.Message m of an RPC message being handled (frame, None if not
    at hand): a large payload sent out of line (found by path) is a view of
    the frame, no copy -- it lives as long as a view of it does."""
    if frame is not None and len(frame) >= BULK:
        payload = bulk_at(frame, path)
        if payload is not None:
            return Msg.from_capnp(m, payload)
    return Msg.from_capnp(m)


def _fill_reply(results, reply: Msg):
    """Set a sendrec's results to reply (a large payload out of line)."""
    return reply.fill_at(results, "reply", bulk=True, at=_REPLY_AT)


class Lane(level0.Client):
    """The message lane to another node's drvmmd: Node's data-only calls at
    Cap'n Proto RPC level 0 (~30 µs less per round trip than pycapnp)."""

    def __init__(self, node: str, address: tuple[str, int], on_lost=None):
        super().__init__(schema.Node, on_lost=on_lost and (lambda: on_lost(self)))
        self.node, self.address = node, address

    @staticmethod
    def _params(target: str, msg: Msg, timeout_ms: int):
        def fill(p):
            p.target, p.timeoutMs = target, timeout_ms
            # (see Msg.fill: what goes beside bulk data stays small)
            return msg.fill_at(p, "msg", bulk=len(target.encode()) < 2048, at=_MSG_AT)
        return fill

    def sendrec(self, target: str, msg: Msg, timeout_ms: int, done) -> int:
        """Send msg; done(reply Msg or None, RpcError or None) on the loop."""
        return self.call("sendrec", self._params(target, msg, timeout_ms),
                         lambda r, e: done(None if r is None else self._reply(r), e))

    async def request(self, target: str, msg: Msg, timeout_ms: int, limit: float | None = None) -> Msg:
        """trio: sendrec; level0.RpcError if the call failed, or had no
        reply within limit seconds (kind "timeout")."""
        return await level0.call(self, "sendrec", self._params(target, msg, timeout_ms), limit, self._reply)

    def _reply(self, results) -> Msg:
        """The reply of a sendrec's results, as they come: a large payload
        sent out of line is a view of its message (no copy)."""
        return _msg_as_it_came(self.frame, results._get("reply"), _REPLY_PAYLOAD)


class Fabric:
    def __init__(self, etcd, member, port: int, tls: "Tls"):
        self.etcd, self.member, self.port, self.tls = etcd, member, port, tls
        self.name = member.name
        self.handlers: dict[str, object] = {}
        self.peers: dict[str, Peer] = {}  # full RPC, made when a program is run on a node
        self.peer_locks: dict[str, trio.Lock] = {}  # one connection made at a time per node
        self.lanes: dict[str, Lane] = {}  # the message lane to each node called
        self.connecting: dict[str, tuple[trio.Event, list]] = {}  # lanes being connected: (done, [error])
        self.locations: dict[str, tuple[float, Location]] = {}  # endpoint -> (when resolved, where)
        # While etcd does not answer (see resolve): since and until when
        # (time.monotonic) it is not asked where known endpoints are, and why.
        self.etcd_away_since = self.etcd_away_until = 0.0
        self.etcd_away: EtcdUnavailable | None = None
        self.node_addresses: dict[str, tuple[str, int]] = {}  # node -> (address, port), as last resolved
        self.fast: dict[str, object] = {}  # endpoint -> its fast path (see register)
        self.elected: set[str] = set()  # endpoints served while this node leads their election (see reregister)
        self.servers = []
        self.revoked = tls.revoked  # certificates of removed nodes (kept up to date by the daemon)
        self.accepted: dict[str, set] = {}  # serial -> connections accepted with it, to cut when revoked
        self.nursery: trio.Nursery | None = None  # where programs started here live
        self.supervise = None  # (cfg, vm, listener): who serves the system calls of programs started here
        self.spawner = None    # drvs.node.spawner.Spawner: where their jails are started

    # -- serving -----------------------------------------------------------

    async def listen(self, host: str, unix_path: str | None) -> None:
        """Serve nodes over TCP (TLS when configured) and local clients on a
        unix socket in a root-only directory."""
        guest = current_guest()

        async def remote(stream):
            await _serve_connection(stream, NodeServer(self, guest, local=False, peer=wire.PEER.get() or "?"))

        async def local(stream):
            await _serve_connection(stream, NodeServer(self, guest, local=True))

        def lane(transport):
            return NodeLane(self, guest, peer_name(transport.get_extra_info("peercert"))).protocol()

        ctx = self.tls.server_context()
        listener = live_socket()  # accepted connections inherit its keepalive settings
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind(listener, host, self.port)
        self.servers.append(await aio(wire.serve(
            remote, sock=listener, ssl=ctx, peer_of=lambda t: peer_name(t.get_extra_info("peercert")),
            alpn={LANE_ALPN: lane}, admit=self._admits)))
        if unix_path:
            os.makedirs(os.path.dirname(unix_path), mode=0o700, exist_ok=True)
            os.chmod(os.path.dirname(unix_path), 0o700)
            if os.path.exists(unix_path):
                os.unlink(unix_path)
            self.servers.append(await aio(wire.serve(local, path=unix_path)))
            os.chmod(unix_path, 0o600)

    def _admits(self, transport) -> bool:
        """Whether to serve a node's connection: not if `drvs node rm` took
        back the certificate it presented (TLS checked it is the CA's)."""
        cert = transport.get_extra_info("peercert")
        if self.revoked.admits(cert):
            serial = Revoked.serial(cert)
            live = {t for t in self.accepted.get(serial, ()) if not t.is_closing()}
            self.accepted[serial] = live | {transport}
            return True
        log.warning("refused a connection from %s as node %s: its certificate was revoked (drvs node rm)",
                    (transport.get_extra_info("peername") or ("?",))[0], peer_name(cert))
        return False

    def cut_revoked(self) -> None:
        """End the connections made with a certificate revoked since."""
        for serial in [s for s in self.accepted if s in self.revoked.serials]:
            for transport in self.accepted.pop(serial):
                if not transport.is_closing():
                    log.warning("cut a connection from %s: its certificate was revoked (drvs node rm)",
                                (transport.get_extra_info("peername") or ("?",))[0])
                    transport.abort()

    async def listen_bootstrap(self, host: str, server) -> None:
        """The join service: TLS with this node's certificate, no client
        certificate asked (newcomers have none)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls.cert, self.tls.key)
        ctx.verify_mode = ssl.CERT_NONE

        async def serve(stream):
            await _serve_connection(stream, server)

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind(listener, host, self.port + 1)
        self.servers.append(await aio(wire.serve(serve, sock=listener, ssl=ctx)))

    def close(self) -> None:
        for s in self.servers:
            s.close()
        self.servers.clear()

    async def register(self, name: str, handler, fast=None, elected: bool = False) -> None:
        """Serve endpoint `name` here and tell the cluster where it is.
        fast: an optional plain function Msg -> Msg | None for the messages
        that can be answered at once without waiting on anything; it runs
        on the asyncio side, as capnp delivers the call (no trio hop, ~130
        µs less per call here); None hands the message on to `handler`; a
        Later, work done whose reply must wait: a trio task awaits it."""
        check_name(name)
        self.handlers[name] = handler
        if fast is not None:
            self.fast[name] = fast
        if elected:
            self.elected.add(name)
        await self.etcd.put(REGISTRY + name, json.dumps(
            {"node": self.name, "address": self.member.address, "port": self.port}), lease=self.member.lease)

    async def register_steadily(self, name: str, handler, fast=None) -> None:
        """register(), riding out an etcd outage: for a node's own endpoints
        as it starts, when others already see it Ready (it must not die of
        an outage it could wait out)."""
        said = False
        while True:
            try:
                return await self.register(name, handler, fast)
            except EtcdUnavailable as e:
                if not said:
                    log.warning("endpoint %s: %s; registering it when etcd is back", name, e)
                    said = True
                await trio.sleep(1)

    async def unregister(self, name: str) -> None:
        """Stop serving name here; its registry entry goes if it still names
        this node (another node may have taken the endpoint over meanwhile:
        its entry stays)."""
        self.fast.pop(name, None)
        self.elected.discard(name)
        if self.handlers.pop(name, None) is None:
            return
        entry = await self.etcd.get(REGISTRY + name)
        if entry is not None and json.loads(entry.value).get("node") == self.name:
            try:
                await self.etcd.delete(REGISTRY + name, expect_revision=entry.mod_revision)
            except CompareFailed:
                pass  # (registered again meanwhile, by whoever serves it now)

    async def reregister(self) -> None:
        """After the node's lease was renewed under a new id: the node's own
        endpoints again.  Elected ones (self.elected) are not: their
        leadership went with the old lease, and their campaigns stand down
        and run again (drvs/dvos/elected.py)."""
        own = [(name, handler) for name, handler in self.handlers.items() if name not in self.elected]
        for name, handler in own:  # (chosen before any wait: a campaign standing down meanwhile unregisters)
            if self.handlers.get(name) is handler:
                await self.register(name, handler, self.fast.get(name))

    # -- calling -------------------------------------------------------------

    async def resolve(self, name: str, fresh: bool = False) -> Location:
        """Where endpoint name is served.  Answers are kept RESOLVE_TTL: an
        endpoint that moved meanwhile is found again at once, because the
        node it left answers EREMCHG and sendrec then asks etcd afresh.
        While etcd does not answer, the last answer serves (or, for an
        endpoint of a node, SERVICE@NODE, where that node was last seen)."""
        now = time.monotonic()  # (not trio's clock: the asyncio side reads this cache too)
        cached = self.locations.get(name)
        if cached is not None and not fresh and now - cached[0] < RESOLVE_TTL:
            return cached[1]
        known = None if fresh else cached[1] if cached is not None else self._node_endpoint(name)
        if known is not None and self._etcd_away(now):
            return known
        entry = await self._registry_entry(name, None if known is None else RESOLVE_WAIT)
        if entry is _AWAY:
            if known is None:
                raise self.etcd_away
            return known
        if entry is None:
            self.locations.pop(name, None)
            raise IpcError(f"no endpoint {name!r} (not registered, or its node is gone)", errno.ENOENT)
        loc = json.loads(entry.value)
        loc = Location(loc["node"], loc["address"], loc["port"])
        self.locations[name] = (now, loc)
        self.node_addresses[loc.node] = (loc.address, loc.port)
        return loc

    async def sendrec_last_seen(self, target: str, msg: Msg, timeout: float) -> Msg:
        """sendrec to SERVICE@NODE at NODE's address as last seen here,
        even if etcd no longer lists the endpoint (its node's lease ended:
        the node may be alive, cut off from etcd); IpcError if NODE was
        never seen."""
        loc = self._node_endpoint(target)
        if loc is None:
            raise IpcError(f"{target}: its node was never seen here", errno.EHOSTUNREACH)
        if loc.node == self.name:
            return await self.deliver(target, msg, timeout)
        return await self._remote(loc, target, msg, timeout, trio.current_time() + timeout)

    def _node_endpoint(self, name: str) -> "Location | None":
        """Where SERVICE@NODE would be, NODE being a node seen serving
        something (None if none was)."""
        node = name.partition("@")[2]
        address = self.node_addresses.get(node)
        return Location(node, *address) if address is not None else None

    def _etcd_away(self, now: float) -> bool:
        """Whether etcd failed to answer lately, and the node's membership
        has not heard from it since (its keep-alives, every second)."""
        return now < self.etcd_away_until and getattr(self.member, "answered", 0.0) <= self.etcd_away_since

    async def _registry_entry(self, name: str, wait: "float | None"):
        """name's registry entry (None: none), or _AWAY when etcd did not
        answer (within wait seconds, if given): etcd is then taken as away
        (self.etcd_away says how) for ETCD_RECHECK, or until the node's
        membership hears from it."""
        try:
            with trio.move_on_after(math.inf if wait is None else wait):
                return await self.etcd.get(REGISTRY + check_name(name))
            self.etcd_away = EtcdUnavailable(f"etcd gave no answer within {wait:g} s")
        except EtcdUnavailable as e:
            self.etcd_away = e
        self.etcd_away_since = now = time.monotonic()
        self.etcd_away_until = now + ETCD_RECHECK
        return _AWAY

    def source_ok(self, msg: Msg) -> bool | None:
        """Whether msg's claimed source endpoint is served by the node it
        came from: True, False, or None when that is not known here now."""
        if not msg.node or not msg.source or msg.node == self.name:
            return True
        cached = self.locations.get(msg.source)
        if cached is None or time.monotonic() - cached[0] >= RESOLVE_TTL:
            return None
        return cached[1].node == msg.node

    async def sendrec(self, target: str, msg: Msg, timeout: float | None = None, idempotent: bool = False,
                      sent_to: list | None = None) -> Msg:
        """Send msg to target and wait for the reply, at most `timeout` seconds.
        An idempotent call is retried once, re-resolved, if its node vanished.
        sent_to, if given, has each node msg went to appended as it goes."""
        timeout = timeout or DEFAULT_TIMEOUT
        deadline = trio.current_time() + timeout
        moved = False
        if target in self.handlers:  # served here: nothing to look up
            if sent_to is not None:
                sent_to.append(self.name)
            reply = await self.deliver(target, msg, timeout)
            if reply.status != -errno.EREMCHG:
                return reply
            moved = True  # (no longer: its server's term is over)
        for attempt in (1, 2):
            loc = await self.resolve(target, fresh=moved or attempt == 2)
            if sent_to is not None:
                sent_to.append(loc.node)
            if loc.node == self.name and target in self.handlers:
                return await self.deliver(target, msg, timeout)
            try:
                if loc.node == self.name:  # (registered here, not yet known here)
                    reply = await self.deliver(target, msg, max(deadline - trio.current_time(), 0.001))
                else:
                    reply = await self._remote(loc, target, msg, timeout, deadline)
                if reply.status == -errno.EREMCHG and attempt == 1:
                    continue  # it moved (the node did not take the message): ask etcd, send again
                return reply
            except IpcError as e:
                if e.errno == errno.ETIMEDOUT:
                    raise
                self.locations.pop(target, None)
                if e.errno != errno.ECONNRESET or not idempotent or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _remote(self, loc: Location, target: str, msg: Msg, timeout: float, deadline: float) -> Msg:
        """msg sent over loc's lane; no reply by `deadline` (trio's clock;
        the caller's `timeout`) fails it with ETIMEDOUT.  The call is then
        given up (Finish) but the connection stays, as other calls are on
        it: a slow endpoint is not a dead node (a dead or cut-off one fails
        it within seconds: live_socket)."""
        lane = self.lanes.get(loc.node)
        try:
            if lane is None or lane.closed or lane.address != (loc.address, loc.port):
                with trio.fail_at(deadline):
                    lane = await self.lane(loc)
            left = max(deadline - trio.current_time(), 0.001)
            return await lane.request(target, msg, min(int(timeout * 1000), 0xFFFFFFFF), left)
        except trio.TooSlowError:
            raise IpcError(f"{target}: no connection to node {loc.node} within {timeout:g} s",
                           errno.ETIMEDOUT) from None
        except level0.RpcError as e:
            if e.kind == "timeout":
                raise IpcError(f"{target}: no reply from node {loc.node} within {timeout:g} s",
                               errno.ETIMEDOUT) from None
            if e.kind == "disconnected":
                self.drop_lane(loc.node, lane)
                raise IpcError(f"{target}: connection to node {loc.node} lost", errno.ECONNRESET) from None
            raise IpcError(f"{target}: {e.reason}", errno.EIO) from None

    async def lane(self, loc: Location) -> Lane:
        """The message lane to loc's node, connected if need be."""
        lane = self.lanes.get(loc.node)
        if lane is not None and not lane.closed and lane.address == (loc.address, loc.port):
            return lane
        pending = self.connecting.get(loc.node)
        if pending is not None:  # another task is connecting: one connection per node
            done, failed = pending
            await done.wait()
            if failed:
                raise failed[0]
            return await self.lane(loc)
        self.drop_lane(loc.node)  # none yet, or the node moved to another address
        self.connecting[loc.node] = pending = (trio.Event(), [])
        try:
            lane = await open_lane(loc, self.tls, on_lost=self._lane_lost)
        except IpcError as e:
            pending[1].append(e)  # its waiters fail alike rather than try again in turn
            raise
        finally:
            del self.connecting[loc.node]
            pending[0].set()
        self.lanes[loc.node] = lane
        return lane

    def _lane_lost(self, lane: Lane) -> None:
        if self.lanes.get(lane.node) is lane:
            del self.lanes[lane.node]

    def drop_lane(self, node: str, lane: Lane | None = None) -> None:
        """Close node's lane (that one, if given): its next call connects anew."""
        current = self.lanes.get(node)
        if current is not None and (lane is None or current is lane):
            del self.lanes[node]
            current.close()

    async def peer(self, loc: Location) -> Peer:
        peer = self.peers.get(loc.node)
        if peer is not None and peer.serves(loc):
            return peer
        # (Two programs started at once on a node could both find no
        # connection: the second made replaced the first in self.peers, and
        # the first, no more referenced, could be collected with the first
        # program's Process on it.)
        async with self.peer_locks.setdefault(loc.node, trio.Lock()):
            peer = self.peers.get(loc.node)
            if peer is not None and peer.serves(loc):
                return peer
            return await self._connect_peer(loc)

    async def _connect_peer(self, loc: Location) -> Peer:
        self.peers.pop(loc.node, None)  # none yet, or the node moved to another address
        sock = live_socket()
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await aio(asyncio.get_running_loop().sock_connect(sock, (loc.address, loc.port)))
                wires = []
                stream = await aio(wire.connect(sock=sock, ssl=self.tls.client_context(), server_hostname=loc.node,
                                                wires=wires))
        except (OSError, trio.TooSlowError) as e:
            sock.close()
            raise IpcError(f"node {loc.node} at {loc.address}:{loc.port} unreachable: {e}", errno.ECONNRESET) from None
        _check_server(self.tls, wires[0].transport, loc)
        client = capnp.TwoPartyClient(stream)
        peer = Peer(client, client.bootstrap().cast_as(schema.Node), (loc.address, loc.port), wires[0])
        self.peers[loc.node] = peer
        return peer

    # -- programs ------------------------------------------------------------

    async def start_run(self, rr) -> None:
        """Start a RemoteRun in the fabric's nursery; returns once it started
        (or failed to: the failure is its exit status).  Whatever goes wrong
        with one program is logged, never the daemon's end."""

        async def guarded(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await rr.serve(task_status=task_status)
            except Exception:  # noqa: BLE001
                log.exception("program %s failed in its server", rr.req.get("argv", [])[:1])
                rr.caller_gone()
                rr.done.set()

        await self.nursery.start(guarded)

    async def forward_run(self, req: dict, stdout, stderr):
        loc = await self.node_location(req["node"])
        peer = await self.peer(loc)
        call = peer.node.run_request()
        r = call.init("request")
        for key, value in req.items():
            if key in ("argv", "env", "groups", "caps"):
                items = r.init(key, len(value))
                for i, v in enumerate(value):
                    items[i] = v
            else:
                setattr(r, key, value)
        call.stdout, call.stderr = stdout, stderr
        try:
            with trio.fail_after(DEFAULT_TIMEOUT):
                result = await capnp_await(call.send())
        except trio.TooSlowError:
            raise IpcError(f"node {loc.node}: no answer within {DEFAULT_TIMEOUT:g} s", errno.ETIMEDOUT) from None
        except capnp.KjException as e:
            self.peers.pop(loc.node, None)
            raise IpcError(f"node {loc.node}: {kj_reason(e)}", errno.ECONNRESET) from None
        return result.process

    async def node_location(self, node: str) -> Location:
        from ..cluster.membership import spec_key, status_key

        if await self.etcd.get(status_key(node)) is None:
            known = await self.etcd.get(spec_key(node))
            raise IpcError(f"node {node!r} is {'NotReady' if known else 'not in the cluster'}", errno.EHOSTUNREACH)
        spec = json.loads((await self.etcd.get(spec_key(node))).value)
        return Location(node, spec["address"], spec.get("port", FABRIC_PORT))

    def answer_now(self, target: str, msg: Msg) -> "Msg | Later | None":
        """What target's fast path makes of msg, when it is served here and
        msg's source is known to be its node's: the reply (no trio hop), a
        Later (finish() it in trio), or None (deliver() it)."""
        fast = self.fast.get(target)
        if fast is None or msg.type == NOTIFY or self.source_ok(msg) is not True:
            return None  # (a notify: deliver() acknowledges it, whatever the server's fast path)
        return run_fast(fast, target, msg)

    async def deliver(self, target: str, msg: Msg, timeout: float | None = None) -> Msg:
        """Hand msg to the local server of target, for at most timeout
        seconds (the caller's bound); its failures become replies."""
        if msg.node and msg.source and msg.node != self.name:
            ok = self.source_ok(msg)
            if ok is not True and self._etcd_away(time.monotonic()):
                # (etcd away: only what etcd said last; never a guess)
                cached = self.locations.get(msg.source)
                ok = cached is not None and cached[1].node == msg.node
            elif ok is not True:  # unknown, or maybe moved since: ask etcd
                try:
                    ok = (await self.resolve(msg.source, fresh=True)).node == msg.node
                except (IpcError, EtcdUnavailable):
                    ok = False
            if not ok:
                return failure(errno.EPERM, f"{target}: node {msg.node} may not speak for {msg.source!r}")
        handler = self.handlers.get(target)
        if msg.type == NOTIFY and handler is not None:
            # MINIX's notify: every endpoint takes one.  No server here acts
            # on it, so the fabric acknowledges it for them (what `drvs ipc
            # ping` sends to a server whose table it does not know).
            return Msg(0, source=target)
        fast = self.fast.get(target)
        if fast is not None:
            reply = run_fast(fast, target, msg)
            if isinstance(reply, Later):
                return await self.finish(target, reply, timeout)
            if reply is not None:
                return reply
        if handler is None:
            # EREMCHG, not ENOENT: the sender's idea of where target is was
            # stale, and the message was not taken (sendrec re-resolves).
            return failure(errno.EREMCHG, f"no endpoint {target!r} on node {self.name}")
        return await self._bounded(target, handler, msg, timeout)

    async def finish(self, target: str, later: Later, timeout: float | None = None) -> Msg:
        """The reply of a message its endpoint's fast path began (Later)."""
        return await self._bounded(target, lambda _: later.finish(), None, timeout)

    async def _bounded(self, target: str, afn, msg: Msg | None, timeout: float | None) -> Msg:
        """afn(msg)'s reply, within the caller's bound; failures are replies."""
        try:
            with trio.move_on_after(timeout or DEFAULT_TIMEOUT * 12):
                return await afn(msg)
            return failure(errno.ETIMEDOUT, f"{target}: no reply within {timeout or DEFAULT_TIMEOUT * 12:g} s")
        except IpcError as e:
            return failure(e.errno, str(e))
        except EtcdUnavailable as e:
            return failure(ETCD_AWAY, f"{target}: {e}")
        except Exception as e:  # noqa: BLE001 - a server bug must not take the daemon down
            log.exception("endpoint %s failed on message type %s", target, msg.type if msg else "(later)")
            return failure(errno.EIO, f"{target}: server error: {type(e).__name__}: {e}")


async def open_lane(loc: Location, tls: "Tls", on_lost=None) -> Lane:
    """trio: a message lane to loc's node (TLS, ALPN LANE_ALPN).
    on_lost(lane) is called when the connection ends."""
    sock = live_socket()
    loop = asyncio.get_running_loop()
    made = None
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            await aio(loop.sock_connect(sock, (loc.address, loc.port)))
            made = asyncio.ensure_future(loop.create_connection(
                lambda: Lane(loc.node, (loc.address, loc.port), on_lost),
                sock=sock, ssl=tls.client_context(alpn=LANE_ALPN), server_hostname=loc.node))
            transport, lane = await aio_future(made)
    except BaseException as e:
        sock.close()
        if made is not None:  # made after all, as we gave up: closed
            made.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result()[0].close())
        if isinstance(e, (OSError, trio.TooSlowError)):
            raise IpcError(f"node {loc.node} at {loc.address}:{loc.port} unreachable: {e}",
                           errno.ECONNRESET) from None
        raise
    _check_server(tls, transport, loc)
    if transport.get_extra_info("ssl_object").selected_alpn_protocol() != LANE_ALPN:
        transport.close()
        raise IpcError(f"node {loc.node} does not serve the fabric's message lane (an older drvmmd?)", errno.EPROTO)
    return lane


def _check_server(tls: "Tls", transport, loc: Location) -> None:
    """A node's certificate, checked by TLS, must not be one `drvs node rm`
    took back (whoever kept its key could pose as the node that joined
    again under its name)."""
    if not tls.revoked.admits(transport.get_extra_info("peercert")):
        transport.abort()
        raise IpcError(f"node {loc.node} at {loc.address}:{loc.port} presented a revoked certificate",
                       errno.EPERM)


def peer_name(cert: dict | None) -> str:
    """The node a certificate of the cluster CA names (its DNS name)."""
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "DNS":
            return value
    return "?"


def run_fast(fast, target: str, msg: Msg) -> "Msg | Later | None":
    """An endpoint's fast path, with deliver()'s guarantees: failures are
    replies, a server bug is logged, never the daemon's end."""
    try:
        return fast(msg)
    except IpcError as e:
        return failure(e.errno, str(e))
    except Exception as e:  # noqa: BLE001
        log.exception("endpoint %s failed on message type %d", target, msg.type)
        return failure(errno.EIO, f"{target}: server error: {type(e).__name__}: {e}")


async def _serve_connection(stream, bootstrap) -> None:
    try:
        await capnp.TwoPartyServer(stream, bootstrap=bootstrap).on_disconnect()
    except Exception as e:  # noqa: BLE001 - a broken peer ends its connection only
        log.info("connection closed: %s", e)


class NodeServer(schema.Node.Server):
    """The Node interface of drvmmd (asyncio side; the work runs in trio).
    local: a client on this node's unix socket; else `peer` is the node at
    the other end, as its certificate says: messages from it carry it in
    Msg.node, and one claiming a source endpoint of another node is refused."""

    def __init__(self, fabric: Fabric, guest, local: bool, peer: str = ""):
        self.fabric, self.guest, self.local, self.peer = fabric, guest, local, peer

    def _incoming(self, msg) -> Msg:
        m = Msg.from_capnp(msg)
        m.node = "" if self.local else self.peer
        return m

    async def info(self, _context, **kwargs):
        fill_info(self.fabric, _context.results.init("info"))

    async def sendrec_context(self, _context):
        # (the _context form: pycapnp then skips its per-call wrapper that
        # builds a dict of the parameters and fills results from a return)
        params = _context.params
        target, m, timeoutMs = params.target, self._incoming(params.msg), params.timeoutMs
        reply = self.fabric.answer_now(target, m)
        timeout = timeoutMs / 1000 if timeoutMs else None
        if isinstance(reply, Later):
            reply = await self.guest.call_trio(self.fabric.finish, target, reply, timeout)
        if reply is not None:
            reply.fill(_context.results.init("reply"))
            return
        if self.local:  # a local client: route anywhere in the cluster
            reply = await self.guest.call_trio(self._route, target, m, timeout)
        else:           # another node: only what is served here, within its caller's bound
            reply = await self.guest.call_trio(self.fabric.deliver, target, m, timeout)
        reply.fill(_context.results.init("reply"))

    async def _route(self, target, m, timeout):
        try:
            return await self.fabric.sendrec(target, m, timeout)
        except IpcError as e:
            return failure(e.errno, str(e))
        except EtcdUnavailable as e:  # (resolving target; the client says exit 6)
            return failure(ETCD_AWAY, str(e))

    async def notify(self, target, source, _context, **kwargs):
        m = Msg(NOTIFY, source=source)
        m.node = "" if self.local else self.peer
        if self.local:
            await self.guest.call_trio(self._route, target, m, None)
        else:
            await self.guest.call_trio(self.fabric.deliver, target, m)

    async def send(self, target, msg, _context, **kwargs):
        m = self._incoming(msg)
        if self.local:
            await self.guest.call_trio(self._route, target, m, None)
        else:
            await self.guest.call_trio(self.fabric.deliver, target, m)

    async def echo(self, data, _context, **kwargs):
        return data

    async def run(self, request, stdout, stderr, _context, **kwargs):
        from ..node.runner import RemoteRun, request_dict

        req = request_dict(request)
        fabric = self.fabric
        if self.local and req["node"] and req["node"] != fabric.name:
            # Hand the call on: the caller's streams travel with it, and the
            # other node's Process comes back (capnp proxies both through us).
            try:
                _context.results.process = await self.guest.call_trio(fabric.forward_run, req, stdout, stderr)
            except DrvsError as e:  # (IpcError; EtcdUnavailable while finding the node)
                _context.results.process = FailedProcess(e.exit_code, str(e))
            return
        rr = RemoteRun(req, stdout, stderr, fabric.etcd, supervise=fabric.supervise,
                       spawner=fabric.spawner)
        await self.guest.call_trio(fabric.start_run, rr)
        _context.results.process = ProcessServer(rr, self.guest)


class NodeLane:
    """Node's data-only methods for one peer node, served at Cap'n Proto
    RPC level 0 (the message lane, see LANE_ALPN).  What an endpoint's fast
    path answers is answered as the call arrives; the rest runs as a trio
    task, cancelled if the caller gives up."""

    def __init__(self, fabric: Fabric, guest, peer: str):
        self.fabric, self.guest, self.peer = fabric, guest, peer

    def protocol(self) -> level0.Server:
        return level0.Server(schema.Node, {"sendrec": self.sendrec, "send": self.send, "notify": self.notify,
                                           "echo": self.echo, "info": self.info})

    def _incoming(self, answer: level0.Answer, msg, method: str) -> Msg:
        """The message of a call, as it comes (see _msg_as_it_came)."""
        m = _msg_as_it_came(answer.conn.frame, msg, _MSG_PAYLOAD[method])
        m.node = self.peer
        return m

    def sendrec(self, answer: level0.Answer, params) -> None:
        get = params._get
        target, m, timeout_ms = get("target"), self._incoming(answer, get("msg"), "sendrec"), get("timeoutMs")
        reply = self.fabric.answer_now(target, m)
        timeout = timeout_ms / 1000 if timeout_ms else None
        fill = _fill_reply
        if isinstance(reply, Later):
            return self._in_trio(answer, fill, self.fabric.finish, target, reply, timeout)
        if reply is not None:
            return answer.reply(lambda r: fill(r, reply))
        self._in_trio(answer, fill, self.fabric.deliver, target, m, timeout)

    def send(self, answer: level0.Answer, params) -> None:
        get = params._get
        self._in_trio(answer, None, self.fabric.deliver, get("target"), self._incoming(answer, get("msg"), "send"))

    def notify(self, answer: level0.Answer, params) -> None:
        m = Msg(NOTIFY, source=params.source)
        m.node = self.peer
        self._in_trio(answer, None, self.fabric.deliver, params.target, m)

    def echo(self, answer: level0.Answer, params) -> None:
        data = bytes(params.data)
        answer.reply(lambda r: setattr(r, "data", data))

    def info(self, answer: level0.Answer, params) -> None:
        answer.reply(lambda r: fill_info(self.fabric, r.init("info")))

    def _in_trio(self, answer: level0.Answer, fill, afn, *args) -> None:
        scope = trio.CancelScope()
        answer.on_cancel = scope.cancel

        async def serve():
            with scope:
                try:
                    result = await afn(*args)
                except Exception as e:  # noqa: BLE001 - deliver() makes failures replies; this is a bug
                    log.exception("message lane: %s", getattr(afn, "__name__", afn))
                    return answer.fail(f"server error: {type(e).__name__}: {e}")
            if not scope.cancelled_caught:
                answer.reply(None if fill is None else lambda r: fill(r, result))  # (never raises)

        try:
            if self.guest.done.done():
                raise RuntimeError("trio's run has ended")
            self.guest.nursery.start_soon(serve)
        except RuntimeError:  # (the daemon is stopping: its nursery takes no more, or trio is gone)
            # Not delivered: the caller may send it elsewhere (a server error
            # here failed a write with EIO in the middle of a clean hand-over).
            why = f"node {self.fabric.name} is stopping: not served here"
            if fill is None:
                answer.fail(why, "disconnected")
            else:
                stopping = failure(errno.EREMCHG, why)
                answer.reply(lambda r: fill(r, stopping))


def fill_info(f: Fabric, info) -> None:
    info.name, info.address = f.name, f.member.address
    info.version = __import__("drvs").__version__
    info.cluster = getattr(f.member, "cluster", "")
    eps = info.init("endpoints", len(f.handlers))
    for i, name in enumerate(sorted(f.handlers)):
        eps[i] = name


class ProcessServer(schema.Process.Server):
    def __init__(self, rr, guest):
        self.rr, self.guest = rr, guest

    async def stdin(self, _context, **kwargs):
        _context.results.stream = StdinServer(self.rr, self.guest)

    async def signal(self, signal, **kwargs):
        self.rr.signal(signal)

    async def wait(self, _context, **kwargs):
        try:
            await self.guest.call_trio(self.rr.done.wait)
        except asyncio.CancelledError:
            # capnp cancels a call whose connection went: the caller (drvs-run,
            # or the node it came through) is gone, and a quiet program would
            # otherwise never notice (its output is how a loud one does)
            self.rr.caller_gone()
            raise
        _context.results.exitCode = self.rr.exit_code
        _context.results.message = self.rr.message

    async def resize(self, rows, cols, **kwargs):
        self.rr.resize(rows, cols)


class FailedProcess(schema.Process.Server):
    """A program that could not be started anywhere: wait() says why."""

    def __init__(self, code: int, message: str):
        self.code, self.message = code, message

    async def stdin(self, _context, **kwargs):
        _context.results.stream = NullStream()

    async def signal(self, signal, **kwargs):
        pass

    async def wait(self, _context, **kwargs):
        _context.results.exitCode, _context.results.message = self.code, self.message

    async def resize(self, rows, cols, **kwargs):
        pass


class NullStream(schema.ByteStream.Server):
    async def write(self, data, **kwargs):
        pass

    async def done(self, **kwargs):
        pass


class StdinServer(schema.ByteStream.Server):
    def __init__(self, rr, guest):
        self.rr, self.guest = rr, guest

    async def write(self, data, **kwargs):
        await self.guest.call_trio(self.rr.write_stdin, bytes(data))

    async def done(self, **kwargs):
        await self.guest.call_trio(self.rr.close_stdin)


class _DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose read, write and pending are the TLS connection's
    own (C) methods: uvloop's TLS calls them once per record or so, and
    ssl.SSLObject's wrappers cost a Python frame each (a cold 1 MiB read
    from another node is 64 records).  A loopback TLS echo on uvloop, 16
    calls in flight, CPU of both ends per call: 32 B 14.2-14.5 -> 13.8-13.9
    µs, 64 KiB 122-123 -> 120-121 µs."""

    @classmethod
    def _create(cls, *args, **kwargs):
        self = super()._create(*args, **kwargs)
        conn = self._sslobj
        self.read, self.write, self.pending = conn.read, conn.write, conn.pending
        return self


class Tls:
    """Mutual TLS between nodes: every node presents a certificate signed by
    the cluster CA and accepts only peers that do."""

    def __init__(self, ca: str, cert: str, key: str):
        self.ca, self.cert, self.key = ca, cert, key
        self.revoked = Revoked()  # and refuses those of removed nodes (drvs/cluster/revocation.py)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols([LANE_ALPN])  # clients that ask for none get full RPC
        ctx.sslobject_class = _DirectSSLObject
        return ctx

    def client_context(self, alpn: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.check_hostname = True  # the peer's certificate names the node we meant
        if alpn:
            ctx.set_alpn_protocols([alpn])
        ctx.sslobject_class = _DirectSSLObject
        return ctx


__all__ = ["Fabric", "Tls", "Msg", "IpcError"]
