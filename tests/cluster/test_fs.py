"""The DRVM file system: one POSIX file system per VM, the same on every
node, seen by jails at /data and by administrators through drvs mount."""

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from drvs.fs.server import REAP_EVERY
from tests.cluster.conftest import BIN, Cluster
from tests.cluster.fsmodel import Mismatch, Walk

PY = sys.executable


@pytest.fixture(scope="module")
def fsc(tmp_path_factory):
    """One 2-node cluster for the module's tests, VM `web` on both (its
    file system kept on both: the default)."""
    from drvs.dev import cluster as dev
    from drvs.dev import netns

    state = tmp_path_factory.mktemp("fs")
    name = dev.new_name()
    info = dev.up(str(state), 2, None, name)
    try:
        c = Cluster(state, info)
        c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
        view(c, "n1"), view(c, "n2")
        yield c
    finally:
        if (state / "dev-cluster.json").exists():
            dev.down(str(state))
        assert not netns.existing(name)
        with open("/proc/self/mounts") as f:
            assert not [line for line in f if f" {state}/" in line]


def view(c, node, vm="web", timeout=20) -> Path:
    """The VM's file system as node's drvmmd shows it on the host."""
    path = Path(c.node(node)["state_dir"]) / "dvos" / "fs" / vm
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        assert time.monotonic() < deadline, f"{path}: fs@{vm} not served"
        time.sleep(0.1)
    return path


