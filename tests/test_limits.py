"""A cell's limits hold, measured from inside and outside the jail."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HOG = "b = []\nwhile True: b.append(bytearray(16 << 20))"


def test_memory_hog_is_oom_killed_in_the_cell(drvs):
    drvs.drvs("vm", "create", "small", "--memory", "64M", check=True)
    p = drvs.run("--vm", "small", "--", "python3", "-c", HOG, timeout=120)
    assert p.returncode == 137
    assert p.stderr.strip() == "drvs-run: out of memory (limit 64M): the program was killed inside its cell"
    # The host and the VM go on.
    assert drvs.run("--vm", "small", "--", "echo", "alive").stdout == "alive\n"


def test_per_run_memory_limit(drvs):
    p = drvs.run("--memory", "48M", "--", "python3", "-c", HOG, timeout=120)
    assert p.returncode == 137
    assert "out of memory (limit 48M)" in p.stderr
    ok = drvs.run("--memory", "48M", "--", "python3", "-c", "x = bytearray(8 << 20); print(len(x))")
    assert ok.stdout == f"{8 << 20}\n"


BUSY = """
import time
t0, c0 = time.monotonic(), time.process_time()
while time.monotonic() - t0 < 1.5: pass
print((time.process_time() - c0) / (time.monotonic() - t0))
"""


def test_cpu_quota_holds(drvs):
    limited = float(drvs.run("--cpus", "0.25", "--", "python3", "-c", BUSY).stdout)
    assert 0.1 < limited < 0.4, limited
    drvs.drvs("vm", "create", "half", "--cpus", "0.5", check=True)
    vm_limited = float(drvs.run("--vm", "half", "--", "python3", "-c", BUSY).stdout)
    assert 0.3 < vm_limited < 0.65, vm_limited


FORKS = """
import os, time
made, error = 0, None
for _ in range(20):
    try:
        if os.fork() == 0:
            time.sleep(2); os._exit(0)
        made += 1
    except OSError as e:
        error = e.strerror
        break
print(made, error)
"""


def test_pids_limit_holds(drvs):
    p = drvs.run("--pids-limit", "8", "--", "python3", "-c", FORKS)
    made, error = p.stdout.split(" ", 1)
    assert int(made) == 7  # python itself is the eighth
    assert error.strip() == "Resource temporarily unavailable"


def test_cpuset_pins_the_run(drvs):
    p = drvs.run("--cpuset-cpus", "0", "--", "sh", "-c", "grep Cpus_allowed_list /proc/self/status")
    assert p.stdout.split() == ["Cpus_allowed_list:", "0"]


def test_impossible_limit_is_a_clear_error(drvs):
    """Refused as given (this machine has no such CPU), and, in a VM's
    definition made elsewhere, by the kernel, named."""
    p = drvs.run("--cpuset-cpus", "4000", "--", "true")
    assert p.returncode == 2
    assert p.stderr.startswith("drvs-run: invalid CPU list '4000': this machine has no CPU 4000")
    drvs.drvs("vm", "create", "elsewhere", "--cpuset-cpus", "0", check=True)
    store = json.loads((drvs.state / "store.json").read_text())
    entry = store["kv"]["/drvs/vms/elsewhere"]
    spec = json.loads(entry[0])
    spec["limits"]["cpuset"] = "4000"
    entry[0] = json.dumps(spec)
    (drvs.state / "store.json").write_text(json.dumps(store))
    p = drvs.run("--vm", "elsewhere", "--", "true")
    assert p.returncode == 2
    assert p.stderr.startswith("drvs-run: cannot apply CPU list 4000")
    assert "Traceback" not in p.stderr


def test_vm_update_resizes_a_live_cell(drvs):
    """drvs vm update: the running cell's cgroup takes the new limits; one
    its programs cannot fit is refused, and nothing changes."""
    from drvs.config import Config
    from drvs.ns.cgroup import hierarchies

    drvs.drvs("vm", "create", "elastic", "--memory", "96M", check=True)
    proc = drvs.popen("--vm", "elastic", "--", "python3", "-c",
                      "b = bytearray(40 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"
                      "print('ready', flush=True)\nimport time; time.sleep(60)", stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "ready\n"
        mem = next(h for h in hierarchies() if h.has("memory"))
        cell = Path(mem.caller, Config(str(drvs.state)).cgroup_root, "elastic")
        limit = cell / ("memory.limit_in_bytes" if mem.version == 1 else "memory.max")
        assert int(limit.read_text()) == 96 << 20
        drvs.drvs("vm", "update", "elastic", "--memory", "160M", "--pids-limit", "64", check=True)
        assert int(limit.read_text()) == 160 << 20
        pids = next((Path(h.caller, Config(str(drvs.state)).cgroup_root, "elastic", "pids.max")
                     for h in hierarchies() if h.has("pids")), None)
        assert pids is None or pids.read_text().strip() == "64"
        quota = next((Path(h.caller, Config(str(drvs.state)).cgroup_root, "elastic", "cpu.cfs_quota_us")
                      for h in hierarchies() if h.has("cpu") and h.version == 1), None)
        before = quota.read_text() if quota else None
        small = drvs.drvs("vm", "update", "elastic", "--memory", "8M", "--cpus", "0.5")  # (it holds 40M)
        assert small.returncode == 4 and "the cell's programs use more than that now" in small.stderr, small.stderr
        assert int(limit.read_text()) == 160 << 20
        assert quota is None or quota.read_text() == before  # (all of it or nothing)
        shown = json.loads(drvs.drvs("vm", "show", "elastic", "--format", "json", check=True).stdout)
        assert shown["limits"]["memory"] == 160 << 20 and shown["limits"]["pids"] == 64
        assert drvs.drvs("vm", "update", "elastic").returncode == 2  # (nothing to change)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


STALE_RUN = """
import sys
from drvs.cli import run
from drvs.vm import registry
from drvs.vm.model import VmSpec

