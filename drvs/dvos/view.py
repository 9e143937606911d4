"""The node's DVOS view: one FUSE mount per node, at STATE/dvos, served by
drvmmd (pyfuse3 serves one mount per process, and both parts need the
fabric that drvmmd holds):

    STATE/dvos/proc/VM    the VM's /proc (procview.py), bound on /proc in its jails
    STATE/dvos/fs/VM      the VM's file system (drvs/fs/client.py), bound on
                          /data in its jails and by `drvs mount`

Inode numbers and file handles carry their part in their top 16 bits: 0
for the root and the /proc view, FS_TAG for the fs directory, a VM's slot
for that VM's file system.  The endpoint fsc@NODE takes the file servers'
invalidations for this node's kernel."""

import contextlib
import errno
import functools
import logging
import os
import re
import stat
import time

import pyfuse3
import trio

from ..errors import DrvsError
from ..fs.cache import DataCache
from ..fs.client import DOTS, MASK, TAG_SHIFT, Call, VmFs, reply_dots
from ..ipc.fabric import REGISTRY
from ..ipc.message import IpcError, Later, Msg
from ..ipc.schema import from_flat, fs
from ..ns import mounts
from ..vm.model import check_name
from . import caller, fusewait, procview

log = logging.getLogger("drvmmd")
ROOT = pyfuse3.ROOT_INODE
FS_TAG = 0xFFFF
FS_DIR = (FS_TAG << TAG_SHIFT) | 1
TIMEOUT = 1.0
START_WAIT = 10.0  # seconds a new VM's file server may take to be elected
MADE_WAIT = 0.5    # seconds a lookup of a VM's directory waits for etcd to say when the VM was made
READAHEAD_KIB = 1024  # sequential reads of another node's files: 1 MiB per round trip
_CELL = re.compile(rb"/([a-z0-9-]+)/(?:run-[0-9a-f]+|init)$", re.M)  # a cell's cgroups: VM/run-ID, VM/init


def mountpoint(cfg) -> str:
    return f"{cfg.state_dir}/dvos"


