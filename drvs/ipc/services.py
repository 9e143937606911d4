"""The DRVMM's own services, endpoint "drvmm@NODE": liveness, and etcd's locks
and elections offered to DVOS servers through the fabric.

One message table, keyed by drvmm.capnp's DrvmmCall.  A lock or leadership
is held by the serving node's lease: when that node dies, it is released
within the lease's TTL."""

import base64
import binascii
import errno
import json
import re

import trio

from ..errors import DrvsError
from ..store import CompareFailed
from .message import IpcError, Msg, said_of
from .schema import drvmm

Call = drvmm.DrvmmCall
LOCKS = "/drvs/locks/"
ELECTIONS = "/drvs/elections/"
GROUPS = "/drvs/groups/"


def request(msg: Msg):
    try:
        return drvmm.NameRequest.from_bytes_packed(msg.payload)
    except Exception:  # noqa: BLE001 - malformed input from the wire
        raise IpcError("malformed request", errno.EBADMSG) from None


def name_problem(name: str, watch: bool = False) -> str | None:
    """Why name cannot name a lock, election or group (None: it can).  Names
    are etcd key suffixes with the holder's lease after a '/': a '/' in a
    name would put its keys among another name's ("a/b" under "a"), and
    one name would block the other.  watch: only to read its leader, which
    DRVS's own elections ("pm/VM", "fs/VM") may be too."""
    head, slash, rest = name.partition("/")
    if watch and slash and head in SYSTEM_ELECTIONS and name_problem(rest) is None:
        return None
    if not name:
        return "empty name"
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        return f"control character in name {name!r}"
    if "/" in name or name in (".", ".."):
        return f"bad name {name!r} (no '/' in it, not '.' or '..')"
    return None


def named(msg: Msg, watch: bool = False):
    """The request, its name checked (see name_problem)."""
    req = request(msg)
    problem = name_problem(req.name, watch)
    if problem:
        raise IpcError(problem, errno.EINVAL)
    return req


SYSTEM_ELECTIONS = ("pm", "fs")  # DRVS's own elected servers: ELECTIONS + "pm/VM", "fs/VM"


def system_election(name: str) -> str | None:
    """Why name may not be campaigned for or resigned by a user (None: it
    may): DRVS's own servers' elections; a campaign under the same node
    lease would be handed the server's own leadership, and a resign would
    end it (two servers then)."""
    if name.split("/", 1)[0] in SYSTEM_ELECTIONS:
        return f"election {name!r} is DRVS's own ({'/, '.join(SYSTEM_ELECTIONS)}/ are reserved)"
    return None


def _not_system(name: str) -> None:
    problem = system_election(name)
    if problem:
        raise IpcError(problem, errno.EINVAL)


def _under(key: str, prefix: str, what: str) -> str:
    """key, if it is one of prefix's (else EINVAL: the key of something else
    in etcd is not this call's to delete)."""
    if not key.startswith(prefix) or name_problem(key[len(prefix):].rsplit("/", 1)[0]):
        raise IpcError(f"{key!r} is not a {what} key (they begin with {prefix})", errno.EINVAL)
    return key


def key_reply(key: str = "", value: str = "") -> Msg:
    return Msg(0, drvmm.KeyReply.new_message(key=key, value=value).to_bytes_packed())


