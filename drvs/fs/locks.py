"""Locks on a VM's file system that hold across nodes.

pyfuse3 has no lock handlers, so each node's kernel would keep fcntl and
flock locks to itself.  Instead a jailed program's lock calls reach its
node's supervisor (the seccomp filter sends fcntl's F_GETLK, F_SETLK,
F_SETLKW and every flock), which asks the file server's lock table
(LockTable, in fs@VM) first; once granted, the call goes on to the local
kernel, which then holds the lock too: it answers local conflicts, and it
drops the lock when the program closes the file or ends.  This node's
LockAgent watches /proc/locks for that and tells the server.

Locks are not replicated: a new server (a fail-over, or a restart of the
only one) knows none.  As NFS's lock recovery does, each node gives it
back what its programs hold -- the kernel's own locks on the view, in
/proc/locks -- as soon as it sees the new term (NodeLocks.reclaim), and
the new server makes other lock calls wait for RECLAIM_GRACE meanwhile.  A
node that comes back later than that finds its lock taken if another
owner asked for it first (ENOLCK, logged).

Limits: only jailed programs take part (a host process using drvs mount
does not); OFD locks (F_OFD_*) stay per node.

A blocked F_SETLKW or flock waits at the server in slices; between them
the node looks whether the program has a signal pending that it does not
block (the filter waits killably, so only a fatal signal ends the wait by
itself).  If so the call ends with ERESTARTSYS, as the kernel's own lock
wait does: the kernel then runs the program's handler and returns EINTR,
or restarts the call if the handler has SA_RESTART, or restarts it after
a stop (`flock -w`'s SIGALRM, Ctrl-Z).  A slice is short so that a
timeout is kept to within it."""

import errno
import logging
import math
import os
import struct
import time

import pyfuse3
import trio

from ..dvos.pm.procs import status_field
from ..ipc.schema import fs

log = logging.getLogger("drvmmd")
Call = fs.FsCall
RD, WR, UN = 0, 1, 2
F_GETLK, F_SETLK, F_SETLKW = 5, 6, 7
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = 1, 2, 4, 8
FLOCK = struct.Struct("<hh4xqqi4x")  # struct flock on x86_64 and aarch64
WAIT_SLICE_MS = 100                  # one server call's wait, and how late a signal may end a lock wait
ERESTARTSYS = 512                    # the kernel's "interrupted; restart if SA_RESTART" (never seen by programs)
AGENT_EVERY = 0.25                   # seconds between looks at /proc/locks
GRACE = 0.5                          # a granted lock the kernel has yet to show is not dropped before this
WAITING_FRESH = 0.25                 # a waiter not heard of for this long may have given up (slices: 0.1 s)
DEADLOCK_CONFIRM = 0.3               # a cycle is a deadlock once seen again this much later
RECLAIM_GRACE = 5.0                  # a new term's first seconds: only the locks held before are taken
PROBE_EVERY = 1.0                    # a node holding locks asks its server this often (a new term?)


class Lock:
    __slots__ = ("owner", "flock", "type", "start", "end", "pid")

    def __init__(self, owner, flock, type_, start, end, pid):
        self.owner, self.flock, self.type, self.start, self.end, self.pid = owner, flock, type_, start, end, pid


