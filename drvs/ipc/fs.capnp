@0xeaa43d729bbe616c;
# The DRVM file system.  Endpoint "fs@VM" is the VM's file server; the
# drvmmd of every node is a client (its FUSE view) and serves "fsc@NODE",
# where the server sends invalidations of what that node's kernel caches.
#
# Like a Minix message, one request and one reply layout serve every call;
# each call below says which fields it reads and fills.  Paths are bytes,
# relative to the file system's root ("" is the root, "a/b" a file), with
# no "." or ".." components; the kernel of the client node resolves links.
# Errors are the reply's status (a negative errno), as the kernel gives it.

enum FsCall {
  lookup @0;       # path -> attr (caches: the node may cache path and its directory)
  getattr @1;      # path or fh -> attr
  setattr @2;      # path or fh, setMask + mode/uid/gid/size/atimeNs/mtimeNs -> attr
  readlink @3;     # path -> data
  mknod @4;        # path, mode, rdev, caller -> attr
  mkdir @5;        # path, mode, caller -> attr
  symlink @6;      # path, data (the target), caller -> attr
  unlink @7;       # path; ino, inoEpoch: only if the name is still that inode (else ESTALE)
  rmdir @8;        # path
  rename @9;       # path -> path2, flags (RENAME_NOREPLACE, RENAME_EXCHANGE)
  link @10;        # path (existing) -> path2 (new) -> attr of path2
  open @11;        # path, flags -> fh, attr
  create @12;      # path, flags, mode, caller -> fh, attr.  Sent behind (a replica's too): fh, the
                   # file made ahead to put there (tmpfiles), and atimeNs/mtimeNs, its times
  read @13;        # fh, offset, size -> data
  write @14;       # fh, offset, data, flags (1: drop setuid, and setgid if group-executable),
                   # mtimeNs (not 0: the file's mtime after it, as its node told its kernel: a
                   # write sent behind) -> size (bytes written), shared
  release @15;     # fh
  fsync @16;       # fh, flags (1: data only); fh 0: path, a directory's fsync (what was made in it,
                   # on the replicas too)
  readdir @17;     # path, data (resume after this name, "" from the start) -> entries, more
  statfs @18;      # -> statfs
  getxattr @19;    # path, name -> data
  setxattr @20;    # path, name, data, flags
  listxattr @21;   # path -> data (names, each NUL-terminated)
  removexattr @22; # path, name
  flush @23;       # fh: a close(2) of it; what it wrote is now seen by every node
  invalidate @24;  # server -> fsc@NODE: Invalidations
  usage @25;       # -> statfs, data (the store's bytes in use, as decimal text)

  # Between the serving node and the other replicas (endpoint "fsr@NODE"):
  mirror @26;      # Batch -> BatchReply: calls the server made, to make here in order
  # Inside a Batch only, to copy the whole store to a replica that missed
  # calls: a new tree is built beside the current one and replaces it at
  # putCommit, so the replica's old copy stays whole until then.
  putBegin @27;    # start a new tree
  putDir @28;      # path, mode, uid, gid, atimeNs, mtimeNs
  putFile @29;     # path, mode, uid, gid, size, atimeNs, mtimeNs, offset, data (a part)
  putLink @30;     # path, data (the target), uid, gid
  putHardlink @31; # path (new name) -> path2 (a name already put)
  putRemove @32;   # path (and what is under it)
  putCommit @33;   # the new tree replaces the old one (then: open calls for the open files)

  lock @34;        # path, lock*: take, test or drop a lock (a program's fcntl or flock, from its
                   # node's supervisor) -> lockType (test: the conflicting lock, or 2: none), ...
                   # EAGAIN if another owner holds a conflicting lock after lockWaitMs
  fallocate @35;   # path or via, flags (fallocate(2)'s mode), offset, size (the length) -> attr
                   # (a program's fallocate, from its node's supervisor: pyfuse3 has no FALLOCATE)
  recall @36;      # server -> fsc@NODE: Recall: the directories the server delegated to the node are
                   # its no more; the node answers once what it sent behind there is made
  unlinks @37;     # names (paths), inos, inoEpoch: unlinks a node sent behind (VmFs.unlink), each
                   # made as an unlink of that inode -> statuses
  behind @38;      # calls: writes, setattrs and releases a node sent behind on files it made in a
                   # directory delegated to it (VmFs.write), each made as that call, in order ->
                   # statuses
  tmpfiles @39;    # size (how many), flags (1: the node's first ask: those it held before go) ->
                   # handles, entries (their attr: ino, gen), behindBytes: files made ahead (unnamed,
                   # open) for the caller's node to create behind in directories delegated to it
  syncfs @40;      # a program's sync(2) or syncfs(2), from its node's supervisor: every change made
                   # so far, on the disk of the server and of every replica in sync
}