class DrvmmService:
    def __init__(self, etcd, member, fabric=None, cfg=None):
        self.etcd, self.member, self.fabric, self.cfg = etcd, member, fabric, cfg
        self.table = {
            Call.ping: self.ping,
            Call.lock: self.lock,
            Call.unlock: self.unlock,
            Call.campaign: self.campaign,
            Call.resign: self.resign,
            Call.leader: self.leader,
            Call.groupJoin: self.group_join,
            Call.groupLeave: self.group_leave,
            Call.members: self.members,
            Call.broadcast: self.broadcast,
            Call.detach: self.detach,
            Call.runLog: self.run_log,
            Call.runSignal: self.run_signal,
            Call.runList: self.run_list,
        }

    # What only this node's own servers and clients may ask: these act with
    # the node's lease, so another node (even a member) may not take,
    # release or resign them here.
    OWN_NODE_ONLY = {Call.lock, Call.unlock, Call.campaign, Call.resign, Call.groupJoin, Call.groupLeave}

    async def handle(self, msg: Msg) -> Msg:
        handler = self.table.get(msg.type)
        if handler is None:
            raise IpcError(f"drvmm: unknown message type {msg.type}", errno.ENOSYS)
        if msg.type in self.OWN_NODE_ONLY and msg.node not in ("", self.member.name):
            raise IpcError(f"drvmm@{self.member.name}: node {msg.node} may not use this node's lease "
                           "(ask its own drvmm)", errno.EPERM)
        return await handler(msg)

    def fast(self, msg: Msg) -> Msg | None:
        """The messages answered at once (Fabric.register's fast path)."""
        if msg.type == Call.ping:
            return Msg(0, msg.payload, source=f"drvmm@{self.member.name}")
        return None

    async def ping(self, msg: Msg) -> Msg:
        return self.fast(msg)

    async def _bounded(self, req, coro_fn):
        timeout = req.timeoutMs / 1000 if req.timeoutMs else float("inf")
        try:
            return await coro_fn(timeout)
        except trio.TooSlowError:
            raise IpcError(f"{req.name}: not obtained within {timeout:g} s", errno.ETIMEDOUT) from None

    async def lock(self, msg: Msg) -> Msg:
        req = named(msg)
        key = await self._bounded(req, lambda t: self.etcd.lock(LOCKS + req.name, self.member.lease, timeout=t))
        return key_reply(key, self.member.name)

    async def unlock(self, msg: Msg) -> Msg:
        key = _under(_key(msg), LOCKS, "lock")
        if await self.etcd.get(key) is None:
            raise IpcError(f"no lock is held under {key!r}", errno.ENOENT)
        self._own(key, "lock")
        await self.etcd.unlock(key)
        return key_reply()

    def _own(self, key: str, what: str) -> None:
        """key is held by this node's lease (etcd's lock and election keys
        end in the holder's lease, in hex): another node's is its own to
        release or resign."""
        if key.rsplit("/", 1)[-1] != f"{self.member.lease:x}":
            raise IpcError(f"{key!r}: the {what} is another node's (release it on that node)", errno.EPERM)

    async def campaign(self, msg: Msg) -> Msg:
        req = named(msg)
        _not_system(req.name)
        value = req.value or self.member.name
        leader = await self._bounded(req, lambda t: self.etcd.campaign(
            ELECTIONS + req.name, value, self.member.lease, timeout=t))
        return key_reply(json.dumps(leader, separators=(",", ":")), value)  # (one word: a shell passes it whole)

    async def resign(self, msg: Msg) -> Msg:
        try:
            leader = json.loads(_key(msg))
            key = base64.b64decode(leader["key"], validate=True).decode()
        except (ValueError, TypeError, KeyError, binascii.Error):
            raise IpcError("malformed leadership key (as election campaign printed it)", errno.EBADMSG) from None
        _under(key, ELECTIONS, "leadership")
        _not_system(key[len(ELECTIONS):])
        if await self.etcd.get(key) is None:
            raise IpcError("no such leadership (resigned, or its node's lease ended)", errno.ENOENT)
        self._own(key, "leadership")
        await self.etcd.resign(leader)
        return key_reply()

    async def leader(self, msg: Msg) -> Msg:
        req = named(msg, watch=True)
        return key_reply("", await self.etcd.leader(ELECTIONS + req.name) or "")


    # -- groups: membership held by the member's node lease, and broadcast --

    @staticmethod
    def _member_key(req) -> str:
        from .fabric import check_name

        if not req.name or "/" in req.name:
            raise IpcError(f"invalid group name {req.name!r}", errno.EINVAL)
        return f"{GROUPS}{req.name}/{check_name(req.value)}"

    async def group_join(self, msg: Msg) -> Msg:
        """A membership lasts as long as this node's lease: only an endpoint
        this node serves may join through it (another's would outlive its
        server, or end while it still runs)."""
        req = request(msg)
        key = self._member_key(req)
        if req.value not in self.fabric.handlers:
            raise IpcError(f"{req.value} is not served on node {self.member.name} (an endpoint joins a group "
                           "from its own node)", errno.ENOENT)
        await self.etcd.put(key, self.member.name, lease=self.member.lease)
        return key_reply()

    async def group_leave(self, msg: Msg) -> Msg:
        """Only a membership this node's lease holds: another node's ends
        with that node (or is left through it)."""
        req = request(msg)
        key = self._member_key(req)
        while True:  # (the membership as read is the one deleted: it may pass to another node meanwhile)
            entry = await self.etcd.get(key)
            if entry is None:
                raise IpcError(f"{req.value} is not a member of group {req.name!r}", errno.ENOENT)
            if entry.value != self.member.name:
                raise IpcError(f"{req.value} joined group {req.name!r} through node {entry.value} (it leaves "
                               "through that node)", errno.EPERM)
            try:
                await self.etcd.delete(key, expect_revision=entry.mod_revision)
                return key_reply()
            except CompareFailed:
                continue

    async def _members(self, group: str) -> list[str]:
        prefix = f"{GROUPS}{group}/"
        return [e.key[len(prefix):] for e in await self.etcd.range(prefix)]

    async def members(self, msg: Msg) -> Msg:
        names = await self._members(request(msg).name)
        reply = drvmm.Members.new_message()
        eps = reply.init("endpoints", len(names))
        for i, n in enumerate(names):
            eps[i] = n
        return Msg(0, reply.to_bytes_packed())

    async def broadcast(self, msg: Msg) -> Msg:
        try:
            req = drvmm.Broadcast.from_bytes_packed(msg.payload)
        except Exception:  # noqa: BLE001
            raise IpcError("malformed request", errno.EBADMSG) from None
        group, mtype, payload = req.group, req.type, bytes(req.payload)
        timeout = req.timeoutMs / 1000 if req.timeoutMs else None
        failed: list[str] = []
        delivered = 0

        async def one(endpoint):
            nonlocal delivered
            try:
                reply = await self.fabric.sendrec(endpoint, Msg(mtype, payload, source=msg.source), timeout)
                if reply.status < 0:
                    failed.append(said_of(endpoint, reply.error))
                else:
                    delivered += 1
            except DrvsError as e:  # IpcError, an etcd outage while resolving, ...
                failed.append(said_of(endpoint, str(e)))

        members = await self._members(group)  # (not in the nursery: etcd away is said as such)
        async with trio.open_nursery() as nursery:
            for endpoint in members:
                nursery.start_soon(one, endpoint)
        out = drvmm.Delivery.new_message(delivered=delivered)
        fl = out.init("failed", len(failed))
        for i, f in enumerate(sorted(failed)):
            fl[i] = f
        return Msg(0, out.to_bytes_packed())


    # -- runs of this node, for callers on other nodes (drvs-run -d, logs, wait, kill)

    async def detach(self, msg: Msg) -> Msg:
        """drvs-run -d here: drvs/node/detach.py, a process that becomes the
        run's monitor (this daemon's child, awaited in its nursery)."""
        import subprocess
        import sys

        from ..cli.run import started_id
        from ..node.runner import request_dict
        from .remote import DETACH_TIMEOUT
        from .schema import fabric

        try:
            req = request_dict(fabric.RunRequest.from_bytes_packed(msg.payload))
        except Exception:  # noqa: BLE001
            raise IpcError("malformed request", errno.EBADMSG) from None
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "drvs.node.detach"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True)
        said = b""
        try:
            with trio.move_on_after(DETACH_TIMEOUT) as bounded:
                async with proc.stdin:
                    await proc.stdin.send_all(json.dumps(req).encode())
                while chunk := await proc.stdout.receive_some():  # (to EOF: the start's outcome)
                    said += chunk
        finally:
            await proc.stdout.aclose()
            if bounded.cancelled_caught or not said:
                proc.kill()  # (hung, or the caller gone: no one would learn its id)
            self.fabric.nursery.start_soon(proc.wait)  # (the monitor lives on; reaped when it ends)
        if bounded.cancelled_caught:
            raise IpcError(f"the run did not start within {DETACH_TIMEOUT:g} s", errno.ETIMEDOUT)
        run_id, _, rest = said.partition(b" ")
        if not re.fullmatch(rb"[0-9a-f]{12}", run_id):
            run_id, rest = b"", said  # (it failed before it had a run: "err CODE WHY")
        out = drvmm.Detached.new_message()
        try:
            out.run = started_id(rest, run_id.decode())
        except DrvsError as e:
            out.exitCode, out.message = e.exit_code, str(e)
        return Msg(0, out.to_bytes_packed())

    async def run_log(self, msg: Msg) -> Msg:
        from ..node import runs

        q = _run_query(msg)
        size = min(q.maxBytes, runs.LOG_CHUNK)
        if q.offset >= 1 << 62:
            raise IpcError(f"offset {q.offset} is beyond any log", errno.EINVAL)
        got = await _as_ipc(runs.query_log(self.cfg, q.run, q.offset, size, min(q.waitMs, 10_000) / 1000))
        return Msg(0, drvmm.RunLog.new_message(**got).to_bytes_packed())

    async def run_signal(self, msg: Msg) -> Msg:
        from ..node import runs

        from ..ns.jail import END_RUN_SIGNAL

        q = _run_query(msg)
        if not 0 <= q.signal < END_RUN_SIGNAL:  # (that one is the keeper's own: KILL is the way to it)
            raise IpcError(f"no signal {q.signal} to pass on", errno.EINVAL)

        async def send():
            runs.check_id(q.run)
            runs.send_signal(self.cfg, q.run, q.signal)

        await _as_ipc(send())
        return Msg(0)


    async def run_list(self, msg: Msg) -> Msg:
        from ..node import runs

        try:
            f = drvmm.RunFilter.from_bytes_packed(msg.payload)
            vm, every = f.vm or None, f.every
        except Exception:  # noqa: BLE001
            raise IpcError("malformed request", errno.EBADMSG) from None
        found = await trio.to_thread.run_sync(runs.listing, self.cfg, vm, every)
        return Msg(0, drvmm.RunList.new_message(runs=found).to_bytes_packed())


def _run_query(msg: Msg):
    try:
        return drvmm.RunQuery.from_bytes_packed(msg.payload)
    except Exception:  # noqa: BLE001
        raise IpcError("malformed request", errno.EBADMSG) from None


async def _as_ipc(coro):
    """A run's errors as a message's: its errno travels, its words too."""
    from ..errors import NotFound, UsageError

    try:
        return await coro
    except NotFound as e:  # (ESRCH: the fabric's own ENOENT says an endpoint is not there)
        raise IpcError(str(e), errno.ESRCH) from None
    except UsageError as e:
        raise IpcError(str(e), errno.EINVAL) from None


def _key(msg: Msg) -> str:
    try:
        return drvmm.KeyReply.from_bytes_packed(msg.payload).key
    except Exception:  # noqa: BLE001
        raise IpcError("malformed request", errno.EBADMSG) from None