def _errno_only(op):
    """A FUSE operation that answers with an errno whatever happens:
    pyfuse3 ends the whole file system (and here drvmmd) on any other
    exception, an etcd outage during a `ps` included."""

    @functools.wraps(op)
    async def guarded(self, *args):
        try:
            return await op(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("DVOS view: %s", op.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


class View(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, cfg, fabric, procs, etcd):
        super().__init__()
        self.fabric, self.etcd = fabric, etcd
        self.proc = procview.ProcView(cfg, fabric, procs, etcd)
        self.cache = DataCache(cfg.cache_dir, cfg.fs_cache_mib << 20)  # (one budget for every VM's files)
        self.vms: dict[str, VmFs] = {}
        self.slots: dict[int, VmFs] = {}
        self.listings: dict[int, tuple] = {}  # open root or fs directory -> (inode, its entries)
        self.nursery = None  # for work that must not hold up a request (serve() sets it)
        self.path = mountpoint(cfg)
        self.next_fh = 1
        self.next_slot = 1  # (slots are never given twice: a retired one's inodes stay stale)

    # -- which part ---------------------------------------------------------------

    def _vmfs(self, ino: int, ro_error: int = errno.EROFS) -> VmFs:
        """The VM file system inode ino belongs to; ro_error for the rest."""
        tag = ino >> TAG_SHIFT
        if tag in (0, FS_TAG):
            raise pyfuse3.FUSEError(ro_error)
        fs_ = self.slots.get(tag)
        if fs_ is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return fs_

    @staticmethod
    def _is_proc(ino: int) -> bool:
        return ino >> TAG_SHIFT == 0 and ino != ROOT

    def _dir_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino, a.st_mode, a.st_nlink = ino, stat.S_IFDIR | 0o555, 2
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = time.time_ns()
        a.st_blksize = 4096
        return a

    # -- the fs directory ----------------------------------------------------------

    async def _mount_vm(self, name: bytes) -> pyfuse3.EntryAttributes:
        try:
            vm = check_name(os.fsdecode(name))
        except Exception:  # noqa: BLE001 - a name that is no VM's
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        made = await self._made(vm)
        fs_ = self.vms.get(vm)  # (after the wait: another lookup may have retired or made one)
        if fs_ is not None and made is not None:
            if fs_.made is None:
                fs_.made = made  # (etcd could not say when it was made)
            elif fs_.made != made:
                self._retire(vm, fs_)  # removed and made again since: another file system
                fs_ = None
        if fs_ is None:
            await self._served(vm)
            fs_ = self.vms.get(vm)  # (another lookup may have made it meanwhile)
        if fs_ is None:
            slot = self.next_slot
            if slot >= FS_TAG:
                raise pyfuse3.FUSEError(errno.ENFILE)
            self.next_slot += 1
            fs_ = VmFs(vm, slot, self.fabric, self.nursery.start_soon, self.cache, f"{self.path}/fs/{vm}")
            fs_.made, fs_.made_at, fs_.above = made, trio.current_time(), FS_DIR
            self.vms[vm], self.slots[slot] = fs_, fs_  # before any wait: no other lookup takes the slot
            try:
                return await fs_.start()
            except BaseException:
                if self.vms.get(vm) is fs_:  # (a stopping view has emptied both; another may be there)
                    del self.vms[vm]
                self.slots.pop(slot, None)
                raise
        return await fs_.start()

    async def _made(self, vm: str) -> int | None:
        """When the VM's definition was made (etcd's create revision: a VM
        removed and made again under its name is another); None if etcd
        cannot say now (the file system in use goes on)."""
        from .elected import VMS

        with trio.move_on_after(MADE_WAIT):
            try:
                entry = await self.etcd.get(VMS + vm)
            except DrvsError:
                return None
            return entry.create_revision if entry is not None else 0
        return None  # (a lookup does not wait on a slow etcd)

    def vms_now(self, made: dict[str, int], when: float) -> None:
        """The VMs there were at trio time `when` (name -> create revision):
        the file systems of VMs removed (or made again) since are retired,
        and the kernel told to forget their directories, so a VM made again
        is looked up afresh at once (not after the entry's timeout).  One
        made here after `when` is newer than this news: kept."""
        for vm, fs_ in list(self.vms.items()):
            if fs_.made is None or fs_.made_at > when or made.get(vm) == fs_.made:
                continue
            self._retire(vm, fs_)
            with contextlib.suppress(OSError, RuntimeError):  # (a view not serving: nothing to tell)
                pyfuse3.invalidate_entry_async(FS_DIR, vm.encode(), ignore_enoent=True)

    def _retire(self, vm: str, fs_: VmFs) -> None:
        """Forget a removed VM's file system: its inodes are stale from now
        on (its slot number is never given again)."""
        log.info("VM %s was removed (or removed and made again): its file system here is retired", vm)
        if self.vms.get(vm) is fs_:
            del self.vms[vm]
        self.slots.pop(fs_.slot, None)
        slot = fs_.slot
        self.cache.drop_where(lambda key: key >> TAG_SHIFT != slot)  # (what to keep)

    async def _served(self, vm: str) -> None:
        """Return once fs@vm is served; ENOENT for a VM without a file
        system; a new VM's is waited for (its server is being elected)."""
        from ..vm.model import VmSpec
        from .elected import VMS

        deadline = trio.current_time() + START_WAIT
        while True:
            try:
                await self.fabric.resolve(f"fs@{vm}", fresh=True)
                return
            except IpcError as e:
                if e.errno != errno.ENOENT:
                    raise pyfuse3.FUSEError(errno.EIO) from None
            try:
                entry = await self.etcd.get(VMS + vm)  # (not the registry: it makes the default VM)
            except DrvsError:
                raise pyfuse3.FUSEError(errno.EIO) from None
            spec = VmSpec.from_json(entry.value) if entry is not None else None
            if spec is None or not spec.fs_nodes:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if trio.current_time() > deadline:
                raise pyfuse3.FUSEError(errno.ETIMEDOUT)
            await trio.sleep(0.2)

    async def _fs_entries(self) -> list:
        """The VMs with a file server (or already in use here), each with
        its root's attributes (which makes them usable here)."""
        vms = sorted({e.key.rpartition("/fs@")[2] for e in await self.etcd.range(REGISTRY + "fs@")} | set(self.vms))
        out = []
        for vm in vms:
            try:
                out.append((vm.encode(), await self._mount_vm(vm.encode())))
            except pyfuse3.FUSEError:
                continue  # its server is away: it is left out, as a dead node's pids are from /proc
        return out

    # -- operations ------------------------------------------------------------------

    @_errno_only
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == ROOT:
            if name == b"proc":
                return self.proc._entry(self.proc.nodes[procview.ROOT])
            if name == b"fs":
                return self._dir_attr(FS_DIR)
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent_inode == FS_DIR:
            return await self._mount_vm(name)
        if self._is_proc(parent_inode):
            return await self.proc.lookup(parent_inode, name, ctx)
        return await self._vmfs(parent_inode).lookup(parent_inode, name, ctx)

    @_errno_only
    async def getattr(self, inode, ctx=None):
        if inode in (ROOT, FS_DIR):
            return self._dir_attr(inode)
        if self._is_proc(inode):
            return await self.proc.getattr(inode, ctx)
        return await self._vmfs(inode).getattr(inode, ctx)

    @_errno_only
    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self._vmfs(inode, errno.EPERM).setattr(inode, attr, fields, fh, ctx)

    @_errno_only
    async def readlink(self, inode, ctx):
        if self._is_proc(inode):
            return await self.proc.readlink(inode, ctx)
        return await self._vmfs(inode, errno.EINVAL).readlink(inode, ctx)

    @_errno_only
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return await self._vmfs(parent_inode).mknod(parent_inode, name, mode, rdev, ctx)

    @_errno_only
    async def mkdir(self, parent_inode, name, mode, ctx):
        return await self._vmfs(parent_inode).mkdir(parent_inode, name, mode, ctx)

    @_errno_only
    async def symlink(self, parent_inode, name, target, ctx):
        return await self._vmfs(parent_inode).symlink(parent_inode, name, target, ctx)

    @_errno_only
    async def link(self, inode, new_parent_inode, new_name, ctx):
        fs_ = self._vmfs(new_parent_inode)
        if self._vmfs(inode, errno.EXDEV) is not fs_:
            raise pyfuse3.FUSEError(errno.EXDEV)
        return await fs_.link(inode, new_parent_inode, new_name, ctx)

    @_errno_only
    async def unlink(self, parent_inode, name, ctx):
        await self._vmfs(parent_inode).unlink(parent_inode, name, ctx)

    @_errno_only
    async def rmdir(self, parent_inode, name, ctx):
        await self._vmfs(parent_inode).rmdir(parent_inode, name, ctx)

    @_errno_only
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        fs_ = self._vmfs(parent_inode_old)
        if self._vmfs(parent_inode_new, errno.EXDEV) is not fs_:
            raise pyfuse3.FUSEError(errno.EXDEV)
        await fs_.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx)

    @_errno_only
    async def open(self, inode, flags, ctx):
        if self._is_proc(inode):
            return await self.proc.open(inode, flags, ctx)
        return await self._vmfs(inode, errno.EISDIR).open(inode, flags, ctx)

    @_errno_only
    async def create(self, parent_inode, name, mode, flags, ctx):
        return await self._vmfs(parent_inode).create(parent_inode, name, mode, flags, ctx)

    @_errno_only
    async def read(self, fh, off, size):
        if fh >> TAG_SHIFT == 0:
            return await self.proc.read(fh, off, size)
        return await self._vmfs(fh, errno.EBADF).read(fh, off, size)

    @_errno_only
    async def write(self, fh, off, buf):
        return await self._vmfs(fh, errno.EBADF).write(fh, off, buf)

    @_errno_only
    async def flush(self, fh):
        if fh >> TAG_SHIFT:
            await self._vmfs(fh, errno.EBADF).flush(fh)

    @_errno_only
    async def release(self, fh):
        if fh >> TAG_SHIFT == 0:
            return await self.proc.release(fh)
        await self._vmfs(fh, errno.EBADF).release(fh)

    @_errno_only
    async def fsync(self, fh, datasync):
        if fh >> TAG_SHIFT:
            await self._vmfs(fh, errno.EBADF).fsync(fh, datasync)

    @_errno_only
    async def opendir(self, inode, ctx):
        if inode in (ROOT, FS_DIR):
            fh = (FS_TAG << TAG_SHIFT) | self.next_fh
            self.next_fh += 1
            self.listings[fh] = (inode, None)
            return fh
        if self._is_proc(inode):
            return await self.proc.opendir(inode, ctx)
        return await self._vmfs(inode, errno.ENOTDIR).opendir(inode, ctx)

    @_errno_only
    async def readdir(self, fh, start_id, token):
        tag = fh >> TAG_SHIFT
        if tag == 0:
            return await self.proc.readdir(fh, start_id, token)
        if tag != FS_TAG:
            return await self._vmfs(fh, errno.EBADF).readdir(fh, start_id, token)
        if fh not in self.listings:
            raise pyfuse3.FUSEError(errno.EBADF)
        inode, entries = self.listings[fh]
        if entries is None or start_id == 0:
            entries = [(b"proc", self.proc._attr(self.proc.nodes[procview.ROOT])), (b"fs", self._dir_attr(FS_DIR))] \
                if inode == ROOT else await self._fs_entries()
            self.listings[fh] = (inode, entries)
        if not reply_dots(token, start_id, inode, ROOT):
            return
        for i, (name, attr) in enumerate(entries[max(start_id - DOTS, 0):], max(start_id, DOTS)):
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                break
            if name == b"proc" and inode == ROOT:
                self.proc.nodes[procview.ROOT].lookups += 1

    @_errno_only
    async def releasedir(self, fh):
        tag = fh >> TAG_SHIFT
        if tag == 0:
            return await self.proc.releasedir(fh)
        if tag == FS_TAG:
            self.listings.pop(fh, None)
            return
        await self._vmfs(fh, errno.EBADF).releasedir(fh)

    @_errno_only
    async def fsyncdir(self, fh, datasync):
        tag = fh >> TAG_SHIFT
        if tag not in (0, FS_TAG):
            await self._vmfs(fh, errno.EBADF).fsyncdir(fh, datasync)

    @_errno_only
    async def statfs(self, ctx):
        # pyfuse3 does not say which inode is asked about; the caller does:
        # a jail's process asks about its VM's file system; a host process
        # (drvs mount) about the path or file its system call names
        # (drvs/dvos/caller.py), else the only VM file system in use here.
        fs_ = self.vms.get(vm_of(ctx.pid) or "")
        if fs_ is None:
            fs_ = self.vms.get(await trio.to_thread.run_sync(caller.statfs_vm, ctx.pid) or "")
        if fs_ is None and len(self.vms) == 1:
            fs_, = self.vms.values()
        if fs_ is not None:
            return await fs_.statfs(ctx)
        return await self.proc.statfs(ctx)

    @_errno_only
    async def getxattr(self, inode, name, ctx):
        return await self._vmfs(inode, pyfuse3.ENOATTR).getxattr(inode, name, ctx)

    @_errno_only
    async def setxattr(self, inode, name, value, ctx):
        await self._vmfs(inode, errno.ENOTSUP).setxattr(inode, name, value, ctx)

    @_errno_only
    async def listxattr(self, inode, ctx):
        if inode >> TAG_SHIFT in (0, FS_TAG):
            return []
        return await self._vmfs(inode).listxattr(inode, ctx)

    @_errno_only
    async def removexattr(self, inode, name, ctx):
        await self._vmfs(inode, pyfuse3.ENOATTR).removexattr(inode, name, ctx)

    async def forget(self, inode_list):
        proc = []
        for ino, n in inode_list:
            tag = ino >> TAG_SHIFT
            if tag == 0:
                proc.append((ino, n))
            elif tag != FS_TAG and tag in self.slots:
                self.slots[tag].forget(ino & MASK, n)
        if proc:
            await self.proc.forget(proc)

    def init(self) -> None:
        """The kernel's INIT is being answered: it sets the mount's
        read-ahead from it, so ours goes in just after."""
        self.nursery.start_soon(self._set_readahead)

    async def _set_readahead(self) -> None:
        await trio.sleep(0.2)
        problem = mounts.set_readahead(self.path, READAHEAD_KIB)
        if problem:
            log.warning("%s", problem)

    # -- fsc@NODE ---------------------------------------------------------------------

    async def invalidate(self, msg: Msg) -> Msg:
        if msg.type == Call.recall:
            return await self._recall(msg)
        inv, fs_ = self._invalidation(msg)
        if fs_ is not None:
            await fs_.invalidate(inv)
        return Msg(0)

    def invalidate_now(self, msg: Msg) -> Msg | Later | None:
        """fsc's fast path: what waits for nothing is made as the message
        comes (the server's change waits on this reply); the rest (the
        kernel's inodes to drop, if any) by a trio task before the reply.
        A recall waits (for this node's unlinks sent behind): in trio."""
        if msg.type == Call.recall:
            return None
        inv, fs_ = self._invalidation(msg)
        rest = fs_.invalidated(inv) if fs_ is not None else None
        if rest is None:
            return Msg(0)
        return Later(lambda: _after(rest))

    async def _recall(self, msg: Msg) -> Msg:
        try:
            r = from_flat(fs.Recall, msg.payload)
            vm, dirs, epoch = r.vm, list(r.dirs), r.epoch
        except Exception:  # noqa: BLE001 - malformed input from the wire
            raise IpcError("malformed recall", errno.EBADMSG) from None
        fs_ = self.vms.get(vm)
        if fs_ is not None:
            await fs_.recall(dirs, epoch)
        return Msg(0)

    def _invalidation(self, msg: Msg):
        try:
            inv = from_flat(fs.Invalidations, msg.payload)
            vm = inv.vm
        except Exception:  # noqa: BLE001 - malformed input from the wire
            raise IpcError("malformed invalidation", errno.EBADMSG) from None
        return inv, self.vms.get(vm)


async def _after(rest) -> Msg:
    await rest()
    return Msg(0)


def vm_of(pid: int) -> str | None:
    """The VM whose cell the process pid (of this node) runs in."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            m = _CELL.search(f.read())
    except OSError:
        return None
    return m.group(1).decode() if m else None


async def serve(cfg, fabric, procs, etcd, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount the view and serve it until cancelled; unmount on every path."""
    path = mountpoint(cfg)
    problem = mounts.detach(path)  # a previous daemon's, dead with it
    if problem:
        log.warning("%s", problem)
    os.makedirs(path, mode=0o755, exist_ok=True)
    ops = View(cfg, fabric, procs, etcd)
    fabric.view = ops  # (the supervisor maps lock calls' files through it)
    await fabric.register_steadily(f"fsc@{procs.node}", ops.invalidate, ops.invalidate_now)
    # fsname: "drvs:NODE" (util-linux mount shows a bare word as a path of its
    # working directory); findmnt shows a VM's bind as drvs:NODE[/fs/VM].
    options = {f"fsname=drvs:{procs.node}", "subtype=drvs", "allow_other", "default_permissions"}
    pyfuse3.init(ops, path, options)
    try:
        async with trio.open_nursery() as nursery:
            ops.nursery = nursery
            task_status.started()
            with fusewait.install():  # (its workers wait in line on the host loop)
                await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        # Invalidations other nodes still send (fsc's fast path runs on the
        # host loop, whatever trio is cancelling) find no file system from
        # now on: pyfuse3's session is about to go.
        ops.vms.clear()
        ops.slots.clear()
        pyfuse3.close(unmount=True)
        ops.cache.close()
