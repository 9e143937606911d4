"""Control groups behind one interface, for cgroup v1 and v2 alike.

A `Cgroup` is one logical group spread over the hierarchies that host the
controllers DRVS uses (cpu, cpuacct, cpuset, memory, pids).  On a v1 host each
controller may sit in its own hierarchy; on a v2 host there is one.  Groups
nest under the caller's own cgroup in each hierarchy, so DRVS works from a
shell that already sits in a nested (delegated) cgroup.
"""

import errno
import os
import signal
import time
from collections import namedtuple
from functools import cache

from ..errors import Conflict, DrvsError, SetupError, UsageError, os_error
from ..units import cpuset_ids, cpuset_text, format_size

CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids")
CPU_PERIOD_US = 100_000


class Hierarchy(namedtuple("Hierarchy", "mountpoint version controllers caller")):
    """A mounted hierarchy: version 1 or 2, the DRVS controllers it holds,
    and the directory DRVS nests its groups under: the caller's own cgroup
    (on v2, the root when the caller's cgroup holds processes)."""

    __slots__ = ()

    def has(self, controller: str) -> bool:
        return controller in self.controllers


@cache
def hierarchies() -> tuple[Hierarchy, ...]:
    """The hierarchies holding DRVS's controllers (v1 preferred per controller)."""
    own = _own_cgroups()
    v1: list[Hierarchy] = []
    v2: Hierarchy | None = None
    for mountpoint, root, fstype, opts in _cgroup_mounts():
        if fstype == "cgroup2":
            rel = own.get("")
            if rel is None:
                continue
            try:
                with open(f"{mountpoint}/cgroup.controllers") as f:
                    ctrls = f.read().split()
            except OSError:
                ctrls = []
            v2 = Hierarchy(mountpoint, 2, frozenset(ctrls), _v2_base(mountpoint, _under(mountpoint, root, rel)))
        else:
            ctrls = frozenset(o for o in opts if o in CONTROLLERS)
            key = ",".join(sorted(o for o in opts if o in _ALL_V1))
            if not ctrls or key not in own:
                continue
            v1.append(Hierarchy(mountpoint, 1, ctrls, _under(mountpoint, root, own[key])))
    chosen = list(v1)
    covered = set().union(*(h.controllers for h in v1)) if v1 else set()
    if v2 is not None:
        wanted = (v2.controllers & set(CONTROLLERS)) - covered
        if wanted or not chosen:
            # cpu.stat is always there in v2: it stands in for cpuacct.
            extra = {"cpuacct"} if "cpuacct" not in covered else set()
            chosen.append(Hierarchy(v2.mountpoint, 2, frozenset(wanted | extra), v2.caller))
    if not chosen:
        raise SetupError("no cgroup hierarchy is mounted under /sys/fs/cgroup")
    return tuple(chosen)


_ALL_V1 = {"cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer", "blkio",
           "net_cls", "net_prio", "perf_event", "hugetlb", "rdma", "misc"}


def _own_cgroups() -> dict[str, str]:
    """Controller list (sorted, comma-joined; "" for v2) -> our cgroup path."""
    out = {}
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        if hid == "0" and not ctrls:
            out[""] = path
            continue
        key = ",".join(sorted(c for c in ctrls.split(",") if c in _ALL_V1))
        if key:
            out[key] = path
    return out


def _cgroup_mounts():
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        left, right = line.split(" - ", 1)
        fields = left.split()
        fstype, _source, superopts = right.split()[:3]
        if fstype in ("cgroup", "cgroup2"):
            yield fields[4], fields[3], fstype, superopts.split(",")


def _v2_base(mountpoint: str, caller: str) -> str:
    """Where to nest on v2.  A v2 cgroup that holds processes cannot hand
    controllers to children (no internal processes), so under a populated
    caller's cgroup (a login session's scope, say) DRVS nests at the
    hierarchy's root instead, which is exempt; an empty (delegated) caller's
    cgroup is used as it is."""
    if caller == mountpoint:
        return caller
    try:
        with open(f"{caller}/cgroup.procs") as f:
            populated = bool(f.read().strip())
    except OSError:
        populated = True
    return mountpoint if populated else caller


def _under(mountpoint: str, mount_root: str, path: str) -> str:
    rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path
    rel = "" if rel == "." else rel.lstrip("/")
    return os.path.join(mountpoint, rel) if rel else mountpoint


