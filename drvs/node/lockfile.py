"""The node's one-drvmmd lock, STATE/drvmmd.lock: held while a drvmmd runs
(a second one would take over the node's status and socket), and while
`drvs node reset` takes the node apart."""

import fcntl
import os


def take(cfg) -> tuple[int, str | None]:
    """(fd, None) holding the lock, or (-1, the holder's pid as it wrote it)."""
    fd = os.open(f"{cfg.state_dir}/drvmmd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        return -1, holder
    return fd, None
