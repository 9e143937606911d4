"""Random file operations made through several nodes' views of one file
system, each checked against a model of what POSIX says it must then hold.

Operations run one after another, each on a view chosen at random, so that
every change one node makes must be seen at once by the next operation on
any node (metadata at once, data close-to-open).  Used by
tests/cluster/test_fs.py; the model knows files by identity, so hard links,
renames over existing names and whole subtrees moving are followed."""

import errno
import os
import random
import stat


class Mismatch(AssertionError):
    pass


class Walk:
    """One run: `views` (paths of the same directory as each node shows it),
    ops drawn from a seeded generator."""

    NAMES = [c + str(i) for c in "abcdefgh" for i in range(3)]

    def __init__(self, views: list, seed: int):
        self.views, self.rng = views, random.Random(seed)
        self.tree = {(): ("d", 0)}           # path (tuple of names) -> (kind, id)
        self.data: dict[int, bytearray] = {}  # file id -> contents
        self.mode = {0: 0o755}                # id -> permission bits
        self.xattrs: dict[int, dict[str, bytes]] = {}  # id -> its user.* attributes
        self.ids = 0
        self.held: list[tuple[int, int, int]] = []  # (fd, file id, view) kept open across operations
        self.log: list[tuple] = []

    # -- the model ------------------------------------------------------------------

    def _new(self, kind: str, mode: int) -> tuple:
        self.ids += 1
        self.mode[self.ids] = mode
        return kind, self.ids

    def _paths(self, kind=None) -> list:
        return [p for p, e in self.tree.items() if p and (kind is None or e[0] == kind)]

    def _dirs(self) -> list:
        return [p for p, e in self.tree.items() if e[0] == "d"]

    def _children(self, d: tuple) -> list:
        return sorted(p[-1] for p in self.tree if p and p[:-1] == d)

    def _name_in(self, d: tuple) -> tuple:
        return d + (self.rng.choice(self.NAMES),)

    def _at(self, v: int, p: tuple) -> str:
        return os.path.join(self.views[v], *p)

    def _fail(self, what: str):
        last = "\n".join(f"  {entry}" for entry in self.log[-15:])
        raise Mismatch(f"after {len(self.log)} operations: {what}\nlast operations (view, op, ...):\n{last}")

    def _refused(self, code: int, fn, *args) -> None:
        try:
            fn(*args)
        except OSError as e:
            if e.errno != code:
                self._fail(f"{self.log[-1]}: {errno.errorcode.get(e.errno)}, not {errno.errorcode[code]}")
            return
        self._fail(f"{self.log[-1]}: succeeded, not {errno.errorcode[code]}")

    # -- operations: each returns nothing, or raises Mismatch --------------------------

    def create(self, v):
        p = self._name_in(self.rng.choice(self._dirs()))
        body = self.rng.randbytes(self.rng.choice([0, 1, 100, 4096, 5000, 70000]))
        self.log.append((v, "create", p, len(body)))
        e = self.tree.get(p)
        if e is not None and e[0] != "f":
            return
        flags = os.O_WRONLY | (os.O_TRUNC if e else os.O_CREAT | os.O_EXCL)
        fd = os.open(self._at(v, p), flags, 0o644)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        if e is None:
            e = self.tree[p] = self._new("f", 0o644)
        self.data[e[1]] = bytearray(body)

    def write(self, v):
        p = self.rng.choice(self._paths("f"))
        buf = self.data[self.tree[p][1]]
        how = self.rng.choice(["at", "append", "truncate"])
        if how == "truncate":
            n = self.rng.randrange(len(buf) + 3000)
            self.log.append((v, "truncate", p, n))
            os.truncate(self._at(v, p), n)
            del buf[n:]
            buf.extend(bytes(n - len(buf)))
            return
        body = self.rng.randbytes(self.rng.randrange(1, 9000))
        off = self.rng.randrange(len(buf) + 5000) if how == "at" else len(buf)
        self.log.append((v, how, p, off, len(body)))
        fd = os.open(self._at(v, p), os.O_WRONLY | (os.O_APPEND if how == "append" else 0))
        try:
            os.pwrite(fd, body, off) if how == "at" else os.write(fd, body)
        finally:
            os.close(fd)
        buf.extend(bytes(max(0, off - len(buf))))
        buf[off:off + len(body)] = body

    def read(self, v):
        p = self.rng.choice(self._paths("f"))
        self.log.append((v, "read", p))
        with open(self._at(v, p), "rb") as f:
            got = f.read()
        want = self.data[self.tree[p][1]]
        if got != want:
            self._fail(f"{p} read on view {v}: {len(got)} bytes, not the {len(want)} written")

    def stat(self, v):
        p = self.rng.choice(self._paths())
        self.log.append((v, "stat", p))
        st = os.lstat(self._at(v, p))
        kind, ident = self.tree[p]
        want = {"d": stat.S_IFDIR, "f": stat.S_IFREG, "l": stat.S_IFLNK}[kind]
        got = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode) if kind != "l" else None)
        if got != (want, self.mode[ident] if kind != "l" else None):
            self._fail(f"{p} on view {v}: mode {oct(st.st_mode)}")
        if kind == "f":
            links = sum(1 for e in self.tree.values() if e == (kind, ident))
            if (st.st_size, st.st_nlink) != (len(self.data[ident]), links):
                self._fail(f"{p} on view {v}: size {st.st_size}, {st.st_nlink} links; "
                           f"not {len(self.data[ident])}, {links}")

    def _not_link(self):
        """A path drawn at random and its object, or None if it is a symlink's."""
        p = self.rng.choice(self._paths())
        kind, ident = self.tree[p]
        return None if kind == "l" else (p, ident)

    def chmod(self, v):
        if (drawn := self._not_link()) is None:
            return
        p, ident = drawn
        mode = self.rng.choice([0o600, 0o644, 0o700, 0o755])
        self.log.append((v, "chmod", p, oct(mode)))
        os.chmod(self._at(v, p), mode)
        self.mode[ident] = mode

    def rename(self, v):
        src, dst = self.rng.choice(self._paths()), self._name_in(self.rng.choice(self._dirs()))
        self.log.append((v, "rename", src, dst))
        s, t = self.tree[src], self.tree.get(dst)
        a, b = self._at(v, src), self._at(v, dst)
        if src == dst or s == t:  # one object under both names: nothing happens
            os.rename(a, b)
        elif dst[:len(src)] == src:
            self._refused(errno.EINVAL, os.rename, a, b)
        elif src[:len(dst)] == dst:  # (the kernel's answer for a target above the source)
            self._refused(errno.ENOTEMPTY, os.rename, a, b)
        elif t is not None and s[0] == "d" and t[0] != "d":
            self._refused(errno.ENOTDIR, os.rename, a, b)
        elif t is not None and s[0] != "d" and t[0] == "d":
            self._refused(errno.EISDIR, os.rename, a, b)
        elif t is not None and self._children(dst):
            self._refused(errno.ENOTEMPTY, os.rename, a, b)
        else:
            os.rename(a, b)
            moved = {p: e for p, e in self.tree.items() if p[:len(src)] == src}
            for p in moved:
                del self.tree[p]
            self.tree.pop(dst, None)
            self.tree.update({dst + p[len(src):]: e for p, e in moved.items()})

    def unlink(self, v):
        p = self.rng.choice(self._paths())
        self.log.append((v, "unlink", p))
        if self.tree[p][0] == "d":
            return self._refused(errno.EISDIR, os.unlink, self._at(v, p))
        os.unlink(self._at(v, p))
        del self.tree[p]

    def mkdir(self, v):
        p = self._name_in(self.rng.choice(self._dirs()))
        self.log.append((v, "mkdir", p))
        if p in self.tree:
            return self._refused(errno.EEXIST, os.mkdir, self._at(v, p))
        os.mkdir(self._at(v, p), 0o755)
        self.tree[p] = self._new("d", 0o755)

    def rmdir(self, v):
        p = self.rng.choice(self._paths("d"))
        self.log.append((v, "rmdir", p))
        if self._children(p):
            return self._refused(errno.ENOTEMPTY, os.rmdir, self._at(v, p))
        os.rmdir(self._at(v, p))
        del self.tree[p]

    def listdir(self, v):
        d = self.rng.choice(self._dirs())
        self.log.append((v, "listdir", d))
        got = sorted(os.listdir(self._at(v, d)))
        if got != self._children(d):
            self._fail(f"{d} listed on view {v}: {got}, not {self._children(d)}")

    def link(self, v):
        src, dst = self.rng.choice(self._paths("f")), self._name_in(self.rng.choice(self._dirs()))
        self.log.append((v, "link", src, dst))
        if dst in self.tree:
            return self._refused(errno.EEXIST, os.link, self._at(v, src), self._at(v, dst))
        os.link(self._at(v, src), self._at(v, dst))
        self.tree[dst] = self.tree[src]

    def symlink(self, v):
        dst, target = self._name_in(self.rng.choice(self._dirs())), f"t{self.rng.randrange(100)}"
        self.log.append((v, "symlink", dst, target))
        if dst in self.tree:
            return self._refused(errno.EEXIST, os.symlink, target, self._at(v, dst))
        os.symlink(target, self._at(v, dst))
        self.tree[dst] = self._new("l", 0o777)
        other = self.rng.randrange(len(self.views))
        if os.readlink(self._at(other, dst)) != target:
            self._fail(f"{dst} read on view {other}: not a link to {target}")

    def missing(self, v):
        p = self._name_in(self.rng.choice(self._dirs()))
        if p not in self.tree:
            self.log.append((v, "missing", p))
            self._refused(errno.ENOENT, os.lstat, self._at(v, p))

    def hold(self, v):
        """Keep a file open across operations (its names may go meanwhile)."""
        p = self.rng.choice(self._paths("f"))
        self.log.append((v, "hold", p))
        self.held.append((os.open(self._at(v, p), os.O_RDONLY), self.tree[p][1], v))
        if len(self.held) > 6:
            os.close(self.held.pop(0)[0])

    def fstat(self, v):
        fd, ident, v = self.rng.choice(self.held)
        self.log.append((v, "fstat", ident))
        st = os.fstat(fd)
        if (st.st_size, stat.S_IMODE(st.st_mode)) != (len(self.data[ident]), self.mode[ident]):
            self._fail(f"file {ident} held open on view {v}: size {st.st_size}, mode {oct(st.st_mode)}; "
                       f"not {len(self.data[ident])}, {oct(self.mode[ident])}")

    def xattr(self, v):
        if (drawn := self._not_link()) is None:
            return
        p, ident = drawn
        attrs = self.xattrs.setdefault(ident, {})
        name = f"user.k{self.rng.randrange(3)}"
        if self.rng.random() < 0.3 and name in attrs:
            self.log.append((v, "removexattr", p, name))
            os.removexattr(self._at(v, p), name)
            del attrs[name]
        else:
            value = self.rng.randbytes(self.rng.randrange(1, 40))
            self.log.append((v, "setxattr", p, name, len(value)))
            os.setxattr(self._at(v, p), name, value)
            attrs[name] = value
        other = self.rng.randrange(len(self.views))
        got = {n: os.getxattr(self._at(other, p), n) for n in os.listxattr(self._at(other, p)) if n.startswith("user.")}
        if got != attrs:
            self._fail(f"{p} attributes on view {other}: {sorted(got)}, not {sorted(attrs)}")

    def utime(self, v):
        p = self.rng.choice(self._paths("f"))
        ns = self.rng.randrange(1 << 40) * 1000
        self.log.append((v, "utime", p, ns))
        os.utime(self._at(v, p), ns=(ns, ns))
        other = self.rng.randrange(len(self.views))
        if os.stat(self._at(other, p)).st_mtime_ns != ns:
            self._fail(f"{p} on view {other}: mtime {os.stat(self._at(other, p)).st_mtime_ns}, not {ns}")

    def put(self, v):
        """Write through a file held open (its names may all be gone), then close it."""
        fd, ident, v = self.held.pop(self.rng.randrange(len(self.held)))
        body = self.rng.randbytes(self.rng.randrange(1, 5000))
        off = self.rng.randrange(len(self.data[ident]) + 100)
        self.log.append((v, "put", ident, off, len(body)))
        try:
            wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)  # (held read-only: reopened, as a program may)
            try:
                os.pwrite(wfd, body, off)
            finally:
                os.close(wfd)
        finally:
            os.close(fd)
        buf = self.data[ident]
        buf.extend(bytes(max(0, off - len(buf))))
        buf[off:off + len(body)] = body

    def forget(self, v):
        """Make every node's kernel forget what it does not use (FORGETs:
        the nodes stop being told of those inodes and directories)."""
        if self.rng.random() < 0.2:
            self.log.append((v, "forget"))
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")

    OPS = {"create": 2, "write": 3, "read": 2, "stat": 2, "chmod": 1, "rename": 1, "unlink": 1, "mkdir": 1,
           "rmdir": 1, "listdir": 2, "link": 1, "symlink": 1, "missing": 1, "hold": 1, "fstat": 2, "forget": 1,
           "xattr": 1, "utime": 1, "put": 1}
    NEEDS = {"write": "f", "read": "f", "link": "f", "hold": "f", "rmdir": "d", "stat": "", "chmod": "",
             "rename": "", "unlink": "", "xattr": "", "utime": "f"}

    def run(self, count: int) -> None:
        names, weights = list(self.OPS), list(self.OPS.values())
        try:
            for _ in range(count):
                op = self.rng.choices(names, weights)[0]
                need = self.NEEDS.get(op)
                if (need is not None and not self._paths(need or None)) or (op in ("fstat", "put") and not self.held):
                    continue
                v = self.rng.randrange(len(self.views))
                try:
                    getattr(self, op)(v)
                except OSError as e:
                    self._fail(f"{self.log[-1] if self.log else op}: {e}")
        finally:
            for fd, _, _ in self.held:
                os.close(fd)