def jail(c, node, script, user=None, timeout=60, vm="web"):
    argv = [str(BIN / "drvs-run"), "--vm", vm] + (["-u", user] if user else []) + ["--", "sh", "-c", script]
    return subprocess.run(argv, env={**c.env, "DRVS_NODE": node}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def d(fsc, request):
    """A fresh directory of the VM's file system for one test: (name, n1's view of it, n2's)."""
    name = request.node.name.replace("[", "-").replace("]", "")
    (view(fsc, "n1") / name).mkdir()
    return name, view(fsc, "n1") / name, view(fsc, "n2") / name


def test_written_in_a_jail_on_n1_is_read_in_a_jail_on_n2(fsc, d):
    name, _, _ = d
    w = jail(fsc, "n1", f"echo 'from n1' > /data/{name}/note && mkdir /data/{name}/sub && "
                        f"seq 1 10000 > /data/{name}/sub/numbers")
    assert w.returncode == 0, w.stderr
    r = jail(fsc, "n2", f"cat /data/{name}/note; wc -l < /data/{name}/sub/numbers; df -P /data | tail -1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["from n1", "10000"]
    assert lines[2].split()[0].startswith("drvs:") and lines[2].split()[-1] == "/data"
    assert int(lines[2].split()[1]) > 0  # the server's real size, not zero


def test_a_200_mb_file_written_on_n1_reads_the_same_on_n2(fsc, d, tmp_path):
    _, a, b = d
    src = tmp_path / "big"
    with open(src, "wb") as f:
        for _ in range(200):
            f.write(os.urandom(1 << 20))
    subprocess.run(["cp", str(src), str(a / "big")], check=True)
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    got = subprocess.run(["sha256sum", str(b / "big")], capture_output=True, text=True, check=True).stdout.split()[0]
    assert got == want
    assert (b / "big").stat().st_size == 200 << 20


def test_changes_on_one_node_are_seen_at_once_on_the_other(fsc, d):
    _, a, b = d
    (a / "f").write_text("v1")
    assert (b / "f").read_text() == "v1"          # n2 now caches f, its attributes and the directory
    assert sorted(os.listdir(b)) == ["f"]
    (a / "f").write_text("version two")           # close on n1 ...
    assert (b / "f").read_text() == "version two"  # ... then open on n2: the new data
    (a / "g").write_text("new")
    assert sorted(os.listdir(b)) == ["f", "g"]     # metadata at once, not after a timeout
    os.rename(a / "g", a / "h")
    assert not (b / "g").exists() and (b / "h").read_text() == "new"
    os.chmod(a / "h", 0o600)
    assert (b / "h").stat().st_mode & 0o777 == 0o600
    os.unlink(a / "h")
    assert not (b / "h").exists()
    with open(a / "f", "a") as f:
        f.write("+more")
    assert (b / "f").stat().st_size == len("version two+more")


def test_a_node_that_forgot_a_file_and_looks_again_still_hears_of_its_changes(fsc, d):
    """A node tells the server which inodes its kernel forgot (so that it
    is no longer told of their changes), with a later call; when that call
    is the lookup that makes its kernel cache the file again, the node
    must still be told of the file's changes, on the node that serves and
    on the one that does not."""
    _, a, b = d
    for here, there, name in ((a, b, "f"), (b, a, "g")):
        (here / name).write_text("x")
        os.chmod(here / name, 0o644)
        fd = os.open(there, os.O_RDONLY | os.O_DIRECTORY)  # the directory stays cached there
        try:
            assert os.stat(name, dir_fd=fd).st_mode & 0o777 == 0o644  # so does the file, for now
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")                               # its kernel forgets the file
            time.sleep(0.3)                                # (the kernel's FORGET reaches the node)
            # Looked up again: the notice travels with this very lookup.
            assert os.stat(name, dir_fd=fd).st_mode & 0o777 == 0o644
            os.chmod(here / name, 0o600)
            assert os.stat(name, dir_fd=fd).st_mode & 0o777 == 0o600  # still told at once
        finally:
            os.close(fd)


def test_a_hard_link_is_found_by_its_other_name_when_the_one_a_node_knew_went_unseen(fsc, d):
    """A node names a file by the last name it learned; once its kernel
    forgot that name's directory, the server no longer tells it of names
    going there.  Another node then removes that name, and the node looks
    into the directory again: the file, still cached by its other name,
    must be found by it (not ENOENT)."""
    _, a, b = d
    for here, there, tag in ((a, b, "1"), (b, a, "2")):
        (there / f"a{tag}").mkdir()
        (there / f"b{tag}").mkdir()
        (there / f"a{tag}" / "x").write_text("data")
        os.link(there / f"a{tag}" / "x", there / f"b{tag}" / "y")  # the name `there` knows it by last
        pinned = os.open(there / f"a{tag}" / "x", os.O_PATH)       # a/x stays in there's kernel
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("2")                                       # b/y and b go
            time.sleep(0.3)                                        # (the kernel's FORGETs reach the node)
            (there / f"new{tag}").write_text("")                   # its notices go with this call
            os.unlink(here / f"b{tag}" / "y")
            assert os.listdir(there / f"b{tag}") == []                # b is known there again
            st = os.stat(there / f"a{tag}" / "x")
            assert (st.st_nlink, (there / f"a{tag}" / "x").read_text()) == (1, "data")
        finally:
            os.close(pinned)


@pytest.mark.parametrize("seed", range(int(os.environ.get("DRVS_FS_WALKS", "3"))))
def test_random_operations_through_both_nodes_hold_what_posix_says(fsc, d, seed):
    """Creates, writes, renames, links, removals... each on a node chosen at
    random, each checked against a model: what one node did is what the
    next operation sees, on either node (tests/cluster/fsmodel.py).  One
    walk at a time, so that a seed that fails fails again: walks at once
    also race renames on one node against a directory another node moved,
    where Linux may answer ESTALE (docs/architecture.md)."""
    _, a, b = d
    try:
        Walk([str(a), str(b)], seed).run(2000)
    except Mismatch as e:
        slow = [line for node in ("n1", "n2") for line in
                (Path(fsc.node(node)["state_dir"]) / "drvmmd.log").read_text().splitlines() if "did not drop" in line]
        # (a node slower than the server's bound to drop what it was told is forgotten, not waited for)
        raise AssertionError(f"seed {seed}: {e}" + (f"\nnodes too slow to drop their caches: {slow[-3:]}"
                                                     if slow else "")) from None


def _drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_what_a_node_keeps_of_a_file_served_elsewhere_is_never_older_than_the_file(fsc, d):
    """Once its kernel dropped a file's pages, a node answers reads of a
    file served by the other node from its own cache (drvs/fs/cache.py):
    after the other node rewrote the file in place (same size) and closed
    it, and after it truncated it, the node reads the new data; also
    through a handle it kept open.  Both ways: whichever node serves."""
    _, a, b = d
    for here, there, name in ((a, b, "f"), (b, a, "g")):
        (here / name).write_bytes(b"1" * 300_000)
        assert (there / name).read_bytes() == b"1" * 300_000
        _drop_pages(there / name)
        assert (there / name).read_bytes() == b"1" * 300_000
        with open(there / name, "rb") as kept:
            with open(here / name, "r+b") as f:
                f.seek(4096)
                f.write(b"2" * 200_000)
            want = b"1" * 4096 + b"2" * 200_000 + b"1" * 95_904
            _drop_pages(there / name)
            assert os.pread(kept.fileno(), 300_000, 0) == want
            _drop_pages(there / name)
            assert (there / name).read_bytes() == want
        os.truncate(here / name, 10_000)
        _drop_pages(there / name)
        assert (there / name).read_bytes() == b"1" * 4096 + b"2" * 5904


def test_a_file_a_node_forgot_then_another_rewrote_is_read_new(fsc, d):
    """A node keeps the pages of a remote file its kernel forgot (the
    server no longer tells it of the file's changes); opened again, they
    serve only if the file's data is still the version they were read at:
    after the other node rewrote it in place -- same size, its mtime set
    back -- the node reads the new data.  Both ways."""
    _, a, b = d
    for here, there, name in ((a, b, "f"), (b, a, "g")):
        (here / name).write_bytes(b"1" * 300_000)
        assert (there / name).read_bytes() == b"1" * 300_000
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")  # the kernels forget the file (and its pages)
        time.sleep(1.5)  # (the nodes tell the server on their own within 1 s)
        st = os.stat(here / name)
        with open(here / name, "r+b") as f:
            f.write(b"2" * 300_000)
        os.utime(here / name, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert (there / name).read_bytes() == b"2" * 300_000


def test_a_listing_being_read_does_not_hand_out_what_another_node_removed(fsc, d):
    """A node reads a directory from a snapshot taken at its first
    readdir; entries another node removes meanwhile are not handed to its
    kernel afterwards (they would stand as files that are not there)."""
    _, a, b = d
    names = [f"f{i:03}" for i in range(600)]
    for name in names:
        (a / name).touch()
    it = os.scandir(b)
    try:
        first = [next(it).name for _ in range(10)]  # the C library now holds a bufferful
        for name in names:
            os.unlink(a / name)
        rest = [e.name for e in it]
    finally:
        it.close()
    assert len(first) + len(rest) < len(names)      # the rest of the snapshot was not handed out
    assert os.listdir(b) == []


def test_names_that_are_not_utf8_work_from_either_node(fsc, d):
    """A file name is bytes: one that is not UTF-8 is made, found, missed
    and refused with the errno a local file system gives, also where the
    server's reply is an error naming it."""
    _, a, b = d
    for here, there in ((a, b), (b, a)):
        sub = here / f"u8-{here is a}"
        os.mkdir(sub)
        far = os.fsencode(there / sub.name)
        with pytest.raises(FileNotFoundError):
            os.stat(far + b"/no\xe9")
        with open(far + b"/new\xe9", "wb") as f:
            f.write(b"latin-1")
        os.makedirs(far + b"/f\xe9/x")
        with pytest.raises(OSError) as e:
            os.rmdir(os.fsencode(sub) + b"/f\xe9")
        assert e.value.errno == errno.ENOTEMPTY
        assert sorted(os.listdir(os.fsencode(sub))) == [b"f\xe9", b"new\xe9"]
        assert open(os.fsencode(sub) + b"/new\xe9", "rb").read() == b"latin-1"


def test_a_listing_holds_dot_and_dotdot_and_every_entry_once(fsc, d):
    """As on a local file system: "." and ".." first, with the numbers
    stat gives the directory and its parent, then each entry once, over
    as many getdents calls as the names need."""
    _, a, b = d
    names = {f"n{i:04}-{'x' * 60}" for i in range(500)}
    (a / "sub").mkdir()
    for name in names:
        (a / "sub" / name).touch()
    listed = subprocess.run(["ls", "-f1i", str(b / "sub")], capture_output=True, text=True, check=True)
    rows = [line.split(None, 1) for line in listed.stdout.splitlines()]
    assert [name for _, name in rows[:2]] == [".", ".."]
    assert [int(ino) for ino, _ in rows[:2]] == [(b / "sub").stat().st_ino, b.stat().st_ino]
    assert len(rows) == len(names) + 2 and {name for _, name in rows[2:]} == names
    r = jail(fsc, "n2", f"ls -a /data/{d[0]}/sub | head -3")
    assert r.stdout.split() == [".", "..", sorted(names)[0]], r.stderr


def test_a_directory_changed_here_then_elsewhere_shows_the_latest_attributes(fsc, d):
    """A node keeps a directory's attributes from the reply to its own
    create or remove (the kernel drops its copy each time and would ask
    over the network); a change from the other node still shows at once."""
    _, a, b = d
    (a / "x").write_text("1")
    first = a.stat()
    os.chmod(b, 0o751)                 # n2 changes the directory's attributes only
    assert a.stat().st_mode & 0o777 == 0o751
    (a / "y").write_text("2")
    os.mkdir(b / "sub")                # n2 changes its entries: one link more, a new mtime
    st = a.stat()
    assert st.st_nlink == first.st_nlink + 1 and st.st_mtime_ns >= first.st_mtime_ns
    os.unlink(a / "x")                 # n1's own remove, then n2's
    os.rmdir(b / "sub")
    assert a.stat().st_nlink == first.st_nlink
    assert sorted(os.listdir(a)) == ["y"]


def test_names_a_node_knows_absent_appear_once_another_node_makes_them(fsc, d):
    """n1 made the directory, so it knows every name in it and answers a
    lookup of a missing one itself (no round trip for a create's lookup);
    n2 knows the names of what it made or listed.  What the other node then
    makes, moves in or links appears at once all the same."""
    _, a, b = d
    assert not (a / "x").exists()
    (b / "x").write_text("from n2")
    assert (a / "x").read_text() == "from n2"
    os.mkdir(b / "sub")
    assert not (b / "sub" / "y").exists()
    (a / "sub" / "y").write_text("from n1")
    assert (b / "sub" / "y").read_text() == "from n1"
    assert not (b / "sub" / "moved").exists()
    os.rename(a / "x", a / "sub" / "moved")
    assert (b / "sub" / "moved").read_text() == "from n2"
    assert sorted(os.listdir(a)) == ["sub"]
    assert sorted(os.listdir(b / "sub")) == ["moved", "y"]  # n2 listed it: it knows all its names
    assert not (b / "sub" / "z").exists()
    os.link(a / "sub" / "y", a / "sub" / "z")
    assert (b / "sub" / "z").read_text() == "from n1"
    os.rename(a / "sub" / "z", a / "z")
    assert not (b / "sub" / "z").exists() and (b / "z").read_text() == "from n1"
    with pytest.raises(FileExistsError):  # n2's own create of a name n1 made
        os.open(b / "sub" / "y", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_a_node_told_once_of_a_directory_still_sees_every_name_made_there(fsc, d):
    """n2 lists a directory and looks up names absent from it; n1 then
    makes them all.  The server tells n2 of the first only (n2 then drops
    every name its kernel held absent there, and the directory's
    attributes); each later one appears on n2 at once all the same."""
    _, a, b = d
    assert os.listdir(b) == []
    names = [f"f{i}" for i in range(6)]
    for name in names:
        assert not (b / name).exists()  # (n2's kernel keeps each absent)
    for name in names:
        (a / name).write_text(name)
    for name in reversed(names):
        assert (b / name).read_text() == name
    assert sorted(os.listdir(b)) == names
    assert b.stat().st_mtime_ns == a.stat().st_mtime_ns
    assert not (b / "g").exists()     # n2 looks again: it is told again
    (a / "g").write_text("g")
    assert (b / "g").read_text() == "g"
    os.unlink(a / names[0])           # a name n2 holds goes: it is told, whatever it looked at
    assert not (b / names[0]).exists()


def test_posix_semantics(fsc, d):
    _, a, b = d
    # rename replaces its target atomically, also across directories
    (a / "x").mkdir()
    (a / "old").write_text("old")
    (a / "x" / "new").write_text("new")
    os.rename(a / "x" / "new", a / "old")
    assert (b / "old").read_text() == "new" and not (b / "x" / "new").exists()
    # O_EXCL
    with pytest.raises(FileExistsError):
        os.open(b / "old", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    # O_APPEND from both nodes
    for v, text in ((a, "1"), (b, "2"), (a, "3")):
        fd = os.open(v / "log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        os.write(fd, text.encode())
        os.close(fd)
    assert (b / "log").read_text() == "123"
    # truncate, sparse files
    with open(a / "sparse", "wb") as f:
        f.seek(100 << 20)
        f.write(b"end")
    st = (b / "sparse").stat()
    assert st.st_size == (100 << 20) + 3 and st.st_blocks * 512 < (1 << 20)
    os.truncate(b / "sparse", 10)
    assert (a / "sparse").read_bytes() == b"\0" * 10
    # hard links: one inode, two names
    os.link(a / "log", a / "log2")
    s1, s2 = (b / "log").stat(), (b / "log2").stat()
    assert s1.st_ino == s2.st_ino and s1.st_nlink == 2
    # symbolic links are not followed by the server; the kernel follows them here
    os.symlink("log", a / "ln")
    assert os.readlink(b / "ln") == "log" and (b / "ln").read_text() == "123"
    # extended attributes (user.*)
    os.setxattr(a / "log", "user.color", b"blue")
    assert os.getxattr(b / "log", "user.color") == b"blue"
    assert "user.color" in os.listxattr(b / "log")
    os.removexattr(b / "log", "user.color")
    with pytest.raises(OSError) as e:
        os.getxattr(a / "log", "user.color")
    assert e.value.errno == errno.ENODATA
    # utimens, fsync, statfs
    os.utime(a / "log", ns=(1_000_000_000, 2_000_000_000))
    assert (b / "log").stat().st_mtime_ns == 2_000_000_000
    fd = os.open(a / "log", os.O_RDWR)
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert os.statvfs(a).f_blocks > 0
    # names too long, directories not empty
    with pytest.raises(OSError) as e:
        (a / ("n" * 256)).write_text("x")
    assert e.value.errno == errno.ENAMETOOLONG
    os.listdir(b)  # (n2 now knows the directory whole: a lookup there answers absent names itself)
    for look in (os.stat, os.lstat, os.readlink):
        with pytest.raises(OSError) as e:
            look(b / ("n" * 256))
        assert e.value.errno == errno.ENAMETOOLONG, look
    (b / "x" / "f").write_text("x")
    with pytest.raises(OSError) as e:
        os.rmdir(a / "x")
    assert e.value.errno == errno.ENOTEMPTY


def test_an_unlinked_open_file_keeps_its_data_until_closed(fsc, d):
    _, a, b = d
    (a / "f").write_text("still here")
    with open(b / "f") as reader:
        os.unlink(a / "f")
        assert not (b / "f").exists()
        assert reader.read() == "still here"
        assert os.fstat(reader.fileno()).st_nlink == 0


def test_an_open_file_whose_names_are_gone_is_reached_through_proc_fd(fsc, d):
    """As on a local file system: a program (or an administrator saving a
    deleted log) reopens it by /proc/PID/fd/N, truncates it, sets its
    attributes -- on the node that serves and on the other."""
    _, a, b = d
    for here, there in ((a, b), (b, a)):
        (here / "log").write_text("hello")
        fd = os.open(here / "log", os.O_RDONLY)
        try:
            os.unlink(there / "log")
            proc = f"/proc/self/fd/{fd}"
            w = os.open(proc, os.O_WRONLY)
            os.pwrite(w, b"J", 0)
            os.close(w)
            os.truncate(proc, 4)
            os.chmod(proc, 0o600)
            os.setxattr(proc, "user.kept", b"yes")
            st = os.fstat(fd)
            assert (os.pread(fd, 10, 0), st.st_size, st.st_mode & 0o777, os.getxattr(proc, "user.kept"),
                    os.listxattr(proc)) == (b"Jell", 4, 0o600, b"yes", ["user.kept"])
            os.removexattr(proc, "user.kept")
        finally:
            os.close(fd)
        # Replaced by rename on the other node: /proc still reaches the old file.
        (here / "cfg").write_text("old")
        fd = os.open(here / "cfg", os.O_RDONLY)
        try:
            (there / "cfg.new").write_text("new")
            os.rename(there / "cfg.new", there / "cfg")
            w = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
            os.pwrite(w, b"O", 0)
            os.close(w)
            assert (os.pread(fd, 10, 0), (here / "cfg").read_text()) == (b"Old", "new")
        finally:
            os.close(fd)


@pytest.mark.parametrize("access", [os.O_WRONLY, os.O_RDWR], ids=["write-only", "read-write"])
def test_appends_from_two_nodes_at_once_each_land_whole(fsc, d, access):
    """O_APPEND on both nodes at once, as two services sharing a log (>>,
    or fopen's "a+"): each write lands whole at the end, as on a local file
    system (through the page cache, a write ending in a page not read yet
    went as two requests, and the other node's append could land between
    them)."""
    _, a, b = d
    (a / "log").write_bytes(b"")

    def append(where: Path, tag: str) -> None:
        fd = os.open(where / "log", access | os.O_APPEND)
        try:
            for i in range(2000):
                os.write(fd, f"{tag}{i:06d}{'x' * 50}\n".encode())
        finally:
            os.close(fd)

    threads = [threading.Thread(target=append, args=(where, tag)) for where, tag in ((a, "A"), (b, "B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for where in (a, b):
        lines = (where / "log").read_bytes().split(b"\n")
        torn = [line for line in lines[:-1] if len(line) != 57]
        assert (len(lines) - 1, torn[:3]) == (4000, [])
        if access == os.O_RDWR:  # ("a+" reads back through the same handle)
            fd = os.open(where / "log", access | os.O_APPEND)
            try:
                assert os.pread(fd, 1 << 20, 0) == (where / "log").read_bytes()
            finally:
                os.close(fd)


def test_a_file_replaced_by_rename_on_one_node_is_always_opened_whole_on_the_other(fsc, d):
    """The atomic update of a configuration file: written beside, renamed
    over.  A reader on the other node opens the old one or the new one,
    never neither (an open by the name the kernel had looked up, made
    after the name changed, reached the new file under the old one's
    inode: the next read failed ESTALE, about one open in 500 here)."""
    _, a, b = d
    for writer, reader in ((a, b), (b, a)):
        (writer / "cfg").write_text("v0000" * 200)
        failed, reads, versions = [], 0, iter(range(1, 10000))

        def replace() -> None:
            (writer / "cfg.new").write_text(f"v{next(versions):04d}" * 200)
            os.rename(writer / "cfg.new", writer / "cfg")

        with _meanwhile(replace, 0.02):
            for _ in _for(4):
                try:
                    text = (reader / "cfg").read_text()
                    reads += 1
                    if text != text[:5] * 200:
                        failed.append(f"torn: {text[:12]}...")
                except OSError as e:
                    failed.append(os.strerror(e.errno))
        assert (failed[:3], reads > 100) == ([], True)


@contextlib.contextmanager
def _meanwhile(step, pause: float):
    """step() again and again in a thread, pause seconds apart, for the
    with block (a failure of step is the block's)."""
    stop, errors = threading.Event(), []

    def loop() -> None:
        try:
            while not stop.is_set():
                step()
                time.sleep(pause)
        except Exception as e:  # noqa: BLE001 - raised in the test's thread below
            errors.append(e)

    t = threading.Thread(target=loop)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
    if errors:
        raise errors[0]


def _for(seconds: float):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield


def _until(proc: subprocess.Popen, marker: str, timeout: float = 20) -> str:
    """proc's output up to the line marker (AssertionError if it ends or
    takes longer)."""
    import select

    out, deadline = "", time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([proc.stdout], [], [], left)[0], f"no {marker!r} in time: {out!r}"
        line = proc.stdout.readline()
        assert line, f"ended before {marker!r}: {out!r}, {proc.stderr.read()!r}"
        if line.strip() == marker:
            return out
        out += line


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_text() if p.is_file() else "/" for p in sorted(root.rglob("*"))}


def test_a_working_directory_another_node_moved_goes_on_working(fsc, d):
    """As on a local file system: a shell whose working directory another
    node renamed, then moved deeper, goes on with relative names there --
    listing, reading, creating, renaming -- and what it made is at the new
    place, on the other node and in both replicas' stores; once the
    directory is removed, names in it are ENOENT.  (The node lost the
    directory's path with the rename: it names it by its file handle.)
    Both ways: the shell where the server is and where it is not."""
    name, a, b = d
    stores = [Path(fsc.node(n)["state_dir"]) / "vms" / "web" / "fs" / "root" / name for n in ("n1", "n2")]
    logs = [Path(fsc.node(n)["state_dir"]) / "drvmmd.log" for n in ("n1", "n2")]
    resyncs = [log.read_text().count("out of sync") for log in logs]
    for here, there in ((b, a), (a, b)):
        (there / "proj" / "src").mkdir(parents=True)
        (there / "proj" / "src" / "f").write_text("hello\n")
        script = ("echo ready; read x; ls; cat f; echo made > g && mkdir sub && mv g h && echo one; read x; "
                  "ls; echo again > k && echo two; read x; cat f || echo failed; echo three")
        sh = subprocess.Popen(["sh", "-c", script], cwd=here / "proj" / "src", stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            _until(sh, "ready")
            os.rename(there / "proj", there / "moved")
            sh.stdin.write("go\n")
            sh.stdin.flush()
            assert _until(sh, "one") == "f\nhello\n"
            assert (sorted(os.listdir(there / "moved" / "src")), (there / "moved" / "src" / "h").read_text()) == (
                ["f", "h", "sub"], "made\n")
            (there / "deep").mkdir()
            os.rename(there / "moved", there / "deep" / "p")
            sh.stdin.write("go\n")
            sh.stdin.flush()
            assert _until(sh, "two") == "f\nh\nsub\n"
            want = {"p": "/", "p/src": "/", "p/src/f": "hello\n", "p/src/h": "made\n", "p/src/k": "again\n",
                    "p/src/sub": "/"}
            assert _tree(there / "deep") == want
            deadline = time.monotonic() + 10  # (the replica is told of changes after they are made)
            while [_tree(s / "deep") for s in stores] != [want, want] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert [_tree(s / "deep") for s in stores] == [want, want]
            # ... each change as it was made there (not by a copy after the replica failed one)
            assert [log.read_text().count("out of sync") for log in logs] == resyncs
            subprocess.run(["rm", "-r", there / "deep"], check=True)
            sh.stdin.write("go\n")
            sh.stdin.flush()
            gone = _until(sh, "three")
            assert "No such file or directory" in gone and gone.endswith("failed\n"), gone
        finally:
            sh.kill()
            sh.wait()


def test_a_directory_another_node_keeps_moving_is_listed_whole(fsc, d):
    """A program on n2 lists a directory it holds open (as `ls` in a
    working directory) while n1 renames it back and forth: every listing
    is whole, as on a local file system -- where a listing read in
    batches by path gave ESTALE (the path named another directory, or
    none, by the next batch) and, once the name had moved, every listing
    after."""
    _, a, b = d
    (a / "big").mkdir()
    for i in range(1500):
        (a / "big" / f"f{i:04d}").touch()
    fd = os.open(b / "big", os.O_RDONLY | os.O_DIRECTORY)
    counts, errors, names = [], [], [a / "big", a / "big2"]

    def move() -> None:
        os.rename(names[0], names[1])
        names.reverse()

    try:
        with _meanwhile(move, 0.002):
            for _ in _for(4):
                try:
                    counts.append(len(os.listdir(fd)))
                except OSError as e:
                    errors.append(os.strerror(e.errno))
    finally:
        os.close(fd)
    assert (errors[:3], len(counts) > 10, set(counts)) == ([], True, {1500})


def test_a_directory_another_node_moved_can_be_renamed_by_its_new_name(fsc, d):
    """n2 holds a file open below a directory; n1 moves the directory into
    another (by rename, or by exchanging it with a directory there); n2
    at once renames it by its new name to a third place, as a program
    would that was told where it went.  Linux looks a rename's source up
    under the file system's rename lock, and moving the dentry n2's kernel
    still holds needs that lock: ESTALE, every time, unless the node had
    already looked the new name up itself."""
    _, a, b = d
    for here, there, tag in ((b, a, "1"), (a, b, "2")):
        for how, i in [(how, i) for how in ("rename", "exchange") for i in range(5)]:
            x, p, z, w = (f"{c}{tag}{how}{i}" for c in "xpzw")
            (there / x).mkdir()
            (there / p / "y").mkdir(parents=True)
            (there / x / "f").write_text("x\n")
            (there / p / "y" / "f").write_text("y\n")
            if how == "rename":
                os.unlink(there / p / "y" / "f")
                os.rmdir(there / p / "y")
                assert not (here / p / "y").exists()  # (a name here's kernel may keep as absent)
            with open(here / x / "f") as held_x, contextlib.ExitStack() as stack:  # pin their dentries here
                if how == "rename":
                    os.rename(there / x, there / p / "y")
                else:
                    held_y = stack.enter_context(open(here / p / "y" / "f"))
                    _exchange(there, x, there / p, "y")
                    os.rename(here / x, here / p / w)  # (across directories: under the rename lock)
                    assert (held_y.read(), (there / p / w / "f").read_text()) == ("y\n", "y\n")
                os.rename(here / p / "y", here / z)
                assert (held_x.read(), (there / z / "f").read_text()) == ("x\n", "x\n")
            assert sorted(os.listdir(there)) == sorted(os.listdir(here))


def _exchange(d1: Path, n1: str, d2: Path, n2: str) -> None:
    """rename(2) with RENAME_EXCHANGE."""
    from drvs import _fs

    fds = [os.open(d1, os.O_PATH), os.open(d2, os.O_PATH)]
    try:
        _fs.renameat2(fds[0], os.fsencode(n1), fds[1], os.fsencode(n2), _fs.RENAME_EXCHANGE)
    finally:
        for fd in fds:
            os.close(fd)


def test_a_whiteout_rename_is_refused(fsc, d):
    """RENAME_WHITEOUT (overlayfs's) is not offered, as by NFS: EINVAL, and
    nothing moves (the server would make the device node unchecked)."""
    from drvs import _fs

    _, a, b = d
    (b / "A").write_text("a")
    fd = os.open(b, os.O_PATH)
    try:
        with pytest.raises(OSError) as e:
            _fs.renameat2(fd, b"A", fd, b"C", 4)  # (RENAME_WHITEOUT)
    finally:
        os.close(fd)
    assert e.value.errno == errno.EINVAL
    assert sorted(os.listdir(a)) == ["A"] and (a / "A").read_text() == "a"


def test_a_close_on_a_node_without_the_server_reaches_the_server(fsc, d):
    """Closes from a node whose server is elsewhere travel with its next
    call, or on their own soon after: the server lets go of the file."""
    name, a, b = d
    server = _df(fsc, "n1")["server"]
    there = a if server == "n2" else b  # a mount on the node without the server
    pid = fsc.node(server)["pid"]

    def held() -> list[str]:
        out = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if f"/{name}/doomed" in target:
                out.append(target)
        return out

    with open(there / "doomed", "w") as f:
        f.write("x" * 100_000)
        os.unlink(there / "doomed")
        assert held(), "the server holds the unlinked file while it is open"
    _wait(lambda: not held(), timeout=5)


def test_shared_writable_mappings_reach_the_file(fsc, d):
    import mmap

    _, a, b = d
    (a / "m").write_bytes(b"\0" * 8192)
    fd = os.open(a / "m", os.O_RDWR)
    try:
        m = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
        m[4096:4101] = b"hello"
        m.flush()
        m.close()
    finally:
        os.close(fd)
    assert (a / "m").read_bytes()[4096:4101] == b"hello"
    assert (b / "m").read_bytes()[4096:4101] == b"hello"  # and on the other node, after the close


def test_permissions_are_checked_for_users_other_than_root(fsc, d):
    name, a, b = d
    (a / "root-only").write_text("secret")
    os.chmod(a / "root-only", 0o600)
    os.chmod(a, 0o777)
    r = jail(fsc, "n2", f"cd /data/{name}; cat root-only; echo x > root-only; chmod 777 root-only; "
                        f"echo mine > mine; stat -c '%u %g %a' mine; chown 0 mine; touch -d @0 root-only; true",
             user="1000:1000")
    assert r.returncode == 0, r.stderr
    assert "cat: root-only: Permission denied" in r.stderr
    assert "root-only: Permission denied" in r.stderr.replace("can't create ", "")
    assert "chmod: root-only: Operation not permitted" in r.stderr or "Operation not permitted" in r.stderr
    assert r.stdout.split() == ["1000", "1000", "644"]
    assert (a / "root-only").read_text() == "secret" and (a / "mine").stat().st_uid == 1000
    assert (a / "root-only").stat().st_mode & 0o777 == 0o600


def test_a_users_write_drops_set_id_bits_also_where_the_server_is(fsc, d):
    """On the server's node a file opened only to write bypasses the
    kernel's pages, and the server drops the set-id bits the kernel would
    have: a user's write to a file made setuid and setgid while the user
    had it open loses them, as does one to a file set-id when opened."""
    name, a, b = d
    here = a if _df(fsc, "n1").get("server") == "n1" else b
    os.chmod(here, 0o777)
    for f in ("before", "during"):
        (here / f).write_text("v1")
    os.chmod(here / "before", 0o6777)
    os.chmod(here / "during", 0o777)
    script = (f"cd /data/{name}; printf v2 >> before; exec 3>>during; touch opened; "
              f"while [ ! -e go ]; do sleep 0.05; done; printf v2 >&3")
    node = "n1" if here == a else "n2"
    p = subprocess.Popen([str(BIN / "drvs-run"), "--vm", "web", "-u", "1000:1000", "--", "sh", "-c", script],
                         env={**fsc.env, "DRVS_NODE": node}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: (here / "opened").exists() or p.poll() is not None)
        os.chmod(here / "during", 0o6777)
        (here / "go").touch()
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    for f in ("before", "during"):
        assert (here / f).read_text() == "v1v2" and (here / f).stat().st_mode & 0o7777 == 0o777, f


def test_a_chown_just_after_a_write_drops_the_set_id_bits_and_keeps_the_size(d):
    """Linux asks the file system for a file's mode before every chown, to
    drop its set-id bits itself, and for its size after a write: the mode,
    owner and size are right at once, where the server is and where it is
    not (a guard for any node-side answer to those questions)."""
    name, a, b = d
    for here, there in ((a, b), (b, a)):
        fd = os.open(here / "setid", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.fchmod(fd, 0o6755)
            os.write(fd, b"x" * 100)
            os.fchown(fd, 1000, 1000)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_size) == (0o755, 1000, 100), here
        st = (there / "setid").stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_size) == (0o755, 1000, 100), there
        os.unlink(here / "setid")


def test_real_tools_over_the_file_system(fsc, d, tmp_path):
    name, a, b = d
    src = Path(__file__).resolve().parents[2] / "drvs"
    subprocess.run(f"tar -C {src.parent} -cf - --exclude=__pycache__ drvs | tar -C {a} -xf -", shell=True, check=True)
    subprocess.run(f"tar -C {b} -cf {tmp_path}/back.tar drvs && mkdir {tmp_path}/x && tar -C {tmp_path}/x -xf "
                   f"{tmp_path}/back.tar && diff -r -x __pycache__ {src} {tmp_path}/x/drvs", shell=True, check=True)
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "-c", "safe.directory=*"]
    subprocess.run(git + ["init", "-q", str(a / "drvs")], check=True)
    subprocess.run(git + ["-C", str(a / "drvs"), "add", "-A"], check=True)
    subprocess.run(git + ["-C", str(a / "drvs"), "commit", "-qm", "import"], check=True)
    log = subprocess.run(git + ["-C", str(b / "drvs"), "log", "--oneline"], capture_output=True, text=True, check=True)
    assert log.stdout.strip().endswith("import")
    status = subprocess.run(git + ["-C", str(b / "drvs"), "status", "--porcelain"], capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout == ""
    subprocess.run([PY, "-m", "compileall", "-q", str(b / "drvs")], check=True)
    assert list((a / "drvs" / "__pycache__").glob("*.pyc"))
    db = "CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);"
    subprocess.run(["sqlite3", str(a / "db"), db], check=True)
    subprocess.run(["sqlite3", str(b / "db"), "INSERT INTO t VALUES (3);"], check=True)
    total = subprocess.run(["sqlite3", str(a / "db"), "SELECT sum(x) FROM t; PRAGMA integrity_check;"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert total == ["6", "ok"]


@pytest.fixture
def mine(fsc, request):
    """A directory n2 made (the server, n1, delegates it to n2): (name, n1's
    view of it, n2's)."""
    name = request.node.name.replace("[", "-").replace("]", "")
    (view(fsc, "n2") / name).mkdir()
    return name, view(fsc, "n1") / name, view(fsc, "n2") / name


def test_unlinks_sent_behind_are_made_before_another_node_looks(fsc, mine):
    """n2 removes the files it made in a directory it made: its unlinks
    are answered at once and sent behind, yet the server's node, looking
    the moment the last one returned, finds none of them, as does n2."""
    _, a, b = mine
    for round_ in range(3):
        names = [f"f{round_}-{i}" for i in range(300)]
        for name in names:
            (b / name).write_bytes(b"x" * 100)
        for name in names:
            os.unlink(b / name)
        assert os.listdir(a) == [], round_  # (the delegation recalled: n2's unlinks came first)
        assert os.listdir(b) == []
        assert not (a / names[-1]).exists()
        # n2 has its delegation back only for directories it makes anew:
        # from now on, its unlinks here are answered by the server
        (b / "again").write_text("x")
        os.unlink(b / "again")
        assert not (a / "again").exists()


def test_a_name_unlinked_behind_and_made_again_holds_the_new_file(fsc, mine):
    """An unlink sent behind, then a create of the same name (which waits
    for it), then a write: both nodes read the new file."""
    _, a, b = mine
    for i in range(50):
        (b / "f").write_text(f"old {i}")
        os.unlink(b / "f")
        (b / "f").write_text(f"new {i}")
    assert (b / "f").read_text() == "new 49"
    assert (a / "f").read_text() == "new 49"


def test_a_file_unlinked_behind_while_open_keeps_its_data(fsc, mine):
    _, a, b = mine
    fd = os.open(b / "open", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"still here")
        os.unlink(b / "open")
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100, 0) == b"still here"
        assert os.listdir(a) == []
    finally:
        os.close(fd)


def test_unlinks_sent_behind_are_made_before_another_node_moves_the_tree(fsc, mine):
    """n2's queued unlinks name their files by path: another node renaming
    a directory above them first takes every delegation back, so they are
    made where the files were, not lost."""
    _, a, b = mine
    for round_ in range(3):
        (a / "top").mkdir()  # (n1's: not delegated)
        (b / "top" / "sub").mkdir()  # (n2's)
        names = [f"f{i}" for i in range(100)]
        for name in names:
            (b / "top" / "sub" / name).write_text(name)
        for name in names:
            os.unlink(b / "top" / "sub" / name)
        os.rename(a / "top", a / "moved")
        assert os.listdir(a / "moved" / "sub") == [], round_
        assert os.listdir(b / "moved" / "sub") == []
        os.rmdir(b / "moved" / "sub")
        os.rmdir(b / "moved")


def test_a_delegation_its_node_cannot_give_back_ends_once_its_lease_ran_out(cluster_factory):
    """n2's daemon is stopped while it holds a directory: n1's listing waits
    out the recall (2 s) and then n2's lease (5 s from its last call: n2
    may still be unlinking behind until then), and goes on.  Back, n2 no
    longer holds the directory: its unlinks there are seen from n1 at once."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
    a, b = view(c, "n1"), view(c, "n2")
    _wait(lambda: _df(c, "n1").get("server") == "n1")
    (b / "d").mkdir()
    for name in ("f1", "f2"):
        (b / "d" / name).write_text(name)
    os.listdir(b / "d")  # (a listing waits for what n2 sent behind: its creates, made)
    daemon = c.node("n2")["pid"]
    os.kill(daemon, signal.SIGSTOP)
    try:
        names, took = _timed(lambda: sorted(os.listdir(a / "d")))
    finally:
        os.kill(daemon, signal.SIGCONT)
    assert names == ["f1", "f2"] and 4 < took < 12, (names, took)
    (b / "elsewhere").write_text("x")  # (calls n1 answers: n2's lease is new, and it hears of the directory taken)
    os.unlink(b / "d" / "f1")
    assert os.listdir(a / "d") == ["f2"]


def test_a_delegated_directory_another_node_wrote_in_is_unlinked_in_line(fsc, mine):
    """n1 makes a file in n2's directory (recalled), n2 removes it and its
    own: every one is gone from both, and what n2 made after is kept."""
    _, a, b = mine
    (b / "by-n2").write_text("2")
    (a / "by-n1").write_text("1")
    os.unlink(b / "by-n1")
    os.unlink(b / "by-n2")
    (b / "kept").write_text("k")
    assert sorted(os.listdir(a)) == ["kept"]
    assert sorted(os.listdir(b)) == ["kept"]


def test_a_third_node_looking_into_a_delegated_directory_finds_the_unlinks_made(cluster_factory):
    """Server n1; n2 makes a directory and files there, then removes them
    (sent behind); n3, looking the moment the last unlink returned, finds
    none: n1 recalled n2's delegation, and n2 answered once its unlinks
    were made.  n3 then makes a file there, and n2's unlinks are answered
    by the server: n1 and n3 see them at once."""
    c = cluster_factory(nodes=3)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--node", "n3", node="n1", check=True)
    a, b, x = view(c, "n1"), view(c, "n2"), view(c, "n3")
    _wait(lambda: _df(c, "n1").get("server") == "n1")
    os.listdir(x)  # (n3 knows the root: its look into d below is one call)
    for round_ in range(5):
        d = f"d{round_}"
        (b / d).mkdir()
        names = [f"f{i}" for i in range(100)]
        for name in names:
            (b / d / name).write_text(name)
        for name in names:
            os.unlink(b / d / name)
        assert not (x / d / names[-1]).exists(), round_
        assert os.listdir(x / d) == [] and os.listdir(a / d) == []
    (x / d / "from-n3").write_text("3")
    (b / d / "from-n2").write_text("2")
    os.unlink(b / d / "from-n2")
    os.unlink(b / d / "from-n3")
    assert os.listdir(x / d) == [] and os.listdir(a / d) == []


def test_files_written_behind_are_whole_on_another_node_at_once(fsc, mine):
    """n2 makes, writes, stamps, chowns and chmods files in directories it
    made, as tar extracts (all answered on n2 and sent behind, up to 1 MiB
    a file): n1, looking the moment the last close returned, reads each
    whole, with the mode, owner, size and mtime n2 shows."""
    _, a, b = mine
    sizes = [3 << 20, 0, 1, 4096, 70000, 300000]  # (the first: beyond what one file writes behind)
    for round_ in range(3):
        (b / f"r{round_}").mkdir()  # (a directory anew: once n1 looked into one, n2 holds it no more)
        made = {}
        for i, size in enumerate(sizes):
            name, data = f"r{round_}/f{i}", os.urandom(size)
            fd = os.open(b / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                for off in range(0, size, 65536):
                    os.write(fd, data[off:off + 65536])
                if i % 2 == 0:
                    os.utime(fd, ns=(1_500_000_000_000_000_000 + i, 1_600_000_000_000_000_000 + i))
                os.fchown(fd, 1000 + i, 2000 + i)
                os.fchmod(fd, 0o640 + i)
            finally:
                os.close(fd)
            made[name] = data
        seen_b = {name: os.stat(b / name) for name in made}
        for name, data in made.items():
            sa, sb = os.stat(a / name), seen_b[name]
            assert (a / name).read_bytes() == data, (round_, name)
            assert ((sa.st_mode, sa.st_uid, sa.st_gid, sa.st_size, sa.st_mtime_ns)
                    == (sb.st_mode, sb.st_uid, sb.st_gid, sb.st_size, sb.st_mtime_ns)), (round_, name)
            assert stat.S_IMODE(sa.st_mode) == 0o640 + int(name[-1]) and sa.st_uid == 1000 + int(name[-1])


def test_a_sparse_file_written_behind_is_sparse_to_du_at_once(fsc, mine):
    """A byte written 1 GiB into a new file on n2 (answered there, sent
    behind): its size is the whole, its blocks those written, on n2 at
    once (du, and tools that look for holes, trust st_blocks)."""
    _, a, b = mine
    fd = os.open(b / "sparse", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, b"end", 1 << 30)
        st = os.fstat(fd)
        assert (st.st_size, st.st_blocks <= 16) == ((1 << 30) + 3, True), st.st_blocks
    finally:
        os.close(fd)
    st = os.stat(b / "sparse")
    assert (st.st_size, st.st_blocks <= 16) == ((1 << 30) + 3, True), st.st_blocks
    assert os.stat(a / "sparse").st_blocks <= 16  # (as the server's disk has it)


def test_files_a_user_makes_behind_are_theirs_on_every_node(fsc, d):
    """User 1000, in a jail on n2, makes a directory and files in it (made
    on n2 from files the server made ahead, and sent behind), removes one,
    renames one and rewrites one: n1 sees at once exactly those names, each
    with the user's owner, the mode its umask gave and its contents."""
    name, a, b = d
    os.chmod(a, 0o777)
    r = jail(fsc, "n2", f"cd /data/{name} && umask 027 && mkdir u && cd u && "
                        "for i in $(seq 1 60); do echo $i > f$i; done && rm f7 && mv f8 g8 && echo x > f60 && "
                        ": > e && stat -c '%n %u %g %a %s %Y' f1 g8 f60 e", user="1000:1000")
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(a / "u"))
    assert names == sorted([f"f{i}" for i in range(1, 61) if i not in (7, 8)] + ["g8", "e"])
    for n in names:
        st = os.stat(a / "u" / n)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o640), n
        assert (a / "u" / n).read_text() == {"f60": "x\n", "e": ""}.get(n, n[1:] + "\n"), n
    seen = [f"{n} {st.st_uid} {st.st_gid} {stat.S_IMODE(st.st_mode):o} {st.st_size} {int(st.st_mtime)}"
            for n, st in ((n, os.stat(a / "u" / n)) for n in ("f1", "g8", "f60", "e"))]
    assert r.stdout.split("\n")[:4] == seen  # (e's as n2's kernel kept them from the create's reply)


def test_a_tree_extracted_on_a_node_without_the_server_compares_equal_on_the_server(fsc, mine, tmp_path):
    """tar x on n2 into a directory it made (its writes, owners, modes and
    times sent behind): tar --compare, run on n1 right after, finds the
    tree as archived."""
    _, a, b = mine
    tarball = tmp_path / "src.tar"
    subprocess.run(["tar", "-C", str(Path(__file__).resolve().parents[2]), "-cf", str(tarball),
                    "--exclude=__pycache__", "drvs", "tests"], check=True)
    subprocess.run(["tar", "-C", str(b), "-xf", str(tarball)], check=True)
    r = subprocess.run(["tar", "-C", str(a), "--compare", "-f", str(tarball)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("killed", ["n1", "n2"])
def test_writes_sent_behind_are_durable_once_fsynced(cluster_factory, killed):
    """n2 writes and fsyncs files in a directory it made (their writes
    sent behind, the fsync after them); the moment the last fsync returned,
    the server's node (n1) or the writer's own daemon (n2, with what it had
    yet to send) is killed: the other node has every file whole."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
    a, b = view(c, "n1"), view(c, "n2")
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"])
    (b / "mine").mkdir()
    made = {}
    for i in range(30):
        data = os.urandom(1000 * i)
        fd = os.open(b / "mine" / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
            made[f"f{i}"] = data
            if i == 29:
                os.kill(c.node(killed)["pid"], signal.SIGKILL)
        finally:
            with contextlib.suppress(OSError):  # (ENOTCONN: n2's daemon is gone)
                os.close(fd)
    left = a if killed == "n2" else b
    if killed == "n1":
        _wait(lambda: _df(c, "n2").get("server") == "n2")
    for name, data in made.items():
        assert (left / "mine" / name).read_bytes() == data, name


def test_a_directory_fsync_makes_the_creates_sent_behind(cluster_factory):
    """n2 makes empty files in a directory it made (created behind) and
    fsyncs the directory, as programs do for marker and lock files; its
    daemon killed the moment that returned, n1 lists every one."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
    a, b = view(c, "n1"), view(c, "n2")
    _wait(lambda: _df(c, "n1").get("server") == "n1")
    (b / "mine").mkdir()
    (b / "mine" / "first").touch()  # (made in line: n2 asks for files made ahead)
    time.sleep(0.5)
    names = [f"marker{i}" for i in range(30)]
    dfd = os.open(b / "mine", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=dfd))
        os.fsync(dfd)
        os.kill(c.node("n2")["pid"], signal.SIGKILL)
    finally:
        with contextlib.suppress(OSError):
            os.close(dfd)
    assert sorted(os.listdir(a / "mine")) == sorted(names + ["first"])


def test_what_a_node_sent_behind_to_a_server_that_died_is_made_by_the_next(cluster_factory):
    """n1, the server, stops; n2 makes, writes and closes files in a
    directory it made (answered on n2 from files n1 made ahead, all sent
    behind, none made); n1 is killed: n2 takes over and has every file
    whole -- its queue made again there, the creates in line."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
    b = view(c, "n2")
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"])
    (b / "mine").mkdir()
    (b / "mine" / "first").write_text("made in line: n2 asks for files made ahead")
    time.sleep(0.5)
    server = c.node("n1")["pid"]
    os.kill(server, signal.SIGSTOP)
    made = {}
    fd = None
    try:
        for i in range(20):
            made[f"f{i}"] = os.urandom(700 * i)
            (b / "mine" / f"f{i}").write_bytes(made[f"f{i}"])
        fd = os.open(b / "mine" / "open", os.O_CREAT | os.O_WRONLY, 0o644)  # (kept open across)
        os.write(fd, b"before ")
    finally:
        os.kill(server, signal.SIGKILL)
        os.kill(server, signal.SIGCONT)
    try:
        _wait(lambda: _df(c, "n2").get("server") == "n2")
        os.write(fd, b"after")  # (its handle: the one the new server gave when the create was made again)
        try:
            os.fsync(fd)
        except OSError as e:  # (once: it had writes of the ended term, as after any fail-over)
            assert e.errno == errno.EIO
            os.fsync(fd)
    finally:
        os.close(fd)
    made["open"] = b"before after"
    for name, data in made.items():
        assert (b / "mine" / name).read_bytes() == data, name
    assert sorted(os.listdir(b / "mine")) == sorted([*made, "first"])


def test_renames_and_unlinks_racing_from_two_nodes(fsc, d):
    _, a, b = d
    for i in range(20):
        (a / f"f{i}").write_text(str(i))
    errors = []

    def churn(v, tag):
        try:
            for _ in range(5):
                for i in range(20):
                    try:
                        os.rename(v / f"f{i}", v / f"{tag}{i}")
                        os.rename(v / f"{tag}{i}", v / f"f{i}")
                    except FileNotFoundError:
                        pass  # the other node has it under its name now
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = [threading.Thread(target=churn, args=(a, "a")), threading.Thread(target=churn, args=(b, "b"))]
    for x in t:
        x.start()
    for x in t:
        x.join()
    assert not errors
    names_a, names_b = sorted(os.listdir(a)), sorted(os.listdir(b))
    assert names_a == names_b and len(names_a) == 20
    assert sorted(int((a / n).read_text()) for n in names_a) == list(range(20))


APPENDER = r"""
import errno, os, sys, time
path, stop = sys.argv[1], sys.argv[2]
n, errors = 0, {}
while not os.path.exists(stop):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, b"line\n")
        os.close(fd)
        n += 1
    except OSError as e:
        errors[errno.errorcode[e.errno]] = errors.get(errno.errorcode[e.errno], 0) + 1
print(n, errors)
"""


@pytest.mark.parametrize("how", ["unlink", "rename"])
def test_an_o_creat_open_never_fails_when_another_node_takes_the_name_away(fsc, d, tmp_path, how):
    """n2 opens a log with O_CREAT|O_APPEND, line after line, while n1
    removes it (or rotates it away by a rename): as on a local file
    system, every open succeeds, making the file again where it is gone
    (the kernel's cached name is looked up again, not failed ENOENT)."""
    _, a, b = d
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", APPENDER, str(b / "log"), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 4
        k = 0
        while time.monotonic() < deadline:
            try:
                os.unlink(a / "log") if how == "unlink" else os.rename(a / "log", a / f"log.{k}")
                k += 1
            except FileNotFoundError:
                pass
            time.sleep(0.01)
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=30)
    assert writer.returncode == 0, err
    lines, errors = out.split(" ", 1)
    assert int(lines) > 100 and errors.strip() == "{}" and k > 20, (out, k)


def test_drvs_mount_umount_and_df(fsc, d, tmp_path):
    name, a, _ = d
    (a / "hello").write_text("hi")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = fsc.drvs("mount", "web", str(mnt), node="n2")
    assert m.returncode == 0, m.stderr
    # (a host's locks are its node kernel's: said, as they do not hold against other nodes)
    assert m.stderr == (f"drvs mount: note: fcntl and flock locks taken through {mnt} hold on this node only: "
                        "programs that share files with other nodes by locking them (SQLite...) belong in the "
                        "VM (drvs-run, drvs login)\n")
    try:
        assert (mnt / name / "hello").read_text() == "hi"
        fm = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", str(mnt)], capture_output=True, text=True)
        assert fm.stdout.split() == ["drvs:n2[/fs/web]", "fuse.drvs"]
        again = fsc.drvs("mount", "web", str(mnt), node="n2")
        assert again.returncode == 4 and "already mounted" in again.stderr
    finally:
        u = fsc.drvs("umount", str(mnt))
    assert u.returncode == 0, u.stderr
    assert not os.path.ismount(mnt)
    # acting as n1 (--node before the command, or DRVS_NODE), the view of n2 (mount's own --node)
    m = fsc.drvs("mount", "web", str(mnt), "--node", "n2", node="n1")
    assert m.returncode == 0, m.stderr
    try:
        fm = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True, text=True)
        assert fm.stdout.split() == ["drvs:n2[/fs/web]"] and (mnt / name / "hello").read_text() == "hi"
    finally:
        assert fsc.drvs("umount", str(mnt)).returncode == 0
    u = fsc.drvs("umount", str(mnt))
    assert u.returncode == 3 and "no drvs file system is mounted" in u.stderr
    u = fsc.drvs("umount", str(tmp_path / "missing"))
    assert (u.returncode, u.stderr) == (3, f"drvs: {tmp_path / 'missing'}: no such file or directory\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine").write_text("")
    m = fsc.drvs("mount", "web", str(tmp_path / "full"), node="n1")
    try:
        assert m.returncode == 0 and f"note: {tmp_path / 'full'} was not empty" in m.stderr, m.stderr
    finally:
        assert fsc.drvs("umount", str(tmp_path / "full")).returncode == 0
    assert (tmp_path / "full" / "mine").exists()
    # a busy mount point is a conflict, saying why; nothing is unmounted
    assert fsc.drvs("mount", "web", str(mnt), node="n1").returncode == 0
    try:
        with open(mnt / name / "hello"):
            busy = fsc.drvs("umount", str(mnt))
            assert busy.returncode == 4 and "busy (files are open there" in busy.stderr and os.path.ismount(mnt)
        inner = mnt / name
        assert fsc.drvs("mount", "web", str(inner), node="n1").returncode == 0
        try:
            busy = fsc.drvs("umount", str(mnt))
            assert busy.returncode == 4 and f"busy ({inner} is mounted below it)" in busy.stderr
        finally:
            assert fsc.drvs("umount", str(inner)).returncode == 0
    finally:
        assert fsc.drvs("umount", str(mnt)).returncode == 0
    (tmp_path / "plain").write_text("")
    p = fsc.drvs("mount", "web", str(tmp_path / "plain"), node="n1")
    assert (p.returncode, p.stderr) == (2, f"drvs: mount point {tmp_path / 'plain'}: not a directory\n")
    p = fsc.drvs("mount", "web", str(tmp_path / "plain" / "x"), node="n1")  # (a file on the way)
    assert (p.returncode, p.stderr) == (2, f"drvs: mount point {tmp_path / 'plain' / 'x'}: not a directory\n")
    # a symbolic link to the mount point is followed, as mount(8) and umount(8) do
    (tmp_path / "link").symlink_to("mnt")
    assert fsc.drvs("mount", "web", str(tmp_path / "link"), node="n1").returncode == 0
    try:
        assert os.path.ismount(mnt) and (tmp_path / "link" / name / "hello").read_text() == "hi"
    finally:
        u = fsc.drvs("umount", str(tmp_path / "link"))
        if os.path.ismount(mnt):  # (not left behind when the check fails)
            subprocess.run(["umount", "-l", str(mnt)])
    assert u.returncode == 0, u.stderr
    # an empty mount point is not the current directory; a node's own view is not drvs mount's to unmount
    empty = fsc.drvs("mount", "web", "", node="n1")
    assert empty.returncode == 2 and "empty mount point" in empty.stderr
    view = next(Path(line.split()[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if " - fuse.drvs " in line and line.split()[3] == "/"
                and line.split()[4].startswith(fsc.node("n2")["state_dir"] + "/"))
    own = fsc.drvs("umount", str(view))
    assert own.returncode == 2 and "own view" in own.stderr and os.path.ismount(view)
    bad = fsc.drvs("mount", "nosuch", str(mnt), node="n1")
    assert bad.returncode != 0 and "no such VM" in bad.stderr and "Traceback" not in bad.stderr
    df = fsc.drvs("df", "web", "--format", "json", node="n1")
    assert df.returncode == 0, df.stderr
    row, = json.loads(df.stdout)
    assert row["vm"] == "web" and row["nodes"] == ["n1", "n2"] and row["replicas"] == 2
    assert row["server"] in ("n1", "n2") and row["used"] > 0 and row["size"] > row["used"]
    header, line = fsc.drvs("df", "web", node="n1").stdout.splitlines()[:2]
    assert header.split() == ["VM", "USED", "DISK", "AVAIL", "REPLICAS", "SERVER", "IN", "SYNC", "NODES"]
    assert line.split()[0] == "web" and line.split()[4:6] == ["2", row["server"]]  # (the VM's bytes, then its disk's)
    # node ls says which node hosts fs@web (a status is refreshed every second)
    _wait(lambda: "fs@web" in (fsc.nodes()[row["server"]]["load"] or {}).get("servers", ()))


def test_vm_rm_minds_only_its_own_clusters_mounts(cluster_factory, tmp_path):
    """Two dev clusters on one host, each with a VM web: the other's web
    mounted here neither keeps this one from going nor is unmounted."""
    mine, other = cluster_factory(nodes=1), cluster_factory(nodes=1)
    for c in (mine, other):
        c.drvs("vm", "create", "web", "--node", "n1", "--fs-replicas", "1", node="n1", check=True)
        view(c, "n1")
    (view(other, "n1") / "kept").write_text("other's")
    mnt = tmp_path / "other"
    mnt.mkdir()
    other.drvs("mount", "web", str(mnt), node="n1", check=True)
    try:
        p = mine.drvs("vm", "rm", "web", node="n1")
        assert p.returncode == 0, p.stderr
        assert os.path.ismount(mnt) and (mnt / "kept").read_text() == "other's"
    finally:
        other.drvs("umount", str(mnt))


def test_a_vm_whose_file_system_is_mounted_is_busy(fsc, tmp_path):
    """vm rm refuses a VM whose file system drvs mount bound on this host
    (exit 4, naming where); --force detaches those mounts with the VM."""
    fsc.drvs("vm", "create", "scratch", "--node", "n1", "--fs-replicas", "1", node="n1", check=True)
    mnt = tmp_path / "scratch"
    mnt.mkdir()
    try:
        m = fsc.drvs("mount", "scratch", str(mnt), node="n1")
        assert m.returncode == 0, m.stderr
        # with two VM file systems in use on n1, statfs(2) and fstatfs(2) of
        # a host mount report the one it shows (the caller's call says which)
        row, = json.loads(fsc.drvs("df", "scratch", "--format", "json", node="n1", check=True).stdout)
        st = os.statvfs(mnt)
        assert st.f_blocks * st.f_frsize == row["size"] > 0
        fd = os.open(mnt, os.O_RDONLY)
        try:
            st = os.fstatvfs(fd)
        finally:
            os.close(fd)
        assert st.f_blocks * st.f_frsize == row["size"]
        p = fsc.drvs("vm", "rm", "scratch", node="n1")
        assert p.returncode == 4 and f"mounted on {mnt}" in p.stderr, p.stderr
        assert os.path.ismount(mnt)
        fsc.drvs("vm", "rm", "scratch", "--force", node="n1", check=True)
        assert not os.path.ismount(mnt)
        assert "scratch" not in fsc.drvs("vm", "ls", node="n2", check=True).stdout
        # made again under its name, it is another file system: the node that
        # used the old one serves the new one (not the old one's stale inodes)
        fsc.drvs("vm", "create", "scratch", "--node", "n1", "--fs-replicas", "1", node="n1", check=True)
        again = view(fsc, "n1", "scratch")
        (again / "new").write_text("fresh")
        assert sorted(os.listdir(again)) == ["new"] and (again / "new").read_text() == "fresh"
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)])
        fsc.drvs("vm", "rm", "scratch", "--force", node="n1")


WRITER = r"""
import errno, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
i = 0
while not os.path.exists(sys.argv[2]):
    os.write(fd, b"%d\n" % i)
    try:
        os.fsync(fd)
    except OSError as e:
        # EIO: the line may be lost (its server died before its replica had
        # it); as a careful program does, look, and write it again if so.
        if e.errno != errno.EIO:
            raise
        print("fsync EIO at", i, file=sys.stderr)
        with open(sys.argv[1], "rb") as f:
            if f.read().split()[-1:] != [b"%d" % i]:
                os.write(fd, b"%d\n" % i)
        os.fsync(fd)
    print(i, flush=True)  # acknowledged: written and fsync'ed
    i += 1
    time.sleep(0.005)
os.close(fd)
"""


def _restart_drvmmd(c, name) -> subprocess.Popen:
    from drvs.cluster.context import setns_net

    node = c.node(name)
    log = open(Path(node["state_dir"]) / "drvmmd.log", "ab")
    return subprocess.Popen([str(BIN / "drvmmd")], env={**c.env, "DRVS_STATE_DIR": node["state_dir"]},
                            stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: setns_net(f"/run/netns/{node['netns']}"))


def _df(c, via):
    p = c.drvs("df", "web", "--format", "json", node=via)
    return json.loads(p.stdout)[0] if p.returncode == 0 else {}


def _wait(what, timeout=30):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_fsynced_writes_survive_the_serving_node_and_a_returning_node_catches_up(cluster_factory, tmp_path):
    """n2 writes and fsyncs lines, through one open file, while n1 (the
    server) is killed: n2's replica takes over within seconds, the same
    open file goes on, and every acknowledged line is there.  n1 comes
    back, is copied to, and can then serve alone: n2 is killed in turn."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
    a, b = view(c, "n1"), view(c, "n2")
    (a / "before").write_text("made while n1 served\n")
    (a / "dir").mkdir()
    for obj in ("before", "dir"):  # (a copy to a returning node carries them too)
        os.setxattr(a / obj, "user.kept", obj.encode())
    (a / "link").symlink_to("before")
    os.utime(a / "link", ns=(10**18, 10**18), follow_symlinks=False)
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"])
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(b / "log"), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    restarted = None
    try:
        _wait(lambda: (b / "log").exists() and (b / "log").stat().st_size > 200)
        os.kill(c.node("n1")["pid"], 9)
        t0 = time.monotonic()
        _wait(lambda: _df(c, "n2").get("server") == "n2")
        took_over = time.monotonic() - t0
        time.sleep(1)  # n2 now serves itself: writes go on
        stop.touch()
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        acked = out.split()
        assert len(acked) > 50
        lines = (b / "log").read_text().split()
        assert lines[:len(acked)] == acked  # none lost, none twice, in order
        assert took_over < 15
        assert (b / "before").read_text() == "made while n1 served\n"

        restarted = _restart_drvmmd(c, "n1")
        _wait(lambda: _df(c, "n2").get("in_sync") == ["n1", "n2"], timeout=60)
        os.kill(c.node("n2")["pid"], 9)
        _wait(lambda: _df(c, "n1").get("server") == "n1", timeout=30)
        assert (a / "log").read_text().split()[:len(acked)] == acked
        assert (a / "before").read_text() == "made while n1 served\n"
        assert [os.getxattr(a / obj, "user.kept") for obj in ("before", "dir")] == [b"before", b"dir"]
        assert os.lstat(a / "link").st_mtime_ns == 10**18
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        if restarted is not None:
            restarted.terminate()
            restarted.wait(timeout=20)


UNSYNCED = r"""
import errno, os, sys, time
path, stop = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
print("writing", flush=True)
while not os.path.exists(stop):
    os.write(fd, os.urandom(1 << 20))  # (never fsync'ed)
    time.sleep(0.02)
try:
    os.close(fd)
    print("close ok")
except OSError as e:
    print("close", errno.errorcode[e.errno])
"""


def _fsync_errno(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def _two_replicas(c) -> tuple[str, str]:
    """VM web on n1 and n2, both replicas in sync: (the serving node, the other)."""
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
    view(c, "n1"), view(c, "n2")
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"])
    server = _df(c, "n1")["server"]
    return server, "n2" if server == "n1" else "n1"


def _write_across(path: Path, stop: Path, event) -> str:
    """A program writing path (UNSYNCED) while event() happens, and for a
    second after: what it said of its close."""
    writer = subprocess.Popen([sys.executable, "-c", UNSYNCED, str(path), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        time.sleep(0.5)
        event()
        time.sleep(1)  # (the writer goes on under the new term)
        stop.touch()
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        return out
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()


def test_writes_a_new_server_may_lack_are_reported_by_a_close_or_a_later_fsync(cluster_factory, tmp_path):
    """Files written from the node the server is not on, never fsync'ed,
    while the server dies: a writer's close after the fail-over says EIO
    (the new server may lack some of its writes), and so does the first
    fsync, through a descriptor opened after it, of a file written and
    closed before -- once, as Linux reports a failed writeback: never
    0 for data that may be gone.  A file emptied after the fail-over (an
    O_TRUNC open, a truncation to 0) has nothing left to miss: no EIO."""
    c = cluster_factory(nodes=2)
    server, other = _two_replicas(c)
    there = view(c, other)
    (there / "closed").write_bytes(os.urandom(1 << 20))  # (written and closed before the fail-over)
    (there / "rewritten").write_bytes(os.urandom(1 << 20))
    (there / "cut").write_bytes(os.urandom(1 << 20))
    (there / "dir").mkdir()
    (there / "dir" / "moved").write_bytes(os.urandom(1 << 20))  # (the same, then its directory renamed)
    (there / "synced").write_bytes(b"kept")
    assert _fsync_errno(there / "synced") == 0

    def crash():
        os.kill(c.node(server)["pid"], signal.SIGKILL)
        _wait(lambda: _df(c, other).get("server") == other)
        dead = c.drvs("df", "web", node=server)  # (asked through the node whose drvmmd died)
        assert dead.returncode == 7 and dead.stdout.splitlines()[1].split()[1:4] == ["-"] * 3, dead.stdout

    assert _write_across(there / "open", tmp_path / "stop", crash) == "close EIO\n"
    (there / "rewritten").write_bytes(b"new")  # (its close: no EIO)
    assert _fsync_errno(there / "rewritten") == 0
    os.truncate(there / "cut", 0)
    assert _fsync_errno(there / "cut") == 0
    assert _fsync_errno(there / "closed") == errno.EIO
    assert _fsync_errno(there / "closed") == 0  # (once)
    os.rename(there / "dir", there / "dir2")
    assert _fsync_errno(there / "dir2" / "moved") == errno.EIO  # (the doubt went with it)
    assert _fsync_errno(there / "open") == 0  # (its close said so)
    assert _fsync_errno(there / "synced") == 0  # (fsync'ed before: nothing in doubt)
    assert (there / "synced").read_bytes() == b"kept"


def test_a_restarted_drvmmd_serving_again_vouches_for_its_own_term(cluster_factory):
    """One replica, on n1; n1's drvmmd killed and started again (the
    machine was not): its store has every change it acknowledged (in the
    page cache if not on the disk), so n2's writes not fsync'ed are not
    in doubt: an fsync after the restart returns 0."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--fs-replicas", "1", node="n1", check=True)
    view(c, "n1")
    there = view(c, "n2")
    _wait(lambda: _df(c, "n2").get("server") == "n1")
    data = os.urandom(3 << 20)
    (there / "closed").write_bytes(data)  # (not fsync'ed)
    os.kill(c.node("n1")["pid"], signal.SIGKILL)
    _wait(lambda: _gone(c.node("n1")["pid"]), timeout=10)
    restarted = _restart_drvmmd(c, "n1")
    try:
        _wait(lambda: _df(c, "n2").get("server") == "n1")
        assert (there / "closed").read_bytes() == data  # (n2 learns of the new term here)
        assert _fsync_errno(there / "closed") == 0
    finally:
        restarted.terminate()
        restarted.wait(timeout=20)


def test_files_open_across_a_restart_of_their_only_server_go_on(cluster_factory, tmp_path):
    """One replica, on n1; n1's drvmmd killed and started again while n2
    writes through an open file: the restarted server lost its open
    files, so n2 opens the file again (the same one, by its path and
    number) and the writer goes on, nothing lost, nothing in doubt."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--fs-replicas", "1", node="n1", check=True)
    view(c, "n1")
    there = view(c, "n2")
    _wait(lambda: _df(c, "n2").get("server") == "n1")
    restarted = []

    def restart():
        os.kill(c.node("n1")["pid"], signal.SIGKILL)
        _wait(lambda: _gone(c.node("n1")["pid"]), timeout=10)
        restarted.append(_restart_drvmmd(c, "n1"))
        _wait(lambda: _df(c, "n2").get("server") == "n1")

    try:
        assert _write_across(there / "open", tmp_path / "stop", restart) == "close ok\n"
        size = (there / "open").stat().st_size
        assert size > (2 << 20) and size % (1 << 20) == 0  # (whole blocks: none torn)
        with open(there / "open", "rb") as f:  # (random blocks: none lost to a hole of zeros)
            assert all(block != bytes(1 << 20) for block in iter(lambda: f.read(1 << 20), b""))
        assert _fsync_errno(there / "open") == 0
    finally:
        for daemon in restarted:
            daemon.terminate()
            daemon.wait(timeout=20)


TRY_LOCKS = """
import errno, fcntl, os, sys
lk = sys.argv[1]
out = []
for name, take in (("flock", lambda fd: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)),
                   ("posix", lambda fd: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB))):
    fd = os.open(lk if name == "flock" else lk + ".p", os.O_RDWR)
    try:
        take(fd)
        out.append(name + " got")
    except OSError as e:
        out.append(name + " " + errno.errorcode[e.errno])
print(" ".join(out))
"""


PART_HOLDER = """
import fcntl, os, sys, time
lk = sys.argv[1]
fd = os.open(lk, os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX, 100, 0)
fcntl.lockf(fd, fcntl.LOCK_UN, 50, 50)  # (0-49 still held)
open(lk + ".held", "w").close()
while not os.path.exists(lk + ".release"):
    time.sleep(0.05)
"""

TRY_RANGES = """
import errno, fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
out = []
for start in (10, 60):
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, start)
        out.append(f"{start} got")
        fcntl.lockf(fd, fcntl.LOCK_UN, 10, start)
    except OSError as e:
        out.append(f"{start} {errno.errorcode[e.errno]}")
