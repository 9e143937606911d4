"""A cell: one VM's share of this node.

The cell is a cgroup (the VM's limits on this node) and a set of namespaces
(pid, ipc, uts, net, cgroup) held by a small init, pid 1 of the cell.  Runs
join the cell; each has its own child cgroup `run-ID` and its own mount
namespace.  A cell exists while runs use it: the last run to leave tears it
down, and the init leaves by itself if it finds the cell empty (the safety net
when runs were killed without a chance to clean up).

All changes happen under the cell's flock, held from "find or create the
cell" until the run's program has been exec'd inside it, so the init never
leaves under a run that is still joining.
"""

import errno
import fcntl
import json
import os
import select
import signal
import time
from collections import namedtuple

from ..config import Config
from ..errors import Conflict, DrvsError, SetupError, os_error
from ..vm.model import VmSpec
from . import launcher
from .cgroup import Cgroup, ensure_fast_migrations


class ActiveCell(namedtuple("ActiveCell", "vm cgroup init_pid init_pidfd")):
    """A live cell, with a pidfd on its init (for setns and signals)."""

    __slots__ = ()

    def close(self) -> None:
        os.close(self.init_pidfd)


class CellLock:
    """The flock of one VM's cell on this node."""

    def __init__(self, cfg: Config, vm: str):
        self.cfg = cfg
        self.vm = vm
        self.path = f"{cfg.cells_dir}/{vm}.lock"
        self.record_path = f"{cfg.cells_dir}/{vm}.json"
        self.fd = -1

    def __enter__(self) -> "CellLock":
        os.makedirs(self.cfg.cells_dir, exist_ok=True)
        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    return self
            except FileNotFoundError:
                pass
            self.release()  # (the file was removed while this waited: its VM removed; lock the new one)

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- the record: where the cell's cgroup is --------------------------

    def read_record(self) -> dict | None:
        try:
            with open(self.record_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # unreadable: treated as no cell; its cgroups are found again below

    def write_record(self, record: dict) -> None:
        tmp = self.record_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.rename(tmp, self.record_path)

    def init_is_leaving(self) -> bool:
        """The init marks the lock file before it exits (it holds the flock
        until then, but its exit finishes after the flock is free)."""
        return os.pread(self.fd, 4, 0) == b"dead"

    def clear_marks(self) -> None:
        os.ftruncate(self.fd, 0)

    def drop_record(self) -> None:
        _unlink(self.record_path)

    def drop_file(self) -> None:
        """The VM is removed: its lock file goes too (held: whoever waits
        for it then locks a new one, see __enter__)."""
        _unlink(self.path)


def find(lock: CellLock) -> ActiveCell | None:
    """The live cell, or None (a dead one's leftovers are removed)."""
    record = lock.read_record()
    if not record:
        return None
    cg = Cgroup.from_record(record["cgroup"])
    if lock.init_is_leaving():
        _wait_gone(cg.child("init"))
    pids = cg.child("init").pids()
    if len(pids) == 1:
        try:
            pidfd = os.pidfd_open(pids[0])
        except ProcessLookupError:
            pidfd = -1
        # Re-read after opening: the pid cannot have been reused meanwhile.
        if pidfd >= 0 and cg.child("init").pids() == pids:
            return ActiveCell(lock.vm, cg, pids[0], pidfd)
        if pidfd >= 0:
            os.close(pidfd)
    _remove_cell_cgroups(cg)
    lock.drop_record()
    return None


def peek(cfg: Config, vm: str) -> ActiveCell | None:
    """The live cell, looked at without its lock (for readers that must not
    wait on a run being started, such as the daemon's FUSE servers): None
    when it is absent or being replaced; changes nothing."""
    record = CellLock(cfg, vm).read_record()
    if not record:
        return None
    cg = Cgroup.from_record(record["cgroup"])
    init = cg.child("init")
    pids = init.pids()
    if len(pids) != 1:
        return None
    try:
        pidfd = os.pidfd_open(pids[0])
    except OSError:
        return None
    if init.pids() != pids:  # re-read after opening: the pid cannot have been reused meanwhile
        os.close(pidfd)
        return None
    return ActiveCell(vm, cg, pids[0], pidfd)


def ensure(lock: CellLock, vm: VmSpec, limits=None, pin: bool = False, pid_range=(0, 0),
           strict: bool = True) -> ActiveCell:
    """The VM's cell on this node, created if needed, with its current limits
    (the VM's own, or its share of this node).  A pinned cell (the node
    daemon's, for a VM with a share here) stays when its last run leaves.
    Not strict (a run's): a live cell whose programs keep it from taking
    new limits (memory they hold) keeps its own, and the run goes on."""
    limits = vm.limits if limits is None else limits
    cell = find(lock)
    if cell is not None:
        try:
            cell.cgroup.set_limits(limits)  # a resized VM takes effect here
        except DrvsError as e:
            if strict or not isinstance(e, Conflict):
                cell.close()
                raise
        # (used: the reconciler ends a removed VM's cell only if unused since it last read the VMs)
        lock.write_record({**lock.read_record(), "used": time.time(), **({"pinned": True} if pin else {})})
        return cell
    if lock.cfg.favordynmods:
        ensure_fast_migrations()
    return _create(lock, vm, limits, lock.cfg.idle_check_ms, pin, pid_range)


def resize(lock: CellLock, limits) -> None:
    """The live cell, if any, takes limits (cgroup limits change in place)."""
    cell = find(lock)
    if cell is not None:
        try:
            cell.cgroup.set_limits(limits)
        finally:
            cell.close()


def _create(lock: CellLock, vm: VmSpec, limits, idle_check_ms: int, pin: bool, pid_range) -> ActiveCell:
    cg = Cgroup.under_caller(lock.cfg.cgroup_root, vm.name)
    init = cg.child("init")
    fds: list[int] = []
    lock_fd = -1
    os.makedirs(lock.cfg.rootdir, exist_ok=True)
    lock.clear_marks()
    try:
        cg.create()
        cg.set_limits(limits, fresh=True)
        init.create()
        fds = init.open_procs()
        # The init's own open file description: its flock must contend with ours.
        lock_fd = os.open(lock.path, os.O_RDWR | os.O_CLOEXEC)
        pid = launcher.spawn_cell(launcher.CellSpec(
            hostname=vm.name, init_procs_fds=fds, lock_fd=lock_fd, rootdir=lock.cfg.rootdir, new_net=1,
            # A pinned cell is the daemon's to remove: no idle exit.
            idle_check_ms=0 if pin else idle_check_ms, pid_base=pid_range[0], pid_top=pid_range[1]))
    except BaseException:
        _remove_cell_cgroups(cg)
        raise
    finally:
        for fd in fds:
            os.close(fd)
        if lock_fd >= 0:
            os.close(lock_fd)
    lock.write_record({"vm": vm.name, "cgroup": cg.record(), "created": time.time(), "pinned": pin,
                       # (a cluster's: the reconciler may end it with its VM; a cell of the
                       # machine's own VMs, from before it joined, it leaves alone)
                       "cluster": os.path.exists(f"{lock.cfg.state_dir}/cluster.json")})
    return ActiveCell(vm.name, cg, pid, os.pidfd_open(pid))


def _wait_gone(cg: Cgroup, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while cg.pids() and time.monotonic() < deadline:
        time.sleep(0.001)


def runs(cg: Cgroup) -> list[str]:
    return [name for name in cg.children() if name.startswith("run-")]


def release(lock: CellLock, force: bool = False) -> bool:
    """Tear the cell down if no run uses it any more (a pinned cell stays
    unless forced; forced, its runs are ended first).  True if it is gone."""
    cell = find(lock)
    if cell is None:
        return True
    if force:
        for name in runs(cell.cgroup):
            cell.cgroup.child(name).kill_all()
    elif (lock.read_record() or {}).get("pinned"):
        cell.close()
        return False
    try:
        busy = False
        for name in runs(cell.cgroup):
            run_cg = cell.cgroup.child(name)
            if run_cg.pids():
                busy = True
            else:
                run_cg.remove()  # left by a run that was killed
        if busy:
            return False
        _stop_init(cell)
    finally:
        cell.close()
    _remove_cell_cgroups(cell.cgroup)
    lock.drop_record()
    return True


def _stop_init(cell: ActiveCell, timeout: float = 5.0) -> None:
    """SIGKILL the init (the kernel then ends all of the cell) and wait for it."""
    try:
        signal.pidfd_send_signal(cell.init_pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return
    # A pidfd polls readable once its process has exited (and left its cgroup).
    poller = select.poll()
    poller.register(cell.init_pidfd, select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        raise SetupError(f"cell {cell.vm}: init {cell.init_pid} does not exit")
    reap_if_child(cell.init_pid)


def reap_if_child(pid: int) -> None:
    """Collect a cell init that was reparented to us (we are a subreaper)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # another process's child: its parent (or init) reaps it


def reap_ended_inits() -> None:
    """Collect the cell inits that ended as our children (we are a
    subreaper: inits of cells we made were reparented to us) while another
    process ended their cell (drvs vm rm), which cannot reap them; only
    those, by name: other children are their waiters' to collect."""
    for pid in children(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                name, _, rest = f.read().partition(" (")[2].rpartition(") ")
        except OSError:
            continue  # (reaped meanwhile)
        if rest.startswith("Z ") and name == "drvs-cell":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def children(pid: int) -> list[int]:
    """pid's children, those of each of its threads (a child belongs to
    the thread that made it, or took it in as a subreaper)."""
    found = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(x) for x in f.read().split()]
        except FileNotFoundError:
            continue  # (a thread that ended meanwhile)
    return found


def _remove_cell_cgroups(cg: Cgroup) -> None:
    """Remove a cell's cgroups, killing what is left in them."""
    for name in runs(cg) + ["init"]:
        child = cg.child(name)
        child.kill_all()
        child.remove()
    cg.kill_all()
    cg.remove()
    # The shared parent (config.cgroup_root) goes too when no other cell is in it.
    for d in cg.parent().dirs:
        try:
            os.rmdir(d)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EBUSY, errno.ENOENT):
                raise SetupError(os_error(f"remove cgroup {d}", e)) from None


def locked(cfg: Config, vm: str) -> CellLock:
    """`with locked(cfg, vm) as lock:` holds the cell's flock."""
    return CellLock(cfg, vm)


def cells(cfg: Config) -> list[str]:
    try:
        return sorted(n[:-5] for n in os.listdir(cfg.cells_dir) if n.endswith(".json"))
    except OSError:
        return []


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
