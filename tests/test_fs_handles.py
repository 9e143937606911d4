"""A node that lost a directory's path -- another node moved it, or one
above it -- names it by its file handle: the client against a real file
server on a real store (see tests/test_fs_cache.py's Net)."""

import errno
import os

import pyfuse3
import pytest

from drvs.fs.client import MASK
from drvs.fs.server import Call
from tests import test_fs_cache
from tests.test_fs_cache import n3

n2, no_kernel = test_fs_cache.n2, test_fs_cache.no_kernel  # (fixtures: a client and a server, no kernel)

DIR = 0o40755


async def tree(server, *dirs: bytes) -> None:
    for d in dirs:
        await n3(server, Call.mkdir, path=d, mode=DIR)


async def test_calls_below_a_directory_another_node_moved_are_made_where_it_is_now(n2):
    vmfs, net, _, root = n2
    store = net.server.store.prefix.decode()
    await tree(net.server, b"proj", b"proj/src", b"deep")
    proj = (await vmfs.lookup(root, b"proj")).st_ino
    src = (await vmfs.lookup(proj, b"src")).st_ino
    await n3(net.server, Call.rename, path=b"proj", path2=b"deep/moved")  # n2 is told: proj's name is gone
    f = (await vmfs.mknod(src, b"f", 0o100644, 0, None)).st_ino
    await vmfs.rename(src, b"f", src, b"g", 0, None)
    assert os.listdir(f"{store}/deep/moved/src") == ["g"]
    assert (await vmfs.getattr(f)).st_ino == f
    # After a new term only what the kernel looked up again has a handle:
    # the nearest one below the lost name serves.
    vmfs.inodes[proj & MASK].handle = b""
    await vmfs.mkdir(src, b"sub", DIR, None)
    assert sorted(os.listdir(f"{store}/deep/moved/src")) == ["g", "sub"]
    vmfs.inodes[src & MASK].handle = b""
    with pytest.raises(pyfuse3.FUSEError) as e:
        await vmfs.getattr(f)
    assert e.value.errno == errno.ESTALE  # (the kernel walks the path again)


async def test_a_listing_whose_path_went_elsewhere_is_read_on_by_handle(n2):
    """The move's invalidation not yet here: the path names nothing, or
    another directory; the listing is of the directory meant."""
    vmfs, net, _, root = n2
    await tree(net.server, b"a", b"b")
    await n3(net.server, Call.mknod, path=b"a/in-a", mode=0o100644)
    await n3(net.server, Call.mknod, path=b"b/in-b", mode=0o100644)
    a = (await vmfs.lookup(root, b"a")).st_ino

    class Deaf:  # (n2 hears of nothing for now)
        @staticmethod
        async def invalidate(inv) -> None:
            pass

    told, net.vmfs = net.vmfs, Deaf()
    try:
        await n3(net.server, Call.rename, path=b"a", path2=b"a2")
        names, _ = await vmfs._list(a & MASK)
        assert [n for n, _ in names] == [b"in-a"]
        await n3(net.server, Call.rename, path=b"b", path2=b"a")  # "a" names another directory now
        names, _ = await vmfs._list(a & MASK)
        assert [n for n, _ in names] == [b"in-a"]
    finally:
        net.vmfs = told
