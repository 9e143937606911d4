"""Mount-table helpers for the host side (not the jail's)."""

import ctypes
import os

MNT_DETACH = 2


def is_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


def detach(path: str) -> str | None:
    """Lazily unmount path if something is mounted there (a FUSE mount whose
    server died answers ENOTCONN forever otherwise); the error, or None."""
    if not is_mounted(path):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        return f"umount {path}: {os.strerror(ctypes.get_errno())}"
    return None
