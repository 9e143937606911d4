"""fallocate(2) on a VM's file system, from a jail.

pyfuse3 has no FALLOCATE handler (the kernel then answers EOPNOTSUPP, and
glibc's posix_fallocate falls back to writing zeros block by block, which
races with other nodes' writes).  So the jail's seccomp filter sends every
fallocate to the node's supervisor: a call on a file of the VM file system
goes to its file server (every mode the server's own file system takes:
preallocation, KEEP_SIZE, punched holes, zeroed, collapsed and inserted
ranges), which has every node drop what its kernel caches of the file
before it answers; any other file is the kernel's."""

import errno
import os

import pyfuse3
import trio

from .. import _fs

MAX_OFF = (1 << 63) - 1
# fallocate(2)'s mode bits (linux/falloc.h) that change or move data already there
PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x02, 0x08, 0x10, 0x20
MOVES_DATA = PUNCH_HOLE | COLLAPSE_RANGE | ZERO_RANGE | INSERT_RANGE


def _write_back(host_pid: int, fd: int) -> None:
    """In a worker thread: the file's dirty pages on this node (a program's
    shared mapping) go to the server first, as the kernel's own fallocate
    writes them back: dropped afterwards, they would be written over the
    punched hole, or at offsets the range's move made wrong.  Through the
    program's own descriptor (its /proc link), answered by this node's loop;
    written back, not fsync'ed (an fsync would settle the file's durability
    here, and the program's own fsync after a fail-over would not see EIO)."""
    try:
        own = os.open(f"/proc/{host_pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # (gone meanwhile: the kernel's answer, EBADF, follows)
    try:
        _fs.write_back(own)
    except OSError:
        pass  # (a failed write: the kernel keeps its error for the program's own fsync)
    finally:
        os.close(own)


def _signed(value: int) -> int:
    return value - (1 << 64) if value > MAX_OFF else value


async def call(file_of, caller, a, reply_cls, kernel):
    """The supervisor's handler: file_of(host_pid, fd) names the VM file
    behind a descriptor (NodeLocks.file_of), or None."""
    f = file_of(caller.host_pid, a["fd"])
    if f is None:
        return kernel
    offset, length = _signed(a["offset"]), _signed(a["len"])
    if offset < 0 or length <= 0:
        return reply_cls(error=errno.EINVAL)
    if f.flags & os.O_ACCMODE == os.O_RDONLY:  # (f's flags and inode are one open file's: see VmFile)
        return reply_cls(error=errno.EBADF)
    mode = a["mode"] & 0xFFFFFFFF
    if mode & MOVES_DATA:
        await trio.to_thread.run_sync(_write_back, caller.host_pid, a["fd"])
    try:
        await f.fs.fallocate(f.ino, mode, offset, length)
    except pyfuse3.FUSEError as e:
        return reply_cls(error=e.errno)
    return reply_cls(value=0)
