"""A VM file server on a real store, sent the messages other nodes send:
which nodes it tells of a change, and that it forgets files that are gone
(their inode numbers go to new files, which those nodes never cached)."""

import errno
import os
import time

import pytest
import trio
import trio.testing

from drvs.fs.server import WRITE_KILL_SUIDGID, Call, FsServer
from drvs.fs.store import Store
from drvs.ipc.message import IpcError, Later, Msg
from drvs.ipc.schema import from_flat, fs, new, to_flat


class Invalidations:
    """What a file server needs of the fabric: its invalidations, recorded
    (as a node that dropped what it was told to)."""

    def __init__(self):
        self.told: list[str] = []

    async def sendrec(self, target, msg, timeout=None, idempotent=False):
        self.told.append(target)
        return Msg(0)


async def call(server: FsServer, node: str, ctype, **fields):
    m = Msg(ctype, to_flat(new(fs.FsRequest, vm="web", **fields)))
    m.node = node
    reply = await server.handle(m)
    assert reply.status == 0, reply.error
    return from_flat(fs.FsReply, reply.payload)


def serving(tmp_path) -> tuple[FsServer, Invalidations]:
    fabric = Invalidations()
    server = FsServer("web", Store(str(tmp_path / "fs"), "web"), fabric, "n1")
    server.epoch = 1
    return server, fabric


