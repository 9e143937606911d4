"""The DRVMM's own services, endpoint "drvmm@NODE": liveness, and etcd's locks
and elections offered to DVOS servers through the fabric.

One message table, keyed by drvmm.capnp's DrvmmCall.  A lock or leadership
is held by the serving node's lease: when that node dies, it is released
within the lease's TTL."""

import errno
import json

import trio

from .message import IpcError, Msg
from .schema import drvmm

Call = drvmm.DrvmmCall
LOCKS = "/drvs/locks/"
ELECTIONS = "/drvs/elections/"


def request(msg: Msg):
    try:
        return drvmm.NameRequest.from_bytes_packed(msg.payload)
    except Exception:  # noqa: BLE001 - malformed input from the wire
        raise IpcError("malformed request", errno.EBADMSG) from None


def key_reply(key: str = "", value: str = "") -> Msg:
    return Msg(0, drvmm.KeyReply.new_message(key=key, value=value).to_bytes_packed())


class DrvmmService:
    def __init__(self, etcd, member):
        self.etcd, self.member = etcd, member
        self.table = {
            Call.ping: self.ping,
            Call.lock: self.lock,
            Call.unlock: self.unlock,
            Call.campaign: self.campaign,
            Call.resign: self.resign,
            Call.leader: self.leader,
        }

    async def handle(self, msg: Msg) -> Msg:
        handler = self.table.get(msg.type)
        if handler is None:
            raise IpcError(f"drvmm: unknown message type {msg.type}", errno.ENOSYS)
        return await handler(msg)

    async def ping(self, msg: Msg) -> Msg:
        return Msg(0, msg.payload, source=f"drvmm@{self.member.name}")

    async def _bounded(self, req, coro_fn):
        timeout = req.timeoutMs / 1000 if req.timeoutMs else float("inf")
        try:
            return await coro_fn(timeout)
        except trio.TooSlowError:
            raise IpcError(f"{req.name}: not obtained within {timeout:g} s", errno.ETIMEDOUT) from None

    async def lock(self, msg: Msg) -> Msg:
        req = request(msg)
        key = await self._bounded(req, lambda t: self.etcd.lock(LOCKS + req.name, self.member.lease, timeout=t))
        return key_reply(key, self.member.name)

    async def unlock(self, msg: Msg) -> Msg:
        await self.etcd.unlock(_key(msg))
        return key_reply()

    async def campaign(self, msg: Msg) -> Msg:
        req = request(msg)
        value = req.value or self.member.name
        leader = await self._bounded(req, lambda t: self.etcd.campaign(
            ELECTIONS + req.name, value, self.member.lease, timeout=t))
        return key_reply(json.dumps(leader), value)

    async def resign(self, msg: Msg) -> Msg:
        try:
            leader = json.loads(_key(msg))
        except ValueError:
            raise IpcError("malformed leadership key", errno.EBADMSG) from None
        await self.etcd.resign(leader)
        return key_reply()

    async def leader(self, msg: Msg) -> Msg:
        req = request(msg)
        return key_reply("", await self.etcd.leader(ELECTIONS + req.name) or "")


def _key(msg: Msg) -> str:
    try:
        return drvmm.KeyReply.from_bytes_packed(msg.payload).key
    except Exception:  # noqa: BLE001
        raise IpcError("malformed request", errno.EBADMSG) from None
