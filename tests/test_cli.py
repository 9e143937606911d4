"""drvs vm ..., exec, logs, kill: the management commands as scripts use them."""

import json
import os
import re
import subprocess
import sys
import time


def test_vm_lifecycle_and_json(drvs):
    assert drvs.drvs("vm", "create", "web", "--cpus", "1.5", "--memory", "512M", "--pids-limit", "100").stdout == "web\n"
    listed = json.loads(drvs.drvs("vm", "ls", "--format", "json", check=True).stdout)
    assert json.loads(drvs.drvs("vm", "ls", "--json", check=True).stdout) == listed
    web = next(v for v in listed if v["name"] == "web")
    assert web["limits"] == {"cpus": 1.5, "cpuset": None, "memory": 512 << 20, "pids": 100}
    table = drvs.drvs("vm", "ls", check=True).stdout
    assert re.search(r"web\s+1\.5\s+-\s+512M\s+100", table)
    shown = json.loads(drvs.drvs("vm", "show", "web", "--format", "json", check=True).stdout)
    assert shown["cell"] == {"active": False} and shown["runs"] == []
    assert drvs.run("--vm", "web", "--", "true").returncode == 0
    assert drvs.drvs("vm", "rm", "web").returncode == 0
    assert "web" not in [v["name"] for v in json.loads(drvs.drvs("vm", "ls", "--format", "json").stdout)]
    assert [p.name for p in (drvs.state / "cells").iterdir() if p.name.startswith("web.")] == []  # (its lock too)


def test_vm_errors_have_distinct_codes(drvs):
    drvs.drvs("vm", "create", "web", check=True)
    dup = drvs.drvs("vm", "create", "web")
    assert (dup.returncode, dup.stderr) == (4, "drvs: VM 'web' already exists\n")
    missing = drvs.drvs("vm", "show", "nope")
    assert (missing.returncode, missing.stderr) == (3, "drvs: no such VM: 'nope' (see `drvs vm ls`)\n")
    bad = drvs.drvs("vm", "create", "Not_Valid")
    assert bad.returncode == 2 and "invalid VM name" in bad.stderr
    size = drvs.drvs("vm", "create", "x", "--memory", "lots")
    assert size.returncode == 2 and "invalid memory size" in size.stderr
    cpus = drvs.drvs("vm", "create", "x", "--cpuset-cpus", "4095")  # (a VM of this node: its CPUs)
    assert cpus.returncode == 2 and "this machine has no CPU 4095" in cpus.stderr
    for p in (dup, missing, bad, size, cpus):
        assert "Traceback" not in p.stderr


def test_output_that_cannot_be_written_is_a_clear_error(drvs):
    """Standard output closed, or on a full disk: one line, exit 74, as
    for a disk error (not an internal error of the command)."""
    drvs.drvs("vm", "create", "web", check=True)
    argv = [os.path.join(os.path.dirname(sys.executable), "drvs"), "vm", "ls", "--format"]
    env = {k: v for k, v in drvs.env.items() if k != "PYTHONUNBUFFERED"}  # (buffered, as in a user's shell)
    for fmt in ("table", "json"):
        closed = subprocess.run([*argv, fmt], env=env, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: os.close(1))
        assert (closed.returncode, closed.stderr) == (74, "drvs: cannot write to standard output: it is closed\n")
        with open("/dev/full", "w") as full:
            p = subprocess.run([*argv, fmt], env=env, stdout=full, stderr=subprocess.PIPE, text=True)
        assert (p.returncode, p.stderr) == (74, "drvs: cannot write to standard output: No space left on device\n")


def test_every_command_as_another_user_says_it_needs_root_and_changes_nothing(drvs, monkeypatch, capsys):
    """(In this process, its effective uid said to be another's: this
    machine's Python is not readable to other users.)"""
    from drvs import config
    from drvs.cli import main as drvs_main, run as drvs_run

    for k, v in drvs.env.items():
        monkeypatch.setenv(k, v)
    config.load.cache_clear()
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    before = sorted(p.name for p in drvs.state.iterdir()) if drvs.state.exists() else []
    def exits(code):
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exits)  # (drvs-run leaves so, skipping the interpreter's teardown)
    for prog, entry, args in (("drvs", drvs_main.main, ["vm", "ls"]), ("drvs", drvs_main.main, ["vm", "create", "mine"]),
                              ("drvs-run", drvs_run.main, ["--", "true"])):
        try:
            code = entry(args)
        except SystemExit as e:
            code = e.code
        assert code == 77
        err = capsys.readouterr().err
        assert err.startswith(f"{prog}: {prog} needs root") and err.count("\n") == 1, err
    assert (sorted(p.name for p in drvs.state.iterdir()) if drvs.state.exists() else []) == before
    config.load.cache_clear()


