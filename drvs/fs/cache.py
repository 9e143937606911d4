"""This node's cache of remote files' data, on its own disk (as NFS's
FS-Cache or AFS's cache manager keep one): a read the kernel's page cache
no longer holds -- dropped under memory pressure, or by
POSIX_FADV_DONTNEED -- is answered here, not by the file server on
another node.

While the kernel holds the file, it is as valid as what the kernel
caches, and dropped at the same points (drvs/fs/client.py): when the
server says another node changed the file, when the server's term
changes, and when attributes the server gives show another size or mtime.
Once the kernel forgot the file, the server no longer tells this node of
its changes: the pages stay, and the next open, which says the version of
the file's data (FsServer.versions), keeps them only if it is the version
they were read at (as NFS's FS-Cache checks the change attribute).  A write
made on this node drops the file's pages too (its data is the server's to
place: an O_APPEND write lands at the server's end of file), so what is
kept is only ever what a read returned.  A read's data is kept only if its
file's entry lived through it: any of the above, or a write made here
(once answered), ends the entry, and a reply to a read sent before is
then dropped.

Each file's pages live in an anonymous file (O_TMPFILE) in STATE/cache,
so nothing is left behind by a daemon that dies.  The cache holds at most
`limit` bytes (page maps included: so no page further than `limit` into a
file is kept); the files used least recently go first.  Reads of these
files are made on the event loop, as the file server's own are: they are
page-cache copies but for a cold disk.  A large read's pages are written
in a thread, after the read is answered (see fill)."""

import collections
import errno
import logging
import os

import trio

log = logging.getLogger("drvmmd")
PAGE = 4096
MAX_OPEN = 256  # cache files open at once (each is a descriptor of drvmmd's)
IN_LINE = 64 << 10  # a read's pages written at once (a thread's hand-off costs more)
MAX_FILLING = 16 << 20  # bytes of read replies held for writes to the cache at once (more: not kept)
MAX_PENDING = 32  # writes of them at once (each holds a descriptor)
HELD, FILLING = b"\1", b"\2"  # a page in the cache file, and one being written there
PASSING = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EMFILE, errno.ENFILE}  # drop the file, go on caching


class CachedFile:
    """One file's cached pages.  pages: one byte per page, HELD if held,
    FILLING while being written (both counted in held); size, mtime,
    version: the attributes and data version the pages belong to (size
    None: an open under way, see opening())."""

    __slots__ = ("fd", "pages", "size", "mtime", "version", "held")

    def __init__(self, size: int, mtime: int, version: int = 0):
        self.fd, self.pages, self.size, self.mtime, self.version, self.held = -1, bytearray(), size, mtime, version, 0

    def belongs(self, size: int, mtime: int, version) -> bool:
        return (self.size, self.mtime, self.version) == (size, mtime, version)

    def covers(self, first: int, end: int) -> bool:
        return end <= len(self.pages) and self.pages.count(HELD, first, end) == end - first


