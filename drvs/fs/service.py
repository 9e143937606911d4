"""This node's part in serving VM file systems.  For every VM that keeps a
replica here it campaigns for fs@VM (drvs/dvos/elected.py) and, elected,
serves it from its store; meanwhile it is a replica: "fsr@NODE" takes the
serving node's changes for any VM (drvs/fs/replica.py).  One FsServer per
VM on this node plays either part, so a replica taking over keeps the
open files' handles it mirrored."""

import contextlib
import errno
import logging
import os

import trio

from ..cluster.etcd import EtcdUnavailable
from ..dvos import elected
from ..errors import DrvsError, NotFound
from ..ipc.message import IpcError, Msg
from ..ipc.schema import from_flat, fs, to_flat
from ..vm.model import VmSpec
from ..vm.registry import VMS
from . import replica
from .server import Call, FsServer
from .store import Store, made_of

log = logging.getLogger("drvmmd")
SWEEP_EVERY = 10.0  # seconds between looks for replicas here of VMs removed (see FsNode.sweeping)


def store_dir(cfg, vm: str) -> str:
    return f"{cfg.vms_dir}/{vm}/fs"


class FsNode:
    def __init__(self, cfg, etcd, fabric, member):
        self.cfg, self.etcd, self.fabric, self.member = cfg, etcd, fabric, member
        self.servers: dict[str, FsServer] = {}  # vm -> its server or replica here
        self.terms: dict[str, int] = {}         # vm -> the newest term heard of here
        self.handed: dict[str, tuple] = {}      # vm -> (made, term) its server handed over cleanly to here
        self.removed: dict[str, int] = {}       # vm -> the create revision of its last definition removed
        # vm -> held while its store is made or removed here (a removal's
        # rmtree runs in a thread: a batch must not make the store meanwhile)
        self.lifecycle: dict[str, trio.Lock] = {}

    def _lock(self, vm: str) -> trio.Lock:
        return self.lifecycle.setdefault(vm, trio.Lock())

    async def _server(self, vm: str, made: int, check: bool = False) -> FsServer:
        """The server or replica here of VM vm as defined at revision made
        (0: whichever is here), with the VM's lock held.  What is here of
        an earlier definition of the name goes first: a VM made again can be
        served, and mirrored to this node, before this node's own look at
        the VM list saw the old one go (elected.RESYNC).  check: a store
        made anew is made only for a definition etcd has (a batch that
        comes late, after a restart forgot the removal, would leave one)."""
        await self._only(vm, made)
        server = self.servers.get(vm)
        if server is None:
            if check and made:
                entry = await self.etcd.get(VMS + vm)
                if entry is None or entry.create_revision != made:
                    raise IpcError(f"fs@{vm}: no VM {vm!r} as defined at revision {made} (removed)", errno.ESTALE)
            server = self.servers[vm] = FsServer(vm, Store(store_dir(self.cfg, vm), vm, made), self.fabric,
                                                 self.member.name, self.etcd)
        return server

    def _made_here(self, vm: str) -> int:
        """The create revision of the definition of vm kept here (0: none, or not known)."""
        server = self.servers.get(vm)
        return server.store.made if server is not None else made_of(store_dir(self.cfg, vm))

    async def _only(self, vm: str, made: int) -> None:
        """Keep nothing here of another definition of vm than made: an
        earlier one goes; a later one, or made's own removal seen here,
        refuses (ESTALE: the caller is of a VM that is gone; a batch that
        comes after the removal would make the store again, for good)."""
        if made and made <= self.removed.get(vm, 0):  # (a batch still on its way: the store would stay)
            raise IpcError(f"fs@{vm}: the VM as defined at revision {made} was removed", errno.ESTALE)
        here = self._made_here(vm)
        if made and here and here != made:
            if here > made:
                raise IpcError(f"fs@{vm}: a later definition of the VM is here (revision {here})", errno.ESTALE)
            await self._remove(vm, here)

    async def serve(self, vm: str) -> "_Serving":
        """Elected for fs@VM: take over (only as an in-sync replica)."""
        entry = await self.etcd.get(VMS + vm)
        if entry is None:
            raise NotFound(f"no such VM: {vm!r}")
        spec, made = VmSpec.from_json(entry.value), entry.create_revision
        me = self.member.name
        epoch, before = await replica.take_over(self.etcd, vm, me, first=spec.fs_nodes[:1] == [me])
        # The term before this one, if its server handed everything over here.
        last = self.terms.get(vm, 0)
        vouched = last if self.handed.pop(vm, None) == (made, last) and last == epoch - 1 else 0
        self.terms[vm] = epoch  # (the old server's batches are refused from now on: it learns so too)
        if before and before != me:
            await self._term_began(vm, made, epoch, before)
        async with self._lock(vm):  # (promote writes in the store: not while a removal's rmtree runs)
            server = await self._server(vm, made)
            if not vouched and before == me:  # (this node's drvmmd served the term before: restarted since)
                vouched = server.vouch_own(epoch - 1)
            server.promote(epoch, spec.fs_nodes, spec.fs_sync, vouched)
        log.info("fs@%s: term %d; replicas %s%s", vm, epoch, ", ".join(spec.fs_nodes),
                 f" (term {vouched} handed over whole)" if vouched else "")
        return _Serving(self, server)

    async def _term_began(self, vm: str, made: int, epoch: int, node: str) -> None:
        """Tell the node that served the term before that it is over: one
        cut off from etcd, but not from this node, would otherwise go on
        answering its callers until its next change reached a replica (an
        empty batch of the new term: the replica there marks its server
        stale).  At most a second: that node may be dead."""
        m = fs.Batch.new_message(vm=vm, epoch=epoch, made=made)
        try:
            await self.fabric.sendrec_last_seen(f"fsr@{node}", Msg(Call.mirror, to_flat(m)), timeout=1)
        except (IpcError, EtcdUnavailable):
            pass

    async def remove(self, vm: str, made: int) -> None:
        """The VM as defined at revision made was removed (drvs vm rm): its
        replica here goes too -- unless what is here is of a later
        definition, already mirrored here (see _server)."""
        async with self._lock(vm):
            await self._remove(vm, made)

    async def _remove(self, vm: str, made: int) -> None:
        import shutil

        self.removed[vm] = max(made, self.removed.get(vm, 0))
        here = self._made_here(vm)
        if here and made and here > made:
            return
        server = self.servers.pop(vm, None)
        if server is not None:
            server.close()
        self.terms.pop(vm, None)  # (a VM made again under the name starts at term 1)
        self.handed.pop(vm, None)
        await trio.to_thread.run_sync(shutil.rmtree, store_dir(self.cfg, vm), True)
        with contextlib.suppress(OSError):  # (the VM's directory, if the store was all there was in it:
            os.rmdir(f"{self.cfg.vms_dir}/{vm}")  # no cell lock here, which a starting run may hold)
        log.info("fs@%s: the VM was removed; its replica here too", vm)

    async def sweeping(self) -> None:
        """sweep() now and then: a replica this node kept until the VM's
        share here was taken away (vm update) goes once the VM does; this
        node no longer campaigns for it, so hears of no removal."""
        while True:
            await trio.sleep(SWEEP_EVERY)
            await self.sweep()

    async def sweep(self) -> None:
        """At start: the stores here of VMs removed, or made again, while
        this node was away go (their removal was never seen here)."""
        import glob

        try:
            entries = await self.etcd.range(VMS)
        except (EtcdUnavailable, DrvsError) as e:
            log.warning("fs: cannot look for replicas of removed VMs now: %s", e)
            return
        defined = {VmSpec.from_json(e.value).name: e.create_revision for e in entries}
        for path in sorted(glob.glob(f"{self.cfg.vms_dir}/*/fs")):
            vm, here = os.path.basename(os.path.dirname(path)), made_of(path)
            if vm not in defined or (here and here != defined[vm]):
                try:  # (a VM made since the look above has its store made here too: it stays)
                    now = await self.etcd.get(VMS + vm)
                except (EtcdUnavailable, DrvsError):
                    return
                if now is not None and (not here or here == now.create_revision):
                    continue
                log.info("fs@%s: a replica of a VM removed while this node was away; removing it", vm)
                await self.remove(vm, here)

    async def mirror(self, msg: Msg) -> Msg:
        """fsr@NODE: a batch of the serving node's changes."""
        try:
            batch = from_flat(fs.Batch, msg.view())  # (a view of the message it came in: no copy)
            vm, epoch, made = batch.vm, batch.epoch, batch.made
        except Exception:  # noqa: BLE001 - malformed input from the wire
            raise IpcError("malformed batch", errno.EBADMSG) from None
        async with self._lock(vm):
            await self._only(vm, made)  # (before terms: an earlier definition's are not this one's)
            if epoch < self.terms.get(vm, 0):  # a server of an older term, cut off meanwhile
                raise IpcError(f"fs@{vm}: term {epoch} is over (term {self.terms[vm]} began)", errno.ESTALE)
            self.terms[vm] = epoch
            server = self.servers.get(vm)
            if server is not None and server.epoch:
                if server.epoch < epoch:
                    server.stale = True  # it steps down; the new server copies to it then
                raise IpcError(f"fs@{vm}: this node serves it (term {server.epoch})", errno.EBUSY)
            if batch.handed:  # (its server stopped cleanly: this replica has all it acknowledged)
                self.handed[vm] = (made, epoch)
                return Msg(0, to_flat(fs.BatchReply.new_message()))
            self.handed.pop(vm, None)  # (a batch after it: a term that went on, not handed over)
            if not len(batch.calls):  # (a new term's news only: see _term_began)
                return Msg(0, to_flat(fs.BatchReply.new_message()))
            server = await self._server(vm, made, check=True)
        statuses = await server.apply(batch)
        out = fs.BatchReply.new_message()
        st = out.init("statuses", len(statuses))
        for i, v in enumerate(statuses):
            st[i] = v
        return Msg(0, to_flat(out))


class _Serving:
    """The elected part: fs@VM's handlers; when it ends the FsServer goes
    back to being a replica (a fresh one: what it had is copied again)."""

    def __init__(self, node: FsNode, server: FsServer):
        self.node, self.server = node, server
        self.handle, self.fast, self.run = server.handle, server.fast, server.run

    def close(self) -> None:
        self.server.mirrors.clear()
        self.server.epoch = 0
        if self.node.servers.get(self.server.vm) is self.server:  # (not another definition's, made since)
            del self.node.servers[self.server.vm]
        self.server.close()


async def run(cfg, etcd, fabric, member, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve fsr@NODE (registered before this returns from nursery.start:
    etcd may be away later) and campaign for the VMs' file servers."""
    node = FsNode(cfg, etcd, fabric, member)
    await fabric.register_steadily(f"fsr@{member.name}", node.mirror)
    task_status.started()
    await node.sweep()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.sweeping)
            await elected.run(etcd, fabric, member, "fs", lambda spec: member.name in spec.fs_nodes, node.serve,
                              node.remove)
    finally:
        for server in node.servers.values():
            server.close()