class LockTable:
    """The file server's locks, by server inode: POSIX record locks and
    flock locks, each owner's ranges kept apart and merged by replacing."""

    def __init__(self):
        self.locks: dict[int, list[Lock]] = {}
        self.changed: dict[int, trio.Event] = {}
        # POSIX lock owners waiting: owner -> (ino, type, start, end, when it
        # last asked); kept across a waiter's slices (WAITING_FRESH), for
        # deadlock detection
        self.waiting: dict[str, tuple] = {}
        self.suspected: dict[str, float] = {}  # owner -> when its wait was first seen to close a cycle
        self.grace_until = 0.0  # (trio time) a new term's: the locks held before come back first

    def conflict(self, ino: int, owner: str, flock: bool, type_: int, start: float, end: float) -> Lock | None:
        for lk in self.locks.get(ino, ()):
            if (lk.owner != owner and lk.flock == flock and lk.start < end and start < lk.end
                    and (lk.type == WR or type_ == WR)):
                return lk
        return None

    def set(self, ino: int, owner: str, flock: bool, type_: int, start: float, end: float, pid: int) -> None:
        kept = []
        for lk in self.locks.get(ino, ()):
            if lk.owner != owner or lk.flock != flock or lk.end <= start or end <= lk.start:
                kept.append(lk)
                continue
            if lk.start < start:  # the parts outside the new range stay
                kept.append(Lock(owner, flock, lk.type, lk.start, start, lk.pid))
            if end < lk.end:
                kept.append(Lock(owner, flock, lk.type, end, lk.end, lk.pid))
        if type_ != UN:
            kept.append(Lock(owner, flock, type_, start, end, pid))
        else:
            self.waiting.pop(owner, None)  # (a program that lets go of a lock is not waiting)
        if kept:
            self.locks[ino] = kept
        else:
            self.locks.pop(ino, None)
        self._wake(ino)

    def deadlock(self, ino: int, owner: str, type_: int, start: float, end: float) -> bool:
        """Whether owner waiting for this POSIX lock would close a cycle of
        owners each waiting for the next's lock (the kernel's EDEADLK):
        follow who holds what is wanted, and what that holder waits for."""
        now, seen = time.monotonic(), set()
        blocker = self.conflict(ino, owner, False, type_, start, end)
        while blocker is not None and blocker.owner not in seen:
            if blocker.owner == owner:
                # Only a cycle seen again a while later is one: a waiter
                # killed meanwhile stops asking (its record goes stale), and
                # its locks reach the server only through its node's agent.
                first = self.suspected.setdefault(owner, now)
                return now - first >= DEADLOCK_CONFIRM
            seen.add(blocker.owner)
            wait = self.waiting.get(blocker.owner)
            if wait is None or now - wait[4] > WAITING_FRESH:
                break
            blocker = self.conflict(wait[0], blocker.owner, False, *wait[1:4])
        self.suspected.pop(owner, None)
        return False

    def drop(self, owner_prefix: str) -> int:
        """Every lock of owners whose name starts so (a node that left)."""
        for owner in [o for o in self.waiting if o.startswith(owner_prefix)]:
            del self.waiting[owner]
        n = 0
        for ino in list(self.locks):
            before = len(self.locks[ino])
            self.locks[ino] = [lk for lk in self.locks[ino] if not lk.owner.startswith(owner_prefix)]
            if len(self.locks[ino]) != before:
                n += before - len(self.locks[ino])
                self._wake(ino)
            if not self.locks[ino]:
                del self.locks[ino]
        return n

    def _wake(self, ino: int) -> None:
        event = self.changed.pop(ino, None)
        if event is not None:
            event.set()

    async def request(self, ino: int, req, out) -> None:
        """A lock call: test, take (waiting up to lockWaitMs) or drop."""
        start = req.lockStart
        end = math.inf if req.lockEnd < 0 else req.lockEnd
        if req.lockType not in (RD, WR, UN) or start < 0 or end < start:
            raise OSError(errno.EINVAL, "invalid lock")
        if req.lockReclaim:
            self._reclaim(ino, req, start, end)
            return
        if req.lockType != UN and not await self._graced(req):
            raise OSError(errno.EAGAIN, "the server's term is new: locks held before come back first")
        if req.lockTest:
            lk = self.conflict(ino, req.lockOwner, req.lockFlock, req.lockType, start, end)
            out.lockType = UN if lk is None else lk.type
            if lk is not None:
                out.lockStart, out.lockEnd, out.lockPid = int(lk.start), -1 if lk.end == math.inf else int(lk.end), lk.pid
            return
        if req.lockType != UN:
            owner = req.lockOwner
            conflict = self.conflict(ino, owner, req.lockFlock, req.lockType, start, end)
            if conflict is not None and req.lockWaitMs and not req.lockFlock:
                if self.deadlock(ino, owner, req.lockType, start, end):
                    self.waiting.pop(owner, None)
                    self.suspected.pop(owner, None)
                    raise OSError(errno.EDEADLK, "waiting would deadlock")
                self.waiting[owner] = (ino, req.lockType, start, end, time.monotonic())
            with trio.move_on_after(req.lockWaitMs / 1000):
                while self.conflict(ino, owner, req.lockFlock, req.lockType, start, end) is not None:
                    await self.changed.setdefault(ino, trio.Event()).wait()
                    if not req.lockFlock and owner in self.waiting:  # (still asking: kept fresh)
                        self.waiting[owner] = (*self.waiting[owner][:4], time.monotonic())
            if self.conflict(ino, owner, req.lockFlock, req.lockType, start, end) is not None:
                if owner in self.waiting:
                    self.waiting[owner] = (*self.waiting[owner][:4], time.monotonic())
                raise OSError(errno.EAGAIN, "locked by another owner")
            self.waiting.pop(owner, None)
            self.suspected.pop(owner, None)
        self.set(ino, req.lockOwner, req.lockFlock, req.lockType, start, end, req.lockPid)

    async def _graced(self, req) -> bool:
        """Wait out the reclaim grace: a call that may wait (a blocking
        lock's slice) waits at most its slice (False: the grace goes on, the
        node asks again); a test or a non-blocking call waits it all."""
        left = self.grace_until - trio.current_time()
        if left <= 0:
            return True
        if req.lockWaitMs and not req.lockTest:
            await trio.sleep(min(left, req.lockWaitMs / 1000))
            return trio.current_time() >= self.grace_until
        await trio.sleep(left)
        return True

    def _reclaim(self, ino: int, req, start: float, end: float) -> None:
        """A lock its node's program held under the term before: taken at
        once, unless another owner took it meanwhile (the node came back
        after the grace)."""
        if req.lockType == UN:
            raise OSError(errno.EINVAL, "invalid lock")
        lk = self.conflict(ino, req.lockOwner, req.lockFlock, req.lockType, start, end)
        if lk is not None:
            raise OSError(errno.ENOLCK, f"taken by {lk.owner} before it came back")
        self.set(ino, req.lockOwner, req.lockFlock, req.lockType, start, end, req.lockPid)


