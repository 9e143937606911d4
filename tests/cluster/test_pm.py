"""VM-wide processes: pids unique across nodes, signals between nodes with
the kernel's semantics, `drvs ps` of the whole VM."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from drvs.dvos.pidrange import SPAN
from tests.cluster.conftest import BIN

PROGS = Path(__file__).parent / "progs"


@pytest.fixture
def vm_cluster(cluster_factory):
    """Two nodes, VM `web` with a share of each, sigtool in the VM's /data."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "web", "--node", "n1:cpus=1", "--node", "n2:cpus=1", node="n1", check=True)
    data = vm_data(c, "n1")
    subprocess.run(["gcc", "-O2", "-o", str(data / "sigtool"), str(PROGS / "sigtool.c")], check=True)
    return c


def vm_data(c, node, timeout=20) -> Path:
    """The VM's file system (its /data), as node's drvmmd shows it on the host."""
    path = Path(c.node(node)["state_dir"]) / "dvos" / "fs" / "web"
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        assert time.monotonic() < deadline, f"{path}: fs@web not served"
        time.sleep(0.1)
    return path


def run(c, via, *args, node=None, timeout=30, opts=()):
    argv = [str(BIN / "drvs-run"), "--vm", "web", *opts] + (["--node", node] if node else []) + ["--", *args]
    return subprocess.run(argv, env={**c.env, "DRVS_NODE": via}, capture_output=True, text=True, timeout=timeout)