print(" ".join(out))
"""


def _only_replica_on_n1(c) -> Path:
    """VM web on n1 and n2, its file system's one replica on n1: n2's view."""
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--fs-replicas", "1", node="n1", check=True)
    view(c, "n1")
    there = view(c, "n2")
    _wait(lambda: _df(c, "n2").get("server") == "n1")
    return there


def _holding(c, there: Path, scripts: dict, name: str) -> subprocess.Popen:
    """The scripts written in the VM (through n2's view, there), the first
    run on n2 on /data/name, once it says it holds its locks."""
    for script, text in scripts.items():
        (there / script).write_text(text)
    first = next(iter(scripts))
    p = subprocess.Popen([str(BIN / "drvs-run"), "--vm", "web", "--", "python3", f"/data/{first}", f"/data/{name}"],
                         env={**c.env, "DRVS_NODE": "n2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(lambda: (there / f"{name}.held").exists())
    except BaseException:
        _end([p])
        raise
    return p


def _end(programs: list, daemons: list = ()) -> None:
    for p in programs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for daemon in daemons:
        daemon.terminate()
        daemon.wait(timeout=20)


def _held_until_let_go(c, node: str, there: Path, holder: subprocess.Popen) -> None:
    """A program on node cannot take the locks holder holds on /data/lk
    (TRY_LOCKS); once holder lets go, it can."""
    r = jail(c, node, "python3 /data/try.py /data/lk")
    assert r.stdout == "flock EAGAIN posix EAGAIN\n", (r.stdout, r.stderr)
    (there / "lk.release").touch()
    assert holder.wait(timeout=20) == 0
    _wait(lambda: jail(c, node, "python3 /data/try.py /data/lk").stdout == "flock got posix got\n", timeout=10)


def _kill_and_restart_n1(c, restarted: list) -> None:
    """n1's drvmmd killed and started again (added to restarted, to be
    stopped by the caller), serving once more."""
    os.kill(c.node("n1")["pid"], signal.SIGKILL)
    _wait(lambda: _gone(c.node("n1")["pid"]), timeout=10)
    restarted.append(_restart_drvmmd(c, "n1"))
    _wait(lambda: _df(c, "n2").get("server") == "n1")


def test_what_a_partial_unlock_leaves_is_held_across_a_restart_of_the_server(cluster_factory):
    """A record lock of 0-99 taken on n2, 50-99 unlocked: the rest is given
    back to the restarted server too (a program on n1 gets 60-69, not 10-19)."""
    c = cluster_factory(nodes=2)
    there = _only_replica_on_n1(c)
    part = _holding(c, there, {"part.py": PART_HOLDER, "ranges.py": TRY_RANGES}, "part")
    restarted = []
    try:
        _kill_and_restart_n1(c, restarted)
        ranges = jail(c, "n1", "python3 /data/ranges.py /data/part")
        assert ranges.stdout == "10 EAGAIN 60 got\n", (ranges.stdout, ranges.stderr)
        (there / "part.release").touch()
        assert part.wait(timeout=20) == 0
    finally:
        _end([part], restarted)


def test_locks_held_across_a_restart_of_their_only_server_stay_held(cluster_factory):
    """One replica, on n1; a program on n2 holds a flock and a record lock
    while n1's drvmmd is killed and started again: the new server has them
    back from n2 (a program on n1 cannot take them), and once n2's program
    lets go, n1's can."""
    c = cluster_factory(nodes=2)
    there = _only_replica_on_n1(c)
    holder = _holding(c, there, {"holder.py": HOLDER, "try.py": TRY_LOCKS}, "lk")
    restarted = []
    try:
        assert jail(c, "n1", "python3 /data/try.py /data/lk").stdout == "flock EAGAIN posix EAGAIN\n"
        _kill_and_restart_n1(c, restarted)
        view(c, "n1")
        _held_until_let_go(c, "n1", there, holder)
    finally:
        _end([holder], restarted)


