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


FUSECTL = "/sys/fs/fuse/connections"


def abort_fuse(path: str) -> bool:
    """Abort the FUSE connection mounted at path (its server dead or stuck):
    requests waiting on it fail at once instead of hanging.  The device
    number comes from mountinfo, never from stat (which would wait too)."""
    minor = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path and fields[fields.index("-") + 1].startswith("fuse"):
                minor = fields[2].split(":")[1]
    if minor is None:
        return False
    if not os.path.isdir(f"{FUSECTL}/{minor}"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount(b"fusectl", FUSECTL.encode(), b"fusectl", 0, None)
    try:
        with open(f"{FUSECTL}/{minor}/abort", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False
