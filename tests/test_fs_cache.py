"""What a node keeps of remote files: their data in its cache
(drvs/fs/cache.py), and the names and attributes it gives its kernel to
keep.  A node's client (VmFs, as node n2) against a real file server on a
real store (on "n1"), with a third node (n3) changing files behind it.
What a user would check: reads return the file's current content after
every kind of change, a read the cache holds costs no call to the server,
and nothing n2's kernel is told to keep was changed before it got it."""

import collections
import os
import types

import pyfuse3
import pytest
import trio
import trio.testing

import drvs.fs.cache as cache_mod
import drvs.fs.client as client_mod
from drvs.fs.cache import PAGE, DataCache
from drvs.fs.client import DOTS, VmFs
from drvs.fs.server import SET_ATIME, SET_MTIME, Call, FsServer
from drvs.fs.store import Store
from drvs.ipc.message import Later, Msg
from drvs.ipc.schema import from_flat, fs, new, to_flat

CONTENT = bytes(range(256)) * 49  # 3 pages and 256 bytes


class Net:
    """The fabric of both sides: n2's calls reach the server as from n2;
    the server's invalidations reach n2's client.  Reads may be held."""

    handlers: dict = {}

    def __init__(self, server: FsServer):
        self.server, self.vmfs = server, None
        self.reads = 0
        self.calls = collections.Counter()  # n2's calls, by type
        self.read_hold: trio.Event | None = None
        self.open_hold: trio.Event | None = None
        self.write_hold: trio.Event | None = None
        self.reply_holds: dict[int, trio.Event] = {}  # call type -> its replies held (made, on their way)
        self.request_holds: dict[int, trio.Event] = {}  # call type -> its requests held (not yet at the server)
        self.told_hold: trio.Event | None = None  # the server's news for n2 held (on its way)

    async def sendrec(self, target, msg, timeout=None, idempotent=False):
        if target.startswith("fsc@"):  # (n3 has no caches to drop)
            if target == "fsc@n2":
                if self.told_hold is not None:
                    await self.told_hold.wait()
                await self.vmfs.invalidate(from_flat(fs.Invalidations, msg.payload))
            return Msg(0)
        msg.node = "n2"
        self.calls[msg.type] += 1
        if msg.type == Call.write and self.write_hold is not None:  # (not yet at the server)
            await self.write_hold.wait()
        if msg.type in self.request_holds:
            await self.request_holds[msg.type].wait()
        reply = await deliver(self.server, msg)
        if msg.type == Call.open and self.open_hold is not None:
            await self.open_hold.wait()
        if msg.type in self.reply_holds:
            await self.reply_holds[msg.type].wait()
        if msg.type == Call.read:
            self.reads += 1
            if self.read_hold is not None:  # (made by the server, its answer on its way)
                await self.read_hold.wait()
        return reply


async def deliver(server: FsServer, msg: Msg) -> Msg:
    """As the fabric hands a call to the server: its fast path first."""
    reply = server.fast(msg)
    if isinstance(reply, Later):
        return await reply.finish()
    return reply if reply is not None else await server.handle(msg)


@pytest.fixture
def no_kernel(monkeypatch):
    """No FUSE mount here: the kernel's caches have nothing to drop."""
    monkeypatch.setattr(client_mod, "_invalidate_inode", lambda ino, attr_only: None)
    monkeypatch.setattr(pyfuse3, "invalidate_entry_async", lambda *a, **k: None)


@pytest.fixture
async def n2(tmp_path, no_kernel):
    server = FsServer("web", Store(str(tmp_path / "fs"), "web"), None, "n1")
    server.epoch = 1
    net = server.fabric = Net(server)
    cache = DataCache(str(tmp_path / "cache"), 1 << 20)
    try:
        async with trio.open_nursery() as nursery:
            vmfs = net.vmfs = VmFs("web", 1, net, spawn=nursery.start_soon, cache=cache)
            vmfs.read = _then_filled(vmfs.read, cache)
            root = (await vmfs.start()).st_ino
            await n3(server, Call.mknod, path=b"f", mode=0o100644)
            await n3_writes(server, CONTENT)
            yield vmfs, net, cache, root
            nursery.cancel_scope.cancel()
    finally:
        cache.close()
        server.close()


