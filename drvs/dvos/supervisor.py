"""The node's system-call supervisor: serves what the DVOS filter
(ext/seccomp.c) sends out of jailed programs, as Minix-style messages to the
servers of drvs/dvos/syscalls.py's table.

A run's listener reaches the node's drvmmd over a root-only unix socket
(handover.py, from drvs-run) or directly (runs the daemon starts).  Each
listener is served in three lanes (see `Supervisor.supervise`); no call
waits behind another: one that waits on another node holds up nothing.

A notification's caller is read from /proc and then checked with the
notification-id-valid ioctl: if the caller died (and its pid was reused)
in between, the answer is dropped, never given to another process."""

import asyncio
import errno
import logging
import os
import socket

import pyfuse3
import trio

from .. import _fs, _sys
from ..fs import fallocate
from ..ipc.fabric import run_fast
from ..ipc.message import IpcError, Msg
from ..ipc.schema import new, pm
from . import pidrange, syscalls
from .handover import socket_path
from .pm import server
from .pm.procs import status_field

log = logging.getLogger("drvmmd")
WRITE_BACK_WAIT = 30.0  # seconds a sync waits for the kernel to write back a node's dirty pages of the view
CAP_KILL = 5
MAX_SIG = 64
FORWARD_TIMEOUT = 2.0  # seconds a signal waits for another node before failing with ESRCH


