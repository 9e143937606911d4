"""The seccomp half of ext/ (drvs._sys) with a real filter and listener:
a supervisor in this test serves a child's calls, writes results into its
memory, hands it a descriptor, and bad pointers give EFAULT."""

import ctypes
import os
import socket

import pytest

from drvs import _sys

NR = _sys.NR


def child_with_filter(nrs, body):
    """Fork a child that installs a filter for nrs, sends us the listener,
    then runs body() and exits with its result; returns (pid, listener)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ours.close()
            listener = _sys.listen(nrs)
            socket.send_fds(theirs, [b"L"], [listener])
            os.close(listener)
            code = body()
        finally:
            os._exit(code)
    theirs.close()
    _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    ours.close()
    return pid, fds[0]


def exit_code(pid):
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_serve_a_call_write_its_result_and_hand_over_a_descriptor(tmp_path):
    libc = ctypes.CDLL(None, use_errno=True)
    secret = tmp_path / "secret"
    secret.write_text("from the supervisor\n")

    def body():
        buf = ctypes.create_string_buffer(390)  # struct utsname
        if libc.syscall(NR["uname"], buf) != 0:
            return 10
        if buf.raw[:6] != b"drvs-\0":
            return 11
        fd = libc.syscall(NR["getppid"])  # served: a descriptor of the supervisor's
        if fd < 3 or os.read(fd, 100) != b"from the supervisor\n":
            return 12
        return 0

    pid, listener = child_with_filter([NR["uname"], NR["getppid"]], body)
    try:
        nid, who, nr, _arch, args = _sys.recv(listener)
        assert nr == NR["uname"] and who == pid and _sys.id_valid(listener, nid)
        with pytest.raises(OSError) as bad:
            _sys.write_mem(pid, 8, b"x")  # a bad pointer is EFAULT, not a crash
        assert bad.value.errno == 14
        _sys.write_mem(pid, args[0], b"drvs-\0")
        assert _sys.respond(listener, nid, 0, 0, False)
        nid, who, nr, _arch, args = _sys.recv(listener)
        assert nr == NR["getppid"]
        with open(secret, "rb") as f:
            _sys.addfd(listener, nid, f.fileno(), True)  # the fd is also the call's result
        assert exit_code(pid) == 0
    finally:
        os.close(listener)


def test_a_caller_gone_is_seen_and_its_answer_dropped():
    pid, listener = child_with_filter([NR["getppid"]], lambda: ctypes.CDLL(None).syscall(NR["getppid"]) and 0)
    try:
        nid, *_ = _sys.recv(listener)
        os.kill(pid, 9)
        assert exit_code(pid) == -9
        assert not _sys.id_valid(listener, nid)
        assert _sys.respond(listener, nid, 0, 0, False) is False  # nobody to answer: no error
        with pytest.raises(OSError):
            _sys.read_mem(pid, 0x1000, 8)
    finally:
        os.close(listener)
