"""trio on top of pycapnp: trio runs in *guest mode* on the asyncio loop that
runs capnp's kj event loop.

pycapnp only runs on asyncio; the daemon is trio.  Measured on this kind of
machine (2 vCPUs, loopback, one client and one server process, medians of
32-byte calls): pycapnp on plain asyncio 179 µs, trio in guest mode awaiting
capnp futures directly 261 µs, a dedicated asyncio thread with hand-offs
272 µs, trio-asyncio 345 µs, a raw trio TCP echo 93 µs.  Guest mode keeps one
OS thread for all Python code, so capnp objects never cross threads, trio
code holds capabilities and results directly, and cancellation flows both
ways (a cancelled trio call drops the capnp promise, which cancels the
server's method).  Trio's own guest mode waits for trio's I/O in a worker
thread and hands every wake-up back through the host loop (~100 µs per
wake-up here); `_threadless` instead lets the asyncio loop watch trio's
epoll fd, so one thread and one poll serve both.  See docs/architecture.md.

    run(trio_main, *args)        the process's entry point
    await capnp_await(promise)   trio: the result of a pycapnp call
    await aio(coroutine)         trio: any asyncio coroutine on the host loop
    await guest.call_trio(f, *a) asyncio (a capnp server method): trio code
"""

import asyncio
import gc
import logging
import threading

import outcome
import trio
from sniffio import thread_local as sniffio_library

log = logging.getLogger("drvs.bridge")

_Abort = trio.lowlevel.Abort


# -- trio side -------------------------------------------------------------

async def aio_future(fut: asyncio.Future):
    """Await an asyncio future of the host loop from a trio task.  Cancelling
    the trio task cancels the future."""
    task = trio.lowlevel.current_task()
    aborted = False

    def on_done(f: asyncio.Future) -> None:
        # The abort may have won a race with a callback already queued.
        if aborted:
            return
        if f.cancelled():
            result = outcome.Error(trio.BrokenResourceError("the call was cancelled on the asyncio side"))
        elif f.exception() is not None:
            result = outcome.Error(f.exception())
        else:
            result = outcome.Value(f.result())
        trio.lowlevel.reschedule(task, result)  # same OS thread: the guest run's context

    fut.add_done_callback(on_done)

    def abort(_raise_cancel):
        nonlocal aborted
        aborted = True
        fut.remove_done_callback(on_done)
        fut.cancel()
        return _Abort.SUCCEEDED

    return await trio.lowlevel.wait_task_rescheduled(abort)


def future_of(awaitable):
    """The asyncio future a pycapnp promise would wait on, without a Task.
    Relies on pycapnp promises awaiting a plain asyncio future."""
    gen = awaitable.__await__()
    try:
        fut = gen.send(None)
    except StopIteration as done:
        return None, done.value
    gen.close()
    return fut, None


async def capnp_await(promise):
    """trio: wait for a pycapnp call (RemotePromise) and return its result."""
    fut, value = future_of(promise)
    if fut is None:
        await trio.lowlevel.checkpoint()
        return value
    return await aio_future(fut)


async def aio(awaitable):
    """trio: run any asyncio awaitable on the host loop (as a Task)."""
    return await aio_future(asyncio.ensure_future(awaitable))


# -- the guest's I/O wait, on the host loop -----------------------------------

def _threadless_guest_tick(self) -> None:
    """trio's GuestState.guest_tick, except for where it waits: when trio
    has nothing to run, the host loop watches trio's epoll fd (readable when
    trio's I/O is ready or trio is woken: its wake-up socket is in that
    epoll) and trio's next deadline (_HostWait), instead of a worker thread
    blocking in epoll_wait and handing the result over with
    call_soon_threadsafe.  A capnp reply that reschedules a trio task then
    costs a socket write seen by the same poll, not two thread switches."""
    prev_library, sniffio_library.name = sniffio_library.name, "trio"
    try:
        timeout = self.unrolled_run_next_send.send(self.unrolled_run_gen)
    except StopIteration:
        _end_wait(self)
        self.done_callback(self.runner.main_task_outcome)
        return
    except trio.TrioInternalError as exc:
        _end_wait(self)
        self.done_callback(outcome.Error(exc))
        return
    finally:
        sniffio_library.name = prev_library

    events = _events_now(self)
    if timeout <= 0 or isinstance(events, outcome.Error) or events.value:
        self.unrolled_run_next_send = events
        self.runner.guest_tick_scheduled = True
        self.run_sync_soon_not_threadsafe(self.guest_tick)
        return
    self.runner.guest_tick_scheduled = False
    _host_wait(self).wait(self, timeout)


