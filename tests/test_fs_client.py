"""Which inodes a node tells the file server it no longer caches, and
when: the client against a scripted server (when a notice goes, with which
mark), the server against real requests (what a notice removes)."""

import errno
import os

import pyfuse3
import trio
import trio.testing

from drvs.fs.client import DOTS, GEN_SHIFT, GENS, MASK, VmFs
from drvs.fs.server import Call, FsServer, fill_attr
from drvs.fs.store import Store
from drvs.ipc.message import IpcError, Msg
from drvs.ipc.schema import from_flat, fs, new, to_flat

ROOT = 2
STAT = os.stat("/")


class Server:
    """What VmFs needs of the fabric: a file server that answers every call
    with the attributes of the inode it is told to (a listing with the
    pages it is given), records each request, and holds replies back while
    asked to."""

    handlers: dict = {}

    def __init__(self):
        self.requests = []   # FsRequest readers, in the order sent
        self.ino = ROOT      # the inode the next reply is about
        self.epoch = 1
        self.holds: dict[bytes, trio.Event] = {}  # path -> its calls held until set
        self.pages: list[list[tuple[bytes, int]]] = []  # a listing's batches: (name, inode)
        self.page_holds: dict[int, trio.Event] = {}     # batch number -> held until set
        self.listed = 0      # batches asked for
        self.lose = 0        # connections to lose, one per call, before answering
        self.gens: dict[int, int] = {}  # inode -> which object has the number (0 if not here)

    async def sendrec(self, target, msg, timeout=None, idempotent=False):
        req = from_flat(fs.FsRequest, msg.payload)
        self.requests.append(req)
        if self.lose:
            self.lose -= 1
            raise IpcError("connection lost", errno.ECONNRESET)
        ino, epoch, out = self.ino, self.epoch, None
        if msg.type == Call.readdir:
            page, self.listed = self.listed, self.listed + 1
            out = new(fs.FsReply, epoch=epoch, more=page + 1 < len(self.pages))
            entries = out.init("entries", len(self.pages[page]))
            for e, (name, n) in zip(entries, self.pages[page]):
                e.name = name
                fill_attr(e.attr, STAT)
                e.attr.ino = n
            if page in self.page_holds:
                await self.page_holds[page].wait()
        if bytes(req.path) in self.holds:
            await self.holds[bytes(req.path)].wait()
        if out is None:
            out = new(fs.FsReply, epoch=epoch)
            fill_attr(out.attr, STAT)
            out.attr.ino = ino
            if msg.type != Call.getattr:  # (as the server: a getattr's reply names no object to a kernel)
                out.attr.gen = self.gens.get(ino, 0)
        return Msg(0, to_flat(out))

    def notices(self) -> list[dict]:
        """What each request said was forgotten: {inode: mark}, and its term."""
        return [(dict(zip(r.forgotten, r.forgottenMarks)), r.forgottenEpoch) for r in self.requests]

    def told_of(self, ino: int) -> list[int]:
        """The marks every notice of ino carried."""
        return [n[ino] for n, _ in self.notices() if ino in n]


async def client() -> tuple[VmFs, Server, int]:
    server = Server()
    vmfs = VmFs("web", 1, server, spawn=lambda *task: None)  # (no kernel to drop caches of)
    root = (await vmfs.start()).st_ino
    return vmfs, server, root


async def looked_up(vmfs: VmFs, server: Server, parent: int, name: bytes, ino: int) -> int:
    server.ino = ino
    entry = await vmfs.lookup(parent, name)
    server.ino = ROOT
    return entry.st_ino & MASK


async def test_an_inode_the_kernel_forgot_is_told_with_a_later_call_and_its_mark():
    vmfs, server, root = await client()
    a = await looked_up(vmfs, server, root, b"a", 100)
    vmfs.forget(a, 1)
    await vmfs.getattr(root)
    assert server.notices()[-1] == ({100: vmfs.begun - 1}, 1)  # the last call begun before the drop
    assert server.requests[-1].seq == vmfs.begun
    await vmfs.getattr(root)
    assert server.told_of(100) == [vmfs.begun - 2]  # once


