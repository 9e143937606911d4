"""The cgroup layer on the kernel's own hierarchies, v1 and v2.

This machine mounts its controllers as v1 and keeps a v2 hierarchy with no
controllers; the v2 code paths (membership, cpu.stat, kill, nesting) are
exercised there, the limit files on whichever version holds each controller."""

import os
import signal
import subprocess
import time

import pytest

from drvs.ns import cgroup
from drvs.vm.model import Limits


def v2_hierarchy():
    for mountpoint, root, fstype, _opts in cgroup._cgroup_mounts():
        if fstype == "cgroup2":
            own = cgroup._own_cgroups().get("")
            if own is not None:
                return cgroup.Hierarchy(mountpoint, 2, frozenset({"cpuacct"}), cgroup._under(mountpoint, root, own))
    return None


@pytest.fixture
def v2_group():
    h = v2_hierarchy()
    if h is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    g = cgroup.Cgroup([(h, os.path.join(h.caller, f"drvs-test-{os.getpid()}", "leaf"))])
    yield g
    g.kill_all()
    g.remove()
    g.parent().remove()


def test_v2_membership_usage_and_kill(v2_group):
    v2_group.create()
    assert v2_group.exists()
    fds = v2_group.open_procs()
    try:
        proc = subprocess.Popen(["sh", "-c", "while :; do :; done"])
        os.write(fds[0], str(proc.pid).encode())
    finally:
        for fd in fds:
            os.close(fd)
    assert v2_group.pids() == [proc.pid]
    time.sleep(0.3)
    assert v2_group.cpu_usage_ns() > 50_000_000  # from cpu.stat: it really ran here
    v2_group.kill_all()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    assert v2_group.pids() == []


def test_limits_map_to_this_hosts_files(tmp_path):
    g = cgroup.Cgroup.under_caller(f"drvs-test-{os.getpid()}")
    try:
        g.create()
        g.set_limits(Limits(cpus=0.5, memory=64 << 20, pids=10), fresh=True)
        for h, d in g.parts:
            if h.has("cpu"):
                name = "cpu.cfs_quota_us" if h.version == 1 else "cpu.max"
                assert open(f"{d}/{name}").read().split()[0] == "50000"
            if h.has("memory"):
                name = "memory.limit_in_bytes" if h.version == 1 else "memory.max"
                assert int(open(f"{d}/{name}").read()) == 64 << 20
            if h.has("pids"):
                assert open(f"{d}/pids.max").read().strip() == "10"
        g.set_limits(Limits())  # a resize back to no limits
        for h, d in g.parts:
            if h.has("pids"):
                assert open(f"{d}/pids.max").read().strip() == "max"
    finally:
        g.remove()


def test_init_reaps_orphans(drvs):
    """A process orphaned inside the cell is reaped by the cell's init."""
    p = drvs.run("--", "sh", "-c", "(sleep 0.2 &); sleep 0.6; ps -eo stat,args --no-headers")
    states = [line.split()[0] for line in p.stdout.splitlines()]
    assert not any(s.startswith("Z") for s in states), p.stdout


def test_v2_nests_at_the_root_under_a_populated_cgroup():
    h = v2_hierarchy()
    if h is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    d = os.path.join(h.mountpoint, f"drvs-test-scope-{os.getpid()}")
    os.mkdir(d)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert cgroup._v2_base(h.mountpoint, d) == d  # empty: delegated, use it
        with open(f"{d}/cgroup.procs", "w") as f:
            f.write(str(proc.pid))
        assert cgroup._v2_base(h.mountpoint, d) == h.mountpoint  # a session's scope: nest at the root
    finally:
        proc.kill()
        proc.wait()
        for _ in range(100):
            try:
                os.rmdir(d)
                break
            except OSError:
                time.sleep(0.01)
