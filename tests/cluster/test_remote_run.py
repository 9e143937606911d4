"""drvs-run --node: a program on another node, stdio, status and signals
carried over the fabric."""

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time

import pexpect

from tests.cluster.conftest import BIN


def run_on(c, via: str, *args, input=None, timeout=60, text=True):
    env = {**c.env, "DRVS_NODE": via}
    return subprocess.run([str(BIN / "drvs-run"), *args], env=env, input=input, capture_output=True,
                          text=text, timeout=timeout)


def cells_of(c, node: str) -> list:
    """Non-empty run cgroups of cells under that node's cgroup."""
    out = subprocess.run(["find", "/sys/fs/cgroup/pids", "-path",
                          f"*drvs-dev-{c.info['name']}-{node}/drvs*/run-*/cgroup.procs"],
                         capture_output=True, text=True).stdout.split()
    return [f for f in out if open(f).read().strip()]


def test_stdin_stdout_stderr_and_exit_status(cluster_factory):
    c = cluster_factory(nodes=2)
    p = run_on(c, "n1", "--node", "n2", "--", "sh", "-c",
               'read line; echo "n2 got: $line"; cat /etc/hostname; echo oops >&2; exit 5', input="hello\n")
    assert (p.returncode, p.stdout, p.stderr) == (5, "n2 got: hello\ndefault\n", "oops\n")


def test_program_really_runs_on_the_other_node(cluster_factory):
    """Its cell is on n2: n2's cgroup holds it, n1's does not."""
    c = cluster_factory(nodes=2)
    proc = subprocess.Popen([str(BIN / "drvs-run"), "--node", "n2", "--", "sleep", "30"],
                            env={**c.env, "DRVS_NODE": "n1"})
    try:
        deadline = time.monotonic() + 15
        while not cells_of(c, "n2") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cells_of(c, "n2") and not cells_of(c, "n1")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM


def test_user_capabilities_and_cpus_go_with_the_program(cluster_factory):
    """What -u, --cap-drop/--cap-add and --cpuset-cpus ask of a run holds on
    the node it runs on; -v (a path of the caller's host) is refused."""
    c = cluster_factory(nodes=2)
    p = run_on(c, "n1", "--node", "n2", "-u", "65534:65534", "--cap-drop", "ALL", "--cpuset-cpus", "0", "--",
               "sh", "-c", "id -u; id -g; grep -E '^(CapBnd|Cpus_allowed_list)' /proc/self/status")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["65534", "65534", "CapBnd:", "0000000000000000", "Cpus_allowed_list:", "0"]
    p = run_on(c, "n1", "--node", "n2", "--cap-drop", "ALL", "--cap-add", "KILL", "--",
               "grep", "^CapBnd", "/proc/self/status")
    assert p.returncode == 0 and p.stdout.split() == ["CapBnd:", "0000000000000020"], p.stderr
    p = run_on(c, "n1", "--node", "n2", "-v", "/tmp:/x", "--", "true")
    assert p.returncode == 2 and "-v binds a path of this host" in p.stderr