def ensure_fast_migrations() -> None:
    """Turn on cgroup2's `favordynmods` (kernel 6.0+), if it is off.

    Moving a process between cgroups (v1 or v2) takes a global rwsem whose
    writer waits for an RCU grace period unless this is on: 8-16 ms per cell
    here, and we measured stalls of 20 s and more after cpuset changes on this
    kind of machine.  The knob trades a little fork/exit cost for it; it is
    node-wide, like the cgroups DRVS manages, and off with the config's
    `favordynmods = false`."""
    for mountpoint, _root, fstype, opts in _cgroup_mounts():
        if fstype == "cgroup2" and "favordynmods" not in opts:
            # A remount sets the whole flag list: keep the ones there are
            # (nsdelegate, memory_recursiveprot, ...).
            keep = [o for o in opts if o not in ("rw", "ro")]
            try:
                _remount(mountpoint, ",".join(keep + ["favordynmods"]))
            except OSError:
                pass  # an older kernel: slower, still correct
            return


def _remount(mountpoint: str, option: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    MS_REMOUNT = 32
    if libc.mount(None, mountpoint.encode(), None, MS_REMOUNT, option.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), mountpoint)


def require(controller: str, what: str) -> None:
    if not any(h.has(controller) for h in hierarchies()):
        raise UsageError(f"{what} needs the {controller} cgroup controller, which this node lacks")


