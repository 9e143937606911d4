"""How the view's FUSE workers wait (drvs/dvos/fusewait.py): in line on the
host loop of a real bridge run (asyncio host, trio guest), over real fds --
pipes for the line's own rules, and a real FUSE mount served by pyfuse3
with the line installed."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio

from drvs.dvos import fusewait
from drvs.ipc import bridge

REPO = Path(__file__).resolve().parent.parent


class Idle:
    """The machine's load as the line's poll sees it, fixed (a loaded CI
    machine must not decide whether the poll runs in a test of its rules)."""

    def __init__(self, idle: bool):
        self.idle = idle

    def idle_cpu(self) -> bool:
        return self.idle

    def close(self) -> None:
        pass


def _in_line(fn):
    """Run async fn(line, r, w) in a bridge run, over a fresh pipe (its
    read end non-blocking: a worker woken for nothing fails, not hangs)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        async def main():
            line = fusewait.Line(r, Idle(False))
            try:
                return await fn(line, r, w)
            finally:
                line.close()
        return bridge.run(main)
    finally:
        os.close(r)
        os.close(w)


async def _waiter(line, r, name, order, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    await line.wait()
    order.append(name)
    os.read(r, 1)  # as a worker reads its request


@pytest.fixture(params=["uvloop", "asyncio"])
def host_loop(request, monkeypatch):
    """Each host loop the daemon may run on (DRVS_UVLOOP=0: asyncio's own)."""
    monkeypatch.setenv("DRVS_UVLOOP", "1" if request.param == "uvloop" else "0")
    return request.param


async def _line_up(nursery, line, r, names, order):
    """Workers named names, each in line after the one before."""
    for name in names:
        await nursery.start(_waiter, line, r, name, order)
        await trio.sleep(0.01)


def test_workers_are_woken_one_per_request_in_the_order_they_came(host_loop):
    async def fn(line, r, w):
        order = []
        async with trio.open_nursery() as n:
            await _line_up(n, line, r, "abc", order)
            os.write(w, b"1")
            await trio.sleep(0.1)
            first = list(order)
            os.write(w, b"22")
            await trio.sleep(0.1)
        return first, order, line.stats.copy()

    first, order, stats = _in_line(fn)
    assert first == ["a"]  # one request, one worker: the others stay in line
    assert order == ["a", "b", "c"]
    assert stats["woken"] == 3 and not stats["caught"]


def test_a_readiness_already_read_wakes_no_one():
    async def fn(line, r, w):
        order = []
        async with trio.open_nursery() as n:
            await n.start(_waiter, line, r, "a", order)
            await trio.sleep(0.01)
            os.write(w, b"1")
            line._ready()  # (the readiness, as the loop reports it) ...
            await trio.sleep(0.05)
            line._ready()  # ... and again once the worker has read: stale
            n.start_soon(_waiter, line, r, "b", order)
            await trio.sleep(0.05)
            line._ready()
            await trio.sleep(0.05)
            waiting = len(line.waiting)
            n.cancel_scope.cancel()
        return order, waiting

    order, waiting = _in_line(fn)
    assert order == ["a"] and waiting == 1


def test_a_second_readiness_before_the_woken_worker_ran_wakes_no_other():
    async def fn(line, r, w):
        order = []
        async with trio.open_nursery() as n:
            await _line_up(n, line, r, "ab", order)
            os.write(w, b"1")
            line._ready()  # (from inside the guest: the woken worker runs at trio's next batch) ...
            line._ready()  # ... so this is still its request
            await trio.sleep(0.05)
            waiting = len(line.waiting)
            n.cancel_scope.cancel()
        return order, waiting

    assert _in_line(fn) == (["a"], 1)


def test_a_worker_woken_for_a_request_taken_back_waits_again():
    """The kernel takes back a request not yet read when its caller is
    killed: the worker woken for it finds nothing to read, and waits for
    the next request rather than reading (EAGAIN would end pyfuse3)."""
    async def fn(line, r, w):
        order = []
        async with trio.open_nursery() as n:
            await _line_up(n, line, r, "a", order)
            os.write(w, b"1")
            line._ready()  # (the woken worker runs at trio's next batch) ...
            os.read(r, 1)  # ... after the request is gone
            await trio.sleep(0.05)
            before = list(order), len(line.waiting)
            os.write(w, b"2")
            await trio.sleep(0.1)
        return before, order, line.stats["withdrawn"]

    assert _in_line(fn) == (([], 1), ["a"], 1)


def test_a_worker_whose_read_was_refused_eagain_reads_on():
    """Past the line's look, the read itself may find the request gone:
    pyfuse3's worker loop raises BlockingIOError, and is run again by the
    same task instead of ending the session."""
    runs = []

    async def session_loop(*args):
        runs.append(args)
        if len(runs) == 1:
            raise BlockingIOError(11, "fuse_session_receive_buf failed with Resource temporarily unavailable")
        return "ended"

    assert trio.run(fusewait.reading_on(session_loop), "nursery", 1, 2) == "ended"
    assert runs == [("nursery", 1, 2)] * 2


def test_only_the_last_busy_worker_polls():
    """A worker that comes to wait while another handles a request sleeps
    in line: the poll is for the moment the daemon would go idle."""
    async def fn(line, r, w):
        line.load = Idle(True)
        handling = trio.Event()
        order = []

        async def busy_worker():
            await line.wait()  # the last one: polls, and reads what was there
            order.append(os.read(r, 1))
            await handling.wait()  # (handling it: a call to another node, say)

        os.write(w, b"1")
        async with trio.open_nursery() as n:
            n.start_soon(busy_worker)
            await trio.sleep(0.01)
            os.write(w, b"2")
            await n.start(_waiter, line, r, "second", order)
            await trio.sleep(0.05)
            handling.set()
        return order, line.stats.copy()

    order, stats = _in_line(fn)
    assert order == [b"1", "second"]
    assert stats["caught"] == 1 and stats["slept"] == 1 and stats["woken"] == 1


def test_a_cancelled_worker_leaves_the_line():
    async def fn(line, r, w):
        order = []
        async with trio.open_nursery() as n:
            gone = trio.CancelScope()

            async def cancelled_waiter():
                with gone:
                    await _waiter(line, r, "x", order)

            n.start_soon(cancelled_waiter)  # first in line ...
            await trio.sleep(0.01)
            n.start_soon(_waiter, line, r, "a", order)
            await trio.sleep(0.01)
            gone.cancel()  # ... and gone
            await trio.sleep(0.01)
            os.write(w, b"1")
            await trio.sleep(0.1)
        return order

    assert _in_line(fn) == ["a"]


def test_closing_tells_every_worker_in_line_and_every_later_one():
    async def fn(line, r, w):
        told = []

        async def waiter():
            try:
                await line.wait()
            except trio.ClosedResourceError:
                told.append("closed")

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            n.start_soon(waiter)
            await trio.sleep(0.02)
            line.close()
        await waiter()
        return told, line.watched

    told, watched = _in_line(fn)
    assert told == ["closed"] * 3 and not watched  # (and the fd no longer watched)


def test_the_last_worker_reads_a_request_that_came_while_it_polled(host_loop):
    """No other worker busy and a CPU idle: a request already there (or
    coming within the window) is read without the daemon going to sleep;
    the next wait gives the host loop a turn first."""
    def fn_for(idle):
        async def fn(line, r, w):
            line.load = Idle(idle)
            events = []
            os.write(w, b"12")
            for i in (1, 2):  # one worker, as pyfuse3's loops: wait, read, handle, wait
                await line.wait()
                events.append(os.read(r, 1))
                if i == 1:
                    line.loop.call_soon(events.append, "host loop")
            return events, line.stats.copy()
        return fn

    events, stats = _in_line(fn_for(True))
    assert stats["caught"] == 2 and not stats["slept"]
    assert events == [b"1", "host loop", b"2"]  # the loop turned between the two requests
    events, stats = _in_line(fn_for(False))  # every CPU busy: no poll, a sleep and a wake-up each
    assert [e for e in events if e != "host loop"] == [b"1", b"2"]
    assert not stats["caught"] and stats["woken"] == 2


def test_the_poll_gives_way_to_the_host_loops_own_io(host_loop):
    """A readiness the host loop has to handle (here another pipe it
    watches) ends the poll at once: the worker sleeps in line rather than
    keep the loop from it."""
    def fn(line, r, w):
        async def inner(line, r, w):
            line.load = Idle(True)
            other_r, other_w = os.pipe()
            seen = []
            line.loop.add_reader(other_r, lambda: seen.append(os.read(other_r, 1)))
            try:
                await trio.sleep(0.01)  # (libuv adds a watch to its epoll at its next turn)
                os.write(other_w, b"x")
                order = []
                async with trio.open_nursery() as n:
                    n.start_soon(_waiter, line, r, "a", order)
                    await trio.sleep(0.05)  # (the loop reads the other pipe; the worker waits in line)
                    os.write(w, b"1")
            finally:
                line.loop.remove_reader(other_r)
                os.close(other_r)
                os.close(other_w)
            return order, seen, line.stats.copy(), line.window
        return inner(line, r, w)

    order, seen, stats, window = _in_line(fn)
    assert order == ["a"] and seen == [b"x"]
    assert not stats["caught"] and stats["slept"] == 1
    assert window == fusewait.SPIN_MAX  # given way at once: not a poll that ran out (those halve it)


def test_a_busy_machine_is_seen_as_such():
    """_Load, against the real /proc/loadavg: with more spinning processes
    than CPUs, no CPU is idle."""
    load = fusewait._Load()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range((os.cpu_count() or 1) + 1)]
    try:
        deadline = time.monotonic() + 5
        busy = False
        while not busy and time.monotonic() < deadline:
            busy = not load.idle_cpu()
            time.sleep(0.01)
        assert busy
    finally:
        for p in spinners:
            p.kill()
            p.wait()
        load.close()


