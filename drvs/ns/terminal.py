"""The caller's side of `-t`: raw mode, window size, relaying a pty master."""

import errno
import fcntl
import os
import select
import struct
import termios
import tty
from contextlib import contextmanager


def window_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on fd, or (0, 0) when it is none."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        return rows, cols
    except OSError:
        return 0, 0


def copy_window_size(src: int, dst: int) -> None:
    rows, cols = window_size(src)
    if rows and cols:
        try:
            fcntl.ioctl(dst, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except OSError:
            pass


@contextmanager
def raw_mode(fd: int):
    """The caller's terminal in raw mode, so ^C, ^Z reach the jail's pty."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


def read_some(fd: int) -> bytes | None:
    """Bytes from fd; b"" at end of file; None when nothing is ready.  A pty
    master reads EIO once every slave is closed: that is its end of file."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except InterruptedError:
        return None
    except OSError as e:
        if e.errno == errno.EIO:
            return b""
        raise
