"""A VM file server's store: the VM's files kept as an ordinary directory
tree on the server node's local disk, so that the node's own file system
gives crash consistency (its journal), sparse files, hard links, xattrs and
fsync, and a crash never leaves a torn format of ours to repair.

    STATE/vms/VM/fs/STORE    what this is: {"format": 1, "vm": VM, "made": REV}
                             (REV: the VM definition's create revision in
                             etcd; a VM made again under its name is another)
    STATE/vms/VM/fs/root/    the tree

Every path comes from a client node and is resolved under root/ in one
openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) step: a symbolic link a
program of the VM made is never followed here (its node's kernel follows
links, in the jail's own view), and nothing outside root/ can be reached.

Errors are OSError, as the kernel gave them."""

import errno
import json
import os
import stat

from .. import _fs
from ..errors import SetupError

FORMAT = 1
RESOLVE = _fs.RESOLVE_BENEATH | _fs.RESOLVE_NO_SYMLINKS | _fs.RESOLVE_NO_MAGICLINKS | _fs.RESOLVE_NO_XDEV
NAME_MAX = 255
PATH_MAX = 4096
# Extended attributes a VM's programs may use; the others belong to this
# node (trusted.*, security.* would act on the server itself).
XATTR_PREFIXES = (b"user.",)


def check_path(path: bytes) -> bytes:
    """A client's path, as this store takes it, or OSError."""
    import errno

    if len(path) > PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, "path too long")
    if path:
        for part in path.split(b"/"):
            if part in (b"", b".", b"..") or b"\0" in part:
                raise OSError(errno.EINVAL, "invalid path")
            if len(part) > NAME_MAX:
                raise OSError(errno.ENAMETOOLONG, "name too long")
    return path


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Store:
    def __init__(self, base: str, vm: str, made: int = 0):
        """made: the VM definition's create revision (0: not known here)."""
        self.base, self.vm = base, vm
        self.root, self.made = open_store(base, vm, made)
        self.mount = -1  # the root, opened to read: open_by_handle_at takes no O_PATH descriptor
        # Where the kernel says the root is (/proc/self/fd): what paths it
        # gives of what lies below start with (base may be relative, or
        # go through a link).
        self.prefix = os.readlink(f"/proc/self/fd/{self.root}".encode())

    def close(self) -> None:
        for fd in (self.root, self.mount):
            if fd >= 0:
                os.close(fd)
        self.root = self.mount = -1

    def open(self, path: bytes, flags: int, mode: int = 0) -> int:
        return _fs.openat2(self.root, path or b".", flags | os.O_CLOEXEC, mode, RESOLVE)

    def parent(self, path: bytes) -> tuple[int, bytes]:
        """An fd of path's directory (the caller closes it), and the name."""
        import errno

        if not path:
            raise OSError(errno.EBUSY, "the root has no parent")
        head, _, name = path.rpartition(b"/")
        return self.open(head, os.O_PATH | os.O_DIRECTORY), name

    def lstat(self, path: bytes) -> os.stat_result:
        fd = self.open(path, os.O_PATH | os.O_NOFOLLOW)
        try:
            return os.stat(fd)
        finally:
            os.close(fd)

    def at(self, path: bytes):
        """with store.at(path) as (dirfd, name): ..."""
        return _At(self, path)

    def path_of(self, fd: int) -> bytes | None:
        """Where what fd names is in the tree now (None: removed, or not in
        the tree)."""
        try:
            target = os.readlink(f"/proc/self/fd/{fd}".encode())
        except OSError:
            return None
        return None if target.endswith(b" (deleted)") else self._in_tree(target)

    def _in_tree(self, target: bytes) -> bytes | None:
        if target == self.prefix:
            return b""
        return target[len(self.prefix) + 1:] if target.startswith(self.prefix + b"/") else None

    @staticmethod
    def handle_of(dfd: int, name: bytes) -> bytes:
        """A file handle of directory name in dfd (b"" where the file system
        gives none): what find() takes."""
        try:
            return _fs.name_to_handle_at(dfd, name)
        except OSError:
            return b""

    def find(self, handle: bytes) -> bytes:
        """The path now of the directory a file handle names, wherever it
        was moved -- an NFS server's way of naming objects.  ESTALE if it
        names no directory of this tree (bytes that are no handle, another
        store's, another VM's), ENOENT if the directory was removed."""
        if self.mount < 0:
            self.mount = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.root)
        try:
            fd = _fs.open_by_handle_at(self.mount, handle, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(errno.ESTALE, f"no such directory ({e.strerror})") from None
        try:
            target, removed = os.readlink(f"/proc/self/fd/{fd}".encode()), os.stat(fd).st_nlink == 0
        finally:
            os.close(fd)
        if removed and target.endswith(b" (deleted)"):
            target = target[:-len(b" (deleted)")]
        path = self._in_tree(target)
        if path is None:
            raise OSError(errno.ESTALE, "no directory of this file system")
        if removed:
            raise OSError(errno.ENOENT, "the directory was removed")
        return path

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self.root)

    def used_bytes(self) -> int:
        """Bytes of disk the tree takes (du), hard links counted once."""
        seen, total = set(), 0
        for top, dirs, files in os.walk(f"{self.base}/root"):
            for name in dirs + files:
                try:
                    st = os.lstat(os.path.join(top, name))
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
        return total


