"""Starting the etcd server a cluster keeps its state in (Debian's etcd-server):
data under DRVS's state directory, listening on the given address only."""

import json
import os
import subprocess
import time
import urllib.request

from ..errors import SetupError

CLIENT_PORT, PEER_PORT = 2379, 2380


def start(data_dir: str, address: str, preexec=None) -> int:
    """Start etcd detached (its own session); returns its pid."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    url, peer = f"http://{address}:{CLIENT_PORT}", f"http://{address}:{PEER_PORT}"
    with open(f"{data_dir}/etcd.log", "ab") as log:
        try:
            proc = subprocess.Popen(
                ["etcd", "--name", "etcd", "--data-dir", f"{data_dir}/data", "--listen-client-urls", url,
                 "--advertise-client-urls", url, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"etcd={peer}", "--log-level", "error"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=preexec,
                start_new_session=True)
        except FileNotFoundError:
            raise SetupError("etcd is not installed (Debian package etcd-server; scripts/setup installs it)") from None
    with open(f"{data_dir}/etcd.pid", "w") as f:
        f.write(str(proc.pid))
    return proc.pid


def wait_healthy(url: str, pid: int, log: str, timeout: float = 20) -> None:
    """Until etcd answers (checked from this process's network namespace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise SetupError(f"etcd exited: {open(log).read()[-800:]}") from None
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if json.load(r).get("health") == "true":
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SetupError(f"etcd at {url} not healthy after {timeout:.0f} s")
