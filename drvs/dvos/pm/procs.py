"""The per-node half of the process manager: list and signal the processes
of this node's cells, by their VM pids.

Each cell is seen through a procfs of its own pid namespace, mounted
detached (fsopen with `pidns=`, Linux 6.18 here): no mount-table entry, and
a /proc/PID directory fd of it is a pidfd, so a signal reaches the process
that was checked, never a later one with a reused pid."""

import errno
import logging
import os
import select
import time

from ... import _sys
from .. import pidrange
from ...ipc.message import IpcError, Msg
from ...ipc.schema import new, pm
from ...ns import cell as cells

log = logging.getLogger("drvmmd")
Call = pm.PmCall
CAP_KILL = 5
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def decode(kind, msg: Msg):
    try:
        return kind.from_bytes_packed(msg.payload)
    except Exception:  # noqa: BLE001 - malformed input from the wire
        raise IpcError("malformed request", errno.EBADMSG) from None


def table_message(rows: list[dict], failed: list[str]) -> Msg:
    table = pm.ProcessTable.new_message()
    out = table.init("processes", len(rows))
    for i, row in enumerate(rows):
        for k, v in row.items():
            setattr(out[i], k, v)
    fl = table.init("failed", len(failed))
    for i, f in enumerate(failed):
        fl[i] = f
    return Msg(0, table.to_bytes_packed())


class CellProc:
    """The procfs of one cell, valid while that cell's init lives."""

    def __init__(self, init_pid: int, init_pidfd: int, fd: int):
        self.init_pid, self.init_pidfd, self.fd = init_pid, init_pidfd, fd

    def alive(self) -> bool:
        """The init still runs (a pidfd polls readable once it exits, even
        while it waits, a zombie, for its reaper)."""
        return not select.select([self.init_pidfd], [], [], 0)[0]

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.init_pidfd)


