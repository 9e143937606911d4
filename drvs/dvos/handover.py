"""drvs-run's side of the supervisor socket: a run's seccomp listener goes
to the node's drvmmd.  Kept apart from supervisor.py, which imports trio and
capnp: drvs-run must not pay for them (~120 ms) on every start."""

import os
import socket

from ..errors import DaemonAway


def socket_path(cfg) -> str:
    return f"{cfg.state_dir}/supervisor.sock"


PROGRAMS = "programs need it to reach the VM's other nodes"


def _unanswered(cfg, e: OSError, need: str = PROGRAMS) -> DaemonAway:
    return DaemonAway(f"drvmmd does not answer on {socket_path(cfg)} ({e.strerror}): on a cluster node, {need}")


def check(cfg, need: str = PROGRAMS) -> None:
    """DaemonAway now if drvmmd is not there (before anything of its view,
    which a dead drvmmd leaves answering ENOTCONN, is touched); need: what
    it is needed for, as the message says."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.connect(socket_path(cfg))
    except OSError as e:
        raise _unanswered(cfg, e, need) from None


def hand_over(cfg, vm: str, listener: int) -> None:
    """Give a run's listener (ours no more, whatever happens) to drvmmd."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.connect(socket_path(cfg))
            socket.send_fds(s, [vm.encode()], [listener])
    except OSError as e:
        raise _unanswered(cfg, e) from None
    finally:
        os.close(listener)