struct Caller {
  uid @0 :UInt32;
  gid @1 :UInt32;
  umask @2 :UInt32;
}

struct FsRequest {
  vm @0 :Text;
  path @1 :Data;
  path2 @2 :Data;
  fh @3 :UInt64;
  offset @4 :UInt64;
  size @5 :UInt64;
  data @6 :Data;
  flags @7 :UInt32;
  mode @8 :UInt32;
  rdev @9 :UInt64;
  caller @10 :Caller;
  name @11 :Data;
  setMask @12 :UInt32;   # bits: 1 mode, 2 uid, 4 gid, 8 size, 16 atime, 32 mtime
  uid @13 :UInt32;
  gid @14 :UInt32;
  atimeNs @15 :Int64;
  mtimeNs @16 :Int64;
  origin @17 :Text;      # in a replica's open and create: the node the file was opened for
  lockType @18 :UInt8;   # 0 read, 1 write, 2 none (unlock), as F_RDLCK, F_WRLCK, F_UNLCK
  lockStart @19 :Int64;
  lockEnd @20 :Int64;    # exclusive; -1: to the end of the file, however far it grows
  lockOwner @21 :Text;   # who holds it: "NODE:posix:PID" or "NODE:flock:PID" (locks are kept per file)
  lockWaitMs @22 :UInt32;# how long a conflicting lock may be waited for here
  lockTest @23 :Bool;    # F_GETLK: only say what conflicts
  lockFlock @24 :Bool;   # flock(2) locks (a space apart from fcntl's)
  lockPid @25 :Int32;    # the owner's VM pid (F_GETLK reports it)
  lockIno @26 :UInt64;   # the file by the server's inode (as a lock's reply gave it), not by path
  closed @27 :List(UInt64); # handles the caller's node has since closed (released before this call)
  forgotten @28 :List(UInt64); # inodes the caller's node no longer caches at all (FsServer.forgotten)
  forgottenEpoch @29 :UInt64;   # the server term those inode numbers are of (other terms': ignored)
  forgottenMarks @30 :List(UInt64); # for each, the last call its node had begun when it forgot it
  seq @31 :UInt64;              # this call's number among its node's calls (see FsServer.forgotten)
  via @32 :UInt64;              # open, *xattr: the object by a handle of it, not by path (a
                                # file open on the caller's node, which knows no path of it)
  ino @33 :UInt64;              # open by path: the inode the caller means (0: whatever is there);
                                # another one there now (the name was replaced meanwhile): ESTALE;
                                # none (the name was removed meanwhile): EIDRM
  inoEpoch @34 :UInt64;         # the server term ino is a number of (another term's: not checked)
  at @35 :Data;                 # path is below this directory (its Attr.handle), wherever it is now:
                                # the caller's node lost its path (another node moved it); empty: the root
  at2 @36 :Data;                # the same for path2
  atEpoch @37 :UInt64;          # the server term at and at2 are handles of (another term's: ESTALE)
  names @38 :List(Data);        # unlinks: the paths
  inos @39 :List(UInt64);       # unlinks: the inode each path is meant to name (of term inoEpoch)
  calls @40 :List(Batch.Call);  # behind: the calls (each an FsRequest of its type)
  lockReclaim @41 :Bool;        # lock: one its node's program held under the term before (a new
                                # server knows no locks); ENOLCK if another owner holds it now
  xattrs @42 :List(Xattr);      # putFile, putDir (flags LAST): the object's extended attributes, all
}

struct Xattr {
  name @0 :Data;
  value @1 :Data;
}