def _served_on_n1_of_three(c) -> Path:
    """VM web on n1, n2 and n3, served on n1 with a second replica in
    sync: n2's view of it."""
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--node", "n3", node="n1", check=True)
    view(c, "n1"), view(c, "n3")
    b = view(c, "n2")
    _wait(lambda: _df(c, "n1").get("server") == "n1" and len(_df(c, "n1").get("in_sync", ())) == 2)
    return b


def test_locks_held_across_a_fail_over_stay_held(cluster_factory):
    """Server n1, a replica on n2 or n3; a program on n2 holds a flock and a
    record lock while n1 dies: the new server has them back from n2 (n3
    cannot take them), and once n2's program lets go, n3's can."""
    c = cluster_factory(nodes=3)
    b = _served_on_n1_of_three(c)
    holder = _holding(c, b, {"holder.py": HOLDER, "try.py": TRY_LOCKS}, "lk")
    try:
        assert jail(c, "n3", "python3 /data/try.py /data/lk").stdout == "flock EAGAIN posix EAGAIN\n"
        os.kill(c.node("n1")["pid"], signal.SIGKILL)
        _wait(lambda: _df(c, "n3").get("server") in ("n2", "n3"), timeout=30)
        _held_until_let_go(c, "n3", b, holder)
    finally:
        _end([holder])