# -- a node's side: its programs' lock calls, and the kernel's view of them ------------

class VmFile:
    """A jailed program's file descriptor on a VM file system of this node's view."""

    __slots__ = ("fs", "ino", "pos", "flags")

    def __init__(self, fs_, ino: int, pos: int, flags: int = 0):
        # (all from one read of fdinfo: one open file's, even if the
        # program puts another on the number meanwhile)
        self.fs, self.ino, self.pos, self.flags = fs_, ino, pos, flags


class NodeLocks:
    def __init__(self, node: str, view_device: str | None = None):
        self.node = node
        self.view = None            # drvs.dvos.view.View, once mounted
        self.device = view_device   # "major:minor" of the view, for /proc/locks
        # (fs, server inode, owner, flock) -> (host tgid, view inode, granted at, the server's term)
        self.held: dict[tuple, tuple] = {}
        self.probed: dict = {}  # fs -> when its server was last asked for its term

    # -- which file --

    def file_of(self, host_pid: int, fd: int) -> VmFile | None:
        """The VM file behind a program's fd, or None (another file
        system: the kernel's alone).  From /proc, never through the view
        (this loop serves the view)."""
        from .client import TAG_SHIFT  # (not at the top: client imports server, which imports this)

        if self.view is None or fd < 0:
            return None
        info = _fdinfo(host_pid, fd)
        if info is None or "mnt_id" not in info or "ino" not in info:
            return None
        mount = _mount(host_pid, info["mnt_id"])
        if mount is None or mount[1] != "fuse.drvs" or (self.device and mount[0] != self.device):
            return None
        ino = info["ino"]
        fs_ = self.view.slots.get(ino >> TAG_SHIFT)
        if fs_ is None:
            return None
        return VmFile(fs_, fs_.kernel_inode(ino), info.get("pos", 0), info.get("flags", 0))

    # -- the calls --

    async def fcntl(self, caller, a, reply_cls, kernel):
        try:
            return await self._fcntl(caller, a, reply_cls, kernel)
        except pyfuse3.FUSEError as e:  # the file server's answer (or none within its bound)
            return reply_cls(error=e.errno)

    async def flock(self, caller, a, reply_cls, kernel):
        try:
            return await self._flock(caller, a, reply_cls, kernel)
        except pyfuse3.FUSEError as e:
            return reply_cls(error=e.errno)

    async def _fcntl(self, caller, a, reply_cls, kernel):
        f = self.file_of(caller.host_pid, a["fd"])
        if f is None or a["cmd"] not in (F_GETLK, F_SETLK, F_SETLKW):
            return kernel
        from .. import _sys

        try:
            type_, whence, start, length, _pid = FLOCK.unpack(_sys.read_mem(caller.host_pid, a["lock"], FLOCK.size))
        except OSError:
            return reply_cls(error=errno.EFAULT)
        if type_ not in (RD, WR, UN) or whence not in (0, 1, 2) or (a["cmd"] == F_GETLK and type_ == UN):
            return kernel  # the kernel says EINVAL
        where = f.fs.where_open(f.ino)
        base = 0 if whence == 0 else f.pos if whence == 1 else (await f.fs.getattr(f.ino)).st_size
        lo = base + start
        if length > 0:
            hi = lo + length
        elif length == 0:
            hi = -1
        else:
            lo, hi = lo + length, lo
        if lo < 0:
            return reply_cls(error=errno.EINVAL)
        owner = f"{self.node}:posix:{caller.pid}"
        if a["cmd"] == F_GETLK:
            r = await self._call(f, where, owner, False, type_, lo, hi, caller.pid, test=True)
            if r.lockType == UN:
                return kernel  # nothing elsewhere: the kernel answers (and sees this node's own)
            out = FLOCK.pack(r.lockType, 0, r.lockStart, 0 if r.lockEnd < 0 else r.lockEnd - r.lockStart, r.lockPid)
            try:
                _sys.write_mem(caller.host_pid, a["lock"], out)
            except OSError:
                return reply_cls(error=errno.EFAULT)
            return reply_cls(value=0)
        return await self._take(f, where, owner, False, type_, lo, hi, caller, a["cmd"] == F_SETLKW, reply_cls,
                                kernel)

    async def _flock(self, caller, a, reply_cls, kernel):
        f = self.file_of(caller.host_pid, a["fd"])
        op = a["op"]
        kind = op & ~LOCK_NB
        if f is None or kind not in (LOCK_SH, LOCK_EX, LOCK_UN):
            return kernel
        type_ = {LOCK_SH: RD, LOCK_EX: WR, LOCK_UN: UN}[kind]
        owner = f"{self.node}:flock:{caller.pid}"  # (the server keeps each file's locks apart)
        return await self._take(f, f.fs.where_open(f.ino), owner, True, type_, 0, -1, caller, not op & LOCK_NB,
                                reply_cls, kernel)

    async def _take(self, f, where, owner, flock, type_, lo, hi, caller, wait, reply_cls, kernel):
        while True:
            try:
                r = await self._call(f, where, owner, flock, type_, lo, hi, caller.pid,
                                     wait_ms=WAIT_SLICE_MS if wait else 0)
                break
            except pyfuse3.FUSEError as e:
                if e.errno != errno.EAGAIN:
                    return reply_cls(error=e.errno)
                if not wait:
                    return reply_cls(error=errno.EWOULDBLOCK if flock else errno.EAGAIN)
                if not caller.still_valid():
                    return kernel  # the caller is gone (its answer is dropped)
                if _signal_pending(caller.host_pid):
                    return reply_cls(error=ERESTARTSYS)
        key = (f.fs, r.attr.ino, owner, flock)  # the server's inode: released even if renamed meanwhile
        if type_ != UN:
            self.held[key] = (_tgid(caller.host_pid), f.ino, time.monotonic(), f.fs.epoch)
        # (an unlock keeps the entry: it may leave part of a range held; once
        # the kernel shows none of the owner's on the file, run() lets go)
        return kernel  # the local kernel takes it too (and drops it on close or exit)

    async def _call(self, f, where, owner, flock, type_, lo, hi, pid, test=False, wait_ms=0):
        """where: the file, as VmFs.named gives it."""
        return await f.fs.call(Call.lock, **where, lockType=type_, lockStart=lo, lockEnd=hi, lockOwner=owner,
                               lockWaitMs=wait_ms, lockTest=test, lockFlock=flock, lockPid=pid)

    # -- the kernel's view: a program that closed the file or ended --

    async def run(self) -> None:
        while True:
            await trio.sleep(AGENT_EVERY)
            if not self.held:
                self.probed.clear()
                continue
            await self._follow_terms()
            present = {(e[0], e[2], e[3]) for e in _proc_locks(self.device)}
            now = time.monotonic()
            for key, (tgid, ino, since, epoch) in list(self.held.items()):
                fs_, sino, owner, flock = key
                kind = "FLOCK" if flock else "POSIX"
                # (as the kernel shows the inode now: a new term renumbers it, VmFs._renumbered)
                if (kind, tgid, ino) in present or (kind, tgid, fs_.shows(ino)) in present or now - since < GRACE:
                    continue
                self.held.pop(key, None)
                if epoch != fs_.epoch:
                    continue  # (sino is a number of the term before: the new server never had this one)
                try:
                    await fs_.call(Call.lock, lockIno=sino, lockType=UN, lockStart=0, lockEnd=-1,
                                   lockOwner=owner, lockFlock=flock)
                except pyfuse3.FUSEError as e:
                    log.info("releasing %s's lock on inode %d: %s", owner, sino, os.strerror(e.errno))

    # -- a new server: the locks held here, given back --

    async def _follow_terms(self) -> None:
        """Ask each file system with locks held here for its server's term
        every PROBE_EVERY (any call learns it), so that a new server has
        them back within its grace even from a node that is otherwise idle."""
        now = time.monotonic()
        systems = {key[0] for key in self.held}
        self.probed = {fs_: t for fs_, t in self.probed.items() if fs_ in systems}
        async with trio.open_nursery() as nursery:  # (one silent server holds up no other VM's)
            for fs_ in systems:
                nursery.start_soon(self._follow, fs_, now)

    async def _follow(self, fs_, now: float) -> None:
        if now - self.probed.get(fs_, 0.0) >= PROBE_EVERY:
            self.probed[fs_] = now
            try:
                await fs_.call(Call.getattr, idempotent=True, path=b"")
            except pyfuse3.FUSEError:
                return  # (no server now: asked again next time)
        if any(v[3] != fs_.epoch for k, v in self.held.items() if k[0] is fs_):
            await self.reclaim(fs_)

    async def reclaim(self, fs_) -> None:
        """Give fs_'s new server every lock this node's programs hold on it,
        as the kernel shows them (each range, each owner); what it refuses
        (taken meanwhile by another owner) is lost, and said."""
        from .client import TAG_SHIFT

        epoch = fs_.epoch
        back = {}
        for kind, mode, tgid, ino, start, end in _proc_locks(self.device):
            if self.view is None or self.view.slots.get(ino >> TAG_SHIFT) is not fs_:
                continue
            ino = fs_.kernel_inode(ino)
            pid = _vm_pid(tgid)
            if pid is None:
                continue  # (ended: its lock goes with it; or a host process's: the node's own)
            flock = kind == "FLOCK"
            owner = f"{self.node}:flock:{pid}" if flock else f"{self.node}:posix:{pid}"
            try:
                r = await fs_.call(Call.lock, **fs_.where_open(ino), lockType=WR if mode == "WRITE" else RD,
                                   lockStart=start, lockEnd=end, lockOwner=owner, lockFlock=flock, lockPid=pid,
                                   lockReclaim=True)
            except pyfuse3.FUSEError as e:
                if e.errno in (errno.ENOLCK, errno.ENOENT, errno.ESTALE):
                    log.warning("%s: a lock of pid %d (host %d) on inode %d is lost after a change of server: "
                                "%s", fs_.target, pid, tgid, ino, os.strerror(e.errno))
                    continue
                # (the server away again: the next look gives all back again;
                # those it took are kept meanwhile, to be let go of if need be)
                self.held.update(back)
                return
            back[(fs_, r.attr.ino, owner, flock)] = (tgid, ino, time.monotonic(), epoch)
        if fs_.epoch != epoch:
            return  # (yet another term meanwhile: given back again)
        now = time.monotonic()
        # (a lock granted just before, that the kernel has yet to show, stays
        # of the old term: given back at the next look)
        for key in [k for k, v in self.held.items() if k[0] is fs_ and v[3] != epoch and now - v[2] >= GRACE]:
            del self.held[key]
        self.held.update(back)
        if back:
            log.info("%s: %d locks given back to the server of term %d", fs_.target, len(back), epoch)


