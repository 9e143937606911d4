"""The C allocator's settings for drvmmd.

File data crosses the daemon in messages of up to 1 MiB (a read or write
of the VM's file system, a replica's batch).  glibc serves each allocation
of 128 KiB or more with its own mmap, and unmaps it when freed: every such
buffer (the data read, the message built around it, its framing, the
fabric's copy) cost 256 page faults and as many zeroed pages, twice per
call.  Measured on a 2-node dev cluster, 256 MiB read from the other node:
the server spent 2.6 ms of CPU per MiB, 21% of it in page faults; with the
buffers kept in the heap, 1.5 ms, and 367 -> 550-585 MB/s (writes 193 ->
343 MB/s).  The heap then keeps up to TRIM of freed memory for reuse."""

import ctypes
import logging

log = logging.getLogger("drvmmd")

M_TRIM_THRESHOLD = -1   # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP = 16 << 20         # allocations this large or larger still get their own mapping
TRIM = 64 << 20         # free memory at the heap's top beyond this goes back to the kernel


def keep_large_buffers() -> bool:
    """Serve allocations below MMAP from the heap and keep freed ones for
    reuse; False (and nothing changed) where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None, use_errno=True).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM) == 1
    if not ok:
        log.info("malloc: large buffers keep their own mappings (mallopt refused)")
    return ok