struct Attr {
  ino @0 :UInt64;
  mode @1 :UInt32;
  nlink @2 :UInt32;
  uid @3 :UInt32;
  gid @4 :UInt32;
  rdev @5 :UInt64;
  size @6 :UInt64;
  blocks @7 :UInt64;
  atimeNs @8 :Int64;
  mtimeNs @9 :Int64;
  ctimeNs @10 :Int64;
  handle @11 :Data;             # a directory's file handle, in lookups' and listings' replies (see at)
  gen @12 :UInt64;              # which object has this number, in replies that name one (see _identity)
}

struct Entry {
  name @0 :Data;
  attr @1 :Attr;
}

struct StatFs {
  bsize @0 :UInt64;
  blocks @1 :UInt64;
  bfree @2 :UInt64;
  bavail @3 :UInt64;
  files @4 :UInt64;
  ffree @5 :UInt64;
  namemax @6 :UInt32;
}

struct FsReply {
  attr @0 :Attr;
  fh @1 :UInt64;
  data @2 :Data;
  size @3 :UInt64;
  entries @4 :List(Entry);
  more @5 :Bool;
  statfs @6 :StatFs;
  epoch @7 :UInt64;      # the server's term: a new one after a fail-over (clients then drop their caches)
  shared @8 :Bool;       # write: another node may cache the file (or closes wait for replicas): flush on close
  lockType @9 :UInt8;    # lock with lockTest: the conflicting lock (2: none) ...
  lockStart @10 :Int64;
  lockEnd @11 :Int64;
  lockPid @12 :Int32;
  dirAttr @13 :Attr;     # a change in a directory: the directory's attributes after it (NFS's
                         # post-op attributes), so the writer's node need not ask for them
  synced @14 :Bool;      # flush: the file's data is on every in-sync replica (a synchronous VM)
  version @15 :UInt64;   # open: the version of the file's data in this term (see FsServer.versions)
  delegated @16 :Bool;   # mkdir: the new directory is the caller's node's alone until recalled: it
                         # may unlink what it made there without waiting for the server (VmFs.unlink)
  statuses @17 :List(Int32);  # unlinks: 0 or -errno, one per name
  revocations @18 :UInt64;    # delegations of the caller's node the server ended without its answer
                              # (a recall that failed): when this grows, the node drops all of its own
  behindBytes @19 :UInt64;    # create: the bytes of the new file its node may write behind (VmFs.write:
                              # the directory is delegated to it, the disk roomy); 0: none
  handles @20 :List(UInt64);  # tmpfiles: the files' handles (entries: their attributes)
  vouched @21 :UInt64;        # getattr: the term before this one, if its server handed over cleanly (every
                              # change it acknowledged is here): its writes not fsync'ed are not in doubt
  replicaStates @22 :List(Text);  # usage: "NODE: why" for each replica not in sync (being copied to, or
                                  # what failed there last)
}

# The server's calls, as made, for a replica (each call's request as the
# server read it; open and create carry the handle the server gave).
struct Batch {
  vm @0 :Text;
  epoch @1 :UInt64;
  calls @2 :List(Call);
  made @3 :UInt64;     # the VM definition's create revision (0: not known): one made again is another
  handed @4 :Bool;     # no calls: the server stopped cleanly, and this replica has every change it acknowledged
  struct Call {
    type @0 :UInt16;
    request @1 :Data;
    origin @2 :Text;   # the node whose call it was ("": a copy's): its reply is kept by (origin, seq), see FsServer.done
  }
}

struct BatchReply {
  statuses @0 :List(Int32);   # one per call: 0 or -errno
}

# What a node's kernel must forget: directory entries (the inode of the
# directory, by the server's inode number, and the name), and inodes whose
# attributes or data changed.
struct Invalidations {
  vm @0 :Text;
  entries @1 :List(Entry);   # attr.ino: the directory; name: the entry
  inodes @2 :List(UInt64);
  data @3 :Bool;             # inodes' cached data too, not only attributes
  moves @4 :List(Move);
}

# Directories delegated to a node (FsReply.delegated) that another node now
# uses: the node's unlinks sent behind there must be made first.
struct Recall {
  vm @0 :Text;
  dirs @1 :List(UInt64);   # the server's inode numbers
  epoch @2 :UInt64;        # the server's term
}

# A directory the node may hold was moved: where it is now, for the node
# to look it up there itself (drvs/fs/client.py VmFs._relook).
struct Move {
  ino @0 :UInt64;    # the directory
  dir @1 :UInt64;    # the directory it is in now
  path @2 :Data;     # its path now, from the file system's root
}
