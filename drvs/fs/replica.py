"""Replication of a VM's file system (primary-backup, as in Harp or Ceph's
primary copy): the serving node makes each change on its store and sends
it, in order, to the other replicas ("fsr@NODE"); an fsync is answered
only once every live replica has made it durable too, so what was
fsync'ed survives the loss of any one node.

Which replicas hold everything is kept in etcd (/drvs/fs/VM: the term
"epoch", the serving node, the replicas "in_sync").  Only an in-sync
replica may take over; taking over starts a new term in which the others
are out of sync until the new server has copied its tree to them (a
replica may have made changes the new server never got).  A replica that
comes back, or whose stream broke, is copied again: a first pass while
the file system is in use, a second, short one with changes held, and
from then on the stream."""

import errno
import json
import logging
import os
import stat
import time

import trio

from .. import _fs
from ..errors import EtcdUnavailable, SetupError
from ..ipc.message import IpcError, Msg
from ..ipc.schema import from_flat, fs, to_flat
from ..store import CompareFailed
from .store import XATTR_PREFIXES

log = logging.getLogger("drvmmd")
Call = fs.FsCall
STATE = "/drvs/fs/"
BATCH_CALLS = 512
BATCH_BYTES = 4 << 20
QUEUE_BYTES = 32 << 20   # changes not yet at a replica beyond which writers wait
SEND_TIMEOUT = 10.0
GATHER = 0.002  # a batch nobody waits for waits this long for more calls (fewer, fuller batches)
RETRY = 1.0
HAND_OVER = 5.0  # a server that stops sends its replicas what is queued within this
CHUNK = 1 << 20
# The calls a replica must make too (an open or release keeps the handle
# table the same, so open files survive a fail-over).
MIRRORED = {Call.setattr, Call.mknod, Call.mkdir, Call.symlink, Call.unlink, Call.rmdir, Call.rename,
            Call.link, Call.open, Call.create, Call.write, Call.release, Call.fsync, Call.setxattr,
            Call.removexattr, Call.fallocate, Call.unlinks, Call.syncfs}
PUT_CALLS = {Call.putBegin, Call.putDir, Call.putFile, Call.putLink, Call.putHardlink, Call.putRemove,
             Call.putCommit}
LAST = 1  # putFile/putDir flag: the last part: set size, owner, mode and times


class MirrorFailed(Exception):
    pass


# -- the replicas' state in etcd ------------------------------------------------------

async def read_state(etcd, vm: str):
    entry = await etcd.get(STATE + vm)
    return (json.loads(entry.value), entry.mod_revision) if entry is not None else (None, 0)


async def take_over(etcd, vm: str, me: str, first: bool) -> tuple[int, str]:
    """Start a term with this node serving: its epoch, and the node that
    served the term before ("" if none).  SetupError if this node's
    replica is not in sync (it may lack changes)."""
    while True:
        state, rev = await read_state(etcd, vm)
        if state is None:
            if not first:
                raise SetupError(f"fs@{vm}: the file system is new and starts on its first node")
            new = {"epoch": 1, "primary": me, "in_sync": [me]}
        elif me not in state["in_sync"]:
            raise SetupError(f"fs@{vm}: this node's replica is not in sync (in sync: "
                             f"{', '.join(state['in_sync']) or 'none'})")
        else:
            new = {"epoch": state["epoch"] + 1, "primary": me, "in_sync": [me]}
        try:
            await etcd.put(STATE + vm, json.dumps(new), expect_revision=rev)
            return new["epoch"], state["primary"] if state is not None else ""
        except CompareFailed:
            continue


async def set_in_sync(etcd, vm: str, epoch: int, node: str, present: bool) -> bool:
    """Add node to (or drop it from) the in-sync replicas of this term;
    False if another term began (this server is no longer the server)."""
    while True:
        state, rev = await read_state(etcd, vm)
        if state is None or state["epoch"] != epoch:
            return False
        nodes = set(state["in_sync"])
        nodes = nodes | {node} if present else nodes - {node}
        state["in_sync"] = sorted(nodes)
        try:
            await etcd.put(STATE + vm, json.dumps(state), expect_revision=rev)
            return True
        except CompareFailed:
            continue