class NodeProcs:
    """Endpoint procs@NODE: one message table over this node's cells."""

    def __init__(self, cfg, node: str, pid_index: int = 0):
        """pid_index: this node's pid range (0: none, a single node)."""
        self.cfg, self.node, self.pid_index = cfg, node, pid_index
        self.cells: dict[str, CellProc] = {}
        self.boot = _boot_time()
        # Everything here is a few reads of procfs: all of it is served on
        # the fabric's fast path (Fabric.register), none waits on anything.
        self.table = {Call.signal: self.signal, Call.list: self.listing, Call.read: self.read}

    def fast(self, msg: Msg) -> Msg:
        handler = self.table.get(msg.type)
        if handler is None:
            raise IpcError(f"procs: unknown message type {msg.type}", errno.ENOSYS)
        return handler(msg)

    async def handle(self, msg: Msg) -> Msg:
        return self.fast(msg)

    def close(self) -> None:
        for c in self.cells.values():
            c.close()
        self.cells.clear()

    # -- the cell's procfs ---------------------------------------------------

    def proc(self, vm: str) -> CellProc | None:
        """The procfs of vm's cell here, or None when there is no cell."""
        known = self.cells.get(vm)
        if known is not None and known.alive():
            return known
        if known is not None:
            known.close()
            del self.cells[vm]
        cell = cells.peek(self.cfg, vm)  # never waits on a run being started
        if cell is None:
            return None
        try:
            ns = os.open(f"/proc/{cell.init_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            try:
                fd = _sys.open_procfs(ns)
            finally:
                os.close(ns)
        except OSError as e:
            cell.close()
            raise IpcError(f"cell {vm} on {self.node}: {e.filename or 'procfs'}: {e.strerror}", errno.EIO) from None
        self.cells[vm] = CellProc(cell.init_pid, cell.init_pidfd, fd)
        return self.cells[vm]

    def owns(self, pid: int) -> bool:
        """Whether pid is one of this node's VM pids (not pid 1, nor the
        anchor of another node's process group, whose pid is that group's)."""
        if pid == 1:
            return False
        return not self.pid_index or pidrange.index_of(pid) == self.pid_index

    # -- signal ---------------------------------------------------------------

    def signal(self, msg: Msg) -> Msg:
        req = decode(pm.Signal, msg)
        delivered, denied = self.deliver(req)
        return Msg(0, new(pm.SignalReply, delivered=delivered, denied=denied).to_bytes_packed())

    def deliver(self, req) -> tuple[int, int]:
        """Signal what req names among this node's processes of req.vm;
        (delivered, denied) as the kernel's kill counts them."""
        cp = self.proc(req.vm)
        if cp is None:
            return 0, 0
        if req.pid > 0:
            targets = [req.pid]
        else:
            targets = [p for p in _pids(cp.fd) if self.owns(p)]  # not the init, nor group anchors
            if req.pid < -1:
                targets = [p for p in targets if _pgid(cp.fd, p) == -req.pid]
            elif req.caller.node == self.node:
                targets = [p for p in targets if p != req.caller.pid]  # kill(-1) spares the caller
        delivered = denied = 0
        for pid in targets:
            outcome = self._one(cp.fd, pid, req)
            delivered += outcome == 0
            denied += outcome == errno.EPERM
        return delivered, denied

    def _one(self, procfd: int, pid: int, req) -> int:
        """0, EPERM or ESRCH for one process (or thread)."""
        try:
            fd = os.open(str(pid), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=procfd)
        except OSError:
            return errno.ESRCH
        try:
            status = _status(fd)
            if status is None:
                return errno.ESRCH
            if req.thread and req.tgid > 0 and status.get("Tgid") != str(req.tgid):
                return errno.ESRCH
            if not _may_signal(req.caller, status):
                return errno.EPERM
            if req.sig == 0:
                return 0
            # A kill goes as the kernel's SI_USER.  Its si_pid reads 0, as for
            # any signal from outside the receiver's pid namespace (the
            # kernel clears it: we send from the host's).
            info = None
            if req.info:  # rt_sigqueueinfo's own siginfo; its signal is the call's, as the kernel has it
                info = bytearray(bytes(req.info))
                info[0:4] = req.sig.to_bytes(4, "little", signed=True)
                info = bytes(info)
            try:
                _sys.pidfd_signal(fd, req.sig, info, req.thread)
            except OSError as e:
                return e.errno if e.errno in (errno.EPERM, errno.ESRCH) else errno.ESRCH
            return 0
        finally:
            os.close(fd)

    # -- list -------------------------------------------------------------------

    def listing(self, msg: Msg) -> Msg:
        return table_message(self.processes(decode(pm.ListRequest, msg).vm), [])

    def processes(self, vm: str) -> list[dict]:
        cp = self.proc(vm)
        if cp is None:
            return []
        rows = []
        for pid in _pids(cp.fd):
            if not self.owns(pid):
                continue  # the cell's init, a group's anchor: DRVS's, not the VM's
            st = _stat(cp.fd, pid)
            if st is None:
                continue
            started = self.boot + st.pop("start_ticks") / CLK_TCK
            comm = st.pop("comm")
            rows.append({**st, "pid": pid, "node": self.node, "started": started,
                         "command": _cmdline(cp.fd, pid) or f"[{comm}]"})
        return rows


    def read(self, msg: Msg) -> Msg:
        req = decode(pm.ReadRequest, msg)
        if req.name not in SHARED_FILES or req.pid <= 1:
            raise IpcError(f"procs: /proc/{req.pid}/{req.name} is not shared", errno.EACCES)
        cp = self.proc(req.vm)
        data = _read(cp.fd, f"{req.pid}/{req.name}") if cp is not None else None
        if data is None:
            raise IpcError(f"no process {req.pid} on {self.node}", errno.ENOENT)
        return Msg(0, pm.FileData.new_message(data=data).to_bytes_packed())


# What another node's view of the VM's /proc may read of a process here
# (what ps, top, pgrep and pkill read): files any user may read in a
# local /proc.  environ and io stay with their node (the kernel lets only
# the owner or a tracer read them).
SHARED_FILES = ("stat", "status", "cmdline", "comm", "statm", "wchan")


# -- reading a procfs ----------------------------------------------------------


def _pids(procfd: int) -> list[int]:
    return sorted(int(n) for n in os.listdir(procfd) if n.isdigit())


def _read(procfd: int, rel: str) -> bytes | None:
    try:
        fd = os.open(rel, os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)


def _pgid(procfd: int, pid: int) -> int | None:
    raw = _read(procfd, f"{pid}/stat")
    if raw is None:
        return None
    return int(raw[raw.rindex(b")") + 2:].split(None, 3)[2])


def status_field(raw: bytes, key: bytes) -> bytes:
    """One field of a /proc/PID/status text (b"" when absent): a few finds,
    a third of the cost of parsing every line, on every served call."""
    start = raw.find(b"\n" + key + b":")
    if start < 0:
        return b""
    start += len(key) + 2
    end = raw.find(b"\n", start)
    return raw[start:end if end >= 0 else len(raw)].strip()


def _status(dirfd: int, path: str = "status") -> dict | None:
    """The fields of a status file (path under dirfd: a /proc/PID directory,
    or a procfs root with "PID/status") that signalling and listing need."""
    raw = _read(dirfd, path)
    if raw is None:
        return None
    return {key: status_field(raw, key.encode()).decode() for key in ("Uid", "Tgid")}


def _stat(procfd: int, pid: int) -> dict | None:
    raw = _read(procfd, f"{pid}/stat")
    if raw is None:
        return None
    text = raw.decode(errors="replace")
    comm = text[text.index("(") + 1:text.rindex(")")]
    f = text[text.rindex(")") + 2:].split()
    # f[0] is field 3 of proc(5): state
    status = _status(procfd, f"{pid}/status") or {}
    return {"state": f[0], "ppid": int(f[1]), "pgid": int(f[2]), "sid": int(f[3]),
            "cpuSeconds": (int(f[11]) + int(f[12])) / CLK_TCK, "start_ticks": int(f[19]),
            "rss": int(f[21]) * PAGE, "threads": int(f[17]), "comm": comm,
            "uid": int((status.get("Uid") or "0").split()[0])}


def _cmdline(procfd: int, pid: int) -> str:
    raw = _read(procfd, f"{pid}/cmdline") or b""
    return " ".join(a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0") if a)


def _may_signal(caller, status: dict) -> bool:
    """The kernel's kill_ok_by_cred: CAP_KILL, or the caller's real or
    effective uid is the target's real or saved uid."""
    if caller.capKill:
        return True
    uids = (status.get("Uid") or "").split()
    if len(uids) < 3:
        return False
    real, saved = int(uids[0]), int(uids[2])
    return caller.euid in (real, saved) or caller.uid in (real, saved)


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return time.time() - time.monotonic()