class DataCache:
    def __init__(self, directory: str, limit: int):
        self.directory, self.limit = directory, limit
        self.files: collections.OrderedDict[int, CachedFile] = collections.OrderedDict()  # least recent first
        self.held = 0                      # bytes held, over all files
        self.open = 0                      # cache files open
        self.broken = False                # the cache's disk failed once: no more caching
        self.warned = False                # a passing failure was logged
        self.filling = 0                   # bytes being written to cache files (see fill)
        self.pending = 0                   # writes of them waiting or under way (a descriptor each)
        self.writers = trio.CapacityLimiter(2)  # threads writing them

    # -- what may be kept ------------------------------------------------------------

    def opening(self, key: int) -> CachedFile | None:
        """Before a file is opened for reading: what opened() is to find
        still there if nothing dropped the file's pages meanwhile (a reply's
        attributes are then current); an entry without attributes if there
        was none."""
        f = self.files.get(key)
        if f is None and self.limit and not self.broken:
            f = self.files[key] = CachedFile(None, 0)
        return f

    def opened(self, key: int, f: CachedFile | None, size: int, mtime: int, version: int) -> None:
        """The open begun with opening() (f) was answered with these
        attributes and data version: the pages stay if they belong to them,
        else the file starts empty; nothing is kept if anything dropped it
        meanwhile."""
        if f is None or self.files.get(key) is not f or f.belongs(size, mtime, version):
            return
        if f.size is None:
            f.size, f.mtime, f.version = size, mtime, version
            return
        self.drop(key)
        self.files[key] = CachedFile(size, mtime, version)

    def made(self, key: int, size: int, mtime: int, version) -> None:
        """A create opened the file (made it, or found another node's):
        pages of another size, mtime or version go."""
        f = self.files.get(key)
        if f is not None and f.size is not None and not f.belongs(size, mtime, version):
            self.drop(key)

    def forgotten(self, key: int) -> None:
        """The kernel forgot the file: its pages stay for an open of the
        same version (see opened); an entry without any goes."""
        f = self.files.get(key)
        if f is not None and not f.held:
            self.drop(key)

    def seen(self, key: int, size: int, mtime: int) -> None:
        """The server gave these attributes: pages of other ones go (the
        kernel drops its own on the same sign)."""
        f = self.files.get(key)
        if f is not None and (f.size != size or f.mtime != mtime):
            self.drop(key)

    def drop(self, key: int) -> None:
        f = self.files.pop(key, None)
        if f is not None:
            self._close(f)

    def drop_where(self, keep) -> None:
        for key in [k for k in self.files if not keep(k)]:
            self.drop(key)

    def close(self) -> None:
        self.drop_where(lambda key: False)

    def _close(self, f: CachedFile) -> None:
        self.held -= f.held
        f.held = 0
        if f.fd >= 0:
            os.close(f.fd)
            f.fd = -1
            self.open -= 1

    # -- reads ---------------------------------------------------------------------------

    def read(self, key: int, off: int, size: int) -> bytes | None:
        """The data if every page it needs is held, else None."""
        f = self.files.get(key)
        if f is None or f.size is None:
            return None
        end = min(off + size, f.size)
        if off >= end:
            return b""  # at or past the end of the file
        if not f.covers(off // PAGE, -(-end // PAGE)):
            return None
        try:
            data = os.pread(f.fd, end - off, off)
        except OSError as e:
            self._broke(key, "reading", e)
            return None
        if len(data) != end - off:
            self.drop(key)  # (cannot be, but for a file shortened behind this node's back)
            return None
        self.files.move_to_end(key)
        return data

    def entry(self, key: int) -> CachedFile | None:
        """What a read about to be sent to the server may fill (see fill)."""
        return self.files.get(key)

    def fill(self, key: int, f: CachedFile, off: int, size: int, data: bytes):
        """Keep what a read of size bytes at off returned, if f is still the
        file's entry (nothing ended it since the read was sent): its whole
        pages, and the last one if the read ended at the end of file.
        Small reads are written at once; a large one's write is returned,
        for write_pages() to make once the read is answered (a remote
        sequential read's 1 MiB READs spent a sixth of this node's time
        writing to the cache disk in line), else None."""
        if self.files.get(key) is not f or f.size is None or off % PAGE:
            return None
        end = off + len(data)
        if end > f.size or (len(data) < size and end != f.size):
            return None  # the server's file is not the size its attributes said: nothing to go by
        first = off // PAGE
        last = end // PAGE if end < f.size else -(-end // PAGE)  # (the last page, partial, only at the end)
        if last <= first or last * PAGE > self.limit:
            return None  # (nor pages further into a file than the cache is big: the map of pages would be)
        have = len(f.pages)
        grow = max(last - have, 0)
        new, span = max(last - max(first, have), 0), max(min(last, have) - first, 0)
        need = (new + f.pages.count(0, first, first + span)) * PAGE + grow
        if not self._room(key, need):
            return None
        chunk = memoryview(data)[:(last - first) * PAGE] if end < f.size else data
        later = len(chunk) > IN_LINE
        if later and (self.filling >= MAX_FILLING or self.pending >= MAX_PENDING):
            return None  # (each holds its reply and a descriptor until written)
        try:
            if f.fd < 0:
                f.fd = self._new_file(key)
            if later:
                fd = os.dup(f.fd)  # (the write's own: the entry may close its descriptor meanwhile)
            else:
                _write(f.fd, chunk, off)
        except OSError as e:
            self._broke(key, "writing", e)
            return None
        f.pages.extend(bytes(grow))
        f.held += need
        self.held += need
        self.files.move_to_end(key)
        if not later:
            f.pages[first:last] = HELD * (last - first)
            return None
        f.pages[first:last] = f.pages[first:last].replace(b"\0", FILLING)  # (not read from until written)
        self.filling += len(chunk)
        self.pending += 1
        return (key, f, fd, chunk, off, first, last)

    async def write_pages(self, key: int, f: CachedFile, fd: int, chunk, off: int, first: int, last: int) -> None:
        """fill()'s write, in a thread: the event loop goes on serving."""
        try:
            await trio.to_thread.run_sync(_write, fd, chunk, off, limiter=self.writers)
        except OSError as e:
            if self.files.get(key) is f:
                self._broke(key, "writing", e)
            return
        finally:
            os.close(fd)
            self.filling -= len(chunk)
            self.pending -= 1
        if self.files.get(key) is f:
            f.pages[first:last] = HELD * (last - first)

    def _room(self, key: int, need: int) -> bool:
        """Make room for need more bytes by dropping the files used least
        recently but key; False if even that is not enough."""
        if self.held + need <= self.limit:
            return True
        for other in list(self.files):
            if self.held + need <= self.limit:
                break
            if other != key:
                self.drop(other)
        return self.held + need <= self.limit

    def _new_file(self, key: int) -> int:
        """An anonymous file for key's pages, once fewer than MAX_OPEN are
        open (those of the files used least recently are dropped)."""
        for other in list(self.files):
            if self.open < MAX_OPEN:
                break
            if other != key and self.files[other].fd >= 0:
                self.drop(other)
        try:
            fd = os.open(self.directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        except FileNotFoundError:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(self.directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        self.open += 1
        return fd

    def _broke(self, key: int, doing: str, e: OSError) -> None:
        """The cache's own disk failed (full, gone): reads go to the server
        from now on, as if there were no cache."""
        self.drop(key)
        if e.errno in (errno.EMFILE, errno.ENFILE):
            self.close()  # (drvmmd is out of descriptors: the cache's go back first)
        if e.errno in PASSING:
            if not self.warned:
                log.info("fs cache %s: %s: %s; dropping pages (said once)", self.directory, doing, e)
                self.warned = True
            return
        log.warning("fs cache %s: %s: %s; caching no more", self.directory, doing, e)
        self.broken = True
        self.close()


def _write(fd: int, chunk, off: int) -> None:
    if os.pwrite(fd, chunk, off) != len(chunk):
        raise OSError(errno.ENOSPC, "short write")