def _then_filled(read, cache: DataCache):
    """vmfs.read, returning once what it keeps is in the cache (a read's
    pages are written there after it is answered)."""
    async def read_filled(fh, off, size):
        data = await read(fh, off, size)
        while cache.filling:
            await trio.sleep(0.001)
        return data
    read_filled.unfilled = read
    return read_filled


async def n3(server: FsServer, ctype, **fields):
    m = Msg(ctype, to_flat(new(fs.FsRequest, vm="web", **fields)))
    m.node = "n3"
    reply = await server.handle(m)
    assert reply.status == 0, reply.error
    return from_flat(fs.FsReply, reply.payload)


async def n3_writes(server: FsServer, data: bytes) -> None:
    """n3 rewrites f and closes it (as a process there would)."""
    fh = (await n3(server, Call.open, path=b"f", flags=os.O_WRONLY | os.O_TRUNC)).fh
    await n3(server, Call.write, fh=fh, offset=0, data=data)
    await n3(server, Call.flush, fh=fh)
    await n3(server, Call.release, fh=fh)


async def opened(vmfs: VmFs, root: int, flags: int = os.O_RDONLY) -> tuple[int, int]:
    ino = (await vmfs.lookup(root, b"f")).st_ino
    return ino, (await vmfs.open(ino, flags, None)).fh


async def test_a_read_the_cache_holds_is_not_sent_again(n2):
    vmfs, net, cache, root = n2
    _, fh = await opened(vmfs, root)
    assert await vmfs.read(fh, 0, 2 * PAGE) == CONTENT[:2 * PAGE]
    assert await vmfs.read(fh, 0, 2 * PAGE) == CONTENT[:2 * PAGE]
    assert net.reads == 1
    # The end of the file: its last, partial page is kept too, and past it is nothing.
    assert await vmfs.read(fh, 2 * PAGE, 4 * PAGE) == CONTENT[2 * PAGE:]
    assert await vmfs.read(fh, PAGE, 8 * PAGE) == CONTENT[PAGE:]
    assert await vmfs.read(fh, len(CONTENT), PAGE) == b""
    assert net.reads == 2
    # Another open of the same file, unchanged, finds its pages.
    await vmfs.release(fh)
    _, fh = await opened(vmfs, root)
    assert await vmfs.read(fh, 0, len(CONTENT)) == CONTENT
    assert net.reads == 2


async def test_pages_still_being_written_to_the_cache_are_read_from_the_server(n2, monkeypatch):
    """A large read is answered before its pages are in the cache: until
    they are, a read of them goes to the server, and a change meanwhile
    keeps them out of it."""
    monkeypatch.setattr(cache_mod, "IN_LINE", 0)  # (these reads are small)
    vmfs, net, cache, root = n2
    read = vmfs.read.unfilled
    _, fh = await opened(vmfs, root)
    writers = [object(), object()]
    for w in writers:  # (the cache's writer threads all busy)
        await cache.writers.acquire_on_behalf_of(w)
    try:
        assert await read(fh, 0, 2 * PAGE) == CONTENT[:2 * PAGE]
        assert cache.filling == 2 * PAGE
        assert await read(fh, PAGE, PAGE) == CONTENT[PAGE:2 * PAGE]
        assert net.reads == 2
    finally:
        for w in writers:
            cache.writers.release_on_behalf_of(w)
    assert await vmfs.read(fh, 0, 2 * PAGE) == CONTENT[:2 * PAGE]  # (waits for the writes)
    assert await vmfs.read(fh, 0, 2 * PAGE) == CONTENT[:2 * PAGE] and net.reads == 3
    assert await read(fh, 0, 2 * PAGE) == CONTENT[:2 * PAGE] and net.reads == 3  # the cache's now
    for w in writers:
        await cache.writers.acquire_on_behalf_of(w)
    try:
        assert await read(fh, 2 * PAGE, 2 * PAGE) == CONTENT[2 * PAGE:]
        await n3_writes(vmfs.fabric.server, CONTENT[::-1])
    finally:
        for w in writers:
            cache.writers.release_on_behalf_of(w)
    while cache.filling:
        await trio.sleep(0.001)
    await vmfs.release(fh)
    _, fh = await opened(vmfs, root)
    assert await vmfs.read(fh, 0, len(CONTENT)) == CONTENT[::-1]