real, stale = registry.VmRegistry.get, [VmSpec.from_json(sys.argv[1])]
registry.VmRegistry.get = lambda self, name: stale.pop() if stale else real(self, name)
run.main(["--vm", "elastic", "--", "true"])
"""


def test_a_run_that_read_the_vm_before_an_update_keeps_the_new_limits(drvs):
    """A run that read the VM's definition just before `drvs vm update`
    stored a new one (and resized the cell) joins the live cell without
    putting the old limits back."""
    from drvs.config import Config
    from drvs.ns.cgroup import hierarchies

    drvs.drvs("vm", "create", "elastic", "--memory", "96M", check=True)
    before = json.loads((drvs.state / "store.json").read_text())["kv"]["/drvs/vms/elastic"][0]
    proc = drvs.popen("--vm", "elastic", "--", "sh", "-c", "echo ready; exec sleep 60", stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "ready\n"
        mem = next(h for h in hierarchies() if h.has("memory"))
        limit = Path(mem.caller, Config(str(drvs.state)).cgroup_root, "elastic",
                     "memory.limit_in_bytes" if mem.version == 1 else "memory.max")
        drvs.drvs("vm", "update", "elastic", "--memory", "160M", check=True)
        assert int(limit.read_text()) == 160 << 20
        late = subprocess.run([sys.executable, "-c", STALE_RUN, before], env=drvs.env, text=True,
                              capture_output=True, timeout=60)
        assert late.returncode == 0, late.stderr
        assert int(limit.read_text()) == 160 << 20
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_vm_update_moves_a_live_cells_cpus(drvs):
    """A live cell's CPU list narrowed and widened again: its init and runs
    follow (on v1 each group below holds its own list, within the cell's)."""
    from drvs.config import Config
    from drvs.ns.cgroup import hierarchies

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    both, one = f"{cpus[0]},{cpus[1]}", str(cpus[1])
    drvs.drvs("vm", "create", "mover", "--cpuset-cpus", both, check=True)
    proc = drvs.popen("--vm", "mover", "--", "sh", "-c", "echo ready; exec sleep 60", stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "ready\n"
        h = next(h for h in hierarchies() if h.has("cpuset"))
        cell = Path(h.caller, Config(str(drvs.state)).cgroup_root, "mover")
        groups = [cell] + [p for p in cell.rglob("*") if p.is_dir()]
        assert len(groups) >= 3  # (the cell, its init, the run)
        lists = lambda: {str(g.relative_to(cell)): (g / "cpuset.cpus").read_text().strip() for g in groups}  # noqa: E731
        drvs.drvs("vm", "update", "mover", "--cpuset-cpus", one, check=True)
        assert set(lists().values()) == {one}, lists()
        drvs.drvs("vm", "update", "mover", "--cpuset-cpus", both, check=True)
        wide = lists()
        assert {v for v in wide.values()} == {f"{cpus[0]}-{cpus[1]}" if cpus[1] == cpus[0] + 1 else both}, wide
        assert proc.poll() is None  # (the program ran on throughout)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_limits_are_applied_to_the_cell_cgroup(drvs):
    """Seen from the host: the cell's memory cgroup carries the VM's limit."""
    from drvs.ns.cgroup import hierarchies

    drvs.drvs("vm", "create", "capped", "--memory", "96M", "--pids-limit", "50", check=True)
    proc = drvs.popen("--vm", "capped", "--", "sleep", "30", stdout=subprocess.DEVNULL)
    try:
        mem = next(h for h in hierarchies() if h.has("memory"))
        from drvs.config import Config

        limit_file = Path(mem.caller, Config(str(drvs.state)).cgroup_root, "capped", "memory.limit_in_bytes" if mem.version == 1 else "memory.max")
        for _ in range(200):
            if limit_file.exists():
                break
            subprocess.run(["sleep", "0.05"])
        assert int(limit_file.read_text()) == 96 << 20
    finally:
        proc.terminate()
        proc.wait(timeout=20)