def test_binary_data_streams_both_ways(cluster_factory):
    c = cluster_factory(nodes=2)
    data = os.urandom(8 << 20)
    p = run_on(c, "n1", "--node", "n2", "--", "sh", "-c", "cat; cat /dev/null", input=data, text=False, timeout=120)
    assert p.returncode == 0
    assert hashlib.sha256(p.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def ready_on_n2(c, trap: str):
    """drvs-run on n1 of a shell on n2 that traps SIGINT so and says ready."""
    proc = subprocess.Popen([str(BIN / "drvs-run"), "--node", "n2", "--", "sh", "-c",
                             f'trap "{trap}" INT; echo ready; while :; do sleep 0.05; done'],
                            env={**c.env, "DRVS_NODE": "n1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_signals_reach_the_remote_program(cluster_factory):
    c = cluster_factory(nodes=2)
    with ready_on_n2(c, "echo got INT; exit 42") as proc:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        assert "got INT" in out and proc.returncode == 42


def test_a_third_interrupt_ends_a_remote_program_that_ignores_them(cluster_factory):
    c = cluster_factory(nodes=2)
    with ready_on_n2(c, "echo ignored") as proc:
        for _ in range(2):
            proc.send_signal(signal.SIGINT)
            assert proc.stdout.readline() == "ignored\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 137 and err == "drvs-run: interrupted 3 times: ending the program\n"


def test_setup_failures_come_back_as_on_one_node(cluster_factory):
    c = cluster_factory(nodes=2)
    p = run_on(c, "n1", "--node", "n2", "--", "no-such-command")
    assert (p.returncode, p.stderr) == (127, "drvs-run: no-such-command: command not found\n")
    p = run_on(c, "n1", "--node", "n9", "--", "true")
    assert (p.returncode, p.stderr) == (3, "drvs-run: no such node: 'n9' (see `drvs node ls`)\n")


def zombie_children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def test_detached_run_on_another_node(cluster_factory):
    """drvs-run -d --node n2 from n1: the run's id at once; its output, a
    signal and its end reached from n1, though the run is n2's."""
    c = cluster_factory(nodes=2)
    p = run_on(c, "n1", "-d", "--node", "n2", "--", "sh", "-c",
               'echo started; echo err >&2; trap "echo got TERM; exit 9" TERM; while :; do sleep 0.1; done')
    assert p.returncode == 0 and re.fullmatch(r"[0-9a-f]{12}\n", p.stdout), (p.stdout, p.stderr)
    run_id = p.stdout.strip()
    assert os.path.exists(f"{c.node('n2')['state_dir']}/runs/{run_id}.log")  # (the run and its log are n2's)
    assert not os.path.exists(f"{c.node('n1')['state_dir']}/runs/{run_id}.log")
    deadline = time.monotonic() + 20
    while (logs := c.drvs("logs", run_id, node="n1")).stdout != "started\nerr\n":
        assert logs.returncode == 0 and time.monotonic() < deadline, (logs.stdout, logs.stderr)
        time.sleep(0.2)
    listed = json.loads(c.drvs("runs", "--json", node="n1", check=True).stdout)  # (n2's, seen from n1)
    assert [(r["id"], r["node"], r["vm"], r["running"], r["detached"]) for r in listed] == \
        [(run_id, "n2", "default", True, True)], listed
    follow = subprocess.Popen([str(BIN / "drvs"), "logs", "-f", run_id], env={**c.env, "DRVS_NODE": "n1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follow.stdout.readline() == "started\n"
        kill = c.drvs("kill", run_id, node="n1")
        assert kill.returncode == 0, kill.stderr
        watchdog = threading.Timer(30, follow.kill)  # (it ends with the run)
        watchdog.start()
        out, err = follow.stdout.read(), follow.stderr.read()  # (what readline left buffered, too)
        watchdog.cancel()
        assert (follow.wait(), out, err) == (0, "err\ngot TERM\n", "")
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    waited = c.drvs("wait", run_id, node="n1")
    assert (waited.returncode, waited.stdout) == (0, "9\n")
    assert c.drvs("runs", node="n1", check=True).stdout.count("\n") == 1  # (the header alone: none runs)
    ended = c.drvs("runs", "-a", node="n1", check=True).stdout.splitlines()
    assert len(ended) == 2 and ended[1].split()[:3] == [run_id, "n2", "default"] and "exited (9)" in ended[1], ended
    deadline = time.monotonic() + 5
    while zombies := zombie_children(c.node("n2")["pid"]):  # (n2's drvmmd reaps the run's monitor)
        assert time.monotonic() < deadline, zombies
        time.sleep(0.1)
    again = c.drvs("kill", run_id, node="n1")
    assert (again.returncode, again.stderr) == (3, f"drvs: run {run_id!r} has ended (exit status 9) (on node n2)\n")
    assert c.drvs("logs", run_id, node="n2").stdout == "started\nerr\ngot TERM\n"  # (on n2 itself)
    nothing = c.drvs("logs", "0123456789ab", node="n1")
    assert (nothing.returncode, nothing.stderr) == (3, "drvs: no such run: '0123456789ab' on any node\n")
    failed = run_on(c, "n1", "-d", "--node", "n2", "--", "no-such-command")
    assert (failed.returncode, failed.stdout, failed.stderr) == \
        (127, "", "drvs-run: no-such-command: command not found\n")
    # A removed VM's ended runs are forgotten on every node, as on the one that removed it.
    assert c.drvs("vm", "create", "job", node="n1").returncode == 0
    job = run_on(c, "n1", "-d", "--vm", "job", "--node", "n2", "--", "echo", "done").stdout.strip()
    assert c.drvs("wait", job, node="n1").stdout == "0\n"
    assert c.drvs("vm", "rm", "job", node="n1").returncode == 0
    deadline = time.monotonic() + 15
    while os.path.exists(f"{c.node('n2')['state_dir']}/runs/{job}.log") or \
            os.path.exists(f"{c.node('n2')['state_dir']}/vms/job"):  # (nor the VM's directory there)
        assert time.monotonic() < deadline, os.listdir(f"{c.node('n2')['state_dir']}/vms")
        time.sleep(0.2)
    assert not os.path.exists(f"{c.node('n2')['state_dir']}/runs/{job}.exit")
    assert c.drvs("logs", run_id, node="n1").returncode == 0  # (the default VM's run is kept)


def test_a_followed_run_whose_vm_goes_or_whose_node_is_away(cluster_factory):
    """`drvs wait` on a run whose VM is removed says so; a run of a node
    whose drvmmd is away is not 'no such run' (exit 3) but unreachable (7)."""
    c = cluster_factory(nodes=2)
    assert c.drvs("vm", "create", "gone", node="n1").returncode == 0
    doomed = run_on(c, "n1", "-d", "--vm", "gone", "--node", "n2", "--", "sleep", "100").stdout.strip()
    waiter = subprocess.Popen([str(BIN / "drvs"), "wait", doomed], env={**c.env, "DRVS_NODE": "n1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)  # (waiting)
        busy = c.drvs("vm", "rm", "gone", node="n1")  # (a VM without shares runs anywhere: n2 is asked too)
        assert busy.returncode == 4 and "running process(es) on n2" in busy.stderr, busy.stderr
        assert c.drvs("vm", "rm", "--force", "gone", node="n1").returncode == 0
        out, err = waiter.communicate(timeout=40)
        assert (waiter.returncode, out) == (3, "") and err == (
            f"drvs: run {doomed!r} is gone, with its log and exit status: its VM was removed (drvs vm rm)\n"), err
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    live = run_on(c, "n1", "-d", "--node", "n2", "--", "sleep", "100").stdout.strip()
    busy = c.drvs("vm", "rm", "default", node="n1")  # (the default VM's programs count too)
    assert busy.returncode == 4 and "running process(es) on n2" in busy.stderr, busy.stderr
    os.killpg(c.node("n2")["pid"], signal.SIGKILL)
    partial = c.drvs("runs", "--json", node="n1")  # (n2 still Ready: its silence makes the list incomplete)
    assert partial.returncode == 7 and "node n2 did not answer" in partial.stderr, partial.stderr
    assert json.loads(partial.stdout) == []  # (what the nodes that answered have: n1 runs nothing)
    for verb in ("logs", "wait", "kill"):
        p = c.drvs(verb, live, node="n1")
        assert p.returncode == 7 and "n2" in p.stderr and "may be there" in p.stderr, (verb, p.stderr)
    c.wait_status("n2", "NotReady", timeout=8)
    known = c.drvs("runs", node="n1")  # (a NotReady node's runs are unknown, as kubectl shows them: said, exit 0)
    assert known.returncode == 0 and "node n2 (NotReady) did not answer" in known.stderr, known.stderr


def test_the_dev_clusters_host_is_no_node_and_says_how_to_act_as_one(cluster_factory):
    """drvs-run on the host a dev cluster runs on, without DRVS_NODE: the
    host is no node; the error says so and how to act as one, rather than
    that the cluster's VM does not exist."""
    c = cluster_factory(nodes=2)
    assert c.drvs("vm", "create", "web", "--node", "n1", "--node", "n2", node="n1").returncode == 0
    for args in (["--vm", "web"], ["--node", "n2"]):
        p = subprocess.run([str(BIN / "drvs-run"), *args, "--", "true"], env=c.env, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 3 and "this node is in no cluster" in p.stderr and "DRVS_NODE=n1" in p.stderr, \
            (args, p.stderr)


def test_output_that_cannot_be_written_here_is_said_and_the_program_sees_a_closed_pipe(cluster_factory):
    """drvs-run --node n2 with its stdout on a full disk: it says why,
    and the program's output ends as a closed pipe would (a local run's
    program gets ENOSPC itself); its stderr and exit status still come."""
    c = cluster_factory(nodes=2)
    with open("/dev/full", "w") as full:
        p = subprocess.run([str(BIN / "drvs-run"), "--node", "n2", "--", "sh", "-c",
                            "seq 1 100000; echo after >&2; exit 3"],
                           env={**c.env, "DRVS_NODE": "n1"}, stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=60)
    assert p.returncode == 3, p.stderr
    assert p.stderr.splitlines()[0] == "drvs-run: cannot write the program's output (fd 1): No space left on device"
    assert p.stderr.splitlines()[-1] == "after"


def test_a_program_that_ended_well_but_whose_output_was_lost_is_no_success(cluster_factory):
    """A remote program exits 0 once its output is in the pipe to its node,
    before this side finds it cannot write it: drvs-run then exits 74 (a
    full disk, on stdout or stderr), or 141 when the reader had gone (as a
    local writer to a closed pipe, which pipefail sees), never 0."""
    c = cluster_factory(nodes=2)
    env = {**c.env, "DRVS_NODE": "n1"}
    drvs_run = [str(BIN / "drvs-run"), "--node", "n2", "--"]
    with open("/dev/full", "w") as full:
        out = subprocess.run([*drvs_run, "echo", "hi"], env=env, stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=60)
        err = subprocess.run([*drvs_run, "sh", "-c", "echo hi >&2"], env=env, stdout=subprocess.PIPE,
                             stderr=full, text=True, timeout=60)
    assert out.returncode == 74, out.stderr
    assert out.stderr == "drvs-run: cannot write the program's output (fd 1): No space left on device\n"
    assert err.returncode == 74 and err.stdout == ""
    script = f"{' '.join(drvs_run)} sh -c 'seq 1 1000000' | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}"
    piped = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert piped.stdout == "141\n", piped.stderr
    whole = subprocess.run([*drvs_run, "sh", "-c", "seq 1 1000000"], env=env, capture_output=True, timeout=60)
    assert whole.returncode == 0 and whole.stdout.endswith(b"\n1000000\n")


def test_a_remote_program_ended_by_vm_rm_says_why(cluster_factory):
    """vm rm --force ends a VM's programs on every node: the caller of one
    on another node says why its program was killed (as a local run does)."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "gone", "--node", "n1", "--node", "n2", node="n1", check=True)
    caller = subprocess.Popen([str(BIN / "drvs-run"), "--vm", "gone", "--node", "n2", "--", "sh", "-c",
                               "echo started; exec sleep 60"], env={**c.env, "DRVS_NODE": "n1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert caller.stdout.readline() == "started\n"
        c.drvs("vm", "rm", "gone", "--force", node="n1", check=True)
        _, err = caller.communicate(timeout=30)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    assert caller.returncode == 137, err
    assert err == "drvs-run: VM 'gone' was removed while this ran (drvs vm rm --force): its programs were ended\n"


def _run_while_a_daemon_stops(c, stopped: str, sig: int, script: str) -> tuple[int, str]:
    """drvs-run --node n2 from n1 of script (which says "started"); once it
    runs, node `stopped`'s drvmmd gets sig: the caller's status and stderr."""
    caller = subprocess.Popen([str(BIN / "drvs-run"), "--node", "n2", "--", "sh", "-c", script],
                              env={**c.env, "DRVS_NODE": "n1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert caller.stdout.readline() == "started\n"
        os.kill(c.node(stopped)["pid"], sig)
        _, err = caller.communicate(timeout=30)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    return caller.returncode, err


def test_this_nodes_own_drvmmd_gone_is_said_as_such_not_blamed_on_others(cluster_factory):
    """n1's drvmmd killed under a run n1 made on n2, then asked for runs
    and logs: each says that n1's own drvmmd is not running (exit 7),
    not that n2 lost the program or did not answer."""
    c = cluster_factory(nodes=2)
    code, err = _run_while_a_daemon_stops(c, "n1", signal.SIGKILL, "echo started; sleep 30")
    assert code == 7 and err.startswith("drvs-run: this node's drvmmd stopped"), err
    listed = c.drvs("runs", "--json", node="n1")
    assert listed.returncode == 7 and "drvmmd is not running on this node" in listed.stderr, listed.stderr
    assert json.loads(listed.stdout) == []
    log = c.drvs("logs", "0123456789ab", node="n1")
    assert log.returncode == 7 and "drvmmd is not running on this node" in log.stderr, log.stderr


def test_dead_target_node_is_reported_within_the_bound(cluster_factory):
    c = cluster_factory(nodes=2)
    os.kill(c.node("n2")["pid"], signal.SIGKILL)
    c.wait_status("n2", "NotReady", timeout=8)
    t0 = time.monotonic()
    p = run_on(c, "n1", "--node", "n2", "--", "true")
    assert p.returncode == 7 and "node 'n2' is NotReady" in p.stderr
    assert time.monotonic() - t0 < 10


def test_a_program_whose_node_daemon_stops_is_reported_lost(cluster_factory):
    """n2's drvmmd stopped (SIGTERM) while its program runs for n1: the
    caller exits 7 and says so -- never the 0 of a program that ended well."""
    c = cluster_factory(nodes=2)
    code, err = _run_while_a_daemon_stops(c, "n2", signal.SIGTERM, "echo started; sleep 30; exit 3")
    assert code == 7, err
    assert "stopped serving it" in err or "lost the program" in err, err


def test_a_closed_output_is_a_broken_pipe_for_the_remote_program(cluster_factory):
    """The caller's stdout closed (`| head -1`): the program on n2 sees a
    broken pipe as it would locally -- SIGPIPE (141), or EPIPE if it ignores
    the signal, going on to its own exit status -- never a SIGKILL."""
    c = cluster_factory(nodes=2)
    run = f"{BIN / 'drvs-run'} --node n2 --"
    script = (f"for i in 1 2 3; do {run} yes | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}; done; "
              f"{run} sh -c 'trap \"\" PIPE; sleep .5; echo a; sleep .5; echo b >&2; "
              f"echo c || echo failed >&2; exit 5' | true; echo ${{PIPESTATUS[0]}}")
    p = subprocess.run(["bash", "-c", script], env={**c.env, "DRVS_NODE": "n1"}, capture_output=True,
                       text=True, timeout=120)
    assert p.stdout.split() == ["141", "141", "141", "5"], p.stderr
    assert "b\n" in p.stderr and "failed\n" in p.stderr


def test_tty_across_nodes(cluster_factory):
    c = cluster_factory(nodes=2)
    child = pexpect.spawn(str(BIN / "drvs-run"), ["--node", "n2", "-it", "--", "bash", "--norc", "-i"],
                          env={**c.env, "DRVS_NODE": "n1"}, encoding="utf-8", timeout=20, dimensions=(31, 97))
    try:
        child.expect(r"[#$] ")
        child.sendline("PS1='P''> '")
        child.expect_exact("P> ")
        child.sendline("tty; stty size")
        child.expect(r"(/dev/pts/\d+)\r\n(\d+ \d+)\r\n")
        assert child.match.group(2) == "31 97"
        child.sendline("exit 6")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 6
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


def test_a_remote_programs_first_output_on_a_terminal_is_as_written(cluster_factory):
    """-it across nodes: the terminal is raw from before the program starts,
    so its first line arrives as it wrote it (a cooked terminal turned its
    \r\n into \r\r\n)."""
    c = cluster_factory(nodes=2)
    child = pexpect.spawn(str(BIN / "drvs-run"), ["--node", "n2", "-it", "--", "echo", "first"],
                          env={**c.env, "DRVS_NODE": "n1"}, timeout=20)
    try:
        child.expect(pexpect.EOF)
        assert child.before == b"first\r\n"
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


def test_login_on_another_node(cluster_factory):
    c = cluster_factory(nodes=2)
    child = pexpect.spawn(str(BIN / "drvs"), ["--node", "n1", "login", "default", "--node", "n2"],
                          env=c.env, encoding="utf-8", timeout=20)
    try:
        child.expect(r"[#$] ")
        child.sendline("PS1='P''> '; echo login''=$(shopt -q login_shell && echo yes)")  # ('' : not the echo)
        child.expect(r"login=(\S+)")
        assert child.match.group(1) == "yes"
        child.expect_exact("P> ")
        assert cells_of(c, "n2") and not cells_of(c, "n1")  # the shell runs in n2's cell
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 5
    finally:
        if child.isalive():
            child.kill(signal.SIGKILL)


def test_a_vanished_caller_ends_the_program_not_the_daemon(cluster_factory):
    c = cluster_factory(nodes=2)
    caller = subprocess.Popen([str(BIN / "drvs-run"), "--node", "n2", "--", "sh", "-c",
                               "while :; do echo tick; sleep 0.01; done"],
                              env={**c.env, "DRVS_NODE": "n1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = caller.stdout.readline()
    if line != b"tick\n":
        caller.kill()
        raise AssertionError(f"no tick: {line!r}, exit {caller.wait()}, {caller.stderr.read()!r}")
    caller.kill()
    caller.wait()
    # one that prints nothing is ended too (it never finds out by a failed write)
    quiet = subprocess.Popen([str(BIN / "drvs-run"), "--node", "n2", "--", "sleep", "3131"],
                             env={**c.env, "DRVS_NODE": "n1"})
    deadline = time.monotonic() + 15
    while "sleep 3131" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "the quiet program never started"
        time.sleep(0.1)
    quiet.kill()
    quiet.wait()
    deadline = time.monotonic() + 15
    while "sleep 3131" in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "the quiet program outlived its caller"
        time.sleep(0.2)
    # n2's drvmmd lives on, and the program it ran for the caller is gone.
    deadline = time.monotonic() + 15
    while "while :; do echo tick" in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "the program outlived its caller"
        time.sleep(0.2)
    assert subprocess.run(["kill", "-0", str(c.node("n2")["pid"])]).returncode == 0
    assert c.nodes()["n2"]["status"] == "Ready"
    assert run_on(c, "n1", "--node", "n2", "--", "true").returncode == 0


def test_slow_reader_of_stdin_does_not_stall_the_node(cluster_factory, tmp_path):
    """The program takes a little of a large input, then sleeps: the node's
    daemon must not sit in a blocked write meanwhile (it would miss its
    heartbeats and turn NotReady)."""
    c = cluster_factory(nodes=2)
    big = tmp_path / "input"
    big.write_bytes(b"x" * (1 << 20))
    with open(big, "rb") as stdin:  # a file: the test itself never blocks on it
        proc = subprocess.Popen([str(BIN / "drvs-run"), "--node", "n2", "--", "sh", "-c",
                                 "head -c 10000 > /dev/null; sleep 7; echo done"],
                                env={**c.env, "DRVS_NODE": "n1"}, stdin=stdin, stdout=subprocess.PIPE)
    try:
        time.sleep(5.5)  # past the lease's TTL
        assert c.nodes()["n2"]["status"] == "Ready"
        out, _ = proc.communicate(timeout=30)
        assert out == b"done\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cut_cable_ends_a_waiting_caller_within_a_bound(cluster_factory):
    """n2 silently drops off the network while a program runs there for n1's
    caller: the caller is told, it does not wait forever."""
    from drvs.dev import netns

    c = cluster_factory(nodes=2)
    caller = subprocess.Popen([str(BIN / "drvs-run"), "--node", "n2", "--", "sh", "-c", "echo up; exec sleep 120"],
                              env={**c.env, "DRVS_NODE": "n1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert caller.stdout.readline() == "up\n"
        netns.set_link(c.info["name"], "n2", up=False)
        t0 = time.monotonic()
        _, err = caller.communicate(timeout=40)
        assert caller.returncode == 7 and "lost the program" in err, err
        assert time.monotonic() - t0 < 30
    finally:
        netns.set_link(c.info["name"], "n2", up=True)
        if caller.poll() is None:
            caller.kill()
            caller.wait()