async def test_reads_beyond_what_the_cache_may_hold_in_writing_are_not_kept(n2, monkeypatch):
    """Replies waiting for the cache's disk are held in memory: up to a
    bound, past which a read's data is not kept."""
    monkeypatch.setattr(cache_mod, "MAX_FILLING", 2 * PAGE)
    monkeypatch.setattr(cache_mod, "IN_LINE", 0)
    vmfs, net, cache, root = n2
    read = vmfs.read.unfilled
    _, fh = await opened(vmfs, root)
    writers = [object(), object()]
    for w in writers:
        await cache.writers.acquire_on_behalf_of(w)
    try:
        assert await read(fh, 0, 2 * PAGE) == CONTENT[:2 * PAGE]
        assert await read(fh, 2 * PAGE, 2 * PAGE) == CONTENT[2 * PAGE:]
        assert cache.filling == 2 * PAGE
    finally:
        for w in writers:
            cache.writers.release_on_behalf_of(w)
    while cache.filling:
        await trio.sleep(0.001)
    assert await read(fh, 0, 2 * PAGE) == CONTENT[:2 * PAGE] and net.reads == 2
    assert await read(fh, 2 * PAGE, 2 * PAGE) == CONTENT[2 * PAGE:] and net.reads == 3


async def test_another_nodes_write_drops_the_pages(n2):
    vmfs, net, cache, root = n2
    _, fh = await opened(vmfs, root)
    await vmfs.read(fh, 0, PAGE)
    await n3_writes(vmfs.fabric.server, b"new" * 2000)  # the server tells n2 at n3's close
    assert await vmfs.read(fh, 0, PAGE) == (b"new" * 2000)[:PAGE]
    assert net.reads == 2


async def test_attributes_of_another_version_drop_the_pages(n2):
    """As the kernel does: should the server's word have been lost, the
    file's new size or mtime, seen when the attributes expire, tells."""
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root)
    await vmfs.read(fh, 0, PAGE)
    server = vmfs.fabric.server
    server.interest[(await vmfs.getattr(ino)).st_ino & ((1 << 40) - 1)].pop("n2")  # (n2 is not told)
    await n3_writes(server, b"other" * 1000)
    assert await vmfs.read(fh, 0, PAGE) == CONTENT[:PAGE]  # (what the kernel would show until then)
    await vmfs.getattr(ino)
    assert await vmfs.read(fh, 0, PAGE) == (b"other" * 1000)[:PAGE]


async def test_a_write_here_drops_the_pages_and_a_read_it_overlaps_is_not_kept(n2):
    vmfs, net, cache, root = n2
    _, fh = await opened(vmfs, root, os.O_RDWR)
    await vmfs.read(fh, 0, PAGE)
    assert await vmfs.write(fh, 0, b"ABCD") == 4
    assert await vmfs.read(fh, 0, 8) == b"ABCD" + CONTENT[4:8]
    # A read the server made before a write, answered after the write
    # began here: its (old) data is not kept.
    _, fh2 = await opened(vmfs, root)
    hold = net.read_hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vmfs.read, fh2, 0, PAGE)
        await trio.testing.wait_all_tasks_blocked()
        net.read_hold = None
        await vmfs.write(fh, 0, b"WXYZ")
        hold.set()
    reads = net.reads
    assert await vmfs.read(fh2, 0, 8) == b"WXYZ" + CONTENT[4:8]
    assert net.reads == reads + 1


async def test_what_is_read_while_a_write_here_is_on_its_way_is_not_kept(n2):
    """An open and a read made while this node's write travels see the
    data before it; once the write is answered, that data must go."""
    vmfs, net, cache, root = n2
    _, writer = await opened(vmfs, root, os.O_WRONLY)
    hold = net.write_hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vmfs.write, writer, 0, b"WXYZ")
        await trio.testing.wait_all_tasks_blocked()
        net.write_hold = None
        _, fh = await opened(vmfs, root)
        assert await vmfs.read(fh, 0, PAGE) == CONTENT[:PAGE]
        hold.set()
    assert await vmfs.read(fh, 0, PAGE) == b"WXYZ" + CONTENT[4:PAGE]