RELOCKER = """
import errno, fcntl, os, sys, time
lk = sys.argv[1]
f = os.open(lk, os.O_RDWR | os.O_CREAT)
p = os.open(lk + ".p", os.O_RDWR | os.O_CREAT)
open(lk + ".held", "w").close()  # (open, no lock yet)
while not os.path.exists(lk + ".go"):
    time.sleep(0.05)
os.fstat(f), os.fstat(p)  # (the kernel takes the new term's numbers for them)
out = []
for name, take in (("flock", lambda: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)),
                   ("posix", lambda: fcntl.lockf(p, fcntl.LOCK_EX | fcntl.LOCK_NB))):
    try:
        take()
        out.append(name + " got")
    except OSError as e:
        out.append(name + " " + errno.errorcode[e.errno])
    os.stat(lk if name == "flock" else lk + ".p")  # (a lookup: the node has a record by the new number too)
try:  # (the flock again, as shared: the same owner's, whichever number the node now finds the file by)
    fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    out.append("again got")
except OSError as e:
    out.append("again " + errno.errorcode[e.errno])
print(" ".join(out), flush=True)
time.sleep(1.5)  # (the node's look at /proc/locks must find them held: NodeLocks.run)
open(lk + ".locked", "w").close()
while not os.path.exists(lk + ".release"):
    time.sleep(0.05)
"""


