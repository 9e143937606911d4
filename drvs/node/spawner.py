"""The daemon's kernel-work thread: where jails and cells are started and
removed, off the trio loop.

Starting a jail blocks for milliseconds (cgroup moves, forks, the cell's
flock, waiting for the exec), and may itself need the daemon's loop: the
jail binds the /proc view this daemon serves with FUSE, so a start on the
loop would wait for an answer the loop cannot give.  One long-lived thread,
not trio's worker threads: the run's keeper gets its parent-death signal
when the *thread* that forked it exits, and trio retires idle workers.
Calls are serial, which also keeps the daemon's own cell-lock holders from
contending with each other."""

import queue
import threading

import outcome
import trio


class Spawner:
    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="drvs-spawner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, deliver = job
            deliver(outcome.capture(fn))

    async def call(self, fn, *args):
        """fn(*args) in the spawner thread; its result or exception.  Not
        cancellable once queued: what it starts must not be lost."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box = []

        def deliver(result):
            box.append(result)
            token.run_sync_soon(done.set)

        self._jobs.put((lambda: fn(*args), deliver))
        with trio.CancelScope(shield=True):
            await done.wait()
        return box[0].unwrap()

    def close(self) -> None:
        self._jobs.put(None)