def test_definitions_persist_in_the_store(drvs):
    drvs.drvs("vm", "create", "keep", "--memory", "1G", check=True)
    store = json.loads((drvs.state / "store.json").read_text())
    value, _created, _modified = store["kv"]["/drvs/vms/keep"]
    assert json.loads(value)["limits"]["memory"] == 1 << 30
    # A new process (a restart) sees it.
    assert drvs.drvs("vm", "show", "keep", check=True).returncode == 0


def test_corrupt_store_is_a_clear_error(drvs):
    drvs.drvs("vm", "create", "web", check=True)
    (drvs.state / "store.json").write_text("{not json")
    p = drvs.drvs("vm", "ls")
    assert p.returncode == 5
    assert p.stderr.startswith("drvs: store ") and "corrupt" in p.stderr
    assert (drvs.state / "store.json").read_text() == "{not json"


def test_exec_runs_in_the_named_vm(drvs):
    drvs.drvs("vm", "create", "db", check=True)
    p = drvs.drvs("exec", "db", "--", "sh", "-c", "hostname; exit 4")
    assert (p.returncode, p.stdout) == (4, "db\n")


def test_vm_rm_refuses_a_busy_vm_unless_forced(drvs):
    drvs.drvs("vm", "create", "busy", check=True)
    proc = drvs.popen("--vm", "busy", "--", "sh", "-c", "echo up; exec sleep 300", stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "up\n"
        shown = json.loads(drvs.drvs("vm", "show", "busy", "--format", "json", check=True).stdout)
        assert shown["cell"]["active"] is True
        assert [r["argv"] for r in shown["runs"]] == [["sh", "-c", "echo up; exec sleep 300"]]
        refused = drvs.drvs("vm", "rm", "busy")
        assert refused.returncode == 4 and "running program" in refused.stderr
        assert drvs.drvs("vm", "rm", "--force", "busy").returncode == 0
        assert proc.wait(timeout=20) == 137
        assert proc.stderr.read() == ("drvs-run: VM 'busy' was removed while this ran (drvs vm rm --force): "
                                      "its programs were ended\n")
        drvs.drvs("vm", "create", "busy", check=True)  # (the name again: a fresh cell)
        assert drvs.run("--vm", "busy", "--", "echo", "again").stdout == "again\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_detached_run_logs_and_kill(drvs):
    p = drvs.run("-d", "--", "sh", "-c", "echo started; trap 'echo bye; exit 0' TERM; while :; do sleep 0.05; done")
    assert p.returncode == 0
    run_id = p.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", run_id)
    deadline = time.monotonic() + 10
    while "started" not in drvs.drvs("logs", run_id).stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "started" in drvs.drvs("logs", run_id).stdout
    runs = json.loads(drvs.drvs("vm", "show", "default", "--format", "json").stdout)["runs"]
    assert [r["id"] for r in runs] == [run_id] and runs[0]["detached"] is True
    listed = json.loads(drvs.drvs("runs", "--json", check=True).stdout)
    assert [(r["id"], r["node"], r["vm"], r["argv"][0], r["running"]) for r in listed] == \
        [(run_id, "-", "default", "sh", True)]
    assert drvs.drvs("kill", run_id).returncode == 0
    while drvs.drvs("vm", "show", "default", "--format", "json").stdout.count(run_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert drvs.drvs("logs", run_id).stdout == "started\nbye\n"  # (the program's output alone)
    with open("/dev/full", "w") as full:
        p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "drvs"), "logs", run_id],
                           env=drvs.env, stdout=full, stderr=subprocess.PIPE, text=True)
    assert (p.returncode, p.stderr) == (74, "drvs: cannot write to standard output: No space left on device\n")
    assert drvs.drvs("wait", run_id, check=True).stdout == "0\n"
    assert json.loads(drvs.drvs("runs", "--json", check=True).stdout) == []
    nope = drvs.drvs("runs", "nope")
    assert (nope.returncode, nope.stderr) == (3, "drvs: no such VM: 'nope' (see `drvs vm ls`)\n")
    ended = json.loads(drvs.drvs("runs", "-a", "default", "--json", check=True).stdout)
    assert [(r["id"], r["running"], r["code"], r["argv"][0]) for r in ended] == [(run_id, False, 0, "sh")]
    assert json.loads(drvs.drvs("vm", "show", "default", "--format", "json").stdout)["cell"] == {"active": False}
    ended = drvs.drvs("kill", run_id)
    assert (ended.returncode, ended.stderr) == (3, f"drvs: run {run_id!r} has ended (exit status 0)\n")