def test_files_open_across_a_fail_over_are_locked_after_it(cluster_factory):
    """A program on n2 has files open while the server (n1) dies; after
    the fail-over it stats them -- the kernel then shows them by the new
    term's numbers -- and takes a flock and a record lock: both are
    granted, the flock is taken again as shared and exclusive, and they
    hold against n3 (also once the node looked the names up again) until
    it lets go."""
    c = cluster_factory(nodes=3)
    b = _served_on_n1_of_three(c)
    holder = _holding(c, b, {"relocker.py": RELOCKER, "try.py": TRY_LOCKS}, "lk")
    try:
        os.kill(c.node("n1")["pid"], signal.SIGKILL)
        _wait(lambda: _df(c, "n3").get("server") in ("n2", "n3"), timeout=30)
        (b / "lk.go").touch()
        _wait(lambda: (b / "lk.locked").exists() or holder.poll() is not None)
        _held_until_let_go(c, "n3", b, holder)
        assert holder.stdout.read().decode() == "flock got posix got again got\n"
    finally:
        _end([holder])


def test_vm_update_moves_file_system_replicas_live(cluster_factory, tmp_path):
    """A VM's share taken from a node that keeps a replica moves the
    replica to another node of the VM, copied live; from the serving node,
    the other replica takes over cleanly (a writer across it closes with
    0). The only in-sync replica is never taken away: a replica is added
    first (--fs-replicas)."""
    c = cluster_factory(nodes=3)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--node", "n3", "--fs-replicas", "1",
           node="n1", check=True)
    view(c, "n1")
    b, x = view(c, "n2"), view(c, "n3")
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1"])
    data = {f"f{i}": os.urandom(100_000) for i in range(20)}
    for name, content in data.items():
        (x / name).write_bytes(content)
    only = c.drvs("vm", "update", "web", "--rm-node", "n1", node="n1")
    assert only.returncode == 4 and "in sync only on n1" in only.stderr and "--fs-replicas" in only.stderr, only.stderr
    c.drvs("vm", "update", "web", "--fs-replicas", "2", node="n1", check=True)
    _wait(lambda: _df(c, "n3").get("in_sync") == ["n1", "n2"])
    # the serving node's share taken away: n2 serves, n3 is copied to
    assert _write_across(x / "open", tmp_path / "stop", lambda: (
        c.drvs("vm", "update", "web", "--rm-node", "n1", node="n3", check=True),
        _wait(lambda: _df(c, "n3").get("server") == "n2" and _df(c, "n3").get("in_sync") == ["n2", "n3"]))) \
        == "close ok\n"
    assert _df(c, "n3")["nodes"] == ["n2", "n3"]
    # and a replica that does not serve: n3's goes, n2 alone keeps the file system
    c.drvs("vm", "update", "web", "--rm-node", "n3", node="n2", check=True)
    _wait(lambda: _df(c, "n2").get("in_sync") == ["n2"])
    os.kill(c.node("n3")["pid"], signal.SIGKILL)  # (nothing of it is needed)
    for name, content in data.items():
        assert (b / name).read_bytes() == content, name
    assert _fsync_errno(b / "open") == 0
    # n1's copy, kept since its share went, goes with the VM
    kept = Path(c.node("n1")["state_dir"]) / "vms" / "web" / "fs"
    assert kept.is_dir()
    c.drvs("vm", "rm", "web", node="n2", check=True)
    _wait(lambda: not kept.exists(), timeout=25)


LOCK_ACROSS_RENAME = r"""
import fcntl, os, struct, sys
fd = os.open("/data/locked", os.O_RDWR)
def lock(start):
    fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, start, 1, 0))
lock(0)
print("first", flush=True)
sys.stdin.readline()  # (another node renames the file meanwhile)
try:
    lock(2)
    print("second ok", flush=True)
except OSError as e:
    print("second", e.errno, flush=True)
sys.stdin.readline()
"""


def test_a_lock_on_a_file_another_node_renamed_is_taken_on_the_open_file(cluster_factory):
    """A program with a file open takes a record lock; another node renames
    the file; the program's next lock call names the open file (its
    handle), not the path this node lost -- it is taken, not ESTALE, and
    holds against the other node."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
    view(c, "n1")
    (view(c, "n2") / "locked").write_text("xxxx")
    holder = subprocess.Popen([str(BIN / "drvs-run"), "--vm", "web", "--node", "n1", "--", "python3", "-c",
                               LOCK_ACROSS_RENAME], env={**c.env, "DRVS_NODE": "n1"}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "first\n", holder.stderr.read()
        os.rename(view(c, "n2") / "locked", view(c, "n2") / "moved")
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "second ok\n"
        other = jail(c, "n2", "python3 -c 'import fcntl, os, struct; fd = os.open(\"/data/moved\", os.O_RDWR); "
                              "fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack(\"hhqqi\", fcntl.F_WRLCK, 0, 2, 1, 0))' "
                              "2>&1; echo rc=$?")
        assert "Resource temporarily unavailable" in other.stdout and "rc=1" in other.stdout, other.stdout
    finally:
        holder.kill()
        holder.wait()


def test_sync_in_a_jail_returns_once_the_replicas_have_what_was_written(cluster_factory):
    """sync(1) in a jail (FUSE sends the server no sync: the node's
    supervisor asks it): it returns once every replica in sync has what
    was written before it -- a replica stopped holds it up -- so a line
    appended with `>>` and synced survives the server; syncfs(2) of a file
    of the VM likewise."""
    c = cluster_factory(nodes=3)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--node", "n3", node="n1", check=True)
    view(c, "n1"), view(c, "n2"), view(c, "n3")
    _wait(lambda: len(_df(c, "n1").get("in_sync", ())) == 2)
    df = _df(c, "n1")
    replica = next(n for n in df["in_sync"] if n != df["server"])
    writer = next(n for n in ("n1", "n2", "n3") if n not in df["in_sync"])
    store = Path(c.node(replica)["state_dir"]) / "vms" / "web" / "fs" / "root"
    syncfs = "import ctypes, os; fd = os.open('/data/g', os.O_RDONLY); print(ctypes.CDLL(None).syncfs(fd))"
    mapped = ("import ctypes, mmap, os; fd = os.open('/data/m', os.O_RDWR | os.O_CREAT); os.ftruncate(fd, 4096); "
              "m = mmap.mmap(fd, 4096); m[:5] = b'line\\n'; print(ctypes.CDLL(None).syncfs(fd), flush=True); "
              "import time; time.sleep(3)")  # (still mapped, still open: no close writes it back)
    for name, script in (("f", "echo line >> /data/f && sync && echo synced"),
                         ("g", f"echo line >> /data/g && python3 -c \"{syncfs}\""),
                         ("m", f"python3 -c \"{mapped}\"")):  # (a shared mapping's page: written back first)
        pid = c.node(replica)["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            p = subprocess.Popen([str(BIN / "drvs-run"), "--vm", "web", "--", "sh", "-c", script],
                                 env={**c.env, "DRVS_NODE": writer}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
            time.sleep(1.5)
            waiting = p.poll() is None  # (the replica has yet to answer)
        finally:
            os.kill(pid, signal.SIGCONT)
        said = p.stdout.readline()
        stored = (store / name).read_bytes()  # (as soon as the sync returned)
        out, err = p.communicate(timeout=30)
        assert waiting, (name, said, err)
        assert p.returncode == 0 and said == ("synced\n" if name == "f" else "0\n"), (name, said, err)
        assert stored == (b"line\n" if name != "m" else b"line\n".ljust(4096, b"\0")), name


OPEN_APPENDER = r"""
import errno, os, sys, time
path, stop = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
print("writing", flush=True)
n = 0
while not os.path.exists(stop):
    n += 1
    step = "write"
    try:
        os.write(fd, b"%d\n" % n)
        step = "fsync"
        os.fsync(fd)
    except OSError as e:
        print("error", n, step, errno.errorcode[e.errno], flush=True)
    time.sleep(0.05)
os.close(fd)
print("wrote", n, flush=True)
"""


def _pid(c, node: str) -> int:
    """node's drvmmd now (dev cluster restart starts another)."""
    info = json.loads((c.state / "dev-cluster.json").read_text())
    return next(n["pid"] for n in info["nodes"] if n["name"] == node)


