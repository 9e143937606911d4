"""A VM file server's store on its node's disk: what it accepts as paths,
and how it refuses a store it did not make or that is damaged."""

import errno
import json
import os

import pytest

from drvs.errors import SetupError
from drvs.fs.store import Store, check_path, made_of


def test_a_new_store_is_made_and_opened_again(tmp_path):
    s = Store(str(tmp_path / "fs"), "web", made=17)
    s.close()
    assert json.loads((tmp_path / "fs" / "STORE").read_text()) == {"format": 1, "vm": "web", "made": 17}
    assert made_of(str(tmp_path / "fs")) == 17
    assert Store(str(tmp_path / "fs"), "web").made == 17    # (0: whichever definition is there)
    Store(str(tmp_path / "fs"), "web", made=17).close()
    with pytest.raises(SetupError) as e:                       # the VM made again is another store
        Store(str(tmp_path / "fs"), "web", made=40)
    assert "of VM 'web' as defined at revision 17, not 40" in str(e.value)
    old = tmp_path / "old"                                     # a store made before markers said
    Store(str(old), "web").close()
    (old / "STORE").write_text('{"format": 1, "vm": "web"}')
    Store(str(old), "web", made=9).close()
    assert made_of(str(old)) == 9                              # it says from now on


@pytest.mark.parametrize("marker, words", [
    ("{not json", "unreadable STORE marker"),
    ('{"format": 1, "vm": "db"}', "expected format 1 of VM 'web'"),
    ('{"format": 9, "vm": "web"}', "expected format 1 of VM 'web'"),
    ("", "unreadable STORE marker"),
])
def test_a_damaged_or_foreign_store_is_refused_with_a_clear_message(tmp_path, marker, words):
    base = tmp_path / "fs"
    Store(str(base), "web").close()
    (base / "root" / "precious").write_text("data")
    (base / "STORE").write_text(marker)
    with pytest.raises(SetupError) as e:
        Store(str(base), "web")
    assert words in str(e.value)
    assert (base / "root" / "precious").read_text() == "data"  # nothing was touched


def test_files_without_a_marker_are_never_taken_over(tmp_path):
    base = tmp_path / "fs"
    (base / "root").mkdir(parents=True)
    (base / "root" / "precious").write_text("data")
    with pytest.raises(SetupError) as e:
        Store(str(base), "web")
    assert "not a DRVS store" in str(e.value)
    assert not (base / "STORE").exists()


def test_a_store_whose_root_is_gone_is_reported(tmp_path):
    base = tmp_path / "fs"
    Store(str(base), "web").close()
    os.rmdir(base / "root")
    with pytest.raises(SetupError) as e:
        Store(str(base), "web")
    assert "root is missing" in str(e.value)


@pytest.mark.parametrize("path, err", [
    (b"../etc", errno.EINVAL), (b"a/../../b", errno.EINVAL), (b"/abs", errno.EINVAL), (b"a//b", errno.EINVAL),
    (b"a/./b", errno.EINVAL), (b"n" * 256, errno.ENAMETOOLONG), (b"a/" * 2100, errno.ENAMETOOLONG),
    (b"a\0b", errno.EINVAL),
])
def test_paths_from_clients_are_checked(path, err):
    with pytest.raises(OSError) as e:
        check_path(path)
    assert e.value.errno == err


def test_links_planted_in_the_store_are_never_followed(tmp_path):
    s = Store(str(tmp_path / "fs"), "web")
    try:
        os.symlink("/etc", tmp_path / "fs" / "root" / "out")
        os.symlink("/proc/self/root", tmp_path / "fs" / "root" / "magic")
        for path in (b"out/passwd", b"magic/etc/passwd"):
            with pytest.raises(OSError) as e:
                s.open(path, os.O_RDONLY)
            assert e.value.errno in (errno.ELOOP, errno.EXDEV)
        with pytest.raises(OSError) as e:  # the link itself is found, not its target
            s.open(b"out", os.O_RDONLY | os.O_NOFOLLOW)
        assert e.value.errno == errno.ELOOP
        assert s.lstat(b"out").st_size == len("/etc")
    finally:
        s.close()


def _req(**fields):
    from drvs.fs.server import LocalRequest

    base = {"mode": 0o100644, "uid": 0, "gid": 0, "atimeNs": 10**18, "mtimeNs": 10**18}
    return LocalRequest("web", **{**base, **fields})


def test_a_replica_copy_never_writes_through_a_link_planted_in_the_vm(tmp_path):
    """The copy to a replica builds root.new from the server's calls: a name
    that was a link to the host and is now a directory (or a file) is made
    anew, never followed."""
    import stat as st_

    from drvs.fs.replica import LAST, Builder

    host = tmp_path / "host"
    host.mkdir()
    (host / "passwd").write_text("host's own")
    base = tmp_path / "fs"
    Store(str(base), "web").close()
    b = Builder(str(base))
    b.begin()
    b.put_link(_req(path=b"d", data=str(host).encode()))
    with pytest.raises(OSError):  # through the link: refused
        b.put_file(_req(path=b"d/passwd"))
    b.put_dir(_req(path=b"d", mode=0o040755, flags=LAST))     # d became a directory in the VM
    b.put_file(_req(path=b"d/passwd"))
    b.put_file(_req(path=b"d/passwd", offset=0, data=b"VM's"))
    b.put_file(_req(path=b"d/passwd", flags=LAST, size=4, mode=0o100600))
    assert (host / "passwd").read_text() == "host's own"
    assert (host / "passwd").stat().st_mode & 0o777 != 0o600
    # a name that was a hard link of another gets an inode of its own
    b.put_file(_req(path=b"a"))
    b.put_file(_req(path=b"a", flags=LAST, size=0))
    b.put_hardlink(_req(path=b"b", path2=b"a"))
    b.put_file(_req(path=b"b"))
    b.put_file(_req(path=b"b", offset=0, data=b"new b"))
    b.put_file(_req(path=b"b", flags=LAST, size=5))
    b.commit()
    root = base / "root"
    assert (root / "d" / "passwd").read_bytes() == b"VM's"
    assert st_.S_ISDIR((root / "d").lstat().st_mode)
    assert (root / "a").read_bytes() == b"" and (root / "b").read_bytes() == b"new b"
    assert not (base / "root.new").exists()
    Store(str(base), "web").close()  # the exchanged tree is a whole store


