"""The VM's process manager, endpoint "pm@VM": VM-wide process operations.

Every node with a share of a VM campaigns for its PM (drvs/dvos/elected.py);
the leader serves pm@VM.  The PM keeps no table of its own to lose: each node is the
authority for the processes in its pid range, so the VM's table is the
union of the nodes' (rebuilt on each request)."""

import errno
import logging
import time

import trio

from ...errors import DrvsError
from ...ipc.message import IpcError, Msg
from ...ipc.schema import pm
from .procs import decode, table_message

log = logging.getLogger("drvmmd")
Call = pm.PmCall
NODE_TIMEOUT = 2.0  # per node: a dead one costs the caller this much, once


NODES_TTL = 1.0  # seconds a VM's node list is trusted (shares change rarely; a new one shows within this)
_nodes_cache: dict[str, tuple[float, list[str]]] = {}


async def vm_nodes(etcd, vm: str, here: str) -> list[str]:
    """The nodes that may hold vm's processes: its shares, and this node."""
    from ...vm.registry import VmRegistry

    cached = fresh_nodes(vm)
    if cached is not None:
        return cached
    try:
        spec = await VmRegistry.get_async(etcd, vm)
    except DrvsError:
        spec = None
    nodes = sorted(set(spec.shares if spec else ()) | {here})
    _nodes_cache[vm] = (time.monotonic(), nodes)
    return nodes


def fresh_nodes(vm: str) -> list[str] | None:
    """vm's node list if known for less than NODES_TTL (usable outside trio)."""
    cached = _nodes_cache.get(vm)
    return cached[1] if cached is not None and time.monotonic() - cached[0] < NODES_TTL else None


async def _each_node(fabric, procs, nodes, mtype, payload: bytes, here, there, idempotent=True) -> list[str]:
    """Ask every node at once: this one by calling here(), the others'
    procs@NODE over the fabric, their replies to there(reply).  Returns the
    nodes that could not be asked, as "node: why"."""
    failed = []

    async def one(node):
        if node == procs.node:
            here()
            return
        try:
            # idempotent: a connection found broken is made again and the
            # message resent once (a signal then may come twice, as
            # ordinary signals may; none is lost to a restarted drvmmd).
            reply = await fabric.sendrec(f"procs@{node}", Msg(mtype, payload), timeout=NODE_TIMEOUT,
                                         idempotent=idempotent)
            if reply.status < 0:
                raise IpcError(reply.error, -reply.status)
        except DrvsError as e:  # IpcError, or etcd away while resolving
            failed.append(f"{node}: {e}")
            return
        there(reply)

    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(one, node)
    return sorted(failed)


async def signal_nodes(fabric, procs, nodes, req, payload: bytes | None = None) -> tuple[int, int, list[str]]:
    """Signal on each node; (delivered, denied, failed).  req: a Signal
    (reader or builder); payload: its packed bytes, when already at hand."""
    totals = [0, 0]

    def add(delivered, denied):
        totals[0] += delivered
        totals[1] += denied

    def there(reply):
        r = pm.SignalReply.from_bytes_packed(reply.payload)
        add(r.delivered, r.denied)

    failed = await _each_node(fabric, procs, nodes, Call.signal, payload or req.to_bytes_packed(),
                              lambda: add(*procs.deliver(req)), there)
    return totals[0], totals[1], failed


async def list_nodes(fabric, procs, nodes, vm: str) -> tuple[list[dict], list[str]]:
    """Every node's processes of vm, by pid; and the nodes that failed."""
    rows = []
    failed = await _each_node(
        fabric, procs, nodes, Call.list, pm.ListRequest.new_message(vm=vm).to_bytes_packed(),
        lambda: rows.extend(procs.processes(vm)),
        lambda reply: rows.extend(p.to_dict() for p in pm.ProcessTable.from_bytes_packed(reply.payload).processes))
    rows.sort(key=lambda r: r["pid"])
    return rows, failed


class PmServer:
    """pm@VM: one message table."""

    def __init__(self, vm: str, etcd, fabric, procs):
        self.vm, self.etcd, self.fabric, self.procs = vm, etcd, fabric, procs
        self.table = {Call.signal: self.signal, Call.list: self.listing}

    async def handle(self, msg: Msg) -> Msg:
        handler = self.table.get(msg.type)
        if handler is None:
            raise IpcError(f"pm@{self.vm}: unknown message type {msg.type}", errno.ENOSYS)
        return await handler(msg)

    async def _nodes(self) -> list[str]:
        return await vm_nodes(self.etcd, self.vm, self.procs.node)

    def fast(self, msg: Msg) -> Msg | None:
        """A signal for a VM that lives on this node only (as its node list
        is known now) is served at once, on the fabric's fast path."""
        if msg.type != Call.signal or fresh_nodes(self.vm) != [self.procs.node]:
            return None
        req = self._request(msg)
        delivered, denied = self.procs.deliver(req)
        return _signal_reply(delivered, denied, [])

    def _request(self, msg: Msg):
        req = decode(pm.Signal, msg)
        if req.vm != self.vm:
            raise IpcError(f"pm@{self.vm}: request for VM {req.vm!r}", errno.EINVAL)
        return req

    async def signal(self, msg: Msg) -> Msg:
        req = self._request(msg)
        delivered, denied, failed = await signal_nodes(self.fabric, self.procs, await self._nodes(), req, msg.payload)
        return _signal_reply(delivered, denied, failed)

    async def listing(self, msg: Msg) -> Msg:
        rows, failed = await list_nodes(self.fabric, self.procs, await self._nodes(), self.vm)
        return table_message(rows, failed)


def _signal_reply(delivered: int, denied: int, failed: list[str]) -> Msg:
    out = pm.SignalReply.new_message(delivered=delivered, denied=denied)
    fl = out.init("failed", len(failed))
    for i, f in enumerate(failed):
        fl[i] = f
    return Msg(0, out.to_bytes_packed())


async def run(etcd, fabric, member, procs) -> None:
    """Campaign for the PM of every VM with a share of this node."""
    from .. import elected

    async def make(vm: str) -> PmServer:
        return PmServer(vm, etcd, fabric, procs)

    await elected.run(etcd, fabric, member, "pm", lambda vm: member.name in vm.shares, make)