def _fdinfo(pid: int, fd: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    out = {}
    for line in raw.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"pos", b"mnt_id", b"ino"):
            out[key.decode()] = int(value.strip())
        elif key == b"flags":
            out["flags"] = int(value.strip(), 8)
    return out


def _mount(pid: int, mnt_id: int) -> tuple[str, str] | None:
    """("major:minor", fstype) of mount mnt_id as pid sees it."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields and int(fields[0]) == mnt_id:
                    return fields[2], fields[fields.index("-") + 1]
    except (OSError, ValueError):
        return None
    return None


def _signal_pending(tid: int) -> bool:
    """Whether thread tid has a signal pending that it does not block and
    that is surely its to take: one sent to the thread, or one sent to its
    process that every other thread of it blocks.  (A process's signal that
    another thread may take is left alone: answered ERESTARTSYS without the
    kernel's own "signal pending" mark on this thread, the program would
    see errno 512.)"""
    try:
        raw = _status(tid)
        blocked = int(status_field(raw, b"SigBlk"), 16)
        own = int(status_field(raw, b"SigPnd"), 16) & ~blocked
        shared = int(status_field(raw, b"ShdPnd"), 16) & ~blocked
        if own or not shared:
            return bool(own)
        if status_field(raw, b"Threads") != b"1":
            tgid = int(status_field(raw, b"Tgid"))
            for other in os.listdir(f"/proc/{tgid}/task"):
                if int(other) != tid:
                    shared &= int(status_field(_status(int(other)), b"SigBlk") or b"0", 16)
        return bool(shared)
    except (OSError, ValueError):
        return False


def _status(tid: int) -> bytes:
    with open(f"/proc/{tid}/status", "rb") as f:
        return f.read()


def _tgid(pid: int) -> int:
    try:
        return int(status_field(_status(pid), b"Tgid"))
    except (OSError, ValueError):
        return pid


def _vm_pid(host_pid: int) -> int | None:
    """host_pid's tgid in its innermost pid namespace (the VM's), as a
    program's lock calls name their owner (Caller.pid); None for a process
    of this host's own pid namespace (a host's drvs mount: its locks are
    the node's alone), or one that ended."""
    try:
        ids = status_field(_status(host_pid), b"NStgid").split()
        return int(ids[-1]) if len(ids) > 1 else None
    except (OSError, ValueError, IndexError):
        return None


def _proc_locks(device: str | None) -> list:
    """(kind, mode, host pid, inode, start, end) of every lock the kernel
    holds on the view: kind POSIX or FLOCK (OFD locks stay the node's),
    mode READ or WRITE, end exclusive (-1: to the end of the file)."""
    out = []
    want = None
    if device:
        major, minor = device.split(":")
        want = f"{int(major):02x}:{int(minor):02x}:"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 6 or fields[1] == "->":
                    continue
                kind, mode, pid, where = fields[1], fields[3], fields[4], fields[5]
                if kind not in ("POSIX", "FLOCK") or (want and not where.startswith(want)):
                    continue
                try:
                    end = -1 if len(fields) < 8 or fields[7] == "EOF" else int(fields[7]) + 1
                    out.append((kind, mode, int(pid), int(where.rsplit(":", 1)[1]), int(fields[6]), end))
                except (ValueError, IndexError):
                    continue
    except OSError:
        pass
    return out
