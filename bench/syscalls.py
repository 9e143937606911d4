"""Benchmark: the DVOS system-call path, beside its floors, in one run.

    .venv/bin/python bench/syscalls.py [-n CALLS]

Cases, each a C loop timing one call at a time (bench/progs/callloop.c):
  native getppid, and kill(pid, 0) on a local pid: what the kernel costs;
  the C floor: a C supervisor answering every call at once with seccomp
  user notification (bench/progs/notif_floor.c, sync wake-up);
  in a jail on n1 of a 2-node dev cluster:
    kill(own pid, 0)      the filter lets the node's own pids through
    kill(1, 0)            notified; the supervisor answers "the kernel's"
                          (no server): the supervisor's own cost
    kill(-pgid, 0)        a process group: served by pm@VM on the same node
                          (VM with one share, on n1)
    kill(pid on n2, 0)    served by n2's procs@n2 across the fabric
  strace -f of the same kill loop (ptrace, the peer baseline);
  and the fabric's own sendrec, same node and across nodes (bench/fabric.py).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)


def build(out: str) -> None:
    for prog in ("callloop", "notif_floor"):
        subprocess.run(["gcc", "-O2", "-o", f"{out}/{prog}", f"{HERE}/progs/{prog}.c"], check=True)


def parse(text: str) -> dict:
    median, p99 = map(float, text.split()[:2])
    return {"median_us": median, "p99_us": p99}


def in_jail(env, node_via, vm, script, timeout=600) -> str:
    p = subprocess.run([f"{BIN}/drvs-run", "--vm", vm, "--", "sh", "-c", script], env={**env, "DRVS_NODE": node_via},
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{script}: exit {p.returncode}: {p.stderr}")
    return p.stdout


def fabric_baselines(info, n: int) -> dict:
    sys.path.insert(0, HERE)
    import fabric as fb

    from drvs.cluster.context import setns_net

    n1, n2 = info["nodes"]
    echo = subprocess.Popen([sys.executable, "-c", fb.ECHO_SERVER, n2["address"], "7800"],
                            preexec_fn=lambda: setns_net(f"/run/netns/{n2['netns']}"))
    try:
        time.sleep(0.5)
        tls = json.load(open(f"{n1['state_dir']}/cluster.json"))["tls"]
        cfg = {"n": n, "n1": n1["address"], "n2": n2["address"], "echo_port": 7800, "tls": tls}
        client = fb.CLIENT.replace("for size in (32, 65536):", "for size in (32,):")
        out = subprocess.run([sys.executable, "-c", client, json.dumps(cfg)], capture_output=True, text=True,
                             preexec_fn=lambda: setns_net(f"/run/netns/{n1['netns']}"), check=True, timeout=600)
        return json.loads(out.stdout)
    finally:
        echo.kill()
        echo.wait()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-n", "--calls", type=int, default=5000)
    args = p.parse_args()
    n = args.calls
    from drvs.dev import cluster

    work = tempfile.mkdtemp(prefix="drvs-bench-syscalls-")
    state = f"{work}/state"
    os.makedirs(state)
    build(work)
    r = {}
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        r["native getppid"] = parse(subprocess.check_output([f"{work}/callloop", str(n), "getppid"], text=True))
        r["native kill(pid, 0)"] = parse(subprocess.check_output(
            [f"{work}/callloop", str(n), "kill", str(sleeper.pid), "0"], text=True))
        r["C supervisor, user notification (floor)"] = parse(subprocess.check_output(
            [f"{work}/notif_floor", str(n)], text=True, timeout=120))
        r["strace -f, kill(pid, 0)"] = parse(subprocess.check_output(
            ["strace", "-f", "-qq", "-o", "/dev/null", f"{work}/callloop", str(n), "kill", str(sleeper.pid), "0"],
            text=True, timeout=300))

        info = cluster.up(state, 2, name=cluster.new_name())
        env = {**os.environ, "DRVS_STATE_DIR": state}
        drvs = lambda *a: subprocess.run([f"{BIN}/drvs", "--node", "n1", *a], env=env, check=True,  # noqa: E731
                                         capture_output=True, text=True)
        drvs("vm", "create", "web", "--node", "n1", "--node", "n2")
        drvs("vm", "create", "solo", "--node", "n1")
        n1_view = f"{info['nodes'][0]['state_dir']}/dvos/fs"
        for vm in ("web", "solo"):  # a jail's /data is its VM's file system, the same on every node
            deadline = time.monotonic() + 30
            while not os.path.isdir(f"{n1_view}/{vm}"):
                assert time.monotonic() < deadline, f"fs@{vm} not served"
                time.sleep(0.1)
            shutil.copy(f"{work}/callloop", f"{n1_view}/{vm}")
        far = subprocess.Popen([f"{BIN}/drvs-run", "--vm", "web", "--node", "n2", "--", "sleep", "600"],
                               env={**env, "DRVS_NODE": "n1"})
        try:
            deadline = time.monotonic() + 30
            pid = None
            while pid is None and time.monotonic() < deadline:
                rows = json.loads(drvs("ps", "web", "--format", "json").stdout)
                pid = next((x["pid"] for x in rows if x["command"] == "sleep 600"), None)
                time.sleep(0.2)
            deadline = time.monotonic() + 30  # pm@solo elected
            while time.monotonic() < deadline:
                if subprocess.run([f"{BIN}/drvs", "--node", "n1", "ps", "solo"], env=env,
                                  capture_output=True).returncode == 0:
                    break
                time.sleep(0.2)
            time.sleep(6)  # the PM campaigns run every few seconds
            loop = f"/data/callloop {n}"
            r["jail: kill(own pid, 0), the filter passes it"] = parse(in_jail(env, "n1", "web", f"{loop} kill $$ 0"))
            r["jail: kill(1, 0), supervisor only"] = parse(in_jail(env, "n1", "web", f"{loop} kill 1 0"))
            r["jail: kill(-pgid, 0), pm@VM on the same node"] = parse(in_jail(env, "n1", "solo", f"{loop} kill -$$ 0"))
            r["jail: kill(pid on n2, 0), procs@n2 across nodes"] = parse(
                in_jail(env, "n1", "web", f"{loop} kill {pid} 0"))
        finally:
            far.terminate()
            far.wait()
        fab = fabric_baselines(info, min(n, 2000))
        r["fabric sendrec, same node (32 B)"] = fab["sendrec n1 process -> drvmm@n1 (same node), 32 B"]
        r["fabric sendrec, across nodes (32 B)"] = fab["sendrec n1 process -> drvmm@n2 (other node), 32 B"]
        r["raw trio TCP echo across nodes (32 B)"] = fab["raw trio TCP echo n1->n2, 32 B"]
    finally:
        sleeper.kill()
        sleeper.wait()
        try:
            if os.path.exists(f"{state}/dev-cluster.json"):
                cluster.down(state)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    floor = r["C supervisor, user notification (floor)"]["median_us"]
    print(f"{'case':52} {'median us':>10} {'p99 us':>9} {'x floor':>8}")
    for name, x in r.items():
        print(f"{name:52} {x['median_us']:10.2f} {x['p99_us']:9.2f} {x['median_us'] / floor:8.2f}")
    local = r["jail: kill(-pgid, 0), pm@VM on the same node"]["median_us"]
    remote = r["jail: kill(pid on n2, 0), procs@n2 across nodes"]["median_us"]
    print(f"\nsupervisor only / C floor: {r['jail: kill(1, 0), supervisor only']['median_us'] / floor:.2f} (target <= 3)")
    print(f"PM same node / fabric same-node sendrec: "
          f"{local / r['fabric sendrec, same node (32 B)']['median_us']:.2f} (target <= 1.5)")
    print(f"other node - fabric cross-node sendrec: "
          f"{remote - r['fabric sendrec, across nodes (32 B)']['median_us']:+.0f} us (target <= +30)")
    print(f"strace -f / C floor: {r['strace -f, kill(pid, 0)']['median_us'] / floor:.2f}")
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: needs root")
    sys.exit(main())
