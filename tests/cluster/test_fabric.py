"""The fabric on a real cluster: sendrec between nodes, locks and elections
through the DRVMM service, and what a dead node does to each."""

import base64
import json
import os
import re
import signal
import subprocess
import time

from tests.cluster.conftest import BIN


def test_sendrec_same_and_other_node(cluster_factory):
    c = cluster_factory(nodes=2)
    for target in ("drvmm@n1", "drvmm@n2"):
        p = c.drvs("ipc", "ping", "-c", "3", target, node="n1", check=True)
        lines = p.stdout.splitlines()
        assert len(lines) == 3
        assert all(re.fullmatch(rf"reply from {target}: seq=\d time=[\d.]+ ms ok", line) for line in lines), lines


def test_unknown_endpoint_is_a_clear_error(cluster_factory):
    c = cluster_factory(nodes=1)
    p = c.drvs("ipc", "ping", "drvmm@n9", node="n1")
    assert p.returncode == 7
    assert p.stderr == "drvs: no endpoint 'drvmm@n9' (not registered, or its node is gone)\n"  # (named once)
    bad = c.drvs("ipc", "ping", "no-at-sign", node="n1")  # (not a name: a usage error)
    assert bad.returncode == 2 and "invalid endpoint name" in bad.stderr and bad.stderr.count("\n") == 1


def test_dead_nodes_endpoint_errors_within_the_bound(cluster_factory):
    c = cluster_factory(nodes=2)
    os.kill(c.node("n2")["pid"], signal.SIGSTOP)  # alive but silent: the worst case
    try:
        t0 = time.monotonic()
        p = c.drvs("ipc", "ping", "--timeout", "2", "drvmm@n2", node="n1")
        took = time.monotonic() - t0
        assert p.returncode == 7
        assert any(w in p.stderr for w in ("no reply", "no connection", "unreachable", "no endpoint")), p.stderr
        assert p.stderr.count("drvmm@n2") <= 1, p.stderr  # one line, the endpoint named once
        assert took < 6, took
    finally:
        os.kill(c.node("n2")["pid"], signal.SIGCONT)


