"""A minimal in-memory pyfuse3 file system: the cost of FUSE and Python
alone, the baseline (d) of bench/fs.py.  Same kernel-cache timeouts and
mount options as the DRVM file system's view; nothing else.

    python bench/progs/memfs.py MOUNTPOINT   (until SIGTERM)"""

import errno
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

TIMEOUT = 10.0


class Inode:
    __slots__ = ("ino", "mode", "uid", "gid", "data", "children", "target", "nlink", "mtime", "atime", "ctime")

    def __init__(self, ino, mode, uid=0, gid=0):
        self.ino, self.mode, self.uid, self.gid = ino, mode, uid, gid
        self.data = bytearray()
        self.children = {} if stat.S_ISDIR(mode) else None
        self.target = b""
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.mtime = self.atime = self.ctime = time.time_ns()


class MemFs(pyfuse3.Operations):
    def __init__(self):
        super().__init__()
        self.inodes = {pyfuse3.ROOT_INODE: Inode(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755)}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.dirs = {}

    def _attr(self, n: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.st_mode, a.st_nlink, a.st_uid, a.st_gid = n.ino, n.mode, n.nlink, n.uid, n.gid
        a.st_size = len(n.target) if stat.S_ISLNK(n.mode) else len(n.data)
        a.st_blocks, a.st_blksize = (a.st_size + 511) // 512, 4096
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = n.atime, n.mtime, n.ctime
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _get(self, ino) -> Inode:
        n = self.inodes.get(ino)
        if n is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return n

    def _new(self, parent, name, mode, ctx) -> Inode:
        p = self._get(parent)
        if name in p.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        n = Inode(self.next_ino, mode, ctx.uid, ctx.gid)
        self.next_ino += 1
        self.inodes[n.ino] = n
        p.children[name] = n.ino
        p.mtime = p.ctime = time.time_ns()
        return n

    async def lookup(self, parent_inode, name, ctx=None):
        ino = self._get(parent_inode).children.get(name)
        if ino is None:
            a = pyfuse3.EntryAttributes()
            a.st_ino, a.entry_timeout = 0, TIMEOUT
            return a
        return self._attr(self.inodes[ino])

    async def getattr(self, inode, ctx=None):
        return self._attr(self._get(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        n = self._get(inode)
        if fields.update_size:
            del n.data[attr.st_size:]
            n.data.extend(b"\0" * (attr.st_size - len(n.data)))
        if fields.update_mode:
            n.mode = (n.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            n.uid = attr.st_uid
        if fields.update_gid:
            n.gid = attr.st_gid
        if fields.update_atime:
            n.atime = attr.st_atime_ns
        if fields.update_mtime:
            n.mtime = attr.st_mtime_ns
        n.ctime = time.time_ns()
        return self._attr(n)

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attr(self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._attr(self._new(parent_inode, name, mode, ctx))

    async def symlink(self, parent_inode, name, target, ctx):
        n = self._new(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        n.target = target
        return self._attr(n)

    async def readlink(self, inode, ctx):
        return self._get(inode).target

    async def create(self, parent_inode, name, mode, flags, ctx):
        n = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777), ctx)
        return pyfuse3.FileInfo(fh=n.ino), self._attr(n)

    async def open(self, inode, flags, ctx):
        n = self._get(inode)
        if flags & os.O_TRUNC:
            n.data.clear()
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        return bytes(self._get(fh).data[off:off + size])

    async def write(self, fh, off, buf):
        n = self._get(fh)
        if off > len(n.data):
            n.data.extend(b"\0" * (off - len(n.data)))
        n.data[off:off + len(buf)] = buf
        n.mtime = n.ctime = time.time_ns()
        return len(buf)

    async def release(self, fh):
        pass

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def _unlink(self, parent_inode, name):
        p = self._get(parent_inode)
        ino = p.children.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        n = self.inodes[ino]
        n.nlink -= 1
        p.mtime = p.ctime = time.time_ns()

    async def unlink(self, parent_inode, name, ctx):
        await self._unlink(parent_inode, name)

    async def rmdir(self, parent_inode, name, ctx):
        ino = self._get(parent_inode).children.get(name)
        if ino is not None and self.inodes[ino].children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        await self._unlink(parent_inode, name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old, new = self._get(parent_inode_old), self._get(parent_inode_new)
        ino = old.children.pop(name_old, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        new.children[name_new] = ino

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        entries = sorted(self._get(fh).children.items())
        for i, (name, ino) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(self.inodes[ino]), i + 1):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 20
        s.f_files = s.f_ffree = s.f_favail = 1 << 20
        s.f_namemax = 255
        return s


async def main(path: str) -> None:
    pyfuse3.init(MemFs(), path, {"fsname=memfs", "allow_other", "default_permissions"})
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