def _events_now(state):
    """trio's I/O events ready now, for a tick that does not wait: none
    without a look once the host loop watches trio's epoll fd and has not
    seen it ready since the last look (an epoll_wait saved per tick; a
    readiness is level-triggered, so the host loop reports it again)."""
    w = _waiter
    if w is not None and w.io is state.runner.io_manager and not w.seen:
        return outcome.Value([])  # (an outcome is sent once: a new one each time)
    if w is not None:
        w.seen = False
    return outcome.capture(state.runner.io_manager.get_events, 0)


class _HostWait:
    """The host loop's watch over one guest run's epoll fd and next deadline.

    The fd stays registered for the whole run (adding and removing a reader
    each time trio idles costs several syscalls with uvloop); a readiness
    while trio is busy is ignored, as trio's next tick reads its events
    anyway.  The deadline's timer is kept while it fires no later than
    trio's next deadline and at most 1 ms before it (uvloop's clock counts
    milliseconds; an early firing just waits again)."""

    FOREVER = 86400.0  # trio's longest wait: no timer needed
    GRAIN = 0.001      # shorter waits are rounded up to this (no spinning on a near deadline)

    def __init__(self, loop: asyncio.AbstractEventLoop, io):
        self.loop, self.io = loop, io
        self.thread = threading.get_ident()
        self.fd = io._epoll.fileno()
        self.state = None   # the guest waiting, if it is
        self.timer: asyncio.Handle | None = None
        self.when = 0.0     # when the timer fires, in the loop's time
        self.seen = True    # trio's epoll fd was seen ready while trio ran: its next tick looks
        loop.add_reader(self.fd, self.ready)

    def wait(self, state, timeout: float) -> None:
        self.state = state
        if timeout >= self.FOREVER:
            self._drop_timer()
            return
        when = self.loop.time() + max(timeout, self.GRAIN)
        if self.timer is not None:
            if 0 <= when - self.when < self.GRAIN:
                return
            self.timer.cancel()
        self.timer, self.when = self.loop.call_at(when, self._expired), when

    def _drop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        self.resume()

    def ready(self) -> None:
        """The host loop: trio's epoll fd is readable."""
        self.seen = True
        self.resume()

    def resume(self) -> None:
        """Run the guest's tick now if it waits (else its next tick looks)."""
        state, self.state = self.state, None
        if state is None:
            return
        state.unrolled_run_next_send = _events_now(state)
        state.runner.guest_tick_scheduled = True
        state.guest_tick()

    def close(self) -> None:
        """At the end of the run (trio has closed its epoll: the reader is
        dropped for the loop's sake; the kernel already forgot it)."""
        self.state = None
        self._drop_timer()
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            self.fd = None


def _host_wait(state) -> _HostWait:
    """The run's _HostWait, made at its first wait (one guest run per
    process at a time; runs may follow each other)."""
    global _waiter
    if _waiter is None or _waiter.io is not state.runner.io_manager:
        _waiter = _HostWait(asyncio.get_running_loop(), state.runner.io_manager)
    return _waiter


def _end_wait(state) -> None:
    """The run ended: drop its _HostWait if it has one (a run that never
    waited has none, and its epoll is closed by now: never make one)."""
    global _waiter
    if _waiter is not None and _waiter.io is state.runner.io_manager:
        _waiter.close()
        _waiter = None


_waiter: _HostWait | None = None


def _threadless() -> bool:
    """Install _threadless_guest_tick, if this trio is the one it was written
    against (trio 0.2x-0.3x on Linux: an epoll I/O manager); else trio keeps
    its worker thread, which is correct, only slower."""
    import attrs

    fields = {"runner", "unrolled_run_gen", "unrolled_run_next_send", "run_sync_soon_not_threadsafe",
              "done_callback"}
    try:
        from trio._core import _io_epoll, _run

        guest = _run.GuestState
        known = fields <= set(attrs.fields_dict(guest)) and "_epoll" in attrs.fields_dict(_io_epoll.EpollIOManager)
    except (ImportError, AttributeError, TypeError, attrs.exceptions.NotAnAttrsClassError):
        known = False
    if not known:
        log.warning("trio %s: unknown guest-mode internals; its I/O waits stay in a thread", trio.__version__)
        return False
    guest.guest_tick = _threadless_guest_tick
    _run.Runner.force_guest_tick_asap = _force_guest_tick_asap
    return True


def wake(task, result=None) -> None:
    """Reschedule a trio task (with outcome result; None: a plain value)
    from the host loop and, if the guest waits, run its tick now rather
    than on the loop's next turn: a FUSE request is read a pass sooner."""
    w = _waiter
    state = w.state if w is not None and threading.get_ident() == w.thread else None
    if state is not None:
        state.runner.guest_tick_scheduled = True  # (so the reschedule queues no tick of its own)
    trio.lowlevel.reschedule(task, outcome.Value(None) if result is None else result)
    if state is not None:
        w.resume()


