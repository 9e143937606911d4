"""The cluster store for short-lived commands: etcd's JSON gateway over
urllib, synchronously (commands are not trio programs; the daemon uses
drvs.cluster.etcd).  Same interface as the embedded store."""

import base64
import json
import urllib.error
import urllib.request

from ..errors import EtcdUnavailable, StoreError, reason
from . import CompareFailed, Entry, Store


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _entry(kv: dict) -> Entry:
    dec = lambda s: base64.b64decode(s or "").decode()  # noqa: E731
    return Entry(dec(kv["key"]), dec(kv.get("value")), int(kv.get("create_revision", 0)),
                 int(kv.get("mod_revision", 0)))


class EtcdStore(Store):
    def __init__(self, endpoints: list[str], timeout: float = 5.0, tls: dict | None = None):
        self.endpoints, self.timeout = list(endpoints), timeout
        self.context = None
        if tls:
            from ..cluster.etcd_process import client_context

            self.context = client_context(tls)

    def _call(self, path: str, body: dict) -> dict:
        last = None
        for url in self.endpoints:
            req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout, context=self.context) as r:
                    return json.load(r)
            except urllib.error.HTTPError as e:
                raise StoreError(f"etcd {path}: {e.read().decode(errors='replace')[:200]}") from None
            except (OSError, ValueError) as e:
                last = e
        why = reason(last)
        from ..cluster.etcd_process import CLOSED_HINT, closed_on_us

        if closed_on_us(last):
            why += CLOSED_HINT
        raise EtcdUnavailable(f"etcd unreachable at {', '.join(self.endpoints)}: {why}")

    def get(self, key: str) -> Entry | None:
        kvs = self._call("/v3/kv/range", {"key": _b64(key)}).get("kvs") or []
        return _entry(kvs[0]) if kvs else None

    def range(self, prefix: str) -> list[Entry]:
        return self.snapshot(prefix)[0]

    def snapshot(self, prefix: str) -> tuple[list[Entry], int]:
        from ..cluster.etcd import prefix_end

        data = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        return [_entry(kv) for kv in data.get("kvs") or []], int(data["header"]["revision"])

    def put(self, key: str, value: str, *, expect_revision: int | None = None,
            unchanged: tuple[str, int] | None = None, same: dict | None = None) -> int:
        put = {"key": _b64(key), "value": _b64(value)}
        if expect_revision is None and unchanged is None and not same:
            return int(self._call("/v3/kv/put", put)["header"]["revision"])
        data = self._txn(key, expect_revision, {"request_put": put}, unchanged, same)
        return int(data["header"]["revision"])

    def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        req = {"key": _b64(key)}
        if expect_revision is None:
            return int(self._call("/v3/kv/deleterange", req).get("deleted", 0)) > 0
        data = self._txn(key, expect_revision, {"request_delete_range": req})
        return int(data["responses"][0].get("response_delete_range", {}).get("deleted", 0)) > 0

    def _txn(self, key: str, expect_revision: int | None, op: dict, unchanged: tuple[str, int] | None = None,
             same: dict | None = None) -> dict:
        expect = dict(same or {})
        if expect_revision is not None:
            expect[key] = expect_revision
        compare = [{"key": _b64(k), "target": "MOD", "result": "EQUAL", "mod_revision": str(r)}
                   for k, r in expect.items()]  # (a missing key's mod revision is 0)
        if unchanged is not None:
            from ..cluster.etcd import prefix_end

            prefix, revision = unchanged  # (a compare over a range holds for every key in it)
            compare.append({"key": _b64(prefix), "range_end": prefix_end(prefix), "target": "MOD",
                            "result": "LESS", "mod_revision": str(revision + 1)})
        data = self._call("/v3/kv/txn", {"compare": compare, "success": [op]})
        if not data.get("succeeded"):
            raise CompareFailed(f"{key}: not at revision {expect_revision}, or {unchanged} or {same} changed")
        return data
