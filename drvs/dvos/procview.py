"""The VM's /proc inside its jails: the node's own processes and those of
the VM's other nodes, in one directory, so that ps, top, pgrep and pkill
see (and act on) the whole VM.

Part of the node's DVOS view (drvs/dvos/view.py): STATE/dvos/proc/VM is
bound on /proc in that VM's jails, where the cell's real proc sits at
/.drvs/proc:

    /proc/NAME      a symlink to /.drvs/proc/NAME for everything of this
                    node (its pids, self, meminfo, sys, ...): the kernel's
                    own files, magic links and all
    /proc/PID       for a pid of another node: a directory whose files
                    (SHARED_FILES: stat, status, cmdline, ...) are read from
                    that node's procs@NODE when opened

Remote listings are cached for LIST_TTL; a node that cannot be reached
drops out of the listing (its processes reappear with it)."""

import errno
import logging
import os
import stat
import time

import pyfuse3

from ..fs.client import DOTS, reply_dots
from ..ipc.message import IpcError, Msg
from ..ipc.schema import pm
from ..vm.model import check_name
from .pm import server
from .pm.procs import SHARED_FILES

log = logging.getLogger("drvmmd")
LIST_TTL = 0.5
TIMEOUT = 1.0   # entries and attributes, in the kernel's caches
REAL_PROC = "/.drvs/proc"
ROOT = 2  # STATE/dvos/proc (1 is the view's root: drvs/dvos/view.py)


class Node:
    """An inode: the root, a VM's /proc, a remote pid's directory, a file
    of it, or a symlink into the real proc."""

    __slots__ = ("ino", "kind", "vm", "pid", "name", "lookups")

    def __init__(self, ino, kind, vm=None, pid=0, name=b""):
        self.ino, self.kind, self.vm, self.pid, self.name = ino, kind, vm, pid, name
        self.lookups = 0  # the kernel's references (lookup, readdirplus); forget() drops them