def test_a_replica_copy_keeps_extended_attributes_and_link_times(tmp_path):
    """A copy's last call of a file or directory carries its user.*
    attributes (a directory ends with exactly those of the last pass), and
    a link's times are its own."""
    from types import SimpleNamespace as X

    from drvs.fs.replica import LAST, Builder

    base = tmp_path / "fs"
    Store(str(base), "web").close()
    b = Builder(str(base))
    b.begin()
    b.put_dir(_req(path=b"d"))
    b.put_file(_req(path=b"d/f"))
    b.put_file(_req(path=b"d/f", flags=LAST, size=0, mode=0o100644,
                    xattrs=[X(name=b"user.a", value=b"1"), X(name=b"user.b", value=b"")]))
    b.put_link(_req(path=b"d/l", data=b"f", atimeNs=10**18, mtimeNs=2 * 10**18))
    for xattrs in ([X(name=b"user.old", value=b"x")], [X(name=b"user.d", value=b"2")]):  # two passes
        b.put_dir(_req(path=b"d", mode=0o040755, flags=LAST, xattrs=xattrs))
    b.put_dir(_req(path=b"", mode=0o040755, flags=LAST, xattrs=[X(name=b"user.root", value=b"r")]))
    b.commit()
    root = base / "root"
    assert {n: os.getxattr(root / "d" / "f", n) for n in os.listxattr(root / "d" / "f")} == \
        {"user.a": b"1", "user.b": b""}
    assert os.listxattr(root / "d") == ["user.d"] and os.getxattr(root, "user.root") == b"r"
    st = os.lstat(root / "d" / "l")
    assert (st.st_atime_ns, st.st_mtime_ns) == (10**18, 2 * 10**18)
    Store(str(base), "web").close()


def test_a_directory_is_found_by_its_handle_wherever_it_was_moved(tmp_path):
    """A node that lost a directory's path (another node moved it) names it
    by its file handle; a handle of anything outside the VM's tree (another
    VM's store, the node's own files) or bytes that are no handle name
    nothing; a removed directory is ENOENT."""
    s = Store(str(tmp_path / "fs"), "web")
    other = Store(str(tmp_path / "other"), "db")
    try:
        root = tmp_path / "fs" / "root"
        (root / "proj" / "src").mkdir(parents=True)
        fd = os.open(root / "proj", os.O_PATH)
        try:
            handle = Store.handle_of(fd, b"src")
        finally:
            os.close(fd)
        assert s.find(handle) == b"proj/src"
        (root / "deep").mkdir()
        os.rename(root / "proj", root / "deep" / "moved")
        assert s.find(handle) == b"deep/moved/src"
        os.rename(root / "deep" / "moved" / "src", root / "top")
        assert s.find(handle) == b"top"
        (tmp_path / "other" / "root" / "theirs").mkdir()
        for outside in (tmp_path / "other" / "root" / "theirs", tmp_path, tmp_path / "fs"):
            fd = os.open(outside, os.O_PATH)
            try:
                foreign = Store.handle_of(fd, b"")
            finally:
                os.close(fd)
            with pytest.raises(OSError) as e:
                s.find(foreign)
            assert e.value.errno == errno.ESTALE, outside
        for junk in (b"", b"abc", handle[:4], handle[:4] + b"\xff" * 8, b"x" * 200):
            with pytest.raises(OSError) as e:
                s.find(junk)
            assert e.value.errno == errno.ESTALE, junk
        # A removed directory (the server keeps those nodes hold open): ENOENT
        # in this tree, ESTALE outside it.
        (tmp_path / "gone").mkdir()
        kept = [os.open(root / "top", os.O_PATH), os.open(tmp_path / "gone", os.O_PATH)]
        try:
            gone = Store.handle_of(kept[1], b"")
            os.rmdir(root / "top")
            os.rmdir(tmp_path / "gone")
            errnos = []
            for h in (handle, gone):
                with pytest.raises(OSError) as e:
                    s.find(h)
                errnos.append(e.value.errno)
            assert errnos == [errno.ENOENT, errno.ESTALE]
        finally:
            for fd in kept:
                os.close(fd)
    finally:
        s.close()
        other.close()


def test_a_store_reached_through_a_link_finds_its_directories(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    s = Store(str(tmp_path / "link" / "fs"), "web")
    try:
        (tmp_path / "real" / "fs" / "root" / "d").mkdir()
        assert s.find(Store.handle_of(s.root, b"d")) == b"d"
        assert s.find(Store.handle_of(s.root, b"")) == b""
    finally:
        s.close()


def test_names_that_are_not_utf8_fail_as_oserrors(tmp_path):
    """A VM's programs name files with any bytes: the kernel's refusal comes
    back as OSError (a UnicodeDecodeError would be a server error)."""
    from drvs import _fs

    s = Store(str(tmp_path / "fs"), "web")
    try:
        with pytest.raises(OSError) as e:
            _fs.openat2(s.root, b"no-such-\xff", os.O_RDONLY, 0, 0)
        assert e.value.errno == errno.ENOENT
        assert Store.handle_of(s.root, b"no-such-\xff") == b""
    finally:
        s.close()
