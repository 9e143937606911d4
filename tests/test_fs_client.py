"""A node's file-system client against a scripted server: which inodes it
tells the server it no longer caches, and when (never while a reply that
may make its kernel cache one again is still on its way)."""

import errno
import os

import trio
import trio.testing

from drvs.fs.client import GEN_SHIFT, VmFs
from drvs.fs.server import Call, fill_attr
from drvs.ipc.message import IpcError, Msg
from drvs.ipc.schema import from_flat, fs, new, to_flat

ROOT = 2
STAT = os.stat("/")


class Server:
    """What VmFs needs of the fabric: a file server that answers every
    call with the attributes of the inode it is told to, records what each
    request said, and holds a reply back while asked to."""

    handlers: dict = {}

    def __init__(self):
        self.requests = []   # (type, FsRequest reader)
        self.ino = ROOT      # the inode the next reply is about
        self.epoch = 1
        self.hold: trio.Event | None = None
        self.holds: dict[bytes, trio.Event] = {}  # path -> held until set
        self.lose = 0        # connections to lose, one per call, before answering

    async def sendrec(self, target, msg, timeout=None, idempotent=False):
        self.requests.append((msg.type, from_flat(fs.FsRequest, msg.payload)))
        if self.lose:
            self.lose -= 1
            raise IpcError("connection lost", errno.ECONNRESET)
        ino, epoch = self.ino, self.epoch
        if self.hold is not None:
            await self.hold.wait()
        path = bytes(self.requests[-1][1].path)
        if path in self.holds:
            await self.holds[path].wait()
        out = new(fs.FsReply, epoch=epoch)
        fill_attr(out.attr, STAT)
        out.attr.ino = ino
        return Msg(0, to_flat(out))

    def told(self) -> list[tuple[list, int]]:
        """What each request said was forgotten, and for which term."""
        return [(list(r.forgotten), r.forgottenEpoch) for _, r in self.requests]


async def client() -> tuple[VmFs, Server, int]:
    server = Server()
    vmfs = VmFs("web", 1, server, spawn=lambda *task: None)  # (no kernel to drop caches of)
    root = (await vmfs.start()).st_ino
    return vmfs, server, root


async def looked_up(vmfs: VmFs, server: Server, parent: int, name: bytes, ino: int) -> int:
    server.ino = ino
    entry = await vmfs.lookup(parent, name)
    server.ino = ROOT
    return entry.st_ino


async def test_an_inode_the_kernel_forgot_is_told_with_the_next_call():
    vmfs, server, root = await client()
    a = await looked_up(vmfs, server, root, b"a", 100)
    vmfs.forget(a & ((1 << 48) - 1), 1)
    await vmfs.getattr(root)
    assert server.told()[-1] == ([100], 1)
    await vmfs.getattr(root)
    assert server.told()[-1] == ([], 0)  # once


async def test_a_notice_waits_for_the_replies_begun_before_the_drop():
    vmfs, server, root = await client()
    b = await looked_up(vmfs, server, root, b"b", 200)
    server.hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vmfs.lookup, root, b"c")  # on its way when b is dropped
        await trio.testing.wait_all_tasks_blocked()
        vmfs.forget(b & ((1 << 48) - 1), 1)
        server.hold = None
        await vmfs.getattr(root)
        assert server.told()[-1] == ([], 0)  # c's reply could still make the kernel cache b
        nursery.cancel_scope.cancel()
    await vmfs.getattr(root)
    assert server.told()[-1] == ([200], 1)


async def test_no_notice_while_a_call_begun_after_the_drop_is_on_its_way():
    """That call may be the kernel's lookup of the same file: applied
    after it, the notice would undo it (even once every call begun before
    the drop was answered)."""
    vmfs, server, root = await client()
    b = await looked_up(vmfs, server, root, b"b", 200)
    server.holds = {b"o": trio.Event(), b"b": trio.Event()}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vmfs.lookup, root, b"o")   # begun before the drop
        await trio.testing.wait_all_tasks_blocked()
        vmfs.forget(b & ((1 << 48) - 1), 1)
        server.ino = 200
        nursery.start_soon(vmfs.lookup, root, b"b")   # the kernel looks it up again
        await trio.testing.wait_all_tasks_blocked()
        server.ino = ROOT
        server.holds[b"o"].set()                       # the older call answered, b's lookup not yet
        await trio.testing.wait_all_tasks_blocked()
        await vmfs.getattr(root)
        assert all(200 not in told for told, _ in server.told())
        server.holds[b"b"].set()
    server.holds = {}
    assert (b & ((1 << 48) - 1)) in vmfs.inodes       # cached again: no notice at all
    await vmfs.getattr(root)
    assert all(200 not in told for told, _ in server.told())


