"""How the view's FUSE workers wait for /dev/fuse: in line on the host
loop, with a short poll before the daemon sleeps.

pyfuse3 lets one worker at a time wait for the fd, under a trio Lock
(trio.lowlevel.wait_readable): each request costs the next worker a guest
pass of its own to take the lock and register its wait (a remote unlink
from n2 took ~7.4 passes of n2's guest and 26 system calls).  pyfuse3 finds
`trio` as a module global, which pyfuse3.asyncio also swaps: install()
puts in a namespace whose Lock is nothing and whose wait_readable is a
line the host loop serves -- one watch of the fd for the whole mount, each
readiness handed to the first worker in line, the guest's tick run at once
(bridge.wake).

On this VM a wake-up across CPUs costs ~30 µs each way (the guest's halt
polling is off: a pipe ping-pong takes 4.9 µs on one CPU and 66 µs across
two), and a daemon that sleeps sooner is woken more often.  So the last
busy worker polls the fd for a while before the daemon sleeps, as halt
polling does: the window halves on each miss and doubles when a request
comes soon after the daemon slept.  It polls only while no task waits for
a CPU (/proc/loadavg's count of runnable tasks, this one included, at most
the machine's CPUs): the poll then takes a CPU no one else wanted; and it
gives way as soon as the host loop has I/O to handle (its epoll fd is
polled beside /dev/fuse: another node's reply is not kept waiting).  After
a request the poll caught, the host loop turns once before the next poll,
so the fabric's calls (other nodes' changes among them) are not held up
behind this node's own requests."""

import asyncio
import collections
import contextlib
import logging
import os
import select
import time

import outcome
import pyfuse3
import trio

from ..ipc import bridge

log = logging.getLogger("drvmmd")
SPIN_MAX = 100e-6  # the longest poll before sleeping, in seconds
SPIN_MIN = 4e-6    # a window shrunk below this does not poll at all (until a near miss grows it)


class _NoLock:
    """pyfuse3's read lock: the line already lets one worker at a time read."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


class _Load:
    """Whether a task waits for a CPU: /proc/loadavg's runnable count (this
    task included) against the machine's CPUs; ~1 µs a look."""

    def __init__(self):
        self.cpus = os.cpu_count() or 1
        try:
            self.fd = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = None  # (no /proc: never poll)

    def idle_cpu(self) -> bool:
        if self.fd is None:
            return False
        try:
            fields = os.pread(self.fd, 128, 0).split()
            return int(fields[3].split(b"/")[0]) <= self.cpus
        except (OSError, IndexError, ValueError):
            return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Line:
    """The FUSE workers waiting for the fd, first come first woken."""

    def __init__(self, fd: int, load: "_Load | None" = None):
        self.fd = fd
        self.loop = asyncio.get_running_loop()
        self.poller = select.poll()   # the fd alone
        self.poller.register(fd, select.POLLIN)
        self.spinner = select.poll()  # the fd, and the host loop's own (ready when the loop has I/O to handle)
        self.spinner.register(fd, select.POLLIN)
        host = _loop_fd(self.loop)
        if host is not None:
            self.spinner.register(host, select.POLLIN)
        self.waiting: collections.deque = collections.deque()
        self.woken = None           # the worker woken to read, until it runs
        self.watched = False
        self.closed = False
        self.caught = False         # the last request was caught by the poll: the host loop turns first
        self.window = SPIN_MAX
        self.slept_at: float | None = None
        self.load = load or _Load()
        self.stats = collections.Counter()  # (for tests and measurements: caught, slept, woken)

    async def wait(self) -> None:
        """trio: return when the fd has a request for this worker to read;
        ClosedResourceError once the mount is closing."""
        task = trio.lowlevel.current_task()
        if self.caught:
            self.caught = False
            await trio.lowlevel.checkpoint()  # (a turn of the host loop: see the module's doc)
        while True:
            if self.closed:
                raise trio.ClosedResourceError("the FUSE session is closing")
            last = not self._others_busy(task)
            if last and self._polled():
                self.caught = True
                self.stats["caught"] += 1
                return
            await self._sleep(task, last)
            if self.poller.poll(0):
                return
            # Gone before this worker ran: the kernel takes back a request
            # not yet read when its caller is killed, and a read would
            # fail EAGAIN (pyfuse3 ends the session on it).
            self.stats["withdrawn"] += 1

    def _others_busy(self, task) -> bool:
        """Whether another worker is between its read and its next wait
        (pyfuse3's nursery holds its workers and nothing else; a worker
        woken to read counts as busy)."""
        return len(task.parent_nursery.child_tasks) - len(self.waiting) > 1

    async def _sleep(self, task, last: bool) -> None:
        self.waiting.append(task)
        if last:
            self.slept_at = time.perf_counter()
        self.stats["slept"] += 1
        if not self.watched:
            self.loop.add_reader(self.fd, self._ready)
            self.watched = True

        def abort(_raise_cancel):
            with contextlib.suppress(ValueError):
                self.waiting.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            if self.woken is task:
                self.woken = None

    def _polled(self) -> bool:
        """Poll the fd for up to the window while a CPU is idle and nothing
        else is to be done (no trio task runnable, no I/O for the host
        loop: a reply from another node is not kept waiting): whether a
        request came."""
        if self.window < SPIN_MIN or trio.lowlevel.current_statistics().tasks_runnable:
            return False
        end = time.perf_counter() + self.window
        while self.load.idle_cpu():
            ready = self.spinner.poll(0)
            if ready:
                return any(fd == self.fd for fd, _ in ready)
            if time.perf_counter() >= end:
                self.window /= 2
                return False
            os.sched_yield()
        return False

    def _ready(self) -> None:
        """The host loop: the fd is readable."""
        if self.woken is not None:
            return  # the worker woken has not read yet: this readiness is its request
        if not self.waiting:
            self._unwatch()  # (level-triggered: a readiness no one takes would spin the loop)
            return
        if not self.poller.poll(0):
            return  # already read by a worker the poll caught it for
        if self.slept_at is not None and time.perf_counter() - self.slept_at < SPIN_MAX:
            self.window = min(max(2 * self.window, SPIN_MIN), SPIN_MAX)  # a near miss
        self.slept_at = None
        self.woken = task = self.waiting.popleft()
        self.stats["woken"] += 1
        bridge.wake(task)

    def _unwatch(self) -> None:
        if self.watched:
            self.watched = False
            self.loop.remove_reader(self.fd)

    def close(self) -> None:
        """The session is ending: every worker in line gets ClosedResourceError."""
        self.closed = True
        self._unwatch()
        while self.waiting:
            closing = trio.ClosedResourceError("the FUSE session is closing")
            bridge.wake(self.waiting.popleft(), outcome.Error(closing))
        self.load.close()


