"""The FUSE side of a VM's file system on one node: the kernel's requests
for STATE/dvos/fs/VM, turned into calls to the VM's file server, fs@VM.

The protocol is by path (as sshfs and NFSv2's successors learnt to keep
one): this node knows each inode's place in the tree (its directory and
name, from the lookups that gave it) and sends the path; the server owns
the tree.  Inode numbers are the server's, tagged with the VM's slot in
this node's mount.  The kernel caches entries, attributes and pages for
TIMEOUT; the server tells this node (fsc@NODE, drvs/dvos/view.py) to drop
what another node changed, so the timeout only bounds a lost message."""

import errno
import logging

import pyfuse3
import trio

from ..ipc.message import IpcError, Msg
from ..ipc.schema import fs
from .server import SET_ATIME, SET_GID, SET_MODE, SET_MTIME, SET_SIZE, SET_UID
from .store import join

log = logging.getLogger("drvmmd")
Call = fs.FsCall
TIMEOUT = 10.0        # seconds the kernel trusts entries and attributes without asking
CALL_TIMEOUT = 10.0   # a call the server does not answer within this fails (EIO, ETIMEDOUT)
TAG_SHIFT = 48
MASK = (1 << TAG_SHIFT) - 1


class Inode:
    __slots__ = ("sino", "parent", "name", "lookups", "handles")

    def __init__(self, sino: int):
        self.sino, self.parent, self.name, self.lookups, self.handles = sino, None, b"", 0, 0


class Handle:
    __slots__ = ("sfh", "sino", "wrote")

    def __init__(self, sfh: int, sino: int):
        self.sfh, self.sino, self.wrote = sfh, sino, False


def caller(ctx) -> dict:
    return {"uid": ctx.uid, "gid": ctx.gid, "umask": ctx.umask} if ctx is not None else {}