def _force_guest_tick_asap(self) -> None:
    """trio's Runner.force_guest_tick_asap: a task was rescheduled while the
    guest waits.  From the host loop's own thread (a capnp reply, a capnp
    call into trio) the tick is simply scheduled there, without the write
    to trio's wake-up socket that the loop would then see in trio's epoll;
    from anywhere else, as trio does."""
    if self.guest_tick_scheduled:
        return
    self.guest_tick_scheduled = True
    w = _waiter
    if w is not None and w.state is not None and w.io is self.io_manager and threading.get_ident() == w.thread:
        w.loop.call_soon(w.resume)
    else:
        self.io_manager.force_wakeup()


# -- asyncio side ------------------------------------------------------------

class Guest:
    """The running trio guest, seen from asyncio code."""

    nursery: trio.Nursery

    def __init__(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future):
        self.loop, self.done = loop, done

    async def call_trio(self, afn, *args):
        """asyncio: run trio `afn(*args)` in the guest and return its result;
        cancelling the awaiting asyncio task cancels the trio task."""
        fut = self.loop.create_future()
        scope = trio.CancelScope()

        async def runner():
            try:
                with scope:
                    try:
                        result = await afn(*args)
                    except Exception as e:  # noqa: BLE001 - handed to the asyncio caller
                        if not fut.done():
                            fut.set_exception(e)
                    else:
                        if not fut.done():
                            fut.set_result(result)
            finally:
                if not fut.done():
                    fut.cancel()

        self.nursery.start_soon(runner)
        try:
            return await fut
        except asyncio.CancelledError:
            scope.cancel()
            raise


_current: Guest | None = None


def current_guest() -> Guest:
    if _current is None:
        raise RuntimeError("no trio guest run (use drvs.ipc.bridge.run)")
    return _current


async def _start_guest(trio_main, *args) -> Guest:
    global _current
    loop = asyncio.get_running_loop()
    done, started = loop.create_future(), loop.create_future()
    guest = Guest(loop, done)
    _threadless()

    async def root():
        async with trio.open_nursery() as nursery:
            guest.nursery = nursery
            started.set_result(None)
            result = await trio_main(*args)
            nursery.cancel_scope.cancel()
            return result

    trio.lowlevel.start_guest_run(
        root,
        run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        run_sync_soon_not_threadsafe=loop.call_soon,
        done_callback=lambda o: done.done() or done.set_result(o),
        strict_exception_groups=True,
        # uvloop owns the signal wake-up fd; plain asyncio leaves it to trio
        host_uses_signal_set_wakeup_fd=type(loop).__module__.startswith("uvloop"),
    )
    _current = guest
    await started
    return guest


def _loop_factory():
    """uvloop when installed and not turned off (DRVS_UVLOOP=0): its
    transports and TLS are C, ~30 µs less per fabric round trip here."""
    import os

    if os.environ.get("DRVS_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class _LoopCollector:
    """Python's cyclic garbage collected on the host loop's thread only.

    The collector runs in whichever thread allocates past its threshold;
    a capnp object in a reference cycle freed from a worker thread (the
    spawner's, trio.to_thread's) makes kj abort the process ("No event loop
    is running on this thread": seen with remote runs in a loop).  So
    automatic collection is off while the loop runs, and the loop collects
    itself, as often as the collector would (its generations' counts
    against their thresholds), looking every EVERY seconds; a full
    collection at most every FULL_EVERY seconds."""

    EVERY = 0.05
    FULL_EVERY = 5.0  # (CPython defers full collections by the heap's size; here: by time)

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.handle = loop, None
        self.was_enabled = gc.isenabled()
        self.full_at = loop.time()
        gc.disable()
        self._schedule()

    def _schedule(self) -> None:
        self.handle = self.loop.call_later(self.EVERY, self._look)

    def _look(self) -> None:
        counts, limits = gc.get_count(), gc.get_threshold()
        for generation in (2, 1, 0):
            if limits[generation] and counts[generation] > limits[generation]:
                if generation == 2:
                    if self.loop.time() - self.full_at < self.FULL_EVERY:
                        continue
                    self.full_at = self.loop.time()
                gc.collect(generation)
                break
        self._schedule()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        if self.was_enabled:
            gc.enable()


def run(trio_main, *args):
    """Run `trio_main(*args)` in trio, hosted by asyncio with capnp's kj loop."""
    import capnp

    async def host():
        collector = _LoopCollector(asyncio.get_running_loop())
        try:
            return await _hosted()
        finally:
            collector.close()

    async def _hosted():
        async with capnp.kj_loop():
            guest = await _start_guest(trio_main, *args)
            try:
                result = await asyncio.shield(guest.done)
            except asyncio.CancelledError:
                # Ctrl-C cancels this host task: let trio unwind its finally blocks.
                guest.nursery.cancel_scope.cancel()
                await asyncio.shield(guest.done)
                raise
            return result.unwrap()

    global _current
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(host())
    finally:
        _current = None