async def test_a_truncate_here_drops_the_pages(n2):
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root, os.O_RDWR)
    await vmfs.read(fh, 0, 2 * PAGE)
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 100
    fields = types.SimpleNamespace(update_mode=False, update_uid=False, update_gid=False, update_size=True,
                                   update_atime=False, update_mtime=False)  # (as pyfuse3.SetattrFields)
    await vmfs.setattr(ino, attr, fields, fh, None)
    assert await vmfs.read(fh, 0, 2 * PAGE) == CONTENT[:100]


async def test_a_forgotten_file_keeps_its_pages_for_an_open_of_the_same_version(n2):
    """The server stops telling this node of a file its kernel forgot; the
    pages stay, and serve the next open only if the file's data is the
    version they were read at -- not once another node rewrote it, even
    to the same size and mtime."""
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root)
    assert await vmfs.read(fh, 0, PAGE) == CONTENT[:PAGE]
    await vmfs.release(fh)
    vmfs.forget(ino & client_mod.MASK, 1)
    assert cache.held >= PAGE
    ino, fh = await opened(vmfs, root)
    assert (await vmfs.read(fh, 0, PAGE), net.reads) == (CONTENT[:PAGE], 1)  # from this node's disk
    await vmfs.release(fh)
    await vmfs.getattr(root)  # (the close goes with a call)
    vmfs.forget(ino & client_mod.MASK, 1)
    await vmfs.getattr(root)  # (the server hears that n2 forgot f: n2 is not told of n3's changes)
    assert "n2" not in net.server.interest.get(os.stat(f"{net.server.store.base}/root/f").st_ino, {})
    st = os.stat(f"{net.server.store.base}/root/f")
    await n3_writes(net.server, CONTENT[::-1])
    await n3(net.server, Call.setattr, path=b"f", setMask=SET_ATIME | SET_MTIME, atimeNs=st.st_atime_ns,
             mtimeNs=st.st_mtime_ns)
    ino, fh = await opened(vmfs, root)
    assert (await vmfs.read(fh, 0, PAGE), net.reads) == (CONTENT[::-1][:PAGE], 2)


async def test_a_forgotten_file_with_no_pages_kept_leaves_no_entry(n2):
    """What bounds the entries of files the kernel forgot: those without
    pages go (the others count in the cache's bytes and descriptors)."""
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root)
    await vmfs.release(fh)
    assert ino in cache.files
    vmfs.forget(ino & client_mod.MASK, 1)
    assert ino not in cache.files


async def test_a_create_that_opens_a_file_kept_here_checks_its_version(n2):
    """An O_CREAT open of a name the kernel still thought absent opens the
    file another node made: pages this node kept of it at another version
    go, even with the same size and mtime."""
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root)
    assert await vmfs.read(fh, 0, PAGE) == CONTENT[:PAGE]
    await vmfs.release(fh)
    await vmfs.getattr(root)
    vmfs.forget(ino & client_mod.MASK, 1)
    await vmfs.getattr(root)
    st = os.stat(f"{net.server.store.base}/root/f")
    await n3_writes(net.server, CONTENT[::-1])
    await n3(net.server, Call.setattr, path=b"f", setMask=SET_ATIME | SET_MTIME, atimeNs=st.st_atime_ns,
             mtimeNs=st.st_mtime_ns)
    info, _ = await vmfs.create(root, b"f", 0o100644, os.O_RDWR | os.O_CREAT, None)
    assert await vmfs.read(info.fh, 0, PAGE) == CONTENT[::-1][:PAGE]


async def _cached(cache: DataCache, key: int, pages: int) -> None:
    cache.opened(key, cache.opening(key), pages * PAGE, 0, 0)
    write = cache.fill(key, cache.entry(key), 0, pages * PAGE, bytes([key]) * pages * PAGE)
    if write is not None:
        await cache.write_pages(*write)


async def test_the_cache_keeps_to_its_limit_dropping_the_least_used_file(tmp_path):
    cache = DataCache(str(tmp_path / "cache"), 7 * PAGE)
    try:
        await _cached(cache, 1, 3)
        await _cached(cache, 2, 3)
        assert cache.read(1, 0, PAGE) == b"\1" * PAGE  # 1 is now the one used last
        await _cached(cache, 3, 3)
        assert cache.read(2, 0, PAGE) is None           # dropped to make room for 3
        assert cache.read(1, 0, 3 * PAGE) == b"\1" * 3 * PAGE
        assert cache.read(3, 0, 3 * PAGE) == b"\3" * 3 * PAGE
        assert cache.held <= 7 * PAGE
        await _cached(cache, 4, 9)                              # larger than the whole cache
        assert cache.read(4, 0, PAGE) is None and cache.held <= 7 * PAGE
    finally:
        cache.close()