async def test_a_notice_waits_for_the_replies_to_calls_begun_before_the_drop():
    vmfs, server, root = await client()
    b = await looked_up(vmfs, server, root, b"b", 200)
    server.holds[b"c"] = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vmfs.lookup, root, b"c")  # on its way when b is dropped
        await trio.testing.wait_all_tasks_blocked()
        vmfs.forget(b, 1)
        await vmfs.getattr(root)
        assert server.told_of(200) == []  # c's reply could make the kernel cache b again
        server.holds[b"c"].set()
    await vmfs.getattr(root)
    assert len(server.told_of(200)) == 1


async def test_a_reply_that_makes_the_kernel_cache_it_again_cancels_the_notice():
    vmfs, server, root = await client()
    d = await looked_up(vmfs, server, root, b"d", 300)
    server.holds[b"d"], server.ino = trio.Event(), 300
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vmfs.lookup, root, b"d")  # the kernel asks again as it forgets d
        await trio.testing.wait_all_tasks_blocked()
        vmfs.forget(d, 1)
        server.holds[b"d"].set()
    server.ino = ROOT
    assert d in vmfs.inodes
    await vmfs.getattr(root)
    assert server.told_of(300) == []


async def test_a_notice_is_marked_before_every_call_begun_after_the_drop():
    """A call begun after the drop may be the kernel's lookup of the same
    file, and reach the server before or after the notice: its number is
    above the notice's mark, so the server keeps telling this node."""
    vmfs, server, root = await client()
    b = await looked_up(vmfs, server, root, b"b", 200)
    vmfs.forget(b, 1)
    server.holds[b"b"], server.ino = trio.Event(), 200
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vmfs.lookup, root, b"b")   # begun after the drop, unanswered
        await trio.testing.wait_all_tasks_blocked()
        server.ino = ROOT
        await vmfs.getattr(root)
        server.holds[b"b"].set()
    lookup = [r for r in server.requests if bytes(r.path) == b"b"][-1]  # the one begun after the drop
    marks = server.told_of(200)
    assert marks and all(mark < lookup.seq for mark in marks)


async def test_no_notice_for_an_inode_a_directory_listing_holds():
    """readdir hands a listing's entries to the kernel from a snapshot,
    while it is read (one batch after another) and until the directory is
    closed."""
    vmfs, server, root = await client()
    x = await looked_up(vmfs, server, root, b"x", 500)
    server.pages = [[(b"x", 500)], [(b"y", 501)], [(b"z", 502)]]
    server.page_holds = {1: trio.Event(), 2: trio.Event()}
    async with trio.open_nursery() as nursery:
        listed = []

        async def read():
            listed.append(await vmfs._list(root & MASK))

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()   # batch 1 on its way, x in batch 0
        vmfs.forget(x, 1)
        server.page_holds[1].set()
        await trio.testing.wait_all_tasks_blocked()   # batch 2 on its way: every call before the drop answered
        await vmfs.getattr(root)
        assert server.told_of(500) == []              # the listing being read holds x
        server.page_holds[2].set()
    fh = await vmfs.opendir(root, None)
    vmfs.listings[fh].entries, vmfs.listings[fh].inos = listed[0]  # as readdir keeps it
    await vmfs.getattr(root)
    assert server.told_of(500) == []                  # the open listing holds x
    await vmfs.releasedir(fh)
    await vmfs.getattr(root)
    assert len(server.told_of(500)) == 1


async def test_a_restarted_client_numbers_its_calls_above_its_predecessor():
    """The server may still remember (or receive late) the numbers of the
    node's previous drvmmd: a notice of that one must not undo a call of
    this one."""
    old, _, _ = await client()
    new_, _, _ = await client()
    assert new_.begun > old.begun


async def test_notices_of_an_older_term_are_never_sent():
    vmfs, server, root = await client()
    e = await looked_up(vmfs, server, root, b"e", 400)
    server.epoch = 2  # a fail-over: the next reply is the new server's
    await vmfs.getattr(root)
    assert e >> GEN_SHIFT == 1 and vmfs.gen == 2
    vmfs.forget(e, 1)  # an inode numbered by the old server
    await vmfs.getattr(root)
    assert server.told_of(400) == []