class VmFs:
    def __init__(self, vm: str, slot: int, fabric):
        self.vm, self.fabric, self.target = vm, fabric, f"fs@{vm}"
        self.tag = slot << TAG_SHIFT
        self.inodes: dict[int, Inode] = {}
        self.entries: dict[tuple[int, bytes], int] = {}  # (directory, name) -> inode, server numbers
        self.handles: dict[int, Handle] = {}
        self.listings: dict[int, tuple[int, list | None]] = {}
        self.next_fh = 1
        self.root = 0

    # -- calls to the server ---------------------------------------------------------

    async def call(self, ctype, idempotent: bool = False, **fields):
        req = fs.FsRequest.new_message(vm=self.vm, **fields)
        try:
            reply = await self.fabric.sendrec(self.target, Msg(ctype, req.to_bytes_packed()),
                                              timeout=CALL_TIMEOUT, idempotent=idempotent)
        except IpcError as e:
            log.info("%s: %s", self.target, e)
            raise pyfuse3.FUSEError(errno.ETIMEDOUT if e.errno == errno.ETIMEDOUT else errno.EIO) from None
        if reply.status < 0:
            raise pyfuse3.FUSEError(-reply.status)
        return fs.FsReply.from_bytes_packed(reply.payload)

    async def start(self) -> pyfuse3.EntryAttributes:
        """The root's attributes (and the server's answer that it serves)."""
        r = await self.call(Call.getattr, idempotent=True, path=b"")
        self.root = r.attr.ino
        node = self._inode(self.root)
        node.parent = None
        node.lookups += 1
        return self._attr(r.attr)

    # -- this node's picture of the tree ----------------------------------------------

    def _inode(self, sino: int) -> Inode:
        node = self.inodes.get(sino)
        if node is None:
            node = self.inodes[sino] = Inode(sino)
        return node

    def _learn(self, dino: int, name: bytes, attr) -> Inode:
        node = self._inode(attr.ino)
        if node.parent is not None and (node.parent, node.name) != (dino, name):
            self.entries.pop((node.parent, node.name), None)  # a hard link's latest name serves
        node.parent, node.name = dino, name
        self.entries[(dino, name)] = attr.ino
        return node

    def _forget_entry(self, dino: int, name: bytes) -> None:
        sino = self.entries.pop((dino, name), None)
        node = self.inodes.get(sino) if sino is not None else None
        if node is not None and (node.parent, node.name) == (dino, name):
            node.parent = None

    def path(self, ino: int) -> bytes:
        sino = ino & MASK
        parts = []
        while sino != self.root:
            node = self.inodes.get(sino)
            if node is None or node.parent is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            parts.append(node.name)
            sino = node.parent
        return b"/".join(reversed(parts))

    def _attr(self, a) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self.tag | a.ino
        e.st_mode, e.st_nlink, e.st_uid, e.st_gid, e.st_rdev = a.mode, a.nlink, a.uid, a.gid, a.rdev
        e.st_size, e.st_blocks, e.st_blksize = a.size, a.blocks, 4096
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = a.atimeNs, a.mtimeNs, a.ctimeNs
        e.entry_timeout = e.attr_timeout = TIMEOUT
        return e

    def _entry(self, dino: int, name: bytes, a) -> pyfuse3.EntryAttributes:
        self._learn(dino, name, a).lookups += 1
        return self._attr(a)

    # -- the kernel's requests -----------------------------------------------------------

    async def lookup(self, parent, name, ctx=None):
        dino = parent & MASK
        if name == b".":
            return await self.getattr(parent, ctx)
        if name == b"..":
            node = self.inodes.get(dino)
            up = node.parent if node is not None and node.parent is not None else self.root
            r = await self.call(Call.getattr, idempotent=True, path=self.path(self.tag | up))
            self._inode(r.attr.ino).lookups += 1
            return self._attr(r.attr)
        try:
            r = await self.call(Call.lookup, idempotent=True, path=join(self.path(parent), name))
        except pyfuse3.FUSEError as e:
            if e.errno != errno.ENOENT:
                raise
            self._forget_entry(dino, name)
            neg = pyfuse3.EntryAttributes()
            neg.st_ino, neg.entry_timeout = 0, TIMEOUT  # the server tells us when it appears
            return neg
        return self._entry(dino, name, r.attr)

    async def getattr(self, inode, ctx=None):
        node = self.inodes.get(inode & MASK)
        handle = self._handle_of(node) if node is not None and node.handles else None
        if handle is not None:  # also after the file was unlinked
            r = await self.call(Call.getattr, idempotent=True, fh=handle.sfh)
        else:
            r = await self.call(Call.getattr, idempotent=True, path=self.path(inode))
        return self._attr(r.attr)

    def _handle_of(self, node: Inode) -> Handle | None:
        for h in self.handles.values():
            if h.sino == node.sino:
                return h
        return None

    async def setattr(self, inode, attr, fields, fh, ctx):
        mask = ((SET_MODE if fields.update_mode else 0) | (SET_UID if fields.update_uid else 0)
                | (SET_GID if fields.update_gid else 0) | (SET_SIZE if fields.update_size else 0)
                | (SET_ATIME if fields.update_atime else 0) | (SET_MTIME if fields.update_mtime else 0))
        args = dict(setMask=mask, mode=attr.st_mode, uid=attr.st_uid, gid=attr.st_gid, size=attr.st_size,
                    atimeNs=attr.st_atime_ns, mtimeNs=attr.st_mtime_ns)
        h = self.handles.get(fh) if fh is not None else None
        if h is not None:
            r = await self.call(Call.setattr, fh=h.sfh, **args)
        else:
            r = await self.call(Call.setattr, path=self.path(inode), **args)
        return self._attr(r.attr)

    async def readlink(self, inode, ctx):
        return bytes((await self.call(Call.readlink, idempotent=True, path=self.path(inode))).data)

    async def _make(self, ctype, parent, name, ctx, **fields):
        r = await self.call(ctype, path=join(self.path(parent), name), caller=caller(ctx), **fields)
        return self._entry(parent & MASK, name, r.attr)

    async def mknod(self, parent, name, mode, rdev, ctx):
        return await self._make(Call.mknod, parent, name, ctx, mode=mode, rdev=rdev)

    async def mkdir(self, parent, name, mode, ctx):
        return await self._make(Call.mkdir, parent, name, ctx, mode=mode)

    async def symlink(self, parent, name, target, ctx):
        return await self._make(Call.symlink, parent, name, ctx, data=target)

    async def link(self, inode, new_parent, new_name, ctx):
        r = await self.call(Call.link, path=self.path(inode), path2=join(self.path(new_parent), new_name))
        return self._entry(new_parent & MASK, new_name, r.attr)

    async def unlink(self, parent, name, ctx):
        await self.call(Call.unlink, path=join(self.path(parent), name))
        self._forget_entry(parent & MASK, name)

    async def rmdir(self, parent, name, ctx):
        await self.call(Call.rmdir, path=join(self.path(parent), name))
        self._forget_entry(parent & MASK, name)

    async def rename(self, old_parent, old_name, new_parent, new_name, flags, ctx):
        d1, d2 = old_parent & MASK, new_parent & MASK
        await self.call(Call.rename, path=join(self.path(old_parent), old_name),
                        path2=join(self.path(new_parent), new_name), flags=flags)
        moved = self.entries.pop((d1, old_name), None)
        replaced = self.entries.pop((d2, new_name), None)
        if flags & pyfuse3.RENAME_EXCHANGE and replaced is not None:
            self._place(replaced, d1, old_name)
        elif replaced is not None and replaced in self.inodes:
            self.inodes[replaced].parent = None
        if moved is not None:
            self._place(moved, d2, new_name)

    def _place(self, sino: int, dino: int, name: bytes) -> None:
        node = self.inodes.get(sino)
        if node is not None:
            node.parent, node.name = dino, name
            self.entries[(dino, name)] = sino

    async def open(self, inode, flags, ctx):
        r = await self.call(Call.open, path=self.path(inode), flags=flags)
        return self._opened(r)

    def _opened(self, r) -> pyfuse3.FileInfo:
        fh = self.tag | self.next_fh
        self.next_fh += 1
        self.handles[fh] = Handle(r.fh, r.attr.ino)
        self._inode(r.attr.ino).handles += 1
        # Pages cached here stay valid until the server says another node
        # wrote (close-to-open, without rereading every file on open).
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def create(self, parent, name, mode, flags, ctx):
        r = await self.call(Call.create, path=join(self.path(parent), name), flags=flags, mode=mode,
                            caller=caller(ctx))
        entry = self._entry(parent & MASK, name, r.attr)
        return self._opened(r), entry

    def _h(self, fh) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    async def read(self, fh, off, size):
        return bytes((await self.call(Call.read, idempotent=True, fh=self._h(fh).sfh, offset=off, size=size)).data)

    async def write(self, fh, off, buf):
        h = self._h(fh)
        h.wrote = True
        return (await self.call(Call.write, fh=h.sfh, offset=off, data=buf)).size

    async def flush(self, fh):
        h = self._h(fh)
        if h.wrote:  # only a writer's close has something to tell the other nodes
            h.wrote = False
            await self.call(Call.flush, fh=h.sfh)

    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if h is None:
            return
        node = self.inodes.get(h.sino)
        if node is not None:
            node.handles -= 1
            self._maybe_drop(node)
        await self.call(Call.release, fh=h.sfh)

    async def fsync(self, fh, datasync):
        h = self._h(fh)
        h.wrote = False
        await self.call(Call.fsync, fh=h.sfh, flags=1 if datasync else 0)

    async def opendir(self, inode, ctx):
        self.path(inode)  # ESTALE now rather than at readdir
        fh = self.tag | self.next_fh
        self.next_fh += 1
        self.listings[fh] = (inode & MASK, None)
        return fh

    async def readdir(self, fh, start_id, token):
        dino, entries = self.listings.get(fh, (None, None))
        if dino is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if entries is None or start_id == 0:
            entries = await self._list(dino)  # one snapshot per open directory
            self.listings[fh] = (dino, entries)
        for i, (name, a) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(a), i + 1):
                break
            self._learn(dino, name, a).lookups += 1  # readdirplus: the kernel holds what it took

    async def _list(self, dino: int) -> list:
        path, out, after = self.path(self.tag | dino), [], b""
        while True:
            r = await self.call(Call.readdir, idempotent=True, path=path, data=after)
            for e in r.entries:
                out.append((bytes(e.name), e.attr))
            if not r.more or not r.entries:
                return out
            after = out[-1][0]

    async def releasedir(self, fh):
        self.listings.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        pass  # each change is durable on the server's file system as its journal makes it

    async def statfs(self, ctx):
        r = await self.call(Call.statfs, idempotent=True)
        return statvfs_data(r.statfs)

    async def getxattr(self, inode, name, ctx):
        return bytes((await self.call(Call.getxattr, idempotent=True, path=self.path(inode), name=name)).data)

    async def setxattr(self, inode, name, value, ctx):
        await self.call(Call.setxattr, path=self.path(inode), name=name, data=value)

    async def listxattr(self, inode, ctx):
        data = bytes((await self.call(Call.listxattr, idempotent=True, path=self.path(inode))).data)
        return [n for n in data.split(b"\0") if n]

    async def removexattr(self, inode, name, ctx):
        await self.call(Call.removexattr, path=self.path(inode), name=name)

    def forget(self, sino: int, n: int) -> None:
        node = self.inodes.get(sino)
        if node is not None:
            node.lookups -= n
            self._maybe_drop(node)

    def _maybe_drop(self, node: Inode) -> None:
        if node.lookups <= 0 and node.handles <= 0 and node.sino != self.root:
            del self.inodes[node.sino]
            if node.parent is not None and self.entries.get((node.parent, node.name)) == node.sino:
                del self.entries[(node.parent, node.name)]

    # -- what the server says another node changed -----------------------------------------

    async def invalidate(self, inv) -> None:
        for e in inv.entries:
            name = bytes(e.name)
            self._forget_entry(e.attr.ino, name)
            pyfuse3.invalidate_entry_async(self.tag | e.attr.ino, name, ignore_enoent=True)
        for sino in inv.inodes:
            if sino in self.inodes:
                await trio.to_thread.run_sync(_invalidate_inode, self.tag | sino, not inv.data)


def _invalidate_inode(ino: int, attr_only: bool) -> None:
    """In a worker thread: the kernel may need a lock that a request this
    node's loop has yet to answer holds (a write in progress), so the loop
    must go on meanwhile."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only)
    except OSError as e:
        if e.errno != errno.ENOENT:  # the kernel had already let it go
            log.info("invalidating inode %#x: %s", ino, e)


def statvfs_data(s) -> pyfuse3.StatvfsData:
    out = pyfuse3.StatvfsData()
    out.f_bsize = out.f_frsize = s.bsize
    out.f_blocks, out.f_bfree, out.f_bavail = s.blocks, s.bfree, s.bavail
    out.f_files, out.f_ffree, out.f_favail = s.files, s.ffree, s.ffree
    out.f_namemax = s.namemax
    return out
