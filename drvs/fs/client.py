"""The FUSE side of a VM's file system on one node: the kernel's requests
for STATE/dvos/fs/VM, turned into calls to the VM's file server, fs@VM.

The protocol is by path (as sshfs and NFSv2's successors learnt to keep
one): this node knows each inode's place in the tree (its directory and
name, from the lookups that gave it) and sends the path; the server owns
the tree.  Inode numbers are the server's, tagged with the VM's slot in
this node's mount and with the server's term: after a fail-over the new
server's numbers are other numbers (a replica's inodes are its own), so
they are kept apart, and every cache of the old term is dropped.  Calls
that find no server (a fail-over under way) are sent again until
CALL_TIMEOUT; a call whose answer was lost with its server may so be made
twice (a create then says EEXIST), as with NFS.  The kernel caches entries, attributes and pages for
TIMEOUT; the server tells this node (fsc@NODE, drvs/dvos/view.py) to drop
what another node changed, so the timeout only bounds a lost message.
Data read from a remote server is also kept on this node's disk
(drvs/fs/cache.py) for as long as the kernel could keep its pages."""

import collections
import contextlib
import errno
import logging
import os
import stat
import time

import pyfuse3
import trio

from ..errors import EtcdUnavailable
from ..ipc.message import IpcError, Later, Msg
from ..ipc.schema import bulk_of, from_flat, fs, new, to_flat
from .cache import DataCache
from .fallocate import COLLAPSE_RANGE, INSERT_RANGE
from .server import (DELEGATION_LEASE, SET_ATIME, SET_GID, SET_MODE, SET_MTIME, SET_SIZE, SET_UID,
                     WRITE_KILL_SUIDGID, FsServer, LocalAttr, LocalRequest)
from .store import NAME_MAX, XATTR_PREFIXES, join

log = logging.getLogger("drvmmd")
Call = fs.FsCall
TIMEOUT = 10.0        # seconds the kernel trusts entries and attributes without asking
CALL_TIMEOUT = 10.0   # a call the server does not answer within this fails (EIO, ETIMEDOUT)
ASK_AGAIN = 2.0       # a query unanswered this long is asked again, of the server etcd names now
CLOSE_DELAY = 0.05    # a close waits this long for a call to travel with (see release)
CLOSE_GIVE_UP = 60.0  # closes not delivered by then are dropped (and logged)
TAG_SHIFT = 48
MASK = (1 << TAG_SHIFT) - 1
GEN_SHIFT = 40        # below the VM's tag: the server's term (mod GENS: every node numbers a file alike)
GENS = 1 << (TAG_SHIFT - GEN_SHIFT)
SMALL = (1 << GEN_SHIFT) - 1  # a number of this term: the server's own (below BIG) ...
BIG = 1 << (GEN_SHIFT - 1)    # ... or one given to a server inode too large (see _c)
FORGOTTEN_PER_CALL = 512      # notices of dropped inodes one call takes along
NOTICE_DELAY = 1.0            # notices no call took along within this go on their own
TOLD_OF_PRUNE = 1024          # see VmFs.told_of
TOLD_OF_MAX = 1 << 16         # beyond this, every reply on its way is taken as stale instead
PRIVATE_MAX = 1 << 16         # names kept as made here in delegated directories (beyond: unlinked in line)
BEHIND_MAX = 256              # calls sent behind in one message
BEHIND_BATCH_BYTES = 1 << 20  # ... and bytes of data written
BEHIND_GATHER = 0.010         # seconds the first waits for more, unless a call waits for them (_settle)
BEHIND_QUEUED_MAX = 4 << 20   # bytes of data written behind not yet answered (beyond: in line)
SPARES_LOW = 32               # files made ahead left that ask for more ...
SPARES_ASK = 64               # ... this many
SPARES_RETRY = 10.0           # seconds before asking again a server that made none (a full disk...)
LOST_MAX = 4096               # files whose writes sent behind failed, kept until an fsync or close says so
REOPENED_MAX = 4096           # handles opened again after a server's restart, remembered for calls under way
DOUBTS_MAX = 1 << 16          # paths of files whose writes a new server may lack, kept until looked up again
RECALLED_KEPT = 10.0          # seconds a recall of a directory not (yet) delegated here is remembered
ABSENT_GRACE = 1.0            # seconds the kernel may keep a name absent after this node's reckoning
RELOOK_WAIT = 0.5             # an invalidation's reply waits at most this for moved directories' lookups
RETRY_ERRNOS = {errno.ENOENT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.EREMCHG,
                errno.ENOLINK}
NOT_DELIVERED = RETRY_ERRNOS - {errno.ECONNRESET}  # (a reset may come after the call arrived)
# Calls that change no file's attributes (see VmFs.kept); an open may truncate.
QUERIES = {Call.getattr, Call.lookup, Call.readlink, Call.read, Call.readdir, Call.statfs, Call.getxattr,
           Call.listxattr, Call.flush, Call.fsync, Call.release, Call.usage, Call.lock, Call.syncfs}


DOTS = 2  # "." and "..": the first two entries of every listing


def reply_dots(token, start_id: int, ino: int, parent: int) -> bool:
    """Hand the kernel a directory's "." and ".." (offsets 1 and 2), those
    of them at or after start_id; False if its buffer filled.  The kernel
    makes no dentry of them, so no lookup is counted (fuse_direntplus_link)."""
    for i, (name, number) in enumerate(((b".", ino), (b"..", parent))):
        if i < start_id:
            continue
        attr = pyfuse3.EntryAttributes()
        attr.st_ino, attr.st_mode = number, stat.S_IFDIR | 0o755
        if not pyfuse3.readdir_reply(token, name, attr, i + 1):
            return False
    return True


class Inode:
    """term: the server's term of writes to the file not yet fsync'ed (0:
    none): a server of a later term may never have got them."""

    __slots__ = ("cino", "parent", "name", "lookups", "open", "term", "born", "up", "handle", "gen", "shown")

    def __init__(self, cino: int, born: int):
        self.cino, self.parent, self.name, self.lookups, self.term = cino, None, b"", 0, 0
        self.open: list[Handle] = []  # its handles open here
        # Which record of its number this is, and which record of its
        # directory's its name was learned under (see VmFs.locate).
        self.born, self.up = born, -1
        self.handle = b""  # a directory's file handle on the server of this term (see VmFs.locate)
        self.gen = 0  # which object the kernel was last told has its number (see drvs/fs/server.py generation)
        self.shown = 0  # the number the kernel shows for it, if another (see VmFs._renumbered)


class Listing:
    """An open directory: the snapshot its readdirs hand to the kernel (by
    index: the offsets the kernel passes back), the inodes in it, and the
    names another node changed since (not handed out: a stale entry would
    be taken as current); told: the invalidations received when it was
    taken, None before (see _attr); still: its directory still had the
    path it was read by when its reading ended."""

    __slots__ = ("dino", "entries", "inos", "gone", "told", "still")

    def __init__(self, dino: int):
        self.dino, self.entries, self.inos, self.gone, self.told, self.still = dino, None, None, set(), None, True


class Handle:
    """behind: bytes it may still write behind (VmFs.write); queued: a
    call on it was sent behind, so its release goes behind too (after them);
    writer: it wrote (its close reports writes a new server may lack);
    flags: open(2)'s (to open it again on a server that lost it: _reopened)."""

    __slots__ = ("sfh", "cino", "wrote", "shared", "direct", "behind", "queued", "writer", "flags", "sino")

    def __init__(self, sfh: int, cino: int, direct: bool = False, flags: int = 0):
        self.sfh, self.cino, self.wrote, self.shared, self.direct = sfh, cino, False, False, direct
        self.behind, self.queued, self.writer, self.flags = 0, False, False, flags
        # The file's number on the server that last answered a call on it
        # (0: cino's term's): a restarted server's store numbers it so
        # (_reopened), though cino may be of a term before.
        self.sino = 0


class _Change:
    """One change in flight here: the invalidations seen when it began, and
    the number it drew for each inode it changes (see VmFs._changing)."""

    __slots__ = ("told", "started")

    def __init__(self, told: int):
        self.told, self.started = told, {}


class ReadReply:
    """A read's reply whose data is a view of the message it came in."""

    __slots__ = ("epoch", "data", "revocations")

    def __init__(self, epoch: int, data: memoryview, revocations: int = 0):
        self.epoch, self.data, self.revocations = epoch, data, revocations


def _copy(a) -> LocalAttr:
    t = LocalAttr()
    for field in LocalAttr.__slots__:
        setattr(t, field, getattr(a, field))
    return t


def _touched(a) -> LocalAttr:
    """Directory attributes a, their times now (a name was made or removed there)."""
    t = _copy(a)
    t.mtimeNs = t.ctimeNs = time.time_ns()
    return t


def caller(ctx) -> dict:
    return {"uid": ctx.uid, "gid": ctx.gid, "umask": ctx.umask} if ctx is not None else {}