def test_lock_of_a_killed_node_is_taken_by_another(cluster_factory):
    c = cluster_factory(nodes=2)
    key = c.drvs("lock", "acquire", "db", node="n1", check=True).stdout.strip()
    assert key.startswith("/drvs/locks/db/")
    busy = c.drvs("lock", "acquire", "db", "--timeout", "1", node="n2")
    assert busy.returncode == 4 and "not obtained within 1 s (another holds it, or etcd" in busy.stderr
    waiter = subprocess.Popen([str(BIN / "drvs"), "--node", "n2", "lock", "acquire", "db", "--timeout", "20"],
                              env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    t0 = time.monotonic()
    os.kill(c.node("n1")["pid"], signal.SIGKILL)
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, err
    assert out.strip().startswith("/drvs/locks/db/") and out.strip() != key
    assert time.monotonic() - t0 < 6


def test_released_lock_passes_on_at_once(cluster_factory):
    c = cluster_factory(nodes=2)
    key = c.drvs("lock", "acquire", "q", node="n1", check=True).stdout.strip()
    other = c.drvs("lock", "release", key, node="n2")  # n1's lock is n1's to release
    assert other.returncode == 4 and "another node's" in other.stderr, other.stderr
    assert c.drvs("lock", "acquire", "q", "--timeout", "1", node="n2").returncode == 4  # still held
    c.drvs("lock", "release", key, node="n1", check=True)
    assert c.drvs("lock", "acquire", "q", "--timeout", "2", node="n2").returncode == 0
    again = c.drvs("lock", "release", key, node="n1")
    assert again.returncode == 3 and "no lock is held" in again.stderr


def test_lock_and_election_calls_touch_only_their_own_keys(cluster_factory):
    """A release or resign deletes in etcd: a key that is not a lock's (or a
    leadership's) is refused, and the VM stays; bad names and timeouts are
    usage errors."""
    c = cluster_factory(nodes=2)
    c.drvs("vm", "create", "keep", "--node", "n1", node="n1", check=True)
    for key in ("/drvs/vms/keep", "/drvs/locks/../vms/keep", "nosuch"):
        bad = c.drvs("lock", "release", key, node="n1")
        assert bad.returncode == 2 and "not a lock key" in bad.stderr, (key, bad.stderr)
    forged = json.dumps({"name": base64.b64encode(b"/drvs/vms").decode(),
                         "key": base64.b64encode(b"/drvs/vms/keep").decode(), "rev": "1", "lease": "1"})
    system = json.dumps({"name": base64.b64encode(b"/drvs/elections/pm/keep").decode(),
                         "key": base64.b64encode(b"/drvs/elections/pm/keep/1").decode(), "rev": "1", "lease": "1"})
    for key in (forged, system, "{}", "nonsense"):
        bad = c.drvs("election", "resign", key, node="n1")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, (key, bad.stderr)
    assert "keep" in c.drvs("vm", "ls", node="n2", check=True).stdout
    for args in (("lock", "acquire", ""), ("lock", "acquire", "a/../b"), ("election", "leader", ""),
                 ("lock", "acquire", "a/b"), ("election", "campaign", "f1/x"),  # (they would nest under a, f1)
                 ("election", "leader", "f1/x"), ("election", "observe", "a/b"),
                 ("lock", "acquire", "x", "--timeout", "-1"), ("election", "campaign", "x", "--timeout", "nan"),
                 ("ipc", "ping", "nosuch"), ("ipc", "ping", "@n2"), ("ipc", "ping", "x@@y"), ("ipc", "ping", "drvmm@n2", "-c", "0"),
                 ("group", "join", "a/b"), ("group", "members", ""), ("election", "campaign", "pm/keep"),
                 ("ipc", "ping", "drvmm@n2", "--timeout", "-1"), ("ipc", "ping", "drvmm@n2", "--timeout", "nan"),
                 ("ipc", "ping", "drvmm@n2", "--timeout", "inf"), ("group", "broadcast", "g", "--timeout", "0"),
                 ("group", "broadcast", "g", "--timeout", "1e300"), ("lock", "acquire", "x", "--timeout", "1e300"),
                 ("election", "observe", "x", "-n", "-1")):
        bad = c.drvs(*args, node="n1")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, (args, bad.stderr)
    for value in ("0", "abc", "1e300"):  # (a reply's wait: one range said, whatever the mistake)
        bad = c.drvs("group", "broadcast", "g", "--timeout", value, node="n1")
        assert f"not a number of seconds above 0 (up to 86400): '{value}'" in bad.stderr, bad.stderr


def test_leader_is_re_elected_when_the_leader_dies(cluster_factory):
    c = cluster_factory(nodes=3)
    c.drvs("election", "campaign", "pm-web", node="n1", check=True)
    assert c.drvs("election", "leader", "pm-web", node="n3", check=True).stdout == "n1\n"
    standby = subprocess.Popen([str(BIN / "drvs"), "--node", "n2", "election", "campaign", "pm-web",
                                "--timeout", "20"], env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert standby.poll() is None  # n1 still leads
    os.kill(c.node("n1")["pid"], signal.SIGKILL)
    standby.communicate(timeout=30)
    assert standby.returncode == 0
    assert c.drvs("election", "leader", "pm-web", node="n3", check=True).stdout == "n2\n"


def test_resign_hands_over(cluster_factory):
    c = cluster_factory(nodes=2)
    key = c.drvs("election", "campaign", "e", node="n1", check=True).stdout.strip()
    assert len(key.split()) == 1  # (one word: `drvs election resign $key` passes it whole)
    other = c.drvs("election", "resign", key, node="n2")  # n1's leadership is n1's to resign
    assert other.returncode == 4 and "another node's" in other.stderr, other.stderr
    assert c.drvs("election", "leader", "e", node="n2", check=True).stdout == "n1\n"
    c.drvs("election", "resign", key, node="n1", check=True)
    assert c.drvs("election", "leader", "e", node="n2").returncode == 3
    c.drvs("election", "campaign", "e", "--timeout", "2", node="n2", check=True)
    assert c.drvs("election", "leader", "e", node="n1", check=True).stdout == "n2\n"


def test_group_membership_follows_node_lives_and_broadcast_reaches_members(cluster_factory):
    c = cluster_factory(nodes=3)
    for n in ("n1", "n2", "n3"):
        c.drvs("group", "join", "vm-web", node=n, check=True)
    members = c.drvs("group", "members", "vm-web", node="n1", check=True).stdout.split()
    assert members == ["drvmm@n1", "drvmm@n2", "drvmm@n3"]
    for other in ("drvmm@n2", "nosuch@web"):  # (its membership would outlive it, or end before it)
        bad = c.drvs("group", "join", "vm-web", other, node="n1")
        assert bad.returncode == 3, bad.stderr
        assert bad.stderr == (f"drvs: drvmm@n1: {other} is not served on node n1 (an endpoint joins a group "
                              "from its own node)\n"), bad.stderr
    assert c.drvs("group", "members", "vm-web", node="n1", check=True).stdout.split() == members
    assert c.drvs("group", "broadcast", "vm-web", node="n2", check=True).stdout == "delivered to 3\n"
    os.kill(c.node("n3")["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while "drvmm@n3" in c.drvs("group", "members", "vm-web", node="n1").stdout:
        assert time.monotonic() < deadline, "a dead node's membership outlived its lease"
        time.sleep(0.2)
    assert c.drvs("group", "broadcast", "vm-web", node="n1", check=True).stdout == "delivered to 2\n"
    theirs = c.drvs("group", "leave", "vm-web", "drvmm@n2", node="n1")  # (n2's lease holds it: n2 lets go)
    assert theirs.returncode == 4 and "joined group 'vm-web' through node n2" in theirs.stderr, theirs.stderr
    c.drvs("group", "leave", "vm-web", node="n2", check=True)
    assert c.drvs("group", "members", "vm-web", node="n1", check=True).stdout.split() == ["drvmm@n1"]
    again = c.drvs("group", "leave", "vm-web", node="n2")
    assert again.returncode == 3 and "drvmm@n2 is not a member of group 'vm-web'" in again.stderr, again.stderr


def test_election_observe_reports_each_new_leader(cluster_factory):
    c = cluster_factory(nodes=2)
    c.drvs("election", "campaign", "ob", node="n1", check=True)
    watcher = subprocess.Popen([str(BIN / "drvs"), "--node", "n2", "election", "observe", "ob", "-n", "2"],
                               env=c.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.7)
        standby = subprocess.Popen([str(BIN / "drvs"), "--node", "n2", "election", "campaign", "ob",
                                    "--timeout", "20"], env=c.env, stdout=subprocess.DEVNULL)
        time.sleep(0.3)
        os.kill(c.node("n1")["pid"], signal.SIGKILL)
        out, err = watcher.communicate(timeout=30)
        assert out.split() == ["n1", "n2"], err
        assert standby.wait(timeout=20) == 0
    finally:
        for p in (watcher,):
            if p.poll() is None:
                p.kill()
                p.wait()