# -- one replica, as the server sees it ------------------------------------------------

class Mirror:
    def __init__(self, server, node: str):
        self.server, self.node = server, node
        self.calls: list[tuple[int, bytes, str]] = []  # (type, request, the node whose call it was)
        self.bytes = 0
        self.pushed = 0      # calls queued so far
        self.done = 0        # of them, made by the replica
        self.live = False    # in sync: changes are streamed to it
        self.lost = False    # dropped out, yet still listed in sync in etcd
        self.handed = False  # the server stopped, this replica in sync (see _hand_over)
        self.missed = False  # since, a change it lacks was made here (an fsync or a close is none)
        self.dropped = False  # taken away from the VM's replicas (vm update): struck, not handed over
        self.state = "not copied to yet"  # while not live: why (drvs df)
        self.scope = trio.CancelScope()
        self._work = trio.Event()
        self._progress = trio.Event()
        self._hurry = trio.Event()  # set when someone waits for the replica (fsync, a synchronous close)
        self.waiting = 0
        self.token = trio.lowlevel.current_trio_token()

    # -- queue (also used outside trio, from the fabric's fast path) --

    def push(self, ctype: int, payload: bytes, origin: str = "") -> int:
        """The call's sequence number, to wait() for; 0: none to wait for.
        origin: the node whose call it was (the replica keeps its reply)."""
        if not self.live:
            if self.handed or self.lost:
                if ctype in (Call.fsync, Call.release, Call.syncfs) and not self.lost:
                    # A sync or close still under way at a clean stop: no data
                    # of it is missing there (the hand-over sent all that was
                    # made), and this disk has it; nothing to wait for.
                    return 0
                # A replica still listed in sync lacks this change (the server
                # handed over, or could not strike it): whoever waits fails.
                self.lost = True
                if ctype not in (Call.fsync, Call.release, Call.syncfs):
                    self.missed = True  # (data or names it lacks: no vouching for the term, see _vouch)
                return self.pushed + 1
            return 0
        self.calls.append((ctype, payload, origin))
        self.bytes += len(payload)
        self.pushed += 1
        self.token.run_sync_soon(self._work.set)
        return self.pushed

    def full(self) -> bool:
        return self.live and self.bytes > QUEUE_BYTES

    async def wait(self, seq: int) -> None:
        """Until the replica made call seq; OSError(EIO) if it dropped out
        and could not be struck from the in-sync replicas (it might then
        take over without this call)."""
        self.waiting += 1
        self._hurry.set()
        try:
            while self.live and self.done < seq:
                await self._progress.wait()
        finally:
            self.waiting -= 1
        if self.lost:
            raise OSError(errno.EIO, f"replica on {self.node} lost, and still listed in sync")

    async def drained(self) -> None:
        """Until the queue is below QUEUE_BYTES again (or the replica is out)."""
        while self.full():
            await self._progress.wait()

    def _advance(self, n: int) -> None:
        self.done += n
        self._progress.set()
        self._progress = trio.Event()

    def _stop(self) -> None:
        self.live = False
        self.calls.clear()
        self.bytes = 0
        self.done = self.pushed
        self._progress.set()
        self._progress = trio.Event()

    # -- life --

    async def drop(self) -> None:
        """This replica is no longer the VM's (see FsServer._follow_replicas):
        struck from those in sync first, while fsyncs still wait for it (it
        must never take over without what they made durable); then its
        stream ends.  MirrorFailed (etcd not told): it goes on, and is
        dropped at the next look."""
        self.dropped = True  # (a copy finishing meanwhile puts it in sync no more)
        await self._in_sync(False)
        self.scope.cancel()

    async def run(self) -> None:
        with self.scope:
            await self._run()

    async def _run(self) -> None:
        said = ""
        while True:
            stopping = False
            try:
                if not said:  # (after a failure its reason stays until the replica takes a batch: send)
                    self.state = "being copied to"
                await self.copy_tree()
                said = ""
                await self.stream()
            except (MirrorFailed, OSError) as e:  # (OSError: the store, while copying)
                self.state = f"{e} (tried again every {RETRY:g} s)"
                if self.live:
                    log.warning("fs@%s: replica on %s out of sync: %s", self.server.vm, self.node, e)
                elif str(e) != said:  # (once, while the node stays away)
                    log.info("fs@%s: replica on %s: %s", self.server.vm, self.node, e)
                said = str(e)
            except trio.Cancelled:
                stopping = True
                raise
            finally:
                if self.dropped and stopping:
                    self.live = False  # (struck already: drop)
                elif self.live and stopping:
                    await self._hand_over()
                elif self.live:
                    # Struck from the in-sync replicas before any waiting
                    # fsync is answered: else it could take over without it.
                    self.live = False
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        try:
                            await self._in_sync(False)
                        except MirrorFailed as e:
                            log.warning("fs@%s: replica on %s: %s", self.server.vm, self.node, e)
                            self.lost = True
                self._stop()
            await trio.sleep(RETRY)

    async def _hand_over(self) -> None:
        """The server stops (its node is shut down, or it stands down): the
        replica stays in sync, to take over, and is sent what is queued
        (within a bound), so a clean stop loses no change it acknowledged.
        Whatever does not reach it is as after a crash of this node: a
        write not fsync'ed may be lost, and an fsync waiting for it fails."""
        self.server.stale = True  # (no call is made here any more; calls under way still queue theirs)
        sent = False
        with trio.CancelScope(shield=True), trio.move_on_after(HAND_OVER):
            try:
                while self.calls:
                    batch = self._batch()
                    await self.send(batch)
                    self._advance(len(batch))
                sent = True
            except MirrorFailed as e:
                log.warning("fs@%s: replica on %s missed what was queued at the stop: %s",
                            self.server.vm, self.node, e)
        self.live, self.handed = False, True
        self.lost = not sent  # (a waiting fsync fails: the replica, still in sync, may lack its data)
        if sent:
            await self._vouch()

    async def _vouch(self) -> None:
        """Tell the replica it has every change this server acknowledged,
        once the calls still under way (begun before the stop) are done
        and none of them made a change it lacks: as the next server, it
        says so to the nodes, whose writes not fsync'ed are then not in
        doubt (VmFs._durable).  Not said, within the bound: they are."""
        s = self.server
        with trio.CancelScope(shield=True), trio.move_on_after(HAND_OVER):
            while s.serving:
                await trio.sleep(0.01)
            if self.missed:
                return
            m = fs.Batch.new_message(vm=s.vm, epoch=s.epoch, made=s.store.made, handed=True)
            try:
                reply = await s.fabric.sendrec(f"fsr@{self.node}", Msg(Call.mirror, to_flat(m)),
                                               timeout=SEND_TIMEOUT)
            except (IpcError, EtcdUnavailable):
                return
            if reply.status < 0:
                log.info("fs@%s: replica on %s did not take the hand-over: %s", s.vm, self.node, reply.error)

    async def _in_sync(self, present: bool) -> None:
        s = self.server
        if present and self.dropped:
            raise MirrorFailed("taken away from the VM's replicas")
        try:
            ok = await set_in_sync(s.etcd, s.vm, s.epoch, self.node, present)
        except Exception as e:  # noqa: BLE001 - etcd away: the next copy tries again
            raise MirrorFailed(f"etcd: {e}") from None
        if not ok:
            s.stale = True
            raise MirrorFailed("a new term began elsewhere")
        if present:
            self.lost = False

    async def stream(self) -> None:
        while True:
            # (the sends are shielded, and a busy queue gathers nothing: a stop must land here)
            await trio.lowlevel.checkpoint_if_cancelled()
            if not self.calls:
                await self._work.wait()
                self._work = trio.Event()
                continue
            await self._gather()
            batch = self._batch()
            with trio.CancelScope(shield=True):  # (a batch cut short might be made there or not)
                await self.send(batch)
            self._advance(len(batch))

    def _batch(self) -> list[tuple[int, bytes, str]]:
        batch, size = [], 0
        while self.calls and len(batch) < BATCH_CALLS and size < BATCH_BYTES:
            call = self.calls.pop(0)
            batch.append(call)
            size += len(call[1])
        self.bytes -= size
        return batch

    async def _gather(self) -> None:
        """Let a small batch that no one waits for fill up a little: each
        batch costs both nodes a message and a trip into the replica's
        server, and a replica may lag (only fsync and synchronous closes
        wait for it, and they do not wait here)."""
        if self.waiting or len(self.calls) >= BATCH_CALLS or self.bytes >= BATCH_BYTES:
            return
        self._hurry = trio.Event()
        with trio.move_on_after(GATHER):
            await self._hurry.wait()

    async def send(self, calls: list[tuple[int, bytes, str]]) -> None:
        s = self.server
        m = fs.Batch.new_message(vm=s.vm, epoch=s.epoch, made=s.store.made)
        out = m.init("calls", len(calls))
        for i, (ctype, payload, origin) in enumerate(calls):
            out[i].type, out[i].request = ctype, payload
            if origin:
                out[i].origin = origin
        try:
            reply = await s.fabric.sendrec(f"fsr@{self.node}", Msg(Call.mirror, to_flat(m)),
                                           timeout=SEND_TIMEOUT)
        except (IpcError, EtcdUnavailable) as e:  # (EtcdUnavailable: its node's place never known here)
            raise MirrorFailed(str(e)) from None
        if reply.status < 0:
            if reply.status == -errno.ESTALE:  # the replica serves a later term: this server's is over
                s.stale = True
            raise MirrorFailed(reply.error)
        statuses = from_flat(fs.BatchReply, reply.payload).statuses
        for (ctype, *_), st in zip(calls, statuses):
            if st < 0:
                raise MirrorFailed(f"call {ctype} failed there ({os.strerror(-st)}), not here")
        if not self.live:
            self.state = "being copied to"

    # -- copying the whole tree --

    async def copy_tree(self) -> None:
        """Bring the replica in sync: copy while the file system is in use,
        then hold changes, copy what changed meanwhile, give it the open
        files, and stream from then on."""
        s = self.server
        started = time.time_ns()
        t0 = time.monotonic()
        out = _Sender(self)
        await out.add(Call.putBegin)
        sent: dict[bytes, tuple] = {}
        await self._copy(out, sent, since=None)
        async with s.holding_changes():
            await self._copy(out, sent, since=started)
            await out.add(Call.putCommit)
            for fh, f in sorted(s.files.items()):
                path = s.path_of(f.fd)
                if path is not None:  # (an unlinked one is not there: calls on it are ignored)
                    await out.add(Call.open, path=path, fh=fh, flags=f.flags, origin=f.node)
            await out.flush()
            self.live = True
            self.pushed = self.done = 0
        await self._in_sync(True)
        log.info("fs@%s: replica on %s in sync (copied in %.1f s)", s.vm, self.node, time.monotonic() - t0)

    async def _copy(self, out: "_Sender", sent: dict, since: int | None) -> None:
        s = self.server
        tree = await trio.to_thread.run_sync(_walk, f"{s.store.base}/root")
        seen_inodes: dict[int, bytes] = {}
        present = set()
        for path, st, target in tree:
            present.add(path)
            key = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            fresh = sent.get(path) != key or (since is not None and st.st_ctime_ns >= since)
            if stat.S_ISDIR(st.st_mode):
                if fresh:
                    await out.add(Call.putDir, path=path, **_meta(st))
            elif stat.S_ISLNK(st.st_mode):
                if fresh:
                    await out.add(Call.putLink, path=path, data=target, uid=st.st_uid, gid=st.st_gid,
                                  atimeNs=st.st_atime_ns, mtimeNs=st.st_mtime_ns)
            elif st.st_nlink > 1 and st.st_ino in seen_inodes:
                if fresh:
                    await out.add(Call.putHardlink, path=path, path2=seen_inodes[st.st_ino])
            elif stat.S_ISREG(st.st_mode):
                if fresh:
                    await self._copy_file(out, path, st)
            elif fresh:  # fifos, sockets, devices: their node only
                await out.add(Call.putFile, path=path, flags=LAST, **_meta(st))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                seen_inodes.setdefault(st.st_ino, path)
            sent[path] = key
        for path in sorted(set(sent) - present, reverse=True):
            await out.add(Call.putRemove, path=path)
            del sent[path]
        # Directories' times last: what was made in them changed those.
        for path, st, _ in reversed(tree):
            if stat.S_ISDIR(st.st_mode):
                await out.add(Call.putDir, path=path, flags=LAST, xattrs=self._dir_xattrs(path), **_meta(st))

    def _dir_xattrs(self, path: bytes) -> list:
        try:
            fd = self.server.store.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return []  # gone meanwhile: the second pass sees it
        try:
            return _xattrs(fd)
        finally:
            os.close(fd)

    async def _copy_file(self, out: "_Sender", path: bytes, st) -> None:
        s = self.server
        try:
            fd = s.store.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return  # gone meanwhile: the second pass sees it
        if not stat.S_ISREG(os.stat(fd).st_mode):
            os.close(fd)
            return  # replaced meanwhile (by a fifo?): the second pass sees it
        try:
            offset = 0
            await out.add(Call.putFile, path=path, offset=0, data=b"", **_meta(st))
            for start, length in _extents(fd, st.st_size):
                pos = start
                while pos < start + length:
                    data = await trio.to_thread.run_sync(os.pread, fd, min(CHUNK, start + length - pos), pos)
                    if not data:
                        break
                    await out.add(Call.putFile, path=path, offset=pos, data=data, **_meta(st))
                    pos += len(data)
                offset = pos
            await out.add(Call.putFile, path=path, flags=LAST, offset=offset, xattrs=_xattrs(fd), **_meta(st))
        finally:
            os.close(fd)