def test_a_followed_log_ends_with_the_run_and_wait_gives_its_status(drvs):
    drvs.drvs("vm", "create", "jobs", check=True)
    run_id = drvs.run("--vm", "jobs", "-d", "--", "sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.3; done; exit 3",
                      check=True).stdout.strip()
    t0 = time.monotonic()
    follow = drvs.drvs("logs", "-f", run_id, timeout=30)
    assert (follow.returncode, follow.stdout) == (0, "1\n2\n3\n") and time.monotonic() - t0 > 0.5
    assert drvs.drvs("wait", run_id, check=True).stdout == "3\n"
    for bad, code in (("nothex", 2), ("../../etc/x", 2), ("0123456789ab", 3)):
        for verb in (("wait",), ("logs", "-f"), ("kill",)):
            assert drvs.drvs(*verb, bad).returncode == code, (verb, bad)
    drvs.drvs("vm", "rm", "jobs", check=True)  # (its runs' logs and statuses go with it)
    assert [p.name for p in (drvs.state / "runs").iterdir() if p.name.startswith(run_id)] == []


def test_stop_and_cont_reach_a_detached_runs_program(drvs):
    """kill -s STOP stops the program (not its keeper, which could then
    pass nothing on): its output stops, CONT resumes it, and KILL still
    ends it, as docker kill -s STOP/CONT/KILL."""
    run_id = drvs.run("-d", "--", "sh", "-c", "while :; do echo tick; sleep 0.05; done", check=True).stdout.strip()
    deadline = time.monotonic() + 10
    while "tick" not in drvs.drvs("logs", run_id).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert drvs.drvs("kill", "-s", "STOP", run_id).returncode == 0
    time.sleep(0.3)  # (a tick under way lands)
    stopped = drvs.drvs("logs", run_id).stdout
    time.sleep(0.5)
    assert drvs.drvs("logs", run_id).stdout == stopped  # (no tick while stopped)
    assert drvs.drvs("kill", "-s", "CONT", run_id).returncode == 0
    while drvs.drvs("logs", run_id).stdout == stopped:
        assert time.monotonic() < deadline + 10
        time.sleep(0.05)
    assert drvs.drvs("kill", "-s", "STOP", run_id).returncode == 0
    assert drvs.drvs("kill", "-s", "KILL", run_id).returncode == 0  # (a stopped program is killed all the same)
    waited = drvs.drvs("wait", run_id, timeout=20)
    assert (waited.returncode, waited.stdout) == (0, "137\n")


def test_detached_setup_failure_is_reported(drvs):
    p = drvs.run("-d", "--", "no-such-command")
    assert (p.returncode, p.stderr) == (127, "drvs-run: no-such-command: command not found\n")
    p = drvs.run("-d", "-w", "/no/such/dir", "--", "true")
    assert p.returncode == 125 and "/no/such/dir" in p.stderr
    assert list((drvs.state / "runs").glob("*.log")) == []  # (no log of a run that never started)


def test_unknown_run(drvs):
    assert drvs.drvs("logs", "feedfacecafe").returncode == 3
    assert drvs.drvs("kill", "feedfacecafe").returncode == 3
    assert drvs.drvs("kill", "-s", "NOPE", "feedfacecafe").returncode == 2
    for bad in ("999", "65", "RTMIN-1"):
        p = drvs.drvs("kill", "-s", bad, "feedfacecafe")
        assert p.returncode == 2 and p.stderr.startswith(f"drvs: unknown signal '{bad}'"), p.stderr
    for own in ("64", "RTMAX"):  # (the keeper's own: it would end the run as KILL does)
        p = drvs.drvs("kill", "-s", own, "feedfacecafe")
        assert (p.returncode, p.stderr) == (2, f"drvs: signal '{own}' is the one DRVS ends runs with: use KILL\n")


