"""Mount-table helpers for the host side (not the jail's)."""

import ctypes
import os

MNT_DETACH = 2
DRVS_FSTYPE = "fuse.drvs"  # the DVOS view (and drvs mount's binds of it), as mountinfo names it


def mount_table(pid: "int | str" = "self") -> list[tuple[str, str, str]]:
    """(root within its file system, mount point, type) of every mount pid
    sees, from its mountinfo, paths unescaped."""
    return [entry[1:] for entry in mount_entries(pid)]


def mount_entries(pid: "int | str" = "self") -> list[tuple[str, str, str, str]]:
    """(device "major:minor", root, mount point, type): mount_table with
    the device, which tells apart two mounts of one kind of file system."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((fields[2], _unescape(fields[3]), _unescape(fields[4]), fields[sep + 1]))
    return out


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def is_mounted(path: str) -> bool:
    return any(point == path for _, point, _ in mount_table())


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


def fuse_device(path: str) -> str | None:
    """"major:minor" of the FUSE mount at path, from mountinfo: never from
    stat, which waits on the mount's server (perhaps the caller itself)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path and fields[fields.index("-") + 1].startswith("fuse"):
                found = fields[2]
    return found


def set_readahead(path: str, kib: int) -> str | None:
    """The kernel's read-ahead for the FUSE mount at path (its default, 128
    KiB, makes each sequential read of a remote file a round trip per 128
    KiB); the error, or None."""
    dev = fuse_device(path)
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except (OSError, TypeError) as e:
        return f"read-ahead of {path} ({dev}): {e}"
    return None


def abort_fuse(path: str) -> bool:
    """Abort the FUSE connection mounted at path (its server dead or stuck):
    requests waiting on it fail at once instead of hanging."""
    dev = fuse_device(path)
    if dev is None:
        return False
    minor = dev.split(":")[1]
    mounted = False
    if not os.path.isdir(f"{FUSECTL}/{minor}"):  # fusectl is not mounted here: for this moment only
        libc = ctypes.CDLL(None, use_errno=True)
        mounted = libc.mount(b"fusectl", FUSECTL.encode(), b"fusectl", 0, None) == 0
    try:
        with open(f"{FUSECTL}/{minor}/abort", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False
    finally:
        if mounted:
            detach(FUSECTL)