def test_a_file_open_across_a_hand_over_and_a_restart_of_the_new_server_goes_on(cluster_factory, tmp_path):
    """A program on a third node keeps a file open and writes (fsync'ed)
    while its server stops cleanly (the other replica takes over), the
    first one then dies, and the new server -- the only replica left --
    restarts: its handles are lost with it, and the node opens the file
    again (the same file, by its number on that server's store), so the
    program's writes go on without an error."""
    c = cluster_factory(nodes=3)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--node", "n3", node="n1", check=True)
    view(c, "n1"), view(c, "n2"), view(c, "n3")
    _wait(lambda: len(_df(c, "n1").get("in_sync", ())) == 2)
    df = _df(c, "n1")
    first = df["server"]
    second = next(n for n in df["in_sync"] if n != first)
    writer = next(n for n in ("n1", "n2", "n3") if n not in df["in_sync"])
    there = view(c, writer)
    (there / "appender.py").write_text(OPEN_APPENDER)
    p = subprocess.Popen([str(BIN / "drvs-run"), "--vm", "web", "--", "python3", "/data/appender.py", "/data/log",
                          "/data/stop"], env={**c.env, "DRVS_NODE": writer}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "writing\n"
        c.drvs("dev", "cluster", "restart", first, check=True)  # (a clean stop: it hands over)
        _wait(lambda: _df(c, writer).get("server") == second and sorted(_df(c, writer).get("in_sync", ())) ==
              sorted([first, second]))
        os.kill(_pid(c, first), signal.SIGKILL)
        _wait(lambda: _gone(_pid(c, first)), timeout=10)
        _wait(lambda: _df(c, writer).get("in_sync") == [second])  # (struck once a change could not reach it)
        c.drvs("dev", "cluster", "restart", second, check=True)
        _wait(lambda: _df(c, writer).get("server") == second)
        before = len((there / "log").read_bytes().splitlines())
        time.sleep(1.5)
        (there / "stop").touch()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and "error" not in out, (out, err)
    wrote = int(out.split()[-1])
    assert wrote > before + 5
    assert (there / "log").read_bytes().splitlines() == [b"%d" % i for i in range(1, wrote + 1)]


def test_a_write_sent_to_a_server_gone_silent_goes_to_the_new_one(cluster_factory):
    """The serving node's drvmmd stopped (SIGSTOP) as the other node writes:
    the write, sent to the silent server, goes to the replica once it has
    taken over (as after a reset connection) -- it succeeds, rather than
    failing with ETIMEDOUT when the silent server's time is up."""
    c = cluster_factory(nodes=2)
    server, other = _two_replicas(c)
    here, there = view(c, server), view(c, other)
    (here / "f").write_bytes(b"." * 8192)
    assert _fsync_errno(here / "f") == 0
    fd = os.open(there / "f", os.O_WRONLY)  # (no descriptor on the stopped node's view: see _write_across)
    time.sleep(1)  # (the replica hears of the open as the server streams it)
    pid = c.node(server)["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert os.pwrite(fd, b"new", 0) == 3
        os.fsync(fd)
        took = time.monotonic() - t0
    finally:
        os.close(fd)
        os.kill(pid, signal.SIGCONT)
    assert (there / "f").read_bytes() == b"new" + b"." * 8189
    assert _df(c, other).get("server") == other
    assert took < 9.5, took


def test_a_replica_lost_with_a_share_comes_back_with_a_node(cluster_factory):
    """A 2-node VM (2 replicas by default) loses a node: the update says
    its file system is now kept on one node; a node given to the VM again
    gets a replica again, copied live -- the count asked for is kept."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
    first = c.drvs("df", "web", node="n2")  # (at once: it waits for the server starting)
    assert first.returncode == 0, first.stderr
    here = view(c, "n1")
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"])
    (here / "kept").write_bytes(b"data" * 1000)
    cut = c.drvs("vm", "update", "web", "--rm-node", "n2", "--force", node="n1", check=True)
    assert "file system is now kept on 1 node (n1), not 2" in cut.stderr, cut.stderr
    _wait(lambda: _df(c, "n1").get("nodes") == ["n1"])
    back = c.drvs("vm", "update", "web", "--node", "n2", node="n1", check=True)
    assert "warning" not in back.stderr, back.stderr
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"])
    assert (view(c, "n2") / "kept").read_bytes() == b"data" * 1000


def test_a_replica_whose_node_stays_down_is_replaced_by_another_node_of_the_vm(cluster_factory):
    """--fs-replace-after: a replica's node NotReady that long is replaced
    in the VM's definition by another node of the VM, which is copied to
    live and gets into sync; the node coming back is no replica any more."""
    c = cluster_factory(nodes=3)
    bad = c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--node", "n3", "--fs-replace-after", "soon",
                 node="n1")
    assert bad.returncode == 2 and "invalid duration 'soon'" in bad.stderr, bad.stderr
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--node", "n3", "--fs-replace-after", "2s",
           node="n1", check=True)
    view(c, "n1"), view(c, "n3")
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"])
    server = _df(c, "n1")["server"]
    lost = "n2" if server == "n1" else "n1"
    here = view(c, "n3")
    (here / "kept").write_bytes(b"data" * 1000)
    assert _fsync_errno(here / "kept") == 0
    os.kill(_pid(c, lost), signal.SIGKILL)
    _wait(lambda: _df(c, "n3").get("nodes") == sorted([server, "n3"]) or _df(c, "n3").get("nodes") ==
          [server, "n3"], timeout=40)
    _wait(lambda: sorted(_df(c, "n3").get("in_sync", ())) == sorted([server, "n3"]), timeout=30)
    store = Path(c.node("n3")["state_dir"]) / "vms" / "web" / "fs" / "root"
    assert (store / "kept").read_bytes() == b"data" * 1000
    shown = json.loads(c.drvs("vm", "show", "web", "--format", "json", node="n3", check=True).stdout)
    assert lost not in shown["fs_nodes"] and shown["fs_replace_after"] == 2
    assert c.drvs("dev", "cluster", "restart", lost).returncode == 0
    c.wait_status(lost, "Ready", timeout=30, via="n3")
    time.sleep(2)
    assert lost not in _df(c, "n3")["nodes"]


def test_reads_go_to_the_new_server_when_the_old_one_went_silent(cluster_factory):
    """The serving node's drvmmd stopped (SIGSTOP: alive, silent): the
    other replica takes over once its lease ends, and a read the other
    node had already sent to the silent server is asked again of the new
    one -- it returns the data, not ETIMEDOUT."""
    c = cluster_factory(nodes=2)
    server, other = _two_replicas(c)
    here, there = view(c, server), view(c, other)
    content = os.urandom(300_000)
    (here / "f").write_bytes(content)  # (never read on the other node: its read goes to the server)
    _fsync_errno(here / "f")
    pid = c.node(server)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert (there / "f").read_bytes() == content
        took = time.monotonic() - t0
        assert _df(c, other).get("server") == other
        assert took < 10.5, took
    finally:
        os.kill(pid, signal.SIGCONT)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_serving_node_stopped_cleanly_hands_its_file_system_to_the_other(cluster_factory, tmp_path):
    """The serving node's drvmmd stopped with SIGTERM (a node taken down
    for maintenance): the other replica takes over within seconds, with
    the files written through either node just before, fsync'ed or not;
    and as it has every change the old server acknowledged, nothing is in
    doubt: a writer's close across the hand-over, and fsyncs after it,
    return 0 (after a crash they say EIO: see the test above)."""
    c = cluster_factory(nodes=2)
    server, other = _two_replicas(c)
    here, there = view(c, server), view(c, other)
    data = {f"f{i}": os.urandom(50_000) for i in range(40)}
    for name, content in data.items():
        ((here if int(name[1:]) % 2 else there) / name).write_bytes(content)

    def stop_cleanly():
        pid = c.node(server)["pid"]
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: _gone(pid), timeout=30)
        _wait(lambda: _df(c, other).get("server") == other, timeout=15)

    assert _write_across(there / "open", tmp_path / "stop", stop_cleanly) == "close ok\n"
    for name, content in data.items():
        assert (there / name).read_bytes() == content, name
        assert _fsync_errno(there / name) == 0, name
    assert _fsync_errno(there / "open") == 0


def _timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def _write_fsync(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_the_file_system_keeps_its_promises_while_etcd_is_stopped(cluster_factory):
    """etcd hangs (SIGSTOP): the servers keep serving, so n2 still writes
    and fsyncs through n1's server, a change on n1 is still seen at once on
    n2, and what n2 fsync'ed reached the replica: n1's daemon is killed
    during the outage, and after it n2 serves the data."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
    a, b = view(c, "n1"), view(c, "n2")
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"])
    (a / "shared").write_text("v0\n")
    assert (b / "shared").read_text() == "v0\n"  # (n2 caches it, and knows where the server is)
    etcd = c.info["etcd"]["pid"]
    os.killpg(etcd, signal.SIGSTOP)
    try:
        time.sleep(2)  # (every location known to the nodes is older than etcd's last answer)
        _, took = _timed(lambda: _write_fsync(b / "during", b"fsync'ed while etcd was stopped\n"))
        assert took < 5, took
        (a / "shared").write_text("v1\n")
        assert (b / "shared").read_text() == "v1\n"  # n2's cached pages were dropped before n1's write ended
        (a / "shared").rename(a / "moved")
        assert sorted(p.name for p in b.iterdir()) == ["during", "moved"]
        os.kill(c.node("n1")["pid"], signal.SIGKILL)
    finally:
        os.killpg(etcd, signal.SIGCONT)
    _wait(lambda: _df(c, "n2").get("server") == "n2", timeout=60)
    assert (b / "during").read_text() == "fsync'ed while etcd was stopped\n"  # (what was not fsync'ed may be lost)


def test_a_server_cut_off_from_etcd_hands_what_it_acknowledged_to_the_next(cluster_factory):
    """n1, the server, loses etcd but not n2: n2 takes over once n1's
    lease ends, and the lines written through both nodes meanwhile (not
    fsync'ed) are kept: n1 streamed them to n2's replica, whose place it
    knew (before, it asked etcd for it, and dropped the replica); and n1
    takes nothing more once n2 serves."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
    a, b = view(c, "n1"), view(c, "n2")
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"] and _df(c, "n1").get("server") == "n1")
    (a / "log").write_text("before\n")
    etcd_ip = c.info["etcd"]["url"].split("//")[1].split(":")[0]
    cut = ["ip", "netns", "exec", c.node("n1")["netns"], "ip", "route"]
    subprocess.run(cut + ["add", "blackhole", f"{etcd_ip}/32"], check=True)
    try:
        time.sleep(1.2)  # (n1's location of n2's replica is older than etcd's last answer)
        with open(a / "log", "a") as f:
            f.write("from n1\n")
        with open(b / "log", "a") as f:
            f.write("from n2\n")
        _wait(lambda: _df(c, "n2").get("server") == "n2", timeout=30)
        # n2 told n1 its term was over before it served: a line n1 is
        # given now is refused (EIO, once no server is found), not taken
        # and then lost
        late = subprocess.run([PY, "-c", f"open({str(a / 'log')!r}, 'a').write('late from n1\\n')"],
                              capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(cut + ["del", "blackhole", f"{etcd_ip}/32"], check=True)
    assert late.returncode != 0 and "Input/output error" in late.stderr, late
    assert (b / "log").read_text() == "before\nfrom n1\nfrom n2\n"
    _wait(lambda: _df(c, "n2").get("in_sync") == ["n1", "n2"], timeout=60)  # n1 back, as a replica
    assert (a / "log").read_text() == "before\nfrom n1\nfrom n2\n"


def test_an_unreachable_server_is_an_error_within_a_bound(cluster_factory):
    """One replica: its node stops; a call from n2 fails (EIO or ETIMEDOUT)
    in bounded time instead of hanging, and n2 itself keeps working."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--fs-replicas", "1", node="n1", check=True)
    b = view(c, "n2")
    (b / "f").write_text("x")
    os.kill(c.node("n1")["pid"], 9)
    t0 = time.monotonic()
    r = subprocess.run(["cat", str(b / "g")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Input/output error" in r.stderr or "timed out" in r.stderr
    assert time.monotonic() - t0 < 20
    assert c.drvs("node", "ls", node="n2").returncode == 0


def _small_store(c, node: str, size: str) -> Path:
    """A tmpfs of size mounted where node keeps VM web's file store (the
    caller unmounts it)."""
    store = Path(c.node(node)["state_dir"]) / "vms" / "web" / "fs"
    for _ in range(20):  # (a node's look at start for stores of VMs removed while it was away may take this one)
        store.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "drvs-test-full", str(store)]).returncode == 0:
            return store
        time.sleep(0.5)
    raise AssertionError(f"{store}: cannot mount a tmpfs there")


def test_a_full_disk_on_the_server_reaches_the_writer_and_corrupts_nothing(cluster_factory):
    c = cluster_factory(nodes=2)
    store = _small_store(c, "n1", "4m")
    try:
        c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--fs-replicas", "1", node="n1", check=True)
        b = view(c, "n2")
        (b / "keep").write_text("intact")
        r = jail(c, "n2", "dd if=/dev/zero of=/data/huge bs=1M count=8 2>&1; echo rc=$?")
        assert "No space left on device" in r.stdout and "rc=1" in r.stdout, r.stdout + r.stderr
        assert (b / "keep").read_text() == "intact"
        os.unlink(b / "huge")
        (b / "after").write_text("the server goes on")
        assert (view(c, "n1") / "after").read_text() == "the server goes on"
        # In a directory n2 made (delegated to it): a store without room to
        # spare has n2 make and write in line, so ENOSPC reaches the writer
        # there too, not a log line after its close.
        (b / "mine").mkdir()
        for i in range(20):
            (b / "mine" / f"s{i}").write_text(str(i))
        r = jail(c, "n2", "dd if=/dev/zero of=/data/mine/huge bs=1M count=8 2>&1; echo rc=$?")
        assert "No space left on device" in r.stdout and "rc=1" in r.stdout, r.stdout + r.stderr
        with pytest.raises(OSError) as full:
            (b / "mine" / "more").write_bytes(b"x" * 100_000)
        assert full.value.errno == errno.ENOSPC
        assert [(b / "mine" / f"s{i}").read_text() for i in range(20)] == [str(i) for i in range(20)]
    finally:
        subprocess.run(["umount", "-l", str(store)], check=True)


def test_a_replica_without_room_for_two_trees_is_copied_to_all_the_same(cluster_factory):
    """A replica coming back is copied to beside its old tree (a crash
    keeps one whole tree or the other); on a disk without room for both,
    the old tree (not in sync: nothing is served from it) makes room and
    the copy starts again -- the replica is in sync again, rather than
    failing ENOSPC for ever; `drvs df` says why a replica is not in sync."""
    c = cluster_factory(nodes=2)
    store = _small_store(c, "n2", "16m")
    try:
        c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1", check=True)
        a = view(c, "n1")
        _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"])
        assert _df(c, "n1")["not_in_sync"] == {}
        data = {f"f{i}": os.urandom(1 << 20) for i in range(10)}
        for name, content in data.items():
            (a / name).write_bytes(content)
        assert _fsync_errno(a / "f9") == 0
        os.kill(c.node("n2")["pid"], signal.SIGKILL)
        _wait(lambda: _df(c, "n1").get("in_sync") == ["n1"])
        away = c.drvs("df", "web", node="n1")
        assert away.returncode == 0 and "drvs df: web: the replica on n2 is not in sync: " in away.stderr, away.stderr
        (a / "later").write_text("made while n2 was away")
        assert c.drvs("dev", "cluster", "restart", "n2").returncode == 0
        c.info = json.loads((c.state / "dev-cluster.json").read_text())
        _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"], timeout=60)
        root = store / "root"
        assert (root / "later").read_text() == "made while n2 was away"
        assert all((root / name).read_bytes() == content for name, content in data.items())
        assert not (store / "root.new").exists()
    finally:
        subprocess.run(["umount", "-l", str(store)], check=True)