def test_wake_runs_the_woken_task_before_the_host_callback_returns():
    async def main():
        task, seen = None, []

        async def sleeper():
            nonlocal task
            task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
            seen.append("ran")

        async with trio.open_nursery() as n:
            n.start_soon(sleeper)
            await trio.sleep(0.01)
            done = trio.Event()

            def callback():
                bridge.wake(task)
                seen.append(f"callback returned after {len(seen)}")
                done.set()

            bridge.current_guest().loop.call_soon(callback)
            await done.wait()
        return seen

    assert bridge.run(main) == ["ran", "callback returned after 1"]


MEMFS_WITH_LINE = textwrap.dedent(r'''
    import json, signal, sys
    import pyfuse3, trio
    sys.path.insert(0, sys.argv[2])
    from memfs import MemFs
    from drvs.dvos import fusewait
    from drvs.ipc import bridge

    async def main(path):
        pyfuse3.init(MemFs(), path, {"fsname=memfs-line"})
        stats = None
        try:
            async with trio.open_nursery() as nursery:
                async def serve():
                    nonlocal stats
                    with fusewait.install() as ns:
                        reading_on, workers = pyfuse3._session_loop, []

                        async def counted(*args):  # (pyfuse3 finds its worker loop by name: ours)
                            workers.append(1)
                            return await reading_on(*args)

                        pyfuse3._session_loop = counted
                        try:
                            await pyfuse3.main()
                        finally:
                            stats = {str(fd): line.stats.copy() for fd, line in ns.lines.items()}
                            stats["workers"] = len(workers) if hasattr(reading_on, "__wrapped__") else 0
                nursery.start_soon(serve)
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()  # the workers in line are told; main() returns
                        break
        finally:
            pyfuse3.close(unmount=True)
        print(json.dumps(stats), flush=True)

    bridge.run(main, sys.argv[1])
''')


