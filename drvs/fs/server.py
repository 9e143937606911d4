"""The VM's file server, endpoint "fs@VM": a DVOS server, elected among the
nodes that hold the VM's store (drvs/fs/service.py), that serves the VM's
files to the FUSE client of every node (drvs/fs/client.py).

One message table.  Calls that wait for nothing here (all but fsync, locks
and usage) are made on the fabric's fast path, as the message arrives (no
trio hop); a change to what other nodes may cache is replied to only once
those nodes dropped it (callback breaks, as AFS calls them): the
server remembers which node looked at which directory and inode, and tells
exactly those nodes, through their "fsc@NODE", before it replies.  So a
create, rename, unlink or chmod on n1 is seen on n2 at once, and a file
closed on n1 is read afresh by an open on n2 after it (close-to-open).

Open files are descriptors of the store held here, so an unlinked file
stays readable through its open handles until they are released.

Every change is also sent to the other replicas (drvs/fs/replica.py), in
the order it was made here; a node that holds a replica runs this same
class as a mirror ("fsr@NODE"), and becomes the server in a fail-over."""

import bisect
import collections
import contextlib
import errno
import hashlib
import inspect
import json
import logging
import os
import resource
import stat
import time

import trio

from .. import _fs
from ..errors import DrvsError, EtcdUnavailable, SetupError
from ..ipc.message import IpcError, Later, Msg, failure
from ..ipc.schema import flat_with, from_flat, fs, new, to_flat
from . import replica
from .locks import RECLAIM_GRACE, LockTable
from .replica import MIRRORED, PUT_CALLS, Builder, Mirror, MirrorFailed
from .store import XATTR_PREFIXES, Store, check_path

log = logging.getLogger("drvmmd")
Call = fs.FsCall
INVALIDATE_TIMEOUT = 1.0  # a node that does not confirm within this is dropped from every cache list
RECALL_TIMEOUT = 2.0      # a delegation's node gets this long to make its unlinks sent behind
# A node uses a delegation only this long after a call of its that this
# server answered began (drvs/fs/client.py): one that cannot be recalled
# (away, or cut off) is ended once that has passed since its last call came.
DELEGATION_LEASE = 5.0
REVOKED_KEPT = 60.0  # seconds a node's unlinks sent behind into a directory taken from it are refused
RECALL_GIVE_UP = 8.0  # a node still heard from but not giving a directory back has it ended after this
DELEGATIONS_MAX = 4096    # directories delegated at once (no more are granted beyond)
# A node may write this much of a file it made in a directory delegated to
# it behind (FsReply.behindBytes) -- while the store has BEHIND_ROOM free: a
# write sent behind was answered before it reached the disk, so it must
# find room there (each node queues at most a few MiB of them).
BEHIND_GRANT = 1 << 20
BEHIND_ROOM = 256 << 20
ROOM_CHECKED = 1.0        # seconds a look at the store's free space serves
BEHIND_CALLS = {Call.write, Call.setattr, Call.release, Call.create}  # (each on a handle of the node's)
TMPFILES_ASK = 64         # files made ahead for a node in one call (tmpfiles) ...
TMPFILES_HELD = 256       # ... and held for it at once (an open descriptor each)
READDIR_BATCH = 512
LISTING_KEPT = 10.0   # seconds a directory's names are kept for the next batch of its listing
LISTINGS_MAX = 64     # listings kept at once (the least recently used goes)
HANDLE_CALLS = {Call.write, Call.release, Call.fsync, Call.setattr, Call.flush}
REAP_EVERY = 5.0  # seconds between looks for open files of nodes that left
FOLLOW_EVERY = 1.0  # seconds between looks at which nodes keep replicas (vm update moves them)
KEPT_MAX = 4096  # removed directories whose numbers are kept from reuse at once (a descriptor each)
REPLACED_GRACE = 2.0  # seconds a file replaced by a rename stays openable by its number (see FsServer.replaced)
REPLICA_SYNC_WAIT = 2.0  # seconds a replica's syncfs holds its batch at most (see FsServer.syncfs)
DONE_MAX = 8192  # replies to changes kept to answer a call sent again (see FsServer.done)
REPLACED_MAX = 256    # such files at once (a descriptor each)
VERSIONS_MAX = 1 << 16  # files whose data versions are kept apart (the others share version_floor)
OPEN_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NOATIME
SET_MODE, SET_UID, SET_GID, SET_SIZE, SET_ATIME, SET_MTIME = 1, 2, 4, 8, 16, 32
WRITE_KILL_SUIDGID = 1  # a write's flags: as the kernel's FUSE_WRITE_KILL_SUIDGID (see write)


def fill_attr(a, st: os.stat_result) -> None:
    a.ino, a.mode, a.nlink, a.uid, a.gid = st.st_ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid
    a.rdev, a.size, a.blocks = st.st_rdev, st.st_size, st.st_blocks
    a.atimeNs, a.mtimeNs, a.ctimeNs = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns


class OpenFile:
    __slots__ = ("fd", "ino", "node", "wrote", "flags")

    def __init__(self, fd: int, ino: int, node: str, flags: int):
        self.fd, self.ino, self.node, self.wrote, self.flags = fd, ino, node, False, flags


class Changed:
    """What a call changed that other nodes may cache (their kernels must
    drop it before the call is answered)."""

    __slots__ = ("entries", "inodes", "dirs", "data", "gone", "origin_too", "moves")

    def __init__(self, entries=(), inodes=(), data=False, gone=(), dirs=(), origin_too=False, moves=()):
        # entries: (directory, name) that went or now name another object
        # (told to the nodes that may cache the directory's names); dirs:
        # the directories whose names changed, one made there included
        # (told to the nodes that may know names absent from them, or their
        # attributes, which drop all of that: see FsServer.looked).
        # gone: inodes that no longer exist; who cached them is forgotten as
        # soon as it is known whom to tell: the file system may give their
        # numbers to new files, which no node caches yet (else every change
        # of such a file would be sent, and waited for, to nodes that cached
        # its predecessor).  origin_too: the caller's node is told as well
        # (the server changed more than the caller asked for, and its
        # kernel would not know).  moves: directories moved, (inode, its
        # directory now, its path now), told to the nodes that may hold them.
        self.entries, self.inodes, self.dirs, self.data, self.gone = entries, inodes, dirs, data, gone
        self.origin_too, self.moves = origin_too, moves


def _target(targets: dict, node: str) -> tuple[list, set, dict, list]:
    """node's (entries, inodes, looked, moves) to be told (see
    FsServer._targets), made empty if new."""
    target = targets.get(node)
    if target is None:
        target = targets[node] = ([], set(), {}, [])
    return target


