"""Which VM file system a host process's statfs(2) is about.

pyfuse3 hands statfs no inode, and the view serves every VM's file system
under one mount (`drvs mount` binds one VM's part of it): a process in a
jail names its VM by its cell, but a host process could mean any of them.
It is blocked in the system call while we answer, so /proc/PID/syscall
says which call and its arguments: statfs's path (read from its memory)
or fstatfs's descriptor, which the caller's own mount table then places
under one VM's part."""

import os
import platform

from ..ns import mounts

# (statfs, fstatfs) by machine; elsewhere the caller is not looked at
_CALLS = {"x86_64": (137, 138), "aarch64": (43, 44)}.get(platform.machine(), (-1, -1))


def statfs_vm(pid: int) -> str | None:
    """The VM whose file system pid's statfs or fstatfs, now waiting, asks
    about; None when that cannot be told."""
    path = _statfs_path(pid)
    return vm_at(pid, os.path.normpath(path)) if path else None


def _statfs_path(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
        nr, arg = int(fields[0]), int(fields[1], 16)
        if nr == _CALLS[0]:
            path = _string(pid, arg)
            return path if path.startswith("/") else os.path.join(os.readlink(f"/proc/{pid}/cwd"), path)
        if nr == _CALLS[1]:
            return os.readlink(f"/proc/{pid}/fd/{arg}")
    except (OSError, ValueError, IndexError):
        pass
    return None


def _string(pid: int, address: int, limit: int = 4096) -> str:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, limit, address)
    finally:
        os.close(fd)
    return os.fsdecode(data.split(b"\0", 1)[0])


def vm_at(pid: int, path: str) -> str | None:
    """The VM whose part of a drvs view path lies in, by pid's mounts (the
    deepest drvs mount holding path: a bind of /fs/VM, or a whole view)."""
    best, root = "", ""
    try:
        table = mounts.mount_table(pid)
    except (OSError, ValueError):
        return None
    for where, point, kind in table:
        if kind == mounts.DRVS_FSTYPE and (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, root = point, where
    if not best:
        return None
    inside = (root.rstrip("/") + path[len(best):]).split("/")  # the path within the view: /fs/VM/...
    return inside[2] if len(inside) > 2 and inside[1] == "fs" and inside[2] else None

