"""An async (trio) client for etcd v3 over its JSON gateway.

etcd's Python clients speak gRPC on asyncio or threads; this daemon is trio,
so it talks to the gateway (`/v3/kv/range`, `/v3/lease/grant`, `/v3/watch`,
`/v3/lock/lock`, `/v3/election/campaign`, ...) with httpx, which runs on trio.
Keys and values are base64 on the wire and str here.

Every call has a deadline; an unreachable or failing etcd raises
`EtcdUnavailable` (after trying every endpoint), never hangs.
"""

import base64
import json
import math

import httpx
import trio

from ..errors import DrvsError, EtcdUnavailable, reason  # noqa: F401 - (EtcdUnavailable: imported from here too)

PROGRESS_EVERY = 2.0   # seconds: etcd's progress notifications (etcd_process.py starts it so)
WATCH_SILENCE = 10.0   # seconds without a word after which a stream is opened again
from ..store import CompareFailed, Entry


class EtcdError(DrvsError):
    exit_code = 6


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str | None) -> str:
    return base64.b64decode(s or "").decode()


def prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with prefix."""
    b = bytearray(prefix.encode())
    for i in reversed(range(len(b))):
        if b[i] < 0xFF:
            b[i] += 1
            return _b64(bytes(b[: i + 1]))
    return _b64(b"\0")


def _entry(kv: dict) -> Entry:
    return Entry(_unb64(kv["key"]), _unb64(kv.get("value")), int(kv.get("create_revision", 0)),
                 int(kv.get("mod_revision", 0)))


class Etcd:
    """One connection pool to an etcd cluster (a list of client URLs)."""

    def __init__(self, endpoints: list[str], timeout: float = 5.0, verify=True, cert=None):
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._client = httpx.AsyncClient(timeout=timeout, verify=verify, cert=cert)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> "Etcd":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    # -- transport ---------------------------------------------------------

    async def call(self, path: str, body: dict, timeout: float | None = None) -> dict:
        """POST to the gateway; the first endpoint that answers wins.

        With an explicit timeout (a blocking lock or campaign), running out
        of it raises trio.TooSlowError: the request was heard, not answered."""
        last: Exception | None = None
        limit = timeout or self.timeout
        # Blocking calls (lock, campaign) wait as long as the caller allows.
        http_timeout = httpx.Timeout(self.timeout, read=None if math.isinf(limit) else limit)
        for url in self.endpoints:
            try:
                with trio.fail_after(limit):
                    r = await self._client.post(url + path, content=json.dumps(body), timeout=http_timeout)
            except trio.TooSlowError as e:
                if timeout is not None:
                    raise
                last = e
                continue
            except httpx.TransportError as e:
                last = e
                continue
            data = r.json() if r.content else {}
            if r.status_code != 200:
                raise EtcdError(f"etcd {path}: {data.get('error') or data.get('message') or r.status_code}")
            return data
        why = reason(last, empty="no answer in time")
        from .etcd_process import CLOSED_HINT, closed_on_us

        if closed_on_us(last):
            why += CLOSED_HINT
        raise EtcdUnavailable(f"etcd unreachable at {', '.join(self.endpoints)}: {why}")

    # -- key-value -----------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        data = await self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return _entry(kvs[0]) if kvs else None

    async def range(self, prefix: str) -> list[Entry]:
        data = await self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        return [_entry(kv) for kv in data.get("kvs") or []]

    async def put(self, key: str, value: str, *, lease: int = 0, expect_revision: int | None = None) -> int:
        put = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        if expect_revision is None:
            data = await self.call("/v3/kv/put", put)
            return int(data["header"]["revision"])
        data = await self._txn(key, expect_revision, {"request_put": put})
        return int(data["header"]["revision"])

    async def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        req = {"key": _b64(key)}
        if expect_revision is None:
            data = await self.call("/v3/kv/deleterange", req)
            return int(data.get("deleted", 0)) > 0
        data = await self._txn(key, expect_revision, {"request_delete_range": req})
        resp = data["responses"][0].get("response_delete_range", {})
        return int(resp.get("deleted", 0)) > 0

    async def delete_prefix(self, prefix: str) -> int:
        data = await self.call("/v3/kv/deleterange", {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        return int(data.get("deleted", 0))

    async def delete_and_put(self, key: str, expect_revision: int, puts: dict[str, str]) -> None:
        """Delete key, if still at expect_revision, and put puts, at once."""
        await self._txn(key, expect_revision, {"request_delete_range": {"key": _b64(key)}},
                        *({"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in puts.items()))

    async def _txn(self, key: str, expect_revision: int, *ops: dict) -> dict:
        compare = {"key": _b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(expect_revision)}
        data = await self.call("/v3/kv/txn", {"compare": [compare], "success": list(ops)})
        if not data.get("succeeded"):
            raise CompareFailed(f"{key}: not at revision {expect_revision}")
        return data

    # -- leases --------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        data = await self.call("/v3/lease/grant", {"TTL": ttl})
        return int(data["ID"])

    async def keepalive_once(self, lease: int) -> int:
        """Renew a lease; returns the TTL left (0: the lease is gone)."""
        data = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int((data.get("result") or {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    async def keep_alive(self, lease: int, ttl: int) -> None:
        """Renew forever at a third of the TTL; returns if the lease was lost."""
        while True:
            await trio.sleep(max(ttl / 3, 0.2))
            if await self.keepalive_once(lease) <= 0:
                return

    # -- watch ---------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int = 0):
        """Events under prefix as ("put"|"delete", Entry), forever.

        A stream that falls silent for WATCH_SILENCE (etcd sends progress
        notifications every PROGRESS_EVERY, see etcd_process.py) or breaks
        is opened again from the revision after the last one seen, so no
        event is lost or repeated.  When etcd has compacted that revision
        away, ("reset", None) says: read the whole state again.  Raises
        EtcdUnavailable when no endpoint answers (the caller retries)."""
        next_rev = start_revision
        while True:
            last: Exception | None = None
            for url in self.endpoints:
                req = {"create_request": {"key": _b64(prefix), "range_end": prefix_end(prefix),
                                          "progress_notify": True}}
                if next_rev:
                    req["create_request"]["start_revision"] = str(next_rev)
                try:
                    async with self._client.stream("POST", url + "/v3/watch", content=json.dumps(req),
                                                    timeout=httpx.Timeout(self.timeout, read=WATCH_SILENCE)) as r:
                        if r.status_code != 200:
                            raise EtcdError(f"etcd watch on {prefix}: HTTP {r.status_code}")
                        async for line in r.aiter_lines():
                            if not line.strip():
                                continue
                            result = json.loads(line).get("result", {})
                            if int(result.get("compact_revision") or 0):
                                next_rev = 0
                                yield "reset", None
                                break
                            for ev in result.get("events") or []:
                                entry = _entry(ev["kv"])
                                next_rev = max(next_rev, entry.mod_revision + 1)
                                yield ("delete" if ev.get("type") == "DELETE" else "put"), entry
                            if result.get("canceled"):
                                raise EtcdError(f"etcd canceled the watch on {prefix}: "
                                                f"{result.get('cancel_reason', '')}")
                            revision = int((result.get("header") or {}).get("revision") or 0)
                            if revision and not next_rev:
                                next_rev = revision + 1  # a watch from now: created at this revision
                            elif revision and not result.get("events") and not result.get("created"):
                                # a progress notification: all up to here was seen.  (Not
                                # "created": a resumed watch catches up after that.)
                                next_rev = max(next_rev, revision + 1)
                    last = None
                    await trio.sleep(0.2)  # ended (or reset) by etcd: open it again, without spinning
                    break
                except httpx.ReadTimeout:
                    last = None
                    break  # silent too long: a dead connection, or an etcd without progress notifications
                except httpx.TransportError as e:
                    last = e
            if last is not None:
                raise EtcdUnavailable(f"etcd watch: unreachable at {', '.join(self.endpoints)}: {last}")

    # -- locks and election (etcd's v3lock and v3election services) ---------

    async def lock(self, name: str, lease: int, timeout: float = math.inf) -> str:
        """Block until this lease holds the lock; the returned key unlocks it.
        The lock goes with the lease (a dead holder's lease expires)."""
        data = await self.call("/v3/lock/lock", {"name": _b64(name), "lease": str(lease)}, timeout=timeout)
        return _unb64(data["key"])

    async def unlock(self, key: str) -> None:
        await self.call("/v3/lock/unlock", {"key": _b64(key)})

    async def campaign(self, election: str, value: str, lease: int, timeout: float = math.inf) -> dict:
        """Block until elected; returns the leader key to resign with."""
        data = await self.call("/v3/election/campaign",
                               {"name": _b64(election), "value": _b64(value), "lease": str(lease)}, timeout=timeout)
        return data["leader"]

    async def leader(self, election: str) -> str | None:
        """The current leader's value, or None."""
        try:
            data = await self.call("/v3/election/leader", {"name": _b64(election)})
        except EtcdError as e:
            if "no leader" in str(e):
                return None
            raise
        return _unb64(data["kv"]["value"])

    async def observe(self, election: str):
        """The election's leader value each time the leadership changes,
        forever.  The stream is opened again after WATCH_SILENCE without
        news (etcd sends none while the leader stays): a dead connection is
        noticed; the current leader it then reports is passed on only if it
        is a new leadership (another key or revision)."""
        req = json.dumps({"name": _b64(election)})
        seen = None
        while True:
            last: Exception | None = None
            for url in self.endpoints:
                try:
                    async with self._client.stream("POST", url + "/v3/election/observe", content=req,
                                                    timeout=httpx.Timeout(self.timeout, read=WATCH_SILENCE)) as r:
                        async for line in r.aiter_lines():
                            kv = (json.loads(line).get("result") or {}).get("kv") if line.strip() else None
                            if kv and (kv.get("key"), kv.get("create_revision")) != seen:
                                seen = (kv.get("key"), kv.get("create_revision"))
                                yield _unb64(kv.get("value"))
                    last = None
                    await trio.sleep(0.2)
                    break
                except httpx.ReadTimeout:
                    last = None
                    break
                except httpx.TransportError as e:
                    last = e
            if last is not None:
                raise EtcdUnavailable(f"etcd observe: unreachable at {', '.join(self.endpoints)}: {last}")

    async def resign(self, leader: dict) -> None:
        await self.call("/v3/election/resign", {"leader": leader})


class Changes:
    """Wake-ups on changes under a prefix: a watch kept open (opened again
    when etcd was away), for a waiter that reads what it needs anew."""

    def __init__(self, etcd: Etcd, prefix: str, what: str):
        self.etcd, self.prefix, self.what = etcd, prefix, what
        self._changed = trio.Event()

    async def watch(self) -> None:
        import logging

        while True:
            try:
                async for _ in self.etcd.watch(self.prefix):
                    self._changed.set()
            except DrvsError as e:  # etcd away, or the watch refused
                logging.getLogger("drvmmd").warning("%s: %s; watching again soon", self.what, e)
            await trio.sleep(1)

    async def wait(self, timeout: float) -> None:
        """Until a change since the last wait, or timeout seconds."""
        with trio.move_on_after(timeout):
            await self._changed.wait()
        self._changed = trio.Event()