class FsServer:
    def __init__(self, vm: str, store: Store, fabric, here: str, etcd=None):
        self.vm, self.store, self.fabric, self.here, self.etcd = vm, store, fabric, here, etcd
        self.files: dict[int, OpenFile] = {}
        self.next_fh = 1
        # inode -> {node that may cache it (or its entries): the number of
        # that node's last call that showed it}; see forgotten()
        self.interest: dict[int, dict[str, int]] = {}
        # Of those, directory -> {node that may know its attributes or names
        # absent from it (a lookup that found none, a listing): the number
        # of its call that showed them}.  A change of its names is told to
        # these; the told node forgets all of that (its kernel's absent
        # names and the directory's attributes), so it is not told of the
        # next change until it looks again -- a process on one node writing
        # files into a directory a shell on another once listed pays for
        # telling that node once, not at every file.
        self.looked: dict[int, dict[str, int]] = {}
        # (node, directory inode) -> (its names, sorted; where the next batch
        # begins; when): a listing in batches reads the directory once
        self.listings: dict[tuple[str, int], tuple[list[bytes], int, float]] = {}
        # Removed directories that nodes' kernels may still hold (a file
        # open below one keeps it): inode -> a descriptor of it; and inode
        # -> those nodes, as interest had them (forgotten() keeps it as it
        # keeps interest).  ext4 would give the number to the next
        # directory made; a kernel holding the old one under that number
        # then takes the new one for it (its dentry moved there, names of
        # the old in it; or the mkdir fails ESTALE).  The descriptor keeps
        # the number taken until every such node's kernel forgot it.
        self.kept: dict[int, int] = {}
        self.holders: dict[int, dict[str, int]] = {}
        self.kept_full = False  # kept_max was reached once (said once)
        # (a quarter of the descriptors at most: open files need the rest)
        self.kept_max = min(KEPT_MAX, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)
        # Files a rename replaced in the last REPLACED_GRACE seconds: inode
        # -> (a descriptor of it, when it goes), oldest first.  A node's
        # kernel opens a file by the name it looked up; if the name was
        # replaced meanwhile (another node's update by rename, served
        # between that lookup and the open), the open found another file
        # (ESTALE), and the kernel's one retry could meet the next
        # replacement too.  Such an open, to read, opens the replaced file,
        # as a local file system opens the one its lookup found.
        self.replaced: collections.OrderedDict[int, tuple[int, float]] = collections.OrderedDict()
        # Versions of files' data, for the nodes' caches of files their
        # kernels forgot (drvs/fs/cache.py; the server stops telling a node
        # of those): inode -> the number of the last change of its data
        # made here (a write, a truncation, its creation), least recent
        # first; a file not among them last changed at or before
        # version_floor.  An open says its file's version: pages a node
        # kept from an open of the same version are the file's still.
        self.versions: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.version_floor = self.version_last = 0
        self.seq = 0  # the number of the call being made (the caller's node counts them)
        # Replies to the changes made, by (node, call number): a change sent
        # again -- after a reset connection, or to the next server once this
        # one died or went silent -- is answered as it was, not made twice
        # (an append written twice; a create, mkdir, rename or unlink then
        # failing).  As NFSv4.1's reply cache, but kept with the replicas:
        # a replica records the reply of each change it applies, so the
        # next server has the replies of every change it has.  Bounded by
        # count: after a server's death no change is recorded until the
        # calls sent again have come.  making: those under way in trio (a
        # copy that comes meanwhile waits for the first's reply).
        self.done: collections.OrderedDict[tuple[str, int], tuple[int, bytes]] = collections.OrderedDict()
        self.making: dict[tuple[str, int], trio.Event] = {}
        self.epoch = 0                          # the term; 0: a replica, not serving
        self.mirrors: dict[str, Mirror] = {}    # the other replicas, while serving
        self.held: trio.Event | None = None     # set while changes wait (a replica's copy ends)
        self.others: list[str] = []              # the other replica nodes, while serving
        self.away_since: dict[str, float] = {}   # replicas whose node is NotReady -> since when (_replace_lost)
        self.sync = False
        self.vouched = 0  # the term before this one, if its server handed over cleanly (see promote)
        self.serving = 0  # calls in _serve (a clean stop waits for them before vouching: Mirror._hand_over)
        # Another term began (a replica said so, or etcd): nothing more is
        # served (EREMCHG: callers look for the new server), and run() ends.
        self.stale = False
        self.builder = Builder(store.base)
        # As a replica: one batch applied at a time (a server that gave up
        # waiting for one and sent the next must not have them interleave).
        self.applying = trio.Lock()
        # The message table.  The calls whose handlers are plain functions
        # (self.plain) are made as they arrive, on the fabric's fast path
        # (fast); those that wait (the disk, a lock), and changes while
        # changes are held, a replica is far behind, or a synchronous VM's
        # closes, run in trio (handle).
        self.table = {
            Call.lookup: self.lookup, Call.getattr: self.getattr, Call.readlink: self.readlink,
            Call.open: self.open, Call.read: self.read, Call.write: self.write,
            Call.readdir: self.readdir, Call.statfs: self.statfs, Call.getxattr: self.getxattr,
            Call.listxattr: self.listxattr,
            Call.setattr: self.setattr, Call.mknod: self.mknod, Call.mkdir: self.mkdir,
            Call.symlink: self.symlink, Call.unlink: self.unlink, Call.rmdir: self.rmdir,
            Call.rename: self.rename, Call.link: self.link, Call.create: self.create,
            Call.release: self.release, Call.fsync: self.fsync, Call.flush: self.flush,
            Call.setxattr: self.setxattr, Call.removexattr: self.removexattr, Call.usage: self.usage,
            Call.lock: self.lock, Call.fallocate: self.fallocate, Call.unlinks: self.unlinks,
            Call.behind: self.behind, Call.tmpfiles: self.tmpfiles, Call.syncfs: self.syncfs,
        }
        self.lock_table = LockTable()
        # Directories delegated (FsReply.delegated): inode -> the node whose
        # alone it is -- a directory it made, which no other node has used
        # since.  That node answers its kernel's creates there (with files
        # made ahead: tmpfiles), and unlinks, writes, setattrs and closes of
        # files it made there, at once and sends them behind
        # (drvs/fs/client.py VmFs.create, unlink, write); before another
        # node's call on such a directory, or on a name in it, is made, the
        # delegation is recalled (Recall): the node answers once what it
        # sent behind was made.
        self.delegations: dict[int, str] = {}
        self.delegated_to: collections.Counter = collections.Counter()  # node -> its delegations
        self.recalling: dict[int, trio.Event] = {}  # directory -> set when its recall ended
        self.heard: dict[str, float] = {}  # node -> when (time.monotonic) its last call came
        # Delegations ended without their node's answer: node -> how many
        # (each reply to it says so: FsReply.revocations), and node ->
        # {directory: when}: its unlinks sent behind there that come after
        # are refused (ESTALE), as other nodes may have looked meanwhile.
        self.revocations: collections.Counter = collections.Counter()
        self.revoked: dict[str, dict[int, float]] = {}
        self.room = (0.0, False)  # (when looked, whether the store had BEHIND_ROOM free)
        self.spares: dict[str, set[int]] = {}  # node -> handles of files made ahead for it (tmpfiles)
        self.behind_order: dict[str, trio.Lock] = {}  # node -> held while its calls sent behind are made
        self.plain = {t for t, h in self.table.items() if not inspect.iscoroutinefunction(h)}
        self.puts = {Call.putBegin: self._put_begin, Call.putDir: self.builder.put_dir,
                     Call.putFile: self.builder.put_file, Call.putLink: self.builder.put_link,
                     Call.putHardlink: self.builder.put_hardlink, Call.putRemove: self.builder.put_remove,
                     Call.putCommit: self._put_commit}

    def close(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()
        self._release_kept()
        self.store.close()

    # -- dispatch --------------------------------------------------------------

    def _decode(self, msg: Msg):
        try:
            req = from_flat(fs.FsRequest, msg.view())  # (a large write's data: a view of its message)
            vm, path = req.vm, bytes(req.path)
        except Exception:  # noqa: BLE001 - malformed input from the wire
            raise IpcError("malformed request", errno.EBADMSG) from None
        if vm != self.vm:
            raise IpcError(f"fs@{self.vm}: request for VM {vm!r}", errno.EINVAL)
        return req, path

    def fast(self, msg: Msg) -> "Msg | Later | None":
        """The fabric's fast path: a call that waits for nothing here is
        made as it arrives (no trio hop).  A change is done and queued for
        the replicas at once; if other nodes cache what it changed, the
        reply waits until they dropped it (a Later: trio tells them, then
        replies).  None: handle() it (a call that waits on the disk, on a
        lock, on replicas, or while changes are held)."""
        if msg.type not in self.table or not self.epoch or self.stale:
            return None  # handle() says what is wrong
        req, path = self._decode(msg)
        origin = msg.node or self.here
        if origin in self.delegated_to:
            self.heard[origin] = time.monotonic()
        if len(req.forgotten) and req.forgottenEpoch == self.epoch and len(req.forgottenMarks) == len(req.forgotten):
            self.forgotten(origin, req.forgotten, req.forgottenMarks)
        key = (origin, req.seq) if req.seq and msg.type in MIRRORED else None
        if key is not None and (key in self.making or key in self.done):
            return None  # a change sent again: handle() answers it as made (see done)
        if not self._now_ok(msg.type) or self._recall_needed(req, path, origin):
            return None
        if len(req.closed) and not self._now_ok(Call.release):
            return None  # its closes wait too (a replica being copied must hear of them)
        targets: dict[str, tuple[list, set, dict, list]] = {}
        data = False
        for fh in req.closed:  # closes the caller's node left for its next call
            try:
                data |= self._now_into(targets, Call.release, LocalRequest(self.vm, fh=fh), b"",
                                       LocalReply(self.epoch), origin, None)
            except Exception:  # noqa: BLE001 - one close's failure is not the call's, nor the others'
                log.exception("fs@%s: closing handle %d of node %s", self.vm, fh, origin)
        try:
            out = new(fs.FsReply, epoch=self.epoch)
            if origin in self.revocations:
                out.revocations = self.revocations[origin]
            if msg.type == Call.read:  # the data goes out of line: never copied into the reply
                reply = Msg(0, flat_with(out, "data", self.local_read(req.fh, req.offset, req.size)))
            else:
                data |= self._now_into(targets, msg.type, req, path, out, origin, msg.view())
                reply = Msg(0, to_flat(out))
                if key is not None:
                    self._did(key, msg.type, reply.payload)
                    if targets:  # (a copy that comes before the others were told waits as the reply does)
                        self.making[key] = trio.Event()
        except OSError as e:
            reply = _os_failure(e, path)
        except Exception as e:  # noqa: BLE001 - a bug: the reply says so; what was made is still told
            log.exception("fs@%s: message type %d", self.vm, msg.type)
            reply = failure(errno.EIO, f"fs@{self.vm}: server error: {type(e).__name__}: {e}")
        if not targets:
            return reply
        return Later(lambda: self._told(targets, data, reply, key if key in self.making else None))

    def _did(self, key: tuple[str, int], ctype: int, reply: bytes) -> None:
        self.done[key] = (ctype, reply)
        if len(self.done) > DONE_MAX:
            self.done.popitem(last=False)

    async def _made_before(self, key: tuple[str, int], ctype: int, origin: str) -> "Msg | None":
        """The reply to a change sent again, as it was made (in this term
        or, by this node as a replica, in the one before); None: not made."""
        while (making := self.making.get(key)) is not None:
            await making.wait()
        done = self.done.get(key)
        if done is None or done[0] != ctype:
            return None
        out = from_flat(fs.FsReply, done[1]).as_builder()
        out.epoch = self.epoch  # (a replica's reply: the term it is answered in)
        if origin in self.revocations:
            out.revocations = self.revocations[origin]
        if ctype in (Call.open, Call.create):
            out.version = self.version(out.attr.ino)
        # What the node will cache of it, noted as a reply made now notes it
        # (a replica noted nothing; a new term knows no interest yet)...
        if out.attr.ino:
            self._seen(origin, out.attr.ino)
        if out.dirAttr.ino:
            self._seen(origin, out.dirAttr.ino)
            self._looked(origin, out.dirAttr.ino)
        # ... and no grant a recall may have ended since.
        if out.delegated and self.delegations.get(out.attr.ino) != origin:
            out.delegated = False
        if out.behindBytes and not (out.dirAttr.ino and self._behind_ok(out.dirAttr.ino, origin)):
            out.behindBytes = 0
        log.info("fs@%s: call %d of node %s came again: answered as made", self.vm, key[1], origin)
        return Msg(0, to_flat(out))

    def _now_into(self, targets: dict, ctype: int, req, path: bytes, out, origin: str, payload) -> bool:
        """_now(), its nodes to tell merged into targets (one round of
        invalidations for a call and the closes it carried); whether data
        changed."""
        more, data = self._now(ctype, req, path, out, origin, payload)
        for node, (entries, inodes, looked, moves) in more.items():
            have = _target(targets, node)
            have[0].extend(entries)
            have[1].update(inodes)
            have[2].update(looked)
            have[3].extend(moves)
        return data

    def _now_ok(self, ctype: int) -> bool:
        """Whether a call of this type can be made at once now: a change
        waits (in _serve) while changes are held or a replica is far behind."""
        if ctype not in self.plain or not self.epoch:
            return False
        if ctype == Call.flush and self.sync:
            return False  # a close on a synchronous VM waits for the replicas
        return ctype not in MIRRORED or (self.held is None and not any(m.full() for m in self.mirrors.values()))

    def _now(self, ctype: int, req, path: bytes, out, origin: str, payload: bytes | None) -> tuple[dict, bool]:
        """Make a call whose handler waits for nothing (_now_ok): what it
        changed is done and queued for the replicas; (the nodes to tell,
        whether data changed) -- see _targets."""
        req, path, payload = self._anchored(req, path, payload)
        self.seq = req.seq
        changed, _ = self._made(ctype, req, payload, out, origin, self.table[ctype](req, path, out, origin))
        if changed is None:
            return {}, False
        return self._targets(origin, changed), changed.data

    def _made(self, ctype: int, req, payload: bytes | None, out, origin: str, changed: "Changed | None"):
        """After a call was made here: what it changed that other nodes may
        cache (an open that truncated changed the file's data), and its
        place in each replica's queue ({mirror: sequence number})."""
        if ctype == Call.open and req.flags & os.O_TRUNC:
            changed = Changed(inodes=[out.attr.ino], data=True)
        if changed is not None and changed.data:
            for ino in changed.inodes:
                self._data_changed(ino)
        if ctype in (Call.open, Call.create):
            out.version = self.version(out.attr.ino)  # (what it truncated, or made, is a change)
        return changed, self._mirror(ctype, req, payload, out, origin) if ctype in MIRRORED else {}

    def _data_changed(self, ino: int) -> None:
        self.version_last += 1
        self.versions[ino] = self.version_last
        self.versions.move_to_end(ino)
        if len(self.versions) > VERSIONS_MAX:
            self.version_floor = self.versions.popitem(last=False)[1]  # (the least recent)

    def version(self, ino: int) -> int:
        return self.versions.get(ino, self.version_floor)

    async def _told(self, targets: dict, data: bool, reply, key: "tuple[str, int] | None" = None):
        try:
            await self._tell_targets(targets, data)
        finally:
            if key is not None:
                self.making.pop(key).set()
        return reply

    async def handle(self, msg: Msg) -> Msg:
        if msg.type not in self.table or msg.type in PUT_CALLS:
            raise IpcError(f"fs@{self.vm}: unknown message type {msg.type}", errno.ENOSYS)
        if not self.epoch or self.stale:
            raise IpcError(f"fs@{self.vm}: this node is not serving", errno.EREMCHG)
        req, path = self._decode(msg)
        origin = msg.node or self.here
        if origin in self.delegated_to:
            self.heard[origin] = time.monotonic()
        if not req.seq or msg.type not in MIRRORED:
            return await self._handle(msg, req, path, origin)
        key = (origin, req.seq)
        again = await self._made_before(key, msg.type, origin)
        if again is not None:
            return again
        self.making[key] = making = trio.Event()
        try:
            reply = await self._handle(msg, req, path, origin)
            if reply.status == 0:
                self._did(key, msg.type, reply.payload)
            return reply
        finally:
            del self.making[key]
            making.set()

    async def _handle(self, msg: Msg, req, path: bytes, origin: str) -> Msg:
        for fh in req.closed:  # closes the caller's node left for its next call
            await self._release_for(origin, fh)
        out = new(fs.FsReply, epoch=self.epoch)
        if origin in self.revocations:
            out.revocations = self.revocations[origin]
        try:
            await self._recall_for(req, path, origin)
            await self._serve(msg.type, req, path, out, origin, msg.view())
        except OSError as e:
            return _os_failure(e, path)
        return Msg(0, to_flat(out))

    # This node's own client calls these: no message is encoded or decoded
    # (requests and replies are plain objects of the same shape), and the
    # errors are the OSErrors themselves.

    def local_read(self, fh: int, offset: int, size: int) -> bytes:
        """A read: a pread on the handle's file.  This node's own client
        calls it without a request around it (a read changes nothing and
        waits for nothing); the handlers make it for a request."""
        return os.pread(self._file(fh).fd, size, offset)

    def local_fast(self, ctype: int, req) -> "LocalReply | Later | None":
        """As fast(), for this node's own client: the reply, a Later (other
        nodes are to be told first), or None (await local())."""
        if self.stale or not self._now_ok(ctype) or self._recall_needed(req, req.path, self.here):
            return None
        out = LocalReply(self.epoch)
        targets, data = self._now(ctype, req, req.path, out, self.here, None)
        return out if not targets else Later(lambda: self._told(targets, data, out))

    async def local(self, ctype: int, req) -> "LocalReply":
        if not self.epoch or self.stale:
            raise IpcError(f"fs@{self.vm}: this node is not serving", errno.EREMCHG)
        out = LocalReply(self.epoch)
        await self._recall_for(req, req.path, self.here)
        await self._serve(ctype, req, req.path, out, self.here, None)
        return out

    async def _serve(self, ctype: int, req, path: bytes, out, origin: str, payload: bytes | None,
                     seq: int | None = None) -> None:
        """seq: the number of the node's call this one came in (see behind)."""
        self.serving += 1
        try:
            await self._serve_now(ctype, req, path, out, origin, payload, seq)
        finally:
            self.serving -= 1

    async def _serve_now(self, ctype: int, req, path: bytes, out, origin: str, payload: bytes | None,
                         seq: int | None) -> None:
        if ctype in MIRRORED and await self._room():
            await self._recall_for(req, path, origin)  # (a directory may have been delegated meanwhile)
        # Stopped while this waited: the next server makes it (Mirror._vouch
        # counts on no change made here after a stop; a close changes no
        # data).  Not a call of a batch sent behind: its node sends the batch
        # again whole, and calls made twice there go wrong (a write on a
        # handle the batch closed); made here, it only costs the vouching.
        if self.stale and ctype != Call.release and seq is None:
            raise IpcError(f"fs@{self.vm}: this node is not serving", errno.EREMCHG)
        req, path, payload = self._anchored(req, path, payload)
        # (the handlers that note interest are plain functions: no await till they did)
        self.seq = req.seq if seq is None else seq
        changed, waits = self._made(ctype, req, payload, out, origin,
                                    await _run(self.table[ctype], req, path, out, origin))
        if changed is not None:
            await self._tell(origin, changed)
        if ctype in (Call.fsync, Call.syncfs):  # durable on every replica in sync, not only here
            for mirror, seq in waits.items():
                await mirror.wait(seq)
        elif ctype == Call.flush and self.sync:  # a synchronous VM: a close returns once replicas have it
            for mirror in list(self.mirrors.values()):
                await mirror.wait(mirror.pushed)
            out.synced = True

    async def _room(self) -> bool:
        """Wait while changes are held, or while a replica is far behind;
        whether it waited."""
        waited = False
        while True:
            if self.held is not None:
                await self.held.wait()
                waited = True
                continue
            behind = next((m for m in self.mirrors.values() if m.full()), None)
            if behind is None:
                return waited
            await behind.drained()
            waited = True

    def _mirror(self, ctype: int, req, payload: bytes | None, out, origin: str = "") -> dict:
        """Queue a change made here for every replica in sync; {mirror: its
        sequence number}.  payload: req as it came (None: a local call's)."""
        if not self.mirrors:
            return {}
        if ctype == Call.unlinks:  # (those made here only: a replica checks no inode)
            made = [bytes(n) for n, st in zip(req.names, out.statuses) if st == 0]
            if not made:
                return {}
            req, payload = None, to_flat(new(fs.FsRequest, vm=self.vm, names=made))
        short = ctype == Call.write and out.size < len(req.data)
        if ctype in (Call.open, Call.create) or payload is None or short:
            b = req.as_builder() if payload is not None else new(fs.FsRequest, **req.fields())
            if ctype in (Call.open, Call.create):  # the replica's handle is the one given here
                b.fh, b.origin = out.fh, origin
            if short:  # (a full disk): the replica writes what was written here
                b.data = bytes(req.data)[:out.size]
            payload = to_flat(b)
        waits = {}
        for m in self.mirrors.values():
            seq = m.push(ctype, payload, origin or self.here)
            if seq:
                waits[m] = seq
        return waits

    @contextlib.asynccontextmanager
    async def holding_changes(self):
        """Changes wait (a replica's copy is finishing)."""
        while self.held is not None:
            await self.held.wait()
        self.held = trio.Event()
        try:
            yield
        finally:
            held, self.held = self.held, None
            held.set()

    def path_of(self, fd: int) -> bytes | None:
        """Where an open file is in the store now (None: unlinked)."""
        return self.store.path_of(fd)

    def _anchored(self, req, path: bytes, payload: bytes | None):
        """A call naming its paths below directories by their handles
        (FsRequest.at, at2: its node lost their paths, another node moved
        them) as the same call by their paths now -- found as it is made,
        so nothing moves them in between; and so the replicas take it
        (their handles are their own).  (req, path, payload) as they are
        made then; OSError if a directory is gone."""
        if not req.at and not req.at2:
            return req, path, payload
        if req.atEpoch != self.epoch:
            raise OSError(errno.ESTALE, "a file handle of another server's term")
        b = req if payload is None else req.as_builder()  # (a LocalRequest is changed in place)
        if req.at:
            b.path = path = _below(self.store.find(bytes(req.at)), path)
        if req.at2:
            b.path2 = _below(self.store.find(bytes(req.at2)), bytes(req.path2))
        b.at = b.at2 = b""
        if payload is None:
            return b, path, None
        payload = to_flat(b)
        return from_flat(fs.FsRequest, payload), path, payload

    # -- serving, and being a replica --------------------------------------------------

    def promote(self, epoch: int, replicas: list[str], sync: bool = False, vouched: int = 0) -> None:
        """Serve from now on, in term epoch, with these other replicas;
        sync: a close waits until the replicas have what was written;
        vouched: the term before, if its server handed over cleanly to
        this replica (nodes need not doubt their writes of that term)."""
        self.epoch, self.sync, self.vouched = epoch, sync, vouched
        self._note_served(epoch)
        self.interest.clear()  # what the nodes cached was the old server's business
        self.looked.clear()
        self.versions.clear()  # (the nodes drop their caches with the old term)
        self.version_floor = self.version_last
        self._release_kept()  # (the nodes number this term's inodes apart from the last's)
        self.next_fh = (epoch << 32) + 1  # never a number an earlier term gave out
        self.others = [n for n in replicas if n != self.here]
        # No lock is known here yet: after a term before, the nodes give back
        # those their programs hold while others wait (drvs/fs/locks.py).
        self.lock_table = LockTable()
        if epoch > 1:
            self.lock_table.grace_until = trio.current_time() + RECLAIM_GRACE

    def _note_served(self, epoch: int) -> None:
        """Say in the store which term it serves, and in which boot of the
        machine (see vouch_own)."""
        try:
            with open(f"{self.store.base}/served", "w") as f:
                json.dump({"term": epoch, "boot": _boot_id()}, f)
        except OSError as e:
            log.warning("fs@%s: %s/served: %s (a restart of this node's drvmmd is taken as a crash)",
                        self.vm, self.store.base, e.strerror)

    def vouch_own(self, term: int) -> int:
        """term, if this store served it in this boot of the machine (its
        drvmmd restarted, the machine did not: every change that server
        made, and so acknowledged, is here, in the page cache if not on
        the disk), else 0."""
        try:
            with open(f"{self.store.base}/served") as f:
                said = json.load(f)
            return term if said == {"term": term, "boot": _boot_id()} else 0
        except (OSError, ValueError):
            return 0

    async def run(self) -> None:
        """While serving: keep the other replicas in sync, and close what
        nodes that left the cluster had open.  Ends with a DrvsError once
        another term began or the VM is gone: the campaign stands down (the
        error is raised outside the nursery, so not inside an exception
        group, which would reach the daemon's main and end it)."""
        async with trio.open_nursery() as nursery:
            for node in self.others:
                self._start_mirror(nursery, node)
            nursery.start_soon(self._follow_replicas, nursery)
            while True:
                await trio.sleep(REAP_EVERY)
                self._expire_replaced(time.monotonic())  # (a quiet server too: their space goes)
                if await self._term_over():
                    break
                await self._reap_handles()
            nursery.cancel_scope.cancel()
        raise SetupError(f"fs@{self.vm}: term {self.epoch} is over (another node serves, or the VM is gone); "
                         "standing down")

    def _start_mirror(self, nursery, node: str) -> None:
        self.mirrors[node] = Mirror(self, node)
        nursery.start_soon(self.mirrors[node].run)

    async def _follow_replicas(self, nursery) -> None:
        """Keep the replicas the VM's definition names now (`vm update`
        moves them): a new one is copied to, live; one taken away is struck
        from those in sync, so it can no longer take over."""
        from ..vm.model import VmSpec
        from ..vm.registry import VMS

        while True:
            await trio.sleep(FOLLOW_EVERY)
            try:
                entry = await self.etcd.get(VMS + self.vm)
            except Exception:  # noqa: BLE001 - etcd away: next time
                continue
            if entry is None or entry.create_revision != self.store.made:
                continue  # (removed, or another VM of the name: the term ends)
            spec = VmSpec.from_json(entry.value)
            try:
                if await self._replace_lost(spec, entry.mod_revision):
                    continue  # (the new definition is read next time)
            except Exception as e:  # noqa: BLE001 - etcd away, or a definition changed meanwhile: next time
                log.info("fs@%s: replacing a lost replica: %s", self.vm, e)
                continue
            want = [n for n in spec.fs_nodes if n != self.here]
            for node in [n for n in self.mirrors if n not in want]:
                try:
                    await self.mirrors[node].drop()
                except MirrorFailed as e:  # (kept, streamed to, until etcd is told)
                    log.warning("fs@%s: replica on %s taken away, not yet struck: %s", self.vm, node, e)
                    continue
                log.info("fs@%s: replica on %s taken away", self.vm, node)
                del self.mirrors[node]
            for node in want:
                if node not in self.mirrors:
                    log.info("fs@%s: new replica on %s", self.vm, node)
                    self._start_mirror(nursery, node)
            self.others = want

    async def _replace_lost(self, spec, revision: int) -> bool:
        """A replica whose node has been NotReady for the VM's
        fs_replace_after (its stream failed, so it is not in sync) is
        replaced in the VM's definition by another node of the VM that is
        Ready and keeps none; the new one is then copied to live, and the
        count asked for kept while a node is down for long.  Whether the
        definition was changed.  (The node back later keeps its old tree
        until the VM is removed, or made a replica again.)"""
        from ..cluster.membership import list_nodes
        from ..vm.model import VmSpec
        from ..vm.registry import VMS

        after = spec.replace_after()
        lost = [n for n, m in self.mirrors.items() if not m.live and n in spec.fs_nodes]
        for node in list(self.away_since):
            if node not in lost:
                del self.away_since[node]
        if not after or not lost:
            return False
        status = {n["name"]: n["status"] for n in await list_nodes(self.etcd)}
        now = trio.current_time()
        for node in lost:
            if status.get(node, "NotReady") != "NotReady":
                self.away_since.pop(node, None)
                continue
            if now - self.away_since.setdefault(node, now) < after:
                continue
            spare = next((n for n in spec.shares if n not in spec.fs_nodes and status.get(n) == "Ready"), None)
            if spare is None:
                continue
            nodes = [spare if n == node else n for n in spec.fs_nodes]
            new = VmSpec.from_json(spec.to_json())
            new.fs_nodes = nodes
            await self.etcd.put(VMS + self.vm, new.to_json(), expect_revision=revision)
            log.warning("fs@%s: the replica on %s, whose node has been NotReady for %.0f s, is replaced by one on "
                        "%s (replicas: %s)", self.vm, node, now - self.away_since.pop(node), spare, ", ".join(nodes))
            return True
        return False

    async def _term_over(self) -> bool:
        """Whether another term began (this node was cut off meanwhile), or
        the VM's file system is gone."""
        if not self.stale:
            try:
                state, _ = await replica.read_state(self.etcd, self.vm)
            except Exception:  # noqa: BLE001 - etcd away: its lease decides
                return False
            self.stale = state is None or state["epoch"] != self.epoch
        return self.stale

    async def _reap_handles(self) -> None:
        from ..cluster.membership import status_key

        lockers = {lk.owner.split(":", 1)[0] for lks in self.lock_table.locks.values() for lk in lks}
        holders = {node for nodes in self.holders.values() for node in nodes}
        nodes = {f.node for f in self.files.values()} | lockers | holders | set(self.delegated_to)
        for node in nodes - {self.here, ""}:
            try:
                alive = await self.etcd.get(status_key(node)) is not None
            except Exception:  # noqa: BLE001 - etcd away: next time
                return
            if alive:
                continue
            self.lock_table.drop(f"{node}:")
            self.forgotten(node, list(self.holders))
            if time.monotonic() > self.heard.get(node, 0.0) + DELEGATION_LEASE:  # (else: next time)
                dirs = [d for d, n in self.delegations.items() if n == node]
                for dino in dirs:
                    self._undelegate(dino)
                if dirs:
                    self._revoked(node, dirs)
            gone = [fh for fh, f in self.files.items() if f.node == node]
            log.info("fs@%s: node %s left; closing its %d open files", self.vm, node, len(gone))
            for fh in gone:
                await self._release_for(node, fh)

    async def _release_for(self, node: str, fh: int) -> None:
        """Release a handle for node, as its own release call would (the
        replicas close it too; nodes caching what it wrote are told)."""
        await self._serve(Call.release, LocalRequest(self.vm, fh=fh), b"", LocalReply(self.epoch), node, None)

    async def apply(self, batch) -> list[int]:
        """As a replica: make the server's calls, in order; each one's
        status.  A copy's call that failed fails the copy's calls after it
        in the batch, unmade: the copy starts again from its beginning."""
        async with self.applying:
            return await self._apply(batch)

    async def _apply(self, batch) -> list[int]:
        statuses, copy_failed = [], False
        for call in batch.calls:
            if copy_failed and call.type in PUT_CALLS:
                statuses.append(-errno.ECANCELED)
                continue
            msg = Msg(call.type, bytes(call.request))
            try:
                req, path = self._decode(msg)
                if req.at or req.at2:  # (the server sends its calls by path: its handles are its store's)
                    raise OSError(errno.EINVAL, "a call naming a directory by file handle")
                if call.type in PUT_CALLS:
                    try:
                        await trio.to_thread.run_sync(self.puts[call.type], req)
                    except OSError as e:
                        copy_failed = True
                        if e.errno == errno.ENOSPC and call.type == Call.putFile:
                            await self._make_room(batch.epoch)
                        raise
                elif call.type in MIRRORED:
                    out = fs.FsReply.new_message()
                    await _run(self.table[call.type], req, path, out, "")
                    if req.seq and call.origin:  # (its reply, should the call come again to this node: see done)
                        self._did((call.origin, req.seq), call.type, to_flat(out))
                else:
                    raise OSError(errno.EINVAL, "not a change")
                statuses.append(0)
            except (OSError, IpcError) as e:
                if e.errno in (errno.EBADF, errno.ESTALE) and (call.type in HANDLE_CALLS or req.via):
                    statuses.append(0)  # a file unlinked before the copy: not here, and gone anyway
                else:
                    statuses.append(-(e.errno or errno.EIO))
        return statuses

    async def _make_room(self, epoch: int) -> None:
        """A copy filled this replica's disk: empty its old tree, if etcd
        says this node is not a replica in sync in the copy's term (one
        still listed -- its server could not strike it -- may take over
        with what it has: never emptied); if etcd does not answer, not."""
        if self.etcd is None:
            return
        try:
            state, _ = await replica.read_state(self.etcd, self.vm)
        except DrvsError as e:  # (etcd away, or answering an error)
            log.info("fs@%s: the disk is full; this replica's old tree is kept (%s)", self.vm, e)
            return
        if state is None or state["epoch"] != epoch or self.here in state["in_sync"]:
            return
        try:
            if await trio.to_thread.run_sync(self.builder.make_room):
                log.warning("fs@%s: the disk is full: this replica's old tree (not in sync) is emptied to make "
                            "room for the copy, which starts again", self.vm)
        except OSError as e:
            log.warning("fs@%s: the disk is full, and emptying the old tree failed: %s", self.vm, e)

    def _put_begin(self, req) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()
        self.done.clear()  # (their inode numbers are the old tree's)
        self.builder.begin()

    def _put_commit(self, req) -> None:
        self.builder.commit()
        self.store.close()
        self.store = Store(self.store.base, self.vm, self.store.made)

    # -- who caches what ---------------------------------------------------------

    def _post_op(self, dfd: int, out, origin: str) -> int:
        """The changed directory's attributes into the reply (its inode
        number returned): the kernel drops its own after each create or
        remove and would ask for them at once.  The origin keeps them: it
        is told of the next change another node makes there (looked)."""
        st = os.stat(dfd)
        fill_attr(out.dirAttr, st)
        self._seen(origin, st.st_ino)
        self._looked(origin, st.st_ino)
        return st.st_ino

    def forgotten(self, node: str, inodes, marks=None) -> None:
        """node caches nothing of these inodes any more: it is no longer told
        of their changes, and the table of who caches what keeps only what
        some node holds.  marks: for each, the last call node had begun when
        its kernel forgot it (every call up to it was answered there); a
        later call of node that showed the inode -- one that overtook the
        notice, or came between two deliveries of it -- keeps node told.
        No marks: node is gone, whatever its calls."""
        for table in (self.interest, self.looked, self.holders):
            for i, ino in enumerate(inodes):
                nodes = table.get(ino)
                if nodes is None or node not in nodes:
                    continue
                if marks is None or nodes[node] <= marks[i]:
                    del nodes[node]
                    if not nodes:
                        del table[ino]
        if self.kept:
            for ino in inodes:  # (a removed directory no node holds any more: its number may go)
                if ino in self.kept and ino not in self.holders:
                    os.close(self.kept.pop(ino))

    def _keep(self, dfd: int, name: str, st: os.stat_result) -> int | None:
        """Before a directory goes: a descriptor of it if nodes may hold it
        (see self.kept; None: none does, or too many are kept already)."""
        if not stat.S_ISDIR(st.st_mode) or not self.interest.get(st.st_ino):
            return None
        if len(self.kept) >= self.kept_max:
            if not self.kept_full:
                self.kept_full = True
                log.warning("fs@%s: %d removed directories kept for nodes that may hold them; not keeping more "
                            "(a node holding one may then see a new one as it)", self.vm, self.kept_max)
            return None
        try:
            return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return None

    def _kept(self, fd: int | None, ino: int, done: bool) -> None:
        """The removal _keep() was made for is done (or failed: not done)."""
        if fd is None:
            return
        holders = self.interest.get(ino)
        if not done or ino in self.kept or not holders:
            os.close(fd)
            return
        self.kept[ino], self.holders[ino] = fd, dict(holders)

    def _release_kept(self) -> None:
        for fd in self.kept.values():
            os.close(fd)
        self.kept.clear()
        self.holders.clear()
        self._expire_replaced(float("inf"))

    def _hold(self, dfd: int, name: str, st: os.stat_result) -> int | None:
        """Before a rename replaces a regular file: a descriptor of it (see
        self.replaced), if any node may hold it."""
        if not stat.S_ISREG(st.st_mode) or not self.interest.get(st.st_ino):
            return None
        try:
            return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return None

    def _held(self, fd: int, ino: int, done: bool) -> None:
        """The rename _hold() was made for is done (or failed: not done).
        Held ones expire here, at an open that asks for one, and on the
        server's periodic pass (not on every call)."""
        self._expire_replaced(time.monotonic())
        if not done or ino in self.replaced:
            os.close(fd)
            return
        if len(self.replaced) >= REPLACED_MAX:
            # the oldest goes: an open racing a rename is after the newest
            # (a file updated by rename hundreds of times a second)
            _, (oldest, _) = self.replaced.popitem(last=False)
            os.close(oldest)
        self.replaced[ino] = (fd, time.monotonic() + REPLACED_GRACE)

    def _expire_replaced(self, now: float) -> None:
        while self.replaced:
            ino, (fd, until) = next(iter(self.replaced.items()))
            if until > now:
                break
            del self.replaced[ino]
            os.close(fd)

    def _replaced_file(self, ino: int, flags: int) -> int:
        """An open, to read, of a file a rename replaced moments ago (see
        self.replaced); else ESTALE, as before."""
        self._expire_replaced(time.monotonic())
        held = self.replaced.get(ino)
        if held is None or flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise OSError(errno.ESTALE, "another file has that name now")
        return _reopen(held[0], flags)

    def _seen(self, node: str, *inodes: int, table: dict | None = None) -> None:
        if not self.epoch:
            return  # a replica: it tells nobody (promote starts afresh)
        seq = self.seq
        table = self.interest if table is None else table
        for ino in inodes:
            nodes = table.get(ino)
            if nodes is None:
                table[ino] = {node: seq}
            elif nodes.get(node, -1) < seq:
                nodes[node] = seq

    def _looked(self, node: str, dino: int) -> None:
        self._seen(node, dino, table=self.looked)

    def _shown(self, node: str, st: os.stat_result) -> None:
        """node was given these attributes (of a directory: see looked)."""
        self._seen(node, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            self._looked(node, st.st_ino)

    async def _tell(self, origin: str, changed: Changed) -> None:
        """Make every node but origin that may cache these drop them, and
        wait until they did (or INVALIDATE_TIMEOUT passed: such a node is
        forgotten, and its kernel's own timeouts bound what it shows)."""
        await self._tell_targets(self._targets(origin, changed), changed.data)

    def _targets(self, origin: str, changed: Changed) -> dict[str, tuple[list, set, dict, list]]:
        """The nodes but origin that may cache what changed: {node: (entries,
        inodes, {directory it looked into: the number its interest had},
        moves)}.
        Inodes that are gone are forgotten here, before any wait: a new file
        may get their numbers meanwhile."""
        targets: dict[str, tuple[list, set, dict, list]] = {}
        if changed.origin_too:
            origin = None
        for dino, name in changed.entries:
            for node in self.interest.get(dino, ()):
                if node != origin:
                    _target(targets, node)[0].append((dino, name))
        for ino in changed.inodes:
            for node in self.interest.get(ino, ()):
                if node != origin:
                    _target(targets, node)[1].add(ino)
        for dino in changed.dirs:
            for node, seq in self.looked.get(dino, {}).items():
                if node != origin:
                    target = _target(targets, node)
                    target[1].add(dino)
                    target[2][dino] = seq
        for move in changed.moves:
            for node in self.interest.get(move[0], ()):
                if node != origin:
                    _target(targets, node)[3].append(move)
        for ino in changed.gone:
            self.interest.pop(ino, None)
            self.looked.pop(ino, None)
        return targets

    async def _tell_targets(self, targets: dict, data: bool) -> None:
        """Shielded: the change is made, so the others are told even if its
        caller gives up meanwhile (each within INVALIDATE_TIMEOUT)."""
        if targets:
            with trio.CancelScope(shield=True):
                if len(targets) == 1:  # (the usual case: no task to start and wait for)
                    (node, target), = targets.items()
                    return await self._send(node, *target, data)
                async with trio.open_nursery() as nursery:
                    for node, target in targets.items():
                        nursery.start_soon(self._send, node, *target, data)

    async def _send(self, node: str, entries, inodes, looked: dict, moves: list, data: bool) -> None:
        """Tell node; once it dropped them, it no longer knows anything of
        the directories in looked (its inodes' attributes went, and with
        them the names it knew absent there), unless a later call of its
        showed them again."""
        m = fs.Invalidations.new_message(vm=self.vm, data=data)
        es = m.init("entries", len(entries))
        for i, (dino, name) in enumerate(entries):
            es[i].name, es[i].attr.ino = name, dino
        ins = m.init("inodes", len(inodes))
        for i, ino in enumerate(inodes):
            ins[i] = ino
        if moves:
            ms = m.init("moves", len(moves))
            for i, (ino, dino, path) in enumerate(moves):
                ms[i].ino, ms[i].dir, ms[i].path = ino, dino, path
        try:
            reply = await self.fabric.sendrec(f"fsc@{node}", Msg(Call.invalidate, to_flat(m)),
                                              timeout=INVALIDATE_TIMEOUT)
            if reply.status < 0:
                raise IpcError(reply.error, -reply.status)
        except (IpcError, EtcdUnavailable) as e:
            log.info("fs@%s: node %s did not drop its caches (%s); forgetting what it cached", self.vm, node, e)
            self.forgotten(node, [ino for table in (self.interest, self.holders)  # (looked too)
                                  for ino, nodes in table.items() if node in nodes])
            return
        for dino, seq in looked.items():
            nodes = self.looked.get(dino)
            if nodes is not None and nodes.get(node) == seq:
                del nodes[node]
                if not nodes:
                    del self.looked[dino]

    # -- delegations ---------------------------------------------------------------------

    def _delegate(self, dino: int, node: str) -> None:
        if dino in self.delegations:  # (a number of a directory gone: never left delegated)
            self._undelegate(dino)
        revoked = self.revoked.get(node)
        if revoked is not None:  # (a number of a directory taken from it before: another directory)
            revoked.pop(dino, None)
        self.delegations[dino] = node
        self.delegated_to[node] += 1
        self.heard[node] = time.monotonic()

    def _undelegate(self, dino: int) -> None:
        node = self.delegations.pop(dino)
        self.delegated_to[node] -= 1
        if not self.delegated_to[node]:
            del self.delegated_to[node]
            self.heard.pop(node, None)

    def _revoked(self, node: str, dirs) -> None:
        """Delegations of node ended without its answer (see revocations)."""
        self.revocations[node] += 1
        self.revoked[node] = self._still_revoked(node)
        self.revoked[node].update((d, time.monotonic()) for d in dirs)

    def _still_revoked(self, node: str) -> dict[int, float]:
        """node's directories taken from it in the last REVOKED_KEPT
        seconds ({} if none; older ones forgotten)."""
        kept = self.revoked.get(node)
        if kept:
            since = time.monotonic() - REVOKED_KEPT
            for d in [d for d, when in kept.items() if when <= since]:
                del kept[d]
        return kept or {}

    def _others_delegated(self, origin: str) -> bool:
        """Whether nodes other than origin hold delegations (only the
        caller's own: its calls come in order)."""
        return bool(self.delegated_to) and not (len(self.delegated_to) == 1 and origin in self.delegated_to)

    def _recall_needed(self, req, path: bytes, origin: str) -> bool:
        """Whether a call of origin's must wait for a recall (_recall_for)."""
        return self._others_delegated(origin) and bool(self._delegated_for(req, path, origin))

    def _delegated_for(self, req, path: bytes, origin: str) -> dict[int, str]:
        """The directories delegated to other nodes than origin that a call
        names (the one its path or path2 is in, or the directory itself):
        {inode: node}.  A call that may move a directory (a rename naming
        one), or that names one by its handle, takes back every other
        node's: the paths of their queued unlinks would lead elsewhere."""
        def others():
            return {d: n for d, n in self.delegations.items() if n != origin}

        if req.at or req.at2:
            return others()
        found = {}
        for p in (path, bytes(req.path2)):
            if not p:
                continue
            try:
                with self.store.at(check_path(p)) as (dfd, name):
                    inos = [os.fstat(dfd).st_ino]
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except OSError:
                        st = None
            except OSError:
                continue  # (the call finds out itself)
            if st is not None:
                if req.path2 and stat.S_ISDIR(st.st_mode):
                    return others()
                inos.append(st.st_ino)
            for ino in inos:
                node = self.delegations.get(ino)
                if node is not None and node != origin:
                    found[ino] = node
        return found

    async def _recall_for(self, req, path: bytes, origin: str) -> None:
        """Recall what a call of origin's names of other nodes' delegations
        (their unlinks sent behind there are made first)."""
        while self._others_delegated(origin):
            dirs = self._delegated_for(req, path, origin)
            if not dirs:
                return
            await self._recall(dirs)

    async def _recall(self, dirs: dict[int, str]) -> None:
        waiting = [self.recalling[d] for d in dirs if d in self.recalling]
        mine = {d: n for d, n in dirs.items() if d not in self.recalling}
        for d in mine:
            self.recalling[d] = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                for node in set(mine.values()):
                    nursery.start_soon(self._recall_from, node, [d for d, n in mine.items() if n == node])
        finally:
            for d in mine:
                if self.delegations.get(d) == mine[d]:
                    self._undelegate(d)
                self.recalling.pop(d).set()
        for event in waiting:
            await event.wait()

    async def _recall_from(self, node: str, dirs: list[int]) -> None:
        """Recall dirs from node; while it does not answer but is still
        heard from (its lease runs), ask again: a node that is only slow
        gives them back; one that stays silent past its lease, or does not
        answer within RECALL_GIVE_UP, has them ended (_revoked)."""
        m = fs.Recall.new_message(vm=self.vm, dirs=dirs, epoch=self.epoch)
        give_up, said = time.monotonic() + RECALL_GIVE_UP, False
        while True:
            try:
                reply = await self.fabric.sendrec(f"fsc@{node}", Msg(Call.recall, to_flat(m)),
                                                  timeout=RECALL_TIMEOUT)
                if reply.status < 0:
                    raise IpcError(reply.error, -reply.status)
                return
            except (IpcError, EtcdUnavailable) as e:
                now = time.monotonic()
                left = self.heard.get(node, 0.0) + DELEGATION_LEASE - now
                if not said:
                    log.warning("fs@%s: node %s did not give back %d directories (%s); asking again while "
                                "its lease runs (%.1f s)", self.vm, node, len(dirs), e, max(left, 0))
                    said = True
                if left <= 0 or now >= give_up:
                    self._revoked(node, dirs)
                    return
                await trio.sleep(min(left, RECALL_TIMEOUT))

    # -- calls that read ---------------------------------------------------------------

    def lookup(self, req, path, out, origin) -> None:
        if not check_path(path):
            st = self.store.lstat(path)
        else:
            with self.store.at(path) as (dfd, name):
                dino = os.stat(dfd).st_ino
                self._seen(origin, dino)
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    self._looked(origin, dino)  # the node caches the name absent
                    raise
                _identity(out.attr, st.st_mode, dfd, name)
        self._shown(origin, st)
        fill_attr(out.attr, st)

    def getattr(self, req, path, out, origin) -> None:
        if req.fh:
            st = os.stat(self._file(req.fh).fd)
        else:
            st = self.store.lstat(check_path(path))
        self._shown(origin, st)
        fill_attr(out.attr, st)
        out.vouched = self.vouched  # (a node learning of this term asks for the root's: see VmFs._new_term)

    def readlink(self, req, path, out, origin) -> None:
        with self.store.at(check_path(path)) as (dfd, name):
            out.data = os.readlink(name, dir_fd=dfd)

    def open(self, req, path, out, origin) -> None:
        # O_NONBLOCK: a name that became a fifo behind a node's cache must
        # not stop this loop; the kernel opens special files itself.
        flags = (req.flags & OPEN_FLAGS) | os.O_NONBLOCK
        # (a replica's inode numbers are its own; another term's are not this one's)
        meant = req.ino if self.epoch and req.inoEpoch == self.epoch else 0
        if req.via:  # a file open on the node, which knows no path of it: opened again through a handle
            fd = _reopen(self._via(req, origin).fd, flags)
        else:  # (truncated once it is known to be the file meant)
            try:
                fd = self.store.open(check_path(path), (flags & ~os.O_TRUNC if meant else flags) | os.O_NOFOLLOW)
            except FileNotFoundError:
                if not meant:
                    raise
                # Another node took the name away while the caller's kernel
                # still had it: the node has its kernel look it up again (and
                # an O_CREAT open then create it), as NFS's ESTALE does.
                # EIDRM, not ESTALE: not "another file has the name", which
                # the node answers by reopening the file it has open.
                raise OSError(errno.EIDRM, "the name is gone") from None
        try:
            st = os.stat(fd)
            if meant and st.st_ino != meant:
                found, fd = fd, -1
                os.close(found)
                fd = self._replaced_file(meant, flags)
                st = os.stat(fd)
            if stat.S_IFMT(st.st_mode) not in (stat.S_IFREG, stat.S_IFDIR):
                raise OSError(errno.ENXIO, "not a regular file")
            if meant and not req.via and flags & os.O_TRUNC:  # (open's own truncation, of the file meant)
                fd, first = _reopen(fd, flags), fd
                os.close(first)
                st = os.stat(fd)
            os.set_blocking(fd, True)
        except OSError:
            if fd >= 0:
                os.close(fd)
            raise
        self._opened(fd, origin, out, req, st)

    def _opened(self, fd: int, origin: str, out, req, st: os.stat_result | None = None) -> None:
        if st is None:
            try:
                st = os.stat(fd)
            except OSError:
                os.close(fd)
                raise
        if self.epoch:
            fh = self.next_fh
            self.next_fh += 1
        else:  # a replica keeps the server's handles, and whose they are
            fh, origin = req.fh, req.origin
            old = self.files.pop(fh, None)
            if old is not None:
                os.close(old.fd)
        self.files[fh] = OpenFile(fd, st.st_ino, origin, req.flags & OPEN_FLAGS & ~os.O_TRUNC)
        self._seen(origin, st.st_ino)
        out.fh = fh
        fill_attr(out.attr, st)

    def _file(self, fh: int) -> OpenFile:
        f = self.files.get(fh)
        if f is None:
            raise OSError(errno.EBADF, "no such open file (the file server restarted?)")
        return f

    def _object(self, req, path: bytes, origin: str):
        """The object a call names, as a path os.*xattr take: by its path,
        or (via) through a handle of it -- a file open on the caller's node
        that node knows no path of (its names gone, or changed by another
        node), as a program reaches it by /proc/PID/fd/N."""
        if req.via:
            return contextlib.nullcontext(f"/proc/self/fd/{self._via(req, origin).fd}")
        return _Object(self.store, path)

    def _via(self, req, origin: str) -> OpenFile:
        """The open file a call names its object by: one of the caller's
        node's own (a replica takes the server's word)."""
        f = self.files.get(req.via)
        if f is None or (self.epoch and f.node != origin):
            raise OSError(errno.ESTALE, "no such open file of this node (the file server restarted?)")
        return f

    def fallocate(self, req, path, out, origin) -> Changed:
        """A program's fallocate(2) of a file open on its node (via) or named
        by path: every node's kernel, the caller's too, drops what it has
        of the file (a punched hole reads as zeros)."""
        with self._object(req, path, origin) as where:
            mode = os.stat(where).st_mode  # (the object itself: nothing but a file is opened here)
            if not stat.S_ISREG(mode):
                raise OSError(errno.ESPIPE if stat.S_ISFIFO(mode) else errno.ENODEV, "not a regular file")
            fd = os.open(where, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # In line, as a truncation is: a change made meanwhile would
            # reach the replicas in another order than it was made here.
            _fs.fallocate(fd, req.flags, req.offset, req.size)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        fill_attr(out.attr, st)
        self._data_changed(st.st_ino)
        return Changed(inodes=[st.st_ino], data=True, origin_too=True)

    def read(self, req, path, out, origin) -> None:
        out.data = self.local_read(req.fh, req.offset, req.size)

    def write(self, req, path, out, origin) -> Changed | None:
        f = self._file(req.fh)
        # (bits first, as Linux: a crash between leaves no new data set-id)
        killed = req.flags & WRITE_KILL_SUIDGID and _kill_suidgid(f.fd)
        out.size = os.pwrite(f.fd, req.data, req.offset)
        if req.mtimeNs:  # (a write sent behind: the time its node told its kernel, for every node alike)
            os.utime(f.fd, ns=(os.fstat(f.fd).st_atime_ns, req.mtimeNs))
        fill_attr(out.attr, os.fstat(f.fd))  # (the writer's node answers the kernel's next GETATTR with them)
        f.wrote = True
        self._data_changed(f.ino)  # (now: another node may open it before the writer's close)
        # Whether the writer's close has anything to do: tell other nodes
        # that cache the file, or (--fs-sync) wait for the replicas.
        out.shared = self.sync or any(node != origin for node in self.interest.get(f.ino, ()))
        if killed:  # its mode: every node caching it, the writer's too (its kernel keeps S_ISUID)
            return Changed(inodes=[f.ino], origin_too=True)
        return None

    def readdir(self, req, path, out, origin) -> None:
        fd = self.store.open(check_path(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            dino = out.attr.ino = os.stat(fd).st_ino  # (which directory: the caller checks it is the one it means)
            names, at = self._listing(fd, origin, dino, bytes(req.data))
            batch = []
            while at < len(names) and len(batch) < READDIR_BATCH:
                try:
                    batch.append((names[at], os.stat(names[at], dir_fd=fd, follow_symlinks=False)))
                except FileNotFoundError:
                    pass  # (removed since the listing began: not in it)
                at += 1
            if at < len(names):  # (more to come: kept for the next batch; a finished listing is let go)
                self.listings[(origin, dino)] = (names, at, time.monotonic())
            else:
                self.listings.pop((origin, dino), None)
            ents = out.init("entries", len(batch))
            for i, (name, st) in enumerate(batch):
                ents[i].name = name
                fill_attr(ents[i].attr, st)
                _identity(ents[i].attr, st.st_mode, fd, name)
                self._shown(origin, st)
            out.more = at < len(names)
            self._seen(origin, dino)
            self._looked(origin, dino)  # (a listing: the node knows every other name absent)
        finally:
            os.close(fd)

    def _listing(self, fd: int, origin: str, dino: int, after: bytes) -> tuple[list[bytes], int]:
        """A directory's names, sorted, and where the batch after `after`
        begins: the list the node's last batch of this directory came from,
        if this asks for the next one (a listing in batches reads the
        directory once: it was read whole for every batch, quadratic in its
        size), else read anew.  Names made since the first batch may be
        missed and names removed since are skipped, as readdir(3) allows."""
        kept = self.listings.get((origin, dino))
        if kept is not None and after:
            names, at, when = kept
            if 0 < at <= len(names) and names[at - 1] == after and time.monotonic() - when < LISTING_KEPT:
                return names, at
        with os.scandir(fd) as it:
            names = sorted(os.fsencode(e.name) for e in it)
        now = time.monotonic()
        for key in [k for k, (_, _, when) in self.listings.items() if now - when >= LISTING_KEPT]:
            del self.listings[key]  # (listings abandoned half-read)
        if len(self.listings) >= LISTINGS_MAX:
            self.listings.pop(min(self.listings, key=lambda k: self.listings[k][2]))  # (the least recently used)
        return names, bisect.bisect_right(names, after)

    def statfs(self, req, path, out, origin) -> None:
        _fill_statfs(out.statfs, self.store.statvfs())

    def getxattr(self, req, path, out, origin) -> None:
        name = _xattr_name(req)
        with self._object(req, path, origin) as proc_path:
            out.data = os.getxattr(proc_path, name)

    def listxattr(self, req, path, out, origin) -> None:
        with self._object(req, path, origin) as proc_path:
            names = [os.fsencode(n) for n in os.listxattr(proc_path)]
        out.data = b"".join(n + b"\0" for n in names if n.startswith(XATTR_PREFIXES))

    # -- calls that change what others may cache -----------------------------------------

    def setattr(self, req, path, out, origin) -> Changed:
        mask = req.setMask
        if req.fh:
            st = self._setattr_fd(self._file(req.fh).fd, req, mask)
        else:
            with self.store.at(check_path(path)) as (dfd, name):
                st = self._setattr_at(dfd, name, req, mask)
        self._shown(origin, st)  # (the reply's attributes: the node keeps them)
        fill_attr(out.attr, st)
        return Changed(inodes=[st.st_ino], data=bool(mask & SET_SIZE))

    @staticmethod
    def _setattr_fd(fd: int, req, mask: int) -> os.stat_result:
        if mask & SET_SIZE:  # (by its path: the handle may be one opened only to read, see _object)
            os.truncate(f"/proc/self/fd/{fd}", req.size)
        if mask & (SET_UID | SET_GID):
            os.chown(fd, req.uid if mask & SET_UID else -1, req.gid if mask & SET_GID else -1)
        if mask & SET_MODE:
            os.chmod(fd, stat.S_IMODE(req.mode))
        if mask & (SET_ATIME | SET_MTIME):
            st = os.stat(fd)
            os.utime(fd, ns=_times(st, req, mask))
        return os.stat(fd)

    def _setattr_at(self, dfd: int, name: bytes, req, mask: int) -> os.stat_result:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        link = stat.S_ISLNK(st.st_mode)
        if mask & SET_SIZE:
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL, "not a regular file")
            fd = _fs.openat2(dfd, name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0, 0)
            try:
                os.ftruncate(fd, req.size)
            finally:
                os.close(fd)
        if mask & (SET_UID | SET_GID):
            os.chown(name, req.uid if mask & SET_UID else -1, req.gid if mask & SET_GID else -1,
                     dir_fd=dfd, follow_symlinks=False)
        if mask & SET_MODE:
            if link:
                raise OSError(errno.EOPNOTSUPP, "the mode of a symbolic link cannot change")
            os.chmod(name, stat.S_IMODE(req.mode), dir_fd=dfd)  # not a link, as checked above
        if mask & (SET_ATIME | SET_MTIME):
            os.utime(name, ns=_times(st, req, mask), dir_fd=dfd, follow_symlinks=False)
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)

    def mknod(self, req, path, out, origin) -> Changed:
        return self._make(path, out, origin, req, lambda dfd, name: os.mknod(name, req.mode, req.rdev, dir_fd=dfd))

    def mkdir(self, req, path, out, origin) -> Changed:
        changed = self._make(path, out, origin, req, lambda dfd, name: os.mkdir(name, 0o700, dir_fd=dfd))
        if self.epoch and origin != self.here and len(self.delegations) < DELEGATIONS_MAX:
            self._delegate(out.attr.ino, origin)  # (no other node knows it yet)
            out.delegated = True
        return changed

    def symlink(self, req, path, out, origin) -> Changed:
        target = bytes(req.data)
        return self._make(path, out, origin, req, lambda dfd, name: os.symlink(target, name, dir_fd=dfd))

    def _make(self, path, out, origin, req, make) -> Changed:
        with self.store.at(check_path(path)) as (dfd, name):
            make(dfd, name)
            try:
                st = _own(dfd, name, req)
            except OSError:
                _undo(dfd, name)  # no half-made entry the replicas never hear of
                raise
            dino = self._post_op(dfd, out, origin)
            _identity(out.attr, st.st_mode, dfd, name)
        if stat.S_ISREG(st.st_mode):
            self._data_changed(st.st_ino)  # (a new file: its number may be a removed one's)
        self._shown(origin, st)  # (a directory made: the node knows it empty)
        fill_attr(out.attr, st)
        return Changed(dirs=[dino])

    def create(self, req, path, out, origin) -> Changed:
        if self.epoch and req.fh:
            return self._place(req, path, out, origin)
        flags = (req.flags & OPEN_FLAGS) | os.O_NOFOLLOW
        with self.store.at(check_path(path)) as (dfd, name):
            try:
                fd = _fs.openat2(dfd, name, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, 0)
                made = True
            except FileExistsError:
                if req.flags & os.O_EXCL:
                    raise
                fd = _fs.openat2(dfd, name, flags | os.O_CLOEXEC, 0, 0)  # another node made it meanwhile
                made = False
            try:
                if made:
                    _own(dfd, name, req)
                    if req.mtimeNs:  # (one made behind, on a replica: the times its node gave)
                        os.utime(fd, ns=(req.atimeNs, req.mtimeNs))
                dino = self._post_op(dfd, out, origin)
            except OSError:
                os.close(fd)
                if made:
                    _undo(dfd, name)
                raise
            _identity(out.attr, stat.S_IFREG, dfd, name)
        self._opened(fd, origin, out, req)
        if made:
            self._data_changed(out.attr.ino)  # (a new file: its number may be a removed one's)
            if self._behind_ok(dino, origin):
                out.behindBytes = BEHIND_GRANT
        if not made:  # (another node's file, which this open may have truncated)
            return Changed(inodes=[out.attr.ino], data=True) if req.flags & os.O_TRUNC else None
        return Changed(dirs=[dino])

    def unlink(self, req, path, out, origin) -> Changed:
        # (a replica's inode numbers are its own; another term's are not this one's)
        meant = req.ino if self.epoch and req.inoEpoch == self.epoch else 0
        return self._remove(path, out, origin, lambda dfd, name: os.unlink(name, dir_fd=dfd), meant)

    def unlinks(self, req, path, out, origin) -> "Changed | None":
        """A node's unlinks sent behind, each made as an unlink (the
        inode it means checked in this term); their statuses.  The
        replicas are sent those that were made (see _mirror)."""
        inos = list(req.inos) if self.epoch and req.inoEpoch == self.epoch else []
        revoked = self._still_revoked(origin) if self.epoch else {}
        statuses, entries, inodes, dirs, gone = [], [], [], set(), []
        for i, name in enumerate(req.names):
            try:
                if revoked and self._parent_of(bytes(name)) in revoked:
                    raise OSError(errno.ESTALE, "the directory's delegation was taken back meanwhile")
                c = self._remove(bytes(name), out, origin, lambda dfd, n: os.unlink(n, dir_fd=dfd),
                                 inos[i] if i < len(inos) else 0)
            except OSError as e:
                statuses.append(-(e.errno or errno.EIO))
                continue
            statuses.append(0)
            entries += c.entries
            inodes += c.inodes
            dirs.update(c.dirs)
            gone += c.gone
        out.statuses = statuses
        failed = next((st for st in statuses if st < 0), 0)
        if failed and not self.epoch:  # a replica: the server sent only what it made (see _mirror)
            raise OSError(-failed, "an unlink the server made failed here")
        return Changed(entries=entries, inodes=inodes, dirs=list(dirs), gone=gone) if entries else None

    def tmpfiles(self, req, path, out, origin) -> None:
        """Files made ahead (O_TMPFILE: unnamed, open) for origin to create
        behind in directories delegated to it (drvs/fs/client.py
        VmFs.create): a create's reply names the new inode, so without
        them the node would wait for the server.  Its first ask ends those
        it held before (a restarted daemon's)."""
        held = self.spares.setdefault(origin, set())
        if req.flags & 1:
            for fh in held:
                f = self.files.pop(fh, None)
                if f is not None:
                    os.close(f.fd)
            held.clear()
        if not self.epoch or self.sync or origin == self.here or not self._roomy():
            return
        n = max(0, min(req.size, TMPFILES_ASK, TMPFILES_HELD - len(held)))
        made = []
        try:
            for _ in range(n):
                fd = self.store.open(b"", os.O_TMPFILE | os.O_RDWR, 0o600)
                try:
                    made.append((fd, os.fstat(fd), Store.handle_of(fd, b"")))
                except OSError:
                    os.close(fd)
                    raise
        except OSError as e:  # (a store without O_TMPFILE, no descriptors left: the node creates in line)
            log.info("fs@%s: %d of %d files made ahead for %s: %s", self.vm, len(made), n, origin, e)
        ents, handles = out.init("entries", len(made)), []
        for e, (fd, st, handle) in zip(ents, made):
            fh = self.next_fh
            self.next_fh += 1
            self.files[fh] = OpenFile(fd, st.st_ino, origin, os.O_RDWR)
            held.add(fh)
            handles.append(fh)
            fill_attr(e.attr, st)
            e.attr.gen = generation(handle) if handle else 0
        out.handles = handles
        out.behindBytes = BEHIND_GRANT

    def _placed(self, req, origin: str) -> bool:
        """Whether a create sent behind was made already (its file, made
        ahead for origin, is at its path)."""
        if req.fh in self.spares.get(origin, ()):
            return False
        f = self.files.get(req.fh)
        return f is not None and f.node == origin and self.path_of(f.fd) == bytes(req.path)

    def _place(self, req, path, out, origin) -> Changed:
        """A create origin sent behind: the file made ahead for it
        (tmpfiles) linked in at path, its owner and mode as a create's, its
        times those the node gave its kernel.  One that comes after its
        directory's delegation was taken from the node (stopped or cut off
        past its lease) is made all the same if the name is free, as a slow
        create would have been: its data is nowhere else."""
        held = self.spares.get(origin)
        if not held or req.fh not in held:
            raise OSError(errno.EBADF, "no file made ahead for this node has that handle")
        held.discard(req.fh)  # (whatever comes of it: its node's release closes it)
        f = self._file(req.fh)
        with self.store.at(check_path(path)) as (dfd, name):
            holder = self.delegations.get(os.fstat(dfd).st_ino, origin)
            if holder != origin:  # (its queued calls are to be made first: a recall would be due)
                raise OSError(errno.ESTALE, "the directory is delegated to another node now")
            os.link(f"/proc/self/fd/{f.fd}", name, dst_dir_fd=dfd)  # (linkat, AT_SYMLINK_FOLLOW)
            try:
                _own(dfd, name, req)
                os.utime(f.fd, ns=(req.atimeNs, req.mtimeNs))
                # Its descriptor by the name now: one made with O_TMPFILE
                # keeps no path (path_of: a replica being copied reopens the
                # open files by theirs, and a create sent twice finds it so).
                fd = _fs.openat2(dfd, name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0, 0)
                os.close(f.fd)
                f.fd = fd
                dino = self._post_op(dfd, out, origin)
            except OSError:
                _undo(dfd, name)
                raise
            _identity(out.attr, stat.S_IFREG, dfd, name)
        st = os.fstat(f.fd)
        fill_attr(out.attr, st)
        out.fh = req.fh
        self._seen(origin, st.st_ino)
        self._data_changed(st.st_ino)
        return Changed(dirs=[dino])

    async def behind(self, req, path, out, origin) -> None:
        """Creates, writes, setattrs and releases a node sent behind on
        files it made in a directory delegated to it (drvs/fs/client.py
        VmFs.create, write), each made in order as that call alone -- told,
        mirrored and failing (its status) on its own."""
        lock = self.behind_order.setdefault(origin, trio.Lock())
        async with lock:  # (a node's calls in the order it sent them, also one sent again)
            await self._behind(req, out, origin)

    async def _behind(self, req, out, origin) -> None:
        statuses = []
        for call in req.calls:
            try:
                # (this node's own client's come as dicts: it finds this server here after a fail-over)
                ctype, payload = (call["type"], call["request"]) if isinstance(call, dict) else (
                    call.type, bytes(call.request))
                sub = from_flat(fs.FsRequest, payload)
                if ctype not in BEHIND_CALLS or not sub.fh or ctype != Call.create and sub.path:
                    raise OSError(errno.EINVAL, f"call type {ctype} is not one sent behind on a handle")
                if ctype == Call.create and self._placed(sub, origin):
                    statuses.append(0)  # (a call sent again: this create was made)
                    continue
                sub_out = LocalReply(self.epoch)
                await self._serve(ctype, sub, bytes(sub.path), sub_out, origin, payload, seq=req.seq)
                if ctype == Call.write and sub_out.size < len(sub.data):  # (its writer was told all went)
                    raise OSError(errno.ENOSPC, "a write sent behind was cut short")
            except OSError as e:
                statuses.append(-(e.errno or errno.EIO))
                continue
            except Exception:  # noqa: BLE001 - malformed input from the wire, or a bug: this call fails
                log.exception("fs@%s: a call sent behind by %s", self.vm, origin)
                statuses.append(-errno.EIO)
                continue
            statuses.append(0)
        out.statuses = statuses

    def _behind_ok(self, dino: int, origin: str) -> bool:
        """Whether origin may write a file it just made in directory dino
        behind (FsReply.behindBytes): dino is delegated to it, no close
        waits for the replicas, and the store is roomy."""
        if not self.epoch or self.sync or origin == self.here or self.delegations.get(dino) != origin:
            return False
        return self._roomy()

    def _roomy(self) -> bool:
        when, roomy = self.room
        now = time.monotonic()
        if now - when > ROOM_CHECKED:
            s = self.store.statvfs()
            roomy = s.f_bavail * s.f_frsize >= BEHIND_ROOM
            self.room = (now, roomy)
        return roomy

    def _parent_of(self, path: bytes) -> int:
        """The inode of the directory path is in."""
        with self.store.at(check_path(path)) as (dfd, _):
            return os.fstat(dfd).st_ino

    def rmdir(self, req, path, out, origin) -> Changed:
        return self._remove(path, out, origin, lambda dfd, name: os.rmdir(name, dir_fd=dfd))

    def _remove(self, path, out, origin, remove, meant: int = 0) -> Changed:
        with self.store.at(check_path(path)) as (dfd, name):
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if meant and st.st_ino != meant:  # (an unlink sent behind: see VmFs.unlink)
                raise OSError(errno.ESTALE, "another file has that name now")
            kept, done = self._keep(dfd, name, st), False
            try:
                remove(dfd, name)
                done = True
            finally:
                self._kept(kept, st.st_ino, done)
            dino = self._post_op(dfd, out, origin)
        if st.st_ino in self.delegations:  # (its number may go to another directory)
            self._undelegate(st.st_ino)
        return Changed(entries=[(dino, name)], inodes=[st.st_ino], dirs=[dino], gone=self._gone(st))

    def _gone(self, st: os.stat_result) -> list[int]:
        """[its inode] if the name just removed was the object's last and
        no file here holds it open (an open file lives on: nodes caching
        its data must still hear of writes to it)."""
        if (st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode)) or any(f.ino == st.st_ino for f in self.files.values()):
            return []
        return [st.st_ino]

    def rename(self, req, path, out, origin) -> Changed:
        if req.flags & ~(_fs.RENAME_EXCHANGE | _fs.RENAME_NOREPLACE):
            # (RENAME_WHITEOUT would make a device node here, the caller's
            # CAP_MKNOD unchecked: not offered, as by NFS)
            raise OSError(errno.EINVAL, "rename flags not supported")
        path2 = check_path(bytes(req.path2))
        with self.store.at(check_path(path)) as (d1, n1), self.store.at(path2) as (d2, n2):
            moved = os.stat(n1, dir_fd=d1, follow_symlinks=False)
            try:
                replaced = os.stat(n2, dir_fd=d2, follow_symlinks=False)
            except FileNotFoundError:
                replaced = None
            kept = None if replaced is None or req.flags & _fs.RENAME_EXCHANGE else self._keep(d2, n2, replaced)
            held = None if replaced is None or req.flags & _fs.RENAME_EXCHANGE else self._hold(d2, n2, replaced)
            done = False
            try:
                _fs.renameat2(d1, n1, d2, n2, req.flags)
                done = True
            finally:
                if kept is not None:
                    self._kept(kept, replaced.st_ino, done and moved.st_ino != replaced.st_ino)
                if held is not None:
                    self._held(held, replaced.st_ino, done and moved.st_ino != replaced.st_ino)
            i1, i2 = os.stat(d1).st_ino, os.stat(d2).st_ino
        moves = [(moved.st_ino, i2, path2)] if stat.S_ISDIR(moved.st_mode) else []
        if replaced is None:
            return Changed(entries=[(i1, n1)], inodes=[moved.st_ino], dirs=[i1, i2], moves=moves)
        exchange = req.flags & _fs.RENAME_EXCHANGE
        if exchange and stat.S_ISDIR(replaced.st_mode):
            moves.append((replaced.st_ino, i1, path))
        gone = [] if exchange else self._gone(replaced)
        if not exchange and replaced.st_ino in self.delegations and replaced.st_ino != moved.st_ino:
            self._undelegate(replaced.st_ino)  # (a directory replaced: its number may come back)
        return Changed(entries=[(i1, n1), (i2, n2)], inodes=[moved.st_ino, replaced.st_ino], dirs=[i1, i2],
                       gone=gone, moves=moves)

    def link(self, req, path, out, origin) -> Changed:
        path2 = check_path(bytes(req.path2))
        with self.store.at(check_path(path)) as (d1, n1), self.store.at(path2) as (d2, n2):
            os.link(n1, n2, src_dir_fd=d1, dst_dir_fd=d2, follow_symlinks=False)
            st = os.stat(n2, dir_fd=d2, follow_symlinks=False)
            dino = self._post_op(d2, out, origin)
            _identity(out.attr, st.st_mode, d2, n2)
        self._seen(origin, st.st_ino)
        fill_attr(out.attr, st)
        return Changed(inodes=[st.st_ino], dirs=[dino])

    def flush(self, req, path, out, origin) -> Changed | None:
        f = self._file(req.fh)
        if not f.wrote:
            return None
        f.wrote = False
        return Changed(inodes=[f.ino], data=True)

    def release(self, req, path, out, origin) -> Changed | None:
        f = self.files.pop(req.fh, None)
        if f is None:
            return None
        held = self.spares.get(f.node)
        if held:
            held.discard(req.fh)  # (a file made ahead its node let go of)
        try:
            st = os.stat(f.fd)
        finally:
            os.close(f.fd)
        gone = self._gone(st) if st.st_nlink == 0 else []  # the last close of an unlinked file
        if f.wrote or gone:
            return Changed(inodes=[f.ino] if f.wrote else [], data=f.wrote, gone=gone)
        return None

    async def fsync(self, req, path, out, origin) -> Changed | None:
        if not req.fh:  # (a directory's: made so far, on disk here and, see _serve, on the replicas)
            fd = self.store.open(check_path(path) if path else b"", os.O_RDONLY | os.O_DIRECTORY)
            try:
                await trio.to_thread.run_sync(os.fsync, fd)  # (ext4 commits its journal up to the last change)
            finally:
                os.close(fd)
            return None
        f = self._file(req.fh)
        sync = os.fdatasync if req.flags & 1 else os.fsync
        await trio.to_thread.run_sync(sync, f.fd)  # the disk may take long; the loop serves others meanwhile
        if not f.wrote:
            return None
        f.wrote = False
        return Changed(inodes=[f.ino], data=True)

    async def syncfs(self, req, path, out, origin) -> None:
        """A program's sync(2) or syncfs(2) (FUSE has none: its node's
        supervisor asks): every change made so far, on this node's disk --
        the store's whole file system -- and, see _serve, on the replicas,
        which make this call too.  A replica waits for its disk at most
        REPLICA_SYNC_WAIT: it applies its server's calls one batch at a
        time, and a disk shared with other VMs' dirty data could hold the
        batch past the server's bound (the replica struck, copied whole
        again: any program's `sync` would do it).  The data is in its page
        cache then, and on the server's disk: no one node's loss loses it."""
        fd = self.store.open(b"", os.O_RDONLY | os.O_DIRECTORY)

        def flush():
            try:
                _fs.syncfs(fd)
            finally:
                os.close(fd)

        if self.epoch:
            await trio.to_thread.run_sync(flush)
            return
        with trio.move_on_after(REPLICA_SYNC_WAIT):  # (the thread goes on flushing, and closes fd)
            await trio.to_thread.run_sync(flush, abandon_on_cancel=True)

    def setxattr(self, req, path, out, origin) -> Changed:
        name = _xattr_name(req)
        with self._object(req, path, origin) as proc_path:
            os.setxattr(proc_path, name, bytes(req.data), req.flags)
            return Changed(inodes=[os.stat(proc_path).st_ino])

    def removexattr(self, req, path, out, origin) -> Changed:
        name = _xattr_name(req)
        with self._object(req, path, origin) as proc_path:
            os.removexattr(proc_path, name)
            return Changed(inodes=[os.stat(proc_path).st_ino])

    async def lock(self, req, path, out, origin) -> None:
        """Locks live here only: a new term's server has them back from the
        nodes (drvs/fs/locks.py)."""
        if req.lockIno:  # (a release: the file may have moved or gone since)
            ino = req.lockIno
        elif req.via:  # (a file open on the caller's node, which knows no path of it now)
            ino = self._via(req, origin).ino
        else:
            ino = self.store.lstat(check_path(path)).st_ino
        out.attr.ino = ino
        await self.lock_table.request(ino, req, out)

    async def usage(self, req, path, out, origin) -> None:
        _fill_statfs(out.statfs, self.store.statvfs())
        out.data = str(await trio.to_thread.run_sync(self.store.used_bytes)).encode()
        states = [f"{node}: {m.state}" for node, m in sorted(self.mirrors.items()) if not m.live]
        if states:
            out.replicaStates = states


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


async def _run(handler, *args):
    """A handler's result: the table holds plain functions and coroutine
    functions (those that wait for the disk or for other callers)."""
    result = handler(*args)
    return await result if inspect.isawaitable(result) else result


def _identity(a, mode: int, dfd: int, name: bytes) -> None:
    """Attributes that name an object to a node's kernel carry which object
    has that number (a hash of its file handle, in which the store's file
    system counts the number's reuses), and a directory's carry its handle:
    a node whose path to it is lost (another node moved it) names it so
    (FsRequest.at)."""
    handle = Store.handle_of(dfd, name)
    if handle:
        a.gen = generation(handle)
        if stat.S_ISDIR(mode):
            a.handle = handle


def generation(handle: bytes) -> int:
    """FUSE's generation of the object a file handle names: with the inode
    number, what the kernel tells objects apart by.  A number the store
    reuses for a new file while a node's kernel still holds the removed
    one (an unlink there not yet finished) is then a new inode there, not
    the old one with the new file's attributes set aside as older than the
    unlink's (its link count 0: link(2) failed ENOENT)."""
    return int.from_bytes(hashlib.blake2b(handle, digest_size=8).digest(), "little")


def _below(where: bytes, path: bytes) -> bytes:
    return where + b"/" + path if where and path else where or path


def _os_failure(e: OSError, path: bytes) -> Msg:
    err = e.errno or errno.EIO
    return failure(err, f"{os.strerror(err)}: {path.decode(errors='backslashreplace') or '/'}")


def _times(st: os.stat_result, req, mask: int) -> tuple[int, int]:
    return (req.atimeNs if mask & SET_ATIME else st.st_atime_ns,
            req.mtimeNs if mask & SET_MTIME else st.st_mtime_ns)


def _own(dfd: int, name: bytes, req) -> os.stat_result:
    """Give a new entry to its creator, as a local file system would: the
    caller's uid, the caller's gid or the directory's if it is setgid, and
    the mode asked for (the kernel of the caller applied its umask).  chown
    first: it clears setuid and setgid bits."""
    c = req.caller
    dir_st = os.stat(dfd)
    gid = dir_st.st_gid if dir_st.st_mode & stat.S_ISGID else c.gid
    os.chown(name, c.uid, gid, dir_fd=dfd, follow_symlinks=False)
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        mode = stat.S_IMODE(req.mode)
        if stat.S_ISDIR(st.st_mode) and dir_st.st_mode & stat.S_ISGID:
            mode |= stat.S_ISGID  # directories inherit setgid
        os.chmod(name, mode, dir_fd=dfd)
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    return st


def _kill_suidgid(fd: int) -> bool:
    """As a write by a process without CAP_FSETID does on Linux: the file
    loses setuid, and setgid if group-executable (Linux also drops a
    setgid without group execute when the writer is not in the file's
    group; that is kept here).  The store is written as root, which keeps
    them, so the client asks for it where the kernel would have
    (drvs/fs/client.py, _opened).  Whether the mode changed."""
    mode = os.fstat(fd).st_mode
    kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
    if not mode & kill:
        return False
    os.fchmod(fd, stat.S_IMODE(mode) & ~kill)
    return True


def _undo(dfd: int, name: bytes) -> None:
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
            os.rmdir(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def _xattr_name(req) -> bytes:
    name = bytes(req.name)
    if not name.startswith(XATTR_PREFIXES):
        raise OSError(errno.EOPNOTSUPP, "only user.* extended attributes")
    return name


def _reopen(fd: int, flags: int) -> int:
    """A new open file description of what fd is open on (its own flags)."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


class _Object:
    """An object of the store as a path that os.*xattr take (they have no
    dir_fd): /proc/self/fd/N of an O_PATH descriptor of it."""

    __slots__ = ("store", "path", "fd")

    def __init__(self, store: Store, path: bytes):
        self.store, self.path, self.fd = store, check_path(path), -1

    def __enter__(self) -> str:
        self.fd = self.store.open(self.path, os.O_PATH | os.O_NOFOLLOW)
        return f"/proc/self/fd/{self.fd}"

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _fill_statfs(s, v: os.statvfs_result) -> None:
    s.bsize, s.blocks, s.bfree, s.bavail = v.f_frsize, v.f_blocks, v.f_bfree, v.f_bavail
    s.files, s.ffree, s.namemax = v.f_files, v.f_ffree, min(v.f_namemax, 255)


# -- the local path's requests and replies: FsRequest's and FsReply's shape -------------

_ZERO = {"data": b"", "text": "", "bool": False, "list": ()}
_REQUEST_DEFAULTS = {f: _ZERO.get(str(fs.FsRequest.schema.fields[f].proto.slot.type.which), 0)
                     for f in fs.FsRequest.schema.fieldnames if f != "caller"}


class Caller:
    __slots__ = ("uid", "gid", "umask")

    def __init__(self, uid=0, gid=0, umask=0):
        self.uid, self.gid, self.umask = uid, gid, umask


class LocalRequest:
    """An FsRequest as a plain object (fields not given are zero)."""

    def __init__(self, vm: str, **fields):
        self.__dict__.update(_REQUEST_DEFAULTS)
        self.vm = vm
        caller = fields.pop("caller", None)
        self.caller = Caller(**caller) if caller else Caller()
        self.__dict__.update(fields)

    def fields(self) -> dict:
        """For a replica (its calls travel as FsRequest)."""
        out = {k: v for k, v in self.__dict__.items() if k != "caller" and v != ()}
        out["caller"] = {"uid": self.caller.uid, "gid": self.caller.gid, "umask": self.caller.umask}
        return out


class LocalAttr:
    __slots__ = ("ino", "mode", "nlink", "uid", "gid", "rdev", "size", "blocks", "atimeNs", "mtimeNs", "ctimeNs",
                 "handle", "gen")

    def __init__(self):
        self.ino, self.handle, self.gen = 0, b"", 0  # not filled in (as a capnp reply's defaults)


class LocalEntry:
    __slots__ = ("name", "attr")

    def __init__(self):
        self.name, self.attr = b"", LocalAttr()


class LocalStatFs:
    __slots__ = ("bsize", "blocks", "bfree", "bavail", "files", "ffree", "namemax")


class LocalReply:
    __slots__ = ("attr", "fh", "data", "size", "entries", "more", "statfs", "epoch", "shared",
                 "lockType", "lockStart", "lockEnd", "lockPid", "dirAttr", "synced", "version", "delegated",
                 "statuses", "revocations", "behindBytes", "handles", "vouched")

    def __init__(self, epoch: int):
        self.attr, self.fh, self.data, self.size, self.dirAttr = LocalAttr(), 0, b"", 0, LocalAttr()
        self.synced, self.version, self.delegated, self.statuses, self.revocations = False, 0, False, [], 0
        self.entries, self.more, self.statfs, self.epoch, self.shared = [], False, LocalStatFs(), epoch, False
        self.lockType, self.lockStart, self.lockEnd, self.lockPid, self.behindBytes = 0, 0, 0, 0, 0
        self.handles, self.vouched = [], 0

    def init(self, field: str, n: int) -> list:
        assert field == "entries"
        self.entries = [LocalEntry() for _ in range(n)]
        return self.entries