async def test_no_notice_for_an_inode_an_open_listing_still_holds(tmp_path):
    """readdir hands a listing's entries to the kernel later, from the
    snapshot taken when the directory was first read."""
    vmfs, server, root = await client()
    x = await looked_up(vmfs, server, root, b"x", 500)
    cino = x & ((1 << 48) - 1)
    fh = await vmfs.opendir(root, None)
    dino, _, _ = vmfs.listings[fh]
    vmfs.listings[fh] = (dino, [], {cino})  # (as readdir's snapshot would)
    vmfs.forget(cino, 1)
    await vmfs.getattr(root)
    assert all(500 not in told for told, _ in server.told())
    await vmfs.releasedir(fh)
    await vmfs.getattr(root)
    assert server.told()[-1] == ([500], 1)


async def test_a_call_sent_again_does_not_carry_its_notices_again():
    """The first sending may have been applied; between the two, another
    call may have made the node cache the inode again."""
    vmfs, server, root = await client()
    y = await looked_up(vmfs, server, root, b"y", 600)
    vmfs.forget(y & ((1 << 48) - 1), 1)
    server.lose = 1
    await vmfs.getattr(root)
    assert server.told()[-2:] == [([600], 1), ([], 0)]


async def test_a_reply_that_makes_the_kernel_cache_it_again_cancels_the_notice():
    vmfs, server, root = await client()
    d = await looked_up(vmfs, server, root, b"d", 300)
    server.hold, server.ino = trio.Event(), 300
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vmfs.lookup, root, b"d")  # the kernel asks again as it forgets d
        await trio.testing.wait_all_tasks_blocked()
        vmfs.forget(d & ((1 << 48) - 1), 1)
        server.hold.set()
    server.hold, server.ino = None, ROOT
    assert (d & ((1 << 48) - 1)) in vmfs.inodes
    await vmfs.getattr(root)
    assert all(300 not in told for told, _ in server.told())


async def test_notices_of_an_older_term_are_never_sent():
    vmfs, server, root = await client()
    e = await looked_up(vmfs, server, root, b"e", 400)
    server.epoch = 2  # a fail-over: the next reply is the new server's
    await vmfs.getattr(root)
    cino = (e & ((1 << 48) - 1))
    assert cino >> GEN_SHIFT == 0 and vmfs.gen == 1
    vmfs.forget(cino, 1)  # an inode numbered by the old server
    await vmfs.getattr(root)
    assert all(400 not in told for told, _ in server.told())


async def test_the_server_forgets_as_the_message_arrives_and_only_in_its_term(tmp_path):
    from drvs.fs.store import Store
    from drvs.fs.server import FsServer
    from test_fs_server import Invalidations

    server = FsServer("web", Store(str(tmp_path / "fs"), "web"), Invalidations(), "n1")
    server.epoch = 3
    try:
        await _forgets_as_it_arrives(server)
    finally:
        server.close()


async def _forgets_as_it_arrives(server):

    def msg(node, ctype, **fields):
        m = Msg(ctype, to_flat(new(fs.FsRequest, vm="web", **fields)))
        m.node = node
        return m

    ino = from_flat(fs.FsReply, server.fast(msg("n2", Call.mknod, path=b"f", mode=0o100644)).payload).attr.ino
    server.fast(msg("n2", Call.lookup, path=b"f"))
    assert server.interest[ino] == {"n2"}
    server.fast(msg("n2", Call.getattr, path=b"", forgotten=[ino], forgottenEpoch=2))
    assert server.interest[ino] == {"n2"}  # another term's numbers
    server.held = trio.Event()  # the call itself waits in trio: the notice does not
    assert server.fast(msg("n2", Call.mkdir, path=b"d", mode=0o755, forgotten=[ino], forgottenEpoch=3)) is None
    assert ino not in server.interest
