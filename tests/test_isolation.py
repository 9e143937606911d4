"""What a jail hides and what it cannot change: asserted from inside it."""

import subprocess

import pytest


def test_hostname_is_the_vms(drvs):
    drvs.drvs("vm", "create", "web", check=True)
    p = drvs.run("--vm", "web", "--", "sh", "-c", "hostname; cat /etc/hostname; grep web /etc/hosts")
    assert p.stdout.split("\n")[:2] == ["web", "web"]
    assert "127.0.1.1\tweb" in p.stdout


def test_root_holds_only_the_jails_tree(drvs):
    p = drvs.run("--", "ls", "/")
    names = set(p.stdout.split())
    assert {"usr", "etc", "proc", "dev", "tmp", "data", "root"} <= names
    assert not names & {"home", "srv", "opt", "mnt", "media", "boot", "work"}


def test_host_files_outside_binds_are_invisible(drvs, tmp_path):
    marker = tmp_path / "host-marker"
    marker.write_text("secret")
    p = drvs.run("--", "sh", "-c", f"test -e {marker} && echo visible || echo hidden; "
                 f"test -e {drvs.state} && echo state-visible || echo state-hidden")
    assert p.stdout == "hidden\nstate-hidden\n"


def test_host_processes_are_invisible(drvs):
    host = subprocess.Popen(["sleep", "1234.5"])
    try:
        p = drvs.run("--", "ps", "-eo", "pid,args")
        assert "1234.5" not in p.stdout
        assert "pytest" not in p.stdout
        pids = [int(line.split()[0]) for line in p.stdout.splitlines()[1:]]
        assert 1 in pids and max(pids) < 50  # a pid namespace of its own
    finally:
        host.kill()
        host.wait()


def test_binds_rw_and_ro(drvs, tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "in.txt").write_text("read me")
    p = drvs.run("-v", f"{rw}:/mnt/rw", "-v", f"{ro}:/mnt/ro:ro", "--", "sh", "-c",
                 "echo written > /mnt/rw/out.txt; cat /mnt/ro/in.txt; echo; echo x > /mnt/ro/new 2>&1")
    assert (rw / "out.txt").read_text() == "written\n"
    assert "read me" in p.stdout
    assert "Read-only file system" in p.stderr
    assert not (ro / "new").exists()


def test_system_dirs_are_read_only(drvs):
    p = drvs.run("--", "sh", "-c", "touch /usr/x; echo >> /etc/passwd; touch /newfile; touch /tmp/ok && echo tmp-ok")
    assert p.stderr.count("Read-only file system") == 3
    assert "tmp-ok" in p.stdout


def test_mounts_cannot_be_changed(drvs):
    script = ("mount -o remount,rw /usr && echo remounted; umount /data && echo unmounted; "
              "mount -t tmpfs none /tmp && echo mounted; chroot / true && echo chroot-ok; "
              "grep -E '^(CapBnd|NoNewPrivs)' /proc/self/status")
    p = drvs.run("--", "sh", "-c", script)
    assert "remounted" not in p.stdout and "unmounted" not in p.stdout and "mounted" not in p.stdout
    status = dict(line.split(":\t") for line in p.stdout.splitlines() if ":\t" in line)
    assert status["NoNewPrivs"] == "1"
    cap_sys_admin = 21
    assert not int(status["CapBnd"], 16) & (1 << cap_sys_admin)


def test_network_is_loopback_only_by_default(drvs):
    p = drvs.run("--", "python3", "-c", """
import socket
print(sorted(n for _, n in socket.if_nameindex()))
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
c = socket.create_connection(s.getsockname()); a, _ = s.accept(); c.sendall(b"ping"); print(a.recv(4).decode())
""")
    assert p.stdout == "['lo']\nping\n", p.stderr


def test_net_host_opts_out(drvs):
    import socket

    p = drvs.run("--net", "host", "--", "python3", "-c",
                 "import socket; print(sorted(n for _, n in socket.if_nameindex()))")
    assert eval(p.stdout) == sorted(n for _, n in socket.if_nameindex())


def test_tmp_is_private_and_data_persists(drvs):
    drvs.run("--", "sh", "-c", "echo keep > /data/kept; echo gone > /tmp/scratch", check=True)
    p = drvs.run("--", "sh", "-c", "cat /data/kept; ls /tmp")
    assert p.stdout == "keep\n"
    drvs.drvs("vm", "create", "other", check=True)
    assert drvs.run("--vm", "other", "--", "ls", "/data").stdout == ""


def test_minimal_dev(drvs):
    p = drvs.run("--", "ls", "/dev")
    names = set(p.stdout.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx"} <= names
    assert not names & {"sda", "vda", "mem", "kmsg", "fuse"}
    assert drvs.run("--", "sh", "-c", "head -c 4 /dev/zero | wc -c").stdout.strip() == "4"


def test_runs_of_one_vm_share_the_cell(drvs):
    """Two runs of one VM see one process space; another VM sees neither."""
    first = drvs.popen("--", "sleep", "77.7", stdout=subprocess.DEVNULL)
    try:
        seen = ""
        for _ in range(100):
            seen = drvs.run("--", "ps", "-eo", "args").stdout
            if "sleep 77.7" in seen:
                break
        assert "sleep 77.7" in seen
        drvs.drvs("vm", "create", "other", check=True)
        assert "sleep 77.7" not in drvs.run("--vm", "other", "--", "ps", "-eo", "args").stdout
    finally:
        first.terminate()
        assert first.wait(timeout=20) == 128 + 15


@pytest.mark.parametrize("ns", ["ipc", "uts", "net", "pid", "mnt", "cgroup"])
def test_namespaces_differ_from_the_hosts(drvs, ns):
    import os

    host = os.readlink(f"/proc/self/ns/{ns}")
    inside = drvs.run("--", "readlink", f"/proc/self/ns/{ns}").stdout.strip()
    assert inside and inside != host