def _open_in(directory) -> list[str]:
    """This process's descriptors of files in directory."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory)):
                found.append(fd)
        except FileNotFoundError:
            pass  # (the listing's own descriptor, closed since)
    return found


async def test_the_cache_keeps_few_files_open(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "MAX_OPEN", 2)
    cache = DataCache(str(tmp_path / "cache"), 1 << 20)
    try:
        for key in (1, 2, 3):
            await _cached(cache, key, 1)
        assert cache.open == len(_open_in(tmp_path / "cache")) == 2
        assert cache.read(1, 0, PAGE) is None and cache.read(3, 0, PAGE) == b"\3" * PAGE
    finally:
        cache.close()
    assert cache.open == len(_open_in(tmp_path / "cache")) == 0


async def test_an_open_answered_after_the_file_changed_keeps_nothing(n2):
    """The open's reply says the file's old size; a change told while it
    was on its way must not leave an entry of that size behind (a read
    past it would end the file early)."""
    vmfs, net, cache, root = n2
    ino = (await vmfs.lookup(root, b"f")).st_ino
    longer = CONTENT + b"more" * 1000
    net.open_hold = trio.Event()
    got = []
    async with trio.open_nursery() as nursery:
        async def open_():
            got.append((await vmfs.open(ino, os.O_RDONLY, None)).fh)
        nursery.start_soon(open_)
        await trio.testing.wait_all_tasks_blocked()
        hold, net.open_hold = net.open_hold, None
        await n3_writes(vmfs.fabric.server, longer)  # n2 is told (its open made it a cacher)
        hold.set()
    assert await vmfs.read(got[0], len(CONTENT), PAGE) == longer[len(CONTENT):len(CONTENT) + PAGE]


async def test_an_open_here_that_truncates_drops_the_pages(n2):
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root)
    await vmfs.read(fh, 0, PAGE)
    await vmfs.open(ino, os.O_WRONLY | os.O_TRUNC, None)
    assert await vmfs.read(fh, 0, PAGE) == b""


async def test_a_cache_that_cannot_write_its_disk_leaves_reads_to_the_server(n2, tmp_path):
    vmfs, net, cache, root = n2
    (tmp_path / "not-a-dir").write_bytes(b"")
    cache.directory = str(tmp_path / "not-a-dir")
    _, fh = await opened(vmfs, root)
    assert await vmfs.read(fh, 0, PAGE) == CONTENT[:PAGE]
    assert await vmfs.read(fh, 0, PAGE) == CONTENT[:PAGE]
    assert net.reads == 2 and cache.broken


async def answered_after(net: Net, ctype, call, change, told: bool = True):
    """What call returns when its reply, of type ctype, is made by the
    server but overtaken by change (n3's, of which the server tells n2; or,
    told false, n2's own)."""
    net.reply_holds[ctype] = hold = trio.Event()
    got = []
    async with trio.open_nursery() as nursery:
        async def call_():
            got.append(await call)
        nursery.start_soon(call_)
        await trio.testing.wait_all_tasks_blocked()
        del net.reply_holds[ctype]
        before = net.vmfs.told
        await change
        assert (net.vmfs.told > before) == told  # (n2 was told of it, or not)
        hold.set()
    return got[0]


async def test_an_absence_told_while_its_lookup_was_answered_is_not_kept(n2):
    """The server tells n2 of n3's create of g (on another connection) before
    n2's kernel has the reply that said g is absent: were the kernel to keep
    that, a process on n2 waiting for g would not see it for seconds."""
    vmfs, net, cache, root = n2
    entry = await answered_after(net, Call.lookup, vmfs.lookup(root, b"g"),
                                 n3(net.server, Call.mknod, path=b"g", mode=0o100644))
    assert entry.st_ino == 0 and entry.entry_timeout == 0
    assert (await vmfs.lookup(root, b"g")).st_ino != 0
    assert (await vmfs.lookup(root, b"h")).entry_timeout > 0  # (absences told of nothing are kept)


async def test_a_name_told_gone_while_its_lookup_was_answered_is_not_kept(n2):
    vmfs, net, cache, root = n2
    entry = await answered_after(net, Call.lookup, vmfs.lookup(root, b"f"), n3(net.server, Call.unlink, path=b"f"))
    assert entry.st_ino != 0 and entry.entry_timeout == entry.attr_timeout == 0
    assert (await vmfs.lookup(root, b"f")).st_ino == 0


async def test_attributes_told_changed_while_they_were_answered_are_not_kept(n2):
    vmfs, net, cache, root = n2
    ino = (await vmfs.lookup(root, b"f")).st_ino
    attr = await answered_after(net, Call.getattr, vmfs.getattr(ino),
                                n3(net.server, Call.setattr, path=b"f", setMask=1, mode=0o100600))
    assert attr.st_mode & 0o777 == 0o644 and attr.attr_timeout == 0
    attr = await vmfs.getattr(ino)
    assert attr.st_mode & 0o777 == 0o600 and attr.attr_timeout > 0


async def test_a_listing_hands_no_attributes_told_changed_since_it_was_read(n2, monkeypatch):
    """The kernel takes a listing's entries over several readdirs, from one
    snapshot: those it takes after a change was told are not to be kept."""
    vmfs, net, cache, root = n2
    await n3(net.server, Call.mknod, path=b"e", mode=0o100644)
    taken = []

    def reply(token: list, name, attr, next_id) -> bool:
        if name in (b".", b".."):
            return True
        if token:
            return False  # (the kernel's buffer holds one entry besides "." and "..")
        token.append(name)
        taken.append((name, attr.attr_timeout))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await vmfs.opendir(root, None)
    await vmfs.readdir(fh, 0, [])  # e is taken, f refused
    await n3(net.server, Call.setattr, path=b"f", setMask=1, mode=0o100600)
    await vmfs.readdir(fh, DOTS + 1, [])
    assert [(name, timeout > 0) for name, timeout in taken] == [(b"e", True), (b"f", False)]


async def test_a_file_made_here_and_told_gone_before_its_reply_is_not_kept(n2):
    vmfs, net, cache, root = n2
    info, entry = await answered_after(net, Call.create, vmfs.create(root, b"g", 0o100644, os.O_WRONLY, None),
                                       n3(net.server, Call.unlink, path=b"g"))
    assert entry.st_ino != 0 and entry.entry_timeout == entry.attr_timeout == 0
    assert (await vmfs.lookup(root, b"g")).st_ino == 0


async def test_names_n2_gave_absent_go_from_its_kernel_with_their_directory(n2, monkeypatch):
    """Told of n3's first name made in the root, n2 drops from its kernel
    every name it said was absent there, and is told of no more names made
    there until it looks again: h, which n2's kernel held absent, must not
    stay so when n3 makes it."""
    vmfs, net, cache, root = n2
    dropped = []
    monkeypatch.setattr(pyfuse3, "invalidate_entry_async", lambda dino, name, **k: dropped.append(name))
    for name in (b"g", b"h"):
        assert (await vmfs.lookup(root, name)).entry_timeout > 0  # (absent, the kernel keeps that)
    await n3(net.server, Call.mknod, path=b"g", mode=0o100644)
    assert sorted(dropped) == [b"g", b"h"]
    told = vmfs.told
    await n3(net.server, Call.mknod, path=b"h", mode=0o100644)
    assert vmfs.told == told
    assert (await vmfs.lookup(root, b"h")).st_ino != 0
    await n3(net.server, Call.unlink, path=b"h")  # (n2 holds h now)
    assert vmfs.told == told + 1 and dropped[-1] == b"h"


async def test_a_reply_overtaken_only_by_news_of_other_inodes_is_kept(n2):
    vmfs, net, cache, root = n2
    await n3(net.server, Call.mknod, path=b"e", mode=0o100644)
    await vmfs.lookup(root, b"e")  # (n2 caches e: it is told when e changes)
    entry = await answered_after(net, Call.lookup, vmfs.lookup(root, b"f"),
                                 n3(net.server, Call.setattr, path=b"e", setMask=1, mode=0o100600))
    assert entry.st_ino != 0 and entry.entry_timeout > 0 and entry.attr_timeout > 0


async def test_the_roots_attributes_told_changed_while_they_were_answered_are_not_kept(n2):
    vmfs, net, cache, root = n2
    attr = await answered_after(net, Call.getattr, vmfs.start(), n3(net.server, Call.mknod, path=b"g", mode=0o100644))
    assert attr.attr_timeout == 0


async def test_what_n2_was_told_is_remembered_only_while_a_reply_could_be_older(n2):
    vmfs, net, cache, root = n2
    ino = (await vmfs.lookup(root, b"f")).st_ino

    def told_of(*inodes: int) -> None:
        m = fs.Invalidations.new_message(vm="web")
        ins = m.init("inodes", len(inodes))
        for i, n in enumerate(inodes):
            ins[i] = n
        vmfs.invalidated(m)

    async def chmod_and_flood():
        await n3(net.server, Call.setattr, path=b"f", setMask=1, mode=0o100600)
        told_of(*range(10**6, 10**6 + 2000))  # (more than are kept when no call is in flight)
    attr = await answered_after(net, Call.getattr, vmfs.getattr(ino), chmod_and_flood())
    assert attr.attr_timeout == 0
    assert len(vmfs.told_of) > 2000  # (all of it was news to a call in flight)
    told_of(*range(10**7, 10**7 + 2100))  # (it is pruned again once it doubled)
    assert vmfs.told_of == {}


async def test_an_answer_by_a_path_another_node_renamed_meanwhile_is_not_kept(n2):
    """n2 asks for a/b/f; n3 renames a before the server resolves that path
    (and n2 is told first): the server's 'absent' is about a path that no
    longer names n2's b, and must not stand for b/f."""
    vmfs, net, cache, root = n2
    await n3(net.server, Call.mkdir, path=b"a", mode=0o755)
    await n3(net.server, Call.mkdir, path=b"a/b", mode=0o755)
    await n3(net.server, Call.mknod, path=b"a/b/f", mode=0o100644)
    a = (await vmfs.lookup(root, b"a")).st_ino
    b = (await vmfs.lookup(a, b"b")).st_ino
    net.request_holds[Call.lookup] = hold = trio.Event()
    got = []
    async with trio.open_nursery() as nursery:
        async def lookup():
            got.append(await vmfs.lookup(b, b"f"))
        nursery.start_soon(lookup)
        await trio.testing.wait_all_tasks_blocked()
        del net.request_holds[Call.lookup]
        await n3(net.server, Call.rename, path=b"a", path2=b"a2")
        hold.set()
    assert got[0].st_ino == 0 and got[0].entry_timeout == 0


def test_news_is_kept_for_the_oldest_reply_to_come_then_all_replies_are_taken_as_stale(monkeypatch):
    vmfs = VmFs("web", 1, None, spawn=lambda *task: None)
    listing = vmfs.listings[1] = client_mod.Listing(5)
    listing.told = 5  # (its reading began then; it is still under way)
    vmfs.unanswered = {100: 7}
    vmfs.told, vmfs.told_of = 8, {1: 6, 2: 4, 3: 8}
    vmfs._prune_told_of()
    assert vmfs.told_of == {1: 6, 3: 8} and vmfs._stale(5, 1) and not vmfs._stale(6, 1)
    monkeypatch.setattr(client_mod, "TOLD_OF_MAX", 1)
    vmfs._prune_told_of()  # (too many pinned: every reply on its way is stale instead)
    assert vmfs.told_of == {} and vmfs._stale(7, 2) and vmfs._stale(5, 1)


async def test_a_new_term_drops_the_names_n2_gave_absent(n2):
    """The new server never heard of them: it would not tell n2 when they appear."""
    vmfs, net, cache, root = n2
    spawned = []
    vmfs.spawn = lambda task, *args: spawned.append(args)
    assert (await vmfs.lookup(root, b"g")).entry_timeout > 0
    net.server.epoch = 2  # (as a fail-over would: the next reply is of a new term)
    await vmfs.getattr(root)
    (entries, inodes), = spawned
    assert (root, b"g") in entries and vmfs.absent == {}


def _chmod(mode: int):
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = mode
    fields = types.SimpleNamespace(update_mode=True, update_uid=False, update_gid=False, update_size=False,
                                   update_atime=False, update_mtime=False)  # (as pyfuse3.SetattrFields)
    return attr, fields


async def test_the_writers_node_answers_the_getattr_after_its_write_and_chmod(n2):
    """tar writes each file, then sets its times, owner and mode: the kernel
    asks for the attributes after every write and before a chown.  The
    node that made the change has them from its reply: no round trip."""
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root, os.O_WRONLY)
    await vmfs.write(fh, len(CONTENT), b"more")
    asked = net.calls[Call.getattr]
    a = await vmfs.getattr(ino)
    assert a.st_size == len(CONTENT) + 4 and net.calls[Call.getattr] == asked
    await vmfs.setattr(ino, *_chmod(0o600), fh, None)
    a = await vmfs.getattr(ino)
    assert a.st_mode & 0o777 == 0o600 and a.st_size == len(CONTENT) + 4 and net.calls[Call.getattr] == asked
    # Another node's change is told to n2 before it is answered: n2 asks again.
    await n3(net.server, Call.setattr, path=b"f", setMask=1, mode=0o640)
    a = await vmfs.getattr(ino)
    assert a.st_mode & 0o777 == 0o640 and net.calls[Call.getattr] == asked + 1


