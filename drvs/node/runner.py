"""Programs started through the fabric (Node.run): the serving side.

The jail is the same as drvs-run's (drvs.ns.jail.Run); what differs is the
plumbing: the program's stdio are pipes (or the jail's pty) that trio tasks
pump to and from the caller's ByteStream capabilities, signals arrive as
Process.signal calls, and the exit status is awaited on the keeper's pidfd.
"""

import errno
import fcntl
import logging
import os
import signal
import struct
import termios

import capnp
import trio

from .. import config
from ..errors import DrvsError
from ..ipc.bridge import capnp_await
from ..ipc.remote import OUTPUT_CLOSED
from ..ns import jail
from ..vm.model import Limits
from ..vm.registry import VmRegistry

log = logging.getLogger("drvmmd")
CHUNK = 64 * 1024
CALLER_SILENT_LIMIT = 300.0  # seconds a caller may leave output unread
CALLER_CHECK = 2.0           # seconds between looks at a quiet program's caller
LOST = 7                     # a run whose node stopped serving it: as for a message that could not be delivered


class RemoteRun:
    """One program started for a remote (or local) caller."""

    def __init__(self, request, stdout, stderr, etcd, supervise=None, spawner=None):
        self.req, self.etcd, self.supervise, self.spawner = request, etcd, supervise, spawner
        self.stdout, self.stderr = stdout, stderr
        self.done = trio.Event()
        self.exit_code, self.message = 0, ""
        self.run: jail.Run | None = None
        self.stdin_w = -1
        self.master = -1

    def options(self, stdio) -> jail.RunOptions:
        return run_options(self.req, stdio)

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start the program, pump its output, wait for its end."""
        child_fds, ours = [], []
        try:
            if self.req["tty"]:
                stdio = ()
            else:
                in_r, self.stdin_w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(self.stdin_w, False)  # writes wait in trio, never in the kernel
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                child_fds, ours = [in_r, out_w, err_w], [out_r, err_r]
                stdio = (in_r, out_w, err_w)
            cfg = config.load()
            vm = await VmRegistry.get_async(self.etcd, self.req["vm"] or "default")
            self.run = jail.Run(cfg, vm, self.options(stdio), supervise=self.supervise)
            await self._kernel(self.run.start, False)
        except Exception as e:  # noqa: BLE001 - a failed start is this run's result, not the daemon's end
            self.exit_code, self.message = (e.exit_code, str(e)) if isinstance(e, DrvsError) else \
                (125, f"cannot start the program: {type(e).__name__}: {e}")
            for fd in ours:
                os.close(fd)
            if self.stdin_w >= 0:
                os.close(self.stdin_w)
                self.stdin_w = -1
            await self._finish_streams()
            self.done.set()
            task_status.started()
            return
        finally:
            for fd in child_fds:
                os.close(fd)
        task_status.started()
        watching = trio.CancelScope()
        reaped = False
        try:
            async with trio.open_nursery() as pumps:
                if self.req["tty"]:
                    self.master = self.run.tty_master
                    os.set_blocking(self.master, False)
                    pumps.start_soon(self._pump_out, self.master, self.stdout, True)
                else:
                    pumps.start_soon(self._pump_out, ours[0], self.stdout, False)
                    pumps.start_soon(self._pump_out, ours[1], self.stderr, False)
                pumps.start_soon(self._watch_caller, watching)
                await trio.lowlevel.wait_readable(self.run.proc.pidfd)
                watching.cancel()
            result = self.run.reap()
            self.exit_code = result.exit_code
            self.message = jail.explain(result) or ""
            reaped = True
        finally:
            if not reaped:  # (this daemon is stopping: the cleanup ends the program)
                self.exit_code = LOST
                self.message = "the program's node stopped serving it (its drvmmd ended); the program was ended"
            with trio.CancelScope(shield=True):
                if self.master >= 0:
                    trio.lowlevel.notify_closing(self.master)
                    self.master = -1  # Run.cleanup closes it
                await self._kernel(self.run.cleanup)
                if self.stdin_w >= 0:
                    trio.lowlevel.notify_closing(self.stdin_w)
                    os.close(self.stdin_w)
                    self.stdin_w = -1
                await self._finish_streams()
                self.done.set()

    async def _kernel(self, fn, *args):
        """Jail work goes to the daemon's spawner thread (drvs/node/spawner.py)."""
        if self.spawner is None:
            return fn(*args)
        return await self.spawner.call(fn, *args)

    async def _pump_out(self, fd: int, sink, is_pty: bool) -> None:
        stream = trio.lowlevel.FdStream(os.dup(fd)) if not is_pty else None
        if stream is not None:
            os.close(fd)
        try:
            while True:
                if stream is not None:
                    data = await stream.receive_some(CHUNK)
                else:
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        data = os.read(fd, CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        if e.errno != errno.EIO:
                            raise
                        data = b""
                if not data:
                    return
                try:
                    with trio.fail_after(CALLER_SILENT_LIMIT):
                        await capnp_await(sink.write(data))
                except capnp.KjException as e:
                    if stream is not None and OUTPUT_CLOSED in str(getattr(e, "description", "")):
                        return  # (the pipe closes below: the program's next write is a broken pipe)
                    self._caller_went_away()
                    return
                except (trio.TooSlowError, trio.BrokenResourceError):
                    self._caller_went_away()
                    return
        finally:
            if stream is not None:
                await stream.aclose()

    def _caller_went_away(self) -> None:
        """The caller is gone (or stopped reading for minutes): nobody can
        see or signal the program any more."""
        log.info("caller of %s went away; ending it", self.req["argv"][:1])
        self.caller_gone()

    async def _watch_caller(self, scope: trio.CancelScope) -> None:
        """A quiet program's caller is asked now and then whether it is
        still there (an empty write: a failed one is how a program that
        prints finds out); gone, the program is ended."""
        with scope:
            while True:
                await trio.sleep(CALLER_CHECK)
                try:
                    with trio.fail_after(CALLER_SILENT_LIMIT):
                        await capnp_await(self.stdout.write(b""))
                except (capnp.KjException, trio.TooSlowError, trio.BrokenResourceError):
                    self._caller_went_away()
                    return

    async def _finish_streams(self) -> None:
        for sink in (self.stdout, self.stderr):
            try:
                with trio.move_on_after(5):
                    await capnp_await(sink.done())
            except Exception:  # noqa: BLE001 - the caller went away
                pass

    def caller_gone(self) -> None:
        """End the program: its caller cannot see or signal it any more."""
        if self.run is not None and self.run.proc is not None and not self.done.is_set():
            try:
                signal.pidfd_send_signal(self.run.proc.pidfd, jail.END_RUN_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    # -- Process methods (called from the capnp server, in trio) -------------

    async def write_stdin(self, data: bytes) -> None:
        fd = self.master if self.master >= 0 else self.stdin_w
        if fd < 0:
            return
        view = memoryview(data)
        while view:
            await trio.lowlevel.wait_writable(fd)
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue
            except OSError:
                return  # the program closed its stdin
            fd = self.master if self.master >= 0 else self.stdin_w
            if fd < 0:
                return

    async def close_stdin(self) -> None:
        if self.master >= 0:
            await self.write_stdin(b"\x04")  # ^D on the terminal
        elif self.stdin_w >= 0:
            trio.lowlevel.notify_closing(self.stdin_w)
            os.close(self.stdin_w)
            self.stdin_w = -1

    def signal(self, signum: int) -> None:
        if self.run is not None and self.run.proc is not None and not self.done.is_set():
            try:
                signal.pidfd_send_signal(self.run.proc.pidfd, signum)
            except (ProcessLookupError, OSError):
                pass

    def resize(self, rows: int, cols: int) -> None:
        if self.master >= 0:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def run_options(r: dict, stdio=(), detached: bool = False) -> jail.RunOptions:
    """The drvs-run options a RunRequest (as request_dict made it) asks for."""
    env = {}
    for item in r["env"]:
        k, _, v = item.partition("=")
        env[k] = v
    limits = Limits(cpus=r["cpus"] or None, cpuset=r["cpuset"] or None, memory=r["memory"] or None,
                    pids=r["pidsLimit"] or None)
    caps = tuple(r["caps"]) if r["capsGiven"] else jail.DEFAULT_CAPS
    return jail.RunOptions(argv=list(r["argv"]), env=env, cwd=r["workdir"] or "/data", tty=r["tty"],
                           interactive=r["interactive"], limits=limits, net_host=r["netHost"],
                           stdio=stdio, rows=r["rows"], cols=r["cols"], pgid=r["pgid"],
                           uid=r["uid"], gid=r["gid"], groups=tuple(r["groups"]), caps=caps, detached=detached)


def request_dict(r) -> dict:
    """A RunRequest reader, copied out (readers die with their message)."""
    return {"vm": r.vm, "argv": list(r.argv), "env": list(r.env), "workdir": r.workdir, "tty": r.tty,
            "interactive": r.interactive, "rows": r.rows, "cols": r.cols, "cpus": r.cpus, "memory": r.memory,
            "pidsLimit": r.pidsLimit, "netHost": r.netHost, "node": r.node, "pgid": r.pgid,
            "uid": r.uid, "gid": r.gid, "groups": list(r.groups), "caps": list(r.caps), "capsGiven": r.capsGiven,
            "cpuset": r.cpuset}
