"""VM-wide pids: each node of a cluster owns a range of pids, and its cells
allocate from that range only (ext/jail.c: set_pid_range), so the kernel's
own pids are already unique across a VM's nodes: getpid, getppid, fork's
result and wait's need no translation, and a pid tells its node.

Node index k (1..MAX_INDEX, given once at join, kept in the node's spec)
owns [k * SPAN, (k + 1) * SPAN).  Range 0 holds pid 1, each cell's init.
A single node (embedded store) has no range: its cells use the kernel's
defaults."""

SPAN = 1 << 16
PID_LIMIT = 1 << 22  # the kernel's PID_MAX_LIMIT on 64-bit
MAX_INDEX = PID_LIMIT // SPAN - 1


def bounds(index: int) -> tuple[int, int]:
    """[base, top) of node index `index`."""
    if not 1 <= index <= MAX_INDEX:
        raise ValueError(f"pid range index {index} outside 1..{MAX_INDEX}")
    return index * SPAN, (index + 1) * SPAN


def index_of(pid: int) -> int:
    """The index of the node that owns pid (0: nobody's; pid 1 and friends)."""
    return pid // SPAN if 0 < pid < PID_LIMIT else 0


def kernel_has_pid_max_per_namespace(release: str | None = None) -> bool:
    """Linux 6.14 made pid_max a per-pid-namespace value."""
    import os
    import re

    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= (6, 14)
