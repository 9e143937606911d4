"""The etcd client against a real etcd server."""

import pytest
import trio

from drvs.cluster.etcd import Etcd, EtcdUnavailable
from drvs.store import CompareFailed
from etcd_server import EtcdServer, free_port


@pytest.fixture(scope="module")
def etcd_url():
    server = EtcdServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def etcd(etcd_url, request):
    async with Etcd([etcd_url]) as client:
        prefix = f"/t/{request.node.name}/"
        await client.delete_prefix(prefix)
        client.prefix = prefix
        yield client


async def test_kv_and_compare_and_swap(etcd):
    p = etcd.prefix
    rev = await etcd.put(p + "a", "1", expect_revision=0)
    with pytest.raises(CompareFailed):
        await etcd.put(p + "a", "2", expect_revision=0)
    await etcd.put(p + "a", "2", expect_revision=rev)
    await etcd.put(p + "b", "x")
    assert (await etcd.get(p + "a")).value == "2"
    assert [e.key for e in await etcd.range(p)] == [p + "a", p + "b"]
    assert await etcd.delete(p + "a") is True
    assert await etcd.get(p + "a") is None


async def test_lease_expiry_removes_keys(etcd):
    lease = await etcd.grant(1)
    await etcd.put(etcd.prefix + "alive", "yes", lease=lease)
    assert await etcd.get(etcd.prefix + "alive")
    with trio.fail_after(10):
        while await etcd.get(etcd.prefix + "alive"):
            await trio.sleep(0.2)


async def test_watch_sees_puts_and_deletes(etcd):
    seen = []

    async def watcher(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        async for ev, entry in etcd.watch(etcd.prefix):
            seen.append((ev, entry.key, entry.value))
            if len(seen) == 2:
                return

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(watcher)
            await trio.sleep(0.3)
            await etcd.put(etcd.prefix + "w", "v")
            await etcd.delete(etcd.prefix + "w")
    assert seen == [("put", etcd.prefix + "w", "v"), ("delete", etcd.prefix + "w", "")]


async def test_watch_reopens_a_silent_stream_without_losing_or_repeating_events(etcd, monkeypatch):
    """A stream that says nothing for WATCH_SILENCE is opened again from the
    revision after the last event seen: events put while it was being
    reopened still arrive, each once, in order."""
    import drvs.cluster.etcd as etcd_module

    monkeypatch.setattr(etcd_module, "WATCH_SILENCE", 0.3)
    seen = []

    async def watcher(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started()
        async for ev, entry in etcd.watch(etcd.prefix):
            seen.append(entry.value)
            if len(seen) == 6:
                return

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            await n.start(watcher)
            await trio.sleep(0.2)
            for i in range(6):
                await etcd.put(etcd.prefix + "k", str(i))
                await trio.sleep(0.25 * (i % 3))  # some land while the stream is being reopened
    assert seen == [str(i) for i in range(6)]


async def test_lock_is_exclusive_and_released_with_the_lease(etcd):
    holder = await etcd.grant(30)
    other = await etcd.grant(30)
    await etcd.lock(etcd.prefix + "L", holder)
    with pytest.raises(trio.TooSlowError):
        await etcd.lock(etcd.prefix + "L", other, timeout=0.5)
    await etcd.revoke(holder)  # the holder "dies"
    with trio.fail_after(5):
        key = await etcd.lock(etcd.prefix + "L", other, timeout=5)
    await etcd.unlock(key)


async def test_election_moves_when_the_leader_goes(etcd):
    a, b = await etcd.grant(30), await etcd.grant(30)
    await etcd.campaign(etcd.prefix + "E", "node-a", a)
    assert await etcd.leader(etcd.prefix + "E") == "node-a"
    async with trio.open_nursery() as n:
        won = trio.Event()

        async def campaign_b():
            await etcd.campaign(etcd.prefix + "E", "node-b", b)
            won.set()

        n.start_soon(campaign_b)
        await trio.sleep(0.3)
        assert not won.is_set()
        await etcd.revoke(a)
        with trio.fail_after(5):
            await won.wait()
    assert await etcd.leader(etcd.prefix + "E") == "node-b"


async def test_unreachable_etcd_fails_fast():
    async with Etcd([f"http://127.0.0.1:{free_port()}"], timeout=1) as dead:
        with trio.fail_after(5), pytest.raises(EtcdUnavailable, match="etcd unreachable"):
            await dead.get("/x")


def test_the_commands_store_puts_only_if_a_range_is_unchanged(etcd_url):
    """The same guarantee from etcd (a compare over a key range), for the
    synchronous store the commands use."""
    from drvs.store.etcd import EtcdStore
    from test_store import check_put_unchanged

    s = EtcdStore([etcd_url])
    for key in ("/vms/a", "/vms/b", "/vms/c", "/other", "/none/x"):
        s.delete(key)
    check_put_unchanged(s)


def test_the_commands_store_puts_only_if_other_keys_are_as_read(etcd_url):
    from drvs.store.etcd import EtcdStore
    from test_store import check_put_same

    s = EtcdStore([etcd_url])
    for key in ("/fs/web", "/fs/none", "/vms/web"):
        s.delete(key)
    check_put_same(s)


def test_an_unreachable_etcd_is_said_in_words():
    """What urllib and ssl wrap a failure in is not the user's to read."""
    import socket
    import urllib.error

    from drvs.errors import reason

    assert reason(urllib.error.URLError(socket.timeout("_ssl.c:989: The handshake operation timed out"))) \
        == "no answer in time"  # (as the daemon's httpx client says it: one wording for a timeout)
    assert reason(urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))) \
        == "[Errno 111] Connection refused"


async def test_group_leave_deletes_only_the_membership_it_read(etcd):
    """A membership that passes to another node between group leave's read
    and its delete (the endpoint joined again through its new node) stays:
    the leave fails as another node's, it does not end the new one."""
    from types import SimpleNamespace

    from drvs.ipc import services
    from drvs.ipc.message import IpcError, Msg
    from drvs.ipc.schema import drvmm

    svc = services.DrvmmService(etcd, SimpleNamespace(name="n1"))
    key = f"{services.GROUPS}g/pm@web"
    await etcd.put(key, "n1")
    real_get = etcd.get

    async def get_then_moved(k):
        entry = await real_get(k)
        await etcd.put(key, "n2")  # (meanwhile: the endpoint joined through n2)
        return entry

    etcd.get = get_then_moved
    msg = Msg(drvmm.DrvmmCall.groupLeave, drvmm.NameRequest.new_message(name="g", value="pm@web").to_bytes_packed())
    try:
        with pytest.raises(IpcError, match="through node n2"):
            await svc.group_leave(msg)
    finally:
        del etcd.get
    assert (await etcd.get(key)).value == "n2"
    await etcd.delete(key)
