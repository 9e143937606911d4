"""The embedded store: what VM definitions rely on across restarts."""

import json
import subprocess
import sys

import pytest

from drvs.errors import StoreError
from drvs.store import CompareFailed
from drvs.store.embedded import EmbeddedStore


def test_put_get_range_delete(tmp_path):
    s = EmbeddedStore(tmp_path / "store.json")
    r1 = s.put("/vms/a", '{"n": 1}')
    r2 = s.put("/vms/b", '{"n": 2}')
    s.put("/other", "x")
    assert r2 == r1 + 1
    assert s.get("/vms/a").value == '{"n": 1}'
    assert [e.key for e in s.range("/vms/")] == ["/vms/a", "/vms/b"]
    assert s.delete("/vms/a") is True
    assert s.delete("/vms/a") is False
    assert s.get("/vms/a") is None


def test_compare_and_swap(tmp_path):
    s = EmbeddedStore(tmp_path / "store.json")
    rev = s.put("/k", "1", expect_revision=0)
    with pytest.raises(CompareFailed):
        s.put("/k", "2", expect_revision=0)
    s.put("/k", "2", expect_revision=rev)
    assert s.get("/k").value == "2"
    assert s.get("/k").create_revision == rev


def test_survives_a_new_process(tmp_path):
    path = tmp_path / "store.json"
    EmbeddedStore(path).put("/k", "v")
    out = subprocess.run([sys.executable, "-c",
                          f"from drvs.store.embedded import EmbeddedStore as S; print(S({str(path)!r}).get('/k').value)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "v"


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "store.json"
    code = f"""
from drvs.store.embedded import EmbeddedStore as S
import sys
s = S({str(path)!r})
for i in range(30):
    s.put(f"/w{{sys.argv[1]}}/{{i}}", "x")
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(n)]) for n in range(4)]
    assert all(p.wait() == 0 for p in procs)
    assert len(EmbeddedStore(path).range("/w")) == 120


def test_corrupt_store_is_reported_not_overwritten(tmp_path):
    path = tmp_path / "store.json"
    path.write_text('{"format": 1, "revision": 3, "kv": {"/a": ["x", 1, 1]')  # torn
    s = EmbeddedStore(path)
    with pytest.raises(StoreError, match="corrupt"):
        s.get("/a")
    with pytest.raises(StoreError):
        s.put("/b", "y")
    assert path.read_text().endswith('1, 1]')  # untouched


def test_file_is_complete_json_after_each_write(tmp_path):
    path = tmp_path / "store.json"
    s = EmbeddedStore(path)
    for i in range(5):
        s.put(f"/k{i}", str(i))
        assert len(json.loads(path.read_text())["kv"]) == i + 1


def check_put_unchanged(s):
    """put(unchanged=...): written only if nothing under the prefix was
    written since the snapshot (what VM admission relies on)."""
    s.put("/vms/a", "1")
    entries, rev = s.snapshot("/vms/")
    assert [e.key for e in entries] == ["/vms/a"]
    s.put("/other", "x")                                            # outside the range: no matter
    s.put("/vms/b", "2", expect_revision=0, unchanged=("/vms/", rev))
    with pytest.raises(CompareFailed):
        s.put("/vms/c", "3", expect_revision=0, unchanged=("/vms/", rev))  # b was written since
    assert s.get("/vms/c") is None
    _, rev = s.snapshot("/vms/")
    s.put("/vms/a", "changed")
    with pytest.raises(CompareFailed):
        s.put("/vms/c", "3", unchanged=("/vms/", rev))
    _, rev = s.snapshot("/none/")
    s.put("/none/x", "1", expect_revision=0, unchanged=("/none/", rev))  # an empty range holds


def test_put_only_if_a_range_is_unchanged(tmp_path):
    check_put_unchanged(EmbeddedStore(tmp_path / "store.json"))


def check_put_same(s):
    """put(same=...): written only if other keys are still as they were
    read, absent ones still absent (what `vm update` relies on: the file
    server's in-sync list it checked has not changed when the VM's new
    definition is stored)."""
    s.put("/fs/web", "in sync: n1, n2")
    state = s.get("/fs/web")
    rev = s.put("/vms/web", "v1", same={"/fs/web": state.mod_revision, "/fs/none": 0})
    s.put("/fs/web", "in sync: n1")                                  # a replica dropped out meanwhile
    with pytest.raises(CompareFailed):
        s.put("/vms/web", "v2", expect_revision=rev, same={"/fs/web": state.mod_revision})
    assert s.get("/vms/web").value == "v1"
    s.put("/fs/none", "made")
    with pytest.raises(CompareFailed):
        s.put("/vms/web", "v2", same={"/fs/none": 0})
    s.put("/vms/web", "v2", expect_revision=rev, same={"/fs/web": s.get("/fs/web").mod_revision})
    assert s.get("/vms/web").value == "v2"


def test_put_only_if_other_keys_are_as_read(tmp_path):
    check_put_same(EmbeddedStore(tmp_path / "store.json"))