def test_ps_on_a_single_node_lists_the_vms_processes(drvs):
    """No cluster: drvs ps reads the cell's own procfs; pids are the jail's."""
    p = drvs.run("-d", "--", "sh", "-c", "echo $$ > /data/me; exec sleep 30")
    assert p.returncode == 0, p.stderr
    run_id = p.stdout.strip()
    try:
        deadline = time.monotonic() + 10
        rows = []
        while not [r for r in rows if r["command"] == "sleep 30"] and time.monotonic() < deadline:
            rows = json.loads(drvs.drvs("ps", "default", "--format", "json", check=True).stdout)
            time.sleep(0.05)
        row = next(r for r in rows if r["command"] == "sleep 30")
        me = int((drvs.state / "vms" / "default" / "data" / "me").read_text())
        assert row["pid"] == me and row["uid"] == 0
        assert row["node"] == "-" and row["state"] in ("R", "S")
        assert all(r["pid"] != 1 for r in rows)  # the cell's init is DRVS's, not the VM's
        assert "sleep 30" in drvs.drvs("ps", check=True).stdout
        assert drvs.drvs("ps", "nosuchvm").returncode == 3
    finally:
        drvs.drvs("kill", run_id)
        deadline = time.monotonic() + 10
        while drvs.drvs("vm", "show", "default", "--format", "json").stdout.count(run_id) and \
                time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_bad_setting_is_a_usage_error_naming_it(drvs):
    config = drvs.state.parent / "drvs.toml"
    for line, name in (("fs_cache_mib = -1", "fs_cache_mib"), ("idle_check_ms = 'soon'", "idle_check_ms")):
        config.write_text(line + "\n")
        p = drvs.drvs("vm", "ls")
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and name in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    config.write_text("fs_cache_mb = 0\n")  # (a typo)
    p = drvs.drvs("vm", "ls")
    assert p.returncode == 2 and "unknown setting 'fs_cache_mb'" in p.stderr, p.stderr
    config.write_text("fs_cache_mib = 0\n")
    assert drvs.drvs("vm", "ls").returncode == 0
    for env, said in (({"DRVS_CONFIG": str(config) + ".missing"}, "(DRVS_CONFIG): no such file"),
                      ({"DRVS_STATE_DIR": "relative/state"}, "'relative/state': must be an absolute path"),
                      ({"DRVS_STATE_DIR": str(config)}, f"{config}: not a directory")):
        p = subprocess.run([sys.executable, "-m", "drvs.cli.main", "vm", "ls"], env={**drvs.env, **env},
                           capture_output=True, text=True, cwd=drvs.state.parent)
        assert p.returncode == 2 and said in p.stderr and p.stderr.count("\n") == 1, (env, p.stderr)
    assert not (drvs.state.parent / "relative").exists()


def test_a_table_into_a_pipe_keeps_whole_values_and_no_trailing_blanks():
    long = "x" * 150  # (wider than the 80 columns rich assumes without a terminal)
    code = ("from drvs.cli.common import print_table; "
            f"print_table(['NAME', 'VALUE'], [['{long}', 'v'], ['n', 'w']])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "VALUE"] and lines[1].split() == [long, "v"] and lines[2].split() == ["n", "w"]
    assert all(line == line.rstrip() for line in lines)


def test_dev_cluster_up_refuses_bad_input_before_making_anything(drvs, tmp_path_factory):
    """A cluster's name names namespaces and files: a bad one (or node count,
    or CPUs per node) is a usage error, and nothing is made."""
    tmp_path = tmp_path_factory.mktemp("cwd")
    before = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    mounts = open("/proc/self/mountinfo").read()
    for args, fragment in ((["--name", "RV1 bad/"], "invalid cluster name"), (["--name", "../x"], "invalid cluster name"),
                           (["--nodes", "0"], "1 to 64 nodes"), (["--cpus-per-node", "0"], "at least 1"),
                           (["--nodes", "2", "--cpus-per-node", "999"], "this machine has")):
        p = drvs.drvs("dev", "cluster", "up", *args, cwd=tmp_path)
        assert p.returncode == 2 and fragment in p.stderr and p.stderr.count("\n") == 1, (args, p.stderr)
    assert set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()) == before
    assert open("/proc/self/mountinfo").read() == mounts and list(tmp_path.iterdir()) == []
    for args in (("down",), ("restart", "n1")):  # (none is up)
        p = drvs.drvs("dev", "cluster", *args)
        assert p.returncode == 3 and "no dev cluster here" in p.stderr, (args, p.stderr)
