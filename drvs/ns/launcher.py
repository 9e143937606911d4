"""Thin typed layer over the C launcher (drvs._jail).

`CellSpec` and `RunSpec` are what ext/module.c reads; `describe()` turns the
launcher's failure records into the one-line messages users see.
"""

import errno
import os
import socket
from dataclasses import dataclass, field

from .. import _jail as J
from ..errors import SetupError

JailError = J.JailError
EXIT_SETUP, EXIT_NOEXEC, EXIT_NOTFOUND = J.EXIT_SETUP, J.EXIT_NOEXEC, J.EXIT_NOTFOUND
CELL_NAMESPACES = J.CLONE_NEWPID | J.CLONE_NEWIPC | J.CLONE_NEWUTS | J.CLONE_NEWCGROUP
NEWNET = J.CLONE_NEWNET


@dataclass
class CellSpec:
    hostname: str
    cell_procs_fds: list[int]
    init_procs_fds: list[int]
    lock_fd: int
    new_net: int = 1
    idle_check_ms: int = 5000


@dataclass
class RunSpec:
    cell_pidfd: int
    ns_flags: int
    procs_fds: list[int]
    rootdir: str
    steps: list
    argv: list[str]
    envp: list[str]
    path: str
    cwd: str
    caps_keep: int
    cap_last: int
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    tty: int = 0
    rows: int = 0
    cols: int = 0
    tty_sock: int = -1
    err_fd: int = -1
    kill_leftovers: int = 1


def describe(code: int, step: str, detail: str, err: int) -> str:
    """The user's one line for a launcher failure record."""
    reason = os.strerror(err) if err else "failed"
    if step == "exec":
        if code == EXIT_NOTFOUND and "/" not in detail:
            return f"{detail}: command not found"
        return f"{detail}: {reason}"
    if step == "bind-source":
        return f"bind source {detail}: {reason}"
    if step == "workdir":
        return f"working directory {detail}: {reason}"
    where = f" ({detail})" if detail else ""
    return f"jail setup step {step!r} failed{where}: {reason}"


def spawn_cell(spec: CellSpec) -> int:
    try:
        return J.spawn_cell(spec)
    except JailError as e:
        raise SetupError("cannot create cell: " + describe(*e.args)) from None


@dataclass
class Launched:
    pid: int          # the keeper, our child
    pidfd: int
    err_r: int        # failure records; EOF once the program has exec'd
    tty_r: socket.socket | None


def spawn_run(spec: RunSpec) -> Launched:
    """Start the keeper; the caller then waits on `err_r` for exec or failure."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    tty_parent = tty_child = None
    if spec.tty:
        tty_parent, tty_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec.tty_sock = tty_child.fileno()
    spec.err_fd = err_w
    try:
        pid = J.spawn_run(spec)
    except OSError as e:
        os.close(err_r)
        if tty_parent:
            tty_parent.close()
        raise SetupError(f"cannot fork the run's keeper: {e.strerror}") from None
    finally:
        os.close(err_w)
        if tty_child:
            tty_child.close()
    return Launched(pid, os.pidfd_open(pid), err_r, tty_parent)


def read_failure(fd: int) -> tuple[int, str, str, int] | None:
    """Block until the program exec'd (None) or a step failed (its record)."""
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not data:
            break
        chunks.append(data)
    if not chunks:
        return None
    code, step, detail, err = b"".join(chunks).decode(errors="replace").split("\x1f", 3)
    return int(code), step, detail, int(err or errno.EIO)


def receive_tty(sock: socket.socket) -> int:
    """The pty master that the jail sent over its socket."""
    msg, ancdata, _flags, _addr = sock.recvmsg(1, socket.CMSG_SPACE(4))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            return int.from_bytes(data[:4], "little")
    raise SetupError("the jail sent no terminal")