class _At:
    __slots__ = ("store", "path", "fd")

    def __init__(self, store: Store, path: bytes):
        self.store, self.path, self.fd = store, path, -1

    def __enter__(self) -> tuple[int, bytes]:
        self.fd, name = self.store.parent(self.path)
        return self.fd, name

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def made_of(base: str) -> int:
    """The create revision of the VM definition the store under base is of
    (0: none there, or not recorded)."""
    try:
        with open(f"{base}/STORE") as f:
            made = json.load(f).get("made", 0)
        return made if isinstance(made, int) else 0
    except (OSError, ValueError, AttributeError):
        return 0


def open_store(base: str, vm: str, made: int = 0) -> tuple[int, int]:
    """The root of vm's store under base, made if new, and the definition it
    is of; SetupError if what is there is not a store of vm (a foreign,
    torn or half-made directory is never written into), or of another
    definition of vm than made."""
    marker, root = f"{base}/STORE", f"{base}/root"
    if not os.path.exists(marker):
        if os.path.exists(root) and os.listdir(root):
            raise SetupError(f"file store {base}: files without a STORE marker; "
                             f"not a DRVS store (move it away to start afresh)")
        os.makedirs(root, mode=0o755, exist_ok=True)
        _write_marker(base, {"format": FORMAT, "vm": vm, "made": made})
    try:
        with open(marker) as f:
            info = json.load(f)
        ok = info.get("format") == FORMAT and info.get("vm") == vm
        had = info.get("made", 0)
    except (OSError, ValueError, AttributeError) as e:
        raise SetupError(f"file store {base}: unreadable STORE marker ({e}); the store is damaged") from None
    if not ok:
        raise SetupError(f"file store {base}: STORE marker says {info!r}, expected format {FORMAT} of VM {vm!r}")
    if made and had and had != made:
        raise SetupError(f"file store {base}: of VM {vm!r} as defined at revision {had}, not {made} "
                         "(a VM removed and made again under its name)")
    if made and not had:  # (a store made before markers said: from now on it does)
        _write_marker(base, {**info, "made": made})
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError(f"file store {base}: its root is missing ({e.strerror}); the store is damaged") from None
    if not stat.S_ISDIR(os.stat(fd).st_mode):
        os.close(fd)
        raise SetupError(f"file store {base}: root is not a directory")
    return fd, made or had


def _write_marker(base: str, info: dict) -> None:
    """STORE, whole or not at all (written aside, then renamed over)."""
    marker = f"{base}/STORE"
    with open(f"{marker}.tmp", "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(f"{marker}.tmp", marker)
    _fsync_dir(base)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
