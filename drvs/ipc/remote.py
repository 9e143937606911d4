"""drvs-run --node: a program on another node, its stdio carried by the fabric.

The command talks to this node's drvmmd (unix socket), which hands the call
to the target node; output arrives through ByteStream capabilities served
here, input goes out through the Process's stdin stream, signals through
Process.signal, and the exit status through Process.wait."""

import asyncio
import contextlib
import errno
import os
import signal

from ..ns.jail import Interrupts
from .message import IpcError, kj_reason

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# What a caller's failed write says when its own output was closed (`| head`):
# the program's node then closes that pipe of the program, which sees a
# broken pipe as it would locally -- the caller is still there for its status.
OUTPUT_CLOSED = "drvs-run: output closed"
DETACH_TIMEOUT = 60.0  # seconds a node may take to start a detached run (its cell may be made first)


def _say(line: str) -> None:
    """A line on stderr, if it can be written (it may be what failed)."""
    try:
        os.write(2, f"{line}\n".encode())
    except OSError:
        pass


def fill_request(r, node: str, vm: str, opts) -> None:
    """A RunRequest (fabric.capnp) for opts.argv in vm on node."""
    r.vm, r.node, r.workdir = vm, node, opts.cwd
    argv = r.init("argv", len(opts.argv))
    for i, a in enumerate(opts.argv):
        argv[i] = a
    env = r.init("env", len(opts.env))
    for i, (k, v) in enumerate(opts.env.items()):
        env[i] = f"{k}={v}"
    r.tty, r.interactive, r.netHost = opts.tty, opts.interactive, opts.net_host
    r.pgid = opts.pgid
    r.uid, r.gid = opts.uid, opts.gid
    groups = r.init("groups", len(opts.groups))
    for i, g in enumerate(opts.groups):
        groups[i] = g
    caps = r.init("caps", len(opts.caps))
    for i, c in enumerate(opts.caps):
        caps[i] = c
    r.capsGiven = True
    r.cpuset = opts.limits.cpuset or ""
    r.cpus = opts.limits.cpus or 0.0
    r.memory = opts.limits.memory or 0
    r.pidsLimit = opts.limits.pids or 0
    if opts.tty:
        from ..ns import terminal

        r.rows, r.cols = terminal.window_size(0)


def detach(state_dir: str, node: str, vm: str, opts) -> str:
    """drvs-run -d on another node (its drvmm starts the run there, as
    drvs-run -d would on it); the run's id."""
    from ..errors import DrvsError
    from . import client
    from .message import Msg, check
    from .schema import drvmm, fabric

    request = fabric.RunRequest.new_message()
    fill_request(request, node, vm, opts)
    target = f"drvmm@{node}"
    reply = check(client.sendrec(state_dir, target, Msg(drvmm.DrvmmCall.detach, request.to_bytes_packed()),
                                 timeout=DETACH_TIMEOUT + 5), target)
    started = drvmm.Detached.from_bytes_packed(reply.payload)
    if not started.run:
        err = DrvsError(started.message or f"the run did not start on node {node}")
        err.exit_code = started.exitCode or 125
        raise err
    return started.run


def run(state_dir: str, node: str, vm: str, opts) -> tuple[int, str]:
    """(exit code, message) of opts.argv run on node.  With -i -t on a
    terminal, it is raw from before the call: the program's first output
    may come before the call's reply, and a cooked terminal would show
    its \r\n as \r\r\n."""
    raw = contextlib.nullcontext()
    if opts.tty and opts.interactive and os.isatty(0):
        from ..ns import terminal

        raw = terminal.raw_mode(0)
    with raw:
        return asyncio.run(_run(state_dir, node, vm, opts))