async def test_any_other_change_here_ends_what_n2_kept_of_a_file(n2):
    """A link changes the file's link count (its ctime too); as would a
    rename over it, a truncating open, an xattr: the next GETATTR asks."""
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root, os.O_WRONLY)
    await vmfs.write(fh, 0, b"abc")
    await vmfs.link(ino, root, b"g", None)
    a = await vmfs.getattr(ino)
    assert a.st_nlink == 2


async def test_a_write_answered_after_news_of_its_file_keeps_nothing(n2):
    """n3 changed the file while n2's write was on its way back: the write's
    attributes may be older than n3's change."""
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root, os.O_WRONLY)
    await answered_after(net, Call.write, vmfs.write(fh, 0, b"abc"),
                         n3(net.server, Call.setattr, path=b"f", setMask=1, mode=0o604))
    asked = net.calls[Call.getattr]
    a = await vmfs.getattr(ino)
    assert a.st_mode & 0o777 == 0o604 and net.calls[Call.getattr] == asked + 1


async def test_a_write_overtaken_by_another_change_here_keeps_nothing(n2):
    """n2 linked the file while its write was on its way back: the write's
    attributes (one link) are older than the link's."""
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root, os.O_WRONLY)
    await answered_after(net, Call.write, vmfs.write(fh, 0, b"abc"), vmfs.link(ino, root, b"g", None), told=False)
    assert (await vmfs.getattr(ino)).st_nlink == 2