class ProcView:
    def __init__(self, cfg, fabric, procs, etcd):
        self.cfg, self.fabric, self.procs, self.etcd = cfg, fabric, procs, etcd
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, "root")}
        self.by_key: dict[tuple, int] = {}
        self.next_ino = ROOT + 1
        self.remote: dict[str, tuple[float, dict[int, str]]] = {}  # vm -> (when, pid -> node)
        self.files: dict[int, bytes] = {}                  # open file -> its content
        self.listings: dict[int, tuple[Node, list | None]] = {}  # open directory -> its entries
        self.next_fh = 1

    # -- inodes ---------------------------------------------------------------

    def _node(self, kind, vm=None, pid=0, name=b"") -> Node:
        key = (kind, vm, pid, name)
        ino = self.by_key.get(key)
        if ino is None:
            ino = self.by_key[key] = self.next_ino
            self.next_ino += 1
            self.nodes[ino] = Node(ino, kind, vm, pid, name)
        return self.nodes[ino]

    def _parent(self, node: Node) -> int:
        """The number of a directory's ".." (its d_ino only: the kernel
        walks ".." itself)."""
        if node.kind == "root":
            return pyfuse3.ROOT_INODE  # the view's root
        if node.kind == "vm":
            return ROOT
        return self.by_key.get(("vm", node.vm, 0, b""), ROOT)

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """node's attributes, handed to the kernel, which now holds it."""
        node.lookups += 1
        return self._attr(node)

    async def forget(self, inode_list):
        """The kernel let go of these: pids come and go, so must their inodes."""
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is None or ino == ROOT:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                del self.nodes[ino]
                self.by_key.pop((node.kind, node.vm, node.pid, node.name), None)

    def _get(self, ino) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = TIMEOUT
        if node.kind in ("root", "vm", "pid"):
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o555, 2
        elif node.kind == "link":
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFLNK | 0o777, 1, len(self._target(node))
        else:
            a.st_mode, a.st_nlink = stat.S_IFREG | 0o444, 1
        now = time.time_ns()
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = now
        a.st_uid = a.st_gid = 0
        a.st_blksize = 4096
        return a

    @staticmethod
    def _target(node: Node) -> bytes:
        return f"{REAL_PROC}/".encode() + node.name

    # -- what is where --------------------------------------------------------

    def _local(self, vm: str) -> list[bytes]:
        try:
            cp = self.procs.proc(vm)
        except IpcError:
            return []
        return [] if cp is None else [os.fsencode(n) for n in os.listdir(cp.fd) if self._mine(n)]

    def _mine(self, name) -> bool:
        """Not a pid, or one of this node's (a group anchor's pid is its
        leader's, on another node)."""
        name = os.fsdecode(name)
        return not name.isdigit() or self.procs.owns(int(name)) or name == "1"

    def _local_has(self, vm: str, name: bytes) -> bool:
        """Whether the cell's own proc has name (also a thread's id, which
        its listing leaves out)."""
        try:
            cp = self.procs.proc(vm)
            if cp is None or not self._mine(name):
                return False
            os.stat(name, dir_fd=cp.fd, follow_symlinks=False)
            return True
        except (OSError, IpcError):
            return False

    async def _remote(self, vm: str, fresh: bool = False) -> dict[int, str]:
        when, pids = self.remote.get(vm, (0.0, {}))
        if fresh or time.monotonic() - when > LIST_TTL:
            nodes = [n for n in await server.vm_nodes(self.etcd, vm, self.procs.node) if n != self.procs.node]
            rows = []
            if nodes:
                rows, _failed = await server.list_nodes(self.fabric, self.procs, nodes, vm)
            pids = {r["pid"]: r["node"] for r in rows}
            self.remote[vm] = (time.monotonic(), pids)
        return pids

    # -- operations -------------------------------------------------------------

    async def getattr(self, inode, ctx=None):
        return self._attr(self._get(inode))

    async def lookup(self, parent_inode, name, ctx=None):
        parent = self._get(parent_inode)
        if parent.kind == "root":
            try:
                vm = check_name(os.fsdecode(name))
            except Exception:  # noqa: BLE001 - a name that is no VM's
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            return self._entry(self._node("vm", vm))
        if parent.kind == "vm":
            if self._local_has(parent.vm, name):
                return self._entry(self._node("link", parent.vm, 0, name))
            if name.isdigit() and name[:1] != b"0":
                pid = int(name)
                remote = await self._remote(parent.vm)
                if pid not in remote:
                    remote = await self._remote(parent.vm, fresh=True)
                if pid in remote:
                    return self._entry(self._node("pid", parent.vm, pid))
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent.kind == "pid" and os.fsdecode(name) in SHARED_FILES:
            return self._entry(self._node("file", parent.vm, parent.pid, name))
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def readlink(self, inode, ctx):
        node = self._get(inode)
        if node.kind != "link":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self._target(node)

    async def opendir(self, inode, ctx):
        node = self._get(inode)
        if node.kind not in ("root", "vm", "pid"):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self.next_fh
        self.next_fh += 1
        self.listings[fh] = (node, None)
        return fh

    async def readdir(self, fh, start_id, token):
        node, entries = self.listings.get(fh, (None, None))
        if node is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if entries is None or start_id == 0:
            # One snapshot per open directory: getdents in chunks then sees
            # each entry once, while processes come and go.
            entries = await self._entries(node)
            self.listings[fh] = (node, entries)
        if not reply_dots(token, start_id, node.ino, self._parent(node)):
            return
        for i, (name, child) in enumerate(entries[max(start_id - DOTS, 0):], max(start_id, DOTS)):
            if not pyfuse3.readdir_reply(token, name, self._attr(child), i + 1):
                break
            child.lookups += 1  # readdirplus: the kernel holds the entries it took

    async def _entries(self, node: Node) -> list:
        if node.kind == "root":
            entries = [(os.fsencode(vm), self._node("vm", vm)) for vm in sorted(self.procs.cells)]
        elif node.kind == "vm":
            entries = [(n, self._node("link", node.vm, 0, n)) for n in sorted(self._local(node.vm))]
            entries += [(str(p).encode(), self._node("pid", node.vm, p))
                        for p in sorted(await self._remote(node.vm))]
        else:
            entries = [(f.encode(), self._node("file", node.vm, node.pid, f.encode())) for f in SHARED_FILES]
        return entries

    async def releasedir(self, fh):
        self.listings.pop(fh, None)

    async def open(self, inode, flags, ctx):
        node = self._get(inode)
        if node.kind != "file":
            raise pyfuse3.FUSEError(errno.EISDIR if node.kind != "link" else errno.ELOOP)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EACCES)
        self.files[self.next_fh] = await self._fetch(node)
        self.next_fh += 1
        # direct_io: the size is not known before reading (as in /proc).
        return pyfuse3.FileInfo(fh=self.next_fh - 1, direct_io=True, keep_cache=False)

    async def _fetch(self, node: Node) -> bytes:
        remote = await self._remote(node.vm)
        where = remote.get(node.pid)
        if where is None:
            raise pyfuse3.FUSEError(errno.ESRCH)
        req = pm.ReadRequest.new_message(vm=node.vm, pid=node.pid, name=node.name.decode())
        try:
            reply = await self.fabric.sendrec(f"procs@{where}", Msg(pm.PmCall.read, req.to_bytes_packed()),
                                              timeout=2)
        except IpcError as e:
            log.info("/proc/%d/%s of %s on %s: %s", node.pid, node.name, node.vm, where, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if reply.status < 0:
            raise pyfuse3.FUSEError(errno.ESRCH if -reply.status == errno.ENOENT else -reply.status)
        return bytes(pm.FileData.from_bytes_packed(reply.payload).data)

    async def read(self, fh, off, size):
        return self.files.get(fh, b"")[off:off + size]

    async def release(self, fh):
        self.files.pop(fh, None)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s