async def _run(state_dir: str, node: str, vm: str, opts):
    import capnp

    from .schema import fabric

    class Sink(fabric.ByteStream.Server):
        def __init__(self, fd: int):
            self.fd = fd
            self.lost: OSError | None = None  # why some of the program's output was not written

        async def write(self, data, **kwargs):
            view = memoryview(bytes(data))
            try:
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as e:
                # The program's node closes its end: its next write there
                # fails (EPIPE), as the nearest a remote program gets to this
                # one's error; a full disk or a closed descriptor is said here.
                if not isinstance(e, BrokenPipeError):
                    _say(f"drvs-run: cannot write the program's {'output' if self.fd == 1 else 'errors'} "
                         f"(fd {self.fd}): {e.strerror}")
                self.lost = self.lost or e
                raise RuntimeError(OUTPUT_CLOSED) from None

        async def done(self, **kwargs):
            pass

    from .client import connect, daemon_answers, socket_path

    path = socket_path(state_dir)

    async with capnp.kj_loop():
        client, node_cap = await connect(path)
        call = node_cap.run_request()
        fill_request(call.init("request"), node, vm, opts)
        sinks = call.stdout, call.stderr = Sink(1), Sink(2)
        # Signals are caught from now on; those that come before the program
        # exists wait for it (its output may arrive before the call's reply).
        loop = asyncio.get_running_loop()
        pending: list[int] = []
        interrupts = Interrupts()
        target = {}

        def on_signal(sig):
            sig = interrupts.forward(sig)
            if "process" in target:
                asyncio.ensure_future(target["process"].signal(int(sig)))
            else:
                pending.append(int(sig))

        for sig in FORWARDED:
            loop.add_signal_handler(sig, on_signal, sig)
        def lost(e, what: str) -> IpcError:
            """The connection to this node's drvmmd broke: its death (then
            said as such, not blamed on the other node), or the node's."""
            if getattr(e, "type", None) == "DISCONNECTED" and not daemon_answers(state_dir, settle=0.3):
                return IpcError(f"this node's drvmmd stopped ({path} refuses connections): the program on "
                                f"node {node} is ended with its caller", errno.ECONNRESET)
            return IpcError(f"node {node}: {what}{kj_reason(e)}", errno.ECONNRESET if what else errno.EIO)

        try:
            process = (await call.send()).process
        except capnp.KjException as e:
            raise lost(e, "") from None
        target["process"] = process
        for sig in pending:
            asyncio.ensure_future(process.signal(sig))
        if opts.tty:
            loop.add_signal_handler(signal.SIGWINCH, lambda: asyncio.ensure_future(_resize(process)))
        pump = None
        # Input goes to the program with -i, or when it is a pipe or a file
        # (as with a local run); a terminal's stays with the user otherwise.
        if opts.interactive or not os.isatty(0):
            pump = asyncio.ensure_future(_pump_stdin(loop, process))
            pump.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            result = await process.wait()
        except capnp.KjException as e:
            raise lost(e, "lost the program: ") from None
        finally:
            if pump is not None:
                pump.cancel()
        return _with_output_lost(result.exitCode, [sink.lost for sink in sinks]), result.message


def _with_output_lost(code: int, lost: list) -> int:
    """A program that ended well, but whose output this side could not
    write in full, does not say success: 141 when its reader had gone (as
    a local writer to a closed pipe dies of SIGPIPE: `| head`, pipefail),
    else 74 (EX_IOERR: a full disk, a closed descriptor; said on stderr)."""
    errors = [e for e in lost if e is not None]
    if code != 0 or not errors:
        return code
    if all(isinstance(e, BrokenPipeError) for e in errors):
        return 128 + signal.SIGPIPE
    from ..errors import OutputFailed

    return OutputFailed.exit_code


async def _resize(process) -> None:
    from ..ns import terminal

    rows, cols = terminal.window_size(0)
    if rows:
        await process.resize(rows, cols)


async def _pump_stdin(loop, process) -> None:
    """Our stdin to the program, with flow control; EOF closes its stdin.
    A daemon thread reads, so that files, pipes and terminals all work and
    a read still blocked at the end holds nothing up."""
    import threading

    stream = (await process.stdin()).stream
    queue: asyncio.Queue = asyncio.Queue(maxsize=4)
    wanted = threading.Semaphore(4)

    def reader():
        while True:
            wanted.acquire()
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            try:
                loop.call_soon_threadsafe(queue.put_nowait, data)
            except RuntimeError:
                return  # (the loop closed: the run ended before its input did)
            if not data:
                return

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    while True:
        data = await queue.get()
        wanted.release()
        if not data:
            await stream.done()
            return
        await stream.write(data)
