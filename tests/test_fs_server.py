"""A VM file server on a real store, sent the messages other nodes send:
which nodes it tells of a change, and that it forgets files that are gone
(their inode numbers go to new files, which those nodes never cached)."""

import errno
import os

import pytest
import trio

from drvs.fs.server import Call, FsServer
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