class Cgroup:
    """One logical cgroup: a directory in each hierarchy.

    Paths are plain strings: this runs on every drvs-run, and pathlib's
    object churn cost more than the cgroup operations themselves."""

    def __init__(self, parts: list[tuple[Hierarchy, str]]):
        self.parts = parts  # (hierarchy, this group's directory there)

    @classmethod
    def under_caller(cls, *names: str) -> "Cgroup":
        return cls([(h, os.path.join(h.caller, *names)) for h in hierarchies()])

    @classmethod
    def from_record(cls, record: dict[str, str]) -> "Cgroup":
        by_mount = {h.mountpoint: h for h in hierarchies()}
        return cls([(by_mount[mp], d) for mp, d in record.items() if mp in by_mount])

    def record(self) -> dict[str, str]:
        return {h.mountpoint: d for h, d in self.parts}

    @property
    def dirs(self) -> list[str]:
        return [d for _, d in self.parts]

    def child(self, name: str) -> "Cgroup":
        return Cgroup([(h, f"{d}/{name}") for h, d in self.parts])

    def parent(self) -> "Cgroup":
        return Cgroup([(h, os.path.dirname(d)) for h, d in self.parts])

    def _dir_for(self, controller: str) -> tuple[Hierarchy, str] | None:
        for h, d in self.parts:
            if h.has(controller):
                return h, d
        return None

    # -- life cycle ------------------------------------------------------

    def exists(self) -> bool:
        return all(os.path.isdir(d) for d in self.dirs)

    def create(self) -> None:
        for h, d in self.parts:
            _mkdir(h, d)
            if h.version == 2:
                self._enable_v2(h, d)

    @staticmethod
    def _enable_v2(h: Hierarchy, d: str) -> None:
        """Give d the controllers: enable them in each ancestor below the caller."""
        want = " ".join(f"+{c}" for c in sorted(h.controllers - {"cpuacct"}))
        if not want:
            return
        rel = os.path.relpath(d, h.caller).split("/")
        for i in range(len(rel)):
            parent = os.path.join(h.caller, *rel[:i])
            try:
                _write(f"{parent}/cgroup.subtree_control", want)
            except OSError as e:
                raise SetupError(os_error(f"enable controllers in {parent}/cgroup.subtree_control", e)) from None

    def remove(self, timeout: float = 2.0) -> None:
        """rmdir in every hierarchy; a group just emptied may be busy briefly."""
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                        raise SetupError(os_error(f"remove cgroup {d}", e)) from None
                    time.sleep(0.005)

    def children(self) -> list[str]:
        """Child groups in any hierarchy (a half-removed one may be in one only)."""
        names = set()
        for d in self.dirs:
            try:
                names.update(e.name for e in os.scandir(d) if e.is_dir())
            except FileNotFoundError:
                pass
        return sorted(names)

    # -- membership ------------------------------------------------------

    def open_procs(self) -> list[int]:
        """cgroup.procs of each hierarchy, open for the launcher to join by fd."""
        fds = []
        for d in self.dirs:
            try:
                fds.append(os.open(f"{d}/cgroup.procs", os.O_RDWR | os.O_CLOEXEC))
            except OSError as e:
                for fd in fds:
                    os.close(fd)
                raise SetupError(os_error(f"open {d}/cgroup.procs", e)) from None
        return fds

    def pids(self) -> list[int]:
        try:
            with open(f"{self.dirs[0]}/cgroup.procs") as f:
                return [int(x) for x in f.read().split()]
        except FileNotFoundError:
            return []

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every member until none is left (members may fork meanwhile)."""
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise SetupError(f"cgroup {self.dirs[0]}: processes survive SIGKILL")
            time.sleep(0.002)

    # -- limits ----------------------------------------------------------

    def set_limits(self, limits, fresh: bool = False) -> None:
        """Apply a `drvs.vm.model.Limits`; None resets a limit.  A fresh group
        has no limits yet, so only the set ones are written."""
        if fresh and not any(limits):
            return
        if limits.memory or not fresh:  # (first: the one a live cell's programs may refuse, Conflict)
            self._set_memory(limits.memory)
        self._set_cpus(limits.cpus, fresh)
        if limits.cpuset is not None or not fresh:
            self._set_cpuset(limits.cpuset)
        found = self._dir_for("pids")
        if found and (limits.pids or not fresh):
            self._set(f"{found[1]}/pids.max", str(limits.pids) if limits.pids else "max", "pids limit")
        elif limits.pids:
            require("pids", "a pids limit")

    def _dir_needed(self, controller: str, value, what: str):
        """(hierarchy, directory) of controller; None when it is not there,
        which only a limit to set (value) makes an error."""
        found = self._dir_for(controller)
        if not found and value is not None:
            require(controller, what)
        return found

    def _set_cpuset(self, cpuset: str | None) -> None:
        """The group's CPU list (None: its parent's, all it may have).  On
        v1 the groups below (the cell's init and runs) each hold their own,
        within it: narrowing, each keeps what it still may (all of the new
        list if nothing) before the group changes; widening, those that had
        all of the old list follow after (a run's own --cpuset-cpus stays)."""
        found = self._dir_needed("cpuset", cpuset, "a CPU list")
        if not found:
            return
        h, d = found
        if h.version != 1:  # (empty: the parent's, following it; so is "no list" here)
            with open(f"{d}/cpuset.cpus") as f:
                now = f.read().strip()
            if (cpuset_ids(now) if now else None) != (cpuset_ids(cpuset) if cpuset else None):
                self._set(f"{d}/cpuset.cpus", cpuset or "", f"CPU list {cpuset or 'of the parent'}")
            return
        if cpuset is None:
            with open(f"{os.path.dirname(d)}/cpuset.cpus") as f:
                cpuset = f.read().strip()
        what = f"CPU list {cpuset}"
        with open(f"{d}/cpuset.cpus") as f:
            old = cpuset_ids(f.read().strip() or "0")
        new = cpuset_ids(cpuset)
        if old == new:
            return  # (every pass of the reconciler, every run: nothing to move)
        below = sorted((os.path.join(top, name) for top, names, _ in os.walk(d) for name in names), key=len)
        had = {}
        for sub in below:
            with open(f"{sub}/cpuset.cpus") as f:
                had[sub] = cpuset_ids(f.read().strip() or "0")
        for sub in reversed(below):  # (deepest first: each within its parent at every step)
            if not had[sub] <= new:
                self._set(f"{sub}/cpuset.cpus", cpuset_text(had[sub] & new or new), what)
        self._set(f"{d}/cpuset.cpus", cpuset, what)
        for sub in below:
            if had[sub] == old and old != new:
                self._set(f"{sub}/cpuset.cpus", cpuset, what)

    def _set_cpus(self, cpus: float | None, fresh: bool) -> None:
        found = self._dir_needed("cpu", cpus, "a CPU quota")
        if not found:
            return
        if fresh and cpus is None:
            return
        h, d = found
        quota = int(cpus * CPU_PERIOD_US) if cpus else None
        if h.version == 1:
            if not fresh:  # the kernel's default period is ours
                self._set(f"{d}/cpu.cfs_period_us", str(CPU_PERIOD_US), "CPU period")
            self._set(f"{d}/cpu.cfs_quota_us", str(quota or -1), f"CPU quota {cpus}")
        else:
            self._set(f"{d}/cpu.max", f"{quota or 'max'} {CPU_PERIOD_US}", f"CPU quota {cpus}")

    def _set_memory(self, memory: int | None) -> None:
        found = self._dir_needed("memory", memory, "a memory limit")
        if not found:
            return
        h, d = found
        what = f"memory limit {format_size(memory)}"
        if h.version == 1:  # (the kernel reclaims what it can, then refuses: EBUSY, a Conflict in _set)
            self._set_memory_v1(d, memory, what)
        else:
            if memory and self._held_v2(d) > memory:  # (v2 would reclaim, then OOM-kill the programs)
                raise Conflict(f"cannot apply {what}: the cell's programs use more than that now")
            self._set(f"{d}/memory.max", str(memory or "max"), what)
            if os.path.exists(f"{d}/memory.swap.max"):
                self._set(f"{d}/memory.swap.max", "0" if memory else "max", what)

    @staticmethod
    def _held_v2(d: str) -> int:
        """What a v2 group's programs hold that reclaim cannot take (without
        swap): anonymous and shared memory, and the kernel's for them."""
        try:
            with open(f"{d}/memory.stat") as f:
                stat = dict(line.split() for line in f if line.count(" ") == 1)
        except OSError:
            return 0
        return sum(int(stat.get(k, 0)) for k in ("anon", "shmem", "unevictable", "kernel"))

    def _set_memory_v1(self, d: str, memory: int | None, what: str) -> None:
        """memory.limit_in_bytes, and memory + swap (memsw) the same: no swap
        beyond it.  memsw must stay >= the limit at every step: raising, it
        goes first; lowering, last; a failed step puts back what was."""
        limit, memsw = f"{d}/memory.limit_in_bytes", f"{d}/memory.memsw.limit_in_bytes"
        if not os.path.exists(memsw):
            self._set(limit, str(memory or -1), what)
            return
        with open(limit) as f:
            old_limit = int(f.read())
        with open(memsw) as f:
            old_memsw = f.read().strip()
        target = str(memory or -1)
        if not memory or memory > old_limit:  # raising (or opening)
            self._set(memsw, target, what)
            try:
                self._set(limit, target, what)
            except DrvsError:
                self._set(memsw, old_memsw, what)
                raise
            return
        self._set(limit, target, what)  # lowering
        try:
            self._set(memsw, target, what)
        except DrvsError:  # (programs swapped out to meet the limit: memory + swap does not fit)
            self._set(limit, str(old_limit), what)
            raise

    @staticmethod
    def _set(path: str, value: str, what: str) -> None:
        try:
            _write(path, value)
        except OSError as e:
            if e.errno == errno.EBUSY and "memory" in what:
                raise Conflict(f"cannot apply {what}: the cell's programs use more than that now "
                               f"({os.path.basename(path)}: {os.strerror(e.errno)})") from None
            if e.errno in (errno.EINVAL, errno.ERANGE, errno.EBUSY, errno.EPERM, errno.EACCES):
                raise UsageError(os_error(f"cannot apply {what} ({os.path.basename(path)} = {value})", e)) from None
            raise SetupError(os_error(f"write {path}", e)) from None

    # -- figures ---------------------------------------------------------

    def _read(self, controller: str, v1_name: str, v2_name: str) -> str | None:
        found = self._dir_for(controller)
        if not found:
            return None
        h, d = found
        try:
            with open(f"{d}/{v1_name if h.version == 1 else v2_name}") as f:
                return f.read()
        except OSError:
            return None

    def oom_kills(self) -> int:
        text = self._read("memory", "memory.oom_control", "memory.events") or ""
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def cpu_usage_ns(self) -> int | None:
        found = self._dir_for("cpuacct")
        text = self._read("cpuacct", "cpuacct.usage", "cpu.stat")
        if text is None:
            return None
        if found[0].version == 1:
            return int(text)
        for line in text.splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) * 1000
        return None

    def memory_current(self) -> int | None:
        text = self._read("memory", "memory.usage_in_bytes", "memory.current")
        return int(text) if text else None


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _mkdir(h: Hierarchy, d: str) -> None:
    """mkdir -p, one level at a time down from the caller's cgroup, because a
    new v1 cpuset must be filled before it can have children or members."""
    try:
        os.mkdir(d)
    except FileExistsError:
        return
    except FileNotFoundError:
        if d == h.caller or not d.startswith(h.caller):
            raise SetupError(f"create cgroup {d}: the caller's cgroup {h.caller} is gone") from None
        _mkdir(h, os.path.dirname(d))
        return _mkdir(h, d)
    except OSError as e:
        raise SetupError(os_error(f"create cgroup {d}", e)) from None
    if h.version == 1 and h.has("cpuset"):
        _inherit_cpuset(d)


def _inherit_cpuset(d: str) -> None:
    """A new v1 cpuset is empty and refuses tasks: start from the parent's."""
    parent = os.path.dirname(d)
    for name in ("cpuset.cpus", "cpuset.mems"):
        try:
            with open(f"{parent}/{name}") as f:
                _write(f"{d}/{name}", f.read().strip() or "0")
        except OSError as e:
            raise SetupError(os_error(f"initialise {d}/{name}", e)) from None