def _loop_fd(loop) -> "int | None":
    """The fd the host loop waits on (uvloop's libuv epoll, or asyncio's
    selector): readable when the loop has I/O to handle.  None if unknown."""
    try:
        if hasattr(loop, "_get_backend_id"):
            return loop._get_backend_id()
        return loop._selector.fileno()
    except (AttributeError, OSError, ValueError):
        return None


class _Lowlevel:
    """trio.lowlevel as pyfuse3 sees it: waits for the fd go to the line."""

    def __init__(self, lines: dict):
        self._lines = lines

    async def wait_readable(self, fd) -> None:
        line = self._lines.get(fd)
        if line is None:
            line = self._lines[fd] = Line(fd)
        await line.wait()

    def notify_closing(self, fd) -> None:
        line = self._lines.get(fd)  # (kept: a worker still to come is told the session is closing)
        if line is not None:
            line.close()
        trio.lowlevel.notify_closing(fd)

    def __getattr__(self, name):
        return getattr(trio.lowlevel, name)


class _Trio:
    """The `trio` pyfuse3 looks up: trio, but for its read lock and its waits."""

    Lock = _NoLock

    def __init__(self):
        self.lines: dict = {}
        self.lowlevel = _Lowlevel(self.lines)

    def __getattr__(self, name):
        return getattr(trio, name)


def reading_on(session_loop):
    """pyfuse3's worker loop, made again by the same task when its read of
    /dev/fuse fails with EAGAIN -- a request the kernel took back after it
    said the fd was readable (its caller was killed meanwhile) -- where
    pyfuse3 raises and so ends every worker, and the mount, with it.  (The
    line makes this rare: a woken worker looks again before it reads.  The
    task goes on as the same worker, so pyfuse3's count of them holds; the
    loop's receive buffer, which it frees only when it ends, is lost each
    time: a max_write's worth.)"""

    async def worker(*args, **kwargs):
        while True:
            try:
                return await session_loop(*args, **kwargs)
            except BlockingIOError:
                log.info("FUSE: a request was taken back before it was read (its caller was killed); "
                         "reading on")

    worker.__wrapped__ = session_loop
    return worker


@contextlib.contextmanager
def install():
    """While in the block, pyfuse3's workers read on after a request taken
    back (reading_on), and wait in line on the host loop (a guest run of
    drvs.ipc.bridge; elsewhere, or with DRVS_FUSE_LINE=0 for comparison,
    as pyfuse3 has them wait)."""
    loop_saved = pyfuse3._session_loop
    pyfuse3._session_loop = reading_on(loop_saved)
    try:
        with _in_line() as ns:
            yield ns
    finally:
        pyfuse3._session_loop = loop_saved


@contextlib.contextmanager
def _in_line():
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        yield None
        return
    if os.environ.get("DRVS_FUSE_LINE", "1") == "0":
        yield None
        return
    ns = _Trio()
    saved, pyfuse3.trio = pyfuse3.trio, ns
    try:
        yield ns
    finally:
        pyfuse3.trio = saved
        for line in list(ns.lines.values()):
            line.close()
        ns.lines.clear()

