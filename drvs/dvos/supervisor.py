"""The node's system-call supervisor: serves what the DVOS filter
(ext/seccomp.c) sends out of jailed programs, as Minix-style messages to the
servers of drvs/dvos/syscalls.py's table.

A run's listener reaches the node's drvmmd over a root-only unix socket
(`hand_over`, from drvs-run) or directly (runs the daemon starts).  Each
listener is served by one trio task, which hands each notification to a
task of its own: a call that waits on another node holds up no other.

A notification's caller is read from /proc and then checked with the
notification-id-valid ioctl: if the caller died (and its pid was reused)
in between, the answer is dropped, never given to another process."""

import errno
import logging
import os
import select
import socket

import trio

from .. import _sys
from ..errors import SetupError
from ..ipc.message import IpcError, Msg
from ..ipc.schema import pm
from . import pidrange, syscalls
from .pm import server

log = logging.getLogger("drvmmd")
CAP_KILL = 5
MAX_SIG = 64


def socket_path(cfg) -> str:
    return f"{cfg.state_dir}/supervisor.sock"


def hand_over(cfg, vm: str, listener: int) -> None:
    """Give a run's listener to this node's drvmmd (drvs-run's side)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.connect(socket_path(cfg))
            s.sendmsg([vm.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, listener.to_bytes(4, "little"))])
    except OSError as e:
        raise SetupError(f"drvmmd does not answer on {socket_path(cfg)} ({e.strerror}): on a cluster node, "
                         "programs need it to reach the VM's other nodes") from None
    finally:
        os.close(listener)


class Caller:
    """Who made a call: from /proc/PID/status (host pid), in VM terms."""

    __slots__ = ("pid", "uid", "euid", "cap_kill", "pgid", "host_pid", "still_valid")

    @classmethod
    def read(cls, host_pid: int) -> "Caller | None":
        try:
            with open(f"/proc/{host_pid}/status", "rb") as f:
                raw = f.read()
        except OSError:
            return None
        fields = {}
        for line in raw.decode(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.split()
        c = cls()
        c.host_pid = host_pid
        try:
            c.pid = int(fields["NStgid"][-1])  # the innermost pid namespace: the cell's, the VM pid
            c.pgid = int(fields["NSpgid"][-1])
            c.uid, c.euid = int(fields["Uid"][0]), int(fields["Uid"][1])
            c.cap_kill = bool(int(fields["CapEff"][0], 16) >> CAP_KILL & 1)
        except (KeyError, IndexError, ValueError):
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
        self.nursery: trio.Nursery | None = None
        self.handlers = {"kill": self.kill, "tkill": self.tkill, "tgkill": self.tgkill,
                         "rt_sigqueueinfo": self.rt_sigqueueinfo, "rt_tgsigqueueinfo": self.rt_tgsigqueueinfo}
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
        try:
            _sys.set_sync_wakeup(fd)
            poll = select.poll()
            poll.register(fd, select.POLLIN)
            async with trio.open_nursery() as calls:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    events = poll.poll(0)
                    if not events:
                        continue
                    if events[0][1] & select.POLLIN:
                        try:
                            notif = _sys.recv(fd)
                        except OSError as e:
                            if e.errno in (errno.ENOENT, errno.EINTR):  # the caller died meanwhile
                                continue
                            raise
                        calls.start_soon(self.serve_one, vm, fd, notif)
                    elif events[0][1] & (select.POLLHUP | select.POLLERR):
                        break  # no program uses the filter any more
        except OSError as e:
            log.warning("supervisor of a %s program: %s", vm, e)
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    async def serve_one(self, vm: str, fd: int, notif) -> None:
        nid, host_pid, nr, _arch, raw = notif
        call = syscalls.BY_NR.get(nr)
        caller = Caller.read(host_pid)
        if caller is None or not _sys.id_valid(fd, nid):
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
        _sys.respond(fd, nid, reply.value, reply.error, reply.cont)

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
        req = pm.Signal.new_message(vm=vm, pid=target, sig=sig, thread=thread, tgid=tgid, info=info)
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
        if delivered:
            return Reply()
        return Reply(error=errno.EPERM if denied else errno.ESRCH)

    async def _signal_vm(self, vm: str, req) -> tuple[int, int]:
        """A group or every process: the VM's PM fans it out; without one
        (a VM with no shares, or between two PMs) this node does."""
        try:
            reply = await self.fabric.sendrec(f"pm@{vm}", Msg(pm.PmCall.signal, req.to_bytes_packed()))
            if reply.status == 0:
                r = pm.SignalReply.from_bytes_packed(reply.payload)
                return r.delivered, r.denied
        except IpcError as e:
            if e.errno != errno.ENOENT:
                log.info("pm@%s: %s; signalling from here", vm, e)
        nodes = await server.vm_nodes(self.etcd, vm, self.node)
        delivered, denied, _ = await server.signal_nodes(self.fabric, self.procs, nodes, req)
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


def _call_errno(e: IpcError) -> int:
    # Fabric failures (node gone, timeout) reach the program as EAGAIN-free
    # errors it already knows from kill(2): the process is not reachable.
    return errno.ESRCH if e.errno in (errno.ENOENT, errno.EHOSTUNREACH, errno.ECONNRESET) else e.errno or errno.EIO