async def test_a_removed_file_is_forgotten_once_its_cachers_were_told(tmp_path):
    server, fabric = serving(tmp_path)
    r = await call(server, "n2", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
    await call(server, "n2", Call.release, fh=r.fh)
    await call(server, "n1", Call.unlink, path=b"f")
    assert fabric.told == ["fsc@n2"]  # n2 cached f (and its directory)
    assert r.attr.ino not in server.interest
    # A file renamed over another: the one replaced is gone as well.
    for name in (b"a", b"b"):
        r = await call(server, "n2", Call.create, path=name, flags=os.O_WRONLY, mode=0o644)
        await call(server, "n2", Call.release, fh=r.fh)
    await call(server, "n1", Call.rename, path=b"a", path2=b"b")
    assert r.attr.ino not in server.interest


async def test_an_open_file_is_kept_until_its_last_close(tmp_path):
    """Unlinked while n2 has it open: n2 must still hear of writes to it."""
    server, fabric = serving(tmp_path)
    r = await call(server, "n2", Call.create, path=b"f", flags=os.O_RDWR, mode=0o644)
    await call(server, "n1", Call.unlink, path=b"f")
    assert set(server.interest[r.attr.ino]) == {"n2"}
    w = await call(server, "n3", Call.write, fh=r.fh, offset=0, data=b"x")
    assert w.shared  # n3's close tells n2
    await call(server, "n2", Call.release, fh=r.fh)
    assert r.attr.ino not in server.interest


def _kept_open(tmp_path, name: str) -> int:
    """How many descriptors of this process hold a removed object of that
    name in this test's store."""
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            held += target.startswith(f"{tmp_path}/") and target.endswith(f"/{name} (deleted)")
        except OSError:
            pass
    return held


async def test_a_removed_directory_a_node_holds_keeps_its_number_until_that_node_forgot_it(tmp_path):
    """ext4 gives a removed directory's inode number to the next directory
    made; a node whose kernel still holds the old one (a file open below
    it) would take the new one for it (its names in it, or the mkdir fails
    ESTALE).  So the server holds the old one until every node that may
    hold it said its kernel forgot it -- or left -- and no longer."""
    server, fabric = serving(tmp_path)
    await call(server, "n1", Call.mkdir, path=b"d", mode=0o755)
    d = (await call(server, "n2", Call.lookup, path=b"d")).attr.ino  # n1 made it, n2 looked it up
    await call(server, "n1", Call.rmdir, path=b"d")
    assert _kept_open(tmp_path, "d") == 1
    server.forgotten("n3", [d], [1 << 40])  # (a node that never held it)
    server.forgotten("n2", [d], [0])
    assert _kept_open(tmp_path, "d") == 1             # n1 may hold it still
    server.forgotten("n1", [d], [0])
    assert _kept_open(tmp_path, "d") == 0
    # Made by n2, looked up again by n2 (its call 10) after its kernel
    # forgot it (the notice's mark: 5): that notice does not count.
    await call(server, "n2", Call.mkdir, path=b"c", mode=0o755)
    c = (await call(server, "n2", Call.lookup, path=b"c", seq=10)).attr.ino
    await call(server, "n1", Call.rmdir, path=b"c")
    server.forgotten("n2", [c], [5])
    assert _kept_open(tmp_path, "c") == 1
    server.forgotten("n2", [c], [10])
    assert _kept_open(tmp_path, "c") == 0
    # Replaced by a rename, held by n2, which then fails to answer an
    # invalidation (its caches are dropped for it).
    for name in (b"a", b"b"):
        await call(server, "n2", Call.mkdir, path=name, mode=0o755)
    await call(server, "n1", Call.rename, path=b"a", path2=b"b")
    assert _kept_open(tmp_path, "b") == 1
    fabric.sendrec = _unanswered
    await call(server, "n1", Call.setattr, path=b"b", setMask=1, mode=0o700)  # (n2 holds what is b now)
    assert _kept_open(tmp_path, "b") == 0
    # Held when the server stops.
    fabric.sendrec = Invalidations().sendrec
    await call(server, "n2", Call.mkdir, path=b"e", mode=0o755)
    await call(server, "n1", Call.rmdir, path=b"e")
    assert _kept_open(tmp_path, "e") == 1
    server.close()
    assert _kept_open(tmp_path, "e") == 0


async def test_a_file_without_names_is_reached_by_a_handle_of_its_own_node_only(tmp_path):
    """(via) The node that holds it open reaches it; another node's call
    naming that handle is refused; a replica that never had the handle
    (copied after the unlink) takes such a call as done, not as a fault."""
    server, fabric = serving(tmp_path)
    r = await call(server, "n2", Call.create, path=b"f", flags=os.O_RDONLY, mode=0o644)
    await call(server, "n1", Call.unlink, path=b"f")
    w = await call(server, "n2", Call.open, via=r.fh, flags=os.O_WRONLY)
    await call(server, "n2", Call.write, fh=w.fh, offset=0, data=b"kept")
    await call(server, "n2", Call.setxattr, via=r.fh, name=b"user.k", data=b"v")
    assert (await call(server, "n2", Call.getxattr, via=r.fh, name=b"user.k")).data == b"v"
    m = message("n3", Call.open, via=r.fh, flags=os.O_RDONLY)
    assert (await server.handle(m)).status == -errno.ESTALE
    replica = FsServer("web", Store(str(tmp_path / "replica"), "web"), fabric, "n2")
    batch = fs.Batch.new_message(vm="web", epoch=1)
    calls = batch.init("calls", 1)
    calls[0].type, calls[0].request = Call.setxattr, to_flat(new(fs.FsRequest, vm="web", via=r.fh, name=b"user.k",
                                                                  data=b"v"))
    assert await replica.apply(batch) == [0]


async def _unanswered(target, msg, timeout=None, idempotent=False):
    raise IpcError("no answer", errno.ETIMEDOUT)


async def test_an_open_by_a_name_that_now_holds_another_file_is_stale_and_truncates_nothing(tmp_path):
    """The caller says which inode it means (of this term): another one
    under the name (replaced meanwhile) is ESTALE, before any O_TRUNC."""
    server, fabric = serving(tmp_path)
    old = await call(server, "n2", Call.create, path=b"cfg", flags=os.O_WRONLY, mode=0o644)
    await call(server, "n2", Call.release, fh=old.fh)
    new_ = await call(server, "n1", Call.create, path=b"cfg.new", flags=os.O_WRONLY, mode=0o644)
    await call(server, "n1", Call.write, fh=new_.fh, offset=0, data=b"new")
    await call(server, "n1", Call.release, fh=new_.fh)
    await call(server, "n1", Call.rename, path=b"cfg.new", path2=b"cfg")
    m = message("n2", Call.open, path=b"cfg", flags=os.O_WRONLY | os.O_TRUNC, ino=old.attr.ino, inoEpoch=1)
    assert (await server.handle(m)).status == -errno.ESTALE
    assert server.store.lstat(b"cfg").st_size == 3
    # Meant, it is truncated; a number of another term is not checked.
    for ino, epoch in ((new_.attr.ino, 1), (old.attr.ino, 7)):
        r = await call(server, "n2", Call.open, path=b"cfg", flags=os.O_WRONLY | os.O_TRUNC, ino=ino, inoEpoch=epoch)
        assert r.attr.size == 0
        await call(server, "n2", Call.release, fh=r.fh)


async def test_a_file_just_replaced_by_a_rename_is_still_opened_to_read_by_its_number(tmp_path):
    """n2 looked cfg up, then n1 renamed a new file over it, then n2's
    kernel opens what it looked up: it reads the old file, as on a local
    file system -- for a moment, and only to read."""
    server, fabric = serving(tmp_path)
    old = await call(server, "n2", Call.create, path=b"cfg", flags=os.O_WRONLY, mode=0o644)
    await call(server, "n2", Call.write, fh=old.fh, offset=0, data=b"old")
    await call(server, "n2", Call.release, fh=old.fh)
    new_ = await call(server, "n1", Call.create, path=b"cfg.new", flags=os.O_WRONLY, mode=0o644)
    await call(server, "n1", Call.release, fh=new_.fh)
    await call(server, "n1", Call.rename, path=b"cfg.new", path2=b"cfg")
    r = await call(server, "n2", Call.open, path=b"cfg", flags=os.O_RDONLY, ino=old.attr.ino, inoEpoch=1)
    assert (r.attr.ino, bytes((await call(server, "n2", Call.read, fh=r.fh, offset=0, size=10)).data)) == (
        old.attr.ino, b"old")
    await call(server, "n2", Call.release, fh=r.fh)
    m = message("n2", Call.open, path=b"cfg", flags=os.O_RDWR, ino=old.attr.ino, inoEpoch=1)
    assert (await server.handle(m)).status == -errno.ESTALE
    fd, _ = server.replaced[old.attr.ino]
    server.replaced[old.attr.ino] = (fd, 0.0)  # (its grace is over)
    m = message("n2", Call.open, path=b"cfg", flags=os.O_RDONLY, ino=old.attr.ino, inoEpoch=1)
    assert (await server.handle(m)).status == -errno.ESTALE
    assert not server.replaced  # (its descriptor closed)


async def test_the_newest_replaced_files_are_kept_openable_when_many_are(tmp_path, monkeypatch):
    """A file updated by rename many times a second: past REPLACED_MAX held
    at once, the oldest held goes, not the newest (which an open racing the
    renames is after)."""
    from drvs.fs import server as server_mod

    monkeypatch.setattr(server_mod, "REPLACED_MAX", 2)
    server, fabric = serving(tmp_path)
    versions = []
    for i in range(5):
        v = await call(server, "n2", Call.create, path=b"v%d" % i, flags=os.O_WRONLY, mode=0o644)
        await call(server, "n2", Call.write, fh=v.fh, offset=0, data=b"%d" % i)
        await call(server, "n2", Call.release, fh=v.fh)
        await call(server, "n1", Call.rename, path=b"v%d" % i, path2=b"cfg")
        versions.append(v.attr.ino)
    assert len(server.replaced) == 2
    for i in (2, 3):  # the last two replaced (4 is cfg now)
        r = await call(server, "n2", Call.open, path=b"cfg", flags=os.O_RDONLY, ino=versions[i], inoEpoch=1)
        assert bytes((await call(server, "n2", Call.read, fh=r.fh, offset=0, size=10)).data) == b"%d" % i
        await call(server, "n2", Call.release, fh=r.fh)
    m = message("n2", Call.open, path=b"cfg", flags=os.O_RDONLY, ino=versions[1], inoEpoch=1)
    assert (await server.handle(m)).status == -errno.ESTALE


def message(node: str, ctype, **fields) -> Msg:
    m = Msg(ctype, to_flat(new(fs.FsRequest, vm="web", **fields)))
    m.node = node
    return m


async def test_changes_are_made_as_they_arrive_and_wait_only_to_tell_others(tmp_path):
    """The fabric's fast path: a change nobody else caches is answered at
    once; one that n2 caches is made at once, and its reply waits until
    n2 was told (a Later)."""
    server, fabric = serving(tmp_path)
    r = await call(server, "n1", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
    reply = server.fast(message("n1", Call.setattr, path=b"f", setMask=1, mode=0o600))
    assert isinstance(reply, Msg) and reply.status == 0
    assert from_flat(fs.FsReply, reply.payload).attr.mode & 0o777 == 0o600
    assert fabric.told == []

    await call(server, "n2", Call.lookup, path=b"f")  # n2 caches f now
    later = server.fast(message("n1", Call.setattr, path=b"f", setMask=1, mode=0o640))
    assert isinstance(later, Later)
    assert server.store.lstat(b"f").st_mode & 0o777 == 0o640  # made before n2 is told
    assert fabric.told == []
    reply = await later.finish()
    assert reply.status == 0 and fabric.told == ["fsc@n2"]

    failed = server.fast(message("n1", Call.unlink, path=b"nothing"))
    assert failed.status == -errno.ENOENT
    assert server.fast(message("n1", Call.fsync, fh=r.fh)) is None  # waits on the disk: in trio


async def test_closes_carried_by_a_call_are_made_on_the_fast_path(tmp_path):
    server, _ = serving(tmp_path)
    r = await call(server, "n2", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
    assert r.fh in server.files
    reply = server.fast(message("n2", Call.mkdir, path=b"d", mode=0o755, closed=[r.fh]))
    assert reply.status == 0
    assert r.fh not in server.files


async def test_changes_wait_in_trio_while_changes_are_held(tmp_path):
    """(A replica being copied must hear of every change made after its
    copy began, closes carried by a read included.)"""
    server, _ = serving(tmp_path)
    r = await call(server, "n2", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
    server.held = trio.Event()
    assert server.fast(message("n1", Call.mkdir, path=b"d", mode=0o755)) is None
    assert isinstance(server.fast(message("n1", Call.getattr, path=b"")), Msg)  # reads still go
    assert server.fast(message("n2", Call.getattr, path=b"", closed=[r.fh])) is None
    assert r.fh in server.files


@pytest.mark.parametrize("cut", [0, 7, 8, 40, -8])
async def test_a_request_not_whole_is_refused_as_malformed(tmp_path, cut):
    """Requests travel unpacked (to_flat): a frame shorter or longer than
    its segment table says is refused, never read past its end."""
    server, _ = serving(tmp_path)
    whole = to_flat(new(fs.FsRequest, vm="web", path=b"f", data=b"x" * 100))
    data = whole[:cut] if cut >= 0 else whole + b"\0" * -cut
    with pytest.raises(IpcError) as e:
        server.fast(Msg(Call.getattr, data))
    assert e.value.errno == errno.EBADMSG
    assert from_flat(fs.FsRequest, whole).data == b"x" * 100


async def test_a_change_made_is_told_even_if_its_caller_gives_up(tmp_path):
    """The change is made before the others are told: a caller that gives
    up (a timeout, a cancelled call) must not leave them caching the old."""

    class Slow(Invalidations):
        async def sendrec(self, target, msg, timeout=None, idempotent=False):
            await trio.sleep(0.01)
            return await super().sendrec(target, msg, timeout, idempotent)

    server = FsServer("web", Store(str(tmp_path / "fs"), "web"), Slow(), "n1")
    server.epoch = 1
    try:
        await call(server, "n1", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
        await call(server, "n2", Call.lookup, path=b"f")
        later = server.fast(message("n1", Call.setattr, path=b"f", setMask=1, mode=0o600))
        with trio.move_on_after(0.001):
            await later.finish()
        assert server.fabric.told == ["fsc@n2"]
    finally:
        server.close()


async def absent(server: FsServer, node: str, path: bytes, seq: int = 0) -> None:
    m = Msg(Call.lookup, to_flat(new(fs.FsRequest, vm="web", path=path, seq=seq)))
    m.node = node
    assert (await server.handle(m)).status == -errno.ENOENT


async def test_a_node_that_looked_into_a_directory_is_told_of_the_first_name_made_there(tmp_path):
    """n2 listed the directory (it knows every other name absent): n1's
    first create there tells n2, which forgets all it knew absent there;
    so n1's next creates tell nobody -- until n2 looks again, in any way
    that shows it absent names or the directory's attributes."""
    server, fabric = serving(tmp_path)
    await call(server, "n1", Call.mkdir, path=b"d", mode=0o755)
    await call(server, "n2", Call.readdir, path=b"d")
    for name in (b"d/a", b"d/b", b"d/c"):
        await call(server, "n1", Call.mknod, path=name, mode=0o100644)
    assert fabric.told == ["fsc@n2"]
    for told, (looks, made) in enumerate( [(lambda: absent(server, "n2", b"d/x"), b"d/x"),
                        (lambda: call(server, "n2", Call.getattr, path=b"d"), b"d/y"),
                        (lambda: call(server, "n2", Call.lookup, path=b"d"), b"d/z"),
                        (lambda: call(server, "n2", Call.readdir, path=b""), b"d/w"),
                        (lambda: call(server, "n2", Call.setattr, path=b"d", setMask=1, mode=0o750), b"d/v")], 2):
        await looks()
        await call(server, "n1", Call.mknod, path=made, mode=0o100644)
        await call(server, "n1", Call.mknod, path=made + b"2", mode=0o100644)
        assert fabric.told.count("fsc@n2") == told, made


async def test_a_node_holding_a_name_is_told_when_it_goes_though_not_of_names_made(tmp_path):
    server, fabric = serving(tmp_path)
    await call(server, "n1", Call.mkdir, path=b"d", mode=0o755)
    await call(server, "n1", Call.mknod, path=b"d/a", mode=0o100644)
    await call(server, "n1", Call.mknod, path=b"d/b", mode=0o100644)
    await call(server, "n2", Call.lookup, path=b"d/a")  # found: n2 knows no name absent
    await call(server, "n1", Call.mknod, path=b"d/c", mode=0o100644)
    assert fabric.told == []
    await call(server, "n1", Call.unlink, path=b"d/b")
    await call(server, "n1", Call.rename, path=b"d/c", path2=b"d/e")
    assert fabric.told == ["fsc@n2"] * 2  # (n2 may hold them: it looked into d)


async def test_a_node_that_looks_again_while_it_is_told_stays_told(tmp_path):
    """Its look may have been answered after the change: it is told again."""
    hold = trio.Event()

    class Held(Invalidations):
        async def sendrec(self, target, msg, timeout=None, idempotent=False):
            await hold.wait()
            return await super().sendrec(target, msg, timeout, idempotent)

    server = FsServer("web", Store(str(tmp_path / "fs"), "web"), Held(), "n1")
    server.epoch = 1
    try:
        await absent(server, "n2", b"a", seq=1)  # (a node numbers its calls)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: call(server, "n1", Call.mknod, path=b"a", mode=0o100644))
            await trio.testing.wait_all_tasks_blocked()
            await absent(server, "n2", b"b", seq=2)
            hold.set()
        await call(server, "n1", Call.mknod, path=b"b", mode=0o100644)
        assert server.fabric.told == ["fsc@n2"] * 2
    finally:
        server.close()


async def test_a_create_that_opens_a_file_another_node_made_tells_only_if_it_truncates(tmp_path):
    server, fabric = serving(tmp_path)
    await call(server, "n1", Call.mknod, path=b"f", mode=0o100644)
    await call(server, "n2", Call.lookup, path=b"f")  # (n2 may cache f's pages)
    r = await call(server, "n1", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
    assert fabric.told == []
    await call(server, "n1", Call.release, fh=r.fh)
    await call(server, "n1", Call.create, path=b"f", flags=os.O_WRONLY | os.O_TRUNC, mode=0o644)
    assert fabric.told == ["fsc@n2"]


@pytest.mark.parametrize("mode, left", [(0o6775, 0o775), (0o4755, 0o755), (0o2745, 0o2745), (0o755, 0o755)])
async def test_a_write_asked_to_drops_set_id_bits_as_linux_does(tmp_path, mode, left):
    """As Linux for a writer in the file's group (a setgid without group
    execute is then kept); the writer's node is told too (its kernel
    would keep the bits it cached)."""
    server, fabric = serving(tmp_path)
    r = await call(server, "n1", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
    await call(server, "n2", Call.lookup, path=b"f")
    os.chmod(server.store.base + "/root/f", mode)
    await call(server, "n1", Call.write, fh=r.fh, offset=0, data=b"x")
    assert server.store.lstat(b"f").st_mode & 0o7777 == mode and fabric.told == []
    await call(server, "n1", Call.write, fh=r.fh, offset=1, data=b"y", flags=WRITE_KILL_SUIDGID)
    assert server.store.lstat(b"f").st_mode & 0o7777 == left
    assert sorted(fabric.told) == ([] if left == mode else ["fsc@n1", "fsc@n2"])  # (n2 caches its mode)


async def test_a_call_naming_a_directory_by_its_handle_is_made_where_it_is_now(tmp_path):
    """A node that lost a directory's path (another node moved it) names it
    by the file handle a lookup gave: the call is made where the directory
    is now, and queued for the replicas by that path (their handles are
    their own stores'); a handle of another term is refused (ESTALE)."""
    from drvs.fs.replica import Mirror

    server, _ = serving(tmp_path)
    mirror = server.mirrors["n3"] = Mirror(server, "n3")
    mirror.live = True
    root = tmp_path / "fs" / "root"
    await call(server, "n2", Call.mkdir, path=b"proj", mode=0o755)
    await call(server, "n2", Call.mkdir, path=b"deep", mode=0o755)
    handle = bytes((await call(server, "n2", Call.lookup, path=b"proj")).attr.handle)
    assert handle and not (await call(server, "n2", Call.lookup, path=b"deep")).attr.handle == handle
    await call(server, "n1", Call.rename, path=b"proj", path2=b"deep/moved")
    await call(server, "n2", Call.mknod, at=handle, atEpoch=1, path=b"f", mode=0o100644)
    await call(server, "n2", Call.rename, at=handle, atEpoch=1, path=b"f", at2=handle, path2=b"g")
    assert sorted(os.listdir(root / "deep" / "moved")) == ["g"]
    queued = [from_flat(fs.FsRequest, p) for _, p, _ in mirror.calls][-2:]
    assert [(bytes(q.path), bytes(q.path2), bytes(q.at), bytes(q.at2)) for q in queued] == [
        (b"deep/moved/f", b"", b"", b""), (b"deep/moved/f", b"deep/moved/g", b"", b"")]
    m = Msg(Call.mknod, to_flat(new(fs.FsRequest, vm="web", at=handle, atEpoch=2, path=b"h", mode=0o100644)))
    m.node = "n2"
    assert (await server.handle(m)).status == -errno.ESTALE
    assert sorted(os.listdir(root / "deep" / "moved")) == ["g"]


class WithReplica(Invalidations):
    """Invalidations, and a replica on n3 that takes batches (the call
    types of each, recorded; delay: seconds each takes) or is out of reach."""

    def __init__(self, up: bool, delay: float = 0):
        super().__init__()
        self.up, self.batches, self.delay = up, [], delay

    async def sendrec(self, target, msg, timeout=None, idempotent=False):
        if target != "fsr@n3":
            return await super().sendrec(target, msg, timeout, idempotent)
        if not self.up:
            raise IpcError("fsr@n3: no route to host", errno.EHOSTUNREACH)
        await trio.sleep(self.delay)
        batch = from_flat(fs.Batch, msg.payload)
        calls = batch.calls
        self.batches.append("handed" if batch.handed else [c.type for c in calls])
        return Msg(0, to_flat(new(fs.BatchReply, statuses=[0] * len(calls))))


@pytest.mark.parametrize("up", [True, False])
async def test_a_server_that_stops_sends_its_replica_what_it_queued_and_serves_no_more(tmp_path, up):
    """A node shut down cleanly: its server sends the replica, which stays
    in sync to take over, the changes still queued for it; an fsync
    waiting for them succeeds only if they got there, and a change made
    after (by a call already under way) fails the fsync that waits for it."""
    from drvs.fs.replica import Mirror

    server, _ = serving(tmp_path)
    fabric = server.fabric = WithReplica(up)
    mirror = server.mirrors["n3"] = Mirror(server, "n3")
    mirror.live = True
    r = await call(server, "n2", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
    await call(server, "n2", Call.write, fh=r.fh, offset=0, data=b"x")
    statuses = []

    async def fsync():
        m = Msg(Call.fsync, to_flat(new(fs.FsRequest, vm="web", fh=r.fh)))
        m.node = "n2"
        statuses.append((await server.handle(m)).status)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fsync)
        while mirror.pushed < 3:  # (the file's fsync made here, in a thread, and queued)
            await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()
        assert statuses == []  # (it waits for the replica)
        await mirror._hand_over()
        mirror._stop()
    assert statuses == ([0] if up else [-errno.EIO])
    # (then, the fsync under way done and nothing made after, the replica hears it has it all)
    assert fabric.batches == ([[Call.create, Call.write, Call.fsync], "handed"] if up else [])
    m = Msg(Call.mkdir, to_flat(new(fs.FsRequest, vm="web", path=b"d", mode=0o755)))
    with pytest.raises(IpcError) as e:
        await server.handle(m)
    assert e.value.errno == errno.EREMCHG
    # An fsync still under way: nothing to wait for if the replica got all
    # (this disk has it too); if the hand-over failed, it fails.
    if up:
        await mirror.wait(mirror.push(Call.fsync, b""))
    else:
        with pytest.raises(OSError):
            await mirror.wait(mirror.push(Call.fsync, b""))
    with pytest.raises(OSError):
        await mirror.wait(mirror.push(Call.mkdir, b""))


@pytest.mark.parametrize("after", ["nothing", "fsync", "release", "mkdir"])
async def test_a_clean_stop_vouches_only_if_no_call_under_way_made_a_change_the_replica_lacks(tmp_path, after):
    """The replica hears it has all (Batch.handed) once the calls under way
    at the stop are done, unless one of them made a change after the
    queue went (an fsync or a close is no change of data)."""
    from drvs.fs.replica import Mirror

    server, _ = serving(tmp_path)
    fabric = server.fabric = WithReplica(True)
    mirror = server.mirrors["n3"] = Mirror(server, "n3")
    mirror.live = True
    server.serving += 1  # (a call under way at the stop)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mirror._hand_over)
        await trio.testing.wait_all_tasks_blocked()  # (the queue sent: it waits for the call)
        assert fabric.batches == []
        if after != "nothing":
            mirror.push(getattr(Call, after), b"")
        server.serving -= 1
    assert fabric.batches == ([] if after == "mkdir" else ["handed"])


async def test_a_replica_stream_kept_busy_by_writers_still_stops(tmp_path):
    """Batches go out shielded (one cut short might be made there or not),
    and a queue someone waits for gathers nothing: the stop must still
    land between batches while writers keep the queue full."""
    from drvs.fs.replica import Mirror

    server, _ = serving(tmp_path)
    server.fabric = WithReplica(True, delay=0.005)
    mirror = server.mirrors["n3"] = Mirror(server, "n3")
    mirror.live, mirror.waiting = True, 1  # (an fsync waits)
    payload = to_flat(new(fs.FsRequest, vm="web", path=b"d", mode=0o755))

    async def writers():
        while True:
            mirror.push(Call.mkdir, payload)
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writers)
        with trio.fail_after(5):
            with trio.move_on_after(0.2):  # (the server stops)
                await mirror.stream()
        nursery.cancel_scope.cancel()


async def test_a_replica_that_could_not_be_struck_fails_every_fsync_after(tmp_path):
    """A replica whose stream failed, and that etcd could not be told of,
    is still listed in sync (it may take over): an fsync made later must
    not succeed without it."""
    from drvs.fs.replica import Mirror

    server, _ = serving(tmp_path)
    mirror = server.mirrors["n3"] = Mirror(server, "n3")
    mirror.lost = True  # (live False: its stream ended, the strike failed)
    r = await call(server, "n2", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
    m = Msg(Call.fsync, to_flat(new(fs.FsRequest, vm="web", fh=r.fh)))
    m.node = "n2"
    assert (await server.handle(m)).status == -errno.EIO


async def test_an_opens_data_version_is_the_same_only_if_the_data_did_not_change(tmp_path, monkeypatch):
    """What a node keeps of a file its kernel forgot serves an open of the
    same version (drvs/fs/cache.py): every change of the file's data makes
    another; one that is not a change of data does not; a file whose
    version the server no longer keeps apart gets one no earlier open saw
    unless nothing changed it since."""
    from drvs.fs import server as server_mod

    monkeypatch.setattr(server_mod, "VERSIONS_MAX", 3)
    server, _ = serving(tmp_path)

    async def version(**flags) -> int:
        r = await call(server, "n2", Call.open, path=b"f", flags=flags.get("flags", os.O_RDONLY))
        await call(server, "n2", Call.release, fh=r.fh)
        return r.version

    r = await call(server, "n3", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
    await call(server, "n3", Call.release, fh=r.fh)
    seen = [await version()]
    assert await version() == seen[-1]
    await call(server, "n3", Call.setattr, path=b"f", setMask=1, mode=0o600)  # not its data
    assert await version() == seen[-1]
    w = await call(server, "n3", Call.open, path=b"f", flags=os.O_WRONLY)
    await call(server, "n3", Call.write, fh=w.fh, offset=0, data=b"x")
    seen.append(await version())  # (written, not yet closed: another version already)
    await call(server, "n3", Call.release, fh=w.fh)
    await call(server, "n3", Call.setattr, path=b"f", setMask=8, size=0)
    seen.append(await version())
    seen.append(await version(flags=os.O_WRONLY | os.O_TRUNC))  # (the truncation it made counts)
    assert len(set(seen)) == len(seen) and await version() == seen[-1]
    # Three other files made push f's version out of the table: f keeps it
    # (the floor is f's own last change); the next file made raises the
    # floor past it (a version no open of f saw: its pages go, safely);
    # a change of f then gives it one of its own again.
    async def make(name: bytes) -> None:
        r = await call(server, "n3", Call.create, path=name, flags=os.O_WRONLY, mode=0o644)
        await call(server, "n3", Call.release, fh=r.fh)

    for name in (b"a", b"b", b"c"):
        await make(name)
    assert await version() == seen[-1]
    await make(b"d")
    seen.append(await version())
    assert seen[-1] > max(seen[:-1])
    await call(server, "n3", Call.setattr, path=b"f", setMask=8, size=1)
    assert await version() > max(seen)


async def test_a_number_the_store_gives_a_new_file_again_comes_with_another_generation(tmp_path):
    """Replies that name an object to a node's kernel say which object has
    its number (FUSE's generation): the same for the same object in every
    such reply (create, lookup, link, listing), another once the store
    gives a removed file's number to a new one -- a kernel still holding
    the removed one then makes a new inode instead of reusing it."""
    server, _ = serving(tmp_path)
    r = await call(server, "n2", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)
    await call(server, "n2", Call.release, fh=r.fh)
    ino, gen = r.attr.ino, r.attr.gen
    assert gen
    assert (await call(server, "n2", Call.lookup, path=b"f")).attr.gen == gen
    link = await call(server, "n2", Call.link, path=b"f", path2=b"g")
    assert (link.attr.ino, link.attr.gen) == (ino, gen)
    made = await call(server, "n2", Call.mkdir, path=b"d", mode=0o755)
    assert made.attr.gen not in (0, gen)
    listing = await call(server, "n2", Call.readdir, path=b"")
    assert {bytes(e.name): e.attr.gen for e in listing.entries} == {b"f": gen, b"g": gen, b"d": made.attr.gen}
    for name in (b"f", b"g"):
        await call(server, "n1", Call.unlink, path=name)
    for i in range(50):  # (ext4 gives a freed number out again at once)
        r = await call(server, "n2", Call.create, path=b"n%d" % i, flags=os.O_WRONLY, mode=0o644)
        await call(server, "n2", Call.release, fh=r.fh)
        if r.attr.ino == ino:
            break
    else:
        pytest.skip("the store's file system does not give a freed number out again at once (not ext4?)")
    assert r.attr.gen not in (0, gen)
    assert (await call(server, "n2", Call.lookup, path=b"n%d" % i)).attr.gen == r.attr.gen


async def test_a_replica_of_a_vm_made_again_survives_the_late_removal_of_the_old_one(tmp_path):
    """A VM removed and made again under its name can be served, and
    mirrored to a replica node, before that node's look at the VM list
    (every second) saw the old VM go: the old replica goes as the new
    definition's first batch comes, and the late removal of the old
    definition leaves the new one's files."""
    from types import SimpleNamespace

    from drvs.config import Config
    from drvs.fs.service import FsNode

    etcd = FakeEtcd({"web": 10})
    node = FsNode(Config(str(tmp_path)), etcd, Invalidations(), SimpleNamespace(name="n2"))
    base = tmp_path / "vms" / "web" / "fs"

    async def mirror(made: int, name: bytes) -> Msg:
        batch = fs.Batch.new_message(vm="web", epoch=1, made=made)
        calls = batch.init("calls", 1)
        calls[0].type, calls[0].request = Call.mkdir, to_flat(new(fs.FsRequest, vm="web", path=name, mode=0o755))
        return await node.mirror(Msg(Call.mirror, to_flat(batch)))

    async def mirrored(made: int, name: bytes) -> None:
        assert list(from_flat(fs.BatchReply, (await mirror(made, name)).payload).statuses) == [0]

    await mirrored(10, b"old")            # the first definition, made at revision 10
    etcd.vms = {"web": 20}
    await mirrored(20, b"new")            # made again at 20: its server's first batch
    assert os.listdir(base / "root") == ["new"]
    await node.remove("web", 10)          # this node's look at the VM list, late
    assert os.listdir(base / "root") == ["new"]
    with pytest.raises(IpcError) as e:    # the old definition's server, still sending
        await mirror(10, b"late")
    assert e.value.errno == errno.ESTALE and os.listdir(base / "root") == ["new"]
    await node.remove("web", 20)
    assert not base.exists()
    with pytest.raises(IpcError) as e:    # a batch of the removed definition, late: no store made again
        await mirror(20, b"late")
    assert e.value.errno == errno.ESTALE and not base.exists()
    etcd.vms = {"web": 30}
    await mirrored(30, b"third")          # made once more
    assert os.listdir(base / "root") == ["third"]
    # a node that restarted remembers no removal: etcd says which definitions are
    node = FsNode(Config(str(tmp_path)), etcd, Invalidations(), SimpleNamespace(name="n2"))
    etcd.vms = {}
    with pytest.raises(IpcError) as e:    # the definition of 30 was removed while the node was down
        await mirror(30, b"late")
    assert e.value.errno == errno.ESTALE  # (its store here is the sweep's)
    (tmp_path / "vms" / "db" / "fs").mkdir(parents=True)   # a store of a VM etcd never had
    etcd.vms = {"other": 5}
    await node.sweep()
    assert not base.exists() and not (tmp_path / "vms" / "db" / "fs").exists()


class FakeEtcd:
    """The VM definitions (name -> create revision) a node's etcd client sees."""

    def __init__(self, vms: dict):
        self.vms = vms

    def _entry(self, name: str):
        from drvs.store import Entry
        from drvs.vm.model import VmSpec

        return Entry(f"/drvs/vms/{name}", VmSpec(name).to_json(), self.vms[name], self.vms[name])

    async def get(self, key: str):
        name = key.rpartition("/")[2]
        return self._entry(name) if name in self.vms else None

    async def range(self, prefix: str):
        return [self._entry(name) for name in sorted(self.vms)]


async def test_a_server_whose_term_is_over_stands_down_with_a_plain_error(tmp_path, monkeypatch):
    """run() ends with a DrvsError the campaign catches (drvs/dvos/elected.py),
    not one wrapped in an exception group, which went on to end drvmmd."""
    from drvs.errors import DrvsError
    from drvs.fs import replica
    from drvs.fs import server as server_module

    server, _ = serving(tmp_path)
    monkeypatch.setattr(server_module, "REAP_EVERY", 0.01)

    async def gone(etcd, vm):  # the VM was removed: its file system has no state
        return None, 0

    monkeypatch.setattr(replica, "read_state", gone)
    with pytest.raises(DrvsError) as e:
        await server.run()
    assert "term 1 is over" in str(e.value)


async def test_a_listing_in_batches_reads_the_directory_once_and_lets_go_at_its_end(tmp_path):
    """The names read for a node's first batch serve its next ones (a
    directory read whole per batch made listings quadratic); a name removed
    meanwhile is skipped; the finished listing is not kept."""
    from drvs.fs.server import READDIR_BATCH

    server, _ = serving(tmp_path)
    await call(server, "n2", Call.mkdir, path=b"d", mode=0o755)
    names = [f"f{i:05d}".encode() for i in range(READDIR_BATCH + 100)]
    for name in names:
        await call(server, "n2", Call.mknod, path=b"d/" + name, mode=0o100644)
    first = await call(server, "n2", Call.readdir, path=b"d")
    got = [bytes(e.name) for e in first.entries]
    assert first.more and len(got) == READDIR_BATCH and len(server.listings) == 1
    await call(server, "n1", Call.unlink, path=b"d/" + names[-1])   # removed between two batches
    rest = await call(server, "n2", Call.readdir, path=b"d", data=got[-1])
    got += [bytes(e.name) for e in rest.entries]
    assert not rest.more and got == names[:-1]
    assert server.listings == {}


async def test_a_new_terms_server_takes_back_locks_first_and_refuses_one_taken_meanwhile(tmp_path, autojump_clock):
    """After a term before, lock calls other than reclaims wait out the
    grace (a blocking one in its slices: EAGAIN, asked again); a reclaim
    is granted at once, and refused (ENOLCK) once another owner has it."""
    from drvs.fs.locks import RECLAIM_GRACE, WR

    async def status(node, **fields):
        m = Msg(Call.lock, to_flat(new(fs.FsRequest, vm="web", lockOwner=f"{node}:posix:8", **lock, **fields)))
        m.node = node
        return (await server.handle(m)).status

    server, _ = serving(tmp_path)
    await call(server, "n2", Call.mkdir, path=b"d", mode=0o755)
    server.promote(2, ["n1"])
    lock = dict(path=b"d", lockType=WR, lockStart=0, lockEnd=-1)
    t0 = trio.current_time()
    await call(server, "n2", Call.lock, lockOwner="n2:posix:7", lockReclaim=True, **lock)
    assert trio.current_time() == t0  # (at once)
    assert await status("n3", lockWaitMs=100) == -errno.EAGAIN  # a slice of a blocking wait, in the grace
    assert trio.current_time() - t0 == pytest.approx(0.1)
    test = await call(server, "n3", Call.lock, lockOwner="n3:posix:8", lockTest=True, **lock)  # waits it out
    assert trio.current_time() - t0 == pytest.approx(RECLAIM_GRACE) and test.lockType == WR
    assert await status("n3", lockReclaim=True) == -errno.ENOLCK  # (n3 came back late: n2 has it)
    await call(server, "n2", Call.lock, lockOwner="n2:posix:7", **{**lock, "lockType": 2})
    assert await status("n3", lockReclaim=True) == 0


async def test_a_copy_that_fills_the_disk_empties_the_old_tree_only_of_a_replica_out_of_sync(tmp_path, monkeypatch):
    """A copy to a replica fails ENOSPC: its old tree is emptied (room for a
    whole new one beside it) only if etcd lists the node out of sync in the
    copy's term -- one still listed (its server could not strike it) may
    take over with that tree, which is kept; and the copy's later calls in
    the batch are not made (it starts again from its beginning)."""
    import json

    from drvs.store import Entry

    class Etcd:
        state: dict = {}

        async def get(self, key):
            return Entry(key, json.dumps(self.state), 1, 1)

    etcd = Etcd()
    replica = FsServer("web", Store(str(tmp_path / "replica"), "web"), None, "n2", etcd)
    old = tmp_path / "replica" / "root" / "old"
    old.write_text("the old tree")

    def full(req):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(replica.puts, Call.putFile, full)

    def batch(epoch):
        b = fs.Batch.new_message(vm="web", epoch=epoch)
        calls = b.init("calls", 2)
        calls[0].type, calls[0].request = Call.putFile, to_flat(new(fs.FsRequest, vm="web", path=b"f"))
        calls[1].type, calls[1].request = Call.putDir, to_flat(new(fs.FsRequest, vm="web", path=b"d"))
        return b

    for state in ({"epoch": 3, "primary": "n1", "in_sync": ["n1", "n2"]},  # still listed: kept
                  {"epoch": 2, "primary": "n1", "in_sync": ["n1"]}):       # etcd is of another term: kept
        etcd.state = state
        assert await replica.apply(batch(3)) == [-errno.ENOSPC, -errno.ECANCELED]
        assert old.read_text() == "the old tree"
    etcd.state = {"epoch": 3, "primary": "n1", "in_sync": ["n1"]}
    assert await replica.apply(batch(3)) == [-errno.ENOSPC, -errno.ECANCELED]
    assert not old.exists() and (tmp_path / "replica" / "root").is_dir()


def _content(server: FsServer, fh: int) -> bytes:
    with open(f"/proc/self/fd/{server._file(fh).fd}", "rb") as f:  # (the handle's is write-only)
        return f.read()


async def _again(server: FsServer, m: Msg) -> Msg:
    """A message sent again as it came (the fabric hands each its own view)."""
    again = Msg(m.type, bytes(m.payload))
    again.node = m.node
    r = server.fast(again)
    if r is None:
        return await server.handle(again)
    return await r.finish() if isinstance(r, Later) else r


async def test_a_change_sent_again_is_answered_as_made_not_made_twice(tmp_path):
    """A reply lost with a reset connection: the node sends the call again
    under its number, and gets the reply the change had -- an append is
    not written twice, a create with O_EXCL does not fail EEXIST."""
    server, _ = serving(tmp_path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
    create = message("n2", Call.create, path=b"log", flags=flags, mode=0o644, seq=7)
    first = from_flat(fs.FsReply, (await server.handle(create)).payload)
    second = await _again(server, create)
    assert second.status == 0, second.error
    assert from_flat(fs.FsReply, second.payload).fh == first.fh
    append = message("n2", Call.write, fh=first.fh, offset=0, data=b"line\n", seq=8)
    for _ in range(3):
        r = await _again(server, append)
        assert r.status == 0 and from_flat(fs.FsReply, r.payload).size == 5
    assert _content(server, first.fh) == b"line\n"
    # Another node's call of that number is its own: made.
    other = message("n3", Call.write, fh=first.fh, offset=0, data=b"more\n", seq=8)
    assert (await _again(server, other)).status == 0
    assert _content(server, first.fh) == b"line\nmore\n"


class ToReplica(Invalidations):
    """Invalidations, and n3's replica: a real file server that applies the
    batches sent to fsr@n3."""

    def __init__(self, replica: FsServer):
        super().__init__()
        self.replica = replica

    async def sendrec(self, target, msg, timeout=None, idempotent=False):
        if target != "fsr@n3":
            return await super().sendrec(target, msg, timeout, idempotent)
        statuses = await self.replica.apply(from_flat(fs.Batch, msg.payload))
        return Msg(0, to_flat(new(fs.BatchReply, statuses=statuses)))


async def test_the_next_server_answers_a_change_its_predecessor_made_as_it_was_made(tmp_path):
    """The server dies after its replica has a change but before its reply
    went out: the node sends the call to the next server, which answers
    it as made -- the file it created, the append written once."""
    from drvs.fs.replica import Mirror

    server, _ = serving(tmp_path)
    replica = FsServer("web", Store(str(tmp_path / "replica"), "web"), Invalidations(), "n3")
    server.fabric = ToReplica(replica)
    mirror = server.mirrors["n3"] = Mirror(server, "n3")
    mirror.live = True
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
    create = message("n2", Call.create, path=b"log", flags=flags, mode=0o644, seq=7)
    made = from_flat(fs.FsReply, (await server.handle(create)).payload)
    append = message("n2", Call.write, fh=made.fh, offset=0, data=b"line\n", seq=8)
    assert (await _again(server, append)).status == 0
    await mirror.send(mirror._batch())  # (the replica has both changes; the server dies)
    replica.promote(2, ["n3"])
    for m in (create, append):
        r = await _again(replica, m)
        assert r.status == 0, r.error
        reply = from_flat(fs.FsReply, r.payload)
        assert reply.epoch == 2
        if m is create:  # (its node is told of the file's changes, as after a create made now)
            assert reply.attr.ino != made.attr.ino and "n2" in replica.interest[reply.attr.ino]
    assert from_flat(fs.FsReply, (await _again(replica, create)).payload).fh == made.fh
    later = message("n2", Call.write, fh=made.fh, offset=0, data=b"next\n", seq=9)
    assert (await _again(replica, later)).status == 0
    assert _content(replica, made.fh) == b"line\nnext\n"


async def test_a_copy_of_a_change_still_being_told_to_others_is_answered_once_they_were(tmp_path):
    """An unlink another node's cache holds is made at once and answered
    once that node dropped the name: a copy that comes meanwhile (a reset
    connection) waits the same, then is answered as made (not ENOENT)."""
    server, fabric = serving(tmp_path)
    r = await call(server, "n3", Call.create, path=b"f", flags=os.O_WRONLY, mode=0o644)  # (n3 caches f)
    await call(server, "n3", Call.release, fh=r.fh)
    m = message("n2", Call.unlink, path=b"f", seq=5)
    first = server.fast(m)
    assert isinstance(first, Later)
    copy = Msg(m.type, bytes(m.payload))
    copy.node = "n2"
    assert server.fast(copy) is None  # (to trio: it waits)
    replies = []

    async def again():
        replies.append(await server.handle(copy))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(again)
        await trio.testing.wait_all_tasks_blocked()
        assert replies == []
        assert (await first.finish()).status == 0
    assert replies[0].status == 0, replies[0].error
    assert fabric.told == ["fsc@n3"]  # (told once)


async def test_a_replica_that_stays_away_is_said_to_be_so_while_its_copy_is_tried_again(tmp_path, autojump_clock):
    """drvs df says why a replica is not in sync: while its node stays
    away, the reason, also during each new try (not "being copied to"
    until the replica takes a batch)."""
    from drvs.fs.replica import Mirror, MirrorFailed

    server, _ = serving(tmp_path)
    mirror = Mirror(server, "n3")
    tries = []

    async def copy_tree():
        tries.append(mirror.state)
        await trio.sleep(0.5)  # (a tree to walk, a node to reach)
        raise MirrorFailed("node n3 unreachable")

    mirror.copy_tree = copy_tree
    seen = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mirror.run)
        for _ in range(20):
            await trio.sleep(0.2)
            seen.append(mirror.state)
        nursery.cancel_scope.cancel()
    assert tries[0] == "being copied to" and len(tries) >= 3
    assert all(state.startswith("node n3 unreachable") for state in seen[3:]), seen


async def test_a_replicas_sync_holds_its_batch_no_longer_than_its_bound(tmp_path, monkeypatch, autojump_clock):
    """A program's sync reaches every replica (its server's batch): a
    replica whose disk takes long to flush (other VMs' dirty data) answers
    within REPLICA_SYNC_WAIT, the flush going on -- else its server's bound
    would strike it and copy it whole again."""
    import threading

    from drvs.fs import server as server_module

    flushing, release, fds = threading.Event(), threading.Event(), []

    def slow_syncfs(fd):
        fds.append(fd)
        flushing.set()
        release.wait(10)

    monkeypatch.setattr(server_module._fs, "syncfs", slow_syncfs)
    replica = FsServer("web", Store(str(tmp_path / "replica"), "web"), Invalidations(), "n3")
    batch = fs.Batch.new_message(vm="web", epoch=1)
    calls = batch.init("calls", 1)
    calls[0].type, calls[0].request = Call.syncfs, to_flat(new(fs.FsRequest, vm="web"))
    start = trio.current_time()
    assert await replica.apply(batch) == [0]
    assert trio.current_time() - start == pytest.approx(server_module.REPLICA_SYNC_WAIT)
    assert await trio.to_thread.run_sync(flushing.wait, 5)
    store = os.readlink(f"/proc/self/fd/{fds[0]}")  # (still flushing: its descriptor open)
    assert store.endswith("/replica/root")
    release.set()

    def still_open() -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fds[0]}") == store
        except FileNotFoundError:  # (closed between two looks)
            return False

    for _ in range(100):
        if not still_open():
            break
        await trio.to_thread.run_sync(time.sleep, 0.01)
    else:
        raise AssertionError("the flush's descriptor was never closed")
