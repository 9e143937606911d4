"""Run a program in a VM's cell on this node: the mechanism behind drvs-run,
`drvs exec` and `drvs login`.

This path avoids trio on purpose: importing it costs ~80 ms, ten times the
jail itself, and a run needs only a small poll loop over pollable fds (the
keeper's pidfd, a signal wake-up fd, the pty master) — see docs/architecture.md.
"""

import json
import os
import select
import signal
import time
from collections import namedtuple

from ..config import Config
from ..errors import DrvsError, PermissionDenied, SetupError, UsageError
from ..units import format_size
from ..vm.model import Limits, VmSpec
from . import cell as cells
from . import launcher, rootfs

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The keeper's "end the run" signal (it is also its parent-death signal).
END_RUN_SIGNAL = signal.SIGRTMAX
FORCE_AFTER = 3  # SIGINTs: the third ends a program that ignores them (see Interrupts)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


class Interrupts:
    """The SIGINTs a run forwards, counted: the FORCE_AFTER-th ends a
    program that ignores them (no other terminal needed), as the keeper's
    end-of-run signal.  For local runs and, on the caller's side, remote ones."""

    def __init__(self):
        self.seen = 0

    def forward(self, signum: int) -> int:
        """The signal to send the keeper for signum."""
        if signum != signal.SIGINT:
            return signum
        self.seen += 1
        if self.seen != FORCE_AFTER:
            return signum
        os.write(2, f"drvs-run: interrupted {FORCE_AFTER} times: ending the program\n".encode())
        return END_RUN_SIGNAL


# Docker's default set, less MKNOD: root in the jail can own files and
# switch users, not mount, trace, load modules or make devices.
DEFAULT_CAPS = ("chown", "dac_override", "fowner", "fsetid", "kill", "setgid", "setuid",
                "setpcap", "net_bind_service", "sys_chroot", "audit_write", "setfcap")


