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
server's method).  See docs/architecture.md.

    run(trio_main, *args)        the process's entry point
    await capnp_await(promise)   trio: the result of a pycapnp call
    await aio(coroutine)         trio: any asyncio coroutine on the host loop
    await guest.call_trio(f, *a) asyncio (a capnp server method): trio code
"""

import asyncio

import outcome
import trio

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
    )
    _current = guest
    await started
    return guest


def run(trio_main, *args):
    """Run `trio_main(*args)` in trio, hosted by asyncio with capnp's kj loop."""
    import capnp

    async def host():
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
        with asyncio.Runner() as runner:
            return runner.run(host())
    finally:
        _current = None