class _Sender:
    """Calls of a copy, sent in batches (not through the stream queue)."""

    def __init__(self, mirror: Mirror):
        self.mirror, self.calls, self.bytes = mirror, [], 0

    async def add(self, ctype: int, **fields) -> None:
        payload = to_flat(fs.FsRequest.new_message(vm=self.mirror.server.vm, **fields))
        self.calls.append((ctype, payload, ""))
        self.bytes += len(payload)
        if len(self.calls) >= BATCH_CALLS or self.bytes >= BATCH_BYTES:
            await self.flush()

    async def flush(self) -> None:
        if self.calls:
            calls, self.calls, self.bytes = self.calls, [], 0
            await self.mirror.send(calls)


def _meta(st) -> dict:
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size,
            "atimeNs": st.st_atime_ns, "mtimeNs": st.st_mtime_ns, "rdev": st.st_rdev}


def _xattrs(fd: int) -> list:
    """The extended attributes of the store's object open at fd that the
    VM's programs can set (user.*), as a copy carries them."""
    out = []
    try:
        names = os.listxattr(fd)
    except OSError:
        return out
    for name in names:
        if os.fsencode(name).startswith(XATTR_PREFIXES):
            try:
                out.append({"name": os.fsencode(name), "value": os.getxattr(fd, name)})
            except OSError:
                continue  # (removed meanwhile: the second pass sees the change)
    return out


