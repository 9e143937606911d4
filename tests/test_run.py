"""drvs-run as a user meets it: output, stdio, exit codes, errors, signals."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest


def test_runs_a_command_and_passes_its_output(drvs):
    p = drvs.run("--", "/bin/echo", "hello", "world")
    assert (p.returncode, p.stdout, p.stderr) == (0, "hello world\n", "")


def test_stdin_pipes_through(drvs):
    p = drvs.run("--", "tr", "a-z", "A-Z", input="piped text\n")
    assert p.stdout == "PIPED TEXT\n"


def test_shell_pipeline(drvs):
    p = drvs.run("--", "sh", "-c", "seq 1 100 | grep 7 | wc -l")
    assert p.stdout.strip() == "19"


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_status_is_the_programs(drvs, code):
    assert drvs.run("--", "sh", "-c", f"exit {code}").returncode == code


def test_killed_by_signal_gives_128_plus_n(drvs):
    p = drvs.run("--", "sh", "-c", "kill -TERM $$")
    assert p.returncode == 128 + signal.SIGTERM
    p = drvs.run("--", "sh", "-c", "kill -KILL $$")
    assert p.returncode == 128 + signal.SIGKILL
    assert "out of memory" not in p.stderr


def test_command_not_found_is_127(drvs):
    p = drvs.run("--", "no-such-command-xyz")
    assert p.returncode == 127
    assert p.stderr == "drvs-run: no-such-command-xyz: command not found\n"


def test_missing_path_is_127(drvs):
    p = drvs.run("--", "/no/such/file")
    assert p.returncode == 127
    assert p.stderr == "drvs-run: /no/such/file: No such file or directory\n"


def test_not_executable_is_126(drvs):
    p = drvs.run("--", "/etc/passwd")
    assert p.returncode == 126
    assert p.stderr == "drvs-run: /etc/passwd: Permission denied\n"


@pytest.mark.parametrize("args,fragment", [
    (["--bogus-flag", "--", "true"], "unrecognized arguments"),
    (["--memory", "12Q", "--", "true"], "invalid memory size '12Q'"),
    (["--cpus", "lots", "--", "true"], "invalid CPU amount 'lots'"),
    (["-v", "/no/such/dir:/x", "--", "true"], "bind source /no/such/dir does not exist"),
    (["-v", "relative", "--", "true"], "expected SRC:DST"),
    (["-v", ":/mnt", "--", "true"], "no bind source"),
    (["-w", "relative", "--", "true"], "invalid working directory 'relative': must be an absolute path"),
    (["--cpuset-cpus", "4095", "--", "true"], "this machine has no CPU 4095"),
    (["--cpus", "4000", "--", "true"], "this machine has"),
    (["--pids-limit", "99999999999", "--", "true"], "at most 4194304"),
    (["--memory", "0", "--", "true"], "must be at least 6M"),
    (["--memory", "9999999T", "--", "true"], "must be at most 1E"),
    (["-v", ":/mnt:ro", "--", "true"], "no bind source"),
    (["-v", "/tmp:/proc", "--", "true"], "/proc is the jail's own"),
    (["-v", "/tmp:/proc/sys/x", "--", "true"], "/proc/sys/x is the jail's own"),
    (["-v", "/tmp:/dev/", "--", "true"], "/dev is the jail's own"),
    (["-v", "/tmp:/.drvs", "--", "true"], "/.drvs is the jail's own"),
    (["-v", "/tmp:/mnt", "-v", "/etc:/mnt/", "--", "true"], "/mnt is the destination of two -v"),
    (["--vm", "Bad_Name", "--", "true"], "invalid VM name"),
])
def test_bad_usage_is_exit_2_in_one_line(drvs, args, fragment):
    p = drvs.run(*args)
    assert p.returncode == 2
    assert fragment in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("drvs-run: "), p.stderr
    assert "Traceback" not in p.stderr


def test_no_command_is_exit_2(drvs):
    p = drvs.run()
    assert p.returncode == 2
    assert p.stderr.startswith("drvs-run: no command given")


def test_unknown_vm_is_exit_3(drvs):
    p = drvs.run("--vm", "nosuchvm", "--", "true")
    assert (p.returncode, p.stderr) == (3, "drvs-run: no such VM: 'nosuchvm' (see `drvs vm ls`)\n")


def test_bad_workdir_fails_setup_with_125(drvs):
    p = drvs.run("-w", "/no/such/dir", "--", "true")
    assert p.returncode == 125
    assert p.stderr == "drvs-run: working directory /no/such/dir: No such file or directory\n"


def test_env_and_workdir(drvs, monkeypatch):
    drvs.env["FROM_HOST"] = "yes"
    p = drvs.run("-e", "A=1", "-e", "B=two words", "-e", "FROM_HOST", "-w", "/tmp", "--",
                 "sh", "-c", 'echo "$A|$B|$FROM_HOST|$(pwd)|$HOME"')
    assert p.stdout == "1|two words|yes|/tmp|/root\n"


def test_host_environment_does_not_leak(drvs):
    drvs.env["SECRET_HOST_VAR"] = "leak"
    p = drvs.run("--", "env")
    assert "SECRET_HOST_VAR" not in p.stdout
    assert "PATH=/usr/local/sbin:" in p.stdout


def test_user_option(drvs):
    p = drvs.run("-u", "65534:65534", "--", "sh", "-c", "id -u; id -g; grep ^CapEff /proc/self/status")
    uid, gid, caps = p.stdout.split("\n")[:3]
    assert (uid, gid) == ("65534", "65534")
    assert caps.split()[1] == "0000000000000000"


def _wait_for_line(proc, text, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never saw {text!r}")


def test_a_third_interrupt_ends_a_program_that_ignores_them(drvs):
    import subprocess

    proc = drvs.popen("--", "sh", "-c", 'trap "echo ignored" INT; echo ready; while :; do sleep 0.05; done',
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_line(proc, "ready")
        for _ in range(2):
            proc.send_signal(signal.SIGINT)
            _wait_for_line(proc, "ignored")
        assert proc.poll() is None  # (two: the program's to heed or not)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 137
        assert err == "drvs-run: interrupted 3 times: ending the program\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig,name", [(signal.SIGTERM, "TERM"), (signal.SIGINT, "INT"), (signal.SIGHUP, "HUP")])
def test_signals_reach_the_program(drvs, sig, name):
    script = f'trap "echo got {name}; exit 42" {name}; echo ready; while :; do sleep 0.05; done'
    import subprocess

    proc = drvs.popen("--", "sh", "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_line(proc, "ready")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
        assert "got " + name in out
        assert proc.returncode == 42, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_early_interrupt_ends_quietly(drvs):
    """^C while Python still imports the command: 130, never a traceback
    from drvs's code.  (The interpreter's own start, before any of it,
    ~10 ms here, is Python's to handle.)"""
    for delay in (0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12):
        for argv in (["drvs-run", "--", "true"], ["drvs", "vm", "ls"]):
            p = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), argv[0]), *argv[1:]],
                                 env=drvs.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(delay)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=30)
            frames = re.findall(r'File "([^"]+)"', err)
            assert not any("/drvs/" in f for f in frames), (argv, delay, err)
            if not frames:
                assert p.returncode in (0, 130, -signal.SIGINT), (argv, delay, p.returncode, err)

