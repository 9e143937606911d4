"""Thin typed layer over the C launcher (drvs._jail).

`CellSpec` and `RunSpec` are what ext/module.c reads; `describe()` turns the
launcher's failure records into the one-line messages users see.
"""

import errno
import os
from collections import namedtuple

from .. import _jail as J
from ..errors import SetupError

JailError = J.JailError
EXIT_SETUP, EXIT_NOEXEC, EXIT_NOTFOUND = J.EXIT_SETUP, J.EXIT_NOEXEC, J.EXIT_NOTFOUND
CELL_NAMESPACES = J.CLONE_NEWPID | J.CLONE_NEWIPC | J.CLONE_NEWUTS
NEWNET = J.CLONE_NEWNET


# What ext/module.c reads, by attribute name (see struct cell_config).
CellSpec = namedtuple("CellSpec", "hostname init_procs_fds lock_fd rootdir new_net idle_check_ms pid_base pid_top",
                      defaults=(1, 5000, 0, 0))

# See struct run_config; tty_sock and err_fd are filled in by spawn_run().
RunSpec = namedtuple(
    "RunSpec",
    "cell_pidfd ns_flags procs_fds rootdir steps argv envp path cwd caps_keep cap_last "
    "uid gid groups tty rows cols tty_sock err_fd kill_leftovers stdio notify_sock notify_calls pid_base pid_top pgid",
    defaults=(0, 0, (), 0, 0, 0, -1, -1, 1, (), -1, (), 0, 0, 0))


def describe(code: int, step: str, detail: str, err: int) -> str:
    """The user's one line for a launcher failure record."""
    reason = os.strerror(err) if err else "failed"
    if step == "exec":
        if code == EXIT_NOTFOUND and "/" not in detail:
            return f"{detail}: command not found"
        return f"{detail}: {reason}"
    if step == "bind-source":
        return f"bind source {detail}: {reason}"
    if step == "bind-target" and err == errno.ELOOP:
        return f"bind target {detail}: a symbolic link is in the way (binds never follow links inside the jail)"
    if step == "group-anchor" and err == errno.EEXIST:
        return "that process group already has a run on this node (one --pgid run per group and node)"
    if step == "workdir":
        return f"working directory {detail}: {reason}"
    where = f" ({detail})" if detail else ""
    return f"jail setup step {step!r} failed{where}: {reason}"


def spawn_cell(spec: CellSpec) -> int:
    try:
        return J.spawn_cell(spec)
    except JailError as e:
        raise SetupError("cannot create cell: " + describe(*e.args)) from None


class Launched:
    """The keeper (our child), a pidfd on it, the read end of the failure
    pipe (EOF once the program has exec'd), and with -t the socket the pty
    master arrives on."""

    __slots__ = ("pid", "pidfd", "err_r", "tty_r", "notify_r")

    def __init__(self, pid: int, pidfd: int, err_r: int, tty_r):
        self.pid, self.pidfd, self.err_r, self.tty_r = pid, pidfd, err_r, tty_r
        self.notify_r = None


def spawn_run(spec: RunSpec, notify: bool = False) -> Launched:
    """Start the keeper; the caller then waits on `err_r` for exec or failure.
    notify: install the DVOS system-call filter; its listener arrives on
    `notify_r` before the program execs."""
    import socket

    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    ends = []  # (ours, the jail's) socket pairs
    try:
        tty_parent = notify_parent = None
        if spec.tty:
            tty_parent, tty_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ends.append((tty_parent, tty_child))
            spec = spec._replace(tty_sock=tty_child.fileno())
        if notify:
            notify_parent, notify_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ends.append((notify_parent, notify_child))
            spec = spec._replace(notify_sock=notify_child.fileno())
        pid = J.spawn_run(spec._replace(err_fd=err_w))
    except OSError as e:
        os.close(err_r)
        for ours, _ in ends:
            ours.close()
        raise SetupError(f"cannot fork the run's keeper: {e.strerror}") from None
    finally:
        os.close(err_w)
        for _, theirs in ends:
            theirs.close()
    launched = Launched(pid, os.pidfd_open(pid), err_r, tty_parent)
    launched.notify_r = notify_parent
    return launched


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
    record = b"".join(chunks).decode(errors="replace")
    code, step, rest = (record.split("\x1f", 2) + ["", ""])[:3]
    detail, _, err = rest.rpartition("\x1f")  # the detail may hold anything; errno is last
    try:
        return int(code), step, detail, int(err or errno.EIO)
    except ValueError:
        return EXIT_SETUP, step or "launcher", detail, errno.EIO


def receive_fd(sock, what: str) -> int:
    """The descriptor the jail sent over its socket (a pty master, a
    seccomp listener)."""
    import socket

    msg, ancdata, _flags, _addr = sock.recvmsg(1, socket.CMSG_SPACE(4), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            return int.from_bytes(data[:4], "little")
    raise SetupError(f"the jail sent no {what}")