async def _with_a_rename_over_f_on_its_way(net, change):
    """change() made by n2 while n3 renames g over f, its news to n2 held."""
    await n3(net.server, Call.mknod, path=b"g", mode=0o100644)
    net.told_hold = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: n3(net.server, Call.rename, path=b"g", path2=b"f"))
        await trio.testing.wait_all_tasks_blocked()
        await change()
        net.told_hold.set()


async def test_a_chmod_of_an_open_file_changes_that_file_whatever_its_name_holds_now(n2):
    """fchmod(2) names the open file, not a path: n3 renamed another file
    over its name, and n2 has not been told yet (the news is on its way)."""
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root, os.O_RDONLY)
    await _with_a_rename_over_f_on_its_way(net, lambda: vmfs.setattr(ino, *_chmod(0o600), None, None))
    assert (await n3(net.server, Call.getattr, path=b"f")).attr.mode & 0o777 == 0o644  # n3's file: untouched
    assert (await vmfs.getattr(ino)).st_mode & 0o777 == 0o600


async def test_an_xattr_set_on_an_open_file_goes_to_that_file_whatever_its_name_holds_now(n2):
    vmfs, net, cache, root = n2
    ino, fh = await opened(vmfs, root, os.O_RDONLY)
    await _with_a_rename_over_f_on_its_way(net, lambda: vmfs.setxattr(ino, b"user.k", b"v", None))
    assert await vmfs.listxattr(ino, None) == [b"user.k"]
    assert (await n3(net.server, Call.listxattr, path=b"f")).data == b""  # n3's file: none