class Interrupted(DrvsError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class ProgramError(DrvsError):
    """The program could not be started (not found, not executable)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunOptions(namedtuple(
        "RunOptions", "argv env cwd binds tty interactive limits net_host uid gid groups caps detached stdio "
        "rows cols pgid",
        defaults=({}, "/data", (), False, False, Limits(), False, 0, 0, (), DEFAULT_CAPS, False, (), 0, 0, 0))):
    """What a user asked of one run (the drvs-run options).  stdio: three fds
    for the program's 0, 1, 2 (default: the caller's own); rows and cols:
    the terminal's size with -t when the caller's stdin is not it; pgid: a
    process group of another node of the VM to run in."""

    __slots__ = ()


RunResult = namedtuple("RunResult", "exit_code oom_killed memory_limit", defaults=(False, None))


def capability_mask(names) -> int:
    import prctl  # python-prctl knows this kernel's capability names

    mask = 0
    for name in names:
        value = getattr(prctl, "CAP_" + name.upper(), None)
        if value is None:
            raise DrvsError(f"unknown capability {name!r}")
        mask |= 1 << value
    return mask


def cap_last() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def environment(vm: VmSpec, opts: RunOptions) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "HOME": "/root" if opts.uid == 0 else "/", "HOSTNAME": vm.name,
           "container": "drvs", "DRVS_VM": vm.name}
    if opts.tty:
        env["TERM"] = os.environ.get("TERM", "xterm")
    env.update(opts.env)
    return env


def data_dirs(cfg: Config, vm: str) -> tuple[str, str]:
    """The VM's data (/data) and root's home (/root), side by side: neither
    inside the other, where a jailed program could swap the inner one for a
    symlink.  Host users cannot reach them (the state directory is 0700), so
    a setuid file made inside is no way up for them."""
    state = cfg.state_dir
    os.makedirs(state, mode=0o700, exist_ok=True)
    os.chmod(state, 0o700)
    vm_dir = f"{cfg.vms_dir}/{vm}"
    for tries_left in (2, 1, 0):
        try:
            os.makedirs(f"{vm_dir}/data", mode=0o755, exist_ok=True)
            os.makedirs(f"{vm_dir}/home", mode=0o700, exist_ok=True)
            break
        except FileNotFoundError:  # (the empty VM directory of a removed VM of the name went meanwhile)
            if not tries_left:
                raise
    return f"{vm_dir}/data", f"{vm_dir}/home"


def drop_data_dirs(cfg: Config, vm: str) -> None:
    """A removed VM's directory on a node, with the data and home
    directories runs made there and what they hold (`drvs vm rm` removes a
    VM's files on every node: a VM made again under the name must not find
    root's old home; a cluster VM's /data is its file system, whose store
    goes with drvs/fs/service.py).  Under the cell's lock, and not while a
    cell of the name lives: a VM made again under it may be starting a run
    (Run.start makes them anew under that lock)."""
    import shutil

    vm_dir = f"{cfg.vms_dir}/{vm}"
    if not os.path.isdir(vm_dir):
        return
    with cells.locked(cfg, vm) as lock:
        cell = cells.find(lock)
        if cell is not None:
            cell.close()
            return
        for path in (f"{vm_dir}/data", f"{vm_dir}/home"):
            shutil.rmtree(path, ignore_errors=True)  # (links in it are removed, never followed)
        try:
            os.rmdir(vm_dir)
        except OSError:
            pass  # (not there, or holding something -- its file store, until that goes: kept)
        lock.drop_file()  # (made by taking it; whoever waits for it locks a new one)


class Run:
    """One program in a cell: start() under the cell lock, then wait()."""

    def __init__(self, cfg: Config, vm: VmSpec, opts: RunOptions, supervise=None, current=None):
        """supervise(vm, listener_fd): who serves the run's intercepted
        system calls on a cluster node (default: the node's drvmmd, over
        its supervisor socket); it owns the fd from then on.  current():
        the VM's definition as stored now (DrvsError if it cannot say),
        asked under the cell lock on a single node, so that a run started
        with a definition read before a `drvs vm update` does not put the
        old limits back on the live cell (a cluster's reconciler corrects
        its cells within seconds instead)."""
        self.cfg, self.vm, self.opts = cfg, vm, opts
        self.supervise, self.current = supervise, current
        self.pid_range = (0, 0)
        self.id = os.urandom(6).hex()
        self.started = 0.0  # (time.time() once the program runs)
        self.cgroup = None
        self.proc: launcher.Launched | None = None
        self.tty_master = -1
        self.signals: _SignalPipe | None = None
        self.interrupts = Interrupts()
        self.oom_before = 0
        self.record_path = f"{cfg.runs_dir}/{self.id}.json"

    # -- start -----------------------------------------------------------

    def start(self, forward_signals: bool = True) -> None:
        """Build the jail and exec the program.  forward_signals: catch this
        process's signals for the program (a daemon passes them on itself)."""
        # Catch the signals to forward before anything exists to forward them
        # to: one that arrives while the jail is being built waits in the pipe.
        self.signals = _SignalPipe() if forward_signals else None
        try:
            self._start()
        except BaseException:
            if self.signals is not None:
                self.signals.close()
            raise

    def _start(self) -> None:
        if os.geteuid() != 0:
            raise PermissionDenied("drvs-run needs root: it creates namespaces, mounts and cgroups")
        # A cell init we create is orphaned at once (double fork); as a
        # subreaper we become its parent and can reap it at teardown.
        import prctl

        prctl.set_child_subreaper(True)
        os.makedirs(self.cfg.rootdir, exist_ok=True)
        data, home = data_dirs(self.cfg, self.vm.name)
        from ..cluster.context import cluster_info

        info = cluster_info(self.cfg)
        node = info["node"] if info else None
        view = None
        if info and info.get("pid_index"):
            from ..dvos.pidrange import bounds

            self.pid_range = bounds(info["pid_index"])
            if self.supervise is None:  # drvs-run itself (drvmmd's own runs know it is there)
                from ..dvos import handover

                handover.check(self.cfg)
            view = _proc_view(self.cfg, self.vm.name)
            data = vm_file_system(self.cfg, self.vm) or data
        steps = rootfs.build_root(rootdir=self.cfg.rootdir, hostname=self.vm.name, data_dir=data, home_dir=home,
                                  binds=self.opts.binds, net_host=self.opts.net_host, proc_view=view)
        with cells.locked(self.cfg, self.vm.name) as lock:
            data_dirs(self.cfg, self.vm.name)  # (again, under the lock drop_data_dirs takes)
            limits = self._limits_now() if info is None else self.vm.limits_on(node)
            cell = cells.ensure(lock, self.vm, limits, pid_range=self.pid_range, strict=False)
            try:
                self._launch(cell, steps)
            except BaseException:
                try:
                    self._cleanup_locked(lock)
                except Exception:  # noqa: BLE001 - the launch failure is the one to report
                    pass
                raise
            finally:
                cell.close()

    def _limits_now(self):
        """The VM's limits as stored now (see current), else as given."""
        if self.current is not None:
            try:
                return self.current().limits
            except DrvsError:
                pass  # (removed or unreadable meanwhile: the run goes on as it was asked)
        return self.vm.limits

    def _launch(self, cell: cells.ActiveCell, steps) -> None:
        self.oom_before = cell.cgroup.oom_kills()
        self.cgroup = cell.cgroup.child(f"run-{self.id}")
        self.cgroup.create()
        self.cgroup.set_limits(self.opts.limits, fresh=True)
        if self.signals is not None:
            self.signals.abort_if_stopped()
        procs = self.cgroup.open_procs()
        ns = launcher.CELL_NAMESPACES | (0 if self.opts.net_host else launcher.NEWNET)
        rows, cols = self.opts.rows, self.opts.cols
        if self.opts.tty and not rows:
            from . import terminal  # termios: only for -t

            rows, cols = terminal.window_size(0)
        env = environment(self.vm, self.opts)
        spec = launcher.RunSpec(
            cell_pidfd=cell.init_pidfd, ns_flags=ns, procs_fds=procs, rootdir=self.cfg.rootdir,
            steps=steps, argv=self.opts.argv, envp=[f"{k}={v}" for k, v in env.items()],
            path=env.get("PATH", DEFAULT_PATH), cwd=self.opts.cwd,
            caps_keep=capability_mask(self.opts.caps) if self.opts.uid == 0 else 0, cap_last=cap_last(),
            uid=self.opts.uid, gid=self.opts.gid, groups=self.opts.groups, tty=int(self.opts.tty),
            rows=rows, cols=cols, stdio=self.opts.stdio, pid_base=self.pid_range[0], pid_top=self.pid_range[1])
        if self.pid_range[1]:
            from ..dvos.syscalls import NOTIFIED

            spec = spec._replace(notify_calls=NOTIFIED, pgid=self._group())
        elif self.opts.pgid:
            raise UsageError("--pgid: this node is in no cluster (process groups of other nodes need one)")
        try:
            # A cluster node's runs have VM-wide pids and reach the other
            # nodes' processes through the supervisor.
            self.proc = launcher.spawn_run(spec, notify=bool(self.pid_range[1]))
        finally:
            for fd in procs:
                os.close(fd)
        self._write_record()
        failure = launcher.read_failure(self.proc.err_r)
        os.close(self.proc.err_r)
        if failure:
            code = self._reap()
            message = launcher.describe(*failure)
            if failure[0] in (launcher.EXIT_NOEXEC, launcher.EXIT_NOTFOUND) and failure[1] == "exec":
                raise ProgramError(message, failure[0])
            raise SetupError(message) if code == launcher.EXIT_SETUP else ProgramError(message, code)
        if self.proc.tty_r is not None:
            self.tty_master = launcher.receive_fd(self.proc.tty_r, "terminal")
            self.proc.tty_r.close()
            self.proc.tty_r = None
        if self.proc.notify_r is not None:
            listener = launcher.receive_fd(self.proc.notify_r, "seccomp listener")
            self.proc.notify_r.close()
            self.proc.notify_r = None
            from ..dvos import handover

            (self.supervise or handover.hand_over)(self.cfg, self.vm.name, listener)

    def _group(self) -> int:
        """The --pgid to join, checked: only another node's group can be
        (this node's own are the kernel's, joined from inside the VM)."""
        pgid = self.opts.pgid
        if not pgid:
            return 0
        from ..dvos import pidrange

        index = pidrange.index_of(pgid)
        if index == 0 or pidrange.bounds(index) == self.pid_range:
            raise UsageError(f"--pgid {pgid}: not a process group of another node of the VM")
        if self.opts.tty:
            raise UsageError("--pgid and -t do not go together (a terminal needs its own session)")
        return pgid

    def _write_record(self) -> None:
        os.makedirs(self.cfg.runs_dir, exist_ok=True)
        self.started = time.time()
        with open(self.record_path, "w") as f:
            json.dump({
            "id": self.id, "vm": self.vm.name, "argv": self.opts.argv, "keeper": self.proc.pid,
            "keeper_start": process_start(self.proc.pid),
            "monitor": os.getpid(), "started": self.started, "detached": self.opts.detached}, f)

    # -- wait ------------------------------------------------------------

    def wait(self) -> RunResult:
        """Forward signals, relay the terminal, and return the program's status."""
        try:
            self._loop()
            code = self._reap()
            return self._result(code)
        finally:
            self.cleanup()

    def _loop(self) -> None:
        poller = select.poll()
        wake_r = self.signals.fd
        poller.register(self.proc.pidfd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        relay = _Relay(self.tty_master, self.opts.interactive, poller) if self.tty_master >= 0 else None
        while True:
            for fd, _ in poller.poll():
                if fd == self.proc.pidfd:
                    if relay:
                        relay.drain()
                    return
                if fd == wake_r:
                    self._forward(os.read(wake_r, 256), relay)
                elif relay:
                    relay.on_ready(fd)

    def _forward(self, signums: bytes, relay) -> None:
        for signum in signums:
            if signum == signal.SIGWINCH:
                if relay:
                    relay.resize()
                continue
            signum = self.interrupts.forward(signum)
            try:
                signal.pidfd_send_signal(self.proc.pidfd, signum)
            except ProcessLookupError:
                pass

    def reap(self) -> RunResult:
        """The program's result once its keeper has exited (pidfd readable)."""
        return self._result(self._reap())

    def _reap(self) -> int:
        _, status = os.waitpid(self.proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    def _result(self, code: int) -> RunResult:
        limits = self.opts.limits.memory or self.vm.limits.memory
        oom = False
        if code == 128 + signal.SIGKILL and self.cgroup is not None:
            oom = self.cgroup.oom_kills() > 0 or self._cell_oom_kills() > self.oom_before
        return RunResult(code, oom, limits)

    def _cell_oom_kills(self) -> int:
        return self.cgroup.parent().oom_kills()

    # -- cleanup ---------------------------------------------------------

    def cleanup(self) -> None:
        """Nothing of the run outlives it: its processes, cgroup, record, and
        the cell too when this was its last run."""
        if self.proc is not None and self.proc.pidfd >= 0:
            os.close(self.proc.pidfd)
            self.proc.pidfd = -1
        if self.tty_master >= 0:
            os.close(self.tty_master)
            self.tty_master = -1
        try:
            with cells.locked(self.cfg, self.vm.name) as lock:
                self._cleanup_locked(lock)
        finally:
            if self.signals is not None:
                self.signals.close()

    def _cleanup_locked(self, lock) -> None:
        try:
            if self.proc is not None:
                self._kill_keeper()
            if self.cgroup is not None:
                self.cgroup.kill_all()
                self.cgroup.remove()
                self.cgroup = None
        finally:
            cells._unlink(self.record_path)
            cells.release(lock)

    def _kill_keeper(self) -> None:
        """Have the keeper end the program and what it left, then reap it.
        (SIGKILL on the keeper would orphan the program to us, outside the
        cell, where no one reaps it and the cell cannot end.)"""
        try:
            pid, _ = os.waitpid(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            os.kill(self.proc.pid, END_RUN_SIGNAL)
            os.waitpid(self.proc.pid, 0)
        reap_orphans()


def _proc_view(cfg: Config, vm: str) -> str | None:
    """The VM's /proc view that this node's drvmmd serves, if it does."""
    base = f"{cfg.state_dir}/dvos"
    return f"{base}/proc/{vm}" if os.path.ismount(base) else None


def vm_file_system(cfg: Config, vm: VmSpec) -> str | None:
    """Where this node's drvmmd shows the VM's file system (a cluster VM's
    /data), or None for a VM that keeps its data on each node."""
    if not vm.fs_nodes:
        return None
    path = f"{cfg.state_dir}/dvos/fs/{vm.name}"
    try:
        os.stat(path)
    except OSError as e:
        raise SetupError(f"the file system of VM {vm.name!r} is not available on this node "
                         f"({e.strerror}): is drvmmd running, and fs@{vm.name} served?") from None
    return path


def process_start(pid: int) -> int | None:
    """A process's start time (clock ticks after boot): with the pid, it names
    the process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def open_run_keeper(record: dict) -> int | None:
    """A pidfd on the run's keeper, or None when that run has ended (its pid
    may belong to another process by now)."""
    try:
        pidfd = os.pidfd_open(record["keeper"])
    except (ProcessLookupError, KeyError):
        return None
    if process_start(record["keeper"]) != record.get("keeper_start"):
        os.close(pidfd)
        return None
    return pidfd


def reap_orphans() -> None:
    """Collect zombies reparented to us (we are a subreaper) so that no
    cell's pid namespace waits on them."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class _Relay:
    """Copies between the caller's stdio and the jail's pty master.

    Input for the program is buffered and written only as the master takes
    it (POLLOUT), so a program busy writing output while we hold input for it
    cannot deadlock the two of us; reading stdin pauses while the buffer is
    full."""

    LIMIT = 256 * 1024

    def __init__(self, master: int, interactive: bool, poller):
        from . import terminal

        self.terminal = terminal
        self.master = master
        os.set_blocking(master, False)
        self.poller = poller
        self.pending = bytearray()   # for the program, not yet taken by the master
        self.stdin_open = interactive
        self.stdin_polled = False
        self.master_open = True
        self._update()

    def _update(self) -> None:
        """(Re)register the fds for what we wait for now."""
        if self.master_open:
            events = select.POLLIN | (select.POLLOUT if self.pending else 0)
            self.poller.register(self.master, events)  # register() also modifies
        want_stdin = self.stdin_open and len(self.pending) < self.LIMIT
        if want_stdin != self.stdin_polled:
            if want_stdin:
                self.poller.register(0, select.POLLIN)
            else:
                self.poller.unregister(0)
            self.stdin_polled = want_stdin

    def resize(self) -> None:
        self.terminal.copy_window_size(0, self.master)

    def on_ready(self, fd: int) -> None:
        terminal = self.terminal
        if fd == self.master:
            self._flush()
            data = terminal.read_some(self.master)
            if data:
                terminal.write_all(1, data)
            elif data == b"":
                self.poller.unregister(self.master)
                self.master_open = False
        elif fd == 0:
            data = terminal.read_some(0)
            if data:
                self.pending += data
            elif data == b"":
                self.stdin_open = False
                self.pending += b"\x04"  # end of input, as a terminal says it
            self._flush()
        self._update()

    def _flush(self) -> None:
        while self.pending and self.master_open:
            try:
                n = os.write(self.master, self.pending)
            except BlockingIOError:
                return
            except OSError:
                self.pending.clear()  # the program is gone
                return
            del self.pending[:n]

    def drain(self) -> None:
        while data := self.terminal.read_some(self.master):
            self.terminal.write_all(1, data)


def run(cfg: Config, vm: VmSpec, opts: RunOptions, current=None) -> RunResult:
    """Start, wait, clean up; the terminal is raw for the run's length with -t.
    current: as Run's."""
    r = Run(cfg, vm, opts, current=current)
    r.start()
    if opts.tty and opts.interactive:
        from . import terminal

        with terminal.raw_mode(0):
            return r.wait()
    return r.wait()


class _SignalPipe:
    """The signals a run forwards, caught into a pipe (signal.set_wakeup_fd)
    for the poll loop to read; the previous handlers come back on close()."""

    def __init__(self):
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._handlers = {s: signal.signal(s, _note_signal) for s in FORWARDED_SIGNALS + (signal.SIGWINCH,)}

    def abort_if_stopped(self) -> None:
        """Raise if the user asked to stop before the program started; the
        other signals stay queued for it."""
        try:
            data = os.read(self.fd, 256)
        except BlockingIOError:
            return
        stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        hit = [s for s in data if s in stops]
        if hit:
            raise Interrupted(f"interrupted by {signal.Signals(hit[0]).name} before the program started",
                              128 + hit[0])
        os.write(self._w, data)  # not ours: put them back for the program

    def close(self) -> None:
        if self.fd < 0:
            return
        for s, h in self._handlers.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(self._old_wakeup)
        os.close(self.fd)
        os.close(self._w)
        self.fd = -1


def _note_signal(signum, frame) -> None:
    """Signals only wake the loop (through the wake-up fd), which forwards them."""


def explain(result: RunResult) -> str | None:
    if result.oom_killed:
        limit = f" (limit {format_size(result.memory_limit)})" if result.memory_limit else ""
        return f"out of memory{limit}: the program was killed inside its cell"
    return None