class VmFs:
    def __init__(self, vm: str, slot: int, fabric, spawn, cache: DataCache | None = None,
                 mounted: str | None = None):
        """spawn: start a background task (dropping the kernel's caches
        cannot wait inside a request: the kernel may need what that
        request's caller holds).  cache: this node's cache of remote files'
        data (drvs/fs/cache.py), keyed by inode as the kernel numbers them.
        mounted: where this drvmmd sees the file system (see _relook)."""
        self.vm, self.fabric, self.target, self.spawn, self.cache = vm, fabric, f"fs@{vm}", spawn, cache
        self.mounted = mounted
        self.slot, self.tag = slot, slot << TAG_SHIFT
        self.made: int | None = None  # the VM definition's create revision (View: a VM made again is another)
        self.made_at = 0.0  # (trio time the View made this)
        self.inodes: dict[int, Inode] = {}
        self.births = 0  # Inode records made (their born)
        # Files written here and not fsync'ed when a new server took over,
        # by path (the new server numbers its files anew): their inodes
        # looked up again carry the doubt (Inode.term; see _doubt_unsynced).
        self.doubts: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        # Earlier terms whose servers handed over cleanly, each to the next,
        # up to the server of now: writes of those terms are not in doubt.
        self.vouched: set[int] = set()
        # Handles of a restarted server opened again here: old -> new (see _reopened).
        self.reopened: dict[int, int] = {}
        self.reopening: dict[int, trio.Event] = {}
        self.entries: dict[tuple[int, bytes], int] = {}  # (directory, name) -> inode, this node's numbers
        self.shown: dict[int, set] = {}  # a number the kernel shows -> the inodes it asks by, where not the same
        self.handles: dict[int, Handle] = {}
        self.listings: dict[int, Listing] = {}
        self.next_fh = 1
        self.root = 0          # the root's inode here (the same in every term)
        self.above = pyfuse3.ROOT_INODE  # the root's ".." (the directory the owner shows the VMs in)
        self.server_root = 0   # the root's inode on the server of this term
        self.epoch = 0         # the server's term
        self.gen = 0           # the term's part of its inode numbers here (see _new_term)
        self.big: dict[int, int] = {}  # server inodes too large for GEN_SHIFT bits -> small ones
        # Directories' attributes as the server gave them after this node's
        # last change in them (until TIMEOUT, or until the server says another
        # node changed them): the kernel drops its own after every create or
        # remove, and would otherwise ask over the network before the next.
        self.fresh: dict[int, tuple[float, object]] = {}
        # A file's attributes as the server gave them in its reply to this
        # node's last change, a write, setattr or create of that file:
        # (cino, until, self.told then, attrs), while no other call that
        # may change anything was begun here since and no news came.  The
        # kernel drops its own after each write and asks again before a
        # chown (to clear set-id bits itself): tar's two GETATTRs a file,
        # each a round trip from a node the server is not on.  Whatever
        # another node changes reaches this node (told) before that change
        # is answered, as for the kernel's own copy.
        self.kept: tuple | None = None
        # Directories this node knows every name of (it made them, or listed
        # them, and the server tells it of any other node's change in them):
        # a name not among them is absent without asking, as with an NFSv4.1
        # directory delegation; a create's lookup costs no round trip.
        # cino -> (until, names): TIMEOUT bounds it, as for what the kernel
        # caches, should an invalidation be lost.
        self.known: dict[int, tuple[float, set[bytes]]] = {}
        # Names this node's kernel may keep as absent from a directory:
        # cino -> {name: until}.  When the server says the directory changed,
        # they go with its attributes -- the server then tells this node of
        # no more names made there until it looks again (FsServer.looked).
        self.absent: dict[int, dict[bytes, float]] = {}
        self.told = 0  # invalidations received (a new term counts as one of everything)
        # cino -> self.told when an invalidation last named it (a directory
        # for its names, or an inode): a reply about it to a call begun
        # before is not kept (_stale).  Pruned of what no call in flight, or
        # listing open, began before.
        self.told_of: dict[int, int] = {}
        self.told_of_max = TOLD_OF_PRUNE  # its size that prunes it next (doubles while it stays large)
        self.all_told = 0  # self.told at the last new term: no reply to a call begun before is kept
        self.changes = 0  # changes this node began
        self.busy: dict[int, list[int]] = {}  # inode -> [its changes in flight here, changes started]
        self.closing: list[int] = []  # server handles closed here, for the next call to a remote server
        self.closer = False           # _close_soon is on its way
        self.noticer = False          # _notices_soon is on its way
        # Inodes this node dropped (its kernel forgot them, no handle is
        # open): the server stops telling this node of their changes once
        # it hears of them (FsRequest.forgotten, see _forgotten).  Each
        # notice carries its mark, the number of the last call begun here
        # when the inode was dropped; calls carry their numbers (seq), and
        # the server keeps telling this node of an inode a later call
        # showed it.  A reply to an earlier call may make the kernel cache
        # the inode again: the notice waits for those replies, and such a
        # reply cancels it (_inode).  dropped: cino -> its mark; drops:
        # (mark, cino, term), in the order dropped.
        self.dropped: dict[int, int] = {}
        self.drops: collections.deque = collections.deque()
        # Notices an open directory listing holds back (its snapshot may
        # hand the inodes to the kernel again), in order: looked at again
        # only once a listing closed or was read again (listings_gen), not
        # on every call -- an `rm -rf` of a directory of thousands, whose
        # listing stays open, would scan them all for each unlink.
        self.held_back: list = []
        self.listings_gen = self.held_gen = 0
        # Calls to the server begun here, numbered on from the clock: a
        # restarted drvmmd's calls must number above its predecessor's,
        # which the server may still remember (or receive late).
        self.begun = time.time_ns()
        self.unanswered: dict[int, int] = {}  # their numbers, until answered -> self.told when begun
        self.asking: dict[object, list] = {}  # changes waiting, see _ask_while_served: [next look, sent_to, scope]
        self.watching = False  # _watch_servers is on its way
        self.renewing = False           # _new_term is under way: numbers of two terms about
        self.reading: list[set] = []    # inodes of the directory listings being read (see _list)
        # Directories the server delegated to this node (FsReply.delegated:
        # it made them, no other node has used them since), and in each the
        # names of the files this node made there since: those it unlinks
        # at once and sends behind (see unlink).  Every other call here
        # first waits until the unlinks sent behind are answered (_settle),
        # and so does a recall, before another node's call in the directory.
        self.delegated: set[int] = set()
        self.private: dict[int, set[bytes]] = {}
        self.privates = 0             # names in private
        # Calls answered here and sent behind so far, and of those answered
        # by the server (in that order); the ones not yet sent: unlinks
        # ("u", term, path, server inode, directory, name) and creates,
        # writes, setattrs and releases of files made here ("c", term, call
        # type, its fields, inode, bytes of data, (directory, name) of a
        # create, the inode's generation) -- see unlink, create and write.
        self.enqueued = self.made_behind = 0
        self.queued: list[tuple] = []
        self.unlinking: collections.Counter = collections.Counter()  # (directory, name) of those unlinks
        self.behind_bytes = 0          # data of those writes
        # Files whose writes sent behind failed (inode -> errno): an fsync,
        # or a writer's close, of the file says so (as a failed writeback).
        self.lost: dict[tuple[int, int], int] = {}  # (inode, generation) -> errno
        self.in_line = 0               # calls begun here not sent behind (see _keep)
        # Handles of files made ahead by a server whose term ended, whose
        # creates sent behind were made again in line (see _made_again) ->
        # the handles the new server gave.
        self.handle_moves: dict[int, int] = {}
        # Files the server made ahead for this node's creates behind
        # (Call.tmpfiles): (server handle, server inode, generation), of this
        # term; the bytes each may write behind; whether one was asked for
        # (the first ask ends those a daemon before this one held).
        self.spares: list[tuple[int, int, int]] = []
        self.spare_bytes = 0
        self.refilling = False
        self.spares_asked = False
        self.spares_later = 0.0  # (trio time) no ask before this: the last one got none
        self.progress = trio.Event()   # set (and made anew) whenever made_behind grows
        self.sending = False           # _send_behind is on its way
        self.hurry = trio.Event()      # set when a call waits for the unlinks sent behind
        # The server ends a delegation it could not recall only once this
        # node's lease on it ran out: DELEGATION_LEASE after the last call
        # it answered began (see FsServer._recall_from).
        self.lease_until = 0.0
        # Directories recalled before the reply that delegated them came
        # ((term, server inode) -> trio time): that reply's delegation is void.
        self.recalled: dict[tuple[int, int], float] = {}
        self.revocations = 0  # as the server's last reply said (FsReply.revocations)

    # -- calls to the server ---------------------------------------------------------

    async def call(self, ctype, idempotent: bool = False, once: bool = False, behind: bool = False,
                   wait: bool = True, **fields):
        """once: a change not to be sent again after a failure that may have
        followed its delivery (a reset connection), only after one that
        shows it never arrived.  behind: calls sent behind (see unlink,
        write); any other call waits until those are answered, unless not
        wait (a create of a name none of them unlinks: nothing it does
        depends on them).  A call on a handle a restarted server no longer
        knows opens its file again and is made once more (_reopened)."""
        try:
            return await self._call(ctype, idempotent, once, behind, wait, fields)
        except pyfuse3.FUSEError as e:
            if e.errno != errno.EBADF or behind:
                raise
            if not await self._reopened(fields):
                if 0 < fields.get("fh", 0) and fields["fh"] >> 32 < self.epoch:
                    # The server of now lost this open file and it cannot be
                    # opened again as surely the same: the program's
                    # descriptor is sound, its file's state is gone (EBADF
                    # would say the descriptor is bad).
                    log.info("%s: an open file of term %d is lost with its server", self.target,
                             fields["fh"] >> 32)
                    raise pyfuse3.FUSEError(errno.EIO) from None
                raise
        return await self._call(ctype, idempotent, once, behind, wait, fields)

    async def _call(self, ctype, idempotent: bool, once: bool, behind: bool, wait: bool, fields: dict):
        if self.enqueued > self.made_behind and not behind and wait:
            await self._settle()
        if self.handle_moves:  # (a handle read before the wait, of a file made again meanwhile: _made_again)
            for key in ("fh", "via"):
                if fields.get(key) in self.handle_moves:
                    fields[key] = self.handle_moves[fields[key]]
        began = trio.current_time()
        if "at" in fields or "at2" in fields:
            fields["atEpoch"] = self.epoch  # (handles are of this term's server: see locate)
        if not behind:
            self.in_line += 1
            if ctype not in QUERIES:
                self.kept = None  # (it may change the kept file: a link, a rename, a truncating open...)
        self.begun += 1
        number = fields["seq"] = self.begun
        self.unanswered[number] = self.told
        try:
            r = await self._local(ctype, fields)
            if r is None:
                r = await self._remote(ctype, idempotent, fields, once)
        finally:
            # (the caller learns what the reply says before any other task
            # runs -- readdir's snapshot aside, see _forgotten -- so an
            # inode the reply makes the kernel cache cancels its notice)
            del self.unanswered[number]
        if r.epoch > self.epoch:
            await self._new_term(r.epoch)
        elif r.epoch < self.epoch:
            # A server that has yet to learn its term is over: its inode
            # numbers are not this term's, nor is what it did sure to last.
            raise pyfuse3.FUSEError(errno.ESTALE)
        if r.revocations > self.revocations:  # (the server ended delegations it could not recall)
            self.revocations = r.revocations
            self._undelegate_all()
        self.lease_until = max(self.lease_until, began + DELEGATION_LEASE)
        return r

    async def _reopened(self, fields: dict) -> bool:
        """A call's handle was refused (EBADF): if it is of an earlier term,
        and the server of now is one that lost its open files (a drvmmd
        that restarted; a replica that takes over was given them), open the
        file again by its path -- the same file, checked by its number on
        the same store -- and put the new handle in fields.  Calls on the
        handle at once wait for one reopening and take its handle."""
        old = fields.get("fh")
        if not old:
            return False
        if old in self.reopened:
            fields["fh"] = self.reopened[old]
            return True
        waiting = self.reopening.get(old)
        if waiting is not None:
            await waiting.wait()
            if old not in self.reopened:
                return False
            fields["fh"] = self.reopened[old]
            return True
        h = next((h for h in self.handles.values() if h.sfh == old), None)
        if h is None or h.queued:  # (one with calls sent behind: the queue is sent again as a whole)
            return False
        self.reopening[old] = done = trio.Event()
        try:
            await self._call(Call.getattr, True, False, True, False, {"path": b""})  # (the term of now, learned)
            was = h.sino or (h.cino & SMALL if h.cino & SMALL < BIG else 0)  # (its number on that store)
            if old >> 32 >= self.epoch or not was:
                return False
            try:
                r = await self._call(Call.open, True, False, False, True,
                                     {**self.named(h.cino), "flags": h.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)})
            except pyfuse3.FUSEError:
                return False
            if r.attr.ino != was:  # (another file has its name now, or this is another store)
                self.closing.append(r.fh)
                self._close_later()
                return False
            log.info("%s: handle %d opened again as %d (the server restarted)", self.target, old, r.fh)
            self.reopened[old] = h.sfh = fields["fh"] = r.fh
            h.sino = r.attr.ino
            if len(self.reopened) > REOPENED_MAX:
                del self.reopened[next(iter(self.reopened))]
            return True
        finally:
            del self.reopening[old]
            done.set()

    def _forgotten(self, limit: int = FORGOTTEN_PER_CALL) -> dict:
        """The notices that may go now, as FsRequest fields (none: {}):
        those whose every earlier call was answered, but for inodes a
        directory listing being read or still open here holds (readdir
        hands their entries to the kernel later, from a snapshot)."""
        if self.renewing:
            return {}
        if self.held_back and self.held_gen != self.listings_gen:  # (a listing closed: look again)
            self.drops.extendleft(reversed(self.held_back))
            self.held_back = []
        oldest = min(self.unanswered) if self.unanswered else self.begun + 1
        held = self.reading + [listing.inos for listing in self.listings.values() if listing.inos]
        inos, marks = [], []
        rescan = 4 * limit  # (held back again, at most, per call: the rest wait in order for the next)
        while self.drops and len(inos) < limit and rescan:
            mark, cino, epoch = self.drops[0]
            if mark >= oldest:
                break
            self.drops.popleft()
            if self.dropped.get(cino) != mark:
                continue  # cached again since (or dropped again later)
            if any(cino in h for h in held):
                self.held_back.append((mark, cino, epoch))
                self.held_gen = self.listings_gen
                rescan -= 1
                continue
            del self.dropped[cino]
            if epoch == self.epoch:
                inos.append(cino & SMALL)
                marks.append(mark)
        if not inos:
            return {}
        return {"forgotten": inos, "forgottenMarks": marks, "forgottenEpoch": self.epoch}

    async def _local(self, ctype, fields: dict):
        """The reply of the file server in this process, or None if it is not here."""
        server = self._local_server()
        if server is None:
            return None
        try:
            if (self.drops or self.held_back) and server.epoch == self.epoch:
                notices = self._forgotten()
                if notices:
                    server.forgotten(server.here, notices["forgotten"], notices["forgottenMarks"])
            req = LocalRequest(self.vm, **fields)
            r = server.local_fast(ctype, req)
            if r is None:
                return await server.local(ctype, req)
            return await r.finish() if isinstance(r, Later) else r
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except IpcError:
            return None  # it stopped serving meanwhile: ask where the server is now

    async def _remote(self, ctype, idempotent: bool, fields: dict, once: bool = False):
        closed, self.closing = self.closing, []
        try:
            reply = await self._send(ctype, idempotent, fields, closed, once)
        except BaseException:
            # Not delivered (or not known to be: a second release of a
            # handle is nothing, and a handle of an older term is ignored).
            if closed:
                self.closing[:0] = closed
                self._close_later()
            raise
        if reply.status < 0:
            raise pyfuse3.FUSEError(-reply.status)
        payload = reply.view()
        r = from_flat(fs.FsReply, payload)
        if ctype == Call.read:
            data = bulk_of(payload, fs.FsReply, "data")
            if data is not None:  # a large read's data, sent out of line: not copied out
                return ReadReply(r.epoch, data, r.revocations)
        return r

    async def _send(self, ctype, idempotent: bool, fields: dict, closed: list, once: bool = False) -> Msg:
        """The server's reply (a failure too), or FUSEError if there is none."""
        notices = self._forgotten() if self.drops or self.held_back else {}
        payload = to_flat(new(fs.FsRequest, vm=self.vm, closed=closed, **notices, **fields))
        deadline = trio.current_time() + CALL_TIMEOUT
        while True:
            left = deadline - trio.current_time()
            # (an idempotent call is asked again after ASK_AGAIN: a server
            # that went silent, not dead, is replaced once its lease ends,
            # and the call then goes to the new one rather than failing)
            wait = min(left, ASK_AGAIN) if idempotent else left
            try:
                if idempotent:
                    reply = await self.fabric.sendrec(self.target, Msg(ctype, payload), timeout=max(wait, 0.1),
                                                      idempotent=True)
                else:
                    reply = await self._ask_while_served(Msg(ctype, payload), wait)
                    if reply is None:  # another node serves now: the call goes there (see _ask_while_served)
                        if once:
                            log.info("%s: its server went silent; a change it may have made is not made again",
                                     self.target)
                            raise pyfuse3.FUSEError(errno.ETIMEDOUT)
                        continue
                if reply.status != -errno.EREMCHG:
                    break
                err = IpcError(reply.error, errno.EREMCHG)
            except IpcError as e:
                err = e
            except EtcdUnavailable as e:  # (where the server is: not known here, and etcd away)
                err = IpcError(str(e), errno.ENOLINK)
            if idempotent and err.errno == errno.ETIMEDOUT and deadline - trio.current_time() >= 0.3:
                getattr(self.fabric, "locations", {}).pop(self.target, None)  # (where it is: asked of etcd again)
                continue
            if err.errno not in RETRY_ERRNOS or left < 0.3 or (once and err.errno not in NOT_DELIVERED):
                log.info("%s: %s", self.target, err)
                raise pyfuse3.FUSEError(errno.ETIMEDOUT if err.errno in (errno.ETIMEDOUT, errno.ENOENT)
                                        else errno.EIO)
            await trio.sleep(0.2)  # no server now (a fail-over): ask again
        return reply

    async def _ask_while_served(self, msg: Msg, wait: float) -> "Msg | None":
        """A change sent to the server, waited for up to wait seconds while
        etcd still names the node it went to; None once it names another
        (the server went silent and a replica took over: the change is
        then sent to the new server, as after a reset connection, rather
        than failing when the silent one's time is up; the new server
        answers it as made if the silent one made and streamed it, see
        FsServer.done).  Not sent twice to one server: a slow one would
        only be given more to read.  One task watches all such calls of
        this file system (_watch_servers): a nursery and a task of its
        own cost each call more than 100 us here."""
        resolve = getattr(self.fabric, "resolve", None)
        if resolve is None or wait <= ASK_AGAIN:
            return await self.fabric.sendrec(self.target, msg, timeout=max(wait, 0.1))
        sent_to: list = []  # (the node it went to last: one that moved it on, EREMCHG, is not where it waits)
        scope = trio.CancelScope()
        key = object()
        self.asking[key] = [trio.current_time() + ASK_AGAIN, sent_to, scope]
        try:
            if not self.watching:
                self.spawn(self._watch_servers, resolve)
                self.watching = True
            with scope:
                return await self.fabric.sendrec(self.target, msg, timeout=wait, sent_to=sent_to)
            return None  # (_watch_servers: another node serves now)
        finally:
            del self.asking[key]

    async def _watch_servers(self, resolve) -> None:
        """While changes wait (_ask_while_served): every ASK_AGAIN seconds
        of a change's wait, where the server is now, as etcd says; the
        changes sent to another node than that are called off, to go to
        the new server.  (Changes are added with their first look the
        furthest off: the watch sleeps until the nearest.)"""
        try:
            while self.asking:
                await trio.sleep_until(min(a[0] for a in self.asking.values()))
                now_t = trio.current_time()
                due = [a for a in self.asking.values() if a[0] <= now_t]
                if not due:
                    continue
                for a in due:
                    a[0] = now_t + ASK_AGAIN
                try:
                    now = await resolve(self.target, fresh=True)
                except (IpcError, EtcdUnavailable):
                    continue  # (none named now: a fail-over under way)
                except Exception as e:  # noqa: BLE001 - etcd's odd answer: the calls wait on, the mount stays
                    log.info("%s: where it is served: %s", self.target, e)
                    continue
                for _, sent_to, scope in due:
                    if sent_to and now.node != sent_to[-1]:
                        scope.cancel()
        finally:
            self.watching = False

    def _local_server(self) -> FsServer | None:
        """The file server itself when it runs in this process: its calls
        take the local path (the same code, no message)."""
        server = getattr(self.fabric.handlers.get(self.target), "__self__", None)
        return server if isinstance(server, FsServer) and server.epoch and not server.stale else None

    async def start(self) -> pyfuse3.EntryAttributes:
        """The root's attributes (and the server's answer that it serves)."""
        since = self.told
        r = await self.call(Call.getattr, idempotent=True, path=b"")
        if not self.root:
            self.server_root, self.root = r.attr.ino, r.attr.ino & ((1 << GEN_SHIFT) - 1)
        node = self._inode(self.root)
        node.parent = None
        node.lookups += 1
        return self._attr(r.attr, since)

    async def _new_term(self, epoch: int) -> None:
        """The server changed: what the kernel caches came from the old one.
        Inodes known keep their place in the tree (their paths still serve)."""
        old = self.epoch
        self.epoch = epoch
        if not old:
            self.gen = epoch % GENS
            return
        self.renewing = True
        self._undelegate_all()  # (the new server delegated nothing: nothing more goes behind)
        self.spares.clear()  # (the old server's)
        # Until the new server says what it vouches for, nothing is: an fsync
        # answered meanwhile must not take a doubt for vouched by the old one.
        vouched, self.vouched = self.vouched, set()
        try:
            # (behind: not waiting for the calls sent behind, as this may
            # be for the reply to one of them)
            r = await self.call(Call.getattr, idempotent=True, behind=True, path=b"")  # the new server's root
        except pyfuse3.FUSEError:
            self.epoch, self.vouched = old, vouched  # the next reply of this term tries again
            raise
        finally:
            self.renewing = False
        self.dropped.clear()  # (the new server never heard of what this node cached)
        self.drops.clear()
        self.held_back = []
        self.vouched = vouched | {old} if r.vouched and r.vouched == old else set()
        self._doubt_unsynced(epoch)
        for node in self.inodes.values():
            node.handle = b""  # (the new server's store is another file system)
        for listing in self.listings.values():  # snapshots of the old server: read again
            listing.entries = listing.inos = None
        self._listings_changed()
        # The term's numbers, as every node has them (a jump of a multiple of
        # GENS terms still gives other numbers than the last term's here).
        self.gen = epoch % GENS if epoch % GENS != self.gen else (self.gen + 1) % GENS
        self.told += 1  # (replies of the old server still on their way are not kept)
        self.all_told = self.told
        self.told_of.clear()
        self.big.clear()
        self.fresh.clear()
        self.kept = None
        self.revocations = 0
        self.recalled = {k: t for k, t in self.recalled.items() if k[0] >= epoch}
        self.known.clear()
        self.server_root = r.attr.ino
        log.info("%s: a new server (term %d); dropping this node's caches", self.target, epoch)
        entries = [(self.tag | dino, name) for dino, name in self.entries]
        now = trio.current_time()
        entries += [(self.tag | dino, name) for dino, names in self.absent.items()
                    for name, until in names.items() if until > now - ABSENT_GRACE]
        self.entries, self.absent = {}, {}
        if self.cache is not None:
            slot = self.tag >> TAG_SHIFT
            self.cache.drop_where(lambda key: key >> TAG_SHIFT != slot)
        self.spawn(self._drop_all, entries, [self.tag | cino for cino in self.inodes])

    def _doubt_unsynced(self, epoch: int) -> None:
        """Files written here and not fsync'ed under an earlier server,
        whose writes the new one (epoch) may never have had: their next
        fsync, or a writer's close, reports EIO once (_durable, flush).
        The kernel is about to drop these inodes and will look their names
        up again, as other numbers: the doubt goes by path (_learn gives it
        to the new inode), as Linux keeps a failed writeback's error with
        the file, not with the descriptor."""
        for node in self.inodes.values():
            if self._in_doubt(node.term, epoch):
                try:
                    at, path = self.locate(node.cino)
                except pyfuse3.FUSEError:
                    continue  # (no path known: its open handles still say it, by node.term)
                if not at:
                    self.doubts[path] = node.term
                    self.doubts.move_to_end(path)
        if len(self.doubts) > DOUBTS_MAX:
            log.warning("%s: %d files written here not fsync'ed at the change of server; the first fsync of the "
                        "%d written longest ago will not say so", self.target, len(self.doubts),
                        len(self.doubts) - DOUBTS_MAX)
        while len(self.doubts) > DOUBTS_MAX:
            self.doubts.popitem(last=False)

    def _path_of(self, dino: int, name: bytes) -> bytes | None:
        """name's path in directory dino, if this node knows it by path."""
        try:
            at, path = self.locate(dino)
        except pyfuse3.FUSEError:
            return None
        return None if at else join(path, name)

    def _undoubt(self, dino: int, name: bytes) -> None:
        """This node removed or replaced name in dino, or made a file there
        (none was): a doubt about the file there is not the next file's."""
        if self.doubts and (path := self._path_of(dino, name)) is not None:
            self.doubts.pop(path, None)

    def _move_doubts(self, src: bytes | None, dst: bytes | None, exchange: bool) -> None:
        """A rename of src to dst here (paths; None: not known by path): the
        doubts about what was at src, and below it, go to dst; what dst held
        goes to src (exchange) or is gone."""
        if not self.doubts or src is None or dst is None:
            return
        def under(top):
            return {p: t for p, t in self.doubts.items() if p == top or p.startswith(top + b"/")}
        moving, staying = under(src), under(dst)
        for p in (*moving, *staying):
            del self.doubts[p]
        for p, t in moving.items():
            self.doubts[dst + p[len(src):]] = t
        if exchange:
            for p, t in staying.items():
                self.doubts[src + p[len(dst):]] = t

    @staticmethod
    async def _drop_all(entries: list, inodes: list) -> None:
        for dino, name in entries:
            pyfuse3.invalidate_entry_async(dino, name, ignore_enoent=True)
        await drop_inodes(inodes, False)

    def _sino(self, inode: int) -> int:
        """The server's number of inode (the kernel's), when it is of this
        term and known without a table (0 otherwise: not checked)."""
        cino = inode & MASK
        if self.renewing:
            return 0  # (the term changes: this node's numbers are about to)
        if cino == self.root:
            return self.server_root
        return cino & SMALL if cino >> GEN_SHIFT == self.gen and cino & SMALL < BIG else 0

    def _c(self, sino: int) -> int:
        """This node's number for the server's inode sino, in this term."""
        if sino == self.server_root:
            return self.root
        if sino >= BIG:  # (numbers from BIG up are the ones given out below)
            sino = self.big.setdefault(sino, len(self.big) + 1 + (1 << (GEN_SHIFT - 1)))
        return (self.gen << GEN_SHIFT) | sino

    # -- this node's picture of the tree ----------------------------------------------

    def _inode(self, cino: int) -> Inode:
        node = self.inodes.get(cino)
        if node is None:
            self.births += 1
            node = self.inodes[cino] = Inode(cino, self.births)
            self.dropped.pop(cino, None)  # cached again: the server must go on telling this node
        return node

    def _learn(self, dino: int, name: bytes, attr) -> Inode:
        cino = self._c(attr.ino)
        node = self._inode(cino)
        if node.parent is not None and (node.parent, node.name) != (dino, name):
            self.entries.pop((node.parent, node.name), None)  # a hard link's latest name serves
        self._name(node, dino, name)
        if self.doubts and not node.term and (path := self._path_of(dino, name)) in self.doubts:
            node.term = self.doubts.pop(path)  # (see _doubt_unsynced)
        return node

    def _name(self, node: Inode, dino: int, name: bytes) -> None:
        """node is known here as name in directory dino, as the record of
        dino now stands (none: path() will not trust it)."""
        up = self.inodes.get(dino)
        node.parent, node.name, node.up = dino, name, -1 if up is None else up.born
        self.entries[(dino, name)] = node.cino

    def _forget_entry(self, dino: int, name: bytes) -> None:
        cino = self.entries.pop((dino, name), None)
        node = self.inodes.get(cino) if cino is not None else None
        if node is not None and (node.parent, node.name) == (dino, name):
            node.parent = None

    def locate(self, ino: int) -> tuple[bytes, bytes]:
        """Where a call finds inode ino: (b"", its path); or, below a
        directory whose path this node lost -- another node moved it (its
        invalidation undid the name here), or the name was learned in a
        directory the kernel has since forgotten -- (that directory's file
        handle, the path below it): the server finds the directory where it
        is now (FsRequest.at), as a local file system goes on in a working
        directory another process moved.  Else ESTALE: the kernel walks the
        path again, asking for each name (LOOKUP_REVAL)."""
        cino = ino & MASK
        parts, below = [], None  # below: the nearest directory with a handle walked, and its depth
        while cino != self.root:
            node = self.inodes.get(cino)
            if node is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            if node.handle:
                below = (node.handle, len(parts))
            up = self.inodes.get(node.parent) if node.parent is not None else None
            if up is None or up.born != node.up:
                # Its name is gone, or may be: learned in a directory the
                # kernel forgot since, the server stopped telling this node
                # of names there.  (Its handle, or one further down: after a
                # new term, only what the kernel looked up again has one.)
                if below is None:
                    raise pyfuse3.FUSEError(errno.ESTALE)
                handle, depth = below
                return handle, b"/".join(reversed(parts[:depth]))
            parts.append(node.name)
            cino = node.parent
        return b"", b"/".join(reversed(parts))

    @staticmethod
    def _named(loc: tuple[bytes, bytes], name: bytes | None = None, second: bool = False) -> dict:
        """A call's fields naming loc (from locate), or name in the
        directory at loc; as its second path (path2, at2) if second."""
        at, path = loc
        if name is not None:
            path = join(path, name)
        if second:
            return {"path2": path, "at2": at} if at else {"path2": path}
        return {"path": path, "at": at} if at else {"path": path}

    def named(self, ino: int, name: bytes | None = None, second: bool = False) -> dict:
        """A call's fields naming inode ino where it is now, or name in that
        directory (see locate, _named)."""
        return self._named(self.locate(ino), name, second)

    def where_open(self, inode: int) -> dict:
        """How a call names inode: by where it is (locate); or, for a file
        open here that this node knows no path of (all its names gone, or
        renamed by another node, or its directory's record of before a new
        term), as a program reaches it by /proc/PID/fd/N, {"via": a handle
        of it} -- the object the kernel named, whatever its names now (a
        lock call on a descriptor has no path the kernel could walk again).
        Else ESTALE (see locate)."""
        try:
            return self.named(inode)
        except pyfuse3.FUSEError as e:
            node = self.inodes.get(inode & MASK)
            if node is not None and node.open:
                return {"via": node.open[-1].sfh}
            # (a number of an earlier term: its record went with the term, its
            # handles stay -- a new server is given them -- see _new_term)
            h = next((h for h in self.handles.values() if h.cino == inode & MASK), None)
            if h is None:
                raise e
            return {"via": h.sfh}

    def _object(self, inode: int) -> dict:
        """As _where, but a file open here by one of its handles ({"via"}),
        as getattr names it: fchmod's, fchown's, futimens' and fsetxattr's
        object is the open file, whatever name another node gave it or
        took from it meanwhile (the news may still be on its way), and the
        server walks no path (tar sets three attributes of each file it
        has open)."""
        node = self.inodes.get(inode & MASK)
        if node is not None and node.open:
            return {"via": node.open[-1].sfh}
        return self.where_open(inode)

    async def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        """A program's fallocate(2) of a file open here (drvs/fs/fallocate.py):
        the server makes it and, before it answers, has every node -- this
        one too -- drop what its kernel holds of the file."""
        # (a range collapsed or inserted twice would move the data twice: such
        # a call is not sent again once it may have reached the server)
        r = await self.call(Call.fallocate, once=bool(mode & (COLLAPSE_RANGE | INSERT_RANGE)),
                            **self._object(inode), flags=mode, offset=offset, size=length)
        if self.cache is not None:
            self.cache.drop(inode)
        node = self.inodes.get(inode & MASK)
        if node is not None and not node.term:
            node.term = r.epoch  # (not fsync'ed yet: an fsync after a fail-over says EIO, as after a write)

    def _stale(self, since: int | None, *cinos: int) -> bool:
        """Whether a reply about these inodes, to a call begun when
        self.told was since (None: known current, no call between), may be
        older than an invalidation received meanwhile -- the server sends it
        after the reply, but on another connection, and it is made here at
        once while the reply waits for its task.  Such a reply is not for
        the kernel to keep (it asks again next time)."""
        if since is None or since == self.told:
            return False
        return since < self.all_told or any(self.told_of.get(cino, -1) > since for cino in cinos)

    def _asked(self, ino: int, loc: tuple[bytes, bytes]) -> bool:
        """Whether inode ino is still where (locate) a call about it was
        sent: if an ancestor was renamed meanwhile (by another node: its
        invalidation undid the name here; or by this one), the server may
        have answered about whatever that path named."""
        try:
            return self.locate(ino) == loc
        except pyfuse3.FUSEError:
            return False

    def _attr(self, a, since: int | None = None, dino: int | None = None,
              still: bool = True) -> pyfuse3.EntryAttributes:
        """Attributes for the kernel from a reply (see _stale), of an entry
        in directory dino if given; not to be kept unless still (_asked)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.generation = self.tag | self._c(a.ino), a.gen
        e.st_mode, e.st_nlink, e.st_uid, e.st_gid, e.st_rdev = a.mode, a.nlink, a.uid, a.gid, a.rdev
        e.st_size, e.st_blocks, e.st_blksize = a.size, a.blocks, 4096
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = a.atimeNs, a.mtimeNs, a.ctimeNs
        stale = not still or self._stale(since, self._c(a.ino), *(() if dino is None else (dino,)))
        e.entry_timeout = e.attr_timeout = 0 if stale else TIMEOUT
        if self.cache is not None and self.cache.files:
            self.cache.seen(e.st_ino, a.size, a.mtimeNs)
        return e

    def _entry(self, dino: int, name: bytes, a, since: int, still: bool) -> pyfuse3.EntryAttributes:
        self._held(dino, name, a, still)
        return self._attr(a, since, dino, still)

    def _held(self, dino: int, name: bytes, a, still: bool) -> None:
        """The kernel holds a's inode now, as name in directory dino -- a
        name not filed if the directory's path changed while it was asked
        (still false): the path asked may have led to another directory
        (this node renamed it meanwhile), so a's path stays unknown (ESTALE:
        the kernel looks again) rather than wrong."""
        node = self._learn(dino, name, a) if still else self._inode(self._c(a.ino))
        node.lookups += 1
        node.gen = a.gen
        if a.handle:
            node.handle = bytes(a.handle)

    # -- the kernel's requests -----------------------------------------------------------

    async def lookup(self, parent, name, ctx=None):
        dino = parent & MASK
        if name == b".":
            e = await self.getattr(parent, ctx)
            node = self._inode(e.st_ino & MASK)
            node.lookups += 1  # (the kernel counts every lookup it is answered)
            e.generation = node.gen  # (a getattr's reply says none)
            return e
        if len(name) > NAME_MAX:  # (before a listing known whole calls it absent)
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        since = self.told
        if name == b"..":
            node = self.inodes.get(dino)
            up = node.parent if node is not None and node.parent is not None else self.root
            r = await self.call(Call.getattr, idempotent=True, **self.named(self.tag | up))
            node = self._inode(self._c(r.attr.ino))
            node.lookups += 1
            e = self._attr(r.attr, since)
            e.generation = node.gen  # (a getattr's reply says none)
            return e
        absent = self._absent(dino, name)
        if absent:
            self._gave_absent(dino, name, absent)
            neg = pyfuse3.EntryAttributes()
            neg.st_ino, neg.entry_timeout = 0, absent
            return neg
        where = self.locate(parent)
        try:
            r = await self.call(Call.lookup, idempotent=True, **self._named(where, name))
            if self._stale(since, self._c(r.attr.ino)) and self._other_object(r.attr):
                # Its number went to another object meanwhile, which the
                # kernel holds: it would take that one's inode for a stale
                # one.  What the name holds now, instead:
                since = self.told
                r = await self.call(Call.lookup, idempotent=True, **self._named(where, name))
        except pyfuse3.FUSEError as e:
            if e.errno != errno.ENOENT:
                raise
            self._forget_entry(dino, name)
            neg = pyfuse3.EntryAttributes()
            # The server tells this node when it appears -- unless it did
            # while this was answered, or the directory has a number of an
            # older term (the new server's invalidations never name it).
            kept = (not self._stale(since, dino) and self._asked(parent, where)
                    and (dino == self.root or dino >> GEN_SHIFT == self.gen))
            neg.st_ino, neg.entry_timeout = 0, TIMEOUT if kept else 0
            if kept:
                self._gave_absent(dino, name, TIMEOUT)
            return neg
        return self._entry(dino, name, r.attr, since, self._asked(parent, where))

    def _other_object(self, a) -> bool:
        """Whether the kernel holds another object by a's number (see
        drvs/fs/server.py generation)."""
        node = self.inodes.get(self._c(a.ino))
        return node is not None and node.lookups > 0 and node.gen != a.gen

    def _kept_attr(self, until: float, a) -> "pyfuse3.EntryAttributes | None":
        """Attributes this node kept (self.kept, self.fresh) for the kernel
        until then, or None once that passed; the kernel's copy expires
        with ours."""
        left = until - trio.current_time()
        if left <= 0:
            return None
        e = self._attr(a)
        e.attr_timeout = left
        return e

    async def getattr(self, inode, ctx=None):
        return self._renumbered(inode, await self._getattr(inode))

    def _numbered(self, cino: int, sino: int) -> None:
        """The server of now numbers inode cino's file sino: so its handles
        here know it (see Handle.sino)."""
        node = self.inodes.get(cino)
        if node is not None and sino:
            for h in node.open:
                h.sino = sino

    def _renumbered(self, inode: int, e: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """Attributes of an inode the kernel holds, given to it: it takes
        their number as the inode's own (i_ino), which a new term changed
        -- fstat, /proc/PID/fdinfo and /proc/locks show the new one, while
        the kernel still asks by the old.  Kept (shown), so that a
        program's lock call, named by fdinfo's number, finds the record
        (see kernel_inode)."""
        cino, now = inode & MASK, e.st_ino & MASK
        node = self.inodes.get(cino)
        if node is not None and node.shown != (now if now != cino else 0):
            self._unshow(node)
            if now != cino:
                node.shown = now
                self.shown.setdefault(now, set()).add(cino)
        return e

    def _unshow(self, node: Inode) -> None:
        if node.shown:
            those = self.shown.get(node.shown)
            if those is not None:
                those.discard(node.cino)
                if not those:
                    del self.shown[node.shown]
            node.shown = 0

    def kernel_inode(self, ino: int) -> int:
        """An inode the kernel asks by, of the file it shows as ino
        (fdinfo's, /proc/locks'): see _renumbered.  (Any of them: the
        kernel may hold several, one per term, all of that one file.)"""
        cino = ino & MASK
        if cino not in self.inodes:
            those = self.shown.get(cino)
            if those:
                cino = next(iter(those))
        return self.tag | cino

    def shows(self, ino: int) -> int:
        """The number the kernel shows for inode ino now (see _renumbered)."""
        node = self.inodes.get(ino & MASK)
        return self.tag | node.shown if node is not None and node.shown else ino

    async def _getattr(self, inode):
        kept = self.kept
        if kept is not None and kept[0] == inode & MASK and kept[2] == self.told:
            e = self._kept_attr(kept[1], kept[3])
            if e is not None:
                return e
        fresh = self.fresh.get(inode & MASK)
        if fresh is not None:
            e = self._kept_attr(*fresh)
            if e is not None:
                return e
            del self.fresh[inode & MASK]
        node, since = self.inodes.get(inode & MASK), self.told
        if node is not None and node.open:  # also after the file was unlinked
            r = await self.call(Call.getattr, idempotent=True, fh=node.open[-1].sfh)
            self._numbered(inode & MASK, r.attr.ino)
            return self._attr(r.attr, since)
        where = self.locate(inode)
        r = await self._query(Call.getattr, inode & MASK, where)
        still = self._asked(inode, where)
        if inode & MASK in self.delegated and still and not self._stale(since, inode & MASK):
            self._fresh(inode & MASK, r.attr)
        return self._attr(r.attr, since, still=still)

    def _fresh(self, dino: int, a) -> None:
        """Keep the attributes of a directory delegated here (self.fresh):
        the kernel asks for them after every create and remove, and the
        node's creates behind there (and unlinks) keep them as they go --
        otherwise each such ask would wait for the calls sent behind."""
        self.fresh[dino] = (trio.current_time() + TIMEOUT, a)

    async def setattr(self, inode, attr, fields, fh, ctx):
        mask = ((SET_MODE if fields.update_mode else 0) | (SET_UID if fields.update_uid else 0)
                | (SET_GID if fields.update_gid else 0) | (SET_SIZE if fields.update_size else 0)
                | (SET_ATIME if fields.update_atime else 0) | (SET_MTIME if fields.update_mtime else 0))
        args = dict(setMask=mask, mode=attr.st_mode, uid=attr.st_uid, gid=attr.st_gid, size=attr.st_size,
                    atimeNs=attr.st_atime_ns, mtimeNs=attr.st_mtime_ns)
        h = self.handles.get(fh) if fh is not None else None
        if not mask & SET_SIZE:
            e = self._setattr_behind(inode & MASK, h, mask, attr)
            if e is not None:
                return e
        where = {"fh": h.sfh} if h is not None else self._object(inode)
        if "via" in where:
            where = {"fh": where["via"]}  # (setattr takes any handle of the file)
        if mask & SET_MODE and attr.st_mode & stat.S_ISGID:
            self._undelegate(inode & MASK)  # (a setgid directory, also if this fails: see _create_behind)
        with self._changing(inode & MASK) as change, self._writing(inode if fields.update_size else None):
            number = self.in_line + 1
            r = await self.call(Call.setattr, **where, **args)
        self._keep(inode & MASK, r.attr, number, change.told)
        if mask & SET_SIZE and attr.st_size == 0:
            self._emptied(self._c(r.attr.ino))
        return self._renumbered(inode, self._attr(
            r.attr, change.told, still="path" not in where or self._asked(inode, (where.get("at", b""), where["path"]))))

    def _setattr_behind(self, cino: int, h: "Handle | None", mask: int, attr) -> "pyfuse3.EntryAttributes | None":
        """A chmod, chown or utimes of a file this node made and alone
        knows (see _behind_ok), answered here from its kept attributes and
        sent behind on one of its handles (as tar's fchown, fchmod and
        futimens: three round trips a file from a node the server is not
        on); None if it goes in line.  The kernel checked the caller's
        rights (default_permissions); a set-id file goes in line, as its
        bits may be cleared on the server."""
        node = self.inodes.get(cino)
        h = h if h is not None else (node.open[-1] if node is not None and node.open else None)
        kept = self.kept
        if (h is None or kept is None or kept[0] != cino or kept[2] != self.told
                or not self._behind_ok(node, h, 0) or kept[1] <= trio.current_time()):
            return None
        a = kept[3]
        setid = stat.S_ISUID | stat.S_ISGID
        if not stat.S_ISREG(a.mode) or a.mode & setid or mask & SET_MODE and attr.st_mode & setid:
            return None
        t = _copy(a)
        if mask & SET_MODE:
            t.mode = stat.S_IFMT(a.mode) | stat.S_IMODE(attr.st_mode)
        if mask & SET_UID:
            t.uid = attr.st_uid
        if mask & SET_GID:
            t.gid = attr.st_gid
        if mask & SET_ATIME:
            t.atimeNs = attr.st_atime_ns
        if mask & SET_MTIME:
            t.mtimeNs = attr.st_mtime_ns
        t.ctimeNs = time.time_ns()
        self.kept = (cino, kept[1], kept[2], t)
        h.queued = True
        self._enqueue(("c", self.epoch, Call.setattr,
                       dict(fh=h.sfh, setMask=mask, mode=attr.st_mode, uid=attr.st_uid, gid=attr.st_gid,
                            atimeNs=attr.st_atime_ns, mtimeNs=attr.st_mtime_ns), cino, 0, None, node.gen))
        return self._kept_attr(kept[1], t)

    def _behind_ok(self, node: "Inode | None", h: Handle, size: int) -> bool:
        """Whether a change of size bytes to node's file, through handle
        h, may be sent behind: the file was made here, in a directory still
        delegated here (no other node has looked into it since: the server
        recalls it first, and the recall waits for what was sent behind),
        under a lease still running, and not much is queued already."""
        if node is None or node.parent is None or h.direct:
            return False
        names = self.private.get(node.parent)
        return (names is not None and node.name in names and node.parent in self.delegated
                and trio.current_time() < self.lease_until
                and self.behind_bytes + size <= BEHIND_QUEUED_MAX)

    @contextlib.contextmanager
    def _writing(self, ino: int | None):
        """Around a change of the data of inode ino (None: no change) made
        here: once it is answered (or failed), what the cache holds of it
        goes, with it what any read it overlapped brought (reads in the
        meantime may see the data before it, as with any write in flight)."""
        try:
            yield
        finally:
            if self.cache is not None and ino is not None:
                self.cache.drop(ino)

    async def readlink(self, inode, ctx):
        return bytes((await self.call(Call.readlink, idempotent=True, **self.named(inode))).data)

    @contextlib.contextmanager
    def _changing(self, *cinos):
        """Around a change this node makes to these inodes: their kept
        attributes go, and a reply's post-op attributes are kept (_post_op)
        only if no other change of the directory here overlapped it (a
        slower reply would store older ones) and no invalidation came; if
        it fails, what is known of their names goes too."""
        change = _Change(self.told)
        self.changes += 1
        for cino in cinos:
            if cino is None or cino in change.started:
                continue
            self.fresh.pop(cino, None)
            b = self.busy.setdefault(cino, [0, 0])
            b[0] += 1
            b[1] += 1
            change.started[cino] = b[1]
        try:
            yield change
        except BaseException:
            # What this node knew of these directories' names may be wrong
            # (an EEXIST says so): forgotten.
            for cino in change.started:
                self.known.pop(cino, None)
            raise
        finally:
            for cino in change.started:
                b = self.busy[cino]
                b[0] -= 1
                if not b[0]:
                    del self.busy[cino]

    def _gave_absent(self, dino: int, name: bytes, timeout: float) -> None:
        names = self.absent.setdefault(dino, {})
        now = trio.current_time()
        new = name not in names
        names[name] = now + timeout
        if new and len(names) >= 1024 and not len(names) & (len(names) - 1):  # (at 1024, 2048, ...)
            for n in [n for n, until in names.items() if until <= now - ABSENT_GRACE]:
                del names[n]  # (the kernel no longer keeps it)

    def _absent(self, dino: int, name: bytes) -> float:
        """Seconds name is known absent from directory dino (0: not known)."""
        known = self.known.get(dino)
        if known is None or name in known[1]:
            return 0.0
        left = known[0] - trio.current_time()
        if left <= 0:
            del self.known[dino]
            return 0.0
        return left

    def _now_known(self, dino: int, names, change: "_Change") -> None:
        """Directory dino holds these names and no others (unless an
        invalidation came since change began: it may have been about dino
        before this node knew its number; or dino is a number of an older
        term, which the new server's invalidations never name)."""
        if self.told == change.told and (dino == self.root or dino >> GEN_SHIFT == self.gen):
            self.known[dino] = (trio.current_time() + TIMEOUT, set(names))

    def _known_add(self, dino: int, name: bytes) -> None:
        """This node made name in dino (its kernel holds it now)."""
        known = self.known.get(dino)
        if known is not None:
            known[1].add(name)
        names = self.absent.get(dino)
        if names is not None:
            names.pop(name, None)

    def _known_remove(self, dino: int, name: bytes) -> None:
        """This node removed name from dino (its kernel's entry for it is
        expired: the next lookup asks, see self.absent)."""
        known = self.known.get(dino)
        if known is not None:
            known[1].discard(name)

    def _post_op(self, dino: int, r, change: "_Change") -> None:
        a = r.dirAttr
        if (a.ino and self.told == change.told and self.busy.get(dino) == [1, change.started[dino]]
                and self._c(a.ino) == dino):
            self.fresh[dino] = (trio.current_time() + TIMEOUT, a)
        else:
            self.fresh.pop(dino, None)

    def _keep(self, cino: int, a, number: int, told: int) -> None:
        """Keep a's attributes of file cino (see self.kept), from the reply
        to this node's call number (of those in line), begun when self.told
        was told (news since then ends them, see getattr): if no other call
        was begun in line here since and a is that file's (calls sent behind
        change only files this node alone knows, whose kept attributes it
        made itself: see _write_behind)."""
        if self.in_line == number and a.ino and self._c(a.ino) == cino:
            self.kept = (cino, trio.current_time() + TIMEOUT, told, a)

    async def _make(self, ctype, parent, name, ctx, **fields):
        dino, where = parent & MASK, self.locate(parent)
        with self._changing(dino) as change:
            r = await self.call(ctype, **self._named(where, name), caller=caller(ctx),
                                wait=(dino, name) in self.unlinking, **fields)
            self._post_op(dino, r, change)
        self._known_add(dino, name)
        self._undoubt(dino, name)
        entry = self._entry(dino, name, r.attr, change.told, self._asked(parent, where))
        if ctype == Call.mkdir:
            self._now_known(self._c(r.attr.ino), (), change)
            if (r.delegated and self.recalled.pop((r.epoch, r.attr.ino), None) is None
                    and not r.attr.mode & stat.S_ISGID):  # (its files take its group: see _create_behind)
                self.delegated.add(self._c(r.attr.ino))
                self._fresh(self._c(r.attr.ino), r.attr)
        else:
            self._made_private(dino, name)
        return entry

    async def mknod(self, parent, name, mode, rdev, ctx):
        return await self._make(Call.mknod, parent, name, ctx, mode=mode, rdev=rdev)

    async def mkdir(self, parent, name, mode, ctx):
        return await self._make(Call.mkdir, parent, name, ctx, mode=mode)

    async def symlink(self, parent, name, target, ctx):
        return await self._make(Call.symlink, parent, name, ctx, data=target)

    async def link(self, inode, new_parent, new_name, ctx):
        node = self.inodes.get(inode & MASK)
        if node is not None and node.parent is not None:
            self._not_private(node.parent, node.name)  # (a name elsewhere: others may reach it)
        dino, where = new_parent & MASK, self.locate(new_parent)
        with self._changing(dino, inode & MASK) as change:  # (its link count changes)
            r = await self.call(Call.link, **self.named(inode), **self._named(where, new_name, True))
            self._post_op(dino, r, change)
        self._known_add(dino, new_name)
        self._undoubt(dino, new_name)
        return self._entry(dino, new_name, r.attr, change.told, self._asked(new_parent, where))

    async def unlink(self, parent, name, ctx):
        dino = parent & MASK
        names = self.private.get(dino)
        if names is not None and name in names:
            self._not_private(dino, name)
            cino = self.entries.get((dino, name))
            held = dino in self.delegated and trio.current_time() < self.lease_until
            sino = self._sino(self.tag | cino) if cino is not None and held else 0
            fields = self.named(parent, name) if sino else {}
            if sino and "at" not in fields:
                return self._unlink_behind(dino, name, fields["path"], sino)
        await self._remove(Call.unlink, parent, name)

    def _unlink_behind(self, dino: int, name: bytes, path: bytes, sino: int) -> None:
        """Unlink a file this node made in a directory delegated to it: no
        other node knows the file or looks into the directory (the server
        recalls the delegation first, and the recall waits for this), so
        the kernel is answered at once and the unlink sent behind, as with
        CephFS's asynchronous unlinks -- with the others queued meanwhile,
        in one call (a message costs both daemons far more CPU than an
        unlink).  Each names the inode meant, so that one sent again after
        a fail-over removes nothing else."""
        self._forget_entry(dino, name)
        self._known_remove(dino, name)
        self._unlisted(dino, name)
        self.kept = None  # (its attributes say one link: see call)
        self._touch(dino)
        self.unlinking[dino, name] += 1
        self._enqueue(("u", self.epoch, path, sino, dino, name))

    def _touch(self, dino: int) -> None:
        """A name was made or removed in dino here without the server: the
        directory's kept attributes (the kernel asks for them next) get
        their times moved."""
        fresh = self.fresh.get(dino)
        if fresh is not None:
            self.fresh[dino] = (fresh[0], _touched(fresh[1]))

    def _enqueue(self, item: tuple) -> None:
        self.queued.append(item)
        self.enqueued += 1
        if not self.sending:
            self.sending = True
            self.spawn(self._send_behind)

    async def _send_behind(self) -> None:
        """Send the queued calls, in order, those of one term and kind in
        one message, until none is left."""
        try:
            try:
                while self.queued:
                    if not self.hurry.is_set() and len(self.queued) < BEHIND_MAX:
                        # (a program removing files makes one every ~100 µs
                        # here; a message costs each daemon ~150 µs of CPU:
                        # alone, each unlink would cost the daemons its own;
                        # a file made and written, one every ~600 µs)
                        with trio.move_on_after(BEHIND_GATHER):
                            await self.hurry.wait()
                    await self._send_batch()
            finally:
                # The kernel was told these are made: made they are, also
                # when the daemon stops (each call is bounded by CALL_TIMEOUT).
                with trio.CancelScope(shield=True):
                    while self.queued:
                        await self._send_batch()
        finally:
            self.sending = False

    def _next_batch(self) -> list:
        """The queued calls that go in the next message: of the first's term
        and kind, at most BEHIND_MAX of them and BEHIND_BATCH_BYTES of data."""
        kind, term = self.queued[0][0], self.queued[0][1]
        n, size = 0, 0
        for q in self.queued:
            if q[0] != kind or q[1] != term or n == BEHIND_MAX:
                break
            if n and kind == "c" and size + q[5] > BEHIND_BATCH_BYTES:
                break
            n += 1
            size += q[5] if kind == "c" else 0
        batch, self.queued = self.queued[:n], self.queued[n:]
        return batch

    async def _send_batch(self) -> None:
        batch = self._next_batch()
        try:
            with trio.CancelScope(shield=True):
                if batch[0][0] == "u":
                    await self._unlinks(batch, batch[0][1])
                else:
                    await self._changes(batch, batch[0][1])
        finally:
            for q in batch:
                if q[0] == "u":
                    key = q[4], q[5]
                    self.unlinking[key] -= 1
                    if not self.unlinking[key]:
                        del self.unlinking[key]
                else:
                    self.behind_bytes -= q[5]
            self.made_behind += len(batch)
            self.progress.set()
            self.progress = trio.Event()
            if not self.queued:
                self.hurry = trio.Event()

    async def _unlinks(self, batch: list, term: int) -> None:
        """One call of queued unlinks; failures logged (the kernel was told
        they were made), a call a server of an ended term answered made
        again in the new one."""
        fields = dict(names=[q[2] for q in batch], inos=[q[3] for q in batch], inoEpoch=term)
        try:
            try:
                statuses = list((await self.call(Call.unlinks, behind=True, **fields)).statuses)
            except pyfuse3.FUSEError as e:
                if e.errno != errno.ESTALE:
                    raise
                statuses = list((await self.call(Call.unlinks, behind=True, **fields)).statuses)
        except pyfuse3.FUSEError as e:
            statuses = [-e.errno] * len(batch)
        except Exception:  # noqa: BLE001 - a bug here must not leave the queue stuck
            log.exception("fs@%s: unlinks sent behind", self.vm)
            statuses = [-errno.EIO] * len(batch)
        for (_, _, path, _, dino, _), st in zip(batch, statuses):
            if st >= 0 or st == -errno.ENOENT:  # (ENOENT: made twice across a fail-over)
                continue
            # (ESTALE: the name is another file's now)
            log.warning("fs@%s: unlink of %r sent behind: %s", self.vm, path, os.strerror(-st))
            self.known.pop(dino, None)
            self.fresh.pop(dino, None)

    async def _changes(self, batch: list, term: int) -> None:
        """One call of queued creates, writes, setattrs and releases
        (Call.behind).  Those of an ended term go to the new server (it
        took over the old one's handles with its replica), their creates
        made again in line first (_made_again); and so do those of a batch
        a new server answered that failed there (the old one died with the
        batch, maybe before making them).  A failure is kept for the file's
        next fsync or writer's close to say (and logged)."""
        statuses = {i: -errno.EIO for i in range(len(batch))}
        todo = list(enumerate(batch))
        try:
            for _ in range(2):
                epoch = self.epoch
                if term != epoch:
                    todo = await self._made_again(todo, statuses)
                if self.handle_moves:
                    todo = [(i, self._rehandled(q)) for i, q in todo]
                calls = [{"type": q[2], "request": to_flat(new(fs.FsRequest, vm=self.vm, **q[3]))} for _, q in todo]
                stale = False
                try:
                    got = list((await self.call(Call.behind, behind=True, calls=calls)).statuses) if calls else []
                except pyfuse3.FUSEError as e:
                    got, stale = [], e.errno == errno.ESTALE  # (ESTALE: a server whose term is over answered)
                    statuses.update((i, -e.errno) for i, _ in todo)
                statuses.update((i, st) for (i, _), st in zip(todo, got))
                if self.epoch == epoch and not stale:
                    break
                # Again, what failed -- and the releases of files made again
                # (the new server took theirs for unknown handles: nothing)
                todo = [(i, q) for i, q in todo
                        if statuses[i] < 0 or q[2] == Call.release and q[3]["fh"] in self.handle_moves]
        except Exception:  # noqa: BLE001 - a bug here must not leave the queue stuck
            log.exception("fs@%s: calls sent behind", self.vm)
        for i, q in enumerate(batch):
            st = statuses[i]
            if st >= 0 or q[2] == Call.release:
                continue
            log.warning("fs@%s: a %s of inode %d sent behind: %s", self.vm, {Call.write: "write", Call.create:
                        "create"}.get(q[2], "setattr"), q[4], os.strerror(-st))
            if q[6] is not None:  # (a create: the name is not there)
                self._create_failed(*q[6])
            self._lose(q[4], q[7], -st)

    async def _made_again(self, todo: list, statuses: dict) -> list:
        """Calls of an ended term, (index, call), for the new server: their
        creates made in line there now (a file made ahead by the old server
        is not on the new one; one the old server made had its handle
        copied to the replica: EEXIST) and taken out, their statuses set,
        the handles they gave put in later calls (handle_moves) and in the
        node's own handles.  Once the new server does not answer, the
        others fail at once (the daemon may be stopping)."""
        left, down = [], False
        for i, q in todo:
            if q[2] != Call.create:
                left.append((i, q))
                continue
            f = q[3]
            try:
                if down:
                    raise pyfuse3.FUSEError(errno.EIO)
                r = await self.call(Call.create, behind=True, path=f["path"], flags=f["flags"] | os.O_EXCL,
                                    mode=f["mode"], caller=f["caller"], atimeNs=f["atimeNs"], mtimeNs=f["mtimeNs"])
            except pyfuse3.FUSEError as e:
                statuses[i] = 0 if e.errno == errno.EEXIST else -e.errno
                down |= e.errno in (errno.EIO, errno.ETIMEDOUT)
                continue
            statuses[i] = 0
            if len(self.handle_moves) >= LOST_MAX:
                self.handle_moves.pop(next(iter(self.handle_moves)))
            self.handle_moves[f["fh"]] = r.fh  # (kept: handle numbers are never the same in two terms)
            for h in self.handles.values():
                if h.sfh == f["fh"]:
                    h.sfh = r.fh
        return left

    def _rehandled(self, q: tuple) -> tuple:
        fh = self.handle_moves.get(q[3]["fh"])
        return q if fh is None else q[:3] + (dict(q[3], fh=fh),) + q[4:]

    def _create_failed(self, dino: int, name: bytes) -> None:
        """A create answered here is not on the server: its name goes."""
        self.known.pop(dino, None)
        self.fresh.pop(dino, None)
        self._forget_entry(dino, name)
        self.spawn(_drop_entry, self.tag | dino, name)

    def _lose(self, cino: int, gen: int, err: int) -> None:
        """A call sent behind on file (cino, gen) failed: its next fsync
        or writer's close says so (kept by generation too: the number may
        be another file's by then), and what this node told its kernel of
        the file goes."""
        if len(self.lost) >= LOST_MAX:
            self.lost.pop(next(iter(self.lost)))
        self.lost.setdefault((cino, gen), err)
        if self.kept is not None and self.kept[0] == cino:
            self.kept = None
        self.spawn(drop_inodes, [self.tag | cino], True)

    def _lost(self, cino: int) -> int:
        """The failure kept for open file cino (0: none), forgotten once said."""
        node = self.inodes.get(cino)
        return self.lost.pop((cino, node.gen if node is not None else 0), 0) if self.lost else 0

    async def _settle(self) -> None:
        """Until the unlinks queued before this are answered (those queued
        later are not waited for: a program removing files on and on does
        not hold the others up)."""
        mark = self.enqueued
        if self.made_behind >= mark:
            return
        self.hurry.set()
        while self.made_behind < mark:
            await self.progress.wait()

    async def recall(self, dirs, epoch: int) -> None:
        """The server takes these directories back (another node uses them):
        answered once the unlinks sent behind are made (those after this
        began are made in line)."""
        now = trio.current_time()
        for dino in dirs:
            cino = self._c(dino) if epoch == self.epoch else None
            if cino is not None and cino in self.delegated:
                self._undelegate(cino)
            elif epoch >= self.epoch:  # (the reply that delegates it is still on its way)
                self.recalled[epoch, dino] = now
        if len(self.recalled) > 64:
            self.recalled = {k: t for k, t in self.recalled.items() if t > now - RECALLED_KEPT}
        await self._settle()

    def _undelegate(self, cino: int) -> None:
        self.delegated.discard(cino)
        self.privates -= len(self.private.pop(cino, ()))

    def _undelegate_all(self) -> None:
        self.delegated.clear()
        self.private.clear()
        self.privates = 0

    def _made_private(self, dino: int, name: bytes) -> None:
        if dino in self.delegated and self.privates < PRIVATE_MAX:
            names = self.private.setdefault(dino, set())
            if name not in names:
                names.add(name)
                self.privates += 1

    def _not_private(self, dino: int, name: bytes) -> None:
        names = self.private.get(dino)
        if names is not None and name in names:
            names.discard(name)
            self.privates -= 1

    async def rmdir(self, parent, name, ctx):
        cino = self.entries.get((parent & MASK, name))
        await self._remove(Call.rmdir, parent, name)
        if cino is not None:
            self._undelegate(cino)

    async def _remove(self, ctype, parent, name) -> None:
        dino, cino = parent & MASK, self.entries.get((parent & MASK, name))
        with self._changing(dino, cino) as change:
            r = await self.call(ctype, **self.named(parent, name))
            self._post_op(dino, r, change)
        self._forget_entry(dino, name)
        self._known_remove(dino, name)
        self._unlisted(dino, name)
        self._undoubt(dino, name)
        self.known.pop(cino, None)  # a directory removed: its number may come back as another

    async def rename(self, old_parent, old_name, new_parent, new_name, flags, ctx):
        if flags & ~(pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE):
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_WHITEOUT (see FsServer.rename)
        d1, d2 = old_parent & MASK, new_parent & MASK
        self._not_private(d1, old_name)
        self._not_private(d2, new_name)
        paths = (self._path_of(d1, old_name), self._path_of(d2, new_name)) if self.doubts else (None, None)
        with self._changing(d1, d2, self.entries.get((d1, old_name)), self.entries.get((d2, new_name))):
            await self.call(Call.rename, **self.named(old_parent, old_name),
                            **self.named(new_parent, new_name, True), flags=flags)
        if not flags & pyfuse3.RENAME_EXCHANGE:
            self._known_remove(d1, old_name)
        self._known_add(d2, new_name)
        self._unlisted(d1, old_name)
        self._unlisted(d2, new_name)
        moved = self.entries.pop((d1, old_name), None)
        replaced = self.entries.pop((d2, new_name), None)
        if flags & pyfuse3.RENAME_EXCHANGE and replaced is not None:
            self._place(replaced, d1, old_name)
        elif replaced is not None:
            self.known.pop(replaced, None)
            self._undelegate(replaced)
            if replaced in self.inodes:
                self.inodes[replaced].parent = None
        if moved is not None:
            self._place(moved, d2, new_name)
        self._move_doubts(*paths, bool(flags & pyfuse3.RENAME_EXCHANGE))

    def _unlisted(self, dino: int, name: bytes) -> None:
        """This node removed name from dino, or gave it to another object: a
        listing of dino read before must not hand out the old entry (the
        server tells other nodes, not this one).  Its number may be a new
        file's already, with another generation: the kernel would take the
        new file's inode for a stale one (EIO for whoever holds it)."""
        for listing in self.listings.values():
            if listing.dino == dino:
                listing.gone.add(name)

    def _place(self, cino: int, dino: int, name: bytes) -> None:
        node = self.inodes.get(cino)
        if node is not None:
            self._name(node, dino, name)

    async def open(self, inode, flags, ctx):
        cached = None
        if (self.cache is not None and flags & os.O_ACCMODE != os.O_WRONLY and not flags & os.O_TRUNC
                and self._local_server() is None):
            cached = self.cache.opening(inode)
        with self._writing(inode if flags & os.O_TRUNC else None):
            where, node = self.where_open(inode), self.inodes.get(inode & MASK)
            try:
                r = await self.call(Call.open, **where, flags=flags, ino=self._sino(inode), inoEpoch=self.epoch)
            except pyfuse3.FUSEError as e:
                if e.errno == errno.EIDRM:  # (the name is gone: the kernel looks it up again, and may create it)
                    raise pyfuse3.FUSEError(errno.ESTALE) from None
                if e.errno != errno.ESTALE or "path" not in where or node is None or not node.open:
                    raise
                # The name holds another file now, and this one is open here:
                # a reopen by /proc/PID/fd/N (which no new lookup can help)
                # reaches it by a handle.
                r = await self.call(Call.open, via=node.open[-1].sfh, flags=flags)
        info = self._opened(r, flags)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            self._emptied(self._c(r.attr.ino))
        if cached is not None and self.tag | self._c(r.attr.ino) == inode:
            self.cache.opened(inode, cached, r.attr.size, r.attr.mtimeNs, (r.epoch, r.version))
        return info

    def _opened(self, r, flags: int) -> pyfuse3.FileInfo:
        cino = self._c(r.attr.ino)
        # A file opened only to write, here where its server is, bypasses
        # the kernel's pages (direct_io): a write is then one request, with
        # no copy into pages and no getxattr(security.capability) before it
        # (the kernel's check for privileges to drop, made at every cached
        # write); a read through another handle asks the server here once.
        # That check is the server's then (WRITE_KILL_SUIDGID): a file
        # set-id when opened keeps the cached path, where the kernel drops
        # the bits itself, with the caller's CAP_FSETID in view; one made
        # set-id while open this way loses them at its next write, root's
        # too.  Measured (bench/fs.py (a)): sequential write 950-1090 ->
        # 1520-1540 MB/s, tar x 0.146-0.152 -> 0.127-0.129 s.
        # A file opened to append (a log: >>, fopen's "a" and "a+"), on any
        # node, bypasses them too: through the pages, a write ending in a
        # page not read yet goes as two requests, and another node's append
        # could land between the two (the server appends each at its end of
        # file); direct, a write (up to max_write) is one request, one
        # append, as POSIX has it.  An "a+" handle then reads through the
        # server too, and cannot be mapped shared (FUSE refuses it on direct
        # handles here); one made O_APPEND later by fcntl keeps the pages.
        access = flags & os.O_ACCMODE
        direct = ((access != os.O_RDONLY and flags & os.O_APPEND
                   or access == os.O_WRONLY and self._local_server() is not None)
                  and not r.attr.mode & (stat.S_ISUID | stat.S_ISGID))
        fh, _ = self._handle(r.fh, cino, direct, flags)
        # Pages cached here stay valid until the server says another node
        # wrote (close-to-open, without rereading every file on open).
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=direct)

    def _handle(self, sfh: int, cino: int, direct: bool = False, flags: int = 0) -> tuple[int, Handle]:
        """A new open file of inode cino here, on server handle sfh: its
        number for the kernel, and it."""
        fh = self.tag | self.next_fh
        self.next_fh += 1
        h = self.handles[fh] = Handle(sfh, cino, direct, flags)
        self._inode(cino).open.append(h)
        return fh, h

    async def create(self, parent, name, mode, flags, ctx):
        made = self._create_behind(parent, name, mode, flags, ctx)
        if made is not None:
            return made
        dino, where = parent & MASK, self.locate(parent)
        with self._changing(dino) as change:
            number = self.in_line + 1
            r = await self.call(Call.create, **self._named(where, name), flags=flags, mode=mode, caller=caller(ctx),
                                wait=(dino, name) in self.unlinking)
            self._post_op(dino, r, change)
        self._keep(self._c(r.attr.ino), r.attr, number, change.told)
        self._known_add(dino, name)
        self._made_private(dino, name)
        self._undoubt(dino, name)
        entry = self._entry(dino, name, r.attr, change.told, self._asked(parent, where))
        if self.cache is not None and self.cache.files:  # (it may have opened a file this node kept pages of)
            self.cache.made(self.tag | self._c(r.attr.ino), r.attr.size, r.attr.mtimeNs, (r.epoch, r.version))
        info = self._opened(r, flags)
        self.handles[info.fh].behind = r.behindBytes
        return info, entry

    def _create_behind(self, parent: int, name: bytes, mode: int, flags: int, ctx):
        """A create in a directory delegated to this node, of a name it
        knows absent there, answered here with a file the server made ahead
        (Call.tmpfiles) and sent behind, ahead of the file's writes and
        close: no other node looks into the directory before the server
        recalls it (and the recall waits for these), as with CephFS's
        asynchronous creates.  The owner and mode are a create's (the
        directory is not setgid: see _make), the times the node's clock.
        None if it goes in line."""
        dino = parent & MASK
        if dino not in self.delegated:
            return None
        if len(self.spares) < SPARES_LOW and not self.refilling and trio.current_time() >= self.spares_later:
            self.refilling = True
            self.spawn(self._refill)
        known = self.known.get(dino)
        if (not self.spares or known is None or name in known[1] or (dino, name) in self.unlinking
                or flags & os.O_APPEND or trio.current_time() >= self.lease_until or ctx is None):
            return None
        fields = self.named(parent, name)
        if "at" in fields:
            return None
        sfh, sino, gen = self.spares.pop()
        now = time.time_ns()
        a = LocalAttr()
        a.ino, a.gen, a.mode, a.nlink, a.uid, a.gid = sino, gen, stat.S_IFREG | stat.S_IMODE(mode), 1, ctx.uid, ctx.gid
        a.rdev = a.size = a.blocks = 0
        a.atimeNs = a.mtimeNs = a.ctimeNs = now
        cino = self._c(sino)
        self._known_add(dino, name)
        self._made_private(dino, name)
        self._undoubt(dino, name)
        entry = self._entry(dino, name, a, self.told, True)
        self._touch(dino)
        if self.cache is not None:
            self.cache.drop(self.tag | cino)  # (pages of a file that had its number before)
        self.kept = (cino, trio.current_time() + TIMEOUT, self.told, a)
        fh, h = self._handle(sfh, cino, flags=flags)
        h.behind, h.queued = self.spare_bytes, True
        node = self.inodes[cino]
        node.term = node.term or self.epoch  # (not fsync'ed yet: see _durable)
        self._enqueue(("c", self.epoch, Call.create, dict(fields, fh=sfh, flags=flags, mode=mode, caller=caller(ctx),
                                                          atimeNs=now, mtimeNs=now), cino, 0, (dino, name), gen))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), entry

    async def _refill(self) -> None:
        """Ask the server for files made ahead (see _create_behind)."""
        got = 0
        try:
            epoch = self.epoch
            r = await self.call(Call.tmpfiles, behind=True, size=SPARES_ASK, flags=0 if self.spares_asked else 1)
            self.spares_asked = True
            if r.epoch == epoch == self.epoch:
                self.spares += zip(r.handles, (e.attr.ino for e in r.entries), (e.attr.gen for e in r.entries))
                self.spare_bytes = r.behindBytes
                got = len(r.handles)
        except pyfuse3.FUSEError as e:
            log.info("%s: files made ahead: %s", self.target, os.strerror(e.errno))
        finally:
            self.refilling = False
            if not got:  # (each create here would ask again: a message more for nothing)
                self.spares_later = trio.current_time() + SPARES_RETRY

    def _h(self, fh) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return h

    async def read(self, fh, off, size):
        h = self._h(fh)
        server = self._local_server()
        if server is not None and server.epoch == self.epoch:
            if self.enqueued > self.made_behind:  # (calls sent behind to the server before this one)
                await self._settle()
            try:
                return server.local_read(h.sfh, off, size)
            except OSError as e:
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        cache = self.cache
        if cache is None:
            return (await self.call(Call.read, idempotent=True, fh=h.sfh, offset=off, size=size)).data
        key = self.tag | h.cino
        data = cache.read(key, off, size)
        if data is not None:
            return data
        entry = cache.entry(key)
        data = (await self.call(Call.read, idempotent=True, fh=h.sfh, offset=off, size=size)).data
        if entry is not None and (write := cache.fill(key, entry, off, size, data)) is not None:
            self.spawn(cache.write_pages, *write)
        return data

    async def write(self, fh, off, buf):
        h = self._h(fh)
        if h.behind:
            if h.behind >= len(buf) and self._behind_ok(self.inodes.get(h.cino), h, len(buf)):
                return self._write_behind(h, off, buf)
            h.behind = 0  # (in line from now on: the call waits for those sent behind before it)
        h.wrote = h.writer = True
        with self._writing(self.tag | h.cino):
            number, told = self.in_line + 1, self.told
            r = await self.call(Call.write, fh=h.sfh, offset=off, data=buf,
                                flags=WRITE_KILL_SUIDGID if h.direct else 0)
        self._keep(h.cino, r.attr, number, told)
        h.shared = r.shared
        self._numbered(h.cino, r.attr.ino)
        node = self.inodes.get(h.cino)
        if node is not None and not node.term:
            node.term = r.epoch
        return r.size

    def _write_behind(self, h: Handle, off: int, buf: bytes) -> int:
        """A write to a file this node made in a directory delegated to it
        (see _behind_ok), answered at once and sent behind with the file's
        other calls: a create+write+close from a node the server is not on
        then waits for one round trip, the create's, not two.  The disk
        had room when the file was made (FsReply.behindBytes); a write
        that fails there all the same is reported by the file's next fsync
        (as a failed writeback) or writer's close.  The file's attributes
        are the node's own until then; its mtime goes with the data."""
        n = len(buf)
        h.behind -= n
        h.queued = h.writer = True
        now = time.time_ns()
        self.behind_bytes += n
        node = self.inodes[h.cino]
        self._enqueue(("c", self.epoch, Call.write, dict(fh=h.sfh, offset=off, data=bytes(buf), mtimeNs=now),
                       h.cino, n, None, node.gen))
        if not node.term:
            node.term = self.epoch  # (not fsync'ed yet: see _durable)
        if self.cache is not None:
            self.cache.drop(self.tag | h.cino)
        kept = self.kept
        if kept is not None and kept[0] == h.cino and kept[2] == self.told:
            t = _copy(kept[3])
            t.size = max(t.size, off + n)
            # (the pages written counted, not the whole size: a sparse file stays sparse to du; an
            # overwrite counts twice until the server's own figure comes, bounded by the size)
            pages = -(-(off + n) // 4096) - off // 4096
            t.blocks = max(t.blocks, min(t.blocks + pages * 8, (t.size + 4095) // 4096 * 8))
            t.mtimeNs = t.ctimeNs = now
            self.kept = (h.cino, kept[1], kept[2], t)
        elif kept is not None and kept[0] == h.cino:
            self.kept = None
        return n

    async def flush(self, fh):
        h = self._h(fh)
        lost = self._lost(h.cino) if h.queued else 0
        if lost:  # (a call sent behind failed: the close says so)
            raise pyfuse3.FUSEError(lost)
        # Only a writer's close has something to do, and only if other nodes
        # cache the file or closes wait for replicas (the last write's reply
        # says; a node that looks later finds the data as written).
        if h.wrote and h.shared:
            h.wrote = False
            r = await self.call(Call.flush, fh=h.sfh)
            self._durable(h, r.epoch, done=r.synced)  # (a close waits for replicas on a synchronous VM)
        elif h.writer:
            self._durable(h, self.epoch, done=False)  # (no call: the server of now is the one this node knows)

    async def release(self, fh):
        h = self.handles.pop(fh, None)
        if h is None:
            return
        node = self.inodes.get(h.cino)
        if node is not None and h in node.open:
            node.open.remove(h)
            self._maybe_drop(node)
        if h.queued:  # (after the calls sent behind on it)
            self._enqueue(("c", self.epoch, Call.release, {"fh": h.sfh}, h.cino, 0, None, 0))
            return
        if self._local_server() is not None:
            await self.call(Call.release, fh=h.sfh)
            return
        # A remote server hears of the close with this node's next call (a
        # message less per file; a writer's data went with its writes, and a
        # close that other nodes must see was its flush, already answered).
        self.closing.append(h.sfh)
        self._close_later()

    def _close_later(self) -> None:
        if not self.closer:
            self.closer = True
            self.spawn(self._close_soon)

    async def _close_soon(self) -> None:
        """Closes no other call took along within CLOSE_DELAY go on their
        own, to whichever server serves now (the local one by its handle);
        given up on after CLOSE_GIVE_UP (a server that stays away closes a
        departed node's files itself)."""
        try:
            await trio.sleep(CLOSE_DELAY)
            give_up = trio.current_time() + CLOSE_GIVE_UP
            while self.closing:
                try:
                    if self._local_server() is not None:
                        while self.closing:
                            await self.call(Call.release, fh=self.closing[0])
                            self.closing.pop(0)
                    else:
                        await self.call(Call.release, fh=0)  # (fh 0: nothing but the closes it carries)
                except pyfuse3.FUSEError as e:
                    if trio.current_time() > give_up:
                        log.info("%s: %d closes not delivered: %s", self.target, len(self.closing),
                                 os.strerror(e.errno))
                        self.closing.clear()
                    else:
                        await trio.sleep(1)
        finally:
            self.closer = False

    async def fsync(self, fh, datasync):
        h = self._h(fh)
        h.wrote = False
        r = await self.call(Call.fsync, fh=h.sfh, flags=1 if datasync else 0)
        lost = self._lost(h.cino)  # (the call waited for those sent behind)
        self._durable(h, r.epoch, done=True)
        if lost:
            raise pyfuse3.FUSEError(lost)

    async def syncfs(self) -> None:
        """A program's sync(2) or syncfs(2) here (FUSE sends the server
        none: the node's supervisor asks, drvs/dvos/supervisor.py): what
        this node sent behind is made first (call), then every change made
        so far is on the disks of the server and of the replicas in sync.
        FUSEError if not."""
        await self.call(Call.syncfs, idempotent=True)

    def _durable(self, h: Handle, epoch: int, done: bool) -> None:
        """A sync of h's file answered in term epoch: EIO if writes of an
        earlier term are in doubt (their server died before its replicas
        had them, as NFS's write verifier tells), reported once, as Linux
        reports a failed writeback."""
        node = self.inodes.get(h.cino)
        if node is None:
            return
        term = node.term
        lost = self._in_doubt(term, epoch)
        if done or lost:
            node.term = 0
        if lost:
            log.info("%s: writes of term %d to inode %d not synced may be lost (the server of term %d does "
                     "not vouch for them): EIO", self.target, term, h.cino, epoch)
            self._doubt_gone(node.cino)  # (said: not again through the inode the kernel looks up next)
            raise pyfuse3.FUSEError(errno.EIO)

    def _emptied(self, cino: int) -> None:
        """The server emptied this file, inode cino of this term (an O_TRUNC
        open, a truncation to 0): writes of an earlier term a new server
        may lack are not in doubt any more -- none of their data is left to
        miss -- so its next close or fsync does not fail for them.  (Only
        the file the server names: an inode of an earlier term that was
        opened by a name another file has now keeps its doubt.)"""
        node = self.inodes.get(cino)
        if node is not None and node.term and node.term != self.epoch:
            node.term = 0
            self._doubt_gone(cino)

    def _doubt_gone(self, cino: int) -> None:
        """No doubt is left about inode cino's file: none for its path either
        (the inode the kernel looks up next there would take it up again)."""
        if self.doubts:
            with contextlib.suppress(pyfuse3.FUSEError):
                at, path = self.locate(cino)
                if not at:
                    self.doubts.pop(path, None)

    def _in_doubt(self, term: int, epoch: int) -> bool:
        """Whether writes made in term (0: none), not fsync'ed, may be
        missing from the server of epoch: it is another, and no clean
        hand-over vouches for them (see FsServer.promote)."""
        return bool(term) and term != epoch and term not in self.vouched

    async def opendir(self, inode, ctx):
        self.locate(inode)  # ESTALE now rather than at readdir
        fh = self.tag | self.next_fh
        self.next_fh += 1
        self.listings[fh] = Listing(inode & MASK)
        return fh

    async def readdir(self, fh, start_id, token):
        listing = self.listings.get(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if listing.entries is None or start_id == 0:
            # One snapshot per open directory; what it holds may reach the
            # kernel later, and keeps its notices back (_forgotten).
            listing.gone = set()  # (before: a change told while it is read may be in it)
            listing.told = self.told
            where = self.locate(self.tag | listing.dino)
            listing.entries, listing.inos = await self._list(listing.dino)
            listing.still = self._asked(self.tag | listing.dino, where)
            self._listings_changed()  # (the snapshot it replaced held others)
        dino, gone = listing.dino, listing.gone
        node = self.inodes.get(dino)
        parent = node.parent if node is not None and node.parent is not None else dino  # (only its d_ino)
        if not reply_dots(token, start_id, self.tag | dino, self.above if dino == self.root else self.tag | parent):
            return
        for i, (name, a) in enumerate(listing.entries[max(start_id - DOTS, 0):], max(start_id, DOTS)):
            if name in gone:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(a, listing.told, dino, listing.still), i + 1):
                break
            self._held(dino, name, a, listing.still)  # readdirplus: the kernel holds what it took

    async def _list(self, dino: int) -> tuple[list, set]:
        """The directory's entries and their inodes (this node's numbers),
        in batches of the server's; the inodes of each batch keep their
        notices back from the moment it came (self.reading)."""
        out, after, inos = [], b"", set()
        change, changes = _Change(self.told), self.changes
        self.reading.append(inos)
        try:
            while True:
                r = await self._batch(dino, after)
                for e in r.entries:
                    out.append((bytes(e.name), e.attr))
                    inos.add(self._c(e.attr.ino))
                if not r.more or not r.entries:
                    break
                after = out[-1][0]
        finally:
            self.reading = [h for h in self.reading if h is not inos]  # (by identity: sets compare by content)
            self._listings_changed()
        if dino not in self.busy and self.changes == changes:  # (none of this node's own changes overlapped)
            self._now_known(dino, (name for name, _ in out), change)
        return out, inos

    async def _batch(self, dino: int, after: bytes):
        """The server's batch of directory dino's entries after name after
        (see _query: the kernel does not retry a listing, and glibc takes
        ENOENT for its end)."""
        return await self._query(Call.readdir, dino, data=after)

    async def _query(self, ctype, cino: int, loc: tuple[bytes, bytes] | None = None, **fields):
        """A query about inode cino: by its path (loc, if the caller
        located it already); by its handle (a directory's) if another node
        moved it meanwhile -- the path names another object, or nothing --
        as a local file system answers about the directory a program
        holds, wherever it went."""
        r = failed = None
        try:
            r = await self.call(ctype, idempotent=True, **self._named(loc or self.locate(self.tag | cino)), **fields)
        except pyfuse3.FUSEError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
                raise
            failed = e
        node = self.inodes.get(cino)
        if (r is None or self._other(r, cino)) and node is not None and node.handle:
            r = await self.call(ctype, idempotent=True, at=node.handle, path=b"", **fields)
        if r is None:
            raise failed
        if self._other(r, cino):
            raise pyfuse3.FUSEError(errno.ESTALE)  # not its answer
        return r

    def _other(self, r, cino: int) -> bool:
        """Whether reply r is about another inode than cino."""
        want = self._sino(self.tag | cino)  # (0: a number of another term, or big: not checked)
        return bool(r.attr.ino and want and r.attr.ino != want)

    async def releasedir(self, fh):
        if self.listings.pop(fh, None) is not None:
            self._listings_changed()

    def _listings_changed(self) -> None:
        """What listings hold changed: the notices they held back may go."""
        self.listings_gen += 1
        if self.held_back and not self.noticer:
            self.noticer = True
            self.spawn(self._notices_soon)

    async def fsyncdir(self, fh, datasync):
        """The directory's entries, as made so far (also those sent behind:
        call waits for them), on the server's disk and on its replicas."""
        listing = self.listings.get(fh)
        if listing is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        await self.call(Call.fsync, fh=0, **self.named(self.tag | listing.dino))

    async def statfs(self, ctx):
        r = await self.call(Call.statfs, idempotent=True)
        return statvfs_data(r.statfs)

    async def getxattr(self, inode, name, ctx):
        if not name.startswith(XATTR_PREFIXES):
            # The kernel asks for security.capability before every first
            # write to an open file: answered here, it costs no round trip.
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return bytes((await self.call(Call.getxattr, idempotent=True, **self._object(inode), name=name)).data)

    async def setxattr(self, inode, name, value, ctx):
        if not name.startswith(XATTR_PREFIXES):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        with self._changing(inode & MASK):  # (its ctime)
            await self.call(Call.setxattr, **self._object(inode), name=name, data=value)

    async def listxattr(self, inode, ctx):
        data = bytes((await self.call(Call.listxattr, idempotent=True, **self._object(inode))).data)
        return [n for n in data.split(b"\0") if n]

    async def removexattr(self, inode, name, ctx):
        with self._changing(inode & MASK):
            await self.call(Call.removexattr, **self._object(inode), name=name)

    def forget(self, cino: int, n: int) -> None:
        node = self.inodes.get(cino)
        if node is not None:
            node.lookups -= n
            self._maybe_drop(node)

    def _maybe_drop(self, node: Inode) -> None:
        if node.lookups <= 0 and not node.open and node.cino != self.root:
            del self.inodes[node.cino]
            self._unshow(node)
            if self.cache is not None:
                # (its pages stay: the server stops telling this node of its
                # changes, but its next open says its data version)
                self.cache.forgotten(self.tag | node.cino)
            self.fresh.pop(node.cino, None)
            self.known.pop(node.cino, None)
            self.absent.pop(node.cino, None)  # (the kernel forgot the names in it too)
            if node.parent is not None and self.entries.get((node.parent, node.name)) == node.cino:
                del self.entries[(node.parent, node.name)]
            self._dropped(node.cino)

    def _dropped(self, cino: int) -> None:
        """The kernel holds nothing of cino: the server is to hear so (with
        this node's next call, or on its own after NOTICE_DELAY), unless a
        reply to a call begun before makes the kernel hold it again."""
        if cino >> GEN_SHIFT == self.gen and cino & SMALL < BIG and not self.renewing:
            self.dropped[cino] = self.begun
            self.drops.append((self.begun, cino, self.epoch))
            if not self.noticer:
                self.noticer = True
                self.spawn(self._notices_soon)

    async def _notices_soon(self) -> None:
        """A node that makes no call would otherwise keep the server telling
        it of what it no longer holds (and keeping removed directories'
        numbers for it, drvs/fs/server.py)."""
        try:
            await trio.sleep(NOTICE_DELAY)
            while self.drops or self.held_back and self.held_gen != self.listings_gen:
                left, gen = len(self.drops) + len(self.held_back), self.listings_gen
                try:
                    await self.call(Call.release, fh=0)  # (fh 0: nothing but what it carries)
                except pyfuse3.FUSEError:
                    return  # no server now: later calls take them
                if len(self.drops) + len(self.held_back) >= left and self.listings_gen == gen:
                    return  # held back (a listing open, a call unanswered): later calls take them
        finally:
            self.noticer = False

    # -- what the server says another node changed -----------------------------------------

    async def invalidate(self, inv) -> None:
        rest = self.invalidated(inv)
        if rest is not None:
            await rest()

    def invalidated(self, inv):
        """All of an invalidation that waits for nothing (the fabric's fast
        path makes it as the message comes); what is left to wait for
        before the reply, as an async function (None: nothing) -- the
        kernel's inodes to drop (drop_inodes), moved directories to look up
        (_relook)."""
        held = self._invalidated(inv)
        moved = self._moved(inv.moves) if inv.moves else []
        if not held and not moved:
            return None
        attr_only = not inv.data

        async def rest() -> None:
            await drop_inodes(held, attr_only)
            if moved:
                await self._relook(moved)

        return rest

    def _invalidated(self, inv) -> list:
        self.told += 1
        told, told_of = self.told, self.told_of
        for e in inv.entries:
            name, dino = bytes(e.name), self._c(e.attr.ino)
            told_of[dino] = told
            self.fresh.pop(dino, None)
            self.known.pop(dino, None)
            self.absent.get(dino, {}).pop(name, None)
            self._forget_entry(dino, name)
            for listing in self.listings.values():
                if listing.dino == dino:
                    listing.gone.add(name)
            pyfuse3.invalidate_entry_async(self.tag | dino, name, ignore_enoent=True)
        now, held = trio.current_time(), []
        for sino in inv.inodes:
            cino = self._c(sino)
            told_of[cino] = told
            if cino in self.inodes:
                held.append(self.tag | cino)
            elif cino not in self.dropped:
                self._dropped(cino)  # (shown in a listing the kernel did not take, say): not to be told again
            self.fresh.pop(cino, None)
            self.known.pop(cino, None)
            for name, until in self.absent.pop(cino, {}).items():  # (a directory: see self.absent)
                if until > now - ABSENT_GRACE:
                    pyfuse3.invalidate_entry_async(self.tag | cino, name, ignore_enoent=True)
            if inv.data and self.cache is not None:
                self.cache.drop(self.tag | cino)
        if len(told_of) > self.told_of_max:
            self._prune_told_of()
        return held

    def _moved(self, moves) -> list[tuple[int, bytes, int, bytes]]:
        """The moved directories this node's kernel holds: (their directory
        now, their name there, their inode, their path through this
        drvmmd's mount), as the kernel numbers them."""
        if self.mounted is None or self.renewing:
            return []
        out = []
        for m in moves:
            cino, path = self._c(m.ino), bytes(m.path)
            if cino in self.inodes and path:
                out.append((self.tag | self._c(m.dir), path.rpartition(b"/")[2], self.tag | cino,
                            os.path.join(os.fsencode(self.mounted), path)))
        return out

    async def _relook(self, moved: list) -> None:
        """Look moved directories up where they are now, before the server
        hears this node dropped what it was told -- so before the change
        is answered.  The kernel keeps a directory's dentry while a file
        below it is open; a lookup finding the directory under its new name
        moves that dentry there (d_splice_alias), which takes the file
        system's rename lock -- with a trylock.  A rename(2) looks its
        source up holding that lock: made by the new name with the old
        dentry still in place, it would fail ESTALE, every time.  Bounded
        (RELOOK_WAIT): a lookup may wait on directory locks that this
        node's calls to the server hold."""
        until = time.monotonic() + RELOOK_WAIT
        with trio.move_on_after(RELOOK_WAIT):
            for dino, name, ino, path in moved:
                await trio.to_thread.run_sync(_look_up, dino, name, ino, path, until, abandon_on_cancel=True)

    def _prune_told_of(self) -> None:
        """Forget when inodes were last told of that no reply still to come
        (to a call in flight, or in a listing open) began before; should
        that leave too many (a listing kept open pins them), take every
        reply on its way as stale instead."""
        floor = min([*self.unanswered.values(), *(listing.told for listing in self.listings.values()
                                                   if listing.told is not None)], default=self.told)
        self.told_of = {cino: told for cino, told in self.told_of.items() if told > floor}
        if len(self.told_of) > TOLD_OF_MAX:
            self.all_told = self.told + 1
            self.told += 1
            self.told_of = {}
        self.told_of_max = max(TOLD_OF_PRUNE, 2 * len(self.told_of))


async def _drop_entry(dino: int, name: bytes) -> None:
    pyfuse3.invalidate_entry_async(dino, name, ignore_enoent=True)


async def drop_inodes(inodes: list, attr_only: bool) -> None:
    """Make the kernel drop what it caches of these inodes (attributes, and
    pages unless attr_only), each in a worker thread (_invalidate_inode)."""
    for ino in inodes:
        await trio.to_thread.run_sync(_invalidate_inode, ino, attr_only)


def _look_up(dino: int, name: bytes, ino: int, path: bytes, until: float) -> None:
    """In a worker thread (see VmFs._relook): the kernel looks path up,
    again, until time.monotonic() is until, while it fails ESTALE (moving
    the old dentry takes the rename lock, and the old directory's, with a
    trylock: a rename, or a change in that directory, under way here).
    What the kernel holds under that name goes first -- what the
    invalidation undid is dropped by pyfuse3's own thread, maybe later,
    and the stat would be answered from it: the name known absent, or the
    directory an exchange put where this one was."""
    try:
        pyfuse3.invalidate_entry(dino, name)
    except OSError:
        pass  # (the kernel holds no such directory now, or no such name)
    while True:
        try:
            os.lstat(path)
            return
        except OSError as e:
            if e.errno != errno.ESTALE:
                log.debug("looking up moved directory %s (inode %#x): %s", os.fsdecode(path), ino, e)
                return  # (moved on or removed meanwhile: its next lookup settles it)
        if time.monotonic() >= until:
            log.info("moved directory %s (inode %#x): still held at its old place here; a rename by its "
                     "new name may fail ESTALE", os.fsdecode(path), ino)
            return
        time.sleep(0.002)


def _invalidate_inode(ino: int, attr_only: bool) -> None:
    """In a worker thread: dropping pages, the kernel waits for those that
    reads this node's loop has yet to answer hold locked; and even to find
    the inode (attributes alone), it waits for one being evicted, whose
    pages go first.  The loop must go on meanwhile."""
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