class Caller:
    """Who made a call: from /proc/PID/status (host pid), in VM terms."""

    __slots__ = ("pid", "uid", "euid", "cap_kill", "pgid", "host_pid", "still_valid")

    @classmethod
    def read(cls, host_pid: int) -> "Caller | None":
        try:
            fd = os.open(f"/proc/{host_pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                raw = os.read(fd, 8192)
            finally:
                os.close(fd)
        except OSError:
            return None
        c = cls()
        c.host_pid = host_pid
        try:
            c.pid = int(status_field(raw, b"NStgid").split()[-1])  # the innermost pid namespace: the VM pid
            c.pgid = int(status_field(raw, b"NSpgid").split()[-1])
            uids = status_field(raw, b"Uid").split()
            c.uid, c.euid = int(uids[0]), int(uids[1])
            c.cap_kill = bool(int(status_field(raw, b"CapEff"), 16) >> CAP_KILL & 1)
        except (IndexError, ValueError):
            return None
        return c

    def fill(self, m, node: str) -> None:
        m.pid, m.uid, m.euid, m.capKill, m.node = self.pid, self.uid, self.euid, self.cap_kill, node


class Reply:
    """A call's result: a value, an errno, or "let the kernel run it"."""

    __slots__ = ("value", "error", "cont")

    def __init__(self, value: int = 0, error: int = 0, cont: bool = False):
        self.value, self.error, self.cont = value, error, cont


KERNEL = Reply(cont=True)


class Supervisor:
    """Serves the node's listeners.  `fabric` reaches the servers, `procs`
    is this node's procs@NODE (called directly, not over the fabric)."""

    def __init__(self, cfg, node: str, fabric, etcd, procs, pid_index: int):
        self.cfg, self.node, self.fabric, self.etcd, self.procs = cfg, node, fabric, etcd, procs
        self.pid_index = pid_index
        self.owners: dict[int, str] = {}  # pid range index -> node
        self._inflight: dict[int, int] = {}  # listener -> forwards awaiting their reply
        self._closing: set[int] = set()      # listeners to close after their last forward
        self.nursery: trio.Nursery | None = None
        from ..fs.locks import NodeLocks

        self.locks = NodeLocks(node)  # its view is set once mounted
        self.handlers = {"kill": self.kill, "tkill": self.tkill, "tgkill": self.tgkill,
                         "rt_sigqueueinfo": self.rt_sigqueueinfo, "rt_tgsigqueueinfo": self.rt_tgsigqueueinfo,
                         "fcntl": self.fcntl, "flock": self.flock, "fallocate": self.fallocate,
                         "sync": self.sync, "syncfs": self.syncfs}
        missing = [s.name for s in syscalls.TABLE if s.level == syscalls.SERVED and s.name not in self.handlers]
        assert not missing, f"served system calls without a handler: {missing}"

    # -- listeners -------------------------------------------------------------

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept listeners on the node's supervisor socket."""
        path = socket_path(self.cfg)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)  # root only: a listener is power over its programs
        try:
            await sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(64)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            with sock:
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._receive, conn)

    async def _receive(self, conn) -> None:
        with conn:
            try:
                with trio.fail_after(5):
                    data, ancdata, _flags, _addr = await conn.recvmsg(256, socket.CMSG_SPACE(4),
                                                                      socket.MSG_CMSG_CLOEXEC)
            except (OSError, trio.TooSlowError):
                return
        fds = [int.from_bytes(d[:4], "little") for level, kind, d in ancdata
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS]
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        self.adopt(data.decode(errors="replace"), fds[0])

    def adopt(self, vm: str, listener: int) -> None:
        """Serve listener (ours from now on) for a program of vm."""
        self.nursery.start_soon(self.supervise, vm, listener)

    async def supervise(self, vm: str, fd: int) -> None:
        """Serve one listener until no program uses its filter.

        Three lanes, fastest first: a C thread (ext/fastpath.c) answers
        what needs no server; a signal to one pid of another node, whose
        connection is open, is sent from the asyncio side as the
        notification arrives (`_forward`, no trio hop); the rest (groups,
        -1, sigqueue, first contacts) is served by trio tasks."""
        try:
            handle = _sys.fastpath_start(fd, pidrange.SPAN, self.pid_index)
        except OSError as e:
            log.warning("supervisor of a %s program: %s", vm, e)
            os.close(fd)  # its calls now fail with ENOSYS: reported, not hung
            return
        wake = _sys.fastpath_fd(handle)
        loop = asyncio.get_running_loop()  # the host loop trio runs as a guest of
        token = trio.lowlevel.current_trio_token()
        ended = trio.Event()
        open_ = True  # the trio lane still takes calls

        def to_trio(calls, notif):
            if open_:
                calls.start_soon(self.serve_one, vm, fd, notif)
            else:  # shutting down: the call fails rather than waits
                try:
                    _sys.respond(fd, notif[0], 0, errno.ENOSYS, False)
                except OSError:
                    pass

        try:
            async with trio.open_nursery() as calls:
                def retry(notif):  # the trio lane (from the asyncio side)
                    token.run_sync_soon(to_trio, calls, notif)

                def on_wake():
                    batch, done = _sys.fastpath_take(handle)
                    for notif in batch:
                        if not self._forward(vm, fd, notif, retry):
                            retry(notif)
                    if done:
                        loop.remove_reader(wake)
                        token.run_sync_soon(ended.set)

                loop.add_reader(wake, on_wake)
                try:
                    await ended.wait()
                finally:
                    loop.remove_reader(wake)
                    open_ = False
        finally:
            _sys.fastpath_stop(handle)
            # In-flight forwards answer on fd: it closes after the last.
            self._close_when_idle(fd)

    # -- the asyncio lane ------------------------------------------------------

    def _forward(self, vm: str, fd: int, notif, retry) -> bool:
        """Send a signal for one pid of another node straight from the
        asyncio side, if its node's connection is open; False: not this
        lane's (the trio lane serves it).  Never raises: an exception here
        would leave the call unanswered."""
        try:
            return self._try_forward(vm, fd, notif, retry)
        except Exception:  # noqa: BLE001 - the trio lane serves it, and says what is wrong
            log.exception("fast lane, %s", vm)
            return False

    def _try_forward(self, vm: str, fd: int, notif, retry) -> bool:
        nid, host_pid, nr, _arch, raw = notif
        call = syscalls.BY_NR.get(nr)
        if call is None or call.name not in ("kill", "tkill", "tgkill"):
            return False
        a = call.decode(raw)
        target = a.get("pid", a.get("tid", 0))
        if call.name == "kill" and target <= 0:
            return self._group_here(vm, fd, nid, host_pid, a)
        if target <= 0 or (call.name != "kill" and a.get("tgid", 1) <= 0):
            return False
        node = self.owners.get(pidrange.index_of(target))
        lane = self.fabric.lanes.get(node) if node else None
        caller = Caller.read(host_pid) if lane is not None and not lane.closed else None
        if caller is None or not _sys.id_valid(fd, nid):
            return False
        req = new(pm.Signal, vm=vm, pid=target, sig=a["sig"], thread=call.name != "kill", tgid=a.get("tgid", 0))
        caller.fill(req.caller, self.node)
        again = lambda: retry(notif)  # noqa: E731
        timer = None

        # The reply is awaited with a callback and a timer, not a task: on
        # this path every microsecond is the program's.
        def done(reply, error):
            timer.cancel()
            self._forwarded(fd, nid, node, lane, again, reply, error)

        def late():
            lane.cancel(qid)
            self._forwarded(fd, nid, node, lane, again, None, TimeoutError())

        qid = lane.sendrec(f"procs@{node}", Msg(pm.PmCall.signal, req.to_bytes_packed()),
                           int(FORWARD_TIMEOUT * 1000), done)
        self._inflight[fd] = self._inflight.get(fd, 0) + 1
        timer = asyncio.get_running_loop().call_later(FORWARD_TIMEOUT + 1, late)
        return True

    def _group_here(self, vm: str, fd: int, nid: int, host_pid: int, a: dict) -> bool:
        """kill(-pgid), kill(0) or kill(-1) when pm@VM is this node's and
        can answer at once (a VM on this node only)."""
        fast = self.fabric.fast.get(f"pm@{vm}")
        if fast is None or a["pid"] == -(1 << 31):
            return False
        caller = Caller.read(host_pid)
        if caller is None or not _sys.id_valid(fd, nid):
            return False
        req = new(pm.Signal, vm=vm, pid=a["pid"] or -caller.pgid, sig=a["sig"])
        caller.fill(req.caller, self.node)
        reply = run_fast(fast, f"pm@{vm}", Msg(pm.PmCall.signal, req.to_bytes_packed()))
        if reply is None:
            return False
        error = reply_errno(reply)
        _sys.respond(fd, nid, 0, error, False)
        return True

    def _forwarded(self, fd: int, nid: int, node: str, lane, retry, reply, error) -> None:
        """Answer a forwarded call from its reply (or error).  A call that
        failed goes to the trio lane, which says what is wrong; a connection
        found broken (its node's drvmmd restarted, say) is dropped first, and
        the trio lane connects again: the target is most likely alive."""
        err = errno.ESRCH
        answer = True
        try:
            if isinstance(error, TimeoutError):
                log.info("signal to node %s: no answer within %g s", node, FORWARD_TIMEOUT)
            elif error is not None:
                raise error
            else:
                err = reply_errno(reply)
        except Exception as e:  # noqa: BLE001 - the trio lane serves it again
            if getattr(e, "kind", "") == "disconnected":  # the connection broke: connect again
                log.info("signal to node %s: %s; connecting again", node, e)
                self.fabric.drop_lane(node, lane)
            else:
                log.info("signal to node %s: %s", node, e)
            answer = False
            retry()
        finally:
            if answer:
                try:
                    _sys.respond(fd, nid, 0, err, False)
                except OSError:
                    pass
            self._inflight[fd] -= 1
            if self._inflight[fd] == 0 and fd in self._closing:
                self._closing.discard(fd)
                del self._inflight[fd]
                os.close(fd)

    def _close_when_idle(self, fd: int) -> None:
        if self._inflight.get(fd, 0) == 0:
            self._inflight.pop(fd, None)
            os.close(fd)
        else:
            self._closing.add(fd)

    async def serve_one(self, vm: str, fd: int, notif) -> None:
        nid, host_pid, nr, _arch, raw = notif
        call = syscalls.BY_NR.get(nr)
        caller = Caller.read(host_pid)
        if not _sys.id_valid(fd, nid):
            return  # the caller is gone
        if caller is None:  # alive but unreadable (no fds left here?): fail, never leave it waiting
            _sys.respond(fd, nid, 0, errno.EIO, False)
            return
        caller.still_valid = lambda: _sys.id_valid(fd, nid)
        try:
            if call is None or call.level != syscalls.SERVED:
                reply = Reply(error=errno.ENOSYS)
            else:
                reply = await self.handlers[call.name](vm, caller, call.decode(raw))
        except IpcError as e:
            log.info("%s from %s pid %d: %s", call.name, vm, caller.pid, e)
            reply = Reply(error=_call_errno(e))
        except Exception:  # noqa: BLE001 - the program gets EIO, the daemon stays up
            log.exception("serving %s for %s pid %d", call.name if call else nr, vm, caller.pid)
            reply = Reply(error=errno.EIO)
        try:
            _sys.respond(fd, nid, reply.value, reply.error, reply.cont)
        except OSError as e:  # never the end of the listener's other calls
            log.warning("answering %s for %s pid %d: %s", call.name if call else nr, vm, caller.pid, e)

    async def fcntl(self, vm: str, caller: Caller, a: dict) -> Reply:
        return await self.locks.fcntl(caller, a, Reply, KERNEL)

    async def flock(self, vm: str, caller: Caller, a: dict) -> Reply:
        return await self.locks.flock(caller, a, Reply, KERNEL)

    async def fallocate(self, vm: str, caller: Caller, a: dict) -> Reply:
        return await fallocate.call(self.locks.file_of, caller, a, Reply, KERNEL)

    async def sync(self, vm: str, caller: Caller, a: dict) -> Reply:
        """sync(2): the VM's file system first (sync has no error to say),
        then the kernel's sync of the node's own file systems."""
        fs_ = self.locks.view.vms.get(vm) if self.locks.view is not None else None
        if fs_ is not None:
            try:
                await self._sync_fs(fs_)
            except OSError as e:
                log.info("sync of %s's file system by pid %d: %s", vm, caller.pid, os.strerror(e.errno))
        return KERNEL

    async def syncfs(self, vm: str, caller: Caller, a: dict) -> Reply:
        """syncfs(2) of a descriptor on the VM's file system: as sync, with
        its error; any other: the kernel's."""
        f = self.locks.file_of(caller.host_pid, a["fd"])
        if f is None:
            return KERNEL
        try:
            await self._sync_fs(f.fs)
        except OSError as e:
            return Reply(error=e.errno or errno.EIO)
        return Reply(value=0)

    async def _sync_fs(self, fs_) -> None:
        """The node's dirty pages of the view written back first (a shared
        writable mapping's: the kernel's own syncfs of the mount, which this
        loop serves, so in a thread), then the file server's sync."""
        path = self.locks.view.path

        def write_back():
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _fs.syncfs(fd)
            finally:
                os.close(fd)

        with trio.move_on_after(WRITE_BACK_WAIT):  # (a server away holds each write up to its bound)
            await trio.to_thread.run_sync(write_back, abandon_on_cancel=True)
        try:
            await fs_.syncfs()
        except pyfuse3.FUSEError as e:
            raise OSError(e.errno, os.strerror(e.errno)) from None

    # -- routing -----------------------------------------------------------------

    async def owner(self, pid: int) -> str | None:
        """The node whose range holds pid (None: nobody's, or ours)."""
        index = pidrange.index_of(pid)
        if index == 0 or index == self.pid_index:
            return None
        node = self.owners.get(index)
        if node is None:
            from ..cluster.membership import PID_RANGES

            entry = await self.etcd.get(f"{PID_RANGES}{index}")
            if entry is None:
                return ""
            node = self.owners[index] = entry.value
        return node

    async def _signal(self, vm: str, caller: Caller, target: int, sig: int, *, thread=False, tgid=0,
                      info=b"") -> Reply:
        if not 0 <= sig <= MAX_SIG:
            return Reply(error=errno.EINVAL)
        req = new(pm.Signal, vm=vm, pid=target, sig=sig, thread=thread, tgid=tgid, info=info)
        caller.fill(req.caller, self.node)
        if target > 0:
            # One process: straight to its node (the pid says which).
            node = await self.owner(target)
            if node is None:
                return KERNEL  # this node's own: the kernel's semantics
            if node == "":
                return Reply(error=errno.ESRCH)
            delivered, denied, _ = await server.signal_nodes(self.fabric, self.procs, [node], req)
        else:
            delivered, denied = await self._signal_vm(vm, req)
        if delivered or (target == -1 and denied):
            return Reply()  # kill(-1) fails only when there is nobody at all (the kernel's rule)
        return Reply(error=errno.EPERM if denied else errno.ESRCH)

    async def _signal_vm(self, vm: str, req) -> tuple[int, int]:
        """A group or every process: the VM's PM fans it out; without one
        (a VM with no shares, or between two PMs) this node does."""
        payload = req.to_bytes_packed()  # once: a builder written twice leaks in capnp
        try:
            reply = await self.fabric.sendrec(f"pm@{vm}", Msg(pm.PmCall.signal, payload))
            if reply.status == 0:
                r = pm.SignalReply.from_bytes_packed(reply.payload)
                return r.delivered, r.denied
            if reply.status != -errno.EREMCHG:
                return 0, 0  # the PM failed it (and may have signalled some): never twice
        except IpcError as e:
            if e.errno not in (errno.ENOENT, errno.EREMCHG):
                log.info("pm@%s: %s", vm, e)
                return 0, 0
        nodes = await server.vm_nodes(self.etcd, vm, self.node)
        delivered, denied, _ = await server.signal_nodes(self.fabric, self.procs, nodes, req, payload)
        return delivered, denied

    # -- the served calls (syscalls.TABLE) ------------------------------------------

    async def kill(self, vm, caller, a) -> Reply:
        pid = a["pid"]
        if pid == -(1 << 31):
            return Reply(error=errno.ESRCH)
        if pid == 0:
            pid = -caller.pgid
        return await self._signal(vm, caller, pid, a["sig"])

    async def tkill(self, vm, caller, a) -> Reply:
        if a["tid"] <= 0:
            return Reply(error=errno.EINVAL)
        return await self._signal(vm, caller, a["tid"], a["sig"], thread=True)

    async def tgkill(self, vm, caller, a) -> Reply:
        if a["tid"] <= 0 or a["tgid"] <= 0:
            return Reply(error=errno.EINVAL)
        return await self._signal(vm, caller, a["tid"], a["sig"], thread=True, tgid=a["tgid"])

    async def rt_sigqueueinfo(self, vm, caller, a) -> Reply:
        if a["pid"] <= 0:
            return Reply(error=errno.ESRCH)
        return await self._queued(vm, caller, a["pid"], a["sig"], a["uinfo"])

    async def rt_tgsigqueueinfo(self, vm, caller, a) -> Reply:
        if a["tid"] <= 0 or a["tgid"] <= 0:
            return Reply(error=errno.EINVAL)
        return await self._queued(vm, caller, a["tid"], a["sig"], a["uinfo"], thread=True, tgid=a["tgid"])

    async def _queued(self, vm, caller, target, sig, uinfo, **kw) -> Reply:
        if await self.owner(target) is None:
            return KERNEL
        info = self._read_siginfo(caller, uinfo)
        if info is None:
            return Reply(error=errno.EFAULT)
        return await self._signal(vm, caller, target, sig, info=info, **kw)

    @staticmethod
    def _read_siginfo(caller, addr) -> bytes | None:
        """The caller's siginfo; None for a bad pointer.  Checked again
        after the read: the pid may have been reused in between."""
        try:
            info = _sys.read_mem(caller.host_pid, addr, 128)
        except OSError:
            return None
        return info if caller.still_valid() else None


KILL_ERRNOS = (errno.EINVAL, errno.EPERM, errno.ESRCH)  # all kill(2) may say


def reply_errno(reply: Msg) -> int:
    """A SignalReply as kill(2)'s result: 0 when one process got it, EPERM
    when some were found but none was the caller's to signal, else ESRCH
    (also for a node that could not say: its processes are out of reach)."""
    if reply.status == 0:
        r = pm.SignalReply.from_bytes_packed(reply.payload)
        return 0 if r.delivered else errno.EPERM if r.denied else errno.ESRCH
    return -reply.status if -reply.status in KILL_ERRNOS else errno.ESRCH


def _call_errno(e: IpcError) -> int:
    # Fabric failures (node gone, timeout) reach the program as an error it
    # knows from kill(2): the process is out of reach.
    return e.errno if e.errno in KILL_ERRNOS else errno.ESRCH