def _set_xattrs(fd: int, xattrs) -> None:
    """Make fd's user.* extended attributes those given, no more (a
    directory of the copy may have had others set by an earlier pass)."""
    wanted = {bytes(x.name): bytes(x.value) for x in xattrs}
    for name in os.listxattr(fd):
        if os.fsencode(name).startswith(XATTR_PREFIXES) and os.fsencode(name) not in wanted:
            os.removexattr(fd, name)
    for name, value in wanted.items():
        if name.startswith(XATTR_PREFIXES):
            os.setxattr(fd, name, value)


def _walk(root: str) -> list:
    """Every entry under root, parents before children: (path, lstat, link target)."""
    out = []

    def visit(rel: bytes, full: bytes) -> None:
        try:
            with os.scandir(full) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return  # removed (or replaced) meanwhile: the second pass sees it
        for e in entries:
            path = rel + b"/" + e.name if rel else e.name
            try:
                st = e.stat(follow_symlinks=False)
                target = os.readlink(e.path) if stat.S_ISLNK(st.st_mode) else b""
            except OSError:
                continue
            out.append((path, st, target))
            if stat.S_ISDIR(st.st_mode):
                visit(path, e.path)

    root_b = os.fsencode(root)
    out.append((b"", os.lstat(root_b), b""))
    visit(b"", root_b)
    return out