@pytest.fixture
def memfs_with_line(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", MEMFS_WITH_LINE, str(mnt), str(REPO / "bench" / "progs")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            assert proc.poll() is None and time.monotonic() < deadline, "memfs did not mount"
            time.sleep(0.05)
        yield mnt, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)])


def test_a_fuse_mount_served_from_the_line_answers_concurrent_clients_and_ends(memfs_with_line):
    mnt, proc = memfs_with_line

    def client(k: int) -> int:
        d = mnt / f"c{k}"
        d.mkdir()
        for i in range(150):
            (d / f"f{i}").write_bytes(f"{k}:{i}".encode() * 50)
        ok = sum((d / f"f{i}").read_bytes() == f"{k}:{i}".encode() * 50 for i in range(150))
        for i in range(150):
            (d / f"f{i}").unlink()
        d.rmdir()
        return ok

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(client, range(4))) == [150] * 4
    assert os.listdir(mnt) == []
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    stats = json.loads(out)
    assert stats.pop("workers") > 0  # (its workers read on after a request taken back: reading_on)
    (line,) = stats.values()  # one line, for the session's fd
    assert line["woken"] + line.get("caught", 0) > 600  # every request came through it
    assert not os.path.ismount(mnt)


def test_the_line_is_left_out_without_a_host_loop():
    async def main():
        with fusewait.install() as ns:
            return ns

    assert trio.run(main) is None