def test_a_synchronous_vm_closes_only_once_the_replica_has_the_data(cluster_factory):
    """--fs-sync: once close() returns on n1 (the serving node), the file
    is in n2's replica store already (without --fs-sync it often is not)."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--fs-sync", node="n1", check=True)
    a = view(c, "n1")
    _wait(lambda: _df(c, "n1").get("in_sync") == ["n1", "n2"])
    replica = Path(c.node("n2")["state_dir"]) / "vms" / "web" / "fs" / "root"
    for i in range(20):
        (a / f"f{i}").write_bytes(b"x" * 100_000)  # written on the server's own node, mirrored to n2
        assert (replica / f"f{i}").stat().st_size == 100_000
    show = json.loads(c.drvs("vm", "show", "web", "--format", "json", node="n1", check=True).stdout)
    assert show["fs_sync"] is True and show["fs_nodes"] == ["n1", "n2"]


def test_removing_a_vm_removes_its_replicas(fsc):
    fsc.drvs("vm", "create", "scratch", "--node", "n1", "--node", "n2", node="n1", check=True)
    (view(fsc, "n1", vm="scratch") / "f").write_text("x")
    stores = [Path(fsc.node(n)["state_dir"]) / "vms" / "scratch" / "fs" for n in ("n1", "n2")]
    _wait(lambda: all((s / "root" / "f").exists() for s in stores))
    fsc.drvs("vm", "rm", "scratch", node="n1", check=True)
    _wait(lambda: not any(s.exists() for s in stores), timeout=20)
    assert fsc.drvs("df", "scratch", node="n1").returncode == 3


def test_removing_vms_a_node_serves_leaves_its_daemon_running(fsc):
    """A file server whose VM is removed stands down (its term is over)
    without ending the node's drvmmd: whichever comes first, the server's
    own look at its term or the node's look at the VM list (the node's
    usually: test_fs_server's stand-down test makes the other way sure)."""
    names = [f"gone{i}" for i in range(6)]
    for vm in names:
        fsc.drvs("vm", "create", vm, "--node", "n2", "--node", "n1", node="n1", check=True)
    for vm in names:
        p = subprocess.run([str(BIN / "drvs-run"), "--vm", vm, "--node", "n2", "--", "true"],
                           env={**fsc.env, "DRVS_NODE": "n1"}, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
    for vm in names:
        fsc.drvs("vm", "rm", vm, "--force", node="n1", check=True)
        time.sleep(0.3)  # (the removals spread over the servers' looks at their terms)
    time.sleep(REAP_EVERY + 1)  # (a server still running looked at its term at least once)
    status = fsc.drvs("dev", "cluster", "status", check=True).stdout
    assert "dead" not in status, status
    assert all(n["status"] == "Ready" for n in fsc.nodes().values())


def test_a_client_node_killed_mid_write_corrupts_nothing_and_its_files_are_closed(cluster_factory, tmp_path):
    """n2 streams 1 MiB records into a file served by n1; n2's drvmmd is
    killed mid-stream.  On n1 the file holds whole records of the stream,
    n1 goes on serving, and the server closes what n2 had open once n2 has
    left the cluster."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", "--fs-replicas", "1", node="n1", check=True)
    a, b = view(c, "n1"), view(c, "n2")
    record = os.urandom(1 << 20)
    src = tmp_path / "records"
    src.write_bytes(record * 400)
    writer = subprocess.Popen(["dd", f"if={src}", f"of={b / 'stream'}", "bs=1M"], stderr=subprocess.PIPE)
    try:
        _wait(lambda: (a / "stream").exists() and (a / "stream").stat().st_size > 20 << 20)
        os.kill(c.node("n2")["pid"], 9)
        writer.wait(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    data = (a / "stream").read_bytes()
    assert len(data) >= 20 << 20
    whole = len(data) // len(record) * len(record)
    assert data[:whole] == record * (whole // len(record))   # what arrived is the stream, in order
    assert record.startswith(data[whole:])                    # at most one record cut short
    (a / "after").write_text("n1 goes on")
    assert (a / "after").read_text() == "n1 goes on"
    store = (Path(c.node("n1")["state_dir"]) / "vms" / "web" / "fs" / "root" / "stream").resolve()

    def n2_files_closed():
        fds = Path(f"/proc/{c.node('n1')['pid']}/fd")
        return not any(os.readlink(fd) == str(store) for fd in fds.iterdir() if fd.is_symlink())

    _wait(n2_files_closed, timeout=30)


LOCKER = r"""
import fcntl, os, struct, sys, time
path, mode = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
if mode == "hold":          # a write lock on bytes 0-9 until the file "release" appears
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
    open(path + ".held", "w").close()
    while not os.path.exists(path + ".release"):
        time.sleep(0.05)
    print("releasing", flush=True)
elif mode == "try":         # the same bytes, then others, without waiting
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        print("got 0-9")
    except OSError as e:
        print("busy 0-9", e.errno)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 20)
    print("got 20-29")
    got = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hh4xqqi4x", fcntl.F_WRLCK, 0, 0, 10, 0))
    t, _, start, length, pid = struct.unpack("hh4xqqi4x", got)
    print("getlk", t == fcntl.F_WRLCK, start, length, pid)
elif mode == "wait":        # the same bytes, waiting
    fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
    print("got it", time.time(), flush=True)
"""


def test_fcntl_and_flock_locks_hold_across_nodes(fsc, d):
    name, a, b = d
    os.chmod(a, 0o777)
    (a / "locker.py").write_text(LOCKER)
    lk = f"/data/{name}/lk"
    holder = subprocess.Popen(
        [str(BIN / "drvs-run"), "--vm", "web", "--", "python3", f"/data/{name}/locker.py", lk, "hold"],
        env={**fsc.env, "DRVS_NODE": "n1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: (a / "lk.held").exists())
        holder_pid = json.loads(fsc.drvs("ps", "web", "--format", "json", node="n1").stdout)
        holder_pid = next(r["pid"] for r in holder_pid if "locker.py" in r["command"] and "hold" in r["command"])
        r = jail(fsc, "n2", f"python3 /data/{name}/locker.py {lk} try")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f"busy 0-9 {errno.EAGAIN}" and lines[1] == "got 20-29"
        assert lines[2] == f"getlk True 0 10 {holder_pid}"   # who holds it: n1's process, by its VM pid
        f = jail(fsc, "n2", f"flock -n {lk}.f true; echo $?; flock -x {lk}.f -c 'echo inside'")
        assert f.stdout.split() == ["0", "inside"], f.stderr   # nobody holds the flock yet
        waiter = subprocess.Popen(
            [str(BIN / "drvs-run"), "--vm", "web", "--", "python3", f"/data/{name}/locker.py", lk, "wait"],
            env={**fsc.env, "DRVS_NODE": "n2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        assert waiter.poll() is None  # blocked by n1's lock
        released = time.time()
        (a / "lk.release").touch()
        out, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 0, err
        assert float(out.split()[-1]) >= released  # it got the lock only after n1 let go (by ending)
    finally:
        for p in (holder,):
            if p.poll() is None:
                p.kill()
                p.wait()
    holder.wait(timeout=10)
    # flock across nodes: held on n1, refused without waiting on n2
    (a / "lk.release").unlink()
    held = subprocess.Popen(
        [str(BIN / "drvs-run"), "--vm", "web", "--", "flock", "-x", f"{lk}.f", "-c",
         f"touch {lk}.fheld; while [ ! -e {lk}.release ]; do sleep 0.05; done"],
        env={**fsc.env, "DRVS_NODE": "n1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: (a / "lk.fheld").exists())
        r = jail(fsc, "n2", f"flock -n {lk}.f true; echo $?")
        assert r.stdout.split() == ["1"], r.stderr
        os.rename(a / "lk.f", a / "lk.g")  # the lock is the file's, whatever its name
        r = jail(fsc, "n2", f"flock -n {lk}.g true; echo $?")
        assert r.stdout.split() == ["1"], r.stderr
        (a / "lk.release").touch()
        held.wait(timeout=20)
        _wait(lambda: jail(fsc, "n2", f"flock -n {lk}.g true; echo $?").stdout.split() == ["0"], timeout=10)
    finally:
        if held.poll() is None:
            held.kill()
            held.wait()



HOLDER = """
import fcntl, os, sys, time
lk = sys.argv[1]
f = os.open(lk, os.O_RDWR | os.O_CREAT)
p = os.open(lk + ".p", os.O_RDWR | os.O_CREAT)
fcntl.flock(f, fcntl.LOCK_EX)
fcntl.lockf(p, fcntl.LOCK_EX)
open(lk + ".held", "w").close()
while not os.path.exists(lk + ".release"):
    time.sleep(0.05)
"""

WAITER = """
import fcntl, os, signal, sys, time
class TimedOut(Exception):
    pass
def alarm(*_):
    raise TimedOut
signal.signal(signal.SIGALRM, alarm)
fd = os.open(sys.argv[1], os.O_RDWR)
signal.alarm(1)
t = time.monotonic()
try:
    if sys.argv[2] == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)
    print("got it")
except TimedOut:
    print("timed out after", time.monotonic() - t)
"""


DEADLOCKER = """
import errno, fcntl, os, sys, time
path, me = sys.argv[1], sys.argv[2]
other = "B" if me == "A" else "A"
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
mine, theirs = (0, 1) if me == "A" else (1, 0)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, mine)
open(f"{path}.{me}", "w").close()
while not os.path.exists(f"{path}.{other}"):
    time.sleep(0.02)
if me == "B":
    time.sleep(0.5)  # (A asks first, and waits)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX, 1, theirs)
    print("got it")
except OSError as e:
    print("EDEADLK" if e.errno == errno.EDEADLK else errno.errorcode[e.errno])
"""


def test_a_record_lock_wait_that_would_deadlock_fails_edeadlk(fsc, d):
    """Two programs each holding a byte and wanting the other's, on one
    node or on two: the second to wait gets EDEADLK at once (as the kernel
    gives it), the first then gets its lock."""
    name, a, _ = d
    os.chmod(a, 0o777)
    (a / "dl.py").write_text(DEADLOCKER)
    for nodes in (("n2", "n2"), ("n1", "n2")):
        path = f"/data/{name}/dl-{nodes[0]}{nodes[1]}"
        waiters = [subprocess.Popen([str(BIN / "drvs-run"), "--vm", "web", "--", "python3", f"/data/{name}/dl.py",
                                     path, who], env={**fsc.env, "DRVS_NODE": node}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
                   for who, node in zip("AB", nodes)]
        try:
            outs = [w.communicate(timeout=30) for w in waiters]
        finally:
            for w in waiters:
                if w.poll() is None:
                    w.kill()
                    w.wait()
        assert sorted(out.strip() for out, _ in outs) == ["EDEADLK", "got it"], (nodes, outs)  # (either may ask last)


THREADED_WAITER = """
import fcntl, os, signal, sys, threading
signal.signal(signal.SIGALRM, lambda *_: print("alarm", flush=True))
fd = os.open(sys.argv[1], os.O_RDWR)
out = []
def take():
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        out.append("got it")
    except OSError as e:
        out.append(f"errno {e.errno}")
t = threading.Thread(target=take)
t.start()
signal.alarm(1)
t.join(3)
print(out[0] if out else "still waiting", flush=True)
os._exit(0)
"""


def test_a_lock_wait_held_by_another_node_ends_on_a_signal(fsc, d):
    """A waiting flock or F_SETLKW is interruptible, as in the kernel:
    flock -w times out, a handler that raises ends the wait, and the
    abandoned waits leave no lock behind at the server."""
    name, a, _ = d
    os.chmod(a, 0o777)
    (a / "holder.py").write_text(HOLDER)
    (a / "waiter.py").write_text(WAITER)
    (a / "threaded.py").write_text(THREADED_WAITER)
    lk = f"/data/{name}/lk"
    held = subprocess.Popen(
        [str(BIN / "drvs-run"), "--vm", "web", "--", "python3", f"/data/{name}/holder.py", lk],
        env={**fsc.env, "DRVS_NODE": "n1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: (a / "lk.held").exists())
        t = time.monotonic()
        r = jail(fsc, "n2", f"flock -w 1 {lk} true; echo $?", timeout=20)
        assert r.stdout.split() == ["1"], r.stderr   # flock(1)'s exit status for a timeout
        assert time.monotonic() - t < 15
        for kind, path in (("flock", lk), ("posix", f"{lk}.p")):
            r = jail(fsc, "n2", f"python3 /data/{name}/waiter.py {path} {kind}", timeout=20)
            words = r.stdout.split()
            assert words[:3] == ["timed", "out", "after"], (kind, r.stdout, r.stderr)
            assert 1.0 <= float(words[3]) < 2.0, r.stdout  # (within a wait slice of the alarm)
        # a process's signal in a process of several threads is its main
        # thread's here: the waiting thread waits on (never errno 512)
        r = jail(fsc, "n2", f"python3 /data/{name}/threaded.py {lk}", timeout=20)
        assert r.stdout.split("\n")[:2] == ["alarm", "still waiting"], (r.stdout, r.stderr)
    finally:
        (a / "lk.release").touch()
        held.wait(timeout=20)
    # the interrupted waits took nothing: once n1's node saw the holder end
    # (it looks every AGENT_EVERY), n1 takes both locks without waiting
    both = (f"flock -n {lk} true; echo $?; python3 -c 'import fcntl, os; "
            f"fcntl.lockf(os.open(\"{lk}.p\", os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB); print(0)'")
    _wait(lambda: jail(fsc, "n1", both).stdout.split() == ["0", "0"], timeout=10)


FALLOCATE_MAPPED = """
import ctypes, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 1 << 20)
m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)
m[:] = b"X" * (1 << 20)                       # dirty pages, not written back yet
libc = ctypes.CDLL(None, use_errno=True)
assert libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(65536)) == 0, ctypes.get_errno()  # punch, keep size
print(m[:65536].count(0), m[65536:].count(ord("X")))
m.close()
os.close(fd)
"""

FALLOCATE_RO = """
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    os.posix_fallocate(fd, 0, 10)
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def test_fallocate_in_a_jail_is_made_by_the_file_server(fsc, d):
    """fallocate(2) on the VM's files, from the server's node and another:
    preallocation, KEEP_SIZE, a punched hole and a collapsed range, seen by
    both nodes -- the caller's own cached pages too -- and by the replica;
    a read-only descriptor is EBADF; other files are the kernel's."""
    name, a, b = d
    os.chmod(a, 0o777)
    (a / "ro.py").write_text(FALLOCATE_RO)
    r = jail(fsc, "n2", f"cd /data/{name} && fallocate -l 1M pre && touch keep && fallocate -n -l 1M keep "
                        f"&& fallocate -l 64K /tmp/local && stat -c %s /tmp/local && python3 ro.py pre")
    assert r.returncode == 0 and r.stdout.split() == ["65536", "EBADF"], r.stderr
    assert ((a / "pre").stat().st_size, (a / "keep").stat().st_size) == (1 << 20, 0)
    assert (a / "pre").stat().st_blocks >= 2048 and (a / "keep").stat().st_blocks >= 2048
    for node, view_ in (("n2", b), ("n1", a)):  # from another node than the server's, then from the server's
        (a / "z").write_bytes(b"z" * 12288)
        assert (view_ / "z").read_bytes() == b"z" * 12288  # (the caller's node has the pages)
        r = jail(fsc, node, f"cd /data/{name} && od -An -c z | head -1 >/dev/null && fallocate -p -o 0 -l 4096 z "
                            f"&& fallocate -c -o 4096 -l 4096 z && od -An -tx1 -N 4 z && od -An -c -j 4096 -N 4 z")
        assert r.returncode == 0 and r.stdout.split() == ["00"] * 4 + ["z"] * 4, (node, r.stdout, r.stderr)
        for v in (a, b):
            assert (v / "z").read_bytes() == bytes(4096) + b"z" * 4096, (node, v)
    (a / "mapped.py").write_text(FALLOCATE_MAPPED)
    for node in ("n2", "n1"):  # a hole punched under a program's own dirty mapping stays a hole
        r = jail(fsc, node, f"python3 /data/{name}/mapped.py /data/{name}/m-{node}")
        assert r.stdout.split() == ["65536", str((1 << 20) - 65536)], (node, r.stdout, r.stderr)
        got = (b / f"m-{node}").read_bytes()
        assert got[:65536] == bytes(65536) and got[65536:] == b"X" * ((1 << 20) - 65536)
    replica = Path(fsc.node("n2")["state_dir"]) / "vms" / "web" / "fs" / "root" / name / "z"
    _wait(lambda: replica.exists() and replica.read_bytes() == bytes(4096) + b"z" * 4096)