def _extents(fd: int, size: int):
    """The data extents of a file (holes are left out), as (start, length)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole from pos on
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        pos = end


# -- a replica's side: the copy's calls --------------------------------------------------

class Builder:
    """The tree a copy builds beside a replica's store (root.new), and its
    commit: the new tree replaces the old in one exchange of names.  Every
    path is resolved beneath root.new and never through a link (the VM's
    programs make the links), and what a name held before is removed, not
    written through."""

    def __init__(self, base: str):
        self.base = base
        self.root = -1

    def begin(self) -> None:
        self.close()
        _rmtree(self.base, b"root.new")  # an earlier copy that did not finish
        os.mkdir(f"{self.base}/root.new", 0o755)
        self.root = os.open(f"{self.base}/root.new", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.root >= 0:
            os.close(self.root)
            self.root = -1

    def make_room(self) -> bool:
        """The disk filled while copying: what the current tree holds goes
        (this replica is not in sync, so nothing may be served from it; the
        empty root stays, a store still), leaving room for a whole new tree
        beside what the copy left; whether there was anything to remove."""
        root = os.open(f"{self.base}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            names = os.listdir(root)
            for name in names:
                st = _lstat_at(root, os.fsencode(name))
                if st is not None and stat.S_ISDIR(st.st_mode):
                    _rmtree(None, os.fsencode(name), dfd=root)
                elif st is not None:
                    os.unlink(name, dir_fd=root)
            return bool(names)
        finally:
            os.close(root)

    def _at(self, path: bytes) -> tuple[int, bytes]:
        from .store import RESOLVE, check_path

        if self.root < 0:
            raise OSError(errno.EBADF, "no copy begun")
        head, _, name = check_path(path).rpartition(b"/")
        return _fs.openat2(self.root, head or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, RESOLVE), name

    def put_dir(self, req) -> None:
        if not req.path:
            fd = _fs.openat2(self.root, b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, 0)
            try:
                if req.flags & LAST:
                    _set_xattrs(fd, req.xattrs)
                    _meta_fd(fd, req)
            finally:
                os.close(fd)
            return
        dfd, name = self._at(bytes(req.path))
        try:
            st = _lstat_at(dfd, name)
            if st is None or not stat.S_ISDIR(st.st_mode):
                _remove_at(dfd, name, st)
                os.mkdir(name, 0o700, dir_fd=dfd)
            if req.flags & LAST:
                fd = _fs.openat2(dfd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, 0, 0)
                try:
                    _set_xattrs(fd, req.xattrs)  # (before the times: setting one changes the ctime only)
                finally:
                    os.close(fd)
                _meta_at(dfd, name, req)
        finally:
            os.close(dfd)

    def put_file(self, req) -> None:
        dfd, name = self._at(bytes(req.path))
        try:
            if stat.S_IFMT(req.mode) != stat.S_IFREG:  # fifo, socket, device
                _remove_at(dfd, name, _lstat_at(dfd, name))
                os.mknod(name, req.mode, req.rdev, dir_fd=dfd)
                _meta_at(dfd, name, req)
                return
            first = req.offset == 0 and not req.data and not req.flags & LAST
            if first:  # a new file, never the old one's inode (it may be a hard link of another name)
                _remove_at(dfd, name, _lstat_at(dfd, name))
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = _fs.openat2(dfd, name, flags | os.O_CREAT | os.O_EXCL, 0o600, 0) if first else \
                _fs.openat2(dfd, name, flags, 0, 0)  # (openat2 wants no mode without O_CREAT)
            try:
                if not stat.S_ISREG(os.stat(fd).st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                if req.data:
                    os.pwrite(fd, req.data, req.offset)
                if req.flags & LAST:
                    os.ftruncate(fd, req.size)
                    _set_xattrs(fd, req.xattrs)
                    _meta_fd(fd, req)
            finally:
                os.close(fd)
        finally:
            os.close(dfd)

    def put_link(self, req) -> None:
        dfd, name = self._at(bytes(req.path))
        try:
            _remove_at(dfd, name, _lstat_at(dfd, name))
            os.symlink(bytes(req.data), name, dir_fd=dfd)
            os.chown(name, req.uid, req.gid, dir_fd=dfd, follow_symlinks=False)
            os.utime(name, ns=(req.atimeNs, req.mtimeNs), dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(dfd)

    def put_hardlink(self, req) -> None:
        sfd, sname = self._at(bytes(req.path2))
        try:
            dfd, name = self._at(bytes(req.path))
            try:
                _remove_at(dfd, name, _lstat_at(dfd, name))
                os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def put_remove(self, req) -> None:
        dfd, name = self._at(bytes(req.path))
        try:
            _remove_at(dfd, name, _lstat_at(dfd, name))
        finally:
            os.close(dfd)

    def commit(self) -> None:
        """Durable first, then exchanged with the current tree in one
        renameat2: a crash keeps one whole tree or the other."""
        os.sync()
        self.close()
        base = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _fs.renameat2(base, b"root.new", base, b"root", _fs.RENAME_EXCHANGE)
            os.fsync(base)
        finally:
            os.close(base)
        _rmtree(self.base, b"root.new")  # the old tree, now


def _lstat_at(dfd: int, name: bytes):
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dfd: int, name: bytes, st) -> None:
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        _rmtree(None, name, dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def _rmtree(base: str | None, name: bytes, dfd: int | None = None) -> None:
    """Remove a tree without following links in it (shutil's fd-based walk)."""
    import shutil

    own = dfd is None
    if own:
        try:
            dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
    try:
        shutil.rmtree(os.fsdecode(name), dir_fd=dfd)
    except FileNotFoundError:
        pass
    finally:
        if own:
            os.close(dfd)


def _meta_fd(fd: int, req) -> None:
    os.chown(fd, req.uid, req.gid)
    os.chmod(fd, stat.S_IMODE(req.mode))
    os.utime(fd, ns=(req.atimeNs, req.mtimeNs))


def _meta_at(dfd: int, name: bytes, req) -> None:
    """Owner, mode and times of a name that is not a link (it was just made so)."""
    os.chown(name, req.uid, req.gid, dir_fd=dfd, follow_symlinks=False)
    os.chmod(name, stat.S_IMODE(req.mode), dir_fd=dfd)
    os.utime(name, ns=(req.atimeNs, req.mtimeNs), dir_fd=dfd, follow_symlinks=False)