def start(c, via, *args, node=None, opts=()):
    argv = [str(BIN / "drvs-run"), "--vm", "web", *opts] + (["--node", node] if node else []) + ["--", *args]
    return subprocess.Popen(argv, env={**c.env, "DRVS_NODE": via}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def pid_index(c, node):
    return json.loads((Path(c.node(node)["state_dir"]) / "cluster.json").read_text())["pid_index"]


def wait_pid_file(c, node, name, timeout=20):
    path = vm_data(c, node) / name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


@contextlib.contextmanager
def on_n2(c, mode: str, pidfile: str):
    """sigtool MODE on n2 (started from n1), and its VM pid once it wrote it."""
    proc = start(c, "n1", "/data/sigtool", mode, f"/data/{pidfile}", node="n2")
    try:
        yield proc, wait_pid_file(c, "n2", pidfile)
    finally:
        stop(proc)


def stop(*procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_ipc_ping_reaches_a_vms_servers_from_each_node(vm_cluster):
    """Servers other than drvmm answer a ping (a notify) whatever their own
    message table; a name nobody serves is the fabric's error."""
    c = vm_cluster
    vm_data(c, "n2")  # (fs@web served)
    for via in ("n1", "n2"):
        for target in ("pm@web", "fs@web", "procs@n1", "procs@n2", "fsc@n2", "fsr@n1"):
            p = c.drvs("ipc", "ping", "-c", "2", target, node=via)
            assert p.returncode == 0, (via, target, p.stderr)
            lines = p.stdout.splitlines()
            assert len(lines) == 2 and all(re.fullmatch(rf"reply from {target}: seq=\d time=[\d.]+ ms ok", line)
                                           for line in lines), lines
    nosuch = c.drvs("ipc", "ping", "nosuch@web", node="n1")
    assert nosuch.returncode == 7 and "no endpoint 'nosuch@web'" in nosuch.stderr, nosuch.stderr


def test_pids_are_unique_across_nodes_and_tell_their_node(vm_cluster):
    c = vm_cluster
    seen = {}
    for node in ("n1", "n2"):
        p = run(c, "n1", "sh", "-c", 'echo $$; sh -c "echo \\$PPID \\$\\$"', node=node)
        assert p.returncode == 0, p.stderr
        shell, (ppid, child) = int(p.stdout.split()[0]), map(int, p.stdout.split()[1:3])
        assert ppid == shell  # getppid agrees with the parent's getpid: no translation needed
        assert shell // SPAN == child // SPAN == pid_index(c, node)
        seen[node] = {shell, child}
    assert not seen["n1"] & seen["n2"]
    assert pid_index(c, "n1") != pid_index(c, "n2")


def test_wait_for_local_children_still_works(vm_cluster):
    p = run(vm_cluster, "n1", "sh", "-c", "sh -c 'exit 7' & wait $!; echo $?", node="n2")
    assert (p.returncode, p.stdout) == (0, "7\n")


def test_c_program_on_n1_signals_a_process_on_n2(vm_cluster):
    c = vm_cluster
    with on_n2(c, "wait", "pid") as (waiter, target):
        assert target // SPAN == pid_index(c, "n2")
        p = run(c, "n1", "sh", "-c", f"/data/sigtool kill {target} 0 && /data/sigtool kill {target} {signal.SIGUSR2}"
                                     f" && /data/sigtool kill {target} {signal.SIGUSR1}; echo sender=$$")
        assert p.stdout.splitlines()[:3] == ["ok", "ok", "ok"], p.stdout + p.stderr
        out, err = waiter.communicate(timeout=20)
        assert waiter.returncode == 0, err
        lines = out.splitlines()
        assert [line.split()[0] for line in lines] == [f"sig={signal.SIGUSR2}", f"sig={signal.SIGUSR1}"]
        # A kill(2), as the kernel delivers one from outside the receiver's
        # pid namespace: SI_USER, sender pid 0.
        assert lines[1].split()[1:3] == ["from=0", "code=0"]


def test_errors_are_the_kernels(vm_cluster):
    """ESRCH for a pid nobody has, EPERM for another user's process, EINVAL
    for a bad signal number: the same answers as on one node."""
    c = vm_cluster
    with on_n2(c, "wait", "pid2") as (waiter, target):
        gone = pid_index(c, "n2") * SPAN + SPAN - 2  # in n2's range, never allocated
        unknown_node = 40 * SPAN + 5                 # a range no node holds
        p = run(c, "n1", "sh", "-c", f"/data/sigtool kill {gone} 0; /data/sigtool kill {unknown_node} 0; "
                                     f"/data/sigtool kill {target} 99")
        assert p.stdout.split() == ["ESRCH", "ESRCH", "EINVAL"], p.stdout + p.stderr
        p = run(c, "n1", "/data/sigtool", "kill", str(target), "15", opts=("-u", "1000"))
        assert (p.returncode, p.stdout) == (1, "EPERM\n")
        assert waiter.poll() is None  # nothing reached it


def test_sigqueue_value_and_tgkill_cross_nodes(vm_cluster):
    c = vm_cluster
    with on_n2(c, "wait", "pid3") as (waiter, target):
        p = run(c, "n1", "sh", "-c", f"/data/sigtool queue {target} {signal.SIGUSR2} 4242; "
                                     f"/data/sigtool tgkill {target + 1} {target} 10; "
                                     f"/data/sigtool tgkill {target} {target} {signal.SIGUSR1}")
        assert p.stdout.split() == ["ok", "ESRCH", "ok"], p.stdout + p.stderr
        out, _ = waiter.communicate(timeout=20)
        assert out.splitlines()[0].endswith("code=-1 value=4242")  # SI_QUEUE with the sender's value


def test_kill_minus_one_reaches_every_node_but_spares_the_caller(vm_cluster):
    c = vm_cluster
    a = start(c, "n1", "sleep", "60", node="n2")
    b = start(c, "n1", "sleep", "60")
    try:
        deadline = time.monotonic() + 20
        while len(ps(c, "n1")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        p = run(c, "n2", "sh", "-c", "kill -TERM -1; echo survived")
        assert (p.returncode, p.stdout) == (0, "survived\n")
        assert a.wait(timeout=20) == 128 + signal.SIGTERM
        assert b.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        stop(a, b)


def test_kill_of_a_process_group_on_another_node(vm_cluster):
    c = vm_cluster
    group = start(c, "n1", "sh", "-c", "sleep 60 & sleep 60 & echo $$ > /data/pgid; wait", node="n2")
    try:
        pgid = wait_pid_file(c, "n2", "pgid")
        p = run(c, "n1", "/data/sigtool", "kill", str(-pgid), "15")
        assert p.stdout == "ok\n", p.stderr
        group.wait(timeout=20)
        assert not [r for r in ps(c, "n1") if r["pgid"] == pgid]
    finally:
        stop(group)


def ps(c, via):
    out = c.drvs("ps", "web", "--format", "json", node=via, check=True).stdout
    return json.loads(out)


def test_drvs_ps_lists_the_whole_vm_from_any_node(vm_cluster):
    c = vm_cluster
    a = start(c, "n1", "sleep", "61", node="n2")
    b = start(c, "n2", "sleep", "62", node="n1")
    try:
        deadline = time.monotonic() + 20
        while len(ps(c, "n2")) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        for via in ("n1", "n2"):
            rows = {r["command"]: r for r in ps(c, via)}
            assert rows["sleep 61"]["node"] == "n2" and rows["sleep 62"]["node"] == "n1"
            assert rows["sleep 61"]["pid"] // SPAN == pid_index(c, "n2")
        table = c.drvs("ps", "web", node="n1", check=True).stdout
        assert table.split("\n")[0].split() == ["PID", "NODE", "PPID", "USER", "STATE", "%CPU", "RSS", "START",
                                                "COMMAND"]
        assert "sleep 61" in table and "sleep 62" in table
        # vm show counts the VM's processes on every node, not only this one's runs
        shown = json.loads(c.drvs("vm", "show", "web", "--format", "json", node="n1", check=True).stdout)
        assert shown["processes"]["by_node"]["n2"] >= 1 and shown["processes"]["silent"] == []
        assert "n2: " in c.drvs("vm", "show", "web", node="n1", check=True).stdout
    finally:
        stop(a, b)


def test_supervisor_survives_fuzzed_calls(vm_cluster):
    """Random pids, signals and pointers through every served call; then a
    plain cross-node signal still works."""
    c = vm_cluster
    fuzz = r'''
import ctypes, random
libc = ctypes.CDLL(None, use_errno=True)
random.seed(7)
nrs = [62, 200, 234, 129, 297]  # kill tkill tgkill rt_sigqueueinfo rt_tgsigqueueinfo (x86_64)
span = %d
for i in range(400):
    nr = random.choice(nrs)
    pid = random.choice([random.randrange(-2**31, 2**31), 40 * span + random.randrange(span),
                         %d * span + span - 1 - random.randrange(50), 0, -1, -2**31])
    if pid in (0, -1):
        pid = 40 * span  # never ourselves or every process: the point is the supervisor
    sig = random.choice([0, random.randrange(-5, 100)])
    ptr = random.choice([0, 1, 2**63, random.randrange(2**64)])
    libc.syscall(nr, ctypes.c_long(pid), ctypes.c_long(pid if nr in (234, 297) else sig),
                 ctypes.c_long(sig if nr in (234, 297) else ptr), ctypes.c_long(ptr))
print("done")
''' % (SPAN, pid_index(c, "n2"))
    if not shutil.which("python3"):
        pytest.skip("python3 needed in the jail")
    p = run(c, "n1", "python3", "-c", fuzz, timeout=120)
    assert (p.returncode, p.stdout) == (0, "done\n"), p.stderr
    with on_n2(c, "wait", "pid4") as (waiter, target):
        assert run(c, "n1", "/data/sigtool", "kill", str(target), "10").stdout == "ok\n"
        waiter.wait(timeout=20)


def test_bad_pointer_gives_efault(vm_cluster):
    c = vm_cluster
    with on_n2(c, "wait", "pid5") as (waiter, target):
        code = ("import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
                f"r = libc.syscall(129, {target}, 10, ctypes.c_void_p(8)); "
                "print(r, os.strerror(ctypes.get_errno()))")
        p = run(c, "n1", "python3", "-c", code)
        assert p.stdout == "-1 Bad address\n", p.stderr
        assert waiter.poll() is None


def test_procps_in_the_jail_sees_and_ends_processes_of_other_nodes(vm_cluster):
    """ps, pgrep and pkill, unmodified, inside a jail on n1: the VM's /proc
    shows n2's processes with the pids `drvs ps` reports."""
    c = vm_cluster
    if not shutil.which("pkill"):
        pytest.skip("procps needed")
    far = start(c, "n1", "sleep", "63", node="n2")
    try:
        deadline = time.monotonic() + 20
        while not [r for r in ps(c, "n1") if r["command"] == "sleep 63"] and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = next(r["pid"] for r in ps(c, "n1") if r["command"] == "sleep 63")
        p = run(c, "n1", "sh", "-c", "ps -eo pid,comm,args; echo ---; pgrep -a sleep; pkill -USR1 -x sleep; echo $?")
        listing, after = p.stdout.split("---\n")
        assert any(line.split()[:2] == [str(pid), "sleep"] for line in listing.splitlines()), p.stdout + p.stderr
        assert after.splitlines() == [f"{pid} sleep 63", "0"]
        assert far.wait(timeout=20) == 128 + signal.SIGUSR1
        # The node's own entries are the kernel's: /proc/self and friends work.
        p = run(c, "n1", "sh", "-c", "readlink /proc/self/exe; head -1 /proc/meminfo | cut -d: -f1; ls /dev/fd/")
        assert p.stdout.splitlines()[:2] == ["/usr/bin/readlink", "MemTotal"], p.stdout + p.stderr
    finally:
        stop(far)


def pm_leader(c) -> str:
    """The node pm@web was elected on (within a bound)."""
    deadline = time.monotonic() + 20
    leader = ""
    while not leader and time.monotonic() < deadline:
        leader = c.drvs("election", "leader", "pm/web", node="n1").stdout.strip()
        time.sleep(0.2)
    return leader


def test_pm_moves_when_its_node_dies(vm_cluster):
    """pm@web lives on one node; SIGKILL that node's drvmmd: within a bound
    the other node serves pm@web and `drvs ps` works again (without the
    dead node's processes, which it reports)."""
    c = vm_cluster
    leader = pm_leader(c)
    assert leader in ("n1", "n2")
    survivor = "n2" if leader == "n1" else "n1"
    mine = start(c, survivor, "sleep", "64", node=survivor)
    try:
        deadline = time.monotonic() + 20
        while "sleep 64" not in c.drvs("ps", "web", node=survivor).stdout:  # running, before the kill
            assert time.monotonic() < deadline and mine.poll() is None, mine.stderr.read() if mine.poll() else ""
            time.sleep(0.2)
        os.kill(c.node(leader)["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        for args in (("ps", "web"), ("ps",)):  # at once, the PM gone: each node is asked
            p = c.drvs(*args, "--format", "json", node=survivor)
            assert "sleep 64" in [r["command"] for r in json.loads(p.stdout)], (args, p.returncode, p.stderr)
            assert p.stderr.count(f"drvs ps: node {leader}: ") == 1, (args, p.stderr)
        while True:
            p = c.drvs("ps", "web", "--format", "json", node=survivor, timeout=30)
            if p.returncode == 0 and c.drvs("election", "leader", "pm/web", node=survivor).stdout.strip() == survivor:
                break
            assert time.monotonic() - t0 < 15, p.stderr
            time.sleep(0.2)
        rows = json.loads(p.stdout)
        assert [r["command"] for r in rows if r["command"] == "sleep 64"] == ["sleep 64"]
        assert f"drvs ps: node {leader}: " in p.stderr and "(NotReady)" in p.stderr, p.stderr  # (exit 0: known down)
    finally:
        stop(mine)


def test_drvs_ps_says_when_a_ready_node_is_missing(vm_cluster):
    """pm@web answers but a node still Ready does not (its drvmmd just
    died): ps prints what it has and exits 7, as its list is incomplete;
    once that node is NotReady, its processes are known unknown: exit 0."""
    c = vm_cluster
    leader = pm_leader(c)
    other = "n2" if leader == "n1" else "n1"
    os.kill(c.node(other)["pid"], signal.SIGKILL)
    p = c.drvs("ps", "web", "--format", "json", node=leader)
    assert p.returncode == 7 and f"drvs ps: node {other}: " in p.stderr and "NotReady" not in p.stderr, p.stderr
    assert isinstance(json.loads(p.stdout), list)  # (what the other nodes said, still printed)
    shown = json.loads(c.drvs("vm", "show", "web", "--format", "json", node=leader, check=True).stdout)
    assert other not in shown["processes"]["by_node"] and leader in shown["processes"]["by_node"]  # (unknown: not 0)
    assert [s.partition(":")[0] for s in shown["processes"]["silent"]] == [other]
    c.wait_status(other, "NotReady", timeout=8)
    p = c.drvs("ps", "web", node=leader)
    assert p.returncode == 0 and f"node {other}: " in p.stderr and "(NotReady)" in p.stderr, p.stderr


def test_a_leader_that_stalled_past_its_lease_stands_down(vm_cluster):
    """The node leading pm@web and fs@web stops for longer than its lease
    (SIGSTOP), so the other node takes both over; back, it gives them up
    (its leadership went with its lease) instead of serving beside the new
    leader: each endpoint is served and registered by one node, and the
    VM's programs and files work from both nodes."""
    c = vm_cluster
    leader = ""
    deadline = time.monotonic() + 20
    while not leader and time.monotonic() < deadline:
        leader = c.drvs("election", "leader", "fs/web", node="n1").stdout.strip()
        time.sleep(0.2)
    assert leader in ("n1", "n2")
    other = "n2" if leader == "n1" else "n1"
    pid = c.node(leader)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        c.wait_status(leader, "NotReady", timeout=15, via=other)
        time.sleep(3)  # (the other node's campaigns win meanwhile)
    finally:
        os.kill(pid, signal.SIGCONT)
    c.wait_status(leader, "Ready", timeout=15, via=other)

    def settled() -> bool:
        for service in ("pm", "fs"):
            led = c.drvs("election", "leader", f"{service}/web", node=other).stdout.strip()
            serving = [n for n, info in c.nodes(other).items() if f"{service}@web" in info["load"]["servers"]]
            if not led or serving != [led]:
                return False
        return True

    deadline = time.monotonic() + 30
    while not settled():
        assert time.monotonic() < deadline, c.nodes(other)
        time.sleep(0.5)
    for via in ("n1", "n2"):
        for node in ("n1", "n2"):
            p = run(c, via, "sh", "-c", f"echo {via}{node} > /data/{via}{node}; cat /data/{via}{node}", node=node)
            assert (p.returncode, p.stdout) == (0, f"{via}{node}\n"), p.stderr


def test_a_cluster_run_needs_its_drvmmd(vm_cluster):
    """Without the node's supervisor, cross-node calls could not be served:
    the run is refused with one clear line, and nothing is left behind."""
    c = vm_cluster
    os.kill(c.node("n1")["pid"], signal.SIGKILL)
    p = run(c, "n1", "true")
    assert p.returncode != 0
    assert p.stderr.count("\n") == 1 and "drvmmd" in p.stderr, p.stderr


def test_a_caller_killed_mid_call_leaves_the_supervisor_serving(vm_cluster):
    """n2's drvmmd is stopped (SIGSTOP), so a signal to n2 waits on the
    fabric; its caller is killed meanwhile.  Nothing hangs: the call's
    answer has nobody to go to, the caller's run ends, and once n2 answers
    again the next signal goes through."""
    c = vm_cluster
    with on_n2(c, "wait", "pid6") as (waiter, target):
        assert run(c, "n1", "/data/sigtool", "kill", str(target), "0").stdout == "ok\n"  # the connection is open
        daemon = c.node("n2")["pid"]
        os.kill(daemon, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            p = run(c, "n1", "sh", "-c", f"/data/sigtool kill {target} 0 & sleep 0.5; kill -9 $!; wait $!; echo $?")
            assert p.stdout == "137\n", p.stdout + p.stderr
            assert time.monotonic() - t0 < 10
        finally:
            os.kill(daemon, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while run(c, "n1", "/data/sigtool", "kill", str(target), "0").stdout != "ok\n":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert run(c, "n1", "/data/sigtool", "kill", str(target), str(signal.SIGUSR1)).stdout == "ok\n"
        assert waiter.wait(timeout=20) == 0


def test_a_remote_signal_is_sent_once_even_when_the_caller_is_interrupted(vm_cluster):
    """While a kill waits on another node, its caller keeps getting a
    SA_RESTART signal.  The call must not be restarted (and the signal sent
    again): the target counts exactly one queued SIGRTMIN."""
    c = vm_cluster
    with on_n2(c, "count", "pid7") as (counter, target):
        assert run(c, "n1", "/data/sigtool", "kill", str(target), "0").stdout == "ok\n"  # connection open
        rtmin = signal.SIGRTMIN
        daemon = c.node("n2")["pid"]
        os.kill(daemon, signal.SIGSTOP)  # the call now waits on n2
        try:
            busy = start(c, "n1", "/data/sigtool", "busy-kill", str(target), str(int(rtmin)))
            time.sleep(1.0)
        finally:
            os.kill(daemon, signal.SIGCONT)
        out, err = busy.communicate(timeout=30)
        assert busy.returncode == 0 and out == "ok\n", out + err
        assert int(err.split()[1]) >= 1  # signals came in (they wait until the call returns)
        assert run(c, "n1", "/data/sigtool", "kill", str(target), str(signal.SIGUSR1)).stdout == "ok\n"
        out, _ = counter.communicate(timeout=20)
        assert out == "count=1\n"


@pytest.mark.parametrize("lead, join", [("n1", "n2"), ("n2", "n1")])
def test_a_process_group_spanning_both_nodes(vm_cluster, lead, join):
    """A group led on one node; `drvs-run --node OTHER --pgid G` puts a
    program of the other node in it.  ps shows both in group G, and kill(-G)
    from a jail ends both (whichever node's range G is in)."""
    c = vm_cluster
    leader = start(c, "n1", "sh", "-c", "echo $$ > /data/pg; exec sleep 60", node=lead)
    try:
        pgid = wait_pid_file(c, lead, "pg")
        # A program that fails at once in the group ends its run at once.
        p = run(c, "n1", "no-such-command", node=join, opts=("--pgid", str(pgid)), timeout=30)
        assert p.returncode == 127, p.stderr
        member = start(c, "n1", "sleep", "61", node=join, opts=("--pgid", str(pgid)))
        try:
            deadline = time.monotonic() + 20
            while len([r for r in ps(c, "n1") if r["pgid"] == pgid]) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            rows = {r["command"]: r for r in ps(c, "n1") if r["pgid"] == pgid}
            assert rows["sleep 60"]["node"] == lead and rows["sleep 61"]["node"] == join, rows
            assert rows["sleep 61"]["pid"] // SPAN == pid_index(c, join)  # its own pid stays its node's
            p = run(c, "n1", "sh", "-c", "ps -eo pgid=,comm= | sort")
            assert sorted(line.split()[1] for line in p.stdout.splitlines()
                          if line.split()[0] == str(pgid)) == ["sleep", "sleep"], p.stdout
            # One run per group and node (its anchor holds the group's pid there).
            p = run(c, "n1", "true", node=join, opts=("--pgid", str(pgid)), timeout=30)
            assert p.returncode == 125 and "already has a run on this node" in p.stderr, p.stderr
            assert run(c, "n1", "/data/sigtool", "kill", str(-pgid), "15").stdout == "ok\n"
            assert leader.wait(timeout=20) == 128 + signal.SIGTERM
            assert member.wait(timeout=20) == 128 + signal.SIGTERM
        finally:
            stop(member)
    finally:
        stop(leader)


def test_pgid_must_be_another_nodes_group(vm_cluster):
    c = vm_cluster
    own = pid_index(c, "n1") * SPAN + 5
    for bad, why in ((str(own), "not a process group of another node"), ("1", "invalid process group")):
        p = run(c, "n1", "true", node="n1", opts=("--pgid", bad))
        assert p.returncode == 2 and why in p.stderr, p.stderr