async def test_every_node_numbers_a_file_alike_whatever_terms_it_saw():
    """A file's inode number on a node is the server's, with the term: a
    node that saw the fail-over and one that started after it give the
    same st_ino (programs on two nodes compare them: git's index, tar)."""
    old, server, root = await client()
    await looked_up(old, server, root, b"e", 400)
    server.epoch = 5                                       # a fail-over (terms 2-4 went unseen here)
    await old.getattr(root)
    server2 = Server()
    server2.epoch = 5                                      # a node that started in term 5
    new_ = VmFs("web", 1, server2, spawn=lambda *task: None)
    root2 = (await new_.start()).st_ino
    assert await looked_up(old, server, root, b"e", 700) == await looked_up(new_, server2, root2, b"e", 700)
    server.epoch = 5 + GENS                                # a jump of GENS terms: still other numbers
    await old.getattr(root)
    assert await looked_up(old, server, root, b"e", 700) >> GEN_SHIFT == 6


async def test_the_server_forgets_what_no_later_call_showed_and_only_in_its_term(tmp_path):
    server = FsServer("web", Store(str(tmp_path / "fs"), "web"), None, "n1")
    server.epoch = 3
    try:
        def fast(ctype, **fields):
            m = Msg(ctype, to_flat(new(fs.FsRequest, vm="web", **fields)))
            m.node = "n2"
            return server.fast(m)

        made = fast(Call.mknod, path=b"f", mode=0o100644, seq=1)
        ino = from_flat(fs.FsReply, made.payload).attr.ino
        fast(Call.lookup, path=b"f", seq=5)
        assert set(server.interest[ino]) == {"n2"}
        fast(Call.getattr, path=b"", seq=6, forgotten=[ino], forgottenMarks=[5], forgottenEpoch=2)
        assert ino in server.interest                 # another term's numbers
        fast(Call.getattr, path=b"", seq=7, forgotten=[ino], forgottenMarks=[4], forgottenEpoch=3)
        assert ino in server.interest                 # call 5 showed it after the node forgot it
        server.held = trio.Event()                    # the call itself waits in trio; the notice does not
        assert fast(Call.mkdir, path=b"d", mode=0o755, seq=8, forgotten=[ino], forgottenMarks=[5],
                    forgottenEpoch=3) is None
        assert ino not in server.interest
    finally:
        server.close()


async def test_a_reply_of_an_older_term_is_stale():
    """After a fail-over, a late answer of the old server (its inode
    numbers are not the new term's) is not taken for the new one's."""
    vmfs, server, root = await client()
    server.epoch = 2
    await vmfs.getattr(root)
    assert vmfs.epoch == 2
    server.epoch, server.ino = 1, 700
    try:
        await vmfs.lookup(root, b"late")
    except pyfuse3.FUSEError as e:
        assert e.errno == errno.ESTALE
    else:
        raise AssertionError("an older term's reply was taken")
    assert not any(n.name == b"late" for n in vmfs.inodes.values())


async def test_the_kernel_is_told_which_object_has_a_number():
    """Each entry says the generation the server gave (a number the store
    gave out again is another inode to the kernel); "." answers the one
    the kernel was last told, which a getattr's reply does not say."""
    vmfs, server, root = await client()
    server.gens[700] = 12345
    d = await looked_up(vmfs, server, root, b"d", 700)
    server.ino = 700
    assert (await vmfs.lookup(root, b"d")).generation == 12345
    server.gens[700] = 999  # another object has the number now
    assert (await vmfs.lookup(root, b"d")).generation == 999
    assert (await vmfs.lookup(d, b".")).generation == 999


async def test_a_listing_read_before_this_nodes_unlink_or_rename_does_not_hand_out_the_old_entries(monkeypatch):
    """The server tells other nodes of a change, not the one that made it:
    a listing this node took before its own unlink or rename must not hand
    the old entries to the kernel later (their numbers may be new files'
    already, which the kernel would take for stale inodes)."""
    vmfs, server, root = await client()
    handed, room = [], [1]

    def reply(token, name, attr, next_id):  # the kernel's buffer: room for one entry, at first
        if name in (b".", b".."):
            return True
        if not room[0]:
            return False
        room[0] -= 1
        handed.append(name)
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    server.pages = [[(b"x", 800), (b"y", 801), (b"z", 802), (b"zz", 803)]]
    fh = await vmfs.opendir(root, None)
    await vmfs.readdir(fh, 0, None)
    assert handed == [b"x"]
    await vmfs.unlink(root, b"y", None)
    await vmfs.rename(root, b"q", root, b"z", 0, None)  # (over z)
    room[0] = 10
    await vmfs.readdir(fh, DOTS + 1, None)
    assert handed == [b"x", b"zz"]
